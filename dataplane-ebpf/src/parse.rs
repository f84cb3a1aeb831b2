//! Header parsing with explicit bounds checks. The rules for odd packets (also in
//! docs/ARCHITECTURE.md, "Malformed packets"):
//!
//! | packet                                         | verdict                    |
//! |------------------------------------------------|----------------------------|
//! | not IPv4 (ARP, IPv6)                           | pass (`pass-not-ipv4`)     |
//! | Ethernet or IPv4 header (with its options) truncated, version≠4, IHL < 5 | drop (`malformed-ip`) |
//! | IPv4 options (IHL > 5)                         | parsed at the real IHL, handled normally |
//! | fragment (MF set or offset ≠ 0) to a ClusterIP | drop (`fragment`): ports unknown, never translated |
//! | first fragment (MF set, offset 0) to anything else | a [`Packet`] with its ports, [`Frag::First`]: policy judges it, it is never translated |
//! | later fragment (offset ≠ 0) to anything else   | a [`Packet`] with ports 0, [`Frag::Later`]: policy lets it pass if the first fragment did (`pass-fragment`) |
//! | TCP/UDP/SCTP header truncated, TCP data offset < 5 | drop (`malformed-l4`)  |
//! | SCTP or another protocol to a ClusterIP        | drop (`unsupported-protocol`) |
//! | another protocol (ICMP, ...) to anything else  | a [`Packet`] with ports 0, for policy; never translated |
use aya_ebpf::programs::TcContext;
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    policy::IPPROTO_SCTP,
    reason::Reason,
};

use crate::lb;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// The SCTP common header: ports, verification tag, checksum.
const SCTP_HLEN: usize = 12;
/// MF flag and fragment offset bits of the IPv4 `frag_off` field.
const IP_MF_OR_OFFSET: u16 = 0x3fff;
/// Fragment offset bits of the IPv4 `frag_off` field.
const IP_OFFSET: u16 = 0x1fff;

/// The fields of an IPv4 packet the datapath needs. Addresses and ports are in network
/// order, as on the wire. Ports are those of TCP, UDP or SCTP, and 0 for other protocols.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the L4 header: `ETH_HLEN + IHL * 4`.
    pub l4_off: usize,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// IPv4 identification field (what the fragments of one datagram share).
    pub ip_id: [u8; 2],
    pub frag: Frag,
}

/// Where a packet stands in IPv4 fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// MF set, offset 0: the L4 header (ports) is here; judged by policy, never translated.
    First,
    /// Offset ≠ 0: no L4 header, ports 0; judged by the policy fragment check only.
    Later,
}

impl Packet {
    /// Unfragmented TCP or UDP: what services translate.
    #[inline(always)]
    pub fn is_translatable(&self) -> bool {
        self.frag == Frag::None && (self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP)
    }
}

// A later fragment is a `Packet` rather than a variant of its own: with a third variant
// whose fields overlap `Packet`'s, LLVM 22 filled the fields left undefined on the `Pass`
// path with whatever register was at hand (the context pointer) and masked it, which the
// 6.18 verifier rejects ("R6 bitwise operator &= on pointer prohibited").
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
    let ip_id = [ip[4], ip[5]];

    let frag_off = u16::from_be_bytes([ip[6], ip[7]]);
    let fragmented = frag_off & IP_MF_OR_OFFSET != 0;
    if fragmented {
        if lb::is_service_ip(daddr) {
            return Err(Reason::DropFragment);
        }
        if frag_off & IP_OFFSET != 0 {
            return Ok(Parsed::Packet(Packet {
                l4_off,
                saddr,
                daddr,
                sport: [0; 2],
                dport: [0; 2],
                proto,
                tcp_flags: 0,
                ip_id,
                frag: Frag::Later,
            }));
        }
    }
    // MF set, offset 0: the L4 header is here.
    let frag = if fragmented { Frag::First } else { Frag::None };

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
            // A first fragment's destination was checked above already.
            if frag == Frag::None && lb::is_service_ip(daddr) {
                return Err(Reason::DropUnsupportedProto);
            }
            if proto == IPPROTO_SCTP {
                let sctp: [u8; SCTP_HLEN] = read(ctx, l4_off).ok_or(Reason::DropMalformedL4)?;
                ([sctp[0], sctp[1]], [sctp[2], sctp[3]], 0)
            } else {
                ([0; 2], [0; 2], 0)
            }
        }
    };
    Ok(Parsed::Packet(Packet { l4_off, saddr, daddr, sport, dport, proto, tcp_flags, ip_id, frag }))
}
