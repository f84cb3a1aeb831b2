//! Per-CPU counters: no atomics needed, the agent sums over CPUs.
use nodeplane_common::reason::{Hook, Reason, counter_index};

use crate::maps::COUNTERS;

/// Counts one packet of `bytes` bytes under (`hook`, `reason`). `hook` is a constant in
/// each entry point, so the slot is one add; the array lookup checks the bound.
#[inline(always)]
pub fn count(hook: Hook, reason: Reason, bytes: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(hook, reason)) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
