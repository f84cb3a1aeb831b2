//! Socket-level load balancing for host-network clients (kubelet, host-network pods): four
//! cgroup `sock_addr` programs, attached by the agent to the cgroup v2 root
//! (`agent/src/socklb.rs`).
//!
//! ```text
//! connect4 / sendmsg4: in scope? ─► frontend (user_ip4, user_port, proto)? ─┬─ backends ─► pick one (lb.rs) ─► user := backend, record (cookie, backend) -> VIP
//!                                                                            └─ none ─► fail the call: ECONNREFUSED
//! recvmsg4 / getpeername4: in scope? ─► (cookie, user_ip4, user_port) recorded? ─► user := VIP
//! ```
//!
//! The address is rewritten once per `connect` (or per unconnected `sendmsg`), before the
//! kernel routes anything: the packets then go straight to the backend and no conntrack
//! entry, DNAT or reverse NAT is needed per packet. What the process sees stays the VIP:
//! `recvmsg`'s source address and `getpeername` are translated back from `SOCK_REVNAT_V4`.
//!
//! **Scope.** A cgroup spans network namespaces, so the programs translate only sockets of
//! the network namespace named in `SOCK_CONFIG` (the agent's, i.e. the host's on a real
//! node; 0 = off). Pods keep the per-packet tc translation (`from_pod`): their sockets
//! are never touched here, so a pod's flows keep one translation. In the lab several nodes
//! are network namespaces of one machine sharing the cgroup tree; every node's agent
//! attaches its own programs to the same cgroup and each translates its own namespace.
//!
//! **Frontends.** ClusterIP frontends only: external ones (`SVC_F_EXTERNAL`: NodePort,
//! LoadBalancer, ExternalIP) are left to the per-packet path on the node's interfaces.
//! Session affinity is honoured with the node as the one client (address 0.0.0.0 in
//! `AFFINITY_V4`, which no pod has): every host process is one client, as under
//! kube-proxy, where host traffic carries the node's address.
//!
//! **No backends.** `bpf_set_retval(-ECONNREFUSED)` and return 0 (kernel >= 5.18 for
//! `connect4`/`sendmsg4`): the `connect` or `sendmsg` fails at once with ECONNREFUSED,
//! where a pod gets a RST or an ICMP port unreachable. That includes UDP: a datagram
//! socket learns of it at `connect`/`sendmsg`, not at the next `recv`.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use nodeplane_common::{
    maps::{
        AffinityKeyV4, AffinityValueV4, IPPROTO_TCP, IPPROTO_UDP, SVC_F_AFFINITY, SVC_F_DROP_EMPTY,
        SVC_F_EXTERNAL, SVC_F_VIP_MARKER, ServiceKeyV4,
    },
    reason::{Hook, Reason},
    sock::{
        SockRevNatKeyV4, SockRevNatValueV4, user_ip4_addr, user_ip4_of, user_port_bytes,
        user_port_of,
    },
};

use crate::{
    ct, lb,
    maps::{AFFINITY_V4, SERVICES_V4, SOCK_CONFIG, SOCK_REVNAT_V4},
    metrics,
};

/// Let the call go on (with whatever address the program wrote).
const ALLOW: i32 = 1;
/// Fail the call with the error set by `bpf_set_retval` (EPERM if none was).
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
/// The client address of host sockets in `AFFINITY_V4` (module docs).
const NODE_CLIENT: [u8; 4] = [0, 0, 0, 0];

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// UDP only (the kernel runs it for `recvmsg` on datagram sockets). Must return 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

/// Must return 1.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

/// `bpf_set_retval` (helper 187, kernel >= 5.18 for cgroup programs): the error the
/// syscall returns when the program returns 0. aya-ebpf-bindings 0.2.0 predates it.
#[inline(always)]
unsafe fn bpf_set_retval(retval: i32) -> i32 {
    // SAFETY: the helper's number and signature (`long bpf_set_retval(int retval)`).
    let f: unsafe extern "C" fn(i32) -> i32 = unsafe { core::mem::transmute(187usize) };
    unsafe { f(retval) }
}

