//! Random NetworkPolicy worlds and flows for the policy property test
//! (`tests/policy_model.rs`): namespaces, pods and `networking.k8s.io/v1` NetworkPolicies
//! over a small vocabulary (so selectors, ipBlocks and named ports actually meet), and
//! flows between them that one node's datapath judges.
//!
//! Everything comes from a [`Rng`] seeded per world ([`world_rng`]), so a world and its
//! flows are reproduced from `(seed, index)` alone.
//!
//! ```text
//! Rng ──► GenWorld { namespaces, pods, NetworkPolicy specs ──convert_policy──► Policy, externals }
//!     └─► Case { src, dst, proto, dport } ×N (at least one end a pod local to NODE)
//! ```
//!
//! What the worlds contain:
//! - 2-3 namespaces labelled `kubernetes.io/metadata.name`, `team`, `env`; sometimes one
//!   of them has no Namespace object (its pods match no `namespaceSelector`);
//! - 4-10 pods: on [`NODE`] with IPs in 10.244.0.0/24, about a fifth on [`OTHER_NODE`] in
//!   10.244.1.0/24; a few Pending (still pods for policy; some without an IP yet) or
//!   finished (Succeeded/Failed: plain addresses, sometimes sharing the IP of a live pod
//!   on their node); container ports named
//!   `http`, `dns`, `metrics` with different numbers and protocols on different pods;
//! - a few addresses that are no pod's ([`EXTERNALS`]), some inside the pod CIDR;
//! - 1-5 policies: pod selectors with `matchLabels` and all four `matchExpressions`
//!   operators, every `policyTypes` combination (absent included), rules with absent,
//!   empty or listed peers (podSelector, namespaceSelector, both, ipBlock with excepts) and
//!   ports (absent, empty, protocol only, numeric, `endPort` ranges, named, absent
//!   protocol).
//!
//! Host-network pods are not generated: the datapath recognises host traffic by
//! interface, the reference by nothing (it treats them as plain addresses).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use nodeplane_agent::{
    model::{ContainerPort, Labels, ObjectKey, Pod, PodPhase},
    policy::{Policy, PolicyProtocol, convert::convert_policy, reference},
};
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    policy::{IPPROTO_ICMP, IPPROTO_SCTP},
};

/// The node whose datapath is tested: its pods are local endpoints.
pub const NODE: &str = "node-1";
/// Another node: its pods are peers only.
pub const OTHER_NODE: &str = "node-2";

/// Addresses no pod has: outside the cluster, inside the pod CIDRs, on prefix boundaries.
pub const EXTERNALS: [Ipv4Addr; 8] = [
    Ipv4Addr::new(192, 168, 1, 10),
    Ipv4Addr::new(192, 168, 2, 20),
    Ipv4Addr::new(10, 244, 0, 200),
    Ipv4Addr::new(10, 244, 0, 128),
    Ipv4Addr::new(10, 244, 1, 200),
    Ipv4Addr::new(172, 16, 0, 5),
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(192, 168, 255, 255),
];

/// A small deterministic PRNG (SplitMix64): no dependency, the same sequence everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// An index into `weights`, with probability proportional to its weight.
    pub fn weighted(&mut self, weights: &[usize]) -> usize {
        let mut x = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        unreachable!("x < sum of weights")
    }
}

/// The generator of world `index` under `seed`: worlds do not depend on each other, so one
/// is reproduced alone.
pub fn world_rng(seed: u64, index: u64) -> Rng {
    let mut r = Rng::new(seed ^ index.wrapping_mul(0xd134_2543_de82_ef95));
    r.next_u64();
    r
}

/// One generated world: the cluster objects as the agent sees them, the k8s source of the
/// policies (for reports), and addresses that are no pod's.
#[derive(Clone, Debug)]
pub struct GenWorld {
    /// Namespace objects (a pod's namespace may be missing).
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<Pod>,
    /// The NetworkPolicies as written.
    pub sources: Vec<NetworkPolicy>,
    /// `sources` converted by the agent (no issue: the generator writes valid objects).
    pub policies: Vec<Policy>,
    pub externals: Vec<Ipv4Addr>,
}

