//! ICMP errors about service flows, reverse-translated in `to_pod` so that path MTU
//! discovery (and every other error) works through a Service.
//!
//! A router, the backend's node or the backend itself answers the DNATed packet
//! `client:cport -> backend:bport`; the client's socket is connected to `vip:vport` and
//! would ignore an error quoting the backend. `to_pod` is the one place that sees every
//! such error, wherever it comes from (a router, the client's own node generating
//! "fragmentation needed" on forwarding, a local or remote backend pod): the conntrack
//! entries live on the client's node and every error crosses the client's veth. So
//! `from_pod` does nothing with ICMP errors (a local backend pod's error passes it
//! untouched, `pass-not-service`) and there is one translation, never two.
//!
//! | ICMP packet arriving at `to_pod`                               | verdict |
//! |----------------------------------------------------------------|---------|
//! | type 3 (every code) or 11, quoting unfragmented TCP/UDP whose quote reversed (`backend:bport -> client:cport`) has a REPLY entry trusted as for a reply (live ORIGINAL entry naming that backend), outer destination = quoted source | policy judges it as it is on the wire (ports 0), then the quote's destination becomes `vip:vport`, and the outer source too if it is the backend (`icmp-rev-nat`) |
//! | another type, a quote of anything else, no such flow, outer destination ≠ quoted source | the usual path: untouched (`pass-not-service`) |
//! | ICMP header, quoted IPv4 header (with its options) or the quoted 8 L4 bytes cut short (by the skb or the outer total length), quoted version ≠ 4 or IHL < 5 | untouched (`pass-not-service`): never translated, not dropped (the kernel's ICMP code discards what it cannot use) |
//!
//! Checksums: see `nodeplane_common::icmp` (incremental, Linux's choices: the quoted TCP
//! checksum is updated only when the error quotes it). The conntrack entry is not
//! refreshed: an error is no sign of life of the flow.
//!
//! Not handled: errors about the reply direction (a backend's reply reverse-NATed by this
//! node, answered by a router to the VIP) and hairpin flows (errors about them are
//! addressed to the hairpin address, never to a pod).
use aya_ebpf::programs::TcContext;
use nodeplane_common::{
    icmp::{ICMP_HLEN, L4Csum, QUOTE_L4_LEN, Quote, is_translated_error, replace4, reverse_quote},
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    policy::IPPROTO_ICMP,
    reason::Reason,
};

use crate::{
    ct,
    parse::{ETH_HLEN, Frag, Packet},
    policy,
};

const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
/// MF flag and fragment offset bits of the IPv4 `frag_off` field.
const IP_MF_OR_OFFSET: u16 = 0x3fff;

/// An ICMP error about a live service flow, and where its fields are.
pub struct Error {
    quote: Quote,
    l4: L4Csum,
    /// Offsets in the frame of the ICMP header, the quoted IPv4 header and L4 header.
    icmp_off: usize,
    qip_off: usize,
    ql4_off: usize,
    l4_csum_off: usize,
    vip: [u8; 4],
    vport: [u8; 2],
    /// The backend sent the error itself: the outer source becomes the VIP.
    from_backend: bool,
}

