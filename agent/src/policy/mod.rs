//! NetworkPolicy: the agent's validated model of a policy ([`Policy`]), the reference
//! semantics ([`reference`]), and the computation of the datapath's policy maps
//! ([`compute`]).
//!
//! ```text
//!  NetworkPolicy (k8s) ──index::convert_policy──► Policy (this module; bad parts dropped, fail closed)
//!                                                   │
//!            pods, namespaces ──────────────────────┤
//!                                                   ├──► reference::allowed   (plain Rust, the spec; tests only compare against it)
//!                                                   └──► compute::compute     (identities, ipcache, endpoints, LPM policy entries)
//!                                                          incremental::PolicyState (the same maps, updated in place when only pods change)
//! ```
//!
//! Fail closed: a part of a policy the datapath cannot express (an unparseable ipBlock, a
//! selector with an unknown operator, a port that is not a number or a name) is dropped
//! from the peer or port list it was in, and a list that loses every element matches
//! nothing ([`Peers::Only`] / [`Ports::Only`] with an empty vector), never everything.
use std::fmt;

use nodeplane_common::policy::{EndpointV4, PolicyConfig, PolicyKey, PolicyValue};

use crate::model::{Ipv4Cidr, Labels, ObjectKey};

pub mod compute;
pub mod convert;
pub mod incremental;
pub mod lpm;
pub mod reference;
pub mod sync;

/// A `networking.k8s.io/v1` NetworkPolicy as the datapath can enforce it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub key: ObjectKey,
    /// The pods (in `key.namespace`) the policy applies to.
    pub pod_selector: Selector,
    /// `Some` when the effective `policyTypes` contain `Ingress`: selected pods are isolated
    /// for ingress and these rules (possibly none) are what the policy allows.
    pub ingress: Option<Vec<Rule>>,
    /// `Some` when the effective `policyTypes` contain `Egress`.
    pub egress: Option<Vec<Rule>>,
}

/// One ingress or egress rule: traffic from (to) any of `peers` on any of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Peers,
    pub ports: Ports,
}

/// `from` / `to` of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// `from`/`to` absent or empty: every source (destination), pods or not.
    All,
    /// Any of these; empty matches nothing (every peer was invalid and dropped).
    Only(Vec<Peer>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces of `namespaces`.
    Pods { namespaces: NamespaceScope, pods: Selector },
    /// Addresses in `cidr` but in none of `except`.
    IpBlock { cidr: Ipv4Cidr, except: Vec<Ipv4Cidr> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// No `namespaceSelector`: the policy's own namespace.
    Own(String),
    /// Namespaces whose labels match.
    Matching(Selector),
}

/// `ports` of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// `ports` absent or empty: every protocol (ICMP included) and port.
    All,
    /// Any of these; empty matches nothing.
    Only(Vec<PortMatch>),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMatch {
    pub protocol: PolicyProtocol,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSpec {
    /// No `port`: every port of the protocol.
    Any,
    /// `port` (and `endPort`), inclusive; `first <= last`.
    Range { first: u16, last: u16 },
    /// A named container port of the destination pod.
    Named(String),
}

/// Protocols a policy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl PolicyProtocol {
    pub const ALL: [PolicyProtocol; 3] = [Self::Tcp, Self::Udp, Self::Sctp];

    pub const fn ipproto(self) -> u8 {
        match self {
            Self::Tcp => nodeplane_common::maps::IPPROTO_TCP,
            Self::Udp => nodeplane_common::maps::IPPROTO_UDP,
            Self::Sctp => nodeplane_common::policy::IPPROTO_SCTP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// A k8s `protocol` field (policy or container port): absent means TCP; the exact,
    /// case-sensitive spellings `TCP`, `UDP` and `SCTP` are accepted.
    pub fn from_k8s(protocol: Option<&str>) -> Result<Self, crate::model::UnsupportedProtocol> {
        match protocol {
            None | Some("TCP") => Ok(Self::Tcp),
            Some("UDP") => Ok(Self::Udp),
            Some("SCTP") => Ok(Self::Sctp),
            Some(other) => Err(crate::model::UnsupportedProtocol(other.to_string())),
        }
    }
}

impl fmt::Display for PolicyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label selector (`matchLabels` AND every `matchExpressions` requirement). The empty
/// selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
    /// Sorted, deduplicated. Non-empty for In/NotIn, empty for Exists/DoesNotExist.
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.op {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// One write to the policy maps, as planned by the policy syncer and applied by a
/// [`PolicyWriter`] (the kernel maps, or a fake in tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    PutIpcache {
        cidr: Ipv4Cidr,
        identity: u32,
    },
    DelIpcache {
        cidr: Ipv4Cidr,
    },
    PutEndpoint {
        addr: std::net::Ipv4Addr,
        value: EndpointV4,
    },
    DelEndpoint {
        addr: std::net::Ipv4Addr,
    },
    /// An LPM entry of `POLICY_V4`: `key` matched on its first `prefix_len` bits.
    PutRule {
        key: PolicyKey,
        prefix_len: u32,
        value: PolicyValue,
    },
    DelRule {
        key: PolicyKey,
        prefix_len: u32,
    },
    SetConfig(PolicyConfig),
}

pub trait PolicyWriter {
    fn apply_policy(&mut self, op: &PolicyOp) -> Result<(), PolicyWriteError>;
}

#[derive(Debug, thiserror::Error)]
#[error("{op:?} failed: {reason}")]
pub struct PolicyWriteError {
    pub op: PolicyOp,
    pub reason: String,
    pub failure: crate::sync::WriteFailure,
}