/// A flow `src -> dst` (`dport` 0 for ICMP) and which of its ends are local endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub dport: u16,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} {}", self.src, self.dst, proto_name(self.proto))?;
        if self.proto != IPPROTO_ICMP {
            write!(f, "/{}", self.dport)?;
        }
        Ok(())
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        IPPROTO_ICMP => "ICMP",
        _ => "other",
    }
}

/// Protocols of generated flows, ICMP echo requests included.
pub const PROTOCOLS: [u8; 4] = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP];

const NS_NAMES: [&str; 3] = ["shop", "billing", "ops"];
const APPS: [&str; 3] = ["web", "db", "cache"];
const TIERS: [&str; 2] = ["front", "back"];
const TEAMS: [&str; 2] = ["a", "b"];
const ENVS: [&str; 2] = ["prod", "dev"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "metrics", "nope"];
/// Port numbers policies and pods use, so that they meet.
const PORT_NUMBERS: [u16; 10] = [1, 53, 80, 443, 5353, 8000, 8080, 9090, 9091, 65535];
const END_SPANS: [u16; 8] = [0, 1, 2, 15, 100, 1000, 10000, 65535];
const CIDRS: [&str; 9] = [
    "0.0.0.0/0",
    "10.244.0.0/16",
    "10.244.0.0/24",
    "10.244.0.0/26",
    "10.244.0.128/25",
    "10.244.1.0/24",
    "192.168.0.0/16",
    "192.168.1.0/24",
    "172.16.0.0/12",
];
const METADATA_NAME: &str = "kubernetes.io/metadata.name";

impl GenWorld {
    pub fn generate(rng: &mut Rng) -> Self {
        let ns_count = rng.between(2, 3);
        let ns_names: Vec<String> = NS_NAMES[..ns_count].iter().map(|s| s.to_string()).collect();
        let mut namespaces = BTreeMap::new();
        for name in &ns_names {
            let mut labels = Labels::new();
            labels.insert(METADATA_NAME.into(), name.clone());
            if rng.chance(60) {
                labels.insert("team".into(), rng.pick(&TEAMS).to_string());
            }
            if rng.chance(60) {
                labels.insert("env".into(), rng.pick(&ENVS).to_string());
            }
            namespaces.insert(name.clone(), labels);
        }
        if ns_count == 3 && rng.chance(15) {
            // A namespace whose Namespace object is not known (yet).
            namespaces.remove(&ns_names[2]);
        }

        let pods = gen_pods(rng, &ns_names);
        let mut externals: Vec<Ipv4Addr> =
            EXTERNALS.iter().copied().filter(|_| rng.chance(50)).collect();
        if externals.is_empty() {
            externals.push(*rng.pick(&EXTERNALS));
        }

        let mut sources = Vec::new();
        let mut policies = Vec::new();
        let addrs: Vec<Ipv4Addr> =
            pods.iter().filter_map(|p| p.ip).chain(externals.iter().copied()).collect();
        for i in 0..rng.between(1, 5) {
            let ns = rng.pick(&ns_names).clone();
            let name = format!("np{i}");
            let spec = gen_spec(rng, &ns_names, &addrs);
            let key = ObjectKey::namespaced(ns.clone(), name.clone());
            let (policy, issues) = convert_policy(&key, Some(&spec));
            assert!(issues.is_empty(), "generated {key} has issues {issues:?}: {spec:#?}");
            policies.push(policy);
            sources.push(NetworkPolicy {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(ns),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            });
        }
        Self { namespaces, pods, sources, policies, externals }
    }

    /// The world as the reference model takes it.
    pub fn reference(&self) -> reference::World {
        reference::World {
            pods: self.pods.clone(),
            namespaces: self.namespaces.clone(),
            policies: self.policies.clone(),
        }
    }

