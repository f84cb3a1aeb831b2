//! `cargo xtask`: everything a developer or CI runs, with the set-up it needs.
//!
//! Every command first runs [`setup`], which is idempotent: it installs only what is missing
//! (Debian packages, rust-src for nightly, a bpf-linker built against nightly's own LLVM).
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "nodeplane developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, rust-src, bpf-linker.
    Setup,
    /// Set up, then build the agent (with its eBPF object), the lab and the bench.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// rustfmt check and clippy on the host crates and on the eBPF crate.
    Lint,
    /// Set up, build, then run every test: unit, BPF_PROG_TEST_RUN and netns integration.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, bring up the lab, show ClusterIP traffic balanced across pods.
    Demo {
        /// Leave the lab and the agent running and print how to poke at them.
        #[arg(long)]
        keep: bool,
        /// Run it on this many nodes (2 to 4: an underlay, an agent per node, the web pods
        /// spread over the first two nodes; lab/examples/multinode.yaml).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
        nodes: u8,
    },
    /// The lab CLI (`up`, `apply`, `exec`, `status`, `down`): see `cargo xtask lab --help`.
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode, and print the datapath and agent benchmarks.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Build { release } => {
            setup::ensure()?;
            build(release)
        }
        Cmd::Lint => {
            setup::ensure()?;
            lint()
        }
        Cmd::Test { args } => {
            setup::ensure()?;
            require_root("the tests load eBPF programs and create network namespaces")?;
            build(false)?;
            step("running all tests");
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--exclude", "nodeplane-ebpf"]);
            cmd.args(&args);
            bin_env(&mut cmd, false);
            run(&mut cmd)
        }
        Cmd::Demo { keep, nodes } => {
            setup::ensure()?;
            require_root("the demo creates network namespaces and loads eBPF programs")?;
            build(false)?;
            demo::run(&bins(false), keep, nodes)
        }
        Cmd::Lab { args } => {
            setup::ensure()?;
            require_root("the lab creates network namespaces")?;
            build(false)?;
            let b = bins(false);
            let mut cmd = Command::new(&b.lab);
            cmd.args(&args);
            bin_env(&mut cmd, false);
            run(&mut cmd)
        }
        Cmd::Bench { args } => {
            setup::ensure()?;
            require_root("the benchmarks load eBPF programs")?;
            build(true)?;
            step("running benchmarks (release build)");
            let mut cmd = Command::new(bins(true).bench);
            cmd.args(&args);
            bin_env(&mut cmd, true);
            run(&mut cmd)
        }
    }
}

/// Paths of the binaries `build` produced.
pub struct Bins {
    pub agent: PathBuf,
    pub lab: PathBuf,
    pub bench: PathBuf,
}

fn bins(release: bool) -> Bins {
    let dir = workspace_root().join("target").join(if release { "release" } else { "debug" });
    Bins {
        agent: dir.join("nodeplane-agent"),
        lab: dir.join("nodeplane-lab"),
        bench: dir.join("nodeplane-bench"),
    }
}

/// Tests and the lab find the binaries through these variables.
fn bin_env(cmd: &mut Command, release: bool) {
    let b = bins(release);
    cmd.env("NODEPLANE_AGENT_BIN", b.agent).env("NODEPLANE_LAB_BIN", b.lab);
}

fn build(release: bool) -> anyhow::Result<()> {
    step("building the agent (and its eBPF object), the lab and the bench");
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--exclude", "nodeplane-ebpf", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn lint() -> anyhow::Result<()> {
    step("rustfmt");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    step("clippy (host crates)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "nodeplane-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy (eBPF crate, bpfel-unknown-none)");
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "nodeplane-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn step(what: &str) {
    println!("\n==> {what}");
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions. Avoids a libc dependency for one call.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    if unsafe { geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
