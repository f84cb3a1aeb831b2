//! Every map of the datapath, one place. Key and value types are in `nodeplane_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use nodeplane_common::{
    maps::{
        BackendV4, Counter, CtKeyV4, CtValueV4, MAX_BACKENDS, MAX_CT_ENTRIES, MAX_SERVICES,
        MAX_SLOTS, ServiceKeyV4, ServiceValue, SlotKey,
    },
    reason::Reason,
};

/// ClusterIP frontends `(vip, port, proto)` -> service id and backend count; plus one
/// VIP marker per ClusterIP. Written by the agent only.
#[map]
pub static SERVICES_V4: HashMap<ServiceKeyV4, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// `(service id, slot)` -> backend id, for slots `0..backend_count`. Written by the agent.
#[map]
pub static BACKEND_SLOTS: HashMap<SlotKey, u32> = HashMap::with_max_entries(MAX_SLOTS, 0);

/// Backend id -> endpoint `(ip, port, proto)`. Written by the agent.
#[map]
pub static BACKENDS_V4: HashMap<u32, BackendV4> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// The datapath's own conntrack: two entries per flow (ORIGINAL, REPLY). An LRU so a full
/// table evicts the oldest flow instead of refusing new ones. Written by the datapath.
#[map]
pub static CT_V4: LruHashMap<CtKeyV4, CtValueV4> = LruHashMap::with_max_entries(MAX_CT_ENTRIES, 0);

/// Per-CPU packet and byte counters, one slot per `Reason`. Read by the agent.
#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
