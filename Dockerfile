# The nodeplane agent image: one binary, with the eBPF object embedded in it.
#
#   docker build -t ghcr.io/nodeplane/nodeplane-agent:0.1.0 .
#
# Installing, and loading the image into kind: docs/INSTALL.md. The eBPF toolchain steps
# below are those of xtask/src/setup.rs (shared/docs/toolchain.md): change them together.

FROM rust:1.95-bookworm AS builder

# The agent's build.rs builds the eBPF crate through aya-build, which runs
# `rustup run nightly cargo build -Z build-std=core`: that needs a toolchain called `nightly`
# with rust-src. It is pinned to the nightly the project is developed with (rustc
# 1.97.0-nightly, LLVM 22), which aya-ebpf 0.2.1 and bpf-linker's llvm-22 feature fit; a
# later nightly may bring another LLVM. rustup refuses `nightly` as a custom toolchain name,
# so the dated toolchain is installed and linked under the plain name.
ARG NIGHTLY=nightly-2026-05-20
ARG BPF_LINKER_VERSION=0.13.0
ARG BPF_LINKER_LLVM=llvm-22

RUN set -eux; \
    host="$(rustc -vV | sed -n 's/^host: //p')"; \
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src; \
    ln -s "$NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host"; \
    rustc +nightly -vV

# bpf-linker must link the very LLVM that the nightly rustc emits bitcode for, so it is
# built against the toolchain's own libLLVM (Debian's LLVM cannot read LLVM 22 bitcode).
# Its rpath points at $llvm/lib, hence the link named after the library's soname too.
RUN set -eux; \
    llvm=/opt/nodeplane/llvm; \
    libllvm="$(find "$(rustc +nightly --print sysroot)/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n 1)"; \
    test -n "$libllvm"; \
    mkdir -p "$llvm/lib"; \
    ln -s "$libllvm" "$llvm/lib/libLLVM.so"; \
    ln -s "$libllvm" "$llvm/lib/$(basename "$libllvm")"; \
    LLVM_PREFIX="$llvm" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "$BPF_LINKER_LLVM"; \
    rustup run nightly bpf-linker --version

WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nodeplane-agent \
 && install -D target/release/nodeplane-agent /out/nodeplane-agent

FROM debian:bookworm-slim
# CA roots only for a --kubeconfig that names no CA; in a cluster the agent trusts the
# service account's CA. Same Debian release as the builder, so the same glibc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/nodeplane-agent /usr/local/bin/nodeplane-agent
ENTRYPOINT ["nodeplane-agent"]
