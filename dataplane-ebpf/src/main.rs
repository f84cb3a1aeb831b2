//! The kernel side of nodeplane.
//!
//! Two tc programs sit on the host side of every pod veth. `from_pod` (ingress) sees every
//! packet a pod sends and checks the pod's EGRESS policy; `to_pod` (egress) sees every
//! packet delivered to a pod and checks its INGRESS policy. Policy always judges the packet
//! after DNAT and before reverse NAT (see `policy.rs` for its rules). `from_pod`, per packet:
//!
//! ```text
//! parse ─┬─ later fragment ─► policy: fragment seen? ─► pass | drop
//!        └─ packet ─► service lookup ─┬─ hit ─► conntrack (ORIGINAL) ─┬─ live ─► its backend ─┐
//!                                     │                               └─ miss ─► pick backend ┤
//!                                     │   ┌───────────────────────────────────────────────────┘
//!                                     │   └► policy (egress, on client -> backend:target port) ─► ct insert/refresh ─► DNAT
//!                                     └─ miss ─► conntrack (REPLY) ─► policy (egress, wire tuple) ─┬─ reply ─► reverse NAT (src := VIP)
//!                                                                                                 └─ other ─► pass untouched
//! ```
//! `to_pod`:
//!
//! ```text
//! parse ─┬─ later fragment ─► host-originated? pass : policy: fragment seen? ─► pass | drop
//!        └─ packet ─► conntrack (REPLY) ─► host-originated? record : policy (ingress, wire tuple) ─┬─ reply ─► reverse NAT
//!                                                                                               └─ other ─► pass untouched
//! ```
//! Before that, an ICMP error (type 3 or 11) quoting a DNATed packet of a live service flow
//! gets its quote (and its source, if the backend sent it) back to the VIP (`icmp.rs`).
//!
//! `to_pod` reverse-translates replies whose conntrack entry this node created, wherever the
//! backend is. That is what makes backends on other nodes and on the host network work:
//! their replies never cross the ingress of a local pod veth, but they always cross the
//! client's veth on the way in. (A reply from a local backend pod is already
//! reverse-translated by `from_pod` and passes `to_pod` untouched.)
//!
//! A frontend with no usable endpoints answers instead of dropping (`reject.rs`): a TCP
//! segment becomes a RST|ACK, a UDP datagram an ICMP port unreachable, sent back out of the
//! same interface to the pod (`TC_ACT_REDIRECT`).
//!
//! First fragments are judged by policy like any packet but never translated; protocols
//! other than TCP and UDP are judged (with ports 0 unless SCTP) and never translated.
//!
//! Every outcome is a [`Reason`]; the entry point counts it under its [`Hook`] and turns it
//! into a tc action.
#![no_std]
#![no_main]

mod ct;
mod icmp;
mod lb;
mod maps;
mod metrics;
mod nat;
mod netdev;
mod parse;
mod policy;
mod reject;
mod snat;
mod sock;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use nodeplane_common::{
    maps::SVC_F_DROP_EMPTY,
    reason::{Hook, Reason},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, Hook::FromPod, try_from_pod(&ctx))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, Hook::ToPod, try_to_pod(&ctx))
}

