//! SNAT: the types of the `NAT_V4` table and its configuration, and the port allocator's
//! pure rules.
//!
//! Two kinds of flows leave a node with its address as their source:
//!
//! - **masquerade**: a pod's flow to a destination outside `NO_MASQ_V4` (the cluster's own
//!   ranges, plus any configured non-masquerade CIDRs), as ip-masq-agent does;
//! - **NodePort forwarding**: a flow of an external frontend DNATed at this node to a backend
//!   on another node (`externalTrafficPolicy: Cluster`), so the reply comes back here to be
//!   reverse-translated. `from_netdev` (or XDP) marks such packets with [`MARK_SNAT`].
//!
//! Both are SNATed by `to_netdev` (egress of the external interface), after routing, so
//! the kernel never sees a packet with the node's own address arrive from elsewhere (a
//! "martian" it would drop). Each flow has two `NAT_V4` entries, keyed like conntrack by
//! the tuple on the wire plus a direction:
//!
//! | dir | key (as on the wire) | value |
//! |---|---|---|
//! | [`NAT_DIR_OUT`] | `client:cport -> peer:pport` (before SNAT) | `node_ip:nat_port` |
//! | [`NAT_DIR_IN`] | `peer:pport -> node_ip:nat_port` (the reply) | `client:cport` |
//!
//! **Ports** are allocated per destination: a port is free for a new flow when no IN entry
//! holds `peer:pport -> node_ip:port`, the same rule as the kernel's own NAT (a port is
//! unique per 5-tuple, so 1,000 flows to one peer take 1,000 ports, and the same port serves
//! flows to different peers). The IN entry is inserted with `BPF_NOEXIST`, which makes the
//! claim atomic between CPUs. A candidate port is also skipped when a socket of the node
//! would receive the peer's reply (`bpf_sk_lookup_*`: a listener on that port or a
//! connected socket of the node itself), and the range never overlaps the NodePort range
//! (the agent refuses such a configuration).
#[cfg(feature = "user")]
use crate::maps::CtKeyV4;

/// Direction of a `NAT_V4` entry: the flow's packets on their way out (pre-SNAT tuple).
pub const NAT_DIR_OUT: u8 = 2;
/// Direction of a `NAT_V4` entry: the replies on their way in (post-SNAT tuple, reversed).
/// (2 and 3, not 0 and 1, so a NAT key can never be mistaken for a conntrack key.)
pub const NAT_DIR_IN: u8 = 3;

/// Capacity of `NAT_V4`: two entries per flow. An LRU: a full table forgets the least
/// recently used flow; [`NatConfig`] exhaustion is counted separately (`nat-exhausted`).
pub const MAX_NAT_ENTRIES: u32 = 262_144;
/// Capacity of `NO_MASQ_V4`.
pub const MAX_NO_MASQ: u32 = 256;
/// Capacity of `SOURCE_RANGES_V4`, summed over frontends.
pub const MAX_SOURCE_RANGES: u32 = 16_384;

/// How many ports the allocator tries for one new flow before giving up.
pub const NAT_PROBES: u32 = 32;

/// The bit `from_netdev` and XDP set in `skb->mark` on a NodePort packet DNATed to a
/// backend on another node: `to_netdev` SNATs it. kube-proxy uses 0x4000 and 0x8000 and
/// Calico the upper 16 bits; this one is outside both.
pub const MARK_SNAT: u32 = 0x0020_0000;

/// Key of `NAT_V4`: the same shape as a conntrack key, with `dir` [`NAT_DIR_OUT`] or
/// [`NAT_DIR_IN`].
pub type NatKeyV4 = crate::maps::CtKeyV4;

/// Value of `NAT_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatValueV4 {
    /// OUT: the node address the source becomes. IN: the client address the reply goes to.
    pub addr: [u8; 4],
    /// OUT: the allocated port. IN: the client's port.
    pub port: [u8; 2],
    /// `NAT_F_*` bits.
    pub flags: u8,
    /// TCP: [`crate::ct::TcpState`] after the packets seen in this entry's direction (0 for
    /// other protocols). The agent's GC gives the entry the conntrack lifetime of that state.
    pub state: u8,
    /// `bpf_ktime_get_ns()` of the flow's last packet in this direction: the agent's GC
    /// deletes an entry idle longer than [`crate::ct::lifetime_ns`] of its state, or idle
    /// for [`crate::ct::TCP_CLOSE_TIMEOUT_NS`] once the other entry of its flow is gone.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NatValueV4>() == 16);