    /// Pods that have a datapath endpoint here: on [`NODE`], with an IP, not finished.
    pub fn local_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.pods.iter().filter(|p| is_local(p)).filter_map(|p| p.ip).collect()
    }

    /// Every address a flow may use: pod IPs (finished pods and other nodes' included) and
    /// the externals.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        let mut a: BTreeSet<Ipv4Addr> = self.pods.iter().filter_map(|p| p.ip).collect();
        a.extend(self.externals.iter().copied());
        a.into_iter().collect()
    }

    /// Port numbers worth asking about: every container port, and every policy port range's
    /// edges and their neighbours.
    pub fn port_numbers(&self) -> Vec<u16> {
        let mut n: BTreeSet<u16> = PORT_NUMBERS.into_iter().collect();
        for p in &self.pods {
            n.extend(p.container_ports.iter().map(|c| c.port));
        }
        for spec in self.sources.iter().filter_map(|s| s.spec.as_ref()) {
            let ports = spec
                .ingress
                .iter()
                .flatten()
                .flat_map(|r| r.ports.iter().flatten())
                .chain(spec.egress.iter().flatten().flat_map(|r| r.ports.iter().flatten()));
            for port in ports {
                if let Some(IntOrString::Int(first)) = port.port {
                    let last = port.end_port.unwrap_or(first);
                    for x in [first - 1, first, first + 1, last - 1, last, last + 1] {
                        if let Ok(x) = u16::try_from(x) {
                            n.insert(x);
                        }
                    }
                }
            }
        }
        n.into_iter().collect()
    }

    /// `count` flows, each with at least one end a local endpoint, never to itself.
    pub fn cases(&self, rng: &mut Rng, count: usize) -> Vec<Case> {
        let locals: Vec<Ipv4Addr> = self.local_ips().into_iter().collect();
        let addrs = self.addresses();
        let numbers = self.port_numbers();
        (0..count)
            .map(|_| {
                let local = *rng.pick(&locals);
                let other = loop {
                    let a = *rng.pick(&addrs);
                    if a != local {
                        break a;
                    }
                };
                let (src, dst) = if rng.chance(50) { (local, other) } else { (other, local) };
                // The destination's container ports (protocol and number), so that named
                // ports decide some flows.
                let named: Vec<(u8, u16)> = self
                    .pods
                    .iter()
                    .filter(|p| p.ip == Some(dst))
                    .flat_map(|p| p.container_ports.iter().map(|c| (c.protocol.ipproto(), c.port)))
                    .collect();
                if !named.is_empty() && rng.chance(35) {
                    let (proto, dport) = *rng.pick(&named);
                    return Case { src, dst, proto, dport };
                }
                let proto = PROTOCOLS[rng.weighted(&[35, 25, 20, 20])];
                let dport = if proto == IPPROTO_ICMP {
                    0
                } else {
                    match rng.weighted(&[20, 60, 15, 5]) {
                        0 if !named.is_empty() => rng.pick(&named).1,
                        0 | 1 => *rng.pick(&numbers),
                        2 => rng.between(1, 65535) as u16,
                        _ => 0,
                    }
                };
                Case { src, dst, proto, dport }
            })
            .collect()
    }
}

pub fn is_local(pod: &Pod) -> bool {
    pod.node_name.as_deref() == Some(NODE)
        && pod.ip.is_some()
        && !pod.host_network
        && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
}

