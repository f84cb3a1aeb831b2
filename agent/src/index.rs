//! The synchronous index: k8s objects in, validated [`model`] types out.
//!
//! Sources feed [`Event`]s; the index keeps the latest model of every object, kubert
//! style (`apply` / `delete` / `reset`, no async, no I/O), so everything downstream is a
//! pure function of it and unit tests drive it by calling `apply` directly.
//!
//! Conversion is where validation happens. What the datapath cannot program is skipped
//! here, once, with one `warn!` naming the object and a [`SkipReason`]:
//!
//! | object        | skipped entirely (`debug!`, by design)                     | skipped with a warning                                   |
//! |---------------|------------------------------------------------------------|----------------------------------------------------------|
//! | Service       | `service-proxy-name` label, headless, ExternalName, no clusterIP, IPv6-only | invalid clusterIP (whole Service); port with SCTP/unknown protocol or bad number (that port); unknown `sessionAffinity` (repaired: none) or `timeoutSeconds` outside 1..=86400 (repaired: clamped) |
//! | EndpointSlice | addressType other than IPv4                                | no `service-name` label (whole slice); bad port (that port); bad address (that endpoint) |
//! | NetworkPolicy | –                                                          | invalid peer or port (that peer or port, fail closed; see [`policy::convert`](crate::policy::convert)) |
//!
//! Skips are remembered per object: re-applying an unchanged object does not warn again,
//! and applying a fixed version (or deleting the object) clears them. The current skips are
//! counted by [`SkipReason::label`] for metrics.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{core::v1 as corev1, discovery::v1 as discoveryv1};

use crate::{
    model::{
        ContainerPort, Endpoint, EndpointPort, EndpointSlice, ExternalAccess, Ipv4Cidr, Namespace,
        Node, NodeAddress, Pod, PodPhase, Protocol, Service, ServicePort, SessionAffinity,
        parse_ipv4_canonical,
    },
    policy::{
        Policy, PolicyProtocol,
        convert::{PolicyIssue, convert_policy},
    },
    source::{Event, Kind, Object, ObjectKey},
};

/// kube-proxy semantics: a Service with this label is handled by another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why (part of) an object was not programmed. Each variant is a metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("clusterIP {ip:?} is not a canonical IP address; skipping the Service")]
    InvalidClusterIp { ip: String },
    #[error("port {port}: protocol not supported; skipping the port")]
    UnsupportedProtocol { port: String },
    #[error("port {port}: invalid port number {number}; skipping the port")]
    InvalidPort { port: String, number: String },
    #[error("no {SERVICE_NAME_LABEL} label; skipping the slice")]
    MissingServiceName,
    #[error("endpoint address {address:?} is not a canonical IPv4 address; skipping the endpoint")]
    InvalidEndpointAddress { address: String },
    #[error("endpoint address {address} is {why}, never a pod; skipping the endpoint")]
    ForbiddenEndpointAddress { address: String, why: &'static str },
    #[error("{SERVICE_NAME_LABEL} {name:?} is not a valid Service name; skipping the slice")]
    InvalidServiceName { name: String },
    #[error("sessionAffinity {value:?} is not supported; using None")]
    UnsupportedSessionAffinity { value: String },
    #[error(
        "sessionAffinityConfig.clientIP.timeoutSeconds {timeout} is outside 1..=86400; using {used}"
    )]
    InvalidAffinityTimeout { timeout: i32, used: u32 },
    /// A NetworkPolicy part dropped or repaired, fail closed (never widening the policy).
    #[error("{0}")]
    InvalidPolicyPart(PolicyIssue),
    #[error("{field} {value:?} is not a canonical IPv4 address or CIDR; ignoring it")]
    InvalidExternalAddress { field: &'static str, value: String },
    #[error("port {port}: invalid nodePort {number}; the port gets no NodePort")]
    InvalidNodePort { port: String, number: i32 },
}

impl SkipReason {
    /// Stable, low-cardinality name for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            SkipReason::InvalidClusterIp { .. } => "invalid_cluster_ip",
            SkipReason::UnsupportedProtocol { .. } => "unsupported_protocol",
            SkipReason::InvalidPort { .. } => "invalid_port",
            SkipReason::MissingServiceName => "missing_service_name",
            SkipReason::InvalidEndpointAddress { .. } => "invalid_endpoint_address",
            SkipReason::ForbiddenEndpointAddress { .. } => "forbidden_endpoint_address",
            SkipReason::InvalidServiceName { .. } => "invalid_service_name",
            SkipReason::UnsupportedSessionAffinity { .. } => "unsupported_session_affinity",
            SkipReason::InvalidAffinityTimeout { .. } => "invalid_affinity_timeout",
            SkipReason::InvalidPolicyPart(_) => "invalid_policy_part",
            SkipReason::InvalidExternalAddress { .. } => "invalid_external_address",
            SkipReason::InvalidNodePort { .. } => "invalid_node_port",
        }
    }
}

/// The latest validated model of every object the sources reported.
#[derive(Debug, Default)]
pub struct Index {
    services: BTreeMap<ObjectKey, Service>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Service key -> keys of the slices labelled with it.
    slices_by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    pods: BTreeMap<ObjectKey, Pod>,
    namespaces: BTreeMap<ObjectKey, Namespace>,
    nodes: BTreeMap<ObjectKey, Node>,
    network_policies: BTreeMap<ObjectKey, Policy>,
    skips: BTreeMap<(Kind, ObjectKey), Vec<SkipReason>>,
    revision: u64,
    /// What changed for the service maps since [`Index::take_dirty`].
    dirty: Dirty,
}

