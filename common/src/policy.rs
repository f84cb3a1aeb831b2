//! NetworkPolicy map types, shared by the agent (which computes them) and the datapath
//! (which looks them up once per new flow). The design is in docs/ARCHITECTURE.md,
//! "NetworkPolicy"; in short:
//!
//! ```text
//! peer IP ──IPCACHE_V4 (LPM)──► peer identity ─┐
//! local pod IP ──ENDPOINTS_V4──► policy set ───┼─► POLICY_EXACT_V4 (hash), then POLICY_V4 (LPM on set, identity, proto, port) ─► allow + rule id
//!                                              └─► the same with identity ANY                                                ─► allow + rule id
//! ```
//!
//! An *identity* is an equivalence class of peer addresses: two addresses share one when
//! every peer of every policy (pod selectors, namespace selectors, ipBlocks) and every
//! named port treats them alike. A *policy set* is the content of one direction of one
//! local pod's policy: pods with equal rules share a set. Both are numbered by a hash of
//! their content, so the numbers do not depend on the order objects arrive in.

/// Capacity of `IPCACHE_V4`: pod IPs plus ipBlock prefixes.
pub const MAX_IPCACHE: u32 = 262_144;
/// Capacity of `ENDPOINTS_V4`: pods on this node.
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Capacity of `POLICY_V4`.
pub const MAX_POLICY_ENTRIES: u32 = 524_288;
/// Capacity of `POLICY_CT_V4` (one entry per flow of a local pod).
pub const MAX_POLICY_CT: u32 = 262_144;
/// Capacity of `FRAGS_V4`: first fragments whose flow was allowed, until the rest arrives.
pub const MAX_FRAGS: u32 = 8_192;
/// Capacity of `POLICY_COUNTERS`.
pub const MAX_POLICY_COUNTERS: u32 = 65_536;
/// Size of the `FLOW_EVENTS` ring buffer in bytes (a power of two, a multiple of the page).
pub const FLOW_RING_BYTES: u32 = 1 << 22;

/// In a [`PolicyKey`]: any peer. Never an identity in `IPCACHE_V4`.
pub const IDENTITY_ANY: u32 = 0;
/// The identity of an address no `IPCACHE_V4` entry covers (and of the empty signature):
/// selected by no peer.
pub const IDENTITY_UNSELECTED: u32 = 1;
/// Identities computed from content start here; below are reserved.
pub const IDENTITY_FIRST_DYNAMIC: u32 = 256;

/// In an [`EndpointV4`]: the pod is not isolated in this direction (everything allowed).
pub const SET_NONE: u32 = 0;

/// `IPPROTO_SCTP`: policy matches it; services do not load-balance it.
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMP: u8 = 1;

/// Direction of a policy check, as seen from the local pod.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Key data of the `IPCACHE_V4` LPM trie (the prefix length is aya's `Key` wrapper).
pub type IpcacheKeyV4 = [u8; 4];

/// Value of `ENDPOINTS_V4`, keyed by a local pod's IPv4 address (`[u8; 4]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EndpointV4 {
    /// Policy set for traffic to this pod; [`SET_NONE`] if not isolated for ingress.
    pub ingress_set: u32,
    /// Policy set for traffic from this pod; [`SET_NONE`] if not isolated for egress.
    pub egress_set: u32,
    /// The pod's own identity (for flow events and `inspect`).
    pub identity: u32,
    /// `EP_F_*` bits.
    pub flags: u32,
}

/// The ingress set has entries for [`IDENTITY_ANY`]: a new flow that misses its peer's
/// identity is looked up again with ANY. Without it the second lookup is skipped (it
/// would miss), so a denied flow costs one trie walk, not two.
pub const EP_F_INGRESS_ANY: u32 = 1;
/// The same for the egress set.
pub const EP_F_EGRESS_ANY: u32 = 2;
/// The ingress set has entries shorter than [`PolicyKey::PREFIX_FULL`] (ports ranges,
/// protocol or rule wildcards), which live in the `POLICY_V4` trie; exact entries live in
/// the `POLICY_EXACT_V4` hash. Without it the trie is not walked.
pub const EP_F_INGRESS_LPM: u32 = 4;
/// The same for the egress set.
pub const EP_F_EGRESS_LPM: u32 = 8;
const _: () = assert!(core::mem::size_of::<EndpointV4>() == 16);

