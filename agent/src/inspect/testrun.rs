//! One `BPF_PROG_TEST_RUN` of a tc program on a frame, with the `__sk_buff` context the
//! datapath reads (`ingress_ifindex`). Used by `inspect trace` on the pinned programs and
//! by the privileged tests and benchmarks on freshly loaded ones.
use aya::programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions};

/// tc actions the programs return.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// `bpf_redirect` was called: `from_pod` sends a rejected packet's answer back to the pod.
pub const TC_ACT_REDIRECT: u32 = 7;

/// Offset of `ingress_ifindex` in `struct __sk_buff` (include/uapi/linux/bpf.h): after
/// `len`, `pkt_type`, `mark`, `queue_mapping`, `protocol`, `vlan_present`, `vlan_tci`,
/// `vlan_proto` and `priority`, nine `__u32`s.
const SKB_INGRESS_IFINDEX_OFF: usize = 36;
/// The `__sk_buff` prefix passed as `ctx_in`: up to and including `ifindex`. The kernel
/// zero-fills the rest, and accepts only `mark`, `priority`, `ingress_ifindex`, `ifindex`
/// (and later fields) as non-zero in this prefix (`convert___skb_to_skb`, net/bpf/test_run.c).
pub const SKB_CTX_LEN: usize = 44;

/// What one run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The tc action ([`TC_ACT_OK`], [`TC_ACT_SHOT`], [`TC_ACT_REDIRECT`]).
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

/// The `ctx_in` of a packet forwarded from interface `ingress_ifindex` (0: generated on
/// this node, which `to_pod` treats as the node's own traffic).
pub fn skb_ctx(ingress_ifindex: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX_OFF..SKB_INGRESS_IFINDEX_OFF + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

/// Runs `program` once on `frame` (repeat 1: a second run would see the frame the first
/// rewrote). `ingress_ifindex`: `None` passes no context (the kernel's default skb, whose
/// `ingress_ifindex` is 0).
pub fn run_once(
    program: &SchedClassifier,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<Outcome, ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    let (action, _, len) = run_into(program, frame, ingress_ifindex, &mut out)?;
    out.truncate(len);
    Ok(Outcome { action, frame: out })
}

/// One run writing the frame into `out` (no allocation, for benchmarks): the tc action,
/// the run time the kernel measured in ns, and the length of the frame in `out`.
pub fn run_into(
    program: &SchedClassifier,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
    out: &mut [u8],
) -> Result<(u32, u64, usize), ProgramError> {
    let ctx = ingress_ifindex.map(skb_ctx);
    let r = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: ctx.as_ref().map(|c| c.as_slice()),
        ..TestRunOptions::default()
    })?;
    Ok((r.return_value, r.duration.as_nanos() as u64, r.data_size_out as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_carries_only_the_ingress_ifindex() {
        let ctx = skb_ctx(0x0102_0304);
        assert_eq!(&ctx[36..40], &0x0102_0304u32.to_ne_bytes());
        assert!(ctx[..36].iter().chain(&ctx[40..]).all(|b| *b == 0));
    }
}
