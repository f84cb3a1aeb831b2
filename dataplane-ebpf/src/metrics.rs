//! Per-CPU counters: no atomics needed, the agent sums over CPUs.
use nodeplane_common::reason::Reason;

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
