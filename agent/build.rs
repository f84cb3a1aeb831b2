//! Builds the eBPF object with the nightly toolchain (aya-build), so `include_bytes_aligned!`
//! in `datapath.rs` embeds a program that always matches this agent's map types.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "nodeplane-ebpf")
        .ok_or_else(|| anyhow!("nodeplane-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?
        .as_str();
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
