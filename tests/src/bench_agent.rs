//! Placeholder replaced below.
pub fn run() {}
