//! Map keys and values. Every type is layout-explicit: `#[repr(C)]`, zeroed `_pad`
//! fields (the kernel hashes every byte of a key), a compile-time size assertion, and
//! network byte order spelled as `[u8; N]` so no one converts twice.
//!
//! IPv4 maps carry a `_V4` suffix; IPv6 gets its own maps of the same shape rather than
//! widening these (as Cilium does), so v4 lookups never pay for 16-byte keys.

/// Capacity of [`SERVICES_V4`](MapName::ServicesV4): frontends plus one VIP marker per ClusterIP.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the backend slot map, summed over all services.
pub const MAX_SLOTS: u32 = 262_144;
/// Capacity of the backend map: distinct (IP, port, protocol) endpoints.
pub const MAX_BACKENDS: u32 = 262_144;
/// Most backends one frontend may have; more and the Service is skipped.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 16_384;
/// Capacity of the conntrack LRU (two entries per flow: original and reply).
pub const MAX_CT_ENTRIES: u32 = 524_288;
/// Capacity of the session affinity LRU: (frontend, client IP) pairs remembered.
pub const MAX_AFFINITY: u32 = 65_536;
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (kube-proxy's default, 3 h).
pub const AFFINITY_TIMEOUT_DEFAULT_S: u32 = 10_800;
/// The largest timeout the API server accepts (1 day).
pub const AFFINITY_TIMEOUT_MAX_S: u32 = 86_400;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of `SERVICES_V4`: a ClusterIP frontend `(vip, port, proto)`.
///
/// A key with `port == 0 && proto == 0` is the *VIP marker* of a ClusterIP: it says "this
/// address is a service address" so that fragments and unsupported protocols sent to it can
/// be dropped instead of leaking to a routing table that does not know it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyV4 {
    /// Virtual IP, network order.
    pub addr: [u8; 4],
    /// Service port, network order.
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKeyV4>() == 8);

impl ServiceKeyV4 {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr, port: port.to_be_bytes(), proto, _pad: 0 }
    }
    pub const fn vip_marker(addr: [u8; 4]) -> Self {
        Self::new(addr, 0, 0)
    }
    pub const fn is_vip_marker(&self) -> bool {
        self.port[0] == 0 && self.port[1] == 0 && self.proto == 0
    }
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Value of `SERVICES_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Stable id of the frontend; the first half of every [`SlotKey`]. 0 for a VIP marker.
    pub service_id: u32,
    /// Number of valid slots `0..backend_count`. 0 means "no usable endpoints".
    pub backend_count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// With [`SVC_F_AFFINITY`]: `sessionAffinityConfig.clientIP.timeoutSeconds`
    /// (1..=[`AFFINITY_TIMEOUT_MAX_S`]). 0 otherwise. (Was `_reserved`, always written as 0,
    /// so entries written before affinity existed keep their meaning.)
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// The entry is a VIP marker, not a frontend.
pub const SVC_F_VIP_MARKER: u32 = 1;
/// `sessionAffinity: ClientIP`: new flows from a client IP go to the backend its last flow
/// went to, while that backend still sits in a slot and less than `affinity_timeout_s`
/// passed since that flow ([`AffinityKeyV4`]).
pub const SVC_F_AFFINITY: u32 = 2;
/// `internalTrafficPolicy: Local` with no endpoint on this node while other nodes have
/// some: new flows are dropped (kube-proxy's DROP), not rejected as for a Service without
/// any endpoint.
pub const SVC_F_DROP_EMPTY: u32 = 4;
/// A north-south frontend: a NodePort on one of this node's addresses, a LoadBalancer
/// ingress IP or an ExternalIP. Its flows carry [`CT_F_EXTERNAL`]: their replies are
/// reverse-translated where they leave the node (`to_netdev`, or `to_pod` for a pod
/// client), not in `from_pod`, and a flow sent to a backend on another node is SNATed to
/// the node IP on its way out (`externalTrafficPolicy: Cluster`).
pub const SVC_F_EXTERNAL: u32 = 8;
/// The frontend has `loadBalancerSourceRanges`: a new flow's client must match one of the
/// frontend's prefixes in `SOURCE_RANGES_V4` (checked at XDP, again in `from_netdev`).
pub const SVC_F_SOURCE_RANGES: u32 = 16;
/// `externalTrafficPolicy: Local` (external frontends only): the backends are this node's
/// endpoints alone and the client's address is never rewritten.
pub const SVC_F_ETP_LOCAL: u32 = 32;

/// Key of `AFFINITY_V4`: a client of a frontend with [`SVC_F_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKeyV4 {
    pub service_id: u32,
    /// Client IP, network order.
    pub client: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AffinityKeyV4>() == 8);