/// `pkt` as an ICMP error about a live translated service flow, or `None` (see the table).
#[inline(always)]
pub fn error_of(ctx: &TcContext, pkt: &Packet) -> Option<Error> {
    if pkt.proto != IPPROTO_ICMP || pkt.frag != Frag::None {
        return None;
    }
    let icmp_off = pkt.l4_off;
    let icmp: [u8; ICMP_HLEN] = ctx.load(icmp_off).ok()?;
    if !is_translated_error(icmp[0]) {
        return None;
    }
    let outer: [u8; 4] = ctx.load(ETH_HLEN).ok()?;
    let end = ETH_HLEN + usize::from(u16::from_be_bytes([outer[2], outer[3]]));
    let qip_off = icmp_off + ICMP_HLEN;
    let qip: [u8; 20] = ctx.load(qip_off).ok()?;
    let qihl = usize::from(qip[0] & 0x0f) * 4;
    if qip[0] >> 4 != 4 || qihl < 20 {
        return None;
    }
    let frag_off = u16::from_be_bytes([qip[6], qip[7]]);
    let proto = qip[9];
    if frag_off & IP_MF_OR_OFFSET != 0 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let ql4_off = qip_off + qihl;
    if ql4_off + QUOTE_L4_LEN > end {
        return None;
    }
    let ql4: [u8; QUOTE_L4_LEN] = ctx.load(ql4_off).ok()?;
    let saddr = [qip[12], qip[13], qip[14], qip[15]];
    let daddr = [qip[16], qip[17], qip[18], qip[19]];
    if pkt.daddr != saddr {
        return None;
    }
    // The quote reversed is what a reply of the flow looks like: `ct::lookup_reply` finds
    // the VIP and trusts it only while the flow's ORIGINAL entry names this backend.
    let reply = Packet {
        l4_off: 0,
        saddr: daddr,
        daddr: saddr,
        sport: [ql4[2], ql4[3]],
        dport: [ql4[0], ql4[1]],
        proto,
        tcp_flags: 0,
        ip_id: [0; 2],
        frag: Frag::None,
    };
    let rev = ct::lookup_reply(&reply)?;
    let (l4, l4_csum_off, l4_csum) = if proto == IPPROTO_UDP {
        let c = [ql4[UDP_CSUM], ql4[UDP_CSUM + 1]];
        (if c == [0; 2] { L4Csum::Absent } else { L4Csum::Udp }, ql4_off + UDP_CSUM, c)
    } else {
        let off = ql4_off + TCP_CSUM;
        match if off + 2 <= end { ctx.load::<[u8; 2]>(off).ok() } else { None } {
            Some(c) => (L4Csum::Tcp, off, c),
            None => (L4Csum::Absent, off, [0; 2]),
        }
    };
    Some(Error {
        quote: Quote {
            daddr,
            ip_csum: [qip[IP_CSUM], qip[IP_CSUM + 1]],
            dport: reply.sport,
            l4_csum,
        },
        l4,
        icmp_off,
        qip_off,
        ql4_off,
        l4_csum_off,
        vip: rev.vip,
        vport: rev.vport,
        from_backend: pkt.saddr == daddr,
    })
}

/// Policy judges the error as it is on the wire (or records it, if this node generated
/// it), then [`rewrite`].
#[inline(always)]
pub fn judge_then_reverse(
    ctx: &TcContext,
    pkt: &Packet,
    err: &Error,
    from_host: bool,
) -> Result<Reason, Reason> {
    let flow = policy::Flow::of(pkt, ctx.len());
    if from_host {
        policy::host(&flow);
    } else {
        policy::check(policy::Hook::ToPod, &flow, Reason::IcmpRevNat)?;
    }
    rewrite(ctx, err)?;
    Ok(Reason::IcmpRevNat)
}

/// Writes the translated quote, the ICMP checksum and (from the backend) the outer source.
#[inline(always)]
fn rewrite(ctx: &TcContext, e: &Error) -> Result<(), Reason> {
    let fail = |_| Reason::DropRewriteFailed;
    let icmp_csum: [u8; 2] = ctx.load(e.icmp_off + 2).map_err(fail)?;
    let (q, icmp_csum) = reverse_quote(e.quote, e.l4, e.vip, e.vport, icmp_csum);
    // Plain stores: every checksum is written explicitly, each change is checksum-neutral.
    ctx.store(e.qip_off + IP_DADDR, &q.daddr, 0).map_err(fail)?;
    ctx.store(e.qip_off + IP_CSUM, &q.ip_csum, 0).map_err(fail)?;
    ctx.store(e.ql4_off + 2, &q.dport, 0).map_err(fail)?;
    if e.l4 != L4Csum::Absent {
        ctx.store(e.l4_csum_off, &q.l4_csum, 0).map_err(fail)?;
    }
    ctx.store(e.icmp_off + 2, &icmp_csum, 0).map_err(fail)?;
    if e.from_backend {
        let ip_csum: [u8; 2] = ctx.load(ETH_HLEN + IP_CSUM).map_err(fail)?;
        ctx.store(ETH_HLEN + IP_SADDR, &e.vip, 0).map_err(fail)?;
        let c = replace4(ip_csum, e.quote.daddr, e.vip);
        ctx.store(ETH_HLEN + IP_CSUM, &c, 0).map_err(fail)?;
    }
    Ok(())
}