fn gen_pods(rng: &mut Rng, ns_names: &[String]) -> Vec<Pod> {
    let count = rng.between(4, 10);
    let mut used = BTreeSet::new();
    let mut pods: Vec<Pod> = Vec::new();
    for i in 0..count {
        // The first pod is a running local one, so every world has an endpoint.
        let local = i == 0 || rng.chance(80);
        let phase = if i == 0 {
            PodPhase::Running
        } else {
            [PodPhase::Running, PodPhase::Pending, PodPhase::Succeeded, PodPhase::Failed]
                [rng.weighted(&[85, 7, 5, 3])]
        };
        let finished = matches!(phase, PodPhase::Succeeded | PodPhase::Failed);
        let node = if local { NODE } else { OTHER_NODE };
        let same_node: Vec<Ipv4Addr> = pods
            .iter()
            .filter(|p| p.node_name.as_deref() == Some(node))
            .filter_map(|p| p.ip)
            .collect();
        let ip = if finished && !same_node.is_empty() && rng.chance(40) {
            // A finished pod whose IP was reused by a live one on its node.
            Some(*rng.pick(&same_node))
        } else if phase == PodPhase::Pending && rng.chance(30) {
            // Not started yet: no IP.
            None
        } else {
            loop {
                let third = if local { 0 } else { 1 };
                let a = Ipv4Addr::new(10, 244, third, rng.between(1, 60) as u8);
                if used.insert(a) {
                    break Some(a);
                }
            }
        };
        let mut labels = Labels::new();
        for (key, values) in [("app", &APPS[..]), ("tier", &TIERS[..]), ("team", &TEAMS[..])] {
            if rng.chance(60) {
                labels.insert(key.into(), rng.pick(values).to_string());
            }
        }
        pods.push(Pod {
            key: ObjectKey::namespaced(rng.pick(ns_names).clone(), format!("p{i}")),
            labels,
            ip,
            phase,
            node_name: Some(node.to_string()),
            container_ports: gen_container_ports(rng),
            host_network: false,
        });
    }
    pods
}

/// Named ports, at most one per name (names are unique within a pod), with numbers and
/// protocols that differ between pods; sometimes an unnamed port.
fn gen_container_ports(rng: &mut Rng) -> Vec<ContainerPort> {
    use PolicyProtocol::{Sctp, Tcp, Udp};
    let choices: [(&str, &[(PolicyProtocol, u16)]); 3] = [
        ("http", &[(Tcp, 80), (Tcp, 8080), (Tcp, 8000), (Udp, 8080)]),
        ("dns", &[(Udp, 53), (Tcp, 53), (Sctp, 53), (Udp, 5353)]),
        ("metrics", &[(Tcp, 9090), (Tcp, 9091), (Sctp, 9090)]),
    ];
    let mut ports = Vec::new();
    for (name, options) in choices {
        if rng.chance(65) {
            let (protocol, port) = *rng.pick(options);
            ports.push(ContainerPort { name: Some(name.into()), port, protocol });
        }
    }
    if rng.chance(20) {
        ports.push(ContainerPort { name: None, port: 443, protocol: Tcp });
    }
    ports
}

fn gen_spec(rng: &mut Rng, ns_names: &[String], addrs: &[Ipv4Addr]) -> NetworkPolicySpec {
    let policy_types = match rng.below(5) {
        0 => None,
        1 => Some(vec!["Ingress".to_string()]),
        2 => Some(vec!["Egress".to_string()]),
        3 => Some(vec!["Ingress".to_string(), "Egress".to_string()]),
        _ => Some(vec!["Egress".to_string(), "Ingress".to_string()]),
    };
    let rules = |rng: &mut Rng| -> Option<usize> {
        match rng.weighted(&[15, 10, 75]) {
            0 => None,
            1 => Some(0),
            _ => Some(rng.between(1, 3)),
        }
    };
    let (n_in, n_out) = (rules(rng), rules(rng));
    let ingress = n_in.map(|n| {
        (0..n)
            .map(|_| NetworkPolicyIngressRule {
                from: gen_peers(rng, ns_names, addrs),
                ports: gen_ports(rng),
            })
            .collect()
    });
    let egress = n_out.map(|n| {
        (0..n)
            .map(|_| NetworkPolicyEgressRule {
                to: gen_peers(rng, ns_names, addrs),
                ports: gen_ports(rng),
            })
            .collect()
    });
    NetworkPolicySpec {
        pod_selector: Some(if rng.chance(15) {
            LabelSelector::default()
        } else {
            pod_selector(rng)
        }),
        policy_types,
        ingress,
        egress,
    }
}

