//! The reference semantics of NetworkPolicy, in plain Rust.
//!
//! Written straight from <https://kubernetes.io/docs/concepts/services-networking/network-policies/>
//! and the `networking.k8s.io/v1` API reference, for tests to compare the datapath
//! computation ([`compute`](super::compute)) against. It shares no code with it: only the
//! model types and [`Selector::matches`]. Nothing here is fast; everything here is obvious.
//!
//! A connection from `src` to `dst` is allowed when both hold (docs: "for a connection from
//! a source pod to a destination pod to be allowed, both the egress policy on the source
//! pod and the ingress policy on the destination pod need to allow the connection"):
//!
//! 1. egress at `src`: `src` is not a pod, or no policy with `Egress` selects it
//!    ("By default, a pod is non-isolated for egress"), or some egress rule of a policy
//!    selecting it matches `dst` and the port ("the union of ... egress rules").
//! 2. ingress at `dst`: the same with ingress rules and `src`.
//!
//! A rule matches when one of its peers and one of its ports match:
//!
//! | peer | matches |
//! |------|---------|
//! | [`Peers::All`] (`from`/`to` absent or empty) | anything, pods or not |
//! | [`Peer::Pods`] | a pod (never a plain address) in a matching namespace with matching labels |
//! | [`Peer::IpBlock`] | an address (a pod's IP included) in `cidr` and in no `except` |
//!
//! | port | matches |
//! |------|---------|
//! | [`Ports::All`] (`ports` absent or empty) | every protocol, ICMP included, every port |
//! | [`PortSpec::Any`] | that protocol, any port |
//! | [`PortSpec::Range`] | that protocol, `first..=last` |
//! | [`PortSpec::Named`] | that protocol and a container port of the *destination* pod with that name, protocol and number; never a non-pod destination |
//!
//! Decisions the docs leave to implementations, made here:
//! - Pods in phase Succeeded or Failed do not exist for policy (their IP may be reused).
//!   An [`Addr::Pod`] naming one, or a pod not in the world, is treated as a plain address
//!   with the IP the pod object has, if any.
//! - Host-network pods have the node's IP; pod selectors do not match them and they are not
//!   isolated (the docs: "NetworkPolicy behavior for hostNetwork pods is undefined"; this
//!   is the common choice). They are plain addresses here.
//! - A pod whose Namespace is not in the world matches no `namespaceSelector`, even an
//!   empty one: the namespace is not known to exist.
//! - An [`Addr::Ip`] is a plain address even if a pod has that IP: the caller says which it
//!   is ([`World::addr_of`] finds the pod for an IP).
//! - Traffic from the destination pod's own node ("OR if the traffic source is the pod's
//!   local node") is not modelled: the datapath recognises it by interface, not address.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::{NamespaceScope, Peer, Peers, Policy, PortMatch, PortSpec, Ports, Rule};
use crate::{
    index::Index,
    model::{Labels, ObjectKey, Pod, PodPhase},
};

/// Everything a policy decision depends on.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub pods: Vec<Pod>,
    /// Namespace name -> labels.
    pub namespaces: BTreeMap<String, Labels>,
    pub policies: Vec<Policy>,
}

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    /// A pod, by key.
    Pod(ObjectKey),
    /// An address that is not a pod's (a node, something outside the cluster).
    Ip(Ipv4Addr),
}

/// The decision in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirVerdict {
    /// No policy isolates the pod in this direction (or the address is not a pod).
    NotIsolated,
    /// Allowed by these rules: `(policy, rule index)`, sorted.
    Allowed { rules: Vec<(ObjectKey, usize)> },
    /// Isolated by these policies (sorted) and no rule of theirs matches.
    Denied { isolated_by: Vec<ObjectKey> },
}

impl DirVerdict {
    pub fn allowed(&self) -> bool {
        !matches!(self, DirVerdict::Denied { .. })
    }
}

/// Both checks of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// At the source.
    pub egress: DirVerdict,
    /// At the destination.
    pub ingress: DirVerdict,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allowed() && self.ingress.allowed()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

