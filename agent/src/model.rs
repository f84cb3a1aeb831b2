//! The agent's own view of cluster objects: only the fields it acts on, already validated.
//!
//! Nothing here knows about k8s-openapi or aya. The [`Index`](crate::index::Index) converts
//! k8s objects into these types (rejecting what the datapath cannot program), and
//! [`desired`](crate::desired) turns them into map contents. Keeping the types small and
//! plain makes both ends testable with literals and lets a k8s API change stop at the index.
//!
//! IPv4 only in this version: addresses are `Ipv4Addr`, IPv6 ones are dropped at the index.
use std::{collections::BTreeMap, fmt, net::IpAddr, net::Ipv4Addr, str::FromStr};

use nodeplane_common::maps::{IPPROTO_TCP, IPPROTO_UDP};

pub use crate::source::ObjectKey;

pub type Labels = BTreeMap<String, String>;

/// An L4 protocol the datapath load-balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as in map keys.
    pub const fn ipproto(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    /// The k8s spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    /// A k8s `protocol` field: absent means TCP; SCTP and anything else are unsupported.
    pub fn from_k8s(protocol: Option<&str>) -> Result<Self, UnsupportedProtocol> {
        match protocol {
            None => Ok(Protocol::Tcp),
            Some(p) => p.parse(),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported protocol {0:?}")]
pub struct UnsupportedProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnsupportedProtocol;

    /// Exact k8s spelling (`TCP`, `UDP`), case-sensitive as the API server is.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(UnsupportedProtocol(other.to_string())),
        }
    }
}

/// A ClusterIP Service the datapath serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    /// IPv4 ClusterIPs (a dual-stack Service keeps only its v4 address). Never empty.
    pub cluster_ips_v4: Vec<Ipv4Addr>,
    /// Ports the datapath can program; unsupported ones were dropped by the index.
    pub ports: Vec<ServicePort>,
    pub labels: Labels,
    /// The pod selector, if any (Services without one have hand-made EndpointSlices).
    pub selector: Option<Labels>,
    /// `spec.internalTrafficPolicy: Local`: ClusterIP traffic goes to this node's endpoints
    /// only (see [`desired`](crate::desired)).
    pub internal_traffic_policy_local: bool,
    /// `spec.sessionAffinity`, with its timeout already validated by the index.
    pub session_affinity: SessionAffinity,
    /// How traffic from outside the cluster reaches it: NodePorts, LoadBalancer and
    /// external IPs, and their policies.
    pub external: ExternalAccess,
}