/// Counts the outcome under `hook` and turns it into a tc action.
#[inline(always)]
fn verdict(ctx: &TcContext, hook: Hook, outcome: Result<Reason, Reason>) -> i32 {
    let reason = match outcome {
        Ok(reason) | Err(reason) => reason,
    };
    metrics::count(hook, reason, ctx.len());
    if reason.is_reject() {
        // The answer was written over the packet and `bpf_redirect` was called (reject.rs).
        return TC_ACT_REDIRECT;
    }
    if reason.is_drop() { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// `Ok` carries a pass or translate reason, `Err` a drop reason.
#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<Reason, Reason> {
    let pkt = match parse::parse(ctx)? {
        parse::Parsed::Packet(pkt) => pkt,
        parse::Parsed::Pass(reason) => return Ok(reason),
    };
    if pkt.frag == parse::Frag::Later {
        return policy::fragment(policy::Hook::FromPod, &pkt, ctx.len());
    }
    if pkt.is_translatable()
        && let Some(svc) = lb::lookup_service(&pkt)
    {
        let now = ct::now();
        let fwd = match lb::plan(&pkt, svc, now) {
            // No usable endpoints: answer as kube-proxy's REJECT does (reject.rs), unless
            // only this node has none under a Local traffic policy (kube-proxy drops).
            Err(Reason::DropNoBackends) if svc.flags & SVC_F_DROP_EMPTY == 0 => {
                return reject::answer(ctx, &pkt);
            }
            other => other?,
        };
        // Hairpin (the pod is its own backend): its own traffic, never judged by policy.
        if !fwd.is_hairpin(&pkt) {
            let (addr, port) = (fwd.backend.addr, fwd.backend.port);
            let flow = policy::Flow::translated(&pkt, ctx.len(), addr, port);
            policy::check(policy::Hook::FromPod, &flow, fwd.reason)?;
        }
        return lb::commit(ctx, &pkt, &fwd, now);
    }
    if pkt.frag == parse::Frag::None {
        ct::forget_superseded(&pkt);
    }
    judge_then_reverse(ctx, &pkt, policy::Hook::FromPod)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<Reason, Reason> {
    // SAFETY: `skb` is the context pointer the kernel passed; aya-ebpf 0.2.1 has no accessor
    // for this field. A packet generated on this node (kubelet probes, host-network pods)
    // never went through a device's receive path, so it has no ingress interface.
    let from_host = unsafe { (*ctx.skb.skb).ingress_ifindex } == 0;
    // SAFETY: as above. A packet that came in on this very interface is the pod's own
    // traffic delivered back to it: a hairpin flow, translated by `from_pod` both ways.
    // Index 1 is excluded: it is `lo`, never a pod veth, and the device BPF_PROG_TEST_RUN
    // builds its skb on (`inspect trace` and the tests pass `ingress_ifindex` 1 or others).
    let to_itself = unsafe {
        let skb = &*ctx.skb.skb;
        skb.ifindex > 1 && skb.ingress_ifindex == skb.ifindex
    };
    let pkt = match parse::parse(ctx)? {
        parse::Parsed::Packet(pkt) => pkt,
        parse::Parsed::Pass(reason) => return Ok(reason),
    };
    // ── ICMP errors (icmp.rs): a quote of a DNATed packet goes back to the VIP ──
    if let Some(err) = icmp::error_of(ctx, &pkt) {
        return icmp::judge_then_reverse(ctx, &pkt, &err, from_host);
    }
    // ── end ICMP errors ──
    match (from_host, pkt.frag) {
        (true, parse::Frag::Later) => Ok(Reason::PassFragment),
        (false, parse::Frag::Later) => policy::fragment(policy::Hook::ToPod, &pkt, ctx.len()),
        (true, _) => {
            policy::host(&policy::Flow::of(&pkt, ctx.len()));
            reverse(ctx, &pkt, lookup_reply(&pkt))
        }
        // Hairpin: never judged by policy (the pod's egress side was not judged either).
        (false, _) if to_itself => reverse(ctx, &pkt, lookup_reply(&pkt)),
        (false, _) => judge_then_reverse(ctx, &pkt, policy::Hook::ToPod),
    }
}

/// The reverse NAT a reply of a translated flow needs, if `pkt` is one.
#[inline(always)]
fn lookup_reply(pkt: &parse::Packet) -> Option<ct::RevNat> {
    // First fragments and protocols services do not translate have no reverse NAT.
    if pkt.is_translatable() { ct::lookup_reply(pkt) } else { None }
}

/// A packet not to a frontend: policy judges it as it is on the wire, then a reply of a
/// translated flow gets its source back to the VIP.
#[inline(always)]
fn judge_then_reverse(
    ctx: &TcContext,
    pkt: &parse::Packet,
    hook: policy::Hook,
) -> Result<Reason, Reason> {
    let rev = lookup_reply(pkt);
    let outcome = match (&rev, pkt.frag) {
        (Some(_), _) => Reason::RevNat,
        (None, parse::Frag::None) => Reason::PassNotService,
        (None, _) => Reason::PassFragment,
    };
    // A hairpin reply (the pod answering itself) is not judged, as its request was not.
    if !rev.as_ref().is_some_and(|r| r.hairpin) {
        policy::check(hook, &policy::Flow::of(pkt, ctx.len()), outcome)?;
    }
    // The reply of an external frontend's flow leaving a backend pod keeps its addresses
    // until it leaves the node (`to_netdev`) or reaches a client pod (`to_pod`): rewriting
    // its source to the node's own address here would make the kernel drop it as a
    // martian when it routes it.
    if hook == policy::Hook::FromPod && rev.as_ref().is_some_and(|r| r.external && !r.hairpin) {
        return Ok(Reason::PassNotService);
    }
    reverse(ctx, pkt, rev)
}

/// Rewrites a reply's source back to the VIP (`rev`), or passes the packet untouched.
#[inline(always)]
fn reverse(
    ctx: &TcContext,
    pkt: &parse::Packet,
    rev: Option<ct::RevNat>,
) -> Result<Reason, Reason> {
    if let Some(rev) = rev {
        rev.refresh(pkt);
        nat::rev_snat(ctx, pkt, rev.vip, rev.vport)?;
        if rev.hairpin {
            nat::hairpin_rev_dnat(ctx, pkt)?;
        }
        return Ok(Reason::RevNat);
    }
    Ok(if pkt.frag == parse::Frag::None { Reason::PassNotService } else { Reason::PassFragment })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// "Dual MIT/GPL" keeps the object GPL-compatible for the kernel; none of the helpers used
/// here is GPL-only today, but later ones (e.g. bpf_probe_read for flow events) may be.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
