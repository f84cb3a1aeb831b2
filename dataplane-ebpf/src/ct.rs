//! The datapath's conntrack. A service flow has two entries in `CT_V4`:
//!
//! - ORIGINAL, keyed by the client's packet `client:cport -> vip:vport`, holding the
//!   backend, the TCP state and the deadline. It is the authority on whether the flow lives.
//! - REPLY, keyed by the backend's packet `backend:bport -> client:cport`, holding the VIP
//!   to rewrite the source to. It is trusted only while its ORIGINAL entry is alive and
//!   still points at this backend, so a stale REPLY entry can never translate a packet.
//!
//! A hairpin flow (the client is its own backend) carries `CT_F_HAIRPIN` on both entries;
//! its packets are also SNATed to `HAIRPIN_ADDR_V4`, so its REPLY entry is keyed by
//! `backend:bport -> HAIRPIN_ADDR_V4:cport` and its reply gets both addresses back.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use nodeplane_common::{
    ct::{TcpState, lifetime_ns, tcp_next},
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_EXTERNAL, CT_F_HAIRPIN, CtKeyV4, CtValueV4,
        HAIRPIN_ADDR_V4, IPPROTO_TCP,
    },
    policy::PolicyCtKey,
    reason::Reason,
};

use crate::{maps::CT_V4, parse::Packet};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn original_key(pkt: &Packet) -> CtKeyV4 {
    CtKeyV4 {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    }
}

/// The live ORIGINAL entry of `pkt`'s flow for frontend `service_id`, if any. An entry of a
/// frontend that was deleted and re-created (new id) does not count.
#[inline(always)]
pub fn lookup_original(pkt: &Packet, service_id: u32, now: u64) -> Option<*mut CtValueV4> {
    let entry = CT_V4.get_ptr_mut(original_key(pkt))?;
    // SAFETY: valid element pointer for this run (RCU).
    let e = unsafe { &*entry };
    (e.expires_ns > now && e.service_id == service_id).then_some(entry)
}

/// What a reply of a service flow must be rewritten to.
pub struct RevNat {
    pub vip: [u8; 4],
    pub vport: [u8; 2],
    /// A hairpin flow's reply (`pod -> HAIRPIN_ADDR_V4`): its destination goes back to
    /// the pod (the client) too.
    pub hairpin: bool,
    /// A flow of an external frontend (`CT_F_EXTERNAL`): `from_pod` leaves its reply to
    /// `to_netdev` or `to_pod`.
    pub external: bool,
    /// The flow's live ORIGINAL entry, refreshed by [`RevNat::refresh`] once the reply is
    /// let through.
    original: *mut CtValueV4,
}

impl RevNat {
    /// Advances the flow's state and deadline with this reply.
    #[inline(always)]
    pub fn refresh(&self, pkt: &Packet) {
        // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
        refresh(unsafe { &mut *self.original }, pkt, now());
    }
}

