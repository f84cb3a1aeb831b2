//! Diff desired frontends against what was written and emit ordered map operations.
//!
//! (The ordering rules, the id allocator and the fake writer are filled in below.)
use nodeplane_common::maps::{BackendV4, ServiceKeyV4, ServiceValue, SlotKey};

/// One write to the datapath maps. A plan is a `Vec<Op>` whose every prefix leaves the
/// maps consistent: every `backend_count` of a service has its slots, every slot names an
/// existing backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend { id: u32, backend: BackendV4 },
    PutSlot { key: SlotKey, backend_id: u32 },
    PutService { key: ServiceKeyV4, value: ServiceValue },
    DelService { key: ServiceKeyV4 },
    DelSlot { key: SlotKey },
    DelBackend { id: u32 },
}

/// Where ops go: the kernel maps (`datapath::Maps`) or an in-memory fake.
pub trait MapWriter {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError>;
}

#[derive(Debug, thiserror::Error)]
#[error("{op:?} failed: {reason}")]
pub struct WriteError {
    pub op: Op,
    pub reason: String,
}