/// Value of `AFFINITY_V4`: where the client's last new flow to the frontend went, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValueV4 {
    pub backend_id: u32,
    /// The slot `backend_id` was found in: checked (with its two neighbours, see
    /// `dataplane-ebpf/src/lb.rs`) before the affinity is honoured.
    pub slot: u32,
    /// `bpf_ktime_get_ns()` of the client's last new flow to the frontend.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValueV4>() == 16);

/// Is an affinity last refreshed at `last_seen_ns` still valid at `now_ns` for a timeout of
/// `timeout_s` seconds? (A clock that went backwards never happens with
/// `bpf_ktime_get_ns`; it counts as valid.)
#[inline(always)]
pub const fn affinity_live(last_seen_ns: u64, now_ns: u64, timeout_s: u32) -> bool {
    now_ns.saturating_sub(last_seen_ns) < timeout_s as u64 * 1_000_000_000
}

/// Key of `BACKEND_SLOTS`: slot `slot` of frontend `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// Value of `BACKENDS_V4`, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendV4 {
    /// Endpoint IP, network order.
    pub addr: [u8; 4],
    /// Endpoint (target) port, network order.
    pub port: [u8; 2],
    pub proto: u8,
    /// Reserved for backend state (terminating, maintenance); written as 0.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<BackendV4>() == 8);

impl BackendV4 {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr, port: port.to_be_bytes(), proto, flags: 0 }
    }
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Direction of a conntrack entry.
pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Key of `CT_V4`: a packet's 5-tuple as it is seen on the wire, plus the direction.
///
/// A service flow has two entries: the ORIGINAL one keyed by what the client sends
/// (`client -> vip`) and the REPLY one keyed by what the backend sends (`backend -> client`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKeyV4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKeyV4>() == 16);

/// Value of `CT_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValueV4 {
    /// ORIGINAL: the backend the flow is DNATed to. REPLY: the VIP replies are SNATed to.
    pub nat_addr: [u8; 4],
    pub nat_port: [u8; 2],
    /// [`crate::ct::TcpState`] as an integer (0 for UDP).
    pub state: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Frontend id at the time the flow was created.
    pub service_id: u32,
    /// Backend id the flow is pinned to; checked against `BACKENDS_V4` on every packet.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` after which the entry is dead.
    pub expires_ns: u64,
    /// Reserved for the policy verdict and identity of the flow; written as 0.
    pub policy: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<CtValueV4>() == 32);

/// `CtValueV4::flags`: a hairpin flow, whose client is also its backend (a pod reaching
/// itself through its own Service). Its packets are DNATed to the pod *and* SNATed to
/// [`HAIRPIN_ADDR_V4`], so the reply (`pod -> HAIRPIN_ADDR_V4`) leaves the pod and crosses
/// `from_pod` again; its REPLY entry is keyed `backend:bport -> HAIRPIN_ADDR_V4:cport`.
pub const CT_F_HAIRPIN: u8 = 1;
/// `CtValueV4::flags`: a flow of an external frontend ([`SVC_F_EXTERNAL`]). `from_pod`
/// leaves its replies alone; `to_netdev` (client outside) or `to_pod` (client a local pod)
/// reverse-translates them.
pub const CT_F_EXTERNAL: u8 = 2;

