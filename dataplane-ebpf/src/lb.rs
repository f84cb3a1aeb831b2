//! Service lookup and backend selection: three hash lookups, whatever the number of
//! services and endpoints (frontend -> slot -> backend). Split in two so policy can judge
//! the translated flow in between: [`plan`] chooses the backend, [`commit`] records the
//! flow and rewrites the packet.
//!
//! **Session affinity** (`SVC_F_AFFINITY`, `sessionAffinity: ClientIP`), new flows only: the
//! client's `AFFINITY_V4` entry names the backend id and slot of its last new flow to the
//! frontend. It is honoured when less than `affinity_timeout_s` passed since then and the
//! backend id still sits in slot `s`, `s - 1` or `s + 1` (below `backend_count`): a slot
//! says the backend is still a usable one of *this* frontend, which `BACKENDS_V4` does not
//! (it also holds draining backends and those of other frontends). Slots are the sorted
//! backends, so one backend leaving or joining before it shifts it by one; larger shifts
//! cost the client its affinity (it gets a new backend, as when its backend left).
//! Otherwise a random slot is chosen. [`commit`] records the choice with the time, so the
//! timeout runs from the client's last new flow (kube-proxy's iptables `recent` match
//! does the same); packets of established flows neither read nor refresh it.
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use nodeplane_common::{
    maps::{
        AffinityKeyV4, AffinityValueV4, BackendV4, CtValueV4, SVC_F_AFFINITY, SVC_F_EXTERNAL,
        SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey, affinity_live,
    },
    reason::Reason,
};

use crate::{
    ct,
    maps::{AFFINITY_V4, BACKEND_SLOTS, BACKENDS_V4, SERVICES_V4},
    nat,
    parse::Packet,
};

#[inline(always)]
pub fn lookup_service(pkt: &Packet) -> Option<ServiceValue> {
    let key = ServiceKeyV4 { addr: pkt.daddr, port: pkt.dport, proto: pkt.proto, _pad: 0 };
    // SAFETY: the value is copied out at once; the agent may update it concurrently, and a
    // torn read of this 16-byte value is prevented by the kernel's RCU-replaced elements.
    let svc = unsafe { SERVICES_V4.get(key) }.copied()?;
    (svc.flags & SVC_F_VIP_MARKER == 0).then_some(svc)
}

/// Is `addr` a ClusterIP (does it have a VIP marker)?
#[inline(always)]
pub fn is_service_ip(addr: [u8; 4]) -> bool {
    SERVICES_V4.get_ptr(ServiceKeyV4::vip_marker(addr)).is_some()
}

/// Where a packet to a frontend goes. Chosen by [`plan`] before policy judges the
/// translated flow, carried out by [`commit`] only if policy allows it.
pub struct Forward {
    /// The backend the packet is DNATed to (its `addr` and `port`).
    pub backend: BackendV4,
    /// `NatEstablished`, `NatNew` or `NatReselected`.
    pub reason: Reason,
    /// Established: the flow's live ORIGINAL entry (refreshed on commit). Otherwise null:
    /// commit records a new flow to `backend_id`.
    entry: *mut CtValueV4,
    service_id: u32,
    backend_id: u32,
    /// The slot a new flow's backend was chosen from (0 when established).
    slot: u32,
    /// A new flow of a frontend with session affinity: commit records its choice.
    affinity: bool,
    /// The frontend is an external one (`SVC_F_EXTERNAL`): the flow is recorded so.
    external: bool,
}

/// A packet to a frontend: follow its conntrack entry while the backend lives, otherwise
/// pick a backend. Writes nothing but the removal of a dead backend's REPLY entry.
#[inline(always)]
pub fn plan(pkt: &Packet, svc: ServiceValue, now: u64) -> Result<Forward, Reason> {
    let mut reason = Reason::NatNew;
    if let Some(entry) = ct::lookup_original(pkt, svc.service_id, now) {
        // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
        let e = unsafe { &*entry };
        if backend_matches(e.backend_id, e.nat_addr, e.nat_port) {
            return Ok(Forward {
                backend: BackendV4 {
                    addr: e.nat_addr,
                    port: e.nat_port,
                    proto: pkt.proto,
                    flags: 0,
                },
                reason: Reason::NatEstablished,
                entry,
                service_id: svc.service_id,
                backend_id: e.backend_id,
                slot: 0,
                affinity: false,
                external: false,
            });
        }
        // The backend is gone (or its id now names another endpoint): never send to a dead
        // address; choose again below.
        ct::forget_reply(pkt, e);
        reason = Reason::NatReselected;
    }
    let choice = select_backend(&svc, pkt.saddr, now)?;
    Ok(Forward {
        backend: choice.backend,
        reason,
        entry: core::ptr::null_mut(),
        service_id: svc.service_id,
        backend_id: choice.backend_id,
        slot: choice.slot,
        affinity: svc.flags & SVC_F_AFFINITY != 0,
        external: svc.flags & SVC_F_EXTERNAL != 0,
    })
}