/// An address resolved against the world: a pod that policy treats as a pod, or an IP.
#[derive(Clone, Copy)]
enum End<'a> {
    Pod(&'a Pod),
    Ip(Option<Ipv4Addr>),
}

impl End<'_> {
    fn ip(&self) -> Option<Ipv4Addr> {
        match self {
            End::Pod(pod) => pod.ip,
            End::Ip(ip) => *ip,
        }
    }
}

impl World {
    /// The world as the index sees it.
    pub fn from_index(index: &Index) -> Self {
        World {
            pods: index.pods().cloned().collect(),
            namespaces: index.namespaces().map(|n| (n.name.clone(), n.labels.clone())).collect(),
            policies: index.network_policies().cloned().collect(),
        }
    }

    /// The address for `ip`: the (policy-visible) pod with that IP, else a plain address.
    pub fn addr_of(&self, ip: Ipv4Addr) -> Addr {
        self.pods
            .iter()
            .find(|p| is_policy_pod(p) && p.ip == Some(ip))
            .map_or(Addr::Ip(ip), |p| Addr::Pod(p.key.clone()))
    }

    fn resolve(&self, addr: &Addr) -> End<'_> {
        match addr {
            Addr::Ip(ip) => End::Ip(Some(*ip)),
            Addr::Pod(key) => match self.pods.iter().find(|p| p.key == *key) {
                Some(pod) if is_policy_pod(pod) => End::Pod(pod),
                Some(pod) => End::Ip(pod.ip),
                None => End::Ip(None),
            },
        }
    }
}

/// A pod policy selects and isolates: not host-network, not finished.
fn is_policy_pod(pod: &Pod) -> bool {
    !pod.host_network && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
}

/// Whether a connection from `src` to `dst` with IP protocol `proto` and destination
/// port `dport` (0 for protocols without ports) is allowed.
pub fn allowed(world: &World, src: &Addr, dst: &Addr, proto: u8, dport: u16) -> bool {
    verdict(world, src, dst, proto, dport).allowed()
}

/// [`allowed`], with which policies decided.
pub fn verdict(world: &World, src: &Addr, dst: &Addr, proto: u8, dport: u16) -> Verdict {
    let src = world.resolve(src);
    let dst = world.resolve(dst);
    Verdict {
        egress: check(world, Dir::Egress, src, dst, proto, dport),
        ingress: check(world, Dir::Ingress, src, dst, proto, dport),
    }
}

/// The check at the local end (`src` for egress, `dst` for ingress) against the peer.
fn check(world: &World, dir: Dir, src: End, dst: End, proto: u8, dport: u16) -> DirVerdict {
    let (local, peer) = match dir {
        Dir::Egress => (src, dst),
        Dir::Ingress => (dst, src),
    };
    let End::Pod(local) = local else {
        return DirVerdict::NotIsolated;
    };
    let mut isolated_by = BTreeSet::new();
    let mut rules = BTreeSet::new();
    for policy in &world.policies {
        if !selects(policy, local) {
            continue;
        }
        let policy_rules = match dir {
            Dir::Ingress => &policy.ingress,
            Dir::Egress => &policy.egress,
        };
        let Some(policy_rules) = policy_rules else { continue };
        isolated_by.insert(policy.key.clone());
        for (i, rule) in policy_rules.iter().enumerate() {
            if rule_matches(world, rule, peer, dst, proto, dport) {
                rules.insert((policy.key.clone(), i));
            }
        }
    }
    if isolated_by.is_empty() {
        DirVerdict::NotIsolated
    } else if rules.is_empty() {
        DirVerdict::Denied { isolated_by: isolated_by.into_iter().collect() }
    } else {
        DirVerdict::Allowed { rules: rules.into_iter().collect() }
    }
}

/// The policy applies to `pod`: same namespace, matching `podSelector`.
fn selects(policy: &Policy, pod: &Pod) -> bool {
    policy.key.namespace == pod.key.namespace && policy.pod_selector.matches(&pod.labels)
}

fn rule_matches(world: &World, rule: &Rule, peer: End, dst: End, proto: u8, dport: u16) -> bool {
    let peer_ok = match &rule.peers {
        Peers::All => true,
        Peers::Only(peers) => peers.iter().any(|p| peer_matches(world, p, peer)),
    };
    let port_ok = match &rule.ports {
        Ports::All => true,
        Ports::Only(ports) => ports.iter().any(|p| port_matches(p, dst, proto, dport)),
    };
    peer_ok && port_ok
}

