//! XDP on the node's external interfaces: the north-south fast path, before any skb exists.
//!
//! ```text
//! parse ─┬─ not plain IPv4 TCP/UDP (options, fragments, other) ─► pass (tc handles it)
//!        ├─ reply to an SNATed flow ─┬─ masquerade: destination := pod ─► pass
//!        │                           └─ NodePort: destination := client, source := frontend,
//!        │                                        MACs from the FIB ─► XDP_TX
//!        ├─ to a frontend ─► source range? no ─► drop
//!        │                 └─ backend ─┬─ on this node: DNAT ─► pass (the stack delivers it)
//!        │                             └─ out of this interface again: DNAT + SNAT,
//!        │                                MACs from the FIB ─► XDP_TX
//!        └─ anything else ─► pass
//! ```
//!
//! Whatever XDP cannot finish alone it leaves untouched for tc, which does the same job
//! with the kernel's help: a next hop without a neighbour entry, a route out of another
//! interface, a frontend without endpoints (tc answers with a RST or ICMP). Conntrack, the
//! NAT table and the allocator are the ones tc uses, so a flow can move between the two
//! paths packet by packet.
//!
//! Checksums are updated incrementally (RFC 1624): what arrives on a real interface carries
//! complete checksums.
//!
//! XDP_TX forwards like the kernel's own forwarding path, which tc relies on: the TTL is
//! decremented, and a packet whose TTL would expire is left to the stack (it answers with
//! an ICMP time exceeded).
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    macros::xdp,
    programs::XdpContext,
};
use nodeplane_common::{
    csum,
    maps::{IPPROTO_TCP, IPPROTO_UDP, SVC_F_DROP_EMPTY, SVC_F_ETP_LOCAL, SVC_F_SOURCE_RANGES},
    reason::{Hook, Reason},
};

use crate::{
    ct, lb, metrics,
    netdev::source_allowed,
    parse::{Frag, Packet},
    snat,
};

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const L4_OFF: usize = ETH_HLEN + IP_HLEN;
const AF_INET: u8 = 2;

#[xdp]
pub fn xdp_netdev(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_xdp(&ctx) {
        Ok(done) => done,
        Err(reason) => (xdp_action::XDP_DROP, reason),
    };
    metrics::count(Hook::Xdp, reason, (ctx.data_end() - ctx.data()) as u32);
    action
}

type Done = (u32, Reason);

const fn pass(reason: Reason) -> Result<Done, Reason> {
    Ok((xdp_action::XDP_PASS, reason))
}

/// A pointer to `len` bytes at `off`, if the packet has them.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut u8)
}

