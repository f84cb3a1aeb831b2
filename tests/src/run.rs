//! Runs the real `from_pod` (or `to_pod`) program on a frame with `BPF_PROG_TEST_RUN`.
use aya::programs::{TestRun, TestRunOptions};
use nodeplane_agent::datapath::Datapath;

/// tc actions the program returns.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Offset of `ingress_ifindex` in `struct __sk_buff` (include/uapi/linux/bpf.h): after
/// `len`, `pkt_type`, `mark`, `queue_mapping`, `protocol`, `vlan_present`, `vlan_tci`,
/// `vlan_proto` and `priority`, nine `__u32`s.
const SKB_INGRESS_IFINDEX_OFF: usize = 36;
/// The `__sk_buff` prefix passed as `ctx_in`: up to and including `ifindex`. The kernel
/// zero-fills the rest, and accepts only `mark`, `priority`, `ingress_ifindex`, `ifindex`
/// (and later fields) as non-zero in this prefix (`convert___skb_to_skb`, net/bpf/test_run.c).
const SKB_CTX_LEN: usize = 44;

pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

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
    run(dp, program, frame, Some(&skb_ctx(ingress_ifindex)))
}

/// The `ctx_in` of a packet forwarded from interface `ingress_ifindex`.
fn skb_ctx(ingress_ifindex: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX_OFF..SKB_INGRESS_IFINDEX_OFF + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
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
    let ctx = ingress_ifindex.map(skb_ctx);
    let r = dp
        .program_named(program)
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ctx_in: ctx.as_ref().map(|c| c.as_slice()),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {program}: {e}"));
    (r.return_value, r.duration.as_nanos() as u64)
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

fn run(dp: &Datapath, program: &str, frame: &[u8], ctx_in: Option<&[u8]>) -> Outcome {
    let mut out = vec![0u8; frame.len() + 256];
    let result = dp
        .program_named(program)
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes {frame:02x?}: {e}", frame.len()));
    out.truncate(result.data_size_out as usize);
    Outcome { action: result.return_value, frame: out }
}