fn peer_matches(world: &World, peer: &Peer, addr: End) -> bool {
    match peer {
        Peer::Pods { namespaces, pods } => {
            let End::Pod(pod) = addr else { return false };
            let namespace = pod.key.namespace.as_deref().unwrap_or_default();
            let in_scope = match namespaces {
                NamespaceScope::Own(own) => own == namespace,
                NamespaceScope::Matching(sel) => {
                    world.namespaces.get(namespace).is_some_and(|labels| sel.matches(labels))
                }
            };
            in_scope && pods.matches(&pod.labels)
        }
        Peer::IpBlock { cidr, except } => {
            addr.ip().is_some_and(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)))
        }
    }
}

/// Named ports are the destination pod's (API: "This can either be a numerical or named
/// port on a pod"; the pod receiving the traffic, for ingress and egress alike).
fn port_matches(port: &PortMatch, dst: End, proto: u8, dport: u16) -> bool {
    if port.protocol.ipproto() != proto {
        return false;
    }
    match &port.port {
        PortSpec::Any => true,
        PortSpec::Range { first, last } => (*first..=*last).contains(&dport),
        PortSpec::Named(name) => {
            let End::Pod(pod) = dst else { return false };
            pod.container_ports.iter().any(|c| {
                c.name.as_deref() == Some(name.as_str())
                    && c.protocol == port.protocol
                    && c.port == dport
            })
        }
    }
}

/// The examples of the Kubernetes documentation, as YAML, converted and judged here.
#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use nodeplane_common::{
        maps::{IPPROTO_TCP, IPPROTO_UDP},
        policy::{IPPROTO_ICMP, IPPROTO_SCTP},
    };

    use super::*;
    use crate::{
        model::ContainerPort,
        policy::{PolicyProtocol, convert::convert_policy},
    };

    const TCP: u8 = IPPROTO_TCP;

    /// A NetworkPolicy written as YAML (the docs' examples leave the namespace out:
    /// `default` then), converted without issues.
    fn np(yaml: &str) -> Policy {
        let mut np: NetworkPolicy = serde_yaml::from_str(yaml).expect("NetworkPolicy YAML");
        np.metadata.namespace.get_or_insert_with(|| "default".into());
        let key = ObjectKey::namespaced(
            np.metadata.namespace.clone().unwrap_or_default(),
            np.metadata.name.clone().unwrap_or_default(),
        );
        let (policy, issues) = convert_policy(&key, np.spec.as_ref());
        assert!(issues.is_empty(), "{issues:?}");
        policy
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(ns: &str, name: &str, ip: [u8; 4], l: &[(&str, &str)]) -> Pod {
        Pod {
            key: ObjectKey::namespaced(ns, name),
            labels: labels(l),
            ip: Some(Ipv4Addr::from(ip)),
            phase: PodPhase::Running,
            node_name: Some("n1".into()),
            container_ports: vec![],
            host_network: false,
        }
    }

    fn named(name: &str, port: u16, protocol: PolicyProtocol) -> ContainerPort {
        ContainerPort { name: Some(name.into()), port, protocol }
    }

    fn at(ns: &str, name: &str) -> Addr {
        Addr::Pod(ObjectKey::namespaced(ns, name))
    }

    fn ip(a: [u8; 4]) -> Addr {
        Addr::Ip(Ipv4Addr::from(a))
    }

    /// Namespaces `default`, `myproject` (project=myproject), `alice` (user=alice) and
    /// `bob`, each with its `kubernetes.io/metadata.name` label; a `db`, a `frontend` and
    /// a plain pod in `default`, a frontend in each other namespace.
    fn world(policies: Vec<Policy>) -> World {
        let ns = |name: &str, extra: &[(&str, &str)]| {
            let mut l = labels(extra);
            l.insert("kubernetes.io/metadata.name".into(), name.into());
            (name.to_string(), l)
        };
        World {
            pods: vec![
                pod("default", "db", [10, 244, 0, 1], &[("role", "db")]),
                pod("default", "frontend", [10, 244, 0, 2], &[("role", "frontend")]),
                pod("default", "other", [10, 244, 0, 3], &[]),
                pod("myproject", "frontend", [10, 244, 1, 2], &[("role", "frontend")]),
                pod("alice", "client", [10, 244, 2, 2], &[("role", "client")]),
                pod("alice", "server", [10, 244, 2, 3], &[("role", "server")]),
                pod("bob", "client", [10, 244, 3, 2], &[("role", "client")]),
            ],
            namespaces: BTreeMap::from([
                ns("default", &[]),
                ns("myproject", &[("project", "myproject")]),
                ns("alice", &[("user", "alice")]),
                ns("bob", &[("user", "bob")]),
            ]),
            policies,
        }
    }

    const OUTSIDE: [u8; 4] = [192, 0, 2, 1];

    #[test]
    fn no_policy_allows_everything() {
        let w = world(vec![]);
        assert!(allowed(&w, &at("default", "frontend"), &at("default", "db"), TCP, 5432));
        assert!(allowed(&w, &ip(OUTSIDE), &at("default", "db"), IPPROTO_ICMP, 0));
        let v = verdict(&w, &at("default", "db"), &ip(OUTSIDE), IPPROTO_UDP, 53);
        assert_eq!(
            v,
            Verdict { egress: DirVerdict::NotIsolated, ingress: DirVerdict::NotIsolated }
        );
    }

    #[test]
    fn default_deny_ingress() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-ingress
spec:
  podSelector: {}
  policyTypes:
  - Ingress
")]);
        assert!(!allowed(&w, &at("default", "frontend"), &at("default", "db"), TCP, 5432));
        assert!(!allowed(&w, &ip(OUTSIDE), &at("default", "db"), IPPROTO_ICMP, 0));
        assert!(allowed(&w, &at("default", "db"), &ip(OUTSIDE), TCP, 443), "egress untouched");
        assert!(allowed(&w, &at("default", "db"), &at("myproject", "frontend"), TCP, 80));
        let v = verdict(&w, &at("bob", "client"), &at("default", "db"), TCP, 80);
        assert_eq!(
            v.ingress,
            DirVerdict::Denied {
                isolated_by: vec![ObjectKey::namespaced("default", "default-deny-ingress")]
            }
        );
        assert_eq!(v.egress, DirVerdict::NotIsolated);
    }

    #[test]
    fn allow_all_ingress() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-ingress
