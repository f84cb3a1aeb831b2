//! Shared helpers for the privileged tests and the benchmarks: a packet builder and parser
//! for crafted frames, a way to run the real `from_pod` and `to_pod` programs on them, and
//! the binaries `cargo xtask test` built.
use std::path::PathBuf;

pub mod bench_agent;
pub mod bench_api;
pub mod bench_nodeport;
pub mod bench_policy;
pub mod cluster;
pub mod http;
pub mod multinode;
pub mod netpol;
pub mod ns_run;
pub mod packet;
pub mod policy_gen;
pub mod run;

/// A binary `cargo xtask test` built and named in `var` (`NODEPLANE_AGENT_BIN`,
/// `NODEPLANE_LAB_BIN`).
pub fn bin(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run the tests with `cargo xtask test`"))
}
