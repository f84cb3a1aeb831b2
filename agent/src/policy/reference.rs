//! The reference semantics of NetworkPolicy, in plain Rust.
