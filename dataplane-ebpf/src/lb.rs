//! Service lookup and backend selection: three hash lookups, whatever the number of
//! services and endpoints (frontend -> slot -> backend).
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use nodeplane_common::{
    maps::{BackendV4, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey},
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

/// A packet to a frontend: follow its conntrack entry while the backend lives, otherwise
/// pick a backend and remember the choice.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, svc: ServiceValue) -> Result<Reason, Reason> {
    let now = ct::now();
    let mut reason = Reason::NatNew;
    if let Some(entry) = ct::lookup_original(pkt, svc.service_id, now) {
        // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
        let entry = unsafe { &mut *entry };
        if backend_matches(entry.backend_id, entry.nat_addr, entry.nat_port) {
            ct::refresh(entry, pkt, now);
            nat::dnat(ctx, pkt, entry.nat_addr, entry.nat_port)?;
            return Ok(Reason::NatEstablished);
        }
        // The backend is gone (or its id now names another endpoint): never send to a dead
        // address; choose again below.
        ct::forget_reply(pkt, entry);
        reason = Reason::NatReselected;
    }
    let (backend_id, backend) = select_backend(&svc)?;
    ct::create(pkt, svc.service_id, backend_id, &backend, now)?;
    nat::dnat(ctx, pkt, backend.addr, backend.port)?;
    Ok(reason)
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