spec:
  podSelector: {}
  ingress:
  - {}
  policyTypes:
  - Ingress
")]);
        assert!(allowed(&w, &ip(OUTSIDE), &at("default", "db"), IPPROTO_ICMP, 0));
        let v = verdict(&w, &at("bob", "client"), &at("default", "db"), IPPROTO_SCTP, 9);
        assert_eq!(
            v.ingress,
            DirVerdict::Allowed {
                rules: vec![(ObjectKey::namespaced("default", "allow-all-ingress"), 0)]
            }
        );
    }

    #[test]
    fn default_deny_egress() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-egress
spec:
  podSelector: {}
  policyTypes:
  - Egress
")]);
        assert!(!allowed(&w, &at("default", "db"), &ip(OUTSIDE), IPPROTO_UDP, 53));
        assert!(!allowed(&w, &at("default", "db"), &at("bob", "client"), TCP, 80));
        assert!(allowed(&w, &at("bob", "client"), &at("default", "db"), TCP, 80), "ingress open");
        assert!(allowed(&w, &at("bob", "client"), &ip(OUTSIDE), TCP, 80), "other namespaces");
    }

    #[test]
    fn allow_all_egress() {
        let w = world(vec![
            np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-egress
spec:
  podSelector: {}
  policyTypes:
  - Egress
"),
            np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-egress
spec:
  podSelector: {}
  egress:
  - {}
  policyTypes:
  - Egress
"),
        ]);
        assert!(allowed(&w, &at("default", "db"), &ip(OUTSIDE), IPPROTO_ICMP, 0));
        let v = verdict(&w, &at("default", "db"), &at("bob", "client"), TCP, 80);
        assert_eq!(
            v.egress,
            DirVerdict::Allowed {
                rules: vec![(ObjectKey::namespaced("default", "allow-all-egress"), 0)]
            },
            "policies are additive: the deny-all one adds no rule"
        );
    }

    #[test]
    fn default_deny_all() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-all
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  - Egress
")]);
        assert!(!allowed(&w, &at("default", "db"), &at("default", "frontend"), TCP, 80));
        assert!(!allowed(&w, &at("default", "db"), &ip(OUTSIDE), TCP, 80));
        assert!(!allowed(&w, &ip(OUTSIDE), &at("default", "db"), TCP, 80));
        // Only one side needs to deny.
        assert!(!allowed(&w, &at("bob", "client"), &at("default", "db"), TCP, 80));
        assert!(!allowed(&w, &at("default", "db"), &at("bob", "client"), TCP, 80));
        assert!(allowed(&w, &at("bob", "client"), &at("alice", "client"), TCP, 80));
    }

    const TEST_NETWORK_POLICY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
