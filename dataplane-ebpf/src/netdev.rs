//! The node's external interfaces: traffic entering and leaving the cluster.
//!
//! `from_netdev` (tc ingress), per packet:
//!
//! ```text
//! parse ─► reply to an SNATed flow? ─ yes ─► destination := client (rev-snat)
//!                 │ no
//!                 ▼
//!          frontend? ─ no ─► pass
//!                 │ yes (NodePort on a node IP, LoadBalancer IP, ExternalIP, ClusterIP)
//!                 ▼
//!          source in loadBalancerSourceRanges? ─ no ─► drop (source-range)
//!                 │
//!                 ▼
//!          conntrack / pick backend ─► DNAT ─► mark MARK_SNAT (unless Local)
//! ```
//!
//! The kernel then routes the packet: to a local backend pod (its source, the client,
//! preserved), or back out of an external interface to a backend on another node.
//!
//! `to_netdev` (tc egress), per packet:
//!
//! ```text
//! parse ─► reply of a flow DNATed here? ─ yes ─► source := frontend (rev-nat)
//!                 │ no
//!                 ▼
//!          SNATed flow, MARK_SNAT, or a pod leaving the cluster? ─ yes ─► source := node_ip:port
//!                 │ no
//!                 ▼
//!               pass
//! ```
//!
//! Both translations towards the outside happen at egress, after routing: a packet whose
//! source is the node's own address must never be routed as if it arrived from elsewhere
//! (the kernel drops such "martians").
use aya_ebpf::{macros::classifier, maps::lpm_trie::Key, programs::TcContext};
use nodeplane_common::{
    maps::{SVC_F_DROP_EMPTY, SVC_F_ETP_LOCAL, SVC_F_SOURCE_RANGES},
    nat::{MARK_SNAT, SourceRangeV4},
    reason::{Hook, Reason},
};

use crate::{ct, lb, maps::SOURCE_RANGES_V4, nat, parse, reject, snat, verdict};

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    verdict(&ctx, Hook::FromNetdev, try_from_netdev(&ctx))
}

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    verdict(&ctx, Hook::ToNetdev, try_to_netdev(&ctx))
}

/// Passed untouched: the reason for `pkt`.
#[inline(always)]
fn untouched(pkt: &parse::Packet) -> Reason {
    if pkt.frag == parse::Frag::None { Reason::PassNotService } else { Reason::PassFragment }
}

/// May `client` reach frontend `service_id`? (Its `loadBalancerSourceRanges`.)
#[inline(always)]
pub fn source_allowed(service_id: u32, client: [u8; 4]) -> bool {
    let key = Key::new(SourceRangeV4::prefix_len(32), SourceRangeV4::new(service_id, client));
    SOURCE_RANGES_V4.get(key).is_some()
}

#[inline(always)]
fn try_from_netdev(ctx: &TcContext) -> Result<Reason, Reason> {
    let pkt = match parse::parse(ctx)? {
        parse::Parsed::Packet(pkt) => pkt,
        parse::Parsed::Pass(reason) => return Ok(reason),
    };
    if !pkt.is_translatable() {
        return Ok(untouched(&pkt));
    }
    let now = ct::now();
    if let Some(outcome) = snat::reverse(ctx, &pkt, now) {
        return outcome;
    }
    let Some(svc) = lb::lookup_service(&pkt) else {
        ct::forget_superseded(&pkt);
        return Ok(Reason::PassNotService);
    };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(svc.service_id, pkt.saddr) {
        return Err(Reason::DropSourceRange);
    }
    let fwd = match lb::plan(&pkt, svc, now) {
        // No endpoint anywhere: answer, as for pods. Local with none on this node: drop.
        Err(Reason::DropNoBackends) if svc.flags & SVC_F_DROP_EMPTY == 0 => {
            return reject::answer(ctx, &pkt);
        }
        other => other?,
    };
    let reason = lb::commit(ctx, &pkt, &fwd, now)?;
    if svc.flags & SVC_F_ETP_LOCAL == 0 {
        // If the backend is on another node, the packet leaves again through an external
        // interface, where `to_netdev` SNATs it so that the reply comes back here.
        // SAFETY: the context's skb; `mark` is a plain field tc programs may write.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(mark | MARK_SNAT);
    }
    Ok(reason)
}

#[inline(always)]
fn try_to_netdev(ctx: &TcContext) -> Result<Reason, Reason> {
    let pkt = match parse::parse(ctx)? {
        parse::Parsed::Packet(pkt) => pkt,
        parse::Parsed::Pass(reason) => return Ok(reason),
    };
    if !pkt.is_translatable() {
        return Ok(untouched(&pkt));
    }
    // The reply of a flow DNATed on this node, leaving for a client outside.
    if let Some(rev) = ct::lookup_reply(&pkt)
        && !rev.hairpin
    {
        rev.refresh(&pkt);
        nat::rev_snat(ctx, &pkt, rev.vip, rev.vport)?;
        return Ok(Reason::RevNat);
    }
    // SAFETY: the context's skb; a plain field.
    let mark = unsafe { (*ctx.skb.skb).mark };
    Ok(snat::egress(ctx, &pkt, mark & MARK_SNAT != 0, ct::now())?.unwrap_or(Reason::PassNotService))
}
