//! Address and port rewriting with incremental checksum updates.
//!
//! The kernel's `bpf_l3_csum_replace`/`bpf_l4_csum_replace` are used rather than our own
//! arithmetic because packets from a local pod usually carry CHECKSUM_PARTIAL (veth
//! offloads TX checksums): the L4 field then holds only the pseudo-header sum, and
//! `BPF_F_PSEUDO_HDR` makes the helper update it correctly in both cases.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nodeplane_common::{
    maps::{HAIRPIN_ADDR_V4, IPPROTO_TCP},
    reason::Reason,
};

use crate::parse::{ETH_HLEN, Packet};

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// Destination `vip:vport` -> `addr:port`.
#[inline(always)]
pub fn dnat(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: [u8; 2]) -> Result<(), Reason> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.daddr, addr, pkt.l4_off + 2, pkt.dport, port)
}

/// Source `backend:bport` -> `vip:vport`.
#[inline(always)]
pub fn rev_snat(ctx: &TcContext, pkt: &Packet, vip: [u8; 4], vport: [u8; 2]) -> Result<(), Reason> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.saddr, vip, pkt.l4_off, pkt.sport, vport)
}

/// SNAT: source `client:cport` -> `node_ip:nat_port` (`snat.rs`).
#[inline(always)]
pub fn snat(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: [u8; 2]) -> Result<(), Reason> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.saddr, addr, pkt.l4_off, pkt.sport, port)
}

/// The reply of an SNATed flow: destination `node_ip:nat_port` -> `client:cport`.
#[inline(always)]
pub fn rev_snat_dst(
    ctx: &TcContext,
    pkt: &Packet,
    addr: [u8; 4],
    port: [u8; 2],
) -> Result<(), Reason> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.daddr, addr, pkt.l4_off + 2, pkt.dport, port)
}

/// Hairpin: source `client` -> `HAIRPIN_ADDR_V4`, port kept (after [`dnat`], which leaves
/// the source alone).
#[inline(always)]
pub fn hairpin_snat(ctx: &TcContext, pkt: &Packet) -> Result<(), Reason> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.saddr, HAIRPIN_ADDR_V4, pkt.l4_off, pkt.sport, pkt.sport)
}

/// A hairpin reply: destination `HAIRPIN_ADDR_V4` -> the pod sending it (after
/// [`rev_snat`], which leaves the destination alone).
#[inline(always)]
pub fn hairpin_rev_dnat(ctx: &TcContext, pkt: &Packet) -> Result<(), Reason> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.daddr, pkt.saddr, pkt.l4_off + 2, pkt.dport, pkt.dport)
}

#[expect(clippy::too_many_arguments, reason = "one call site per direction, all offsets explicit")]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<(), Reason> {
    // UDP checksum 0 means "none": MARK_MANGLED_0 leaves it 0 and never produces a 0.
    let (csum_off, l4_flags) = if pkt.proto == IPPROTO_TCP {
        (pkt.l4_off + TCP_CSUM_OFF, 0)
    } else {
        (pkt.l4_off + UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let err = |_| Reason::DropRewriteFailed;
    if old_addr != new_addr {
        let (from, to) =
            (u64::from(u32::from_ne_bytes(old_addr)), u64::from(u32::from_ne_bytes(new_addr)));
        ctx.l4_csum_replace(csum_off, from, to, u64::from(BPF_F_PSEUDO_HDR) | l4_flags | 4)
            .map_err(err)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4).map_err(err)?;
        ctx.store(addr_off, &new_addr, 0).map_err(err)?;
    }
    if old_port != new_port {
        let (from, to) =
            (u64::from(u16::from_ne_bytes(old_port)), u64::from(u16::from_ne_bytes(new_port)));
        ctx.l4_csum_replace(csum_off, from, to, l4_flags | 2).map_err(err)?;
        ctx.store(port_off, &new_port, 0).map_err(err)?;
    }
    Ok(())
}