/// The flow was SNATed because it is a NodePort flow forwarded to another node
/// ([`MARK_SNAT`]), not a pod's masquerade.
pub const NAT_F_NODEPORT: u8 = 1;

/// The one element of `NAT_CONFIG`, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatConfig {
    /// The address flows are SNATed to; all zero while the agent does not know it (then
    /// nothing is SNATed, and marked NodePort packets are dropped as `no-node-ip`).
    pub node_ip: [u8; 4],
    /// First and last port of the allocator's range, native order, `port_min <= port_max`.
    pub port_min: u16,
    pub port_max: u16,
    /// `NAT_CFG_*` bits.
    pub flags: u32,
    /// The pods whose traffic is masqueraded: the cluster CIDR (`--cluster-cidr`), or this
    /// node's podCIDR when that is not configured. Network order, host bits zero.
    pub pods_addr: [u8; 4],
    pub pods_len: u8,
    pub _pad: [u8; 3],
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<NatConfig>() == 24);

impl NatConfig {
    /// Is `addr` one of the masqueraded pods ([`NatConfig::pods_addr`])? Never for a
    /// zero-length prefix, which would mean "everything" (an unset config).
    #[inline(always)]
    pub const fn is_pod(&self, addr: [u8; 4]) -> bool {
        if self.pods_len == 0 || self.pods_len > 32 {
            return false;
        }
        let mask = u32::MAX.wrapping_shl(32 - self.pods_len as u32);
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.pods_addr)
    }
}

/// Masquerade pods' traffic to destinations outside `NO_MASQ_V4`.
pub const NAT_CFG_MASQUERADE: u32 = 1;

impl NatValueV4 {
    /// The key of the other entry of this entry's flow, given this entry's key.
    pub const fn partner(&self, key: &NatKeyV4) -> NatKeyV4 {
        if key.dir == NAT_DIR_OUT {
            // OUT `client -> peer` = node:port  ->  IN `peer -> node:port` = client.
            NatKeyV4 {
                saddr: key.daddr,
                daddr: self.addr,
                sport: key.dport,
                dport: self.port,
                proto: key.proto,
                dir: NAT_DIR_IN,
                _pad: [0; 2],
            }
        } else {
            // IN `peer -> node:port` = client  ->  OUT `client -> peer`.
            NatKeyV4 {
                saddr: self.addr,
                daddr: key.saddr,
                sport: self.port,
                dport: key.sport,
                proto: key.proto,
                dir: NAT_DIR_OUT,
                _pad: [0; 2],
            }
        }
    }
}

/// Whether a `NAT_V4` entry (`value`, of protocol `proto`) is dead at `now`: idle past
/// the conntrack lifetime of its TCP state (or UDP's), or idle for the closing timeout
/// while its flow's other entry (`partner`) is gone (evicted or deleted: the flow cannot
/// work any more, and an IN entry would hold its port) or closed for as long. The
/// datapath's allocator reclaims a taken port by this rule, the agent's GC deletes by it.
#[inline(always)]
pub fn dead(proto: u8, value: &NatValueV4, now: u64, partner: Option<&NatValueV4>) -> bool {
    use crate::ct::{TCP_CLOSE_TIMEOUT_NS, TcpState, lifetime_ns};
    let idle = now.saturating_sub(value.last_seen_ns);
    if idle > lifetime_ns(proto, TcpState::from_u8(value.state)) {
        return true;
    }
    if idle <= TCP_CLOSE_TIMEOUT_NS {
        return false;
    }
    match partner {
        None => true,
        Some(p) => {
            matches!(TcpState::from_u8(p.state), TcpState::Closing | TcpState::Closed)
                && now.saturating_sub(p.last_seen_ns) > TCP_CLOSE_TIMEOUT_NS
        }
    }
}