/// The socket belongs to the network namespace this node's agent translates.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let Some(config) = SOCK_CONFIG.get(0) else { return false };
    // SAFETY: helper on the program's own context.
    config.netns_cookie != 0
        && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == config.netns_cookie
}

/// `connect4`/`sendmsg4`: counts what happened and turns it into the return value.
#[inline(always)]
fn forward(ctx: &SockAddrContext) -> i32 {
    match try_forward(ctx) {
        None => ALLOW,
        Some(Ok(reason)) => {
            metrics::count(Hook::Sock, reason, 0);
            ALLOW
        }
        Some(Err(reason)) => {
            metrics::count(Hook::Sock, reason, 0);
            // SAFETY: helper without preconditions; allowed for connect4 and sendmsg4.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
    }
}

/// `None`: not ours (another namespace, not a frontend). `Some(Ok)`: translated.
/// `Some(Err)`: refused.
#[inline(always)]
fn try_forward(ctx: &SockAddrContext) -> Option<Result<Reason, Reason>> {
    if !in_scope(ctx) {
        return None;
    }
    // SAFETY: the context pointer the kernel passed; these fields are readable in
    // connect4 and sendmsg4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return None,
    };
    let (vip, vport) = (user_ip4_addr(sa.user_ip4), user_port_bytes(sa.user_port));
    let key = ServiceKeyV4 { addr: vip, port: vport, proto, _pad: 0 };
    // SAFETY: plain-data value copied out at once.
    let svc = unsafe { SERVICES_V4.get(key) }.copied()?;
    if svc.flags & (SVC_F_VIP_MARKER | SVC_F_EXTERNAL) != 0 {
        return None;
    }
    let now = ct::now();
    let choice = match lb::select_backend(&svc, NODE_CLIENT, now) {
        Ok(choice) => choice,
        Err(Reason::DropNoBackends) if svc.flags & SVC_F_DROP_EMPTY != 0 => {
            return Some(Err(Reason::DropNoBackends));
        }
        Err(Reason::DropNoBackends) if proto == IPPROTO_TCP => {
            return Some(Err(Reason::RejectTcp));
        }
        Err(Reason::DropNoBackends) => return Some(Err(Reason::RejectUdp)),
        Err(other) => return Some(Err(other)),
    };
    let (addr, port) = (choice.backend.addr, choice.backend.port);
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev_key = SockRevNatKeyV4 { cookie, addr, port, _pad: [0; 2] };
    let rev = SockRevNatValueV4 { vip, vport, _pad: [0; 2] };
    // A failed insert (never with an LRU) would only show the backend to recvmsg and
    // getpeername: the connection itself still works.
    let _ = SOCK_REVNAT_V4.insert(rev_key, rev, 0);
    if svc.flags & SVC_F_AFFINITY != 0 {
        let key = AffinityKeyV4 { service_id: svc.service_id, client: NODE_CLIENT };
        let value =
            AffinityValueV4 { backend_id: choice.backend_id, slot: choice.slot, last_seen_ns: now };
        let _ = AFFINITY_V4.insert(key, value, 0);
    }
    sa.user_ip4 = user_ip4_of(addr);
    sa.user_port = user_port_of(port);
    Some(Ok(Reason::NatNew))
}

/// `recvmsg4`/`getpeername4`: a backend this socket was translated to reads as the VIP.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    if !in_scope(ctx) {
        return;
    }
    // SAFETY: the context pointer the kernel passed; user_ip4 and user_port are readable
    // and writable in recvmsg4 and getpeername4.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevNatKeyV4 {
        cookie,
        addr: user_ip4_addr(sa.user_ip4),
        port: user_port_bytes(sa.user_port),
        _pad: [0; 2],
    };
    // SAFETY: plain-data value copied out at once.
    let Some(rev) = (unsafe { SOCK_REVNAT_V4.get(key) }).copied() else { return };
    sa.user_ip4 = user_ip4_of(rev.vip);
    sa.user_port = user_port_of(rev.vport);
    metrics::count(Hook::Sock, Reason::RevNat, 0);
}
