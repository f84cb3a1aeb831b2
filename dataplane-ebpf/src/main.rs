//! The kernel side of nodeplane.
//!
//! Two tc programs sit on the host side of every pod veth. `from_pod` (ingress) sees every
//! packet a pod sends; `to_pod` (egress) every packet delivered to a pod. `from_pod`, per
//! packet:
//!
//! ```text
//! parse ─► service lookup ─┬─ hit ─► conntrack (ORIGINAL) ─┬─ live ─► DNAT (established)
//!                          │                               └─ miss ─► lb: pick backend ─► ct insert ─► DNAT (new)
//!                          └─ miss ─► conntrack (REPLY) ─┬─ hit ─► reverse NAT (src := VIP)
//!                                                        └─ miss ─► pass untouched
//! ```
//! `to_pod` only reverse-translates: a reply whose conntrack entry this node created gets its
//! source set back to the VIP, wherever the backend is. That is what makes backends on other
//! nodes and on the host network work: their replies never cross the ingress of a local pod
//! veth, but they always cross the client's veth on the way in. (A reply from a local
//! backend pod is already reverse-translated by `from_pod` and passes `to_pod` untouched.)
//!
//! Every outcome is a [`Reason`]; the entry point counts it and turns it into a tc action.
#![no_std]
#![no_main]

mod ct;
mod lb;
mod maps;
mod metrics;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use nodeplane_common::reason::Reason;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, try_from_pod(&ctx))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, try_to_pod(&ctx))
}

/// Counts the outcome and turns it into a tc action.
#[inline(always)]
fn verdict(ctx: &TcContext, outcome: Result<Reason, Reason>) -> i32 {
    let reason = match outcome {
        Ok(reason) | Err(reason) => reason,
    };
    metrics::count(reason, ctx.len());
    if reason.is_drop() { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// `Ok` carries a pass or translate reason, `Err` a drop reason.
#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<Reason, Reason> {
    let pkt = match parse::parse(ctx)? {
        parse::Parsed::Packet(pkt) => pkt,
        parse::Parsed::Pass(reason) => return Ok(reason),
    };
    if let Some(svc) = lb::lookup_service(&pkt) {
        return lb::forward(ctx, &pkt, svc);
    }
    reverse(ctx, &pkt)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<Reason, Reason> {
    match parse::parse(ctx)? {
        parse::Parsed::Packet(pkt) => reverse(ctx, &pkt),
        parse::Parsed::Pass(reason) => Ok(reason),
    }
}

/// A reply of a translated flow gets its source back to the VIP; anything else passes.
#[inline(always)]
fn reverse(ctx: &TcContext, pkt: &parse::Packet) -> Result<Reason, Reason> {
    if let Some(rev) = ct::lookup_reply(pkt) {
        nat::rev_snat(ctx, pkt, rev.vip, rev.vport)?;
        return Ok(Reason::RevNat);
    }
    Ok(Reason::PassNotService)
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