/// The source address a hairpin flow's packets are SNATed to (Cilium's "loopback" address
/// idea): link-local, never assigned to a pod, a node or a Service by the lab or a cluster.
/// The pod sees `HAIRPIN_ADDR_V4:cport -> pod:bport` and answers it through its veth.
pub const HAIRPIN_ADDR_V4: [u8; 4] = [169, 254, 42, 1];

/// Value of the per-CPU `COUNTERS` array, one slot per (hook, reason) at
/// [`crate::reason::counter_index`]. Also the value of `POLICY_COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Names of the maps in the object file, shared so the agent and tests never misspell them.
pub mod names {
    pub const SERVICES_V4: &str = "SERVICES_V4";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS_V4: &str = "BACKENDS_V4";
    pub const CT_V4: &str = "CT_V4";
    pub const COUNTERS: &str = "COUNTERS";
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    pub const ENDPOINTS_V4: &str = "ENDPOINTS_V4";
    pub const POLICY_V4: &str = "POLICY_V4";
    /// The exact (full-prefix) entries of the policy, as a hash: O(1) whatever its size.
    pub const POLICY_EXACT_V4: &str = "POLICY_EXACT_V4";
    pub const POLICY_CONFIG: &str = "POLICY_CONFIG";
    pub const POLICY_CT_V4: &str = "POLICY_CT_V4";
    pub const FRAGS_V4: &str = "FRAGS_V4";
    pub const POLICY_COUNTERS: &str = "POLICY_COUNTERS";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    /// Per-CPU array of two `u64`: flow events written, flow events lost (ring full).
    pub const FLOW_EVENT_COUNTERS: &str = "FLOW_EVENT_COUNTERS";
    /// LRU of `(service id, client IP)` -> the backend of the client's last new flow.
    pub const AFFINITY_V4: &str = "AFFINITY_V4";
    /// SNAT table (`crate::nat`): both directions of every SNATed flow. An LRU.
    pub const NAT_V4: &str = "NAT_V4";
    /// One element: `crate::nat::NatConfig` (node IP, port range, masquerade on or off).
    pub const NAT_CONFIG: &str = "NAT_CONFIG";
    /// LPM of destinations pods reach without masquerade (the cluster's own ranges).
    pub const NO_MASQ_V4: &str = "NO_MASQ_V4";
    /// LPM of `(frontend id, client prefix)`: the `loadBalancerSourceRanges` of frontends
    /// with `SVC_F_SOURCE_RANGES`.
    pub const SOURCE_RANGES_V4: &str = "SOURCE_RANGES_V4";
    /// XDP on the node's external interfaces.
    pub const PROG_XDP_NETDEV: &str = "xdp_netdev";
    /// tc ingress of the node's external interfaces.
    pub const PROG_FROM_NETDEV: &str = "from_netdev";
    /// tc egress of the node's external interfaces.
    pub const PROG_TO_NETDEV: &str = "to_netdev";
    /// The tc program on the ingress of the host side of every pod veth (what pods send).
    pub const PROG_FROM_POD: &str = "from_pod";
    /// The tc program on the egress of the same interfaces (what is delivered to pods).
    pub const PROG_TO_POD: &str = "to_pod";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `repr(C)`, integers and byte arrays only, with explicit
    // padding (the size assertions above prove there is no implicit padding).
    unsafe impl aya::Pod for ServiceKeyV4 {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for BackendV4 {}
    unsafe impl aya::Pod for CtKeyV4 {}
    unsafe impl aya::Pod for CtValueV4 {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for AffinityKeyV4 {}
    unsafe impl aya::Pod for AffinityValueV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_lives_for_exactly_its_timeout() {
        let s = 1_000_000_000;
        assert!(affinity_live(10 * s, 10 * s, 1));
        assert!(affinity_live(10 * s, 11 * s - 1, 1));
        assert!(!affinity_live(10 * s, 11 * s, 1));
        assert!(affinity_live(0, AFFINITY_TIMEOUT_MAX_S as u64 * s - 1, AFFINITY_TIMEOUT_MAX_S));
        assert!(!affinity_live(0, 1, 0), "a zero timeout never holds");
        assert!(affinity_live(5 * s, 4 * s, 1), "an earlier now is not expiry");
    }
}
