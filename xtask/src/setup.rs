//! Idempotent set-up. Each step checks before it acts, so a second run is a few fast checks;
//! the slow one (building bpf-linker, ~75 s on 2 cores) happens once per machine.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{run, step};

/// The bpf-linker release that reads nightly 1.97's LLVM 22 bitcode (shared/docs/toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages and a command each provides, checked before installing.
const DEBIAN_PACKAGES: &[(&str, &str)] =
    &[("iproute2", "ip"), ("ethtool", "ethtool"), ("iptables", "iptables-restore")];

pub fn ensure() -> anyhow::Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        DEBIAN_PACKAGES.iter().filter(|(_, cmd)| !have(cmd)).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing; this machine should have it preinstalled: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain (needed by -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    // Run it the way aya-build does, under `rustup run nightly`, which puts the toolchain's
    // lib dir (and so its libLLVM) on the library path.
    let ok = Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if ok {
        return Ok(());
    }
    // bpf-linker must link the very LLVM that nightly rustc emits bitcode for: point it at
    // the toolchain's own libLLVM (Debian's LLVM 19 cannot read LLVM 22 bitcode).
    let sysroot = String::from_utf8(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]).output()?.stdout,
    )?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let llvm_dir = PathBuf::from(home).join(".cache/nodeplane/llvm");
    let link = llvm_dir.join("lib/libLLVM.so");
    std::fs::create_dir_all(llvm_dir.join("lib"))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    // The linker's rpath points here, so its soname resolves here too, even outside rustup.
    let soname = llvm_dir.join("lib").join(libllvm.file_name().context("libLLVM file name")?);
    let _ = std::fs::remove_file(&soname);
    std::os::unix::fs::symlink(&libllvm, &soname)
        .with_context(|| format!("linking {} -> {}", soname.display(), libllvm.display()))?;
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {} (once per machine, ~75 s)",
        libllvm.display()
    ));
    run(Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &llvm_dir))
}