/// The Services whose frontends may have changed since the last [`Index::take_dirty`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// A Service itself changed (added, removed, new IPs or ports...): frontends of others
    /// may depend on it (a backend that is its ClusterIP, a frontend it now shares), so
    /// everything is to be recomputed.
    pub all: bool,
    /// Services whose EndpointSlices changed.
    pub services: BTreeSet<ObjectKey>,
    /// A Pod, Namespace or NetworkPolicy changed: the policy maps are to be recomputed.
    /// Independent of the two fields above (the service maps ignore it).
    pub policy_dirty: bool,
    /// The Pods that changed (added, replaced, deleted) since the last take.
    pub pods: BTreeSet<ObjectKey>,
    /// A Namespace or NetworkPolicy changed: the policy maps cannot be updated from the
    /// changed Pods alone.
    pub policy_inputs: bool,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Apply(obj) => self.apply(obj),
            Event::Delete(kind, key) => self.delete(kind, &key),
            Event::Reset(kind, objs) => self.reset(kind, objs),
            Event::Retain(kind, keys) => self.retain(kind, &keys),
        }
    }

    /// Creates or replaces one object.
    pub fn apply(&mut self, obj: impl Into<Object>) {
        let obj = obj.into();
        let kind = obj.kind();
        let key = obj.key();
        let mut skips = Vec::new();
        let changed = match &obj {
            Object::Service(svc) => {
                let model = convert_service(&key, svc, &mut skips);
                self.store_service(&key, model)
            }
            Object::EndpointSlice(slice) => {
                let model = convert_slice(&key, slice, &mut skips);
                self.store_slice(&key, model)
            }
            Object::Pod(pod) => {
                let changed = store(&mut self.pods, &key, Some(convert_pod(&key, pod)));
                self.dirty.policy_dirty |= changed;
                if changed {
                    self.dirty.pods.insert(key.clone());
                }
                changed
            }
            Object::Namespace(ns) => {
                let changed = store(&mut self.namespaces, &key, Some(convert_namespace(&key, ns)));
                self.dirty.policy_dirty |= changed;
                self.dirty.policy_inputs |= changed;
                changed
            }
            Object::Node(node) => {
                let changed = store(&mut self.nodes, &key, Some(convert_node(&key, node)));
                // NodePorts live on the node's addresses; masquerade on its pod CIDR.
                self.dirty.all |= changed;
                changed
            }
            Object::NetworkPolicy(np) => {
                let (model, issues) = convert_policy(&key, np.spec.as_ref());
                skips.extend(issues.into_iter().map(SkipReason::InvalidPolicyPart));
                let changed = store(&mut self.network_policies, &key, Some(model));
                self.dirty.policy_dirty |= changed;
                self.dirty.policy_inputs |= changed;
                changed
            }
        };
        self.record_skips(kind, &key, skips);
        if changed {
            self.revision += 1;
        }
    }

    /// Removes one object; unknown keys are ignored.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) {
        self.skips.remove(&(kind, key.clone()));
        let changed = match kind {
            Kind::Service => self.store_service(key, None),
            Kind::EndpointSlice => self.store_slice(key, None),
            Kind::Pod => store(&mut self.pods, key, None),
            Kind::Namespace => store(&mut self.namespaces, key, None),
            Kind::Node => {
                let changed = store(&mut self.nodes, key, None);
                self.dirty.all |= changed;
                changed
            }
            Kind::NetworkPolicy => store(&mut self.network_policies, key, None),
        };
        if matches!(kind, Kind::Pod | Kind::Namespace | Kind::NetworkPolicy) {
            self.dirty.policy_dirty |= changed;
        }
        if changed {
            match kind {
                Kind::Pod => {
                    self.dirty.pods.insert(key.clone());
                }
                Kind::Namespace | Kind::NetworkPolicy => self.dirty.policy_inputs = true,
                _ => {}
            }
        }
        if changed {
            self.revision += 1;
        }
    }

    /// Replaces every object of `kind` with `objs`: what is not listed is deleted.
    pub fn reset(&mut self, kind: Kind, mut objs: Vec<Object>) {
        objs.retain(|obj| {
            let same = obj.kind() == kind;
            if !same {
                tracing::warn!(reset = %kind, kind = %obj.kind(), object = %obj.key(), "ignoring object of another kind in a reset");
            }
            same
        });
        let keep: BTreeSet<ObjectKey> = objs.iter().map(Object::key).collect();
        self.retain(kind, &keep);
        for obj in objs {
            self.apply(obj);
        }
    }

    /// Deletes every object of `kind` (skipped ones included) whose key is not in `keep`.
    pub fn retain(&mut self, kind: Kind, keep: &BTreeSet<ObjectKey>) {
        let known: Vec<&ObjectKey> = match kind {
            Kind::Service => self.services.keys().collect(),
            Kind::EndpointSlice => self.slices.keys().collect(),
            Kind::Pod => self.pods.keys().collect(),
            Kind::Namespace => self.namespaces.keys().collect(),
            Kind::Node => self.nodes.keys().collect(),
            Kind::NetworkPolicy => self.network_policies.keys().collect(),
        };
        let skipped = self.skips.keys().filter(|(k, _)| *k == kind).map(|(_, key)| key);
        let stale: BTreeSet<ObjectKey> =
            known.into_iter().chain(skipped).filter(|k| !keep.contains(*k)).cloned().collect();
        for key in stale {
            self.delete(kind, &key);
        }
    }

    /// Increases whenever a model object changes; skip-only changes do not count.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.values()
    }

    /// The slices labelled with `service` (same namespace), in key order.
    pub fn slices_for(&self, service: &ObjectKey) -> impl Iterator<Item = &EndpointSlice> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.get(key))
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(key)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(&ObjectKey::cluster(name))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// The converted policies, in key order.
    pub fn network_policies(&self) -> impl Iterator<Item = &Policy> {
        self.network_policies.values()
    }

    pub fn network_policy(&self, key: &ObjectKey) -> Option<&Policy> {
        self.network_policies.get(key)
    }

    /// Number of objects of `kind` held (skipped objects not counted).
    pub fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.slices.len(),
            Kind::Pod => self.pods.len(),
            Kind::Namespace => self.namespaces.len(),
            Kind::Node => self.nodes.len(),
            Kind::NetworkPolicy => self.network_policies.len(),
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(&ObjectKey::cluster(name))
    }

    /// Objects with current skips and why.
    pub fn skipped(&self) -> impl Iterator<Item = (Kind, &ObjectKey, &[SkipReason])> {
        self.skips.iter().map(|((kind, key), reasons)| (*kind, key, reasons.as_slice()))
    }

    /// Current skips per [`SkipReason::label`].
    pub fn skipped_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for reason in self.skips.values().flatten() {
            *counts.entry(reason.label()).or_default() += 1;
        }
        counts
    }

    /// Warns about skips this object did not already have; forgets the ones it lost.
    fn record_skips(&mut self, kind: Kind, key: &ObjectKey, skips: Vec<SkipReason>) {
        let old = self.skips.remove(&(kind, key.clone())).unwrap_or_default();
        for reason in skips.iter().filter(|r| !old.contains(r)) {
            tracing::warn!(kind = %kind, object = %key, reason = reason.label(), "{kind} {key}: {reason}");
        }
        if !skips.is_empty() {
            self.skips.insert((kind, key.clone()), skips);
        }
    }

    /// What changed for the service and policy maps since the last call, and forget it.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    fn store_service(&mut self, key: &ObjectKey, model: Option<Service>) -> bool {
        let changed = store(&mut self.services, key, model);
        self.dirty.all |= changed;
        changed
    }

    fn store_slice(&mut self, key: &ObjectKey, model: Option<EndpointSlice>) -> bool {
        let new_service = model.as_ref().map(EndpointSlice::service_key);
        let old_service = self.slices.get(key).map(EndpointSlice::service_key);
        if old_service != new_service {
            if let Some(old) = &old_service
                && let Some(set) = self.slices_by_service.get_mut(old)
            {
                set.remove(key);
                if set.is_empty() {
                    self.slices_by_service.remove(old);
                }
            }
            if let Some(new) = &new_service {
                self.slices_by_service.entry(new.clone()).or_default().insert(key.clone());
            }
        }
        let changed = store(&mut self.slices, key, model);
        if changed {
            self.dirty.services.extend(old_service.into_iter().chain(new_service));
        }
        changed
    }
}