/// A plain IPv4 TCP or UDP packet (no options, not a fragment): what XDP translates.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Packet> {
    let eth = at(ctx, 0, L4_OFF)?;
    // SAFETY: `at` checked that the Ethernet and a minimal IPv4 header are there.
    let (eth_type, ip) =
        unsafe { ([*eth.add(12), *eth.add(13)], &*(eth.add(ETH_HLEN) as *const [u8; IP_HLEN])) };
    if eth_type != [0x08, 0x00] || ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
    {
        return None;
    }
    let proto = ip[9];
    let (sport, dport, tcp_flags) = match proto {
        IPPROTO_TCP => {
            let l4 = at(ctx, L4_OFF, 20)?;
            // SAFETY: bounds checked by `at`.
            let t = unsafe { &*(l4 as *const [u8; 20]) };
            if t[12] >> 4 < 5 {
                return None;
            }
            ([t[0], t[1]], [t[2], t[3]], t[13])
        }
        IPPROTO_UDP => {
            let l4 = at(ctx, L4_OFF, 8)?;
            // SAFETY: bounds checked by `at`.
            let u = unsafe { &*(l4 as *const [u8; 8]) };
            ([u[0], u[1]], [u[2], u[3]], 0)
        }
        _ => return None,
    };
    Some(Packet {
        l4_off: L4_OFF,
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport,
        dport,
        proto,
        tcp_flags,
        ip_id: [ip[4], ip[5]],
        frag: Frag::None,
    })
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<Done, Reason> {
    let Some(pkt) = parse(ctx) else {
        return pass(Reason::PassNotService);
    };
    let now = ct::now();
    if let Some((client, cport, nodeport)) = snat::lookup_reverse(&pkt, now) {
        return reply(ctx, &pkt, client, cport, nodeport);
    }
    let Some(svc) = lb::lookup_service(&pkt) else {
        return pass(Reason::PassNotService);
    };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(svc.service_id, pkt.saddr) {
        return Err(Reason::DropSourceRange);
    }
    let fwd = match lb::plan(&pkt, svc, now) {
        // tc answers with a RST or an ICMP error (and counts it); XDP leaves the packet
        // to it.
        Err(Reason::DropNoBackends) if svc.flags & SVC_F_DROP_EMPTY == 0 => {
            return pass(Reason::PassNotService);
        }
        other => other?,
    };
    let (addr, port) = (fwd.backend.addr, fwd.backend.port);
    let mut fib = fib_params(&pkt, pkt.saddr, addr, ctx);
    // SAFETY: `ctx.ctx` is the program's context, `fib` a valid local of its own size.
    let rc = unsafe {
        fib_lookup(ctx.ctx.cast(), &mut fib, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    let ingress = ingress_ifindex(ctx);
    let out_same = fib.ifindex == ingress;
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && out_same && svc.flags & SVC_F_ETP_LOCAL == 0 {
        // A backend behind another node: DNAT and SNAT here, back out at once.
        if !ttl_left(ctx) {
            return pass(Reason::PassNotService);
        }
        let to = Packet { daddr: addr, dport: port, ..pkt };
        let (node_ip, nat_port, reason) = snat::nodeport_source(ctx.ctx.cast(), &to, now)?;
        lb::record(&pkt, &fwd, now)?;
        set_dst(ctx, &pkt, addr, port)?;
        set_src(ctx, &to, node_ip, nat_port)?;
        set_macs(ctx, &fib)?;
        dec_ttl(ctx)?;
        return Ok((xdp_action::XDP_TX, reason));
    }
    let routed = rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64;
    if routed && !out_same {
        // A backend on this node (a pod's veth): DNAT, the stack delivers it and the reply
        // leaves through `to_netdev`. (The node itself is no forwarding destination: the
        // lookup says so and the packet goes to tc untouched.)
        lb::record(&pkt, &fwd, now)?;
        set_dst(ctx, &pkt, addr, port)?;
        return pass(fwd.reason);
    }
    // No neighbour yet, or no route: tc does it all (and the kernel resolves the
    // neighbour for the next packet).
    pass(Reason::PassNotService)
}

/// A reply to an SNATed flow. A pod's (masquerade): back to the pod through the stack.
/// A NodePort flow's: straight back to the client, with the frontend as its source.
#[inline(always)]
fn reply(
    ctx: &XdpContext,
    pkt: &Packet,
    client: [u8; 4],
    cport: [u8; 2],
    nodeport: bool,
) -> Result<Done, Reason> {
    if !nodeport {
        set_dst(ctx, pkt, client, cport)?;
        return pass(Reason::RevSnat);
    }
    // The flow's REPLY entry, as `to_netdev` would find it once the destination is back.
    let back = Packet { daddr: client, dport: cport, ..*pkt };
    let Some(rev) = ct::lookup_reply(&back) else {
        return pass(Reason::PassNotService);
    };
    let mut fib = fib_params(pkt, rev.vip, client, ctx);
    // SAFETY: as in `try_xdp`.
    let rc = unsafe {
        fib_lookup(ctx.ctx.cast(), &mut fib, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || fib.ifindex != ingress_ifindex(ctx) {
        // tc: `from_netdev` gives the destination back, `to_netdev` the source.
        return pass(Reason::PassNotService);
    }
    if !ttl_left(ctx) {
        return pass(Reason::PassNotService);
    }
    rev.refresh(&back);
    set_dst(ctx, pkt, client, cport)?;
    set_src(ctx, &back, rev.vip, rev.vport)?;
    set_macs(ctx, &fib)?;
    dec_ttl(ctx)?;
    Ok((xdp_action::XDP_TX, Reason::RevSnat))
}

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: the program's context; a plain field.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

/// FIB lookup parameters for a packet `src -> dst` arriving on the context's interface.
#[inline(always)]
fn fib_params(pkt: &Packet, src: [u8; 4], dst: [u8; 4], ctx: &XdpContext) -> bpf_fib_lookup {
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (integers and unions of integers).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.sport = u16::from_ne_bytes(pkt.sport);
    p.dport = u16::from_ne_bytes(pkt.dport);
    p.__bindgen_anon_1.tot_len = (ctx.data_end() - ctx.data() - ETH_HLEN) as u16;
    p.ifindex = ingress_ifindex(ctx);
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    p
}

/// The L4 checksum's offset and whether it is UDP's (0 means "none" there).
#[inline(always)]
fn l4_csum_off(pkt: &Packet) -> (usize, bool) {
    if pkt.proto == IPPROTO_TCP { (L4_OFF + 16, false) } else { (L4_OFF + 6, true) }
}

/// Rewrites an address (at `addr_off`) and a port (at `port_off`) with both checksums.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    addr_off: usize,
    old: ([u8; 4], [u8; 2]),
    new: ([u8; 4], [u8; 2]),
    port_off: usize,
) -> Result<(), Reason> {
    let (csum_off, udp) = l4_csum_off(pkt);
    let ip_csum = at(ctx, ETH_HLEN + 10, 2).ok_or(Reason::DropRewriteFailed)?;
    let l4_csum = at(ctx, csum_off, 2).ok_or(Reason::DropRewriteFailed)?;
    let addr = at(ctx, addr_off, 4).ok_or(Reason::DropRewriteFailed)?;
    let port = at(ctx, port_off, 2).ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: every pointer was bounds-checked by `at`; the fields are byte arrays.
    unsafe {
        let ip_check = u16::from_be_bytes(*(ip_csum as *const [u8; 2]));
        *(ip_csum as *mut [u8; 2]) = csum::replace4(ip_check, old.0, new.0).to_be_bytes();
        let check = u16::from_be_bytes(*(l4_csum as *const [u8; 2]));
        if !(udp && check == 0) {
            let c = csum::replace2(csum::replace4(check, old.0, new.0), old.1, new.1);
            // UDP: a computed 0 is sent as all ones (0 would mean "no checksum").
            let c = if udp && c == 0 { 0xffff } else { c };
            *(l4_csum as *mut [u8; 2]) = c.to_be_bytes();
        }
        *(addr as *mut [u8; 4]) = new.0;
        *(port as *mut [u8; 2]) = new.1;
    }
    Ok(())
}

/// Destination `pkt.daddr:dport` -> `addr:port`.
#[inline(always)]
fn set_dst(ctx: &XdpContext, pkt: &Packet, addr: [u8; 4], port: [u8; 2]) -> Result<(), Reason> {
    rewrite(ctx, pkt, ETH_HLEN + 16, (pkt.daddr, pkt.dport), (addr, port), L4_OFF + 2)
}

/// Source `pkt.saddr:sport` -> `addr:port`.
#[inline(always)]
fn set_src(ctx: &XdpContext, pkt: &Packet, addr: [u8; 4], port: [u8; 2]) -> Result<(), Reason> {
    rewrite(ctx, pkt, ETH_HLEN + 12, (pkt.saddr, pkt.sport), (addr, port), L4_OFF)
}

/// Can the packet be forwarded (XDP_TX) with its TTL decremented? A TTL of 0 or 1 would
/// expire here: the stack must answer with an ICMP time exceeded, so XDP leaves the packet
/// to tc and the kernel's forwarding path.
#[inline(always)]
fn ttl_left(ctx: &XdpContext) -> bool {
    // SAFETY: bounds checked by `at`.
    at(ctx, ETH_HLEN + 8, 1).is_some_and(|ttl| unsafe { *ttl } > 1)
}

/// XDP_TX forwards the packet as a router does (RFC 1812 5.3.1): TTL minus one, header
/// checksum updated, exactly as the kernel does on the tc path. Call after [`ttl_left`].
#[inline(always)]
fn dec_ttl(ctx: &XdpContext) -> Result<(), Reason> {
    // The TTL shares its 16-bit checksum word with the protocol.
    let word = at(ctx, ETH_HLEN + 8, 2).ok_or(Reason::DropRewriteFailed)?;
    let ip_csum = at(ctx, ETH_HLEN + 10, 2).ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: both pointers were bounds-checked by `at`; the fields are byte arrays.
    unsafe {
        let old = *(word as *const [u8; 2]);
        let new = [old[0].wrapping_sub(1), old[1]];
        let check = u16::from_be_bytes(*(ip_csum as *const [u8; 2]));
        *(ip_csum as *mut [u8; 2]) = csum::replace2(check, old, new).to_be_bytes();
        *(word as *mut [u8; 2]) = new;
    }
    Ok(())
}

/// The next hop's Ethernet addresses from a successful FIB lookup.
#[inline(always)]
fn set_macs(ctx: &XdpContext, fib: &bpf_fib_lookup) -> Result<(), Reason> {
    let eth = at(ctx, 0, 12).ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: bounds checked by `at`.
    unsafe {
        *(eth as *mut [u8; 6]) = fib.dmac;
        *(eth.add(6) as *mut [u8; 6]) = fib.smac;
    }
    Ok(())
}
