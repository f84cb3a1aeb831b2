//! `BPF_PROG_TEST_RUN` of the node's external-interface programs (`xdp_netdev`,
//! `from_netdev`, `to_netdev`) inside a scratch network namespace.
//!
//! The helpers these programs call look at the namespace of the thread running the test:
//! `bpf_fib_lookup` (XDP: the ingress device's routes and neighbours) and
//! `bpf_sk*_lookup_*` (the SNAT allocator skips ports a socket of the node would receive).
//! A namespace of the test's own makes both deterministic: no route, neighbour or
//! wildcard listener of the host leaks in. [`Scratch`] creates one and deletes it on drop.
use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use nodeplane_agent::{datapath::Datapath, inspect::testrun::SKB_CTX_LEN};
use nodeplane_common::reason::{Hook, Reason};
use nodeplane_lab::netns;

/// Offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`).
const SKB_MARK_OFF: usize = 8;
/// Room for the `struct __sk_buff` a tc run writes back.
const SKB_CTX_OUT_LEN: usize = 256;
/// `struct xdp_md`: `data`, `data_end`, `data_meta`, `ingress_ifindex`, `rx_queue_index`,
/// `egress_ifindex`, six `__u32`s.
const XDP_MD_LEN: usize = 24;

/// A network namespace of one test, deleted (with everything in it) on drop.
pub struct Scratch {
    pub name: String,
}

impl Scratch {
    /// Creates `nptest-{tag}-{pid}-{n}` with `lo` up.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("nptest-{tag}-{}-{n}", std::process::id());
        netns::add(&name).unwrap_or_else(|e| panic!("creating netns {name}: {e}"));
        Self { name }
    }

    /// Runs `ip -n NAME ARGS...` (split on whitespace), panicking with its stderr on failure.
    pub fn ip(&self, args: &str) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace())
            .output()
            .unwrap_or_else(|e| panic!("running ip {args}: {e}"));
        assert!(
            out.status.success(),
            "ip -n {} {args}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn sysctls(&self, settings: &[(&str, &str)]) {
        netns::sysctls(&self.name, settings)
            .unwrap_or_else(|e| panic!("sysctls in {}: {e}", self.name));
    }

    /// Runs `f` on a thread inside the namespace. Sockets created there stay there.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        netns::run_in(&self.name, f).unwrap_or_else(|e| panic!("entering {}: {e}", self.name))
    }

    /// The index of device `dev` in the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let c = std::ffi::CString::new(dev).expect("device name");
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let i = self.run(|| unsafe { libc::if_nametoindex(c.as_ptr()) });
        assert_ne!(i, 0, "no device {dev} in {}", self.name);
        i
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = netns::delete(&self.name) {
            eprintln!("deleting netns {}: {e}", self.name);
        }
    }
}

/// What one run returned: the program's action, the frame as it left it and (tc) the
/// skb's mark after the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub action: u32,
    pub frame: Vec<u8>,
    pub mark: u32,
}

/// One run of a tc program on `frame`, in the calling thread's namespace, with
/// `__sk_buff.mark` = `mark` (0: none).
pub fn tc_once(program: &SchedClassifier, frame: &[u8], mark: u32) -> Run {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
    // The kernel writes the whole `__sk_buff` back (ENOSPC if it does not fit; 192 bytes
    // on 6.x kernels).
    let mut ctx_out = [0u8; SKB_CTX_OUT_LEN];
    let mut out = vec![0u8; frame.len() + 256];
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (tc, mark {mark:#x}): {e}"));
    out.truncate(r.data_size_out as usize);
    let mark = ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4].try_into().expect("4 bytes");
    Run { action: r.return_value, frame: out, mark: u32::from_ne_bytes(mark) }
}

/// One run of an XDP program on `frame` as if it arrived on device `ingress_ifindex` (a
/// device of the calling thread's namespace), receive queue 0.
pub fn xdp_once(program: &Xdp, frame: &[u8], ingress_ifindex: u32) -> Run {
    let mut ctx = [0u8; XDP_MD_LEN];
    // data = 0 (no metadata), data_end = the frame's length, data_meta = 0.
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (xdp, ifindex {ingress_ifindex}): {e}"));
    out.truncate(r.data_size_out as usize);
    Run { action: r.return_value, frame: out, mark: 0 }
}

/// Counters that moved: (hook, reason) and by how many packets.
pub type Moved = Vec<((Hook, Reason), u64)>;

/// The (hook, reason) counters `f` moved, with how many packets each.
pub fn counted<R>(dp: &Datapath, f: impl FnOnce() -> R) -> (R, Moved) {
    let before = dp.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    let r = f();
    let after = dp.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    let moved = after
        .iter()
        .zip(&before)
        .filter(|((_, _, now), (_, _, was))| now.packets != was.packets)
        .map(|((h, r, now), (_, _, was))| ((*h, *r), now.packets - was.packets))
        .collect();
    (r, moved)
}