/// Inserts, replaces or removes; true if the map changed.
fn store<T: PartialEq>(
    map: &mut BTreeMap<ObjectKey, T>,
    key: &ObjectKey,
    model: Option<T>,
) -> bool {
    match model {
        Some(model) => {
            if map.get(key) == Some(&model) {
                return false;
            }
            map.insert(key.clone(), model);
            true
        }
        None => map.remove(key).is_some(),
    }
}

/// How a port is named in messages: `dns/UDP`, or `53/UDP` when unnamed.
fn port_label(name: Option<&str>, number: Option<i32>, protocol: Option<&str>) -> String {
    let id = match (name.filter(|n| !n.is_empty()), number) {
        (Some(name), _) => name.to_string(),
        (None, Some(n)) => n.to_string(),
        (None, None) => "(unnamed)".to_string(),
    };
    format!("{id}/{}", protocol.unwrap_or("TCP"))
}

/// Validates a port's number and protocol; a failure skips only this port.
fn convert_port(
    name: Option<&str>,
    number: Option<i32>,
    protocol: Option<&str>,
) -> Result<(u16, Protocol), SkipReason> {
    let port = || port_label(name, number, protocol);
    let protocol = Protocol::from_k8s(protocol)
        .map_err(|_| SkipReason::UnsupportedProtocol { port: port() })?;
    let number =
        number.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0).ok_or_else(|| {
            SkipReason::InvalidPort {
                port: port(),
                number: number.map_or_else(|| "(absent)".to_string(), |n| n.to_string()),
            }
        })?;
    Ok((number, protocol))
}

fn convert_service(
    key: &ObjectKey,
    svc: &corev1::Service,
    skips: &mut Vec<SkipReason>,
) -> Option<Service> {
    let not_proxied = |why: &str| {
        tracing::debug!(kind = %Kind::Service, object = %key, "not proxied: {why}");
        None
    };
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    if labels.contains_key(SERVICE_PROXY_NAME_LABEL) {
        return not_proxied("handled by another proxy (service-proxy-name label)");
    }
    let Some(spec) = &svc.spec else {
        return not_proxied("no spec");
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return not_proxied("type ExternalName");
    }
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => return not_proxied("no clusterIP"),
    };
    if ips.contains(&"None") {
        return not_proxied("headless");
    }
    let mut cluster_ips_v4 = Vec::new();
    for ip in ips {
        if let Some(v4) = parse_ipv4_canonical(ip) {
            if !cluster_ips_v4.contains(&v4) {
                cluster_ips_v4.push(v4);
            }
        } else if ip.parse::<Ipv6Addr>().is_ok_and(|v6| v6.to_ipv4_mapped().is_none()) {
            // A genuine IPv6 address: the v6 family is not programmed (yet), not an error.
        } else {
            // Not an address, a non-canonical one, or an IPv4-mapped IPv6 (`::ffff:a.b.c.d`),
            // which the API rejects and whose meaning differs between parsers.
            skips.push(SkipReason::InvalidClusterIp { ip: ip.to_string() });
            return None;
        }
    }
    // `spec.ipFamilies` lists the families the Service has, in clusterIPs' order; honour it
    // over the addresses so an inconsistent object is not half-programmed.
    let v4_family = spec.ip_families.as_ref().is_none_or(|f| f.iter().any(|f| f == "IPv4"));
    if cluster_ips_v4.is_empty() || !v4_family {
        return not_proxied("IPv6 only");
    }
    let external_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        match convert_port(p.name.as_deref(), Some(p.port), p.protocol.as_deref()) {
            Ok((port, protocol)) => {
                let name = p.name.clone().unwrap_or_default();
                let node_port = match p.node_port.filter(|_| external_type) {
                    None => None,
                    Some(n) => match u16::try_from(n).ok().filter(|n| *n != 0) {
                        Some(n) => Some(n),
                        None => {
                            let port =
                                port_label(p.name.as_deref(), Some(p.port), p.protocol.as_deref());
                            skips.push(SkipReason::InvalidNodePort { port, number: n });
                            None
                        }
                    },
                };
                ports.push(ServicePort { name, port, protocol, node_port });
            }
            Err(reason) => skips.push(reason),
        }
    }
    Some(Service {
        key: key.clone(),
        cluster_ips_v4,
        ports,
        labels,
        selector: spec.selector.clone(),
        internal_traffic_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        session_affinity: convert_affinity(spec, skips),
        external: convert_external(svc, spec, skips),
    })
}

/// A `loadBalancerSourceRanges` entry: `a.b.c.d/n`, host bits masked as the API server's
/// `net.ParseCIDR` does (kube-proxy accepts `10.0.0.1/8` as `10.0.0.0/8`).
fn source_range(value: &str) -> Option<Ipv4Cidr> {
    let (addr, len) = value.split_once('/')?;
    let addr = parse_ipv4_canonical(addr)?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ipv4Cidr::new(Ipv4Addr::from(u32::from(addr) & mask), len)
}

/// The north-south fields of a Service. Bad addresses and ranges are dropped one by one
/// with a reason; IPv6 ones silently, as for ClusterIPs.
fn convert_external(
    svc: &corev1::Service,
    spec: &corev1::ServiceSpec,
    skips: &mut Vec<SkipReason>,
) -> ExternalAccess {
    let mut addrs = |field: &'static str, values: &mut dyn Iterator<Item = &str>| {
        let mut out = Vec::new();
        for value in values {
            match parse_ipv4_canonical(value) {
                Some(v4) if !out.contains(&v4) => out.push(v4),
                Some(_) => {}
                None if value.parse::<Ipv6Addr>().is_ok() => {}
                None => skips
                    .push(SkipReason::InvalidExternalAddress { field, value: value.to_string() }),
            }
        }
        out
    };
    let external_ips =
        addrs("externalIPs", &mut spec.external_ips.iter().flatten().map(String::as_str));
    let load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
    let lb_ingress_ips = if load_balancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        addrs(
            "status.loadBalancer.ingress.ip",
            &mut ingress.into_iter().flatten().filter_map(|i| i.ip.as_deref()),
        )
    } else {
        Vec::new()
    };
    let mut source_ranges = Vec::new();
    if load_balancer {
        for value in spec.load_balancer_source_ranges.iter().flatten() {
            let value = value.trim();
            match source_range(value) {
                Some(cidr) => source_ranges.push(cidr),
                None if value.contains(':') => {}
                None => skips.push(SkipReason::InvalidExternalAddress {
                    field: "loadBalancerSourceRanges",
                    value: value.to_string(),
                }),
            }
        }
        let listed = spec.load_balancer_source_ranges.as_ref().is_some_and(|r| !r.is_empty());
        if listed && source_ranges.is_empty() {
            // Every range was unusable: an empty list would admit everyone. Fail closed with
            // a range no packet matches from outside (0.0.0.0/32).
            source_ranges.push(Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 32).expect("valid"));
        }
        source_ranges.sort();
        source_ranges.dedup();
    }
    let traffic_policy_local = spec.external_traffic_policy.as_deref() == Some("Local")
        && (load_balancer || spec.type_.as_deref() == Some("NodePort") || !external_ips.is_empty());
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| load_balancer && traffic_policy_local)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    ExternalAccess {
        external_ips,
        lb_ingress_ips,
        traffic_policy_local,
        health_check_node_port,
        source_ranges,
    }
}

