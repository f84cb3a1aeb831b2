//! What the datapath did with a packet, and where. The per-CPU `COUNTERS` array has one
//! slot per ([`Hook`], [`Reason`]) pair ([`counter_index`]); [`Hook::name`] and
//! [`Reason::name`] are the labels the agent exports.

/// Verdicts and drop reasons. Stored as `u32` indices, decoded with [`Reason::from_index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Reason {
    /// Passed: not IPv4 (ARP, IPv6 in this version).
    PassNotIpv4 = 0,
    /// Passed: IPv4 not addressed to a service and not a reply of a service flow.
    PassNotService = 1,
    /// Passed: a fragment not addressed to a service address.
    PassFragment = 2,
    /// Translated: first packet of a new service flow (DNAT, conntrack entries created).
    NatNew = 3,
    /// Translated: a later packet of a known flow (DNAT from conntrack).
    NatEstablished = 4,
    /// Translated: a reply from a backend (reverse NAT to the VIP).
    RevNat = 5,
    /// Translated: an established flow whose backend was gone, moved to a live one.
    NatReselected = 6,
    /// Dropped: a service with no usable endpoints.
    DropNoBackends = 7,
    /// Dropped: truncated Ethernet or IPv4 header, or IHL < 5.
    DropMalformedIp = 8,
    /// Dropped: truncated TCP/UDP header, or TCP data offset < 5.
    DropMalformedL4 = 9,
    /// Dropped: a fragment addressed to a service address (ports unknown, never translated).
    DropFragment = 10,
    /// Dropped: a protocol other than TCP/UDP addressed to a service address.
    DropUnsupportedProto = 11,
    /// Dropped: the maps were inconsistent (slot or backend missing) for a new flow.
    DropNoBackendEntry = 12,
    /// Dropped: a kernel helper failed while rewriting the packet.
    DropRewriteFailed = 13,
    /// Dropped: conntrack insert failed (should not happen with an LRU map).
    DropCtInsertFailed = 14,
    /// Dropped: NetworkPolicy denies the flow (at the source's egress or the destination's ingress).
    DropPolicy = 15,
    /// Dropped: a non-first fragment to or from an isolated pod whose first fragment was
    /// not seen (or not allowed): its ports, hence its verdict, are unknown.
    DropPolicyFragment = 16,
    /// Answered: a TCP segment to a service with no usable endpoints, sent back to the pod
    /// as a RST|ACK from the VIP (`from_pod` only; `reject.rs`).
    RejectTcp = 17,
    /// Answered: a UDP datagram to a service with no usable endpoints, sent back to the pod
    /// as an ICMP port unreachable from the VIP.
    RejectUdp = 18,
    /// Translated: an ICMP error (destination unreachable, time exceeded) quoting a DNATed
    /// packet of a service flow, its quote rewritten back to the VIP (`to_pod`; `icmp.rs`).
    IcmpRevNat = 19,
    /// Dropped: a client outside the `loadBalancerSourceRanges` of the frontend it reached
    /// (XDP or `from_netdev`).
    DropSourceRange = 20,
    /// Translated: the first packet of a flow leaving the node, SNATed to the node IP with a
    /// port the allocator chose (masquerade, or a NodePort flow forwarded to another node).
    SnatNew = 21,
    /// Translated: a later packet of an SNATed flow.
    Snat = 22,
    /// Translated: a reply to an SNATed flow, its destination given back to the client.
    RevSnat = 23,
    /// Dropped: no free port for a new SNATed flow (every probe of the allocator collided).
    DropNatExhausted = 24,
    /// Dropped: the node's external frontends need an address to SNAT to and have none.
    DropNoNodeIp = 25,
}

impl Reason {
    pub const COUNT: u32 = 26;