/// Key data of the `POLICY_V4` LPM trie. Fields are matched in this order, bit by bit, so
/// a prefix length picks what an entry constrains:
///
/// | prefix length | entry matches                                        |
/// |---------------|------------------------------------------------------|
/// | 64            | set + identity: every protocol and port (a rule without `ports`) |
/// | 72            | + protocol: every port of it (`protocol` without `port`) |
/// | 72 + k        | + the first k bits of the port (a block of an `endPort` range) |
/// | 88            | + the exact port                                     |
///
/// Every entry is an *allow*; the longest match only decides which rule the flow event
/// names. All fields are network order so the port bits are in matching order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub set: [u8; 4],
    pub identity: [u8; 4],
    pub proto: u8,
    pub port: [u8; 2],
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    /// Prefix length covering set and identity only.
    pub const PREFIX_ANY_PROTO: u32 = 64;
    /// Prefix length covering set, identity and protocol.
    pub const PREFIX_ANY_PORT: u32 = 72;
    /// Prefix length of an exact key.
    pub const PREFIX_FULL: u32 = 88;

    pub const fn new(set: u32, identity: u32, proto: u8, port: u16) -> Self {
        Self {
            set: set.to_be_bytes(),
            identity: identity.to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
            _pad: 0,
        }
    }
}

/// Value of `POLICY_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyValue {
    /// Names the rules that allow this entry (the agent's table; in flow events and counters).
    pub rule: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// The single element of `POLICY_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyConfig {
    /// Bumped by the agent after every change of the policy maps. A conntrack entry verified
    /// at an older revision is verified again on its next packet.
    pub revision: u32,
    /// `POLICY_CFG_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyConfig>() == 8);

/// Emit a flow event for every allowed new flow too (not only for drops). Needs
/// [`POLICY_CFG_F_EVENTS`].
pub const POLICY_CFG_F_LOG_ALLOWED: u32 = 1;
/// Write flow events at all. Off while nobody reads the ring buffer (no `--flow-log`), so
/// a full ring does not count every drop as a lost event.
pub const POLICY_CFG_F_EVENTS: u32 = 2;

/// Key of `POLICY_CT_V4`: a flow's 5-tuple in its original direction, after service
/// translation (so the backend, not the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyCtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PolicyCtKey>() == 16);

/// Value of `POLICY_CT_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyCtValue {
    /// `bpf_ktime_get_ns()` after which the entry is dead.
    pub expires_ns: u64,
    /// [`PolicyConfig::revision`] at which the checks in `flags` were made.
    pub revision: u32,
    /// `PCT_F_*` bits: which checks this node made and passed.
    pub flags: u8,
    /// [`crate::ct::TcpState`] as an integer (0 for other protocols).
    pub state: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyCtValue>() == 16);

/// The source of the original direction is a local pod and its egress allowed the flow.
pub const PCT_F_EGRESS: u8 = 1;
/// The destination of the original direction is a local pod and its ingress allowed it.
pub const PCT_F_INGRESS: u8 = 2;
/// With [`PCT_F_INGRESS`]: the flow came from this node itself (kubelet probes,
/// host-network pods), which the pod's ingress always allows, whatever the revision.
pub const PCT_F_HOST: u8 = 4;

/// Key of `FRAGS_V4`: an IPv4 datagram being fragmented, and the direction it was
/// checked in (so an egress pass never lets a fragment past an ingress check).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKeyV4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// IPv4 identification field, network order.
    pub id: [u8; 2],
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
}
const _: () = assert!(core::mem::size_of::<FragKeyV4>() == 12);

/// Value of `FRAGS_V4`: the ports the first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValueV4 {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragValueV4>() == 4);

/// Key of the per-CPU `POLICY_COUNTERS` hash (value: [`crate::maps::Counter`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyCounterKey {
    /// Allow: [`PolicyValue::rule`]. Deny: the endpoint's policy set.
    pub id: u32,
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyCounterKey>() == 8);

pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DENY: u8 = 1;

/// One record of the `FLOW_EVENTS` ring buffer: a policy verdict on a new flow (every deny,
/// and every allow when [`POLICY_CFG_F_LOG_ALLOWED`] is set).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC); the agent converts to wall time.
    pub ts_ns: u64,
    /// The packet as judged: after service translation.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u8,
    /// [`crate::reason::Reason`] index of the packet's outcome.
    pub reason: u8,
    /// The local pod's policy set in this direction.
    pub set: u32,
    /// Allow: the rule id of the matching entry. Deny: 0.
    pub rule: u32,
    /// The peer's identity.
    pub peer_identity: u32,
    /// For a flow to a Service: the ClusterIP and port it was sent to; zero otherwise.
    pub orig_daddr: [u8; 4],
    pub orig_dport: [u8; 2],
    pub _pad: [u8; 2],
    /// Explicit tail padding (the record is 8-aligned); written as 0.
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 48);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: `repr(C)`, integers and byte arrays only, no implicit padding (size asserts).
    unsafe impl aya::Pod for EndpointV4 {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyConfig {}
    unsafe impl aya::Pod for PolicyCtKey {}
    unsafe impl aya::Pod for PolicyCtValue {}
    unsafe impl aya::Pod for FragKeyV4 {}
    unsafe impl aya::Pod for FragValueV4 {}
    unsafe impl aya::Pod for PolicyCounterKey {}
    unsafe impl aya::Pod for FlowEvent {}
}