/// For a packet from a backend to a client: the VIP to rewrite its source to, if it belongs
/// to a live service flow. Changes nothing: policy judges the reply first.
#[inline(always)]
pub fn lookup_reply(pkt: &Packet) -> Option<RevNat> {
    let key = CtKeyV4 { dir: CT_DIR_REPLY, ..original_key(pkt) };
    // SAFETY: plain-data value copied out at once.
    let reply = *unsafe { CT_V4.get(key) }?;
    let hairpin = reply.flags & CT_F_HAIRPIN != 0;
    // A hairpin reply is addressed to HAIRPIN_ADDR_V4; its client is the pod sending it.
    let client = if hairpin { pkt.saddr } else { pkt.daddr };
    let okey = CtKeyV4 {
        saddr: client,
        daddr: reply.nat_addr,
        sport: pkt.dport,
        dport: reply.nat_port,
        proto: pkt.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    let original = CT_V4.get_ptr_mut(okey)?;
    // SAFETY: valid element pointer for this run (RCU).
    let o = unsafe { &*original };
    if o.expires_ns <= now() || o.nat_addr != pkt.saddr || o.nat_port != pkt.sport {
        return None;
    }
    let external = reply.flags & CT_F_EXTERNAL != 0;
    Some(RevNat { vip: reply.nat_addr, vport: reply.nat_port, hairpin, external, original })
}

/// For a reply that `from_pod` already reverse-translated (`vip:vport -> client:cport`, from
/// a backend on this node), given its flow's original tuple `client:cport -> vip:vport`:
/// the backend `(addr, port)` of the live ORIGINAL entry. Policy needs it because its
/// conntrack is keyed by the backend, not the VIP.
#[inline(always)]
pub fn backend_of_translated_reply(original: &PolicyCtKey) -> Option<([u8; 4], [u8; 2])> {
    let key = CtKeyV4 {
        saddr: original.saddr,
        daddr: original.daddr,
        sport: original.sport,
        dport: original.dport,
        proto: original.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    // SAFETY: plain-data value copied out at once.
    let original = *unsafe { CT_V4.get(key) }?;
    (original.expires_ns > now()).then_some((original.nat_addr, original.nat_port))
}

/// TCP state after a packet with `tcp_flags` (`TcpState::None` for other protocols), and
/// the deadline it gives the entry. `state` is the stored state (0 for a new flow).
#[inline(always)]
pub fn advance(proto: u8, state: u8, tcp_flags: u8, now: u64) -> (u8, u64) {
    let state = if proto == IPPROTO_TCP {
        tcp_next(TcpState::from_u8(state), tcp_flags)
    } else {
        TcpState::None
    };
    (state as u8, now + lifetime_ns(proto, state))
}

/// Advances the TCP state with this packet's flags and pushes the deadline.
#[inline(always)]
pub fn refresh(entry: &mut CtValueV4, pkt: &Packet, now: u64) {
    (entry.state, entry.expires_ns) = advance(pkt.proto, entry.state, pkt.tcp_flags, now);
}

/// Records a new flow `pkt` -> `backend`: the ORIGINAL and the REPLY entry. `hairpin`: the
/// backend is the client itself (module docs); `external`: the frontend is a NodePort,
/// LoadBalancer or ExternalIP one (`CT_F_EXTERNAL`).
#[inline(always)]
pub fn create(
    pkt: &Packet,
    service_id: u32,
    backend_id: u32,
    backend: &BackendV4,
    hairpin: bool,
    external: bool,
    now: u64,
) -> Result<(), Reason> {
    let (state, expires_ns) = advance(pkt.proto, TcpState::None as u8, pkt.tcp_flags, now);
    let original = CtValueV4 {
        nat_addr: backend.addr,
        nat_port: backend.port,
        state,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 } | if external { CT_F_EXTERNAL } else { 0 },
        service_id,
        backend_id,
        expires_ns,
        policy: 0,
        _reserved: 0,
    };
    let reply_key = CtKeyV4 {
        saddr: backend.addr,
        daddr: if hairpin { HAIRPIN_ADDR_V4 } else { pkt.saddr },
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let reply = CtValueV4 { nat_addr: pkt.daddr, nat_port: pkt.dport, ..original };
    // REPLY first: a reply can only arrive after the ORIGINAL packet is forwarded anyway.
    CT_V4.insert(reply_key, reply, 0).map_err(|_| Reason::DropCtInsertFailed)?;
    CT_V4.insert(original_key(pkt), original, 0).map_err(|_| Reason::DropCtInsertFailed)
}

/// A client's TCP SYN straight to an address that is not a frontend: if a service flow's
/// REPLY entry has this very tuple reversed (the same client port once reached the same
/// backend through a Service) and that flow is over (closing, closed, expired or gone),
/// the new connection supersedes it: the entry is deleted, or it would turn the new
/// connection's replies into the old frontend's. A flow still open is left alone: the SYN
/// may be one XDP already DNATed for it (`from_netdev` sees that too), and two open
/// connections on one tuple collide whatever is done here. Only the first packet of a
/// connection pays the lookup.
#[inline(always)]
pub fn forget_superseded(pkt: &Packet) {
    use nodeplane_common::ct::{TCP_FLAG_ACK, TCP_FLAG_SYN};
    if pkt.proto != IPPROTO_TCP || pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return;
    }
    let key = CtKeyV4 {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: plain-data value copied out at once.
    let Some(reply) = (unsafe { CT_V4.get(key) }).copied() else { return };
    let original = CtKeyV4 {
        saddr: pkt.saddr,
        daddr: reply.nat_addr,
        sport: pkt.sport,
        dport: reply.nat_port,
        proto: pkt.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    // SAFETY: as above.
    let open = unsafe { CT_V4.get(original) }.is_some_and(|o| {
        o.expires_ns > now()
            && matches!(TcpState::from_u8(o.state), TcpState::SynSent | TcpState::Established)
    });
    if !open {
        let _ = CT_V4.remove(key);
    }
}

/// Drops the REPLY entry of a flow whose backend is being replaced.
#[inline(always)]
pub fn forget_reply(pkt: &Packet, original: &CtValueV4) {
    let hairpin = original.flags & CT_F_HAIRPIN != 0;
    let key = CtKeyV4 {
        saddr: original.nat_addr,
        daddr: if hairpin { HAIRPIN_ADDR_V4 } else { pkt.saddr },
        sport: original.nat_port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // A missing entry (already evicted) is fine.
    let _ = CT_V4.remove(key);
}
