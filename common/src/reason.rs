//! What the datapath did with a packet. Each variant is one slot of the per-CPU
//! `COUNTERS` array, and its [`Reason::name`] is the label the agent exports.

/// Verdicts and drop reasons. Stored as `u32` indices, decoded with [`Reason::from_index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

impl Reason {
    pub const COUNT: u32 = 17;

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
    ];

    pub const fn from_index(i: u32) -> Option<Self> {
        if i < Self::COUNT { Some(Self::ALL[i as usize]) } else { None }
    }

    pub const fn is_drop(self) -> bool {
        (self as u32) >= (Self::DropNoBackends as u32)
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
        }
    }
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
        assert!(Reason::DropNoBackends.is_drop());
    }
}
