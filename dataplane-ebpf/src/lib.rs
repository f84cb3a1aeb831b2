//! Empty library target: it lets the agent's build script depend on this crate, so cargo
//! rebuilds the agent when the eBPF sources change. The programs are in `main.rs`.
#![no_std]
