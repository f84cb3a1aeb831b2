//! The control plane the lab plays: pure state, no netns and no I/O.
//!
//! ```text
//!  YAML --parse--> Object --apply/delete--> ControlPlane --cluster()--> Cluster --to_yaml--> cluster.yaml
//!                                            (inputs + IP                (what an API server
//!                                             assignments)                would hold)
//! ```
//!
//! [`ControlPlane`] keeps the objects as they were given plus the addresses it assigned;
//! [`ControlPlane::cluster`] derives what the API server and its controllers would show:
//! scheduled, running pods; services with ClusterIPs; EndpointSlices; the node;
//! NetworkPolicies as given; namespaces with their `kubernetes.io/metadata.name`. Deriving
//! from scratch each time (rather than patching) keeps the output a pure function of the
//! inputs, so it is sorted, stable, and written only when it really changed.
//!
//! Addresses are the one piece of history: a pod keeps its IP and a service its ClusterIP
//! for as long as it exists, and addresses are never handed out twice in a run, so a
//! recreated pod shows up as a new endpoint, as it would in a cluster.
//!
//! Scheduling is the pod's own `spec.nodeName`, as if the scheduler had already bound it:
//! a pod without one runs on the first node (`lab-node`), one naming a node the lab does
//! not have is refused, and a pod cannot move (the field is immutable in Kubernetes too).
//! Each node hands out the pod IPs of its own pod CIDR ([`Topology::pod_hosts`]).
mod parse;
mod render;
mod slices;

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::{Deserialize, Serialize};

pub use parse::{Object, ParseError, parse};
pub use render::{Cluster, NAMESPACE_NAME_LABEL};

use crate::{
    naming::{self, FIRST_SERVICE_HOST, LAST_HOST},
    topology::{self, Topology},
};

/// Pod annotation that makes the pod's Ready condition False when set to `"false"`.
pub const READY_ANNOTATION: &str = "lab.nodeplane.io/ready";

/// Value of `endpointslice.kubernetes.io/managed-by` on the slices the lab derives.
pub const MANAGED_BY: &str = "lab.nodeplane.io";

/// The kinds the lab accepts as input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets APIs take either a `Kind` or a kubectl-style name.
impl AsRef<str> for Kind {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Accepts what `kubectl` accepts: any case, singular, plural and short names.
impl FromStr for Kind {
    type Err = ControlPlaneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "namespace" | "namespaces" | "ns" => Ok(Kind::Namespace),
            "pod" | "pods" | "po" => Ok(Kind::Pod),
            "service" | "services" | "svc" => Ok(Kind::Service),
            "endpointslice" | "endpointslices" => Ok(Kind::EndpointSlice),
            "networkpolicy" | "networkpolicies" | "netpol" => Ok(Kind::NetworkPolicy),
            _ => Err(ControlPlaneError::UnknownKind(s.to_string())),
        }
    }
}

/// `namespace/name`; the namespace is empty for cluster-scoped objects.
///
/// It serializes as that string so maps keyed by it stay JSON objects in `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl From<ObjectKey> for String {
    fn from(key: ObjectKey) -> String {
        key.to_string()
    }
}

