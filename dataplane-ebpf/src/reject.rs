//! Reject instead of blackhole: a packet to a frontend with no usable endpoints is turned
//! in place into the answer kube-proxy's `REJECT` would give, and sent back to the pod that
//! sent it, so the client fails at once (ECONNREFUSED) instead of retransmitting until its
//! timeout.
//!
//! | packet to a frontend with `backend_count == 0` | answer (counter)                    |
//! |------------------------------------------------|-------------------------------------|
//! | TCP without RST (SYN, or any later segment)    | RST\|ACK from VIP:port (`reject-tcp`) |
//! | TCP with RST                                   | none: dropped (`no-backends`)       |
//! | UDP                                            | ICMP port unreachable from the VIP quoting the IP + UDP header (`reject-udp`) |
//! | IPv4 options, GSO, IP length inconsistent with the skb or the TCP header | none: dropped (`no-backends`) |
//!
//! Every TCP segment is answered, not only SYNs (as kube-proxy's REJECT does): a segment of
//! a flow whose last backend went away resets the client's connection at its next packet.
//! Fragments, malformed packets and protocols other than TCP/UDP never get here (`parse.rs`).
//! Nothing is rate-limited in this version: an answer is never larger than 70 bytes and
//! goes back out of the interface the packet came in on, i.e. only to the pod that sent it
//! (a spoofed source address cannot aim it at anyone else).
//!
//! The frame is built by the pure functions of `nodeplane_common::reject` (host-tested),
//! then the skb is cut or grown to its length (`bpf_skb_change_tail`) and overwritten.
//! `bpf_redirect(skb->ifindex, 0)` at the tc ingress of the host side of the veth sends it
//! out of that same interface, i.e. to the pod: it crosses `to_pod` like any packet for the
//! pod (a RST or ICMP error from the VIP: no conntrack entry, `pass-not-service`, judged by
//! the pod's ingress policy like any packet).
//!
//! Checksums: the answer carries complete checksums. A packet from a local pod usually
//! arrives with CHECKSUM_PARTIAL, which stays set: the pod's stack then trusts the skb, and
//! the layout keeps `csum_start` on the new L4 header. For CHECKSUM_COMPLETE skbs the IP
//! part is written with `BPF_F_RECOMPUTE_CSUM` (the Ethernet header is outside the sum at
//! tc ingress), and `bpf_skb_change_tail` trims or pads the sum itself.
use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_REDIRECT},
    cty::c_void,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_store_bytes},
    programs::TcContext,
};
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    reject::{
        ICMP_QUOTE_LEN, ICMP_UNREACH_LEN, Segment, TCP_RST_LEN, answers_tcp, icmp_port_unreachable,
        tcp_rst,
    },
};

use crate::parse::{ETH_HLEN, Packet};

/// IPv4 header without options: the only kind answered.
const IP_HLEN: usize = 20;
const L4_OFF: usize = ETH_HLEN + IP_HLEN;

/// Answers `pkt`, a packet to a frontend without usable endpoints: `Ok(RejectTcp |
/// RejectUdp)` once the answer is written and redirected (the entry returns
/// `TC_ACT_REDIRECT`), `Err(DropNoBackends)` for packets not answered (see the table above),
/// `Err(DropRewriteFailed)` if a helper failed.
#[inline(always)]
pub fn answer(ctx: &TcContext, pkt: &Packet) -> Result<Reason, Reason> {
    // SAFETY: `skb` is the context pointer the kernel passed; aya-ebpf 0.2.1 has no accessor
    // for these fields (both readable by tc programs since 5.7).
    let (gso_size, ifindex) = unsafe { ((*ctx.skb.skb).gso_size, (*ctx.skb.skb).ifindex) };
    // Options would move the L4 header (and CHECKSUM_PARTIAL's csum_start) under the answer;
    // a GSO skb is many packets. Pods send neither to a ClusterIP in practice.
    if pkt.l4_off != L4_OFF || gso_size != 0 {
        return Err(Reason::DropNoBackends);
    }
    let reason = match pkt.proto {
        IPPROTO_TCP => rst(ctx, pkt)?,
        IPPROTO_UDP => icmp(ctx)?,
        _ => return Err(Reason::DropNoBackends),
    };
    // SAFETY: helper without pointer arguments. At tc, flags 0 means "out of `ifindex`".
    if unsafe { bpf_redirect(ifindex, 0) } != i64::from(TC_ACT_REDIRECT) {
        return Err(Reason::DropRewriteFailed);
    }
    Ok(reason)
}

