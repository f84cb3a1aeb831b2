//! The kernel side of nodeplane.
//!
//! One tc program, `from_pod`, sits on the ingress hook of the host side of every pod veth:
//! it sees every packet a pod sends. Per packet:
//!
//! ```text
//! parse ─► service lookup ─┬─ hit ─► conntrack (ORIGINAL) ─┬─ live ─► DNAT (established)
//!                          │                               └─ miss ─► lb: pick backend ─► ct insert ─► DNAT (new)
//!                          └─ miss ─► conntrack (REPLY) ─┬─ hit ─► reverse NAT (src := VIP)
//!                                                        └─ miss ─► pass untouched
//! ```
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
    let reason = match try_from_pod(&ctx) {
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
    if let Some(rev) = ct::lookup_reply(&pkt) {
        nat::rev_snat(ctx, &pkt, rev.vip, rev.vport)?;
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