impl TryFrom<String> for ObjectKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let (namespace, name) = s.split_once('/').ok_or_else(|| format!("{s:?} is not ns/name"))?;
        Ok(ObjectKey::new(namespace, name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(
        "unknown kind {0:?} (expected namespace, pod, service, endpointslice or networkpolicy)"
    )]
    UnknownKind(String),
    #[error("{kind} {key} not found")]
    NotFound { kind: Kind, key: ObjectKey },
    /// Names end up in netns names and file names, so they must be DNS-1123 like Kubernetes'.
    #[error(
        "{kind} {key}: {what} {value:?} is not a valid name (lowercase letters, digits, '-', '.')"
    )]
    InvalidName { kind: Kind, key: ObjectKey, what: &'static str, value: String },
    #[error("pods {a} and {b} would share the netns name {netns}")]
    NetnsClash { a: ObjectKey, b: ObjectKey, netns: String },
    #[error("no pod IPs left in {cidr} for pod {key} (addresses are not reused within a run)")]
    PodIpsExhausted { key: ObjectKey, cidr: String },
    #[error(
        "no ClusterIPs left in {cidr} for service {key} (addresses are not reused within a run)"
    )]
    ServiceIpsExhausted { key: ObjectKey, cidr: String },
    #[error("service {key}: clusterIP {value:?} is not an IPv4 address or \"None\"")]
    InvalidClusterIp { key: ObjectKey, value: String },
    #[error("service {key}: clusterIP {ip} is already allocated to {owner}")]
    ClusterIpInUse { key: ObjectKey, ip: Ipv4Addr, owner: ObjectKey },
    #[error("EndpointSlice {key} is given in the input but also derived from its Service")]
    SliceClash { key: ObjectKey },
    #[error("{kind} {key}: label {label:?} is not a valid label key or value")]
    InvalidLabel { kind: Kind, key: ObjectKey, label: String },
    #[error("{kind} objects carry no labels the lab can change")]
    NotLabelable { kind: Kind },
    #[error("pod {key}: spec.nodeName {node:?} is not a node of the lab ({nodes})")]
    UnknownNode { key: ObjectKey, node: String, nodes: String },
    #[error(
        "pod {key}: spec.nodeName cannot change from {from:?} to {to:?} (delete the pod first)"
    )]
    NodeChanged { key: ObjectKey, from: String, to: String },
}

/// A lab's control-plane state: input objects and the addresses assigned to them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlPlane {
    slot: u8,
    /// How many nodes, and how joined; fixed for the lab's life.
    #[serde(default)]
    topology: Topology,
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<ObjectKey, Pod>,
    services: BTreeMap<ObjectKey, Service>,
    /// Hand-written slices (for Services without a selector), passed through unchanged.
    endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Passed through unchanged: enforcing them is the agent's job, not the lab's.
    #[serde(default)]
    network_policies: BTreeMap<ObjectKey, NetworkPolicy>,
    pod_ips: BTreeMap<ObjectKey, Ipv4Addr>,
    service_ips: BTreeMap<ObjectKey, Ipv4Addr>,
    /// Next host number to try; only ever grows, which is what makes addresses unique
    /// within a run. The first node's; the others' are in `next_pod_host_of`.
    next_pod_host: u16,
    next_service_host: u16,
    /// Next pod host number of each node after the first (underlay labs).
    #[serde(default)]
    next_pod_host_of: BTreeMap<u8, u16>,
}

/// What a Service's `spec.clusterIP` asks for.
enum ClusterIpRequest {
    Allocate,
    Headless,
    Fixed(Ipv4Addr),
}

impl ControlPlane {
    /// The control plane of a single-node lab.
    pub fn new(slot: u8) -> Self {
        ControlPlane::with_topology(slot, Topology::Single)
    }

    /// The control plane of a lab shaped as `topology`.
    pub fn with_topology(slot: u8, topology: Topology) -> Self {
        ControlPlane {
            slot,
            topology,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
            network_policies: BTreeMap::new(),
            pod_ips: BTreeMap::new(),
            service_ips: BTreeMap::new(),
            next_pod_host: (*topology.pod_hosts(0).start()).into(),
            next_service_host: FIRST_SERVICE_HOST.into(),
            next_pod_host_of: BTreeMap::new(),
        }
    }

    pub fn slot(&self) -> u8 {
        self.slot
    }

    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// The index of the node the pod runs on (see the module docs), whether or not it has
    /// been applied.
    pub fn node_of(&self, key: &ObjectKey, pod: &Pod) -> Result<u8, ControlPlaneError> {
        let name = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("");
        if name.is_empty() {
            return Ok(0);
        }
        self.topology.node_index(name).ok_or_else(|| ControlPlaneError::UnknownNode {
            key: key.clone(),
            node: name.to_string(),
            nodes: self.topology.indices().map(topology::node_name).collect::<Vec<_>>().join(", "),
        })
    }