#[inline(always)]
fn rst(ctx: &TcContext, pkt: &Packet) -> Result<Reason, Reason> {
    if !answers_tcp(pkt.tcp_flags) {
        return Err(Reason::DropNoBackends);
    }
    // Ethernet, IPv4 (no options), the fixed TCP header: parse checked they are there.
    let h: [u8; L4_OFF + 20] = ctx.load(0).map_err(|_| Reason::DropNoBackends)?;
    let tot_len = usize::from(u16::from_be_bytes([h[ETH_HLEN + 2], h[ETH_HLEN + 3]]));
    let tcp_hlen = usize::from(h[L4_OFF + 12] >> 4) * 4;
    if tot_len < IP_HLEN + tcp_hlen || ETH_HLEN + tot_len > ctx.len() as usize {
        return Err(Reason::DropNoBackends);
    }
    let t = L4_OFF;
    let seg = Segment {
        seq: u32::from_be_bytes([h[t + 4], h[t + 5], h[t + 6], h[t + 7]]),
        ack: u32::from_be_bytes([h[t + 8], h[t + 9], h[t + 10], h[t + 11]]),
        flags: pkt.tcp_flags,
        payload_len: (tot_len - IP_HLEN - tcp_hlen) as u32,
    };
    let mut eth = [0u8; ETH_HLEN];
    eth.copy_from_slice(&h[..ETH_HLEN]);
    let frame = tcp_rst(&eth, pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, &seg);
    write(ctx, &frame)?;
    Ok(Reason::RejectTcp)
}

#[inline(always)]
fn icmp(ctx: &TcContext) -> Result<Reason, Reason> {
    // Ethernet, then the quote: the IPv4 header and the UDP header as received.
    let h: [u8; ETH_HLEN + ICMP_QUOTE_LEN] = ctx.load(0).map_err(|_| Reason::DropNoBackends)?;
    let mut eth = [0u8; ETH_HLEN];
    eth.copy_from_slice(&h[..ETH_HLEN]);
    let mut quote = [0u8; ICMP_QUOTE_LEN];
    quote.copy_from_slice(&h[ETH_HLEN..]);
    let frame = icmp_port_unreachable(&eth, &quote);
    write(ctx, &frame)?;
    Ok(Reason::RejectUdp)
}

/// Makes the skb exactly `frame` long and writes `frame` over it.
#[inline(always)]
fn write<const L: usize>(ctx: &TcContext, frame: &[u8; L]) -> Result<(), Reason> {
    let skb = ctx.skb.skb.cast::<aya_ebpf::bindings::__sk_buff>();
    // SAFETY: helpers on the context pointer; `frame` is a stack array of `L` bytes and
    // every store stays inside it. No packet pointer is held across the resize.
    unsafe {
        if ctx.len() as usize != L && bpf_skb_change_tail(skb, L as u32, 0) != 0 {
            return Err(Reason::DropRewriteFailed);
        }
        let eth = frame.as_ptr() as *const c_void;
        if bpf_skb_store_bytes(skb, 0, eth, ETH_HLEN as u32, 0) != 0 {
            return Err(Reason::DropRewriteFailed);
        }
        let rest = frame.as_ptr().add(ETH_HLEN) as *const c_void;
        let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
        if bpf_skb_store_bytes(skb, ETH_HLEN as u32, rest, (L - ETH_HLEN) as u32, flags) != 0 {
            return Err(Reason::DropRewriteFailed);
        }
    }
    Ok(())
}

const _: () = assert!(TCP_RST_LEN > ETH_HLEN && ICMP_UNREACH_LEN > ETH_HLEN);