    pub const ALL: [Reason; Self::COUNT as usize] = [
        Self::PassNotIpv4,
        Self::PassNotService,
        Self::PassFragment,
        Self::NatNew,
        Self::NatEstablished,
        Self::RevNat,
        Self::NatReselected,
        Self::DropNoBackends,
        Self::DropMalformedIp,
        Self::DropMalformedL4,
        Self::DropFragment,
        Self::DropUnsupportedProto,
        Self::DropNoBackendEntry,
        Self::DropRewriteFailed,
        Self::DropCtInsertFailed,
        Self::DropPolicy,
        Self::DropPolicyFragment,
        Self::RejectTcp,
        Self::RejectUdp,
        Self::IcmpRevNat,
        Self::DropSourceRange,
        Self::SnatNew,
        Self::Snat,
        Self::RevSnat,
        Self::DropNatExhausted,
        Self::DropNoNodeIp,
    ];

    pub const fn from_index(i: u32) -> Option<Self> {
        if i < Self::COUNT { Some(Self::ALL[i as usize]) } else { None }
    }

    /// The packet was dropped (`TC_ACT_SHOT`).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropNoBackends
                | Self::DropMalformedIp
                | Self::DropMalformedL4
                | Self::DropFragment
                | Self::DropUnsupportedProto
                | Self::DropNoBackendEntry
                | Self::DropRewriteFailed
                | Self::DropCtInsertFailed
                | Self::DropPolicy
                | Self::DropPolicyFragment
                | Self::DropSourceRange
                | Self::DropNatExhausted
                | Self::DropNoNodeIp
        )
    }

    /// The packet was turned into an answer and sent back to its sender (`TC_ACT_REDIRECT`).
    pub const fn is_reject(self) -> bool {
        matches!(self, Self::RejectTcp | Self::RejectUdp)
    }

    /// The label of what happened to the packet: `pass` (passed or translated), `drop` or
    /// `reject`.
    pub const fn verdict(self) -> &'static str {
        if self.is_reject() {
            "reject"
        } else if self.is_drop() {
            "drop"
        } else {
            "pass"
        }
    }

    /// Stable, kebab-case name used in logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassNotIpv4 => "pass-not-ipv4",
            Self::PassNotService => "pass-not-service",
            Self::PassFragment => "pass-fragment",
            Self::NatNew => "nat-new",
            Self::NatEstablished => "nat-established",
            Self::RevNat => "rev-nat",
            Self::NatReselected => "nat-reselected",
            Self::DropNoBackends => "no-backends",
            Self::DropMalformedIp => "malformed-ip",
            Self::DropMalformedL4 => "malformed-l4",
            Self::DropFragment => "fragment",
            Self::DropUnsupportedProto => "unsupported-protocol",
            Self::DropNoBackendEntry => "no-backend-entry",
            Self::DropRewriteFailed => "rewrite-failed",
            Self::DropCtInsertFailed => "ct-insert-failed",
            Self::DropPolicy => "policy-denied",
            Self::DropPolicyFragment => "policy-fragment",
            Self::RejectTcp => "reject-tcp",
            Self::RejectUdp => "reject-udp",
            Self::IcmpRevNat => "icmp-rev-nat",
            Self::DropSourceRange => "source-range",
            Self::SnatNew => "snat-new",
            Self::Snat => "snat",
            Self::RevSnat => "rev-snat",
            Self::DropNatExhausted => "nat-exhausted",
            Self::DropNoNodeIp => "no-node-ip",
        }
    }
}

/// The program that counted a packet: the first coordinate of a `COUNTERS` slot. Stored as
/// a `u32` index, decoded with [`Hook::from_index`]. The numbers are an ABI: a new hook
/// takes the next free one, existing slots never move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Hook {
    /// tc ingress of the host side of a pod veth: what the pod sends.
    FromPod = 0,
    /// tc egress of the same interface: what is delivered to the pod.
    ToPod = 1,
    /// XDP on the node's external interfaces: NodePort, LoadBalancer and ExternalIP
    /// traffic, `loadBalancerSourceRanges`, replies of SNATed flows.
    Xdp = 2,
    /// cgroup socket hooks: connect/sendmsg/recvmsg of host-network processes.
    Sock = 3,
    /// tc ingress of the node's external interfaces: what XDP passed on (or everything,
    /// with XDP off).
    FromNetdev = 4,
    /// tc egress of the node's external interfaces: SNAT (masquerade, NodePort flows sent
    /// to another node) and the reverse NAT of replies to external clients.
    ToNetdev = 5,
}

