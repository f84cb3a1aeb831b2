//! Header parsing with explicit bounds checks. The rules for odd packets (also in
//! docs/ARCHITECTURE.md, "Malformed packets"):
//!
//! | packet                                         | verdict                    |
//! |------------------------------------------------|----------------------------|
//! | not IPv4 (ARP, IPv6)                           | pass (`pass-not-ipv4`)     |
//! | Ethernet or IPv4 header (with its options) truncated, version≠4, IHL < 5 | drop (`malformed-ip`) |
//! | IPv4 options (IHL > 5)                         | parsed at the real IHL, handled normally |
//! | fragment (MF set or offset ≠ 0) to a ClusterIP | drop (`fragment`): ports unknown, never translated |
//! | fragment to anything else                      | pass (`pass-fragment`)     |
//! | TCP/UDP header truncated, TCP data offset < 5  | drop (`malformed-l4`)      |
//! | other protocol to a ClusterIP                  | drop (`unsupported-protocol`) |
//! | other protocol to anything else                | pass (`pass-not-service`)  |
use aya_ebpf::programs::TcContext;
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
};

use crate::lb;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// MF flag and fragment offset bits of the IPv4 `frag_off` field.
const IP_MF_OR_OFFSET: u16 = 0x3fff;

/// The fields of a TCP/UDP over IPv4 packet the datapath needs. Addresses and ports are in
/// network order, as on the wire.
pub struct Packet {
    /// Offset of the L4 header: `ETH_HLEN + IHL * 4`.
    pub l4_off: usize,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

pub enum Parsed {
    Packet(Packet),
    /// Not for the service path; pass untouched, counted under this reason.
    Pass(Reason),
}

/// Pointer to a `T` at `off` in the linear packet data, if it is all there.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds against data_end; T is a byte array (align 1).
    ptr_at::<T>(ctx, off).map(|p| unsafe { *p })
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, Reason> {
    // GSO/GRO skbs can carry headers outside the linear area; pull what we may read.
    // The pull invalidates no pointer because none was taken yet.
    let want = core::cmp::min(ctx.len() as usize, ETH_HLEN + IPV4_MAX_HLEN + TCP_MIN_HLEN);
    if ctx.data_end() - ctx.data() < want {
        ctx.pull_data(want as u32).map_err(|_| Reason::DropMalformedIp)?;
    }

    let eth_type: [u8; 2] = read(ctx, 12).ok_or(Reason::DropMalformedIp)?;
    if eth_type != ETH_P_IP {
        return Ok(Parsed::Pass(Reason::PassNotIpv4));
    }
    let ip: [u8; IPV4_MIN_HLEN] = read(ctx, ETH_HLEN).ok_or(Reason::DropMalformedIp)?;
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err(Reason::DropMalformedIp);
    }
    let l4_off = ETH_HLEN + ihl * 4;
    // The options the IHL announces must be there too.
    if ptr_at::<u8>(ctx, l4_off - 1).is_none() {
        return Err(Reason::DropMalformedIp);
    }
    let proto = ip[9];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];

    if u16::from_be_bytes([ip[6], ip[7]]) & IP_MF_OR_OFFSET != 0 {
        return if lb::is_service_ip(daddr) {
            Err(Reason::DropFragment)
        } else {
            Ok(Parsed::Pass(Reason::PassFragment))
        };
    }

    let (sport, dport, tcp_flags) = match proto {
        IPPROTO_TCP => {
            let tcp: [u8; TCP_MIN_HLEN] = read(ctx, l4_off).ok_or(Reason::DropMalformedL4)?;
            if tcp[12] >> 4 < 5 {
                return Err(Reason::DropMalformedL4);
            }
            ([tcp[0], tcp[1]], [tcp[2], tcp[3]], tcp[13])
        }
        IPPROTO_UDP => {
            let udp: [u8; UDP_HLEN] = read(ctx, l4_off).ok_or(Reason::DropMalformedL4)?;
            ([udp[0], udp[1]], [udp[2], udp[3]], 0)
        }
        _ => {
            return if lb::is_service_ip(daddr) {
                Err(Reason::DropUnsupportedProto)
            } else {
                Ok(Parsed::Pass(Reason::PassNotService))
            };
        }
    };
    Ok(Parsed::Packet(Packet { l4_off, saddr, daddr, sport, dport, proto, tcp_flags }))
}