impl Forward {
    /// The client is its own backend: the flow is also SNATed to `HAIRPIN_ADDR_V4`
    /// (`nat::hairpin_snat`) and recorded with `CT_F_HAIRPIN`.
    #[inline(always)]
    pub fn is_hairpin(&self, pkt: &Packet) -> bool {
        self.backend.addr == pkt.saddr
    }
}

/// Carries out `fwd`: refresh or record the flow in conntrack, then DNAT (and the hairpin
/// SNAT when the client is its own backend).
#[inline(always)]
pub fn commit(ctx: &TcContext, pkt: &Packet, fwd: &Forward, now: u64) -> Result<Reason, Reason> {
    record(pkt, fwd, now)?;
    nat::dnat(ctx, pkt, fwd.backend.addr, fwd.backend.port)?;
    if fwd.is_hairpin(pkt) {
        nat::hairpin_snat(ctx, pkt)?;
    }
    Ok(fwd.reason)
}

/// The conntrack (and affinity) half of [`commit`]: what XDP does before rewriting the
/// packet itself.
#[inline(always)]
pub fn record(pkt: &Packet, fwd: &Forward, now: u64) -> Result<(), Reason> {
    let hairpin = fwd.is_hairpin(pkt);
    if fwd.entry.is_null() {
        let (id, backend) = (fwd.backend_id, &fwd.backend);
        ct::create(pkt, fwd.service_id, id, backend, hairpin, fwd.external, now)?;
        if fwd.affinity {
            let key = AffinityKeyV4 { service_id: fwd.service_id, client: pkt.saddr };
            let value =
                AffinityValueV4 { backend_id: fwd.backend_id, slot: fwd.slot, last_seen_ns: now };
            // A failed insert only costs the client its stickiness, never the packet.
            let _ = AFFINITY_V4.insert(key, value, 0);
        }
    } else {
        // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
        ct::refresh(unsafe { &mut *fwd.entry }, pkt, now);
    }
    Ok(())
}

#[inline(always)]
fn backend_matches(id: u32, addr: [u8; 4], port: [u8; 2]) -> bool {
    // SAFETY: plain-data value read once.
    match unsafe { BACKENDS_V4.get(id) } {
        Some(b) => b.addr == addr && b.port == port,
        None => false,
    }
}

/// A backend for a new flow, and the slot it was found in.
pub struct Choice {
    pub backend_id: u32,
    pub backend: BackendV4,
    pub slot: u32,
}

/// The client's affinity if the frontend has one and it holds (module docs), otherwise a
/// uniform random choice among `0..backend_count` slots, like kube-proxy's iptables mode.
/// `client`: the address whose affinity counts (the socket LB, `sock.rs`, passes its own).
#[inline(always)]
pub fn select_backend(svc: &ServiceValue, client: [u8; 4], now: u64) -> Result<Choice, Reason> {
    if svc.backend_count == 0 {
        return Err(Reason::DropNoBackends);
    }
    if svc.flags & SVC_F_AFFINITY != 0
        && let Some(choice) = sticky(svc, client, now)
    {
        return Ok(choice);
    }
    // SAFETY: helper without preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
    let key = SlotKey { service_id: svc.service_id, slot };
    // SAFETY: plain-data values copied out at once.
    let backend_id = *unsafe { BACKEND_SLOTS.get(key) }.ok_or(Reason::DropNoBackendEntry)?;
    let backend = *unsafe { BACKENDS_V4.get(backend_id) }.ok_or(Reason::DropNoBackendEntry)?;
    Ok(Choice { backend_id, backend, slot })
}

/// The backend `client`'s live affinity names, if it is still in one of the frontend's
/// slots (the remembered one or a neighbour).
#[inline(always)]
fn sticky(svc: &ServiceValue, client: [u8; 4], now: u64) -> Option<Choice> {
    let key = AffinityKeyV4 { service_id: svc.service_id, client };
    // SAFETY: plain-data value copied out at once.
    let a = *unsafe { AFFINITY_V4.get(key) }?;
    if !affinity_live(a.last_seen_ns, now, svc.affinity_timeout_s) {
        return None;
    }
    // Three candidates written out: no loop for the verifier to bound.
    let slot = in_slot(svc, a.backend_id, a.slot)
        .or_else(|| in_slot(svc, a.backend_id, a.slot.wrapping_sub(1)))
        .or_else(|| in_slot(svc, a.backend_id, a.slot.wrapping_add(1)))?;
    // SAFETY: plain-data value copied out at once.
    let backend = *unsafe { BACKENDS_V4.get(a.backend_id) }?;
    Some(Choice { backend_id: a.backend_id, backend, slot })
}

/// `Some(slot)` if slot `slot` of the frontend is valid and names `backend_id`.
#[inline(always)]
fn in_slot(svc: &ServiceValue, backend_id: u32, slot: u32) -> Option<u32> {
    if slot >= svc.backend_count {
        return None;
    }
    let key = SlotKey { service_id: svc.service_id, slot };
    // SAFETY: plain-data value read once.
    (*unsafe { BACKEND_SLOTS.get(key) }? == backend_id).then_some(slot)
}