impl Hook {
    pub const COUNT: u32 = 6;
    /// Hooks the `COUNTERS` array is sized for.
    pub const SLOTS: u32 = 8;

    pub const ALL: [Hook; Self::COUNT as usize] =
        [Self::FromPod, Self::ToPod, Self::Xdp, Self::Sock, Self::FromNetdev, Self::ToNetdev];

    pub const fn from_index(i: u32) -> Option<Self> {
        if i < Self::COUNT { Some(Self::ALL[i as usize]) } else { None }
    }

    /// Stable label: the name of the program (`maps::names::PROG_*`; `sock` for the socket
    /// hooks, which are several programs).
    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => "from_pod",
            Self::ToPod => "to_pod",
            Self::Xdp => "xdp_netdev",
            Self::Sock => "sock",
            Self::FromNetdev => "from_netdev",
            Self::ToNetdev => "to_netdev",
        }
    }
}

/// Slots per hook in `COUNTERS`. A fixed stride rather than [`Reason::COUNT`], so that a
/// new reason does not shift every other hook's slots: the counters are an ABI like every
/// map (a pinned array outlives the agent that created it).
pub const REASON_SLOTS: u32 = 32;
const _: () = assert!(Reason::COUNT <= REASON_SLOTS);
const _: () = assert!(Hook::COUNT <= Hook::SLOTS);

/// Entries of the per-CPU `COUNTERS` array: [`Hook::SLOTS`] × [`REASON_SLOTS`].
pub const COUNTER_SLOTS: u32 = Hook::SLOTS * REASON_SLOTS;

/// The `COUNTERS` slot of `reason` counted at `hook`: `hook * REASON_SLOTS + reason`.
#[inline(always)]
pub const fn counter_index(hook: Hook, reason: Reason) -> u32 {
    hook as u32 * REASON_SLOTS + reason as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_round_trip_and_names_are_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(Reason::from_index(i as u32), Some(*r));
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
            }
        }
        assert_eq!(Reason::from_index(Reason::COUNT), None);
        assert!(!Reason::RevNat.is_drop());
        assert!(!Reason::IcmpRevNat.is_drop() && !Reason::IcmpRevNat.is_reject());
        assert!(Reason::DropNoBackends.is_drop());
        for r in [Reason::RejectTcp, Reason::RejectUdp] {
            assert!(r.is_reject() && !r.is_drop(), "{r:?}");
            assert_eq!(r.verdict(), "reject");
        }
        assert_eq!(Reason::DropPolicy.verdict(), "drop");
        assert_eq!(Reason::NatNew.verdict(), "pass");
        assert!(!Reason::DropNoBackends.is_reject());
    }

    #[test]
    fn every_hook_and_reason_has_its_own_counter_slot() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for (i, h) in Hook::ALL.iter().enumerate() {
            assert_eq!(*h as u32, i as u32);
            assert_eq!(Hook::from_index(i as u32), Some(*h));
            for r in Reason::ALL {
                let slot = counter_index(*h, r);
                assert!(slot < COUNTER_SLOTS, "{h:?} {r:?} -> {slot}");
                assert!(!seen[slot as usize], "{h:?} {r:?} shares slot {slot}");
                seen[slot as usize] = true;
            }
        }
        assert_eq!(Hook::from_index(Hook::COUNT), None);
        assert_eq!(Hook::FromPod.name(), crate::maps::names::PROG_FROM_POD);
        assert_eq!(Hook::ToPod.name(), crate::maps::names::PROG_TO_POD);
        // The layout is an ABI: these slots must never move.
        assert_eq!(counter_index(Hook::FromPod, Reason::PassNotIpv4), 0);
        assert_eq!(counter_index(Hook::ToPod, Reason::DropPolicy), 32 + 15);
    }
}