fn pod_selector(rng: &mut Rng) -> LabelSelector {
    let vocab: [(&str, &[&str]); 3] = [("app", &APPS), ("tier", &TIERS), ("team", &TEAMS)];
    selector(rng, &vocab)
}

fn namespace_selector(rng: &mut Rng, ns_names: &[String]) -> LabelSelector {
    let names: Vec<&str> = ns_names.iter().map(String::as_str).collect();
    let vocab: [(&str, &[&str]); 3] = [(METADATA_NAME, &names), ("team", &TEAMS), ("env", &ENVS)];
    selector(rng, &vocab)
}

/// `matchLabels` (0-2 keys) and `matchExpressions` (0-2, every operator) over `vocab`.
fn selector(rng: &mut Rng, vocab: &[(&str, &[&str])]) -> LabelSelector {
    let mut labels = BTreeMap::new();
    for _ in 0..[0, 1, 2][rng.weighted(&[40, 40, 20])] {
        let (k, values) = rng.pick(vocab);
        labels.insert(k.to_string(), rng.pick(values).to_string());
    }
    let mut exprs = Vec::new();
    for _ in 0..[0, 1, 2][rng.weighted(&[50, 35, 15])] {
        let (k, values) = rng.pick(vocab);
        let op = *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
        let vals = match op {
            "In" | "NotIn" => {
                let mut v: Vec<String> =
                    (0..rng.between(1, 2)).map(|_| rng.pick(values).to_string()).collect();
                v.dedup();
                Some(v)
            }
            _ => None,
        };
        exprs.push(LabelSelectorRequirement {
            key: k.to_string(),
            operator: op.to_string(),
            values: vals,
        });
    }
    LabelSelector {
        match_labels: (!labels.is_empty() || rng.chance(20)).then_some(labels),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    }
}

/// `from`/`to`: absent, empty (both: every peer), or 1-3 peers.
fn gen_peers(
    rng: &mut Rng,
    ns_names: &[String],
    addrs: &[Ipv4Addr],
) -> Option<Vec<NetworkPolicyPeer>> {
    match rng.weighted(&[20, 5, 75]) {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some(
            (0..rng.between(1, 3))
                .map(|_| match rng.weighted(&[30, 20, 20, 30]) {
                    0 => NetworkPolicyPeer {
                        pod_selector: Some(pod_selector(rng)),
                        ..Default::default()
                    },
                    1 => NetworkPolicyPeer {
                        namespace_selector: Some(namespace_selector(rng, ns_names)),
                        ..Default::default()
                    },
                    2 => NetworkPolicyPeer {
                        namespace_selector: Some(namespace_selector(rng, ns_names)),
                        pod_selector: Some(pod_selector(rng)),
                        ..Default::default()
                    },
                    _ => NetworkPolicyPeer {
                        ip_block: Some(ip_block(rng, addrs)),
                        ..Default::default()
                    },
                })
                .collect(),
        ),
    }
}

/// A canonical (masked) IPv4 prefix string.
fn prefix(addr: Ipv4Addr, len: u8) -> (u32, u8, String) {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let net = u32::from(addr) & mask;
    (net, len, format!("{}/{len}", Ipv4Addr::from(net)))
}