";

    #[test]
    fn the_test_network_policy_example() {
        let w = world(vec![np(TEST_NETWORK_POLICY)]);
        let db = at("default", "db");
        // Ingress to role=db on TCP 6379 from the three peers.
        assert!(allowed(&w, &ip([172, 17, 0, 9]), &db, TCP, 6379), "ipBlock");
        assert!(!allowed(&w, &ip([172, 17, 1, 9]), &db, TCP, 6379), "except");
        assert!(!allowed(&w, &ip([172, 18, 0, 9]), &db, TCP, 6379), "outside cidr");
        assert!(allowed(&w, &at("myproject", "frontend"), &db, TCP, 6379), "namespaceSelector");
        assert!(allowed(&w, &at("default", "frontend"), &db, TCP, 6379), "podSelector");
        assert!(!allowed(&w, &at("bob", "client"), &db, TCP, 6379), "other namespace");
        assert!(!allowed(&w, &at("default", "other"), &db, TCP, 6379), "other labels");
        assert!(!allowed(&w, &at("default", "frontend"), &db, TCP, 6380), "other port");
        assert!(!allowed(&w, &at("default", "frontend"), &db, IPPROTO_UDP, 6379), "UDP");
        assert!(!allowed(&w, &at("default", "frontend"), &db, IPPROTO_ICMP, 0), "ICMP");
        // Egress from role=db to 10.0.0.0/24 on TCP 5978 only.
        assert!(allowed(&w, &db, &ip([10, 0, 0, 7]), TCP, 5978));
        assert!(!allowed(&w, &db, &ip([10, 0, 1, 7]), TCP, 5978));
        assert!(!allowed(&w, &db, &ip([10, 0, 0, 7]), TCP, 80));
        assert!(!allowed(&w, &db, &at("default", "frontend"), TCP, 5978), "pods not in the block");
        // Other pods are not selected.
        assert!(allowed(&w, &at("default", "other"), &at("default", "frontend"), TCP, 1));
    }

    #[test]
    fn ip_blocks_match_pod_ips_too() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-block}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [{ipBlock: {cidr: 10.244.1.0/24}}]}]
")]);
        assert!(allowed(&w, &at("myproject", "frontend"), &at("default", "db"), TCP, 1));
        assert!(!allowed(&w, &at("default", "frontend"), &at("default", "db"), TCP, 1));
    }

    #[test]
    fn namespace_and_pod_selector_in_one_peer_is_and_in_two_peers_is_or() {
        let and = np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          user: alice
      podSelector:
        matchLabels:
          role: client
");
        let or = np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: or}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          user: alice
    - podSelector:
        matchLabels:
          role: client