    /// The node index of an applied pod.
    pub fn pod_node(&self, key: &ObjectKey) -> Option<u8> {
        self.node_of(key, self.pods.get(key)?).ok()
    }

    /// Adds or replaces objects by (kind, namespace, name). All or nothing: on error the
    /// state is unchanged.
    pub fn apply(
        &mut self,
        objects: impl IntoIterator<Item = Object>,
    ) -> Result<(), ControlPlaneError> {
        let mut next = self.clone();
        for object in objects {
            next.apply_one(object)?;
        }
        next.check_netns_names()?;
        // Deriving once catches clashes between given and derived slices now, not later.
        next.cluster()?;
        *self = next;
        Ok(())
    }

    fn apply_one(&mut self, object: Object) -> Result<(), ControlPlaneError> {
        let kind = object.kind();
        let key = object.key();
        validate_name(kind, &key)?;
        match object {
            Object::Namespace(ns) => {
                self.namespaces.insert(key.name, ns);
            }
            Object::Pod(pod) => {
                let node = self.node_of(&key, &pod)?;
                if let Some(old) = self.pod_node(&key).filter(|&old| old != node) {
                    let (from, to) = (topology::node_name(old), topology::node_name(node));
                    return Err(ControlPlaneError::NodeChanged { key, from, to });
                }
                self.assign_pod_ip(&key, node)?;
                self.pods.insert(key, pod);
            }
            Object::Service(svc) => {
                self.assign_cluster_ip(&key, &svc)?;
                self.services.insert(key, svc);
            }
            Object::EndpointSlice(slice) => {
                self.endpoint_slices.insert(key, slice);
            }
            Object::NetworkPolicy(policy) => {
                self.network_policies.insert(key, policy);
            }
        }
        Ok(())
    }

    fn assign_pod_ip(&mut self, key: &ObjectKey, node: u8) -> Result<(), ControlPlaneError> {
        if self.pod_ips.contains_key(key) {
            return Ok(());
        }
        let (slot, topology) = (self.slot, self.topology);
        let hosts = topology.pod_hosts(node);
        let next = match node {
            0 => &mut self.next_pod_host,
            n => self.next_pod_host_of.entry(n).or_insert((*hosts.start()).into()),
        };
        let ip = next_free(next, *hosts.end(), |h| naming::pod_ip(slot, h), |_| false).ok_or_else(
            || ControlPlaneError::PodIpsExhausted {
                key: key.clone(),
                cidr: topology.pod_cidr(slot, node),
            },
        )?;
        self.pod_ips.insert(key.clone(), ip);
        Ok(())
    }

    fn assign_cluster_ip(
        &mut self,
        key: &ObjectKey,
        svc: &Service,
    ) -> Result<(), ControlPlaneError> {
        match cluster_ip_request(key, svc)? {
            ClusterIpRequest::Headless => {
                self.service_ips.remove(key);
            }
            ClusterIpRequest::Fixed(ip) => {
                let owner = self.service_ips.iter().find(|&(k, &v)| v == ip && k != key);
                if let Some((owner, _)) = owner {
                    let owner = owner.clone();
                    return Err(ControlPlaneError::ClusterIpInUse { key: key.clone(), ip, owner });
                }
                self.service_ips.insert(key.clone(), ip);
            }
            ClusterIpRequest::Allocate if self.service_ips.contains_key(key) => {}
            ClusterIpRequest::Allocate => {
                let slot = self.slot;
                let taken = |ip: Ipv4Addr| self.service_ips.values().any(|&v| v == ip);
                let next = &mut self.next_service_host;
                let ip = next_free(next, LAST_HOST, |h| naming::service_ip(slot, h), taken)
                    .ok_or_else(|| ControlPlaneError::ServiceIpsExhausted {
                        key: key.clone(),
                        cidr: naming::service_cidr(slot),
                    })?;
                self.service_ips.insert(key.clone(), ip);
            }
        }
        Ok(())
    }