/// The north-south side of a Service: what kube-proxy programs besides the ClusterIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalAccess {
    /// `spec.externalIPs` (IPv4, canonical). Admitted by the agent's allowlist only
    /// (`--external-ip-cidr`; CVE-2020-8554), checked in [`desired`](crate::desired).
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (IPv4) of a `LoadBalancer` Service.
    pub lb_ingress_ips: Vec<Ipv4Addr>,
    /// `spec.externalTrafficPolicy: Local`: external traffic goes to this node's endpoints
    /// only and keeps its source address.
    pub traffic_policy_local: bool,
    /// `spec.healthCheckNodePort` (a `LoadBalancer` Service with the Local policy).
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges` (IPv4); empty means every source. Applies to the
    /// LoadBalancer ingress IPs only, as in kube-proxy.
    pub source_ranges: Vec<Ipv4Cidr>,
}

/// `spec.sessionAffinity`: whether new connections of one client IP stick to one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionAffinity {
    /// `None` (the default): every new connection picks a backend at random.
    #[default]
    None,
    /// `ClientIP`: for `timeout_s` seconds (1..=86400) after a client's last new connection,
    /// its next ones go to the same backend while it remains one.
    ClientIp { timeout_s: u32 },
}

impl SessionAffinity {
    /// The timeout of `ClientIP` affinity, `None` without affinity.
    pub const fn timeout_s(self) -> Option<u32> {
        match self {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout_s } => Some(timeout_s),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    /// Empty for the single unnamed port a Service may have.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// `nodePort` of a `NodePort` or `LoadBalancer` Service (`None` for other types, and
    /// for a LoadBalancer with `allocateLoadBalancerNodePorts: false`).
    pub node_port: Option<u16>,
}

/// An EndpointSlice of address type IPv4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// From the `kubernetes.io/service-name` label; the Service is in the slice's namespace.
    pub service_name: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// The key of the Service this slice belongs to.
    pub fn service_key(&self) -> ObjectKey {
        ObjectKey { namespace: self.key.namespace.clone(), name: self.service_name.clone() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointPort {
    /// Matches a [`ServicePort::name`]; empty for an unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint with its conditions resolved as the API defines the defaults
/// (ready: nil = true, serving: nil = ready, terminating: nil = false).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// The endpoint's first address, as kube-proxy uses it.
    pub addr: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    /// A k8s `status.phase`; absent or unrecognized is `Unknown`.
    pub fn from_k8s(phase: Option<&str>) -> Self {
        match phase {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }
}

/// A Pod, as NetworkPolicy will need it: who it is (labels), where (IP, node), what it
/// listens on (named ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjectKey,
    pub labels: Labels,
    /// The Pod's IPv4 address, once it has one.
    pub ip: Option<Ipv4Addr>,
    pub phase: PodPhase,
    pub node_name: Option<String>,
    /// TCP/UDP/SCTP container ports of all containers, for named-port policy rules.
    pub container_ports: Vec<ContainerPort>,
    /// `spec.hostNetwork`: such a Pod shares the node's address and has no veth.
    pub host_network: bool,
}

/// A container port; only named ones matter to policy, but all are kept. SCTP included: a
/// policy's named port may name an SCTP port even though Services do not load-balance SCTP.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: crate::policy::PolicyProtocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// IPv4 Pod CIDRs assigned to the node.
    pub pod_cidrs: Vec<Ipv4Cidr>,
    pub addresses: Vec<NodeAddress>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...; only IP kinds are kept.
    pub kind: String,
    pub addr: IpAddr,
}

/// An IPv4 prefix such as `10.244.1.0/24`, in canonical form (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// `None` if `prefix_len > 32` or `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        let cidr = Self { addr, prefix_len };
        (prefix_len <= 32 && cidr.mask() & u32::from(addr) == u32::from(addr)).then_some(cidr)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv4 CIDR {0:?}")]
pub struct InvalidCidr(pub String);

impl FromStr for Ipv4Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidCidr(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr = parse_ipv4_canonical(addr).ok_or_else(err)?;
        // Canonical length only: no sign, no leading zeros.
        let digits = len.bytes().all(|b| b.is_ascii_digit());
        if !digits || len.is_empty() || len.len() > 2 || (len.len() > 1 && len.starts_with('0')) {
            return Err(err());
        }
        let len: u8 = len.parse().map_err(|_| err())?;
        Self::new(addr, len).ok_or_else(err)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Parses a dotted-quad IPv4 address only in its canonical form: `10.0.0.1` but not
/// `10.0.0.01`, `010.0.0.1` or `1.2.3`. The API server rejects the others for new objects,
/// but old objects may still carry them and their meaning differs between parsers (octal).
pub fn parse_ipv4_canonical(s: &str) -> Option<Ipv4Addr> {
    let addr: Ipv4Addr = s.parse().ok()?;
    (addr.to_string() == s).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols() {
        assert_eq!(Protocol::from_k8s(None), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("UDP")), Ok(Protocol::Udp));
        assert_eq!(Protocol::Udp.ipproto(), IPPROTO_UDP);
        assert!(Protocol::from_k8s(Some("SCTP")).is_err());
        assert!(Protocol::from_k8s(Some("tcp")).is_err());
    }

    #[test]
    fn canonical_ipv4_only() {
        assert_eq!(parse_ipv4_canonical("10.0.0.1"), Some(Ipv4Addr::new(10, 0, 0, 1)));
        for bad in ["10.0.0.01", "010.0.0.1", "1.2.3", "", " 10.0.0.1", "10.0.0.256", "::1"] {
            assert_eq!(parse_ipv4_canonical(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "10.244.1.0/24".parse().expect("cidr");
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 7)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 7)));
        assert_eq!(c.to_string(), "10.244.1.0/24");
        let all: Ipv4Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        for bad in [
            "10.244.1.1/24",
            "10.244.1.0/33",
            "10.244.1.0",
            "10.244.1.0/024",
            "10.0.0.0/+8",
            "fd00::/64",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad:?}");
        }
    }
}
