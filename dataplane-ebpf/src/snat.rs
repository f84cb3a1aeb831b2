//! SNAT to the node's address: pods' masquerade and NodePort flows forwarded to another
//! node. The table's rules (two entries per flow, per-destination port uniqueness, the
//! mark) are in `nodeplane_common::nat`; this is the per-packet part:
//!
//! - [`egress`] (`to_netdev`): a packet of an SNATed flow gets `node_ip:nat_port` as its
//!   source; a packet that should start one gets a port from [`allocate`] first.
//! - [`reverse`] (`from_netdev`): a reply to `node_ip:nat_port` gets the client's address
//!   and port back as its destination.
use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use nodeplane_common::{
    ct::{TCP_FLAG_ACK, TCP_FLAG_SYN},
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    nat::{
        NAT_CFG_MASQUERADE, NAT_DIR_IN, NAT_DIR_OUT, NAT_F_NODEPORT, NAT_PROBES, NatConfig,
        NatKeyV4, NatValueV4, candidate_port,
    },
    reason::Reason,
};

use crate::{
    ct,
    maps::{NAT_CONFIG, NAT_V4, NO_MASQ_V4},
    nat,
    parse::Packet,
};

/// The agent's NAT configuration (all zero until it writes one: nothing is SNATed).
#[inline(always)]
pub fn config() -> NatConfig {
    NAT_CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn key(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    dir: u8,
) -> NatKeyV4 {
    NatKeyV4 { saddr, daddr, sport, dport, proto, dir, _pad: [0; 2] }
}

/// A reply to an SNATed flow (`peer:pport -> node_ip:nat_port`): its destination goes back
/// to the client. `None` if `pkt` is not one.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Packet, now: u64) -> Option<Result<Reason, Reason>> {
    let k = key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, NAT_DIR_IN);
    let entry = NAT_V4.get_ptr_mut(k)?;
    // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
    let e = unsafe { &mut *entry };
    touch(e, pkt, now);
    let (addr, port) = (e.addr, e.port);
    Some(nat::rev_snat_dst(ctx, pkt, addr, port).map(|()| Reason::RevSnat))
}

/// A packet of the entry's direction: its TCP state and last-seen time move on.
#[inline(always)]
fn touch(e: &mut NatValueV4, pkt: &Packet, now: u64) {
    e.state = ct::advance(pkt.proto, e.state, pkt.tcp_flags, now).0;
    e.last_seen_ns = now;
}

/// Should a pod's packet to `pkt.daddr` be masqueraded?
#[inline(always)]
fn masquerades(cfg: &NatConfig, pkt: &Packet) -> bool {
    cfg.flags & NAT_CFG_MASQUERADE != 0
        && cfg.is_pod(pkt.saddr)
        && NO_MASQ_V4.get(Key::new(32, pkt.daddr)).is_none()
}

/// A packet leaving through the node's external interface. `nodeport`: it carries
/// `MARK_SNAT` (a NodePort flow DNATed here to a backend on another node). `Ok(None)`:
/// nothing to do.
#[inline(always)]
pub fn egress(
    ctx: &TcContext,
    pkt: &Packet,
    nodeport: bool,
    now: u64,
) -> Result<Option<Reason>, Reason> {
    let cfg = config();
    if !nodeport && !masquerades(&cfg, pkt) {
        return Ok(None);
    }
    if cfg.node_ip == [0; 4] {
        // A NodePort flow whose reply could not come back here: drop it, counted.
        return if nodeport { Err(Reason::DropNoNodeIp) } else { Ok(None) };
    }
    if pkt.saddr == cfg.node_ip {
        return Ok(None);
    }
    let mapped = match mapping(pkt, now) {
        Mapping::Owned(addr, port) => {
            nat::snat(ctx, pkt, addr, port)?;
            return Ok(Some(Reason::Snat));
        }
        Mapping::Lost => true,
        Mapping::None => false,
    };
    // A masqueraded TCP flow starts with the pod's SYN, as iptables' MASQUERADE only NATs
    // new connections: a segment of a flow never mapped (a pod's SYN-ACK to a peer that
    // reached its address directly) leaves as it is.
    let syn = pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if !nodeport && !mapped && pkt.proto == IPPROTO_TCP && !syn {
        return Ok(None);
    }
    let flags = if nodeport { NAT_F_NODEPORT } else { 0 };
    let port = start(ctx.skb.skb.cast(), pkt, &cfg, flags, now)?;
    nat::snat(ctx, pkt, cfg.node_ip, port)?;
    Ok(Some(Reason::SnatNew))
}

/// For XDP: the `node_ip:port` a NodePort packet (`pkt`, already DNATed to a backend on
/// another node) leaves with: its flow's, or a new one's. `ctx` is the program's context
/// pointer (for the socket lookups).
#[inline(always)]
pub fn nodeport_source(
    ctx: *mut c_void,
    pkt: &Packet,
    now: u64,
) -> Result<([u8; 4], [u8; 2], Reason), Reason> {
    let cfg = config();
    if cfg.node_ip == [0; 4] {
        return Err(Reason::DropNoNodeIp);
    }
    if let Mapping::Owned(addr, port) = mapping(pkt, now) {
        return Ok((addr, port, Reason::Snat));
    }
    let port = start(ctx, pkt, &cfg, NAT_F_NODEPORT, now)?;
    Ok((cfg.node_ip, port, Reason::SnatNew))
}

/// A flow's SNAT mapping, as [`mapping`] finds it.
enum Mapping {
    /// No OUT entry: the flow was never SNATed (or its entry is gone).
    None,
    /// An OUT entry whose port another flow took (an evicted IN entry let it): the flow
    /// gets a new port.
    Lost,
    /// The `node_ip:port` the flow leaves with (refreshed by this packet).
    Owned([u8; 4], [u8; 2]),
}