/// A `cidr` from [`CIDRS`] or around a world address, with 0-2 `except`s strictly inside it
/// (around world addresses when possible, so they matter).
fn ip_block(rng: &mut Rng, addrs: &[Ipv4Addr]) -> IPBlock {
    let (net, len, cidr) = match rng.weighted(&[60, 20, 20]) {
        0 => {
            let s = *rng.pick(&CIDRS);
            let (a, l) = s.split_once('/').unwrap_or_else(|| unreachable!("CIDRS are prefixes"));
            let a: Ipv4Addr = a.parse().unwrap_or_else(|_| unreachable!("CIDRS are prefixes"));
            prefix(a, l.parse().unwrap_or_else(|_| unreachable!("CIDRS are prefixes")))
        }
        1 => prefix(*rng.pick(addrs), 32),
        _ => prefix(*rng.pick(addrs), rng.between(24, 31) as u8),
    };
    let mut except = Vec::new();
    if len < 32 {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        let inside: Vec<Ipv4Addr> =
            addrs.iter().copied().filter(|a| u32::from(*a) & mask == net).collect();
        for _ in 0..[0, 1, 2][rng.weighted(&[45, 40, 15])] {
            let at = if !inside.is_empty() && rng.chance(80) {
                *rng.pick(&inside)
            } else {
                Ipv4Addr::from(net | (rng.next_u64() as u32 & !mask))
            };
            // Strictly longer than the cidr (never covering it), and not absurdly wide.
            let elen = rng.between((usize::from(len) + 1).max(20), 32);
            let (_, _, e) = prefix(at, elen as u8);
            if !except.contains(&e) {
                except.push(e);
            }
        }
    }
    IPBlock { cidr, except: (!except.is_empty()).then_some(except) }
}

/// `ports`: absent, empty (both: every port), or 1-3 ports.
fn gen_ports(rng: &mut Rng) -> Option<Vec<NetworkPolicyPort>> {
    match rng.weighted(&[30, 5, 65]) {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some((0..rng.between(1, 3)).map(|_| gen_port(rng)).collect()),
    }
}

fn gen_port(rng: &mut Rng) -> NetworkPolicyPort {
    let mut protocol = [None, Some("TCP"), Some("UDP"), Some("SCTP")]
        [rng.weighted(&[20, 30, 25, 25])]
    .map(String::from);
    let number = |rng: &mut Rng| -> i32 {
        if rng.chance(85) {
            i32::from(*rng.pick(&PORT_NUMBERS))
        } else {
            rng.between(1, 65535) as i32
        }
    };
    let (port, end_port) = match rng.weighted(&[15, 30, 20, 35]) {
        0 => (None, None),
        1 => (Some(IntOrString::Int(number(rng))), None),
        2 => {
            let first = number(rng);
            let end = (first + i32::from(*rng.pick(&END_SPANS))).min(65535);
            (Some(IntOrString::Int(first)), Some(end))
        }
        _ => {
            let name = *rng.pick(&PORT_NAMES);
            // Mostly the protocol pods name the port with, so that named ports match.
            if rng.chance(75) {
                let usual = match name {
                    "dns" => "UDP",
                    _ => "TCP",
                };
                protocol = rng.chance(70).then(|| usual.to_string()).or(protocol);
            }
            (Some(IntOrString::String(name.to_string())), None)
        }
    };
    NetworkPolicyPort { protocol, port, end_port }
}

impl fmt::Display for GenWorld {
    /// Namespaces, pods, externals, then the policies as YAML: enough to rebuild the world.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "namespaces:")?;
        for (name, labels) in &self.namespaces {
            writeln!(f, "  {name} {labels:?}")?;
        }
        writeln!(f, "pods:")?;
        for p in &self.pods {
            let ports: Vec<String> = p
                .container_ports
                .iter()
                .map(|c| format!("{}={}/{}", c.name.as_deref().unwrap_or("-"), c.port, c.protocol))
                .collect();
            writeln!(
                f,
                "  {} ip={} node={} phase={:?} labels={:?} ports=[{}]",
                p.key,
                p.ip.map_or("-".to_string(), |ip| ip.to_string()),
                p.node_name.as_deref().unwrap_or("-"),
                p.phase,
                p.labels,
                ports.join(", ")
            )?;
        }
        let ext: Vec<String> = self.externals.iter().map(|a| a.to_string()).collect();
        writeln!(f, "externals: {}", ext.join(", "))?;
        writeln!(f, "policies:")?;
        for np in &self.sources {
            let yaml = serde_yaml::to_string(np).unwrap_or_else(|e| format!("<{e}>\n"));
            writeln!(f, "---\n{yaml}")?;
        }
        Ok(())
    }
}
