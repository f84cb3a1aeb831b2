//! Runs the real `from_pod` (or `to_pod`) program on a frame with `BPF_PROG_TEST_RUN`.
use aya::programs::{TestRun, TestRunOptions};
use nodeplane_agent::datapath::Datapath;

/// tc actions the program returns.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

/// One run of the program on `frame` (repeat = 1: with repeat > 1 the kernel would run it
/// again on the frame it already rewrote).
pub fn run_once(dp: &Datapath, frame: &[u8]) -> Outcome {
    run_once_on(dp, nodeplane_common::maps::names::PROG_FROM_POD, frame)
}

/// [`run_once`] on the program called `program`.
pub fn run_once_on(dp: &Datapath, program: &str, frame: &[u8]) -> Outcome {
    let mut out = vec![0u8; frame.len() + 256];
    let result = dp
        .program_named(program)
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes {frame:02x?}: {e}", frame.len()));
    out.truncate(result.data_size_out as usize);
    Outcome { action: result.return_value, frame: out }
}