    /// `np{N}-{ns}-{name}` is ambiguous when names contain dashes (`a-b/c` vs `a/b-c`).
    fn check_netns_names(&self) -> Result<(), ControlPlaneError> {
        let mut seen: BTreeMap<String, &ObjectKey> = BTreeMap::new();
        for key in self.pods.keys() {
            let netns = naming::pod_netns(self.slot, &key.namespace, &key.name);
            if let Some(a) = seen.insert(netns.clone(), key) {
                return Err(ControlPlaneError::NetnsClash { a: a.clone(), b: key.clone(), netns });
            }
        }
        Ok(())
    }

    /// Removes one object. Deleting a Namespace removes everything in it, as in Kubernetes.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> Result<(), ControlPlaneError> {
        let not_found = || ControlPlaneError::NotFound { kind, key: key.clone() };
        match kind {
            Kind::Namespace => {
                let name = &key.name;
                let used = self.namespaces_in_use().contains(name);
                if self.namespaces.remove(name).is_none() && !used {
                    return Err(not_found());
                }
                self.pods.retain(|k, _| &k.namespace != name);
                self.pod_ips.retain(|k, _| &k.namespace != name);
                self.services.retain(|k, _| &k.namespace != name);
                self.service_ips.retain(|k, _| &k.namespace != name);
                self.endpoint_slices.retain(|k, _| &k.namespace != name);
                self.network_policies.retain(|k, _| &k.namespace != name);
            }
            Kind::Pod => {
                self.pods.remove(key).ok_or_else(not_found)?;
                self.pod_ips.remove(key);
            }
            Kind::Service => {
                self.services.remove(key).ok_or_else(not_found)?;
                self.service_ips.remove(key);
            }
            Kind::EndpointSlice => {
                self.endpoint_slices.remove(key).ok_or_else(not_found)?;
            }
            Kind::NetworkPolicy => {
                self.network_policies.remove(key).ok_or_else(not_found)?;
            }
        }
        Ok(())
    }

    /// Changes the labels of a pod or a namespace as `kubectl label --overwrite` does:
    /// `(key, Some(value))` sets a label, `(key, None)` removes it. A namespace that holds
    /// objects but was never declared gets a Namespace object of its own. All or nothing.
    pub fn label(
        &mut self,
        kind: Kind,
        key: &ObjectKey,
        changes: &[(&str, Option<&str>)],
    ) -> Result<(), ControlPlaneError> {
        let not_found = || ControlPlaneError::NotFound { kind, key: key.clone() };
        for &(label, value) in changes {
            if !valid_label_key(label) || !value.is_none_or(valid_label_value) {
                let label = format!("{label}={}", value.unwrap_or("-"));
                return Err(ControlPlaneError::InvalidLabel { kind, key: key.clone(), label });
            }
        }
        let metadata = match kind {
            Kind::Pod => &mut self.pods.get_mut(key).ok_or_else(not_found)?.metadata,
            Kind::Namespace => {
                if !self.namespaces_in_use().contains(&key.name) {
                    return Err(not_found());
                }
                let ns = self.namespaces.entry(key.name.clone()).or_insert_with(|| Namespace {
                    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: Some(key.name.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                });
                &mut ns.metadata
            }
            _ => return Err(ControlPlaneError::NotLabelable { kind }),
        };
        let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
        for &(label, value) in changes {
            match value {
                Some(value) => labels.insert(label.to_string(), value.to_string()),
                None => labels.remove(label),
            };
        }
        Ok(())
    }

    /// Sets [`READY_ANNOTATION`] on a pod, which flips its Ready condition.
    pub fn set_pod_ready(&mut self, key: &ObjectKey, ready: bool) -> Result<(), ControlPlaneError> {
        let pod = self
            .pods
            .get_mut(key)
            .ok_or_else(|| ControlPlaneError::NotFound { kind: Kind::Pod, key: key.clone() })?;
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(READY_ANNOTATION.to_string(), ready.to_string());
        Ok(())
    }

    /// Input pods, sorted by key.
    pub fn pods(&self) -> impl Iterator<Item = (&ObjectKey, &Pod)> {
        self.pods.iter()
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(key)
    }

    /// Input NetworkPolicies, sorted by key.
    pub fn network_policies(&self) -> impl Iterator<Item = (&ObjectKey, &NetworkPolicy)> {
        self.network_policies.iter()
    }

    /// Input services, sorted by key.
    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Service)> {
        self.services.iter()
    }

    pub fn pod_ip(&self, key: &ObjectKey) -> Option<Ipv4Addr> {
        self.pod_ips.get(key).copied()
    }

    /// The ClusterIP; `None` for headless services and unknown ones.
    pub fn service_ip(&self, key: &ObjectKey) -> Option<Ipv4Addr> {
        self.service_ips.get(key).copied()
    }

    /// Every namespace that is declared or holds an object, plus `default`.
    fn namespaces_in_use(&self) -> std::collections::BTreeSet<String> {
        let keys = self
            .pods
            .keys()
            .chain(self.services.keys())
            .chain(self.endpoint_slices.keys())
            .chain(self.network_policies.keys());
        keys.map(|k| k.namespace.clone())
            .chain(self.namespaces.keys().cloned())
            .chain(["default".to_string()])
            .collect()
    }
}