/// `spec.sessionAffinity` and its timeout. The API server only admits `None` and
/// `ClientIP` with a timeout in 1..=86400; objects that bypassed it (files, old objects)
/// are repaired rather than skipped, with a warning, since the Service itself is fine:
/// an unknown mode means no affinity, and a timeout out of range is clamped into
/// 1..=86400 (kube-proxy would pass it to iptables as is).
fn convert_affinity(spec: &corev1::ServiceSpec, skips: &mut Vec<SkipReason>) -> SessionAffinity {
    use nodeplane_common::maps::{AFFINITY_TIMEOUT_DEFAULT_S, AFFINITY_TIMEOUT_MAX_S};
    match spec.session_affinity.as_deref() {
        None | Some("None") => return SessionAffinity::None,
        Some("ClientIP") => {}
        Some(other) => {
            skips.push(SkipReason::UnsupportedSessionAffinity { value: other.to_string() });
            return SessionAffinity::None;
        }
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    let timeout_s = match timeout {
        None => AFFINITY_TIMEOUT_DEFAULT_S,
        Some(t) => {
            let used = u32::try_from(t.max(1)).unwrap_or(1).min(AFFINITY_TIMEOUT_MAX_S);
            if i64::from(t) != i64::from(used) {
                skips.push(SkipReason::InvalidAffinityTimeout { timeout: t, used });
            }
            used
        }
    };
    SessionAffinity::ClientIp { timeout_s }
}

fn convert_slice(
    key: &ObjectKey,
    slice: &discoveryv1::EndpointSlice,
    skips: &mut Vec<SkipReason>,
) -> Option<EndpointSlice> {
    if slice.address_type != "IPv4" {
        tracing::debug!(kind = %Kind::EndpointSlice, object = %key, address_type = %slice.address_type, "ignored: not IPv4");
        return None;
    }
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|n| !n.is_empty());
    let Some(service_name) = service_name else {
        skips.push(SkipReason::MissingServiceName);
        return None;
    };
    // A Service name is a DNS-1035 label. Anything else (`other-ns/web`, say) cannot name a
    // Service, least of all one in another namespace: slices only ever serve their own.
    if !is_dns1035_label(service_name) {
        skips.push(SkipReason::InvalidServiceName { name: service_name.clone() });
        return None;
    }
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        match convert_port(p.name.as_deref(), p.port, p.protocol.as_deref()) {
            Ok((port, protocol)) => {
                let name = p.name.clone().unwrap_or_default();
                ports.push(EndpointPort { name, port, protocol });
            }
            Err(reason) => skips.push(reason),
        }
    }
    let mut endpoints = Vec::new();
    for ep in &slice.endpoints {
        // kube-proxy uses the first address; the API allows exactly one today.
        let address = ep.addresses.first().map(String::as_str).unwrap_or_default();
        let Some(addr) = parse_ipv4_canonical(address) else {
            skips.push(SkipReason::InvalidEndpointAddress { address: address.to_string() });
            continue;
        };
        if let Some(why) = forbidden_endpoint(addr) {
            skips.push(SkipReason::ForbiddenEndpointAddress { address: address.to_string(), why });
            continue;
        }
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        endpoints.push(Endpoint {
            addr,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone(),
        });
    }
    Some(EndpointSlice { key: key.clone(), service_name: service_name.clone(), ports, endpoints })
}

/// Addresses the API server refuses as endpoints (`ValidateEndpointIP`): sending Service
/// traffic there would reach the node itself or nothing.
fn forbidden_endpoint(addr: std::net::Ipv4Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("unspecified")
    } else if addr.is_loopback() {
        Some("loopback")
    } else if addr.is_link_local() {
        Some("link-local")
    } else if addr.is_multicast() || addr.is_broadcast() {
        Some("multicast or broadcast")
    } else {
        None
    }
}