/// Default allocator range: the unprivileged ports below the NodePort range (30000–32767)
/// and Linux's default `ip_local_port_range` (32768–60999), so neither a NodePort nor the
/// node's own outgoing connections ever share a port with a NATed flow; the node's
/// listeners in the range are skipped at allocation. 28,976 ports per destination, about
/// what kube-proxy's MASQUERADE gets from the ephemeral range.
pub const NAT_PORT_MIN_DEFAULT: u16 = 1_024;
pub const NAT_PORT_MAX_DEFAULT: u16 = 29_999;

/// The `probe`-th candidate port for a flow whose random start is `seed`: a walk over the
/// range from a random point, so consecutive probes never repeat until the range is
/// exhausted and flows spread over the whole range.
#[inline(always)]
pub const fn candidate_port(seed: u32, probe: u32, port_min: u16, port_max: u16) -> u16 {
    // No panicking arithmetic: the datapath runs this (a division by zero would be a call
    // to the panic handler, which the verifier refuses).
    let span = (port_max as u32).wrapping_sub(port_min as u32).wrapping_add(1);
    let offset = match seed.wrapping_add(probe).checked_rem(span) {
        Some(o) => o,
        None => 0,
    };
    port_min.wrapping_add(offset as u16)
}

/// Data of a `SOURCE_RANGES_V4` key (an LPM trie; the prefix length is aya's `Key`): the
/// frontend's id, big-endian so that it is a prefix, then the client prefix. An entry for
/// `addr/len` has prefix length `32 + len`; a lookup uses 64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeV4 {
    /// The frontend's `service_id`, big-endian.
    pub service_id: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SourceRangeV4>() == 8);

impl SourceRangeV4 {
    pub const fn new(service_id: u32, addr: [u8; 4]) -> Self {
        Self { service_id: service_id.to_be_bytes(), addr }
    }
    /// The LPM prefix length of client prefix length `len`.
    pub const fn prefix_len(len: u8) -> u32 {
        32 + len as u32
    }
    pub const fn id(&self) -> u32 {
        u32::from_be_bytes(self.service_id)
    }
}

/// Data of a `NO_MASQ_V4` key (an LPM trie): a destination prefix, network order.
pub type NoMasqV4 = [u8; 4];

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), integers and byte arrays only, sizes asserted above (no padding).
    unsafe impl aya::Pod for NatValueV4 {}
    unsafe impl aya::Pod for NatConfig {}
    unsafe impl aya::Pod for SourceRangeV4 {}
    // `NatKeyV4` is `CtKeyV4`, which is Pod already.
    const _: fn(CtKeyV4) = |_| {};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_walk_the_whole_range_without_repeating() {
        let (min, max) = (61_000u16, 61_009u16);
        let mut seen = [false; 10];
        for probe in 0..10 {
            let p = candidate_port(0xdead_beef, probe, min, max);
            assert!((min..=max).contains(&p));
            assert!(!seen[(p - min) as usize], "port {p} repeated");
            seen[(p - min) as usize] = true;
        }
        assert_eq!(candidate_port(u32::MAX, 1, min, max), candidate_port(0, 0, min, max));
        assert_eq!(candidate_port(7, 0, 1, 65_535), 8);
        assert_eq!(candidate_port(7, 0, 500, 500), 500);
    }

    #[test]
    fn pods_are_the_configured_prefix_only() {
        let mut c = NatConfig { pods_addr: [10, 244, 0, 0], pods_len: 16, ..Default::default() };
        assert!(c.is_pod([10, 244, 3, 7]));
        assert!(!c.is_pod([10, 245, 0, 1]));
        c.pods_len = 32;
        c.pods_addr = [10, 244, 3, 7];
        assert!(c.is_pod([10, 244, 3, 7]) && !c.is_pod([10, 244, 3, 8]));
        c.pods_len = 0;
        assert!(!c.is_pod([10, 244, 3, 7]), "an unset config masquerades nothing");
    }

    #[test]
    fn source_range_ids_are_big_endian_prefixes() {
        let k = SourceRangeV4::new(0x0102_0304, [10, 1, 0, 0]);
        assert_eq!(k.service_id, [1, 2, 3, 4]);
        assert_eq!(k.id(), 0x0102_0304);
        assert_eq!(SourceRangeV4::prefix_len(16), 48);
        assert_eq!(SourceRangeV4::prefix_len(32), 64);
    }
}