#[inline(always)]
fn mapping(pkt: &Packet, now: u64) -> Mapping {
    let out = key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, NAT_DIR_OUT);
    let Some(entry) = NAT_V4.get_ptr_mut(out) else { return Mapping::None };
    // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
    let e = unsafe { &mut *entry };
    if !owns_port(pkt, e.addr, e.port) {
        return Mapping::Lost;
    }
    touch(e, pkt, now);
    Mapping::Owned(e.addr, e.port)
}

/// Starts an SNATed flow: claims a port and records the OUT entry.
#[inline(always)]
fn start(
    ctx: *mut c_void,
    pkt: &Packet,
    cfg: &NatConfig,
    flags: u8,
    now: u64,
) -> Result<[u8; 2], Reason> {
    let port = allocate(ctx, pkt, cfg, flags, now)?;
    let out = key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, NAT_DIR_OUT);
    let state = ct::advance(pkt.proto, 0, pkt.tcp_flags, now).0;
    let value = NatValueV4 { addr: cfg.node_ip, port, flags, state, last_seen_ns: now };
    NAT_V4.insert(out, value, 0).map_err(|_| Reason::DropCtInsertFailed)?;
    Ok(port)
}

/// For XDP: the IN entry of a reply (`peer:pport -> node_ip:nat_port`), refreshed: the
/// client's address and port, and whether the flow is a NodePort one.
#[inline(always)]
pub fn lookup_reverse(pkt: &Packet, now: u64) -> Option<([u8; 4], [u8; 2], bool)> {
    let k = key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, NAT_DIR_IN);
    let entry = NAT_V4.get_ptr_mut(k)?;
    // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
    let e = unsafe { &mut *entry };
    touch(e, pkt, now);
    Some((e.addr, e.port, e.flags & NAT_F_NODEPORT != 0))
}

/// Does the IN entry of `node_ip:port` towards this packet's peer name its client?
#[inline(always)]
fn owns_port(pkt: &Packet, node_ip: [u8; 4], port: [u8; 2]) -> bool {
    let k = key(pkt.daddr, node_ip, pkt.dport, port, pkt.proto, NAT_DIR_IN);
    // SAFETY: plain-data value read once.
    match unsafe { NAT_V4.get(k) } {
        Some(v) => v.addr == pkt.saddr && v.port == pkt.sport,
        None => false,
    }
}

/// Claims a port of the range for a new flow of `pkt`: the first candidate (from a random
/// start) that no other flow to the same peer holds and no socket of the node would
/// receive the reply of. The IN entry is inserted with `BPF_NOEXIST`, so two CPUs never
/// claim the same port for the same peer.
#[inline(always)]
fn allocate(
    ctx: *mut c_void,
    pkt: &Packet,
    cfg: &NatConfig,
    flags: u8,
    now: u64,
) -> Result<[u8; 2], Reason> {
    if cfg.port_min == 0 || cfg.port_min > cfg.port_max {
        return Err(Reason::DropNatExhausted);
    }
    // SAFETY: helper without preconditions.
    let seed = unsafe { bpf_get_prandom_u32() };
    // The peer has sent nothing yet: its direction starts with no TCP state.
    let client =
        NatValueV4 { addr: pkt.saddr, port: pkt.sport, flags, state: 0, last_seen_ns: now };
    for probe in 0..NAT_PROBES {
        let port = candidate_port(seed, probe, cfg.port_min, cfg.port_max).to_be_bytes();
        if node_socket_owns(ctx, pkt, cfg.node_ip, port) {
            continue;
        }
        let k = key(pkt.daddr, cfg.node_ip, pkt.dport, port, pkt.proto, NAT_DIR_IN);
        if NAT_V4.insert(k, client, u64::from(BPF_NOEXIST)).is_ok() {
            return Ok(port);
        }
        // Taken. A finished flow's port need not wait for the agent's GC: delete its IN
        // entry and claim the port with BPF_NOEXIST again (two CPUs racing for it both
        // delete, only one insert wins).
        if dead(&k, now) {
            let _ = NAT_V4.remove(k);
            if NAT_V4.insert(k, client, u64::from(BPF_NOEXIST)).is_ok() {
                return Ok(port);
            }
        }
    }
    Err(Reason::DropNatExhausted)
}

/// Is the flow of IN entry `k` over? `nodeplane_common::nat::dead`, the agent's GC rule.
#[inline(always)]
fn dead(k: &NatKeyV4, now: u64) -> bool {
    // SAFETY: plain-data values copied out at once.
    let Some(v) = (unsafe { NAT_V4.get(k) }).copied() else { return false };
    let partner = unsafe { NAT_V4.get(v.partner(k)) }.copied();
    nodeplane_common::nat::dead(k.proto, &v, now, partner.as_ref())
}

/// Would a socket of the node receive `peer:pport -> node_ip:port` (a listener on that
/// port, a connection of the node's own, a TCP socket in TIME_WAIT)?
#[inline(always)]
fn node_socket_owns(ctx: *mut c_void, pkt: &Packet, node_ip: [u8; 4], port: [u8; 2]) -> bool {
    // SAFETY: all-zero is a valid `bpf_sock_tuple` (plain integers in a union).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(pkt.daddr);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(node_ip);
    tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes(pkt.dport);
    tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes(port);
    // The IPv4 half of the union: two addresses and two ports.
    let size = 12;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = ctx;
    // SAFETY: `skb` is the program's context, `tuple` a valid local of `size` bytes; a
    // returned socket is released at once (the verifier checks it is).
    let sk = unsafe {
        match pkt.proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(skb, &mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(skb, &mut tuple, size, netns, 0),
            _ => core::ptr::null_mut(),
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` was returned by a lookup helper and is released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