/// The first host number from `*next` up to `last` whose address is not `taken`; advances
/// `*next` past it. Bounded by the size of a /24.
fn next_free(
    next: &mut u16,
    last: u8,
    address: impl Fn(u8) -> Ipv4Addr,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Option<Ipv4Addr> {
    while let Ok(host) = u8::try_from(*next) {
        if host > last {
            break;
        }
        *next += 1;
        let ip = address(host);
        if !taken(ip) {
            return Some(ip);
        }
    }
    None
}

fn cluster_ip_request(
    key: &ObjectKey,
    svc: &Service,
) -> Result<ClusterIpRequest, ControlPlaneError> {
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Ok(ClusterIpRequest::Headless);
    }
    match spec.and_then(|s| s.cluster_ip.as_deref()) {
        None | Some("") => Ok(ClusterIpRequest::Allocate),
        Some("None") => Ok(ClusterIpRequest::Headless),
        Some(value) => value.parse().map(ClusterIpRequest::Fixed).map_err(|_| {
            ControlPlaneError::InvalidClusterIp { key: key.clone(), value: value.to_string() }
        }),
    }
}

fn validate_name(kind: Kind, key: &ObjectKey) -> Result<(), ControlPlaneError> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    let parts = [("name", &key.name), ("namespace", &key.namespace)];
    for (what, value) in parts {
        if (what == "name" || kind != Kind::Namespace) && !valid(value) {
            let (key, value) = (key.clone(), value.clone());
            return Err(ControlPlaneError::InvalidName { kind, key, what, value });
        }
    }
    Ok(())
}

/// `[prefix/]name`: a DNS subdomain prefix, a name of up to 63 alphanumerics, '-', '_'
/// and '.' that starts and ends alphanumeric (apimachinery's `IsQualifiedName`).
fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// Empty, or up to 63 alphanumerics, '-', '_' and '.' starting and ending alphanumeric.
fn valid_label_value(value: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_none_or(u8::is_ascii_alphanumeric);
    value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && edge(value.as_bytes().first())
        && edge(value.as_bytes().last())
}

#[cfg(test)]
mod tests;