");
        let db = at("default", "db");
        let w = world(vec![and]);
        assert!(allowed(&w, &at("alice", "client"), &db, TCP, 80));
        assert!(!allowed(&w, &at("alice", "server"), &db, TCP, 80), "alice, not a client");
        assert!(!allowed(&w, &at("bob", "client"), &db, TCP, 80), "a client, not alice's");
        let mut w = world(vec![or]);
        assert!(allowed(&w, &at("alice", "client"), &db, TCP, 80));
        assert!(allowed(&w, &at("alice", "server"), &db, TCP, 80), "any pod of alice's");
        assert!(!allowed(&w, &at("bob", "client"), &db, TCP, 80), "clients of default only");
        w.pods.push(pod("default", "client", [10, 244, 0, 9], &[("role", "client")]));
        assert!(allowed(&w, &at("default", "client"), &db, TCP, 80));
    }

    #[test]
    fn a_namespace_selector_matches_the_automatic_name_label() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: by-name}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bob}}
")]);
        assert!(allowed(&w, &at("bob", "client"), &at("default", "db"), TCP, 80));
        assert!(!allowed(&w, &at("alice", "client"), &at("default", "db"), TCP, 80));
    }

    #[test]
    fn end_port_range() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: multi-port-egress
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
    - Egress
  egress:
    - to:
        - ipBlock:
            cidr: 10.0.0.0/24
      ports:
        - protocol: TCP
          port: 32000
          endPort: 32768
")]);
        let db = at("default", "db");
        let dst = ip([10, 0, 0, 1]);
        assert!(!allowed(&w, &db, &dst, TCP, 31999));
        assert!(allowed(&w, &db, &dst, TCP, 32000));
        assert!(allowed(&w, &db, &dst, TCP, 32500));
        assert!(allowed(&w, &db, &dst, TCP, 32768));
        assert!(!allowed(&w, &db, &dst, TCP, 32769));
        assert!(!allowed(&w, &db, &dst, IPPROTO_UDP, 32500));
    }

    #[test]
    fn named_ports_resolve_per_destination_pod() {
        let mut w = world(vec![
            np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: http-in}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{ports: [{port: http}, {protocol: SCTP, port: diameter}]}]
"),
            np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: http-out}
spec:
  podSelector: {matchLabels: {role: frontend}}
  policyTypes: [Egress]
  egress: [{ports: [{port: http}]}]
"),
        ]);
        w.pods[0].container_ports = vec![
            named("http", 8080, PolicyProtocol::Tcp),
            named("diameter", 3868, PolicyProtocol::Sctp),
        ];
        w.pods.push(Pod {
            container_ports: vec![named("http", 9090, PolicyProtocol::Tcp)],
            ..pod("default", "db2", [10, 244, 0, 4], &[("role", "db")])
        });
        let (db, db2) = (at("default", "db"), at("default", "db2"));
        let client = at("bob", "client");
        assert!(allowed(&w, &client, &db, TCP, 8080));
        assert!(!allowed(&w, &client, &db, TCP, 9090));
        assert!(allowed(&w, &client, &db2, TCP, 9090));
        assert!(!allowed(&w, &client, &db2, TCP, 8080));
        assert!(allowed(&w, &client, &db, IPPROTO_SCTP, 3868));
        assert!(!allowed(&w, &client, &db, TCP, 3868), "protocol must match the container port");
        // Egress: resolved against the destination, never the source.
        let fe = at("default", "frontend");
        assert!(allowed(&w, &fe, &db, TCP, 8080));
        assert!(allowed(&w, &fe, &db2, TCP, 9090));
        assert!(!allowed(&w, &fe, &db2, TCP, 8080));
        assert!(!allowed(&w, &fe, &ip(OUTSIDE), TCP, 8080), "a non-pod has no named ports");
        assert!(!allowed(&w, &fe, &at("default", "other"), TCP, 8080), "no such port there");
    }

    #[test]
    fn egress_rules_alone_default_to_both_policy_types() {
        // policyTypes left out: "all policies ... are assumed to affect ingress", so the
        // selected pods lose all ingress as well.
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only-rules}
spec:
  podSelector: {matchLabels: {role: db}}
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}]}]
")]);
        let db = at("default", "db");
        assert!(allowed(&w, &db, &ip([10, 0, 0, 1]), TCP, 80));
        assert!(!allowed(&w, &db, &ip(OUTSIDE), TCP, 80));
        assert!(!allowed(&w, &at("default", "frontend"), &db, TCP, 80), "ingress isolated");
        // Ingress rules alone do not isolate egress.
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ingress-rules}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [{podSelector: {}}]}]
")]);
        assert!(allowed(&w, &db, &ip(OUTSIDE), TCP, 80));
    }

    #[test]
    fn absent_from_allows_everyone_empty_rules_allow_no_one() {
        let absent_from = np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: absent-from}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{ports: [{port: 80}]}]
