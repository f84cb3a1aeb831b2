//! Runs the real `from_pod` (or `to_pod`) program on a frame with `BPF_PROG_TEST_RUN`,
//! through the agent's runner (`nodeplane_agent::inspect::testrun`, which `inspect trace`
//! uses on the pinned programs), panicking with context on a failed run.
use nodeplane_agent::{datapath::Datapath, inspect::testrun};

pub use testrun::{Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// One run of the program on `frame` (repeat = 1: with repeat > 1 the kernel would run it
/// again on the frame it already rewrote).
pub fn run_once(dp: &Datapath, frame: &[u8]) -> Outcome {
    run_once_on(dp, nodeplane_common::maps::names::PROG_FROM_POD, frame)
}

/// [`run_once`] on the program called `program`. Without a context the test skb has
/// `ingress_ifindex` 0, which `to_pod` reads as "generated on this node".
pub fn run_once_on(dp: &Datapath, program: &str, frame: &[u8]) -> Outcome {
    run(dp, program, frame, None)
}

/// [`run_once_on`] with `__sk_buff.ingress_ifindex` set, as on a packet forwarded from the
/// interface with that index (0: generated on this node).
pub fn run_once_from(dp: &Datapath, program: &str, frame: &[u8], ingress_ifindex: u32) -> Outcome {
    run(dp, program, frame, Some(ingress_ifindex))
}

/// One timed run for the benchmarks: the tc action and the program's run time in ns as the
/// kernel measured it. `ingress_ifindex` as in [`run_once_from`]; `None` passes no context.
/// `out` receives the frame (no allocation per sample).
pub fn timed(
    dp: &Datapath,
    program: &str,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
    out: &mut [u8],
) -> (u32, u64) {
    let (action, ns, _) = testrun::run_into(dp.program_named(program), frame, ingress_ifindex, out)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {program}: {e}"));
    (action, ns)
}

/// Samples of one benchmark cell, in nanoseconds.
#[derive(Default)]
pub struct Series(pub Vec<u64>);

impl Series {
    pub fn median(&self) -> u64 {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<u64>() as f64 / self.0.len().max(1) as f64
    }
}

fn run(dp: &Datapath, program: &str, frame: &[u8], ingress_ifindex: Option<u32>) -> Outcome {
    testrun::run_once(dp.program_named(program), frame, ingress_ifindex).unwrap_or_else(|e| {
        panic!("BPF_PROG_TEST_RUN on {program}, {} bytes {frame:02x?}: {e}", frame.len())
    })
}
