//! Types shared by the agent and the eBPF datapath.
//!
//! Everything in [`maps`] is part of the kernel ABI: `#[repr(C)]`, explicit padding,
//! integers only, byte order visible in the field type. The pure logic that the datapath
//! runs per packet but that the host can test ([`ct`], [`csum`], the answers of [`reject`], the
//! ICMP error rewrite of [`icmp`])
//! lives here too.
//!
//! Build with the `user` feature on the host to get `aya::Pod` impls.
#![no_std]

pub mod csum;
pub mod ct;
pub mod icmp;
pub mod maps;
pub mod nat;
pub mod policy;
pub mod reason;
pub mod reject;
pub mod sock;
