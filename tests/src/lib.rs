//! Shared helpers for the privileged tests and the benchmarks: a packet builder and parser
//! for crafted frames, and a way to run the real `from_pod` program on them.
pub mod bench_agent;
pub mod bench_api;
pub mod packet;
pub mod run;