/// RFC 1035 label as Kubernetes checks Service names: 1-63 of `[a-z0-9-]`, starting with a
/// letter and not ending with `-`.
fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn convert_pod(key: &ObjectKey, pod: &corev1::Pod) -> Pod {
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()));
    let ip = ips.filter_map(parse_ipv4_canonical).next();
    let mut container_ports = Vec::new();
    for p in spec.into_iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten()) {
        let label = || port_label(p.name.as_deref(), Some(p.container_port), p.protocol.as_deref());
        let Ok(protocol) = PolicyProtocol::from_k8s(p.protocol.as_deref()) else {
            // Pods are not programmed from their ports; policy only matches TCP/UDP/SCTP.
            tracing::debug!(kind = %Kind::Pod, object = %key, "container port {}: protocol not supported", label());
            continue;
        };
        let Some(port) = u16::try_from(p.container_port).ok().filter(|n| *n != 0) else {
            tracing::debug!(kind = %Kind::Pod, object = %key, "container port {}: invalid number", label());
            continue;
        };
        container_ports.push(ContainerPort { name: p.name.clone(), port, protocol });
    }
    container_ports.sort();
    container_ports.dedup();
    Pod {
        key: key.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip,
        phase: PodPhase::from_k8s(status.and_then(|s| s.phase.as_deref())),
        node_name: spec.and_then(|s| s.node_name.clone()),
        container_ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

fn convert_namespace(key: &ObjectKey, ns: &corev1::Namespace) -> Namespace {
    Namespace { name: key.name.clone(), labels: ns.metadata.labels.clone().unwrap_or_default() }
}

fn convert_node(key: &ObjectKey, node: &corev1::Node) -> Node {
    let spec = node.spec.as_ref();
    let cidrs: Vec<&str> = match spec {
        Some(s) => match (&s.pod_cidrs, &s.pod_cidr) {
            (Some(cidrs), _) if !cidrs.is_empty() => cidrs.iter().map(String::as_str).collect(),
            (_, Some(cidr)) => vec![cidr.as_str()],
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    let pod_cidrs = cidrs
        .into_iter()
        .filter(|c| !c.contains(':'))
        .filter_map(|c| match c.parse::<Ipv4Cidr>() {
            Ok(cidr) => Some(cidr),
            Err(e) => {
                tracing::debug!(kind = %Kind::Node, object = %key, "ignoring podCIDR: {e}");
                None
            }
        })
        .collect();
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let addr: IpAddr = a.address.parse().ok()?;
            Some(NodeAddress { kind: a.type_.clone(), addr })
        })
        .collect();
    Node { name: key.name.clone(), pod_cidrs, addresses }
}

/// linkerd-style builders for k8s objects, shared by the tests of the modules downstream.
#[cfg(test)]
pub(crate) mod test_helpers {
    use k8s_openapi::{
        api::{
            core::v1::{Service, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::SERVICE_NAME_LABEL;

    pub fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
            labels: (!labels.is_empty())
                .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    /// A ClusterIP Service; ports are `(name, port, protocol)`, `""` meaning absent.
    pub fn mk_service(
        ns: &str,
        name: &str,
        cluster_ip: &str,
        ports: &[(&str, i32, &str)],
    ) -> Service {
        Service {
            metadata: meta(ns, name, &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.to_string()),
                cluster_ips: Some(vec![cluster_ip.to_string()]),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, proto)| ServicePort {
                            name: (!name.is_empty()).then(|| name.to_string()),
                            port: *port,
                            protocol: (!proto.is_empty()).then(|| proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An IPv4 slice of `service`; ports are `(name, port, protocol)`, `""` meaning absent.
    pub fn mk_slice(
        ns: &str,
        name: &str,
        service: &str,
        ports: &[(&str, i32, &str)],
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: meta(ns, name, &[(SERVICE_NAME_LABEL, service)]),
            address_type: "IPv4".to_string(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, proto)| EndpointPort {
                        name: (!name.is_empty()).then(|| name.to_string()),
                        port: Some(*port),
                        protocol: (!proto.is_empty()).then(|| proto.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    pub fn mk_endpoint(
        addr: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![addr.to_string()],
            conditions: Some(EndpointConditions { ready, serving, terminating }),
            ..Default::default()
        }
    }

    pub fn ready(addr: &str) -> Endpoint {
        mk_endpoint(addr, Some(true), Some(true), Some(false))
    }

    pub fn not_ready(addr: &str) -> Endpoint {
        mk_endpoint(addr, Some(false), Some(false), Some(false))
    }

    /// A terminating endpoint that is still serving (or not).
    pub fn terminating(addr: &str, serving: bool) -> Endpoint {
        mk_endpoint(addr, Some(false), Some(serving), Some(true))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::api::{core::v1 as corev1, networking::v1 as networkingv1};

    use super::{test_helpers::*, *};

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::namespaced(ns, name)
    }

    fn skips_of(index: &Index, kind: Kind, k: &ObjectKey) -> Vec<SkipReason> {
        index
            .skipped()
            .find(|(kd, key, _)| *kd == kind && *key == k)
            .map(|(_, _, r)| r.to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn service_is_converted() {
        let mut index = Index::new();
        index.apply(mk_service(
            "default",
            "web",
            "10.96.0.10",
            &[("http", 80, ""), ("dns", 53, "UDP")],
        ));
        let svc = index.service(&key("default", "web")).expect("indexed");
        assert_eq!(svc.cluster_ips_v4, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            svc.ports,
            vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    node_port: None
                },
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: None
                },
            ]
        );
        assert!(index.skipped_counts().is_empty());
    }

    #[test]
    fn services_not_proxied_are_dropped_silently() {
        let mut proxy_name = mk_service("default", "a", "10.96.0.1", &[("", 80, "")]);
        proxy_name.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "other".to_string())].into());
        let headless = mk_service("default", "b", "None", &[("", 80, "")]);
        let mut external = mk_service("default", "c", "", &[]);
        if let Some(spec) = external.spec.as_mut() {
            spec.type_ = Some("ExternalName".into());
        }
        let mut no_ip = mk_service("default", "d", "", &[("", 80, "")]);
        if let Some(spec) = no_ip.spec.as_mut() {
            spec.cluster_ip = None;
            spec.cluster_ips = None;
        }
        let v6_only = mk_service("default", "e", "fd00::1", &[("", 80, "")]);
        let mut index = Index::new();
        for svc in [proxy_name, headless, external, no_ip, v6_only] {
            index.apply(svc);
        }
        assert_eq!(index.services().count(), 0);
        assert!(index.skipped_counts().is_empty());
    }

    #[test]
    fn invalid_cluster_ips_skip_the_service_with_a_reason() {
        let mut index = Index::new();
        for (i, ip) in ["10.0.0.01", "1.2.3", "", "::ffff:10.96.0.1"].into_iter().enumerate() {
            let name = format!("s{i}");
            index.apply(mk_service("default", &name, ip, &[("", 80, "")]));
            assert_eq!(
                skips_of(&index, Kind::Service, &key("default", &name)),
                vec![SkipReason::InvalidClusterIp { ip: ip.to_string() }]
            );
        }
        assert_eq!(index.services().count(), 0);
        assert_eq!(index.skipped_counts(), BTreeMap::from([("invalid_cluster_ip", 4)]));
    }

    fn with_affinity(mode: Option<&str>, timeout: Option<i32>) -> corev1::Service {
        let mut svc = mk_service("default", "web", "10.96.0.10", &[("", 80, "")]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.session_affinity = mode.map(str::to_string);
            spec.session_affinity_config = timeout.map(|t| corev1::SessionAffinityConfig {
                client_ip: Some(corev1::ClientIPConfig { timeout_seconds: Some(t) }),
            });
        }
        svc
    }

    #[test]
    fn session_affinity_is_parsed_with_its_timeout_or_the_default() {
        let cases = [
            (None, None, SessionAffinity::None),
            (Some("None"), Some(30), SessionAffinity::None),
            (Some("ClientIP"), Some(1), SessionAffinity::ClientIp { timeout_s: 1 }),
            (Some("ClientIP"), Some(86_400), SessionAffinity::ClientIp { timeout_s: 86_400 }),
            (Some("ClientIP"), None, SessionAffinity::ClientIp { timeout_s: 10_800 }),
        ];
        for (mode, timeout, want) in cases {
            let mut index = Index::new();
            index.apply(with_affinity(mode, timeout));
            let svc = index.service(&key("default", "web")).expect("indexed");
            assert_eq!(svc.session_affinity, want, "{mode:?} {timeout:?}");
            assert!(index.skipped_counts().is_empty(), "{mode:?} {timeout:?}");
        }
        // A config without a clientIP part is the default timeout too.
        let mut svc = with_affinity(Some("ClientIP"), None);
        if let Some(spec) = svc.spec.as_mut() {
            spec.session_affinity_config = Some(corev1::SessionAffinityConfig { client_ip: None });
        }
        let mut index = Index::new();
        index.apply(svc);
        let got = index.service(&key("default", "web")).map(|s| s.session_affinity);
        assert_eq!(got, Some(SessionAffinity::ClientIp { timeout_s: 10_800 }));
    }

    #[test]
    fn out_of_range_affinity_timeouts_are_clamped_with_a_reason() {
        for (timeout, used) in [(0, 1), (-5, 1), (86_401, 86_400), (i32::MAX, 86_400)] {
            let mut index = Index::new();
            index.apply(with_affinity(Some("ClientIP"), Some(timeout)));
            let svc = index.service(&key("default", "web")).expect("the Service is kept");
            assert_eq!(svc.session_affinity, SessionAffinity::ClientIp { timeout_s: used });
            assert_eq!(
                skips_of(&index, Kind::Service, &key("default", "web")),
                vec![SkipReason::InvalidAffinityTimeout { timeout, used }]
            );
            assert_eq!(index.skipped_counts(), BTreeMap::from([("invalid_affinity_timeout", 1)]));
        }
        // An unknown mode: no affinity, with a reason; fixing it clears the reason.
        let mut index = Index::new();
        index.apply(with_affinity(Some("clientip"), Some(10)));
        let svc = index.service(&key("default", "web")).expect("the Service is kept");
        assert_eq!(svc.session_affinity, SessionAffinity::None);
        assert_eq!(index.skipped_counts(), BTreeMap::from([("unsupported_session_affinity", 1)]));
        index.apply(with_affinity(Some("ClientIP"), Some(10)));
        assert!(index.skipped_counts().is_empty());
    }

    #[test]
    fn retain_deletes_what_was_not_relisted_including_skipped_objects() {
        let mut index = Index::new();
        index.apply(mk_service("d", "a", "10.96.0.1", &[("", 80, "")]));
        index.apply(mk_service("d", "b", "10.96.0.2", &[("", 80, "")]));
        index.apply(mk_service("d", "bad", "10.96.0.01", &[("", 80, "")]));
        index.apply(mk_slice("d", "a-1", "a", &[("", 8080, "")], vec![ready("10.0.0.1")]));
        let keep = BTreeSet::from([key("d", "a")]);
        index.handle(Event::Retain(Kind::Service, keep));
        let names: Vec<_> = index.services().map(|s| s.key.name.clone()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(index.skipped().count(), 0, "the skipped Service is gone too");
        assert_eq!(index.slices().count(), 1, "other kinds untouched");
    }

    #[test]
    fn endpoints_the_api_forbids_are_skipped_one_by_one() {
        let mut index = Index::new();
        let addrs = ["0.0.0.0", "127.0.0.1", "169.254.169.254", "224.0.0.1", "10.0.0.7"];
        let eps = addrs.iter().map(|a| ready(a)).collect();
        index.apply(mk_slice("default", "web-1", "web", &[("http", 8080, "")], eps));
        let slice = index.slices_for(&key("default", "web")).next().expect("slice kept");
        let kept: Vec<_> = slice.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(kept, ["10.0.0.7"]);
        let reasons = skips_of(&index, Kind::EndpointSlice, &key("default", "web-1"));
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons.iter().all(|r| r.label() == "forbidden_endpoint_address"), "{reasons:?}");
        assert!(reasons[2].to_string().contains("169.254.169.254 is link-local"), "{}", reasons[2]);
    }

    #[test]
    fn a_slice_cannot_name_a_service_elsewhere() {
        let mut index = Index::new();
        for (i, name) in ["default/web", "Web", "-web", "web-", &"w".repeat(64)].iter().enumerate()
        {
            index.apply(mk_slice("evil", &format!("s{i}"), name, &[], vec![ready("10.0.0.9")]));
            assert_eq!(
                skips_of(&index, Kind::EndpointSlice, &key("evil", &format!("s{i}"))),
                vec![SkipReason::InvalidServiceName { name: name.to_string() }]
            );
        }
        assert_eq!(index.slices().count(), 0);
        assert!(is_dns1035_label("web-2") && is_dns1035_label(&"w".repeat(63)));
    }

    #[test]
    fn dual_stack_keeps_the_v4_address() {
        let mut svc = mk_service("default", "web", "fd00::10", &[("", 80, "")]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ips = Some(vec!["fd00::10".into(), "10.96.0.10".into()]);
        }
        let mut index = Index::new();
        index.apply(svc);
        let svc = index.service(&key("default", "web")).expect("indexed");
        assert_eq!(svc.cluster_ips_v4, vec![Ipv4Addr::new(10, 96, 0, 10)]);
    }

    #[test]
    fn bad_ports_skip_only_that_port() {
        let mut index = Index::new();
        index.apply(mk_service(
            "default",
            "foo",
            "10.96.0.10",
            &[("dns", 53, "SCTP"), ("zero", 0, ""), ("big", 70_000, "TCP"), ("ok", 53, "UDP")],
        ));
        let svc = index.service(&key("default", "foo")).expect("still indexed");
        assert_eq!(svc.ports.len(), 1);
        let reasons = skips_of(&index, Kind::Service, &key("default", "foo"));
        assert_eq!(reasons[0], SkipReason::UnsupportedProtocol { port: "dns/SCTP".into() });
        assert_eq!(
            reasons[0].to_string(),
            "port dns/SCTP: protocol not supported; skipping the port"
        );
        assert_eq!(
            reasons[1],
            SkipReason::InvalidPort { port: "zero/TCP".into(), number: "0".into() }
        );
        assert_eq!(
            index.skipped_counts(),
            BTreeMap::from([("invalid_port", 2), ("unsupported_protocol", 1)])
        );
    }

    #[test]
    fn fixing_or_deleting_an_object_clears_its_skips() {
        let mut index = Index::new();
        index.apply(mk_service("default", "foo", "10.96.0.10", &[("dns", 53, "SCTP")]));
        let rev = index.revision();
        // Unchanged re-apply: same skips, no model change.
        index.apply(mk_service("default", "foo", "10.96.0.10", &[("dns", 53, "SCTP")]));
        assert_eq!(index.revision(), rev);
        assert_eq!(index.skipped_counts().len(), 1);
        index.apply(mk_service("default", "foo", "10.96.0.10", &[("dns", 53, "UDP")]));
        assert!(index.skipped_counts().is_empty());
        assert!(index.revision() > rev);

        index.apply(mk_service("default", "bar", "10.0.0.01", &[]));
        assert_eq!(index.skipped_counts().len(), 1);
        index.delete(Kind::Service, &key("default", "bar"));
        assert!(index.skipped_counts().is_empty());
    }

    /// Runs `f` with a subscriber that records formatted WARN lines.
    fn warnings(f: impl FnOnce()) -> Vec<String> {
        use std::sync::{Arc, Mutex};
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || SharedBuf(writer.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.lock().expect("log buffer").clone()).expect("utf-8 logs");
        text.lines().map(str::to_string).collect()
    }

    struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn warns_once_per_skip_naming_object_and_reason() {
        let mut index = Index::new();
        let bad = || mk_service("default", "foo", "10.96.0.10", &[("dns", 53, "SCTP")]);
        let first = warnings(|| index.apply(bad()));
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].contains("Service default/foo: port dns/SCTP"), "{}", first[0]);
        assert!(warnings(|| index.apply(bad())).is_empty(), "unchanged re-apply is quiet");
        assert!(warnings(|| index.reset(Kind::Service, vec![bad().into()])).is_empty());
        index.apply(mk_service("default", "foo", "10.96.0.10", &[]));
        assert_eq!(warnings(|| index.apply(bad())).len(), 1, "broken again after a fix");
    }

    #[test]
    fn service_becoming_headless_is_removed() {
        let mut index = Index::new();
        index.apply(mk_service("default", "web", "10.96.0.10", &[("", 80, "")]));
        index.apply(mk_service("default", "web", "None", &[("", 80, "")]));
        assert_eq!(index.services().count(), 0);
    }

    #[test]
    fn slice_conditions_default_as_the_api_says() {
        let mut index = Index::new();
        let eps = vec![
            mk_endpoint("10.0.0.1", None, None, None),
            mk_endpoint("10.0.0.2", Some(false), None, None),
            mk_endpoint("10.0.0.3", Some(false), Some(true), Some(true)),
            corev1_less_endpoint("10.0.0.4"),
        ];
        index.apply(mk_slice("default", "web-1", "web", &[("http", 8080, "")], eps));
        let slice = index.slices_for(&key("default", "web")).next().expect("slice");
        let got: Vec<_> = slice
            .endpoints
            .iter()
            .map(|e| (e.addr.octets()[3], e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, true, true, false),
                (2, false, false, false),
                (3, false, true, true),
                (4, true, true, false)
            ]
        );
        assert_eq!(
            slice.ports,
            vec![EndpointPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }]
        );
    }

    fn corev1_less_endpoint(addr: &str) -> discoveryv1::Endpoint {
        discoveryv1::Endpoint { addresses: vec![addr.to_string()], ..Default::default() }
    }

    #[test]
    fn slice_validation() {
        let mut index = Index::new();
        let mut unlabelled = mk_slice("default", "orphan", "x", &[], vec![]);
        unlabelled.metadata.labels = None;
        index.apply(unlabelled);
        assert_eq!(
            skips_of(&index, Kind::EndpointSlice, &key("default", "orphan")),
            vec![SkipReason::MissingServiceName]
        );

        let mut v6 = mk_slice("default", "v6", "web", &[], vec![]);
        v6.address_type = "IPv6".into();
        index.apply(v6);

        let mut absent_port = mk_slice(
            "default",
            "web-1",
            "web",
            &[("http", 8080, ""), ("sctp", 9, "SCTP")],
            vec![
                ready("10.0.0.01"),
                ready("10.0.0.2"),
                corev1_less_endpoint_multi(&["10.0.0.3", "10.0.0.4"]),
            ],
        );
        if let Some(ports) = absent_port.ports.as_mut() {
            ports.push(discoveryv1::EndpointPort {
                name: Some("none".into()),
                ..Default::default()
            });
        }
        index.apply(absent_port);

        assert_eq!(index.slices().count(), 1, "only the valid IPv4 slice");
        let slice = index.slices_for(&key("default", "web")).next().expect("slice");
        assert_eq!(slice.ports.len(), 1);
        let addrs: Vec<_> = slice.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, vec!["10.0.0.2", "10.0.0.3"], "first address of each valid endpoint");
        let reasons = skips_of(&index, Kind::EndpointSlice, &key("default", "web-1"));
        assert_eq!(
            reasons,
            vec![
                SkipReason::UnsupportedProtocol { port: "sctp/SCTP".into() },
                SkipReason::InvalidPort { port: "none/TCP".into(), number: "(absent)".into() },
                SkipReason::InvalidEndpointAddress { address: "10.0.0.01".into() },
            ]
        );
    }

    fn corev1_less_endpoint_multi(addrs: &[&str]) -> discoveryv1::Endpoint {
        discoveryv1::Endpoint {
            addresses: addrs.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn slices_follow_their_service_label() {
        let mut index = Index::new();
        index.apply(mk_slice("default", "s1", "a", &[], vec![ready("10.0.0.1")]));
        assert_eq!(index.slices_for(&key("default", "a")).count(), 1);
        index.apply(mk_slice("default", "s1", "b", &[], vec![ready("10.0.0.1")]));
        assert_eq!(index.slices_for(&key("default", "a")).count(), 0);
        assert_eq!(index.slices_for(&key("default", "b")).count(), 1);
        assert_eq!(index.slices_for(&key("other", "b")).count(), 0);
        index.delete(Kind::EndpointSlice, &key("default", "s1"));
        assert_eq!(index.slices_for(&key("default", "b")).count(), 0);
    }

    #[test]
    fn reset_deletes_what_is_not_listed() {
        let mut index = Index::new();
        index.handle(Event::Apply(mk_service("default", "a", "10.96.0.1", &[]).into()));
        index.handle(Event::Apply(mk_service("default", "b", "10.96.0.2", &[]).into()));
        index.handle(Event::Apply(mk_service("default", "bad", "10.96.0.03", &[]).into()));
        index.handle(Event::Apply(mk_slice("default", "s", "a", &[], vec![]).into()));
        index.handle(Event::Reset(
            Kind::Service,
            vec![mk_service("default", "b", "10.96.0.2", &[]).into()],
        ));
        let names: Vec<_> = index.services().map(|s| s.key.name.as_str()).collect();
        assert_eq!(names, vec!["b"]);
        assert!(index.skipped_counts().is_empty(), "a skipped object not listed is gone too");
        assert_eq!(index.slices().count(), 1, "other kinds untouched");
        index.handle(Event::Delete(Kind::Service, key("default", "b")));
        assert_eq!(index.services().count(), 0);
    }

    #[test]
    fn pods_namespaces_nodes() {
        let mut index = Index::new();
        let pod = corev1::Pod {
            metadata: meta("shop", "web-0", &[("app", "web")]),
            spec: Some(corev1::PodSpec {
                node_name: Some("n1".into()),
                containers: vec![corev1::Container {
                    name: "c".into(),
                    ports: Some(vec![
                        corev1::ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        },
                        corev1::ContainerPort {
                            container_port: 9,
                            protocol: Some("SCTP".into()),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(corev1::PodStatus {
                phase: Some("Running".into()),
                pod_ips: Some(vec![
                    corev1::PodIP { ip: "fd00::5".into() },
                    corev1::PodIP { ip: "10.244.1.5".into() },
                ]),
                ..Default::default()
            }),
        };
        index.apply(pod);
        let pod = index.pods().next().expect("pod");
        assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(pod.phase, PodPhase::Running);
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            pod.container_ports,
            vec![
                ContainerPort { name: None, port: 9, protocol: PolicyProtocol::Sctp },
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: PolicyProtocol::Tcp
                },
            ],
            "SCTP ports are kept: a policy's named port may name one"
        );

        let mut ns_meta = meta("", "shop", &[("team", "a")]);
        ns_meta.namespace = None;
        index.apply(corev1::Namespace { metadata: ns_meta, ..Default::default() });
        assert_eq!(index.namespace("shop").map(|n| n.labels.len()), Some(1));

        let mut node_meta = meta("", "n1", &[]);
        node_meta.namespace = None;
        index.apply(corev1::Node {
            metadata: node_meta,
            spec: Some(corev1::NodeSpec {
                pod_cidrs: Some(vec!["10.244.1.0/24".into(), "fd00:1::/64".into()]),
                ..Default::default()
            }),
            status: Some(corev1::NodeStatus {
                addresses: Some(vec![corev1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: "192.168.1.10".into(),
                }]),
                ..Default::default()
            }),
        });
        let node = index.node("n1").expect("node");
        assert_eq!(
            node.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["10.244.1.0/24"]
        );
        assert_eq!(node.addresses.len(), 1);
        index.reset(Kind::Node, vec![]);
        assert!(index.node("n1").is_none());
    }

    fn mk_policy(ns: &str, name: &str, yaml_spec: &str) -> networkingv1::NetworkPolicy {
        networkingv1::NetworkPolicy {
            metadata: meta(ns, name, &[]),
            spec: Some(serde_yaml::from_str(yaml_spec).expect("spec YAML")),
        }
    }

    const BAD_PEER: &str = "podSelector: {}
ingress: [{from: [{ipBlock: {cidr: 'fd00::/64'}}, {podSelector: {}}]}]";

    #[test]
    fn network_policies_are_converted_with_bad_parts_skipped() {
        let mut index = Index::new();
        index.apply(mk_policy("shop", "np", BAD_PEER));
        let policy = index.network_policy(&key("shop", "np")).expect("indexed");
        let Some(rules) = &policy.ingress else { panic!("ingress rules") };
        assert!(matches!(&rules[0].peers, crate::policy::Peers::Only(p) if p.len() == 1));
        assert_eq!(index.network_policies().count(), 1);
        assert_eq!(index.len(Kind::NetworkPolicy), 1);
        let reasons = skips_of(&index, Kind::NetworkPolicy, &key("shop", "np"));
        assert_eq!(reasons.len(), 1);
        assert_eq!(reasons[0].label(), "invalid_policy_part");
        assert_eq!(index.skipped_counts(), BTreeMap::from([("invalid_policy_part", 1)]));
        index.handle(Event::Retain(Kind::NetworkPolicy, BTreeSet::new()));
        assert_eq!(index.len(Kind::NetworkPolicy), 0);
        assert!(index.skipped_counts().is_empty());
    }

    #[test]
    fn policy_issues_warn_once_naming_the_policy_and_reason() {
        let mut index = Index::new();
        let first = warnings(|| index.apply(mk_policy("shop", "np", BAD_PEER)));
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(
            first[0].contains(
                "NetworkPolicy shop/np: spec.ingress[0].from[0]: cidr fd00::/64 is IPv6 and the \
                 datapath is IPv4-only; dropping the peer"
            ),
            "{}",
            first[0]
        );
        assert!(first[0].contains("invalid_policy_part"), "{}", first[0]);
        assert!(warnings(|| index.apply(mk_policy("shop", "np", BAD_PEER))).is_empty());
        index.apply(mk_policy("shop", "np", "podSelector: {}"));
        assert!(index.skipped_counts().is_empty(), "the fixed version has no issue");
        assert_eq!(warnings(|| index.apply(mk_policy("shop", "np", BAD_PEER))).len(), 1);
    }

    #[test]
    fn policy_dirty_follows_pods_namespaces_and_policies_only() {
        let mut index = Index::new();
        let pod = |label: &str| corev1::Pod {
            metadata: meta("shop", "web-0", &[("app", label)]),
            ..Default::default()
        };
        let ns = |team: &str| {
            let mut m = meta("", "shop", &[("team", team)]);
            m.namespace = None;
            corev1::Namespace { metadata: m, ..Default::default() }
        };
        index.apply(mk_service("shop", "web", "10.96.0.10", &[("", 80, "")]));
        let dirty = index.take_dirty();
        assert!(dirty.all && !dirty.policy_dirty, "a Service is not a policy input");

        index.apply(pod("web"));
        let dirty = index.take_dirty();
        assert!(dirty.policy_dirty && !dirty.all && dirty.services.is_empty());
        assert_eq!(dirty.pods, BTreeSet::from([key("shop", "web-0")]), "which Pod");
        assert!(!dirty.policy_inputs, "only a Pod");
        index.apply(pod("web"));
        assert!(!index.take_dirty().policy_dirty, "an unchanged Pod");
        index.apply(ns("a"));
        let dirty = index.take_dirty();
        assert!(dirty.policy_dirty && dirty.policy_inputs && dirty.pods.is_empty());
        index.apply(mk_policy("shop", "np", "podSelector: {}"));
        let dirty = index.take_dirty();
        assert!(dirty.policy_dirty && dirty.policy_inputs);
        index.delete(Kind::Pod, &key("shop", "web-0"));
        let dirty = index.take_dirty();
        assert!(dirty.pods.contains(&key("shop", "web-0")) && !dirty.policy_inputs);
        index.apply(pod("web"));
        index.take_dirty();
        index.apply(mk_policy("shop", "np", "podSelector: {}"));
        assert!(!index.take_dirty().policy_dirty, "an unchanged policy");
        index.delete(Kind::NetworkPolicy, &key("shop", "np"));
        assert!(index.take_dirty().policy_dirty);
        index.retain(Kind::Pod, &BTreeSet::new());
        assert!(index.take_dirty().policy_dirty, "a Pod retained away");
        index.reset(Kind::Namespace, vec![]);
        assert!(index.take_dirty().policy_dirty, "a Namespace reset away");
        index.delete(Kind::Pod, &key("shop", "gone"));
        assert_eq!(index.take_dirty(), Dirty::default(), "deleting an unknown Pod");
    }

    #[test]
    fn north_south_fields_are_converted_and_bad_ranges_fail_closed() {
        let mut svc = mk_service("d", "lb", "10.96.0.10", &[("http", 80, "")]);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("LoadBalancer".into());
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        spec.external_ips = Some(vec!["198.51.100.7".into(), "fd00::1".into(), "nope".into()]);
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32000);
        spec.load_balancer_source_ranges = Some(vec!["10.1.2.3/16".into(), "bad".into()]);
        let mut index = Index::new();
        index.apply(svc.clone());
        let k = key("d", "lb");
        let s = index.service(&k).unwrap();
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.external.external_ips, vec![Ipv4Addr::new(198, 51, 100, 7)]);
        assert!(s.external.traffic_policy_local);
        assert_eq!(s.external.health_check_node_port, Some(32000));
        // Host bits masked as the API server does; the bad entry dropped with a reason.
        assert_eq!(s.external.source_ranges, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(
            skips_of(&index, Kind::Service, &k).iter().map(SkipReason::label).collect::<Vec<_>>(),
            ["invalid_external_address", "invalid_external_address"]
        );
        // Every range unusable: an empty list would admit everyone; one that no packet from
        // outside matches is kept instead.
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["bad".into()]);
        index.apply(svc.clone());
        let s = index.service(&k).unwrap();
        assert_eq!(s.external.source_ranges, vec!["0.0.0.0/32".parse().unwrap()]);
        // A ClusterIP Service has no nodePort, even if the object carries one.
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("ClusterIP".into());
        index.apply(svc);
        let s = index.service(&k).unwrap();
        assert_eq!(s.ports[0].node_port, None);
        assert!(s.external.source_ranges.is_empty() && s.external.health_check_node_port.is_none());
    }
}
