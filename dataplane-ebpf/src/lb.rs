//! Service lookup and backend selection: three hash lookups, whatever the number of
//! services and endpoints (frontend -> slot -> backend). Split in two so policy can judge
//! the translated flow in between: [`plan`] chooses the backend, [`commit`] records the
//! flow and rewrites the packet.
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use nodeplane_common::{
    maps::{BackendV4, CtValueV4, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey},
    reason::Reason,
};

use crate::{
    ct,
    maps::{BACKEND_SLOTS, BACKENDS_V4, SERVICES_V4},
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
            });
        }
        // The backend is gone (or its id now names another endpoint): never send to a dead
        // address; choose again below.
        ct::forget_reply(pkt, e);
        reason = Reason::NatReselected;
    }
    let (backend_id, backend) = select_backend(&svc)?;
    Ok(Forward {
        backend,
        reason,
        entry: core::ptr::null_mut(),
        service_id: svc.service_id,
        backend_id,
    })
}

/// Carries out `fwd`: refresh or record the flow in conntrack, then DNAT.
#[inline(always)]
pub fn commit(ctx: &TcContext, pkt: &Packet, fwd: &Forward, now: u64) -> Result<Reason, Reason> {
    if fwd.entry.is_null() {
        ct::create(pkt, fwd.service_id, fwd.backend_id, &fwd.backend, now)?;
    } else {
        // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
        ct::refresh(unsafe { &mut *fwd.entry }, pkt, now);
    }
    nat::dnat(ctx, pkt, fwd.backend.addr, fwd.backend.port)?;
    Ok(fwd.reason)
}

#[inline(always)]
fn backend_matches(id: u32, addr: [u8; 4], port: [u8; 2]) -> bool {
    // SAFETY: plain-data value read once.
    match unsafe { BACKENDS_V4.get(id) } {
        Some(b) => b.addr == addr && b.port == port,
        None => false,
    }
}

/// Uniform random choice among `0..backend_count` slots, like kube-proxy's iptables mode.
#[inline(always)]
fn select_backend(svc: &ServiceValue) -> Result<(u32, BackendV4), Reason> {
    if svc.backend_count == 0 {
        return Err(Reason::DropNoBackends);
    }
    // SAFETY: helper without preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
    let key = SlotKey { service_id: svc.service_id, slot };
    // SAFETY: plain-data values copied out at once.
    let backend_id = *unsafe { BACKEND_SLOTS.get(key) }.ok_or(Reason::DropNoBackendEntry)?;
    let backend = *unsafe { BACKENDS_V4.get(backend_id) }.ok_or(Reason::DropNoBackendEntry)?;
    Ok((backend_id, backend))
}