");
        let w = world(vec![absent_from]);
        let db = at("default", "db");
        assert!(allowed(&w, &ip(OUTSIDE), &db, TCP, 80), "any source, non-pods included");
        assert!(allowed(&w, &at("bob", "client"), &db, TCP, 80));
        assert!(!allowed(&w, &at("bob", "client"), &db, TCP, 81));
        let empty_from = np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empty-from}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [], ports: [{port: 80}]}]
");
        assert!(allowed(&world(vec![empty_from]), &ip(OUTSIDE), &db, TCP, 80));
        let no_rules = np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: no-rules}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: []
");
        assert!(!allowed(&world(vec![no_rules]), &ip(OUTSIDE), &db, TCP, 80));
    }

    #[test]
    fn ports_limit_protocols_icmp_needs_a_rule_without_ports() {
        let w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: udp-any}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{ports: [{protocol: UDP}]}]
")]);
        let db = at("default", "db");
        assert!(allowed(&w, &ip(OUTSIDE), &db, IPPROTO_UDP, 1));
        assert!(allowed(&w, &ip(OUTSIDE), &db, IPPROTO_UDP, 65535));
        assert!(!allowed(&w, &ip(OUTSIDE), &db, TCP, 53));
        assert!(!allowed(&w, &ip(OUTSIDE), &db, IPPROTO_ICMP, 0));
    }

    #[test]
    fn host_network_and_finished_pods_are_plain_addresses() {
        let mut w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 192.168.0.0/16}}]}]
  egress: [{to: [{podSelector: {}}]}]
")]);
        w.pods.push(Pod { host_network: true, ..pod("default", "agent", [192, 168, 1, 1], &[]) });
        w.pods.push(Pod {
            phase: PodPhase::Succeeded,
            ..pod("default", "job", [10, 244, 0, 8], &[])
        });
        let (agent, job, db) = (at("default", "agent"), at("default", "job"), at("default", "db"));
        // Not isolated: egress from the host-network pod is open...
        assert_eq!(verdict(&w, &agent, &ip(OUTSIDE), TCP, 1).egress, DirVerdict::NotIsolated);
        assert!(allowed(&w, &agent, &ip(OUTSIDE), TCP, 1));
        // ...and its (node) IP is matched by ipBlocks only, not by pod selectors.
        assert!(allowed(&w, &agent, &db, TCP, 1));
        assert!(!allowed(&w, &db, &agent, TCP, 1), "podSelector {{}} does not match it");
        // A finished pod is neither isolated nor selected.
        assert!(allowed(&w, &job, &ip(OUTSIDE), TCP, 1));
        assert!(!allowed(&w, &job, &db, TCP, 1));
        assert!(allowed(&w, &at("default", "frontend"), &db, TCP, 1));
        assert_eq!(w.addr_of(Ipv4Addr::new(10, 244, 0, 8)), ip([10, 244, 0, 8]));
        assert_eq!(w.addr_of(Ipv4Addr::new(10, 244, 0, 1)), db);
    }

    #[test]
    fn pods_of_unknown_namespaces_match_no_namespace_selector() {
        let mut w = world(vec![np("
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all-namespaces}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}}]}]
")]);
        w.pods.push(pod("ghost", "p", [10, 244, 9, 9], &[]));
        assert!(allowed(&w, &at("bob", "client"), &at("default", "db"), TCP, 1));
        assert!(!allowed(&w, &at("ghost", "p"), &at("default", "db"), TCP, 1));
    }

    #[test]
    fn a_world_from_the_index() {
        let mut index = Index::new();
        let mut policy: NetworkPolicy = serde_yaml::from_str(TEST_NETWORK_POLICY).expect("yaml");
        policy.metadata.namespace = Some("default".into());
        index.apply(policy);
        let w = World::from_index(&index);
        assert_eq!(w.policies, vec![np(TEST_NETWORK_POLICY)]);
    }
}
