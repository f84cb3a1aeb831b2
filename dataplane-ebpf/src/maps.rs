//! Every map of the datapath, one place. Key and value types are in `nodeplane_common::maps`
//! and `nodeplane_common::policy`.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use nodeplane_common::{
    maps::{
        AffinityKeyV4, AffinityValueV4, BackendV4, Counter, CtKeyV4, CtValueV4, MAX_AFFINITY,
        MAX_BACKENDS, MAX_CT_ENTRIES, MAX_SERVICES, MAX_SLOTS, ServiceKeyV4, ServiceValue, SlotKey,
    },
    nat::{
        MAX_NAT_ENTRIES, MAX_NO_MASQ, MAX_SOURCE_RANGES, NatConfig, NatKeyV4, NatValueV4, NoMasqV4,
        SourceRangeV4,
    },
    policy::{
        EndpointV4, FLOW_RING_BYTES, FragKeyV4, FragValueV4, IpcacheKeyV4, MAX_ENDPOINTS,
        MAX_FRAGS, MAX_IPCACHE, MAX_POLICY_COUNTERS, MAX_POLICY_CT, MAX_POLICY_ENTRIES,
        PolicyConfig, PolicyCounterKey, PolicyCtKey, PolicyCtValue, PolicyKey, PolicyValue,
    },
    reason::COUNTER_SLOTS,
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

/// Session affinity (`SVC_F_AFFINITY` frontends): `(service id, client IP)` -> the backend
/// and slot of the client's last new flow, and when. Consulted and refreshed by new flows
/// only; an LRU, so a full table forgets the least recently seen client. Written by the
/// datapath.
#[map]
pub static AFFINITY_V4: LruHashMap<AffinityKeyV4, AffinityValueV4> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);

/// Per-CPU packet and byte counters, one slot per (`Hook`, `Reason`) at `counter_index`
/// (room for 4 hooks of 32 reasons). Read by the agent.
#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Peer address prefix -> identity (a plain native `u32`), longest prefix wins. Written by
/// the agent. (LPM tries must be created with `BPF_F_NO_PREALLOC`; aya adds it anyway.)
#[map]
pub static IPCACHE_V4: LpmTrie<IpcacheKeyV4, u32> =
    LpmTrie::with_max_entries(MAX_IPCACHE, BPF_F_NO_PREALLOC);

/// Local pod IP -> its policy sets (ingress, egress) and identity. Written by the agent.
/// No entry: the pod has no policy yet, in either direction.
#[map]
pub static ENDPOINTS_V4: HashMap<[u8; 4], EndpointV4> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// `(set, peer identity, proto, port)` prefixes shorter than the full key -> the rule
/// allowing them: port ranges, protocol and rule wildcards (see `PolicyKey`). Every entry
/// allows. Written by the agent.
#[map]
pub static POLICY_V4: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, BPF_F_NO_PREALLOC);

/// The full-length entries of the same policy (one port): a hash lookup, whatever the
/// number of entries, so the common rule costs the same at 1 or 1,000 policies.
#[map]
pub static POLICY_EXACT_V4: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(MAX_POLICY_ENTRIES, BPF_F_NO_PREALLOC);

/// One element: the policy revision and flags. Written by the agent after every change.
#[map]
pub static POLICY_CONFIG: Array<PolicyConfig> = Array::with_max_entries(1, 0);

/// Policy conntrack: a flow's original-direction tuple (after DNAT) -> which checks passed,
/// at which revision, and until when. Written by the datapath.
#[map]
pub static POLICY_CT_V4: LruHashMap<PolicyCtKey, PolicyCtValue> =
    LruHashMap::with_max_entries(MAX_POLICY_CT, 0);

/// Allowed first fragments `(saddr, daddr, id, proto, dir)` -> their ports, so the later
/// fragments of the datagram (which carry no ports) may pass. Written by the datapath.
#[map]
pub static FRAGS_V4: LruHashMap<FragKeyV4, FragValueV4> =
    LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// Per-CPU counters of new-flow policy verdicts: allows by rule, denies by set. Written by
/// the datapath, read (summed) by the agent.
#[map]
pub static POLICY_COUNTERS: PerCpuHashMap<PolicyCounterKey, Counter> =
    PerCpuHashMap::with_max_entries(MAX_POLICY_COUNTERS, 0);

/// `FlowEvent` records: every policy deny, and allowed new flows when the config says so.
/// Read by the agent's flow-log reader.
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_RING_BYTES, 0);

/// Per-CPU `[events written, events lost because the ring was full]`.
#[map]
pub static FLOW_EVENT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// SNAT table (`nodeplane_common::nat`): an OUT and an IN entry per SNATed flow. An LRU, so
/// a full table forgets the least recently used flow. Written by the datapath.
#[map]
pub static NAT_V4: LruHashMap<NatKeyV4, NatValueV4> =
    LruHashMap::with_max_entries(MAX_NAT_ENTRIES, 0);

/// One element: node IP, port range, masquerade flags. Written by the agent.
#[map]
pub static NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);

/// Destinations pods reach with their own address (no masquerade). Written by the agent.
#[map]
pub static NO_MASQ_V4: LpmTrie<NoMasqV4, u8> =
    LpmTrie::with_max_entries(MAX_NO_MASQ, BPF_F_NO_PREALLOC);

/// `(frontend id, client prefix)` -> 1: the `loadBalancerSourceRanges` of frontends with
/// `SVC_F_SOURCE_RANGES`. Written by the agent.
#[map]
pub static SOURCE_RANGES_V4: LpmTrie<SourceRangeV4, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_RANGES, BPF_F_NO_PREALLOC);

// ── socket LB (sock.rs): the cgroup sock_addr programs of host-network clients ──

/// One element: `SockConfig`, the network namespace whose sockets the socket LB
/// translates (0: none). Written by the agent.
#[map]
pub static SOCK_CONFIG: Array<nodeplane_common::sock::SockConfig> = Array::with_max_entries(1, 0);

/// `(socket cookie, backend ip, backend port)` -> the VIP and port the socket asked for,
/// so `recvmsg` and `getpeername` report the VIP. An LRU: closed sockets' entries age out.
/// Written by the datapath.
#[map]
pub static SOCK_REVNAT_V4: LruHashMap<
    nodeplane_common::sock::SockRevNatKeyV4,
    nodeplane_common::sock::SockRevNatValueV4,
> = LruHashMap::with_max_entries(nodeplane_common::sock::MAX_SOCK_REVNAT, 0);
