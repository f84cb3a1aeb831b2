//! What the service maps should contain, computed from the index alone.
//!
//! A pure function so it can be tested with literals and re-run at will: the same index
//! (and node) always gives the same, sorted [`Desired`]. Ids are not chosen here;
//! [`sync`](crate::sync) assigns them when it diffs against what is written.
//!
//! The rules are kube-proxy's for EndpointSlices:
//!
//! 1. Every IPv4 ClusterIP x ServicePort of a Service is one frontend `(vip, port, proto)`.
//!    Only IPv4 is programmed: a dual-stack Service gets frontends for its IPv4 ClusterIP,
//!    an IPv6-only one none at all (the index drops it; it is not an error).
//! 2. Its backends come from the Service's slices (same namespace, `kubernetes.io/service-name`
//!    label) whose port has the ServicePort's name and protocol; the backend port is the
//!    slice's port number, which may differ from slice to slice. Who made the slice does not
//!    matter: hand-made slices (no or another `endpointslice.kubernetes.io/managed-by`) of a
//!    selector-less Service count exactly like the EndpointSlice controller's.
//! 3. An address appearing in several slices is one endpoint: ready or serving if any copy
//!    is, terminating only if every copy is (a non-terminating copy wins), on this node if
//!    any copy says so.
//! 4. `internalTrafficPolicy: Local` narrows the candidates to the endpoints whose
//!    `nodeName` is this node ([`NodeContext`]); `Cluster` (the default) keeps them all.
//! 5. Backends are the ready candidates; if none is ready, the serving *and* terminating
//!    ones (so connections drain during a rollout instead of failing). With `Local` this
//!    fallback is decided on the local endpoints alone, as kube-proxy does: a node whose
//!    local endpoints are all terminating uses them even while other nodes have ready ones.
//!
//!    The other endpoints in scope of a TCP frontend (listed, but not used for new flows:
//!    not ready, or terminating while others are ready, serving or not) are its *draining*
//!    backends ([`Frontend::draining`]): they keep a `BACKENDS_V4` entry, so established
//!    connections stay on them until they close or the endpoint leaves the slices
//!    (docs/ARCHITECTURE.md, "Established flows and removed backends"). UDP and other
//!    protocols have none: their flows follow the slots.
//! 6. A frontend without usable backends is kept with an empty list: the datapath then
//!    rejects new flows (TCP RST, ICMP port unreachable) as kube-proxy's REJECT does, rather
//!    than letting them leak to the routing table. For `Local` with no endpoint on this node
//!    while other nodes have some ([`Frontend::no_local_endpoints`]), kube-proxy drops
//!    instead, and so does the datapath: the traffic is never sent to another node.
//! 7. A Service with a frontend of more than [`MAX_BACKENDS_PER_SERVICE`] backends is left
//!    out entirely and listed in [`Desired::skipped`].
//! 8. `sessionAffinity: ClientIP` applies to every frontend of the Service, each on its own
//!    (kube-proxy keeps affinity per Service port too): the datapath remembers per
//!    (frontend, client IP) the backend of the client's last new flow.
//!
//! 9. The north-south frontends ([`Frontend::external`]): the `nodePort` of every port of a
//!    NodePort or LoadBalancer Service on each of this node's addresses (the InternalIP and
//!    ExternalIP of its Node object), and the port on each LoadBalancer ingress IP and each
//!    `externalIP` (those outside `--external-ip-cidr`, when given, are skipped and noted).
//!    Their backends follow `externalTrafficPolicy` as rules 4 to 6 follow the internal one;
//!    the LoadBalancer IPs carry the Service's `loadBalancerSourceRanges`.
//!
//! Without a node name ([`compute`], the file source in the lab) `Local` cannot be
//! evaluated and is treated as `Cluster`: every endpoint is used. Dropping all traffic of
//! such Services instead would break them on a misconfigured agent; an agent that knows its
//! node (`--node-name`, from the downward API in the DaemonSet) always applies `Local`.
use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::Ipv4Addr,
};

use nodeplane_common::maps::{
    BackendV4, IPPROTO_TCP, IPPROTO_UDP, MAX_BACKENDS_PER_SERVICE, ServiceKeyV4,
};

use crate::{
    index::{Dirty, Index},
    model::{Endpoint, Ipv4Cidr, Protocol, Service, ServicePort, SessionAffinity},
    source::ObjectKey,
};

/// The complete desired contents of the service maps, without ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<ServiceKeyV4, Frontend>,
    /// Services, frontends or backends left out, and why; sorted. Recomputed every time:
    /// callers that log it should log changes only.
    pub skipped: Vec<(ObjectKey, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectKey,
    pub port_name: String,
    /// Sorted and deduplicated; slot `i` of the frontend is `backends[i]`.
    pub backends: Vec<BackendV4>,
    /// TCP only: endpoints still listed for this port but not in `backends` (rule 5),
    /// sorted. They get a `BACKENDS_V4` entry and no slot.
    pub draining: Vec<BackendV4>,
    /// The Service's `sessionAffinity` (rule 8), written into the frontend's entry.
    pub session_affinity: SessionAffinity,
    /// `internalTrafficPolicy: Local` (or, for an external frontend,
    /// `externalTrafficPolicy: Local`), no usable endpoint on this node, and some on other
    /// nodes: the datapath drops new flows (kube-proxy's DROP) instead of rejecting them
    /// as it does for a Service without any endpoint.
    pub no_local_endpoints: bool,
    /// `Some` for a NodePort, LoadBalancer or ExternalIP frontend (rule 9).
    pub external: Option<ExternalFrontend>,
}

/// What makes a frontend north-south.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalFrontend {
    pub kind: ExternalKind,
    /// `externalTrafficPolicy: Local` applied: the backends are this node's endpoints.
    pub traffic_policy_local: bool,
    /// `loadBalancerSourceRanges` (LoadBalancer IPs only); empty admits every source.
    pub source_ranges: Vec<Ipv4Cidr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExternalKind {
    /// `nodePort` on one of this node's addresses.
    NodePort,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
    /// `spec.externalIPs`.
    ExternalIp,
}

impl ExternalKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ExternalKind::NodePort => "NodePort",
            ExternalKind::LoadBalancer => "LoadBalancer",
            ExternalKind::ExternalIp => "ExternalIP",
        }
    }
}

/// Where the agent runs: what the node-aware rules need to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name, as in `spec.nodeName` and in endpoints' `nodeName`. `None` when
    /// unknown: `internalTrafficPolicy: Local` is then treated as `Cluster`.
    pub node_name: Option<String>,
    /// The prefixes `spec.externalIPs` must fall in to be programmed (`--external-ip-cidr`,
    /// against CVE-2020-8554); `None` admits every address, as kube-proxy does.
    pub external_ip_allow: Option<Vec<Ipv4Cidr>>,
}

impl NodeContext {
    pub fn named(node_name: impl Into<String>) -> Self {
        Self { node_name: Some(node_name.into()), external_ip_allow: None }
    }

    /// The node's IPv4 addresses NodePorts are served on: the `InternalIP` and `ExternalIP`
    /// addresses of its Node object, sorted. Empty without a node name or Node object.
    pub fn node_ips(&self, index: &Index) -> Vec<Ipv4Addr> {
        let Some(node) = self.node_name.as_deref().and_then(|n| index.node(n)) else {
            return Vec::new();
        };
        let mut ips: Vec<Ipv4Addr> = node
            .addresses
            .iter()
            .filter(|a| a.kind == "InternalIP" || a.kind == "ExternalIP")
            .filter_map(|a| match a.addr {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    fn external_ip_allowed(&self, ip: Ipv4Addr) -> bool {
        self.external_ip_allow.as_ref().is_none_or(|allow| allow.iter().any(|c| c.contains(ip)))
    }
}

/// What the external frontends of every Service depend on besides the Service: computed
/// once per pass.
struct ExternalCtx<'a> {
    node: &'a NodeContext,
    node_ips: Vec<Ipv4Addr>,
}

/// Which endpoints a Service's frontends draw from (`spec.internalTrafficPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope<'a> {
    /// `Cluster`: every endpoint.
    Cluster,
    /// `Local`: only endpoints whose `nodeName` is this node.
    Node(&'a str),
}

impl<'a> Scope<'a> {
    fn new(internal_traffic_policy_local: bool, node: &'a NodeContext) -> Self {
        match (internal_traffic_policy_local, node.node_name.as_deref()) {
            (true, Some(name)) => Scope::Node(name),
            // Local without a node name is treated as Cluster (module docs).
            _ => Scope::Cluster,
        }
    }

    fn admits(self, ep: &Endpoint) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Node(name) => ep.node_name.as_deref() == Some(name),
        }
    }
}

/// Endpoint state merged over every slice that lists the same address and port.
#[derive(Clone, Copy, Debug)]
struct Merged {
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Admitted by the Service's [`Scope`] (always true for `Cluster`).
    in_scope: bool,
}

/// [`compute_for`] on a node whose name is unknown: `Local` policies act as `Cluster`.
pub fn compute(index: &Index) -> Desired {
    compute_for(index, &NodeContext::default())
}

/// The desired maps of the agent on `node`.
pub fn compute_for(index: &Index, node: &NodeContext) -> Desired {
    compute_with(index, node, &|s| s.internal_traffic_policy_local)
}

/// [`compute_for`] with the policy accessor as a parameter, so the rules can be tested on
/// one index with several policies.
fn compute_with(
    index: &Index,
    node: &NodeContext,
    policy_local: &dyn Fn(&Service) -> bool,
) -> Desired {
    let mut desired = Desired::default();
    let vips = cluster_ips(index);
    let ext = ExternalCtx { node, node_ips: node.node_ips(index) };
    for service in index.services() {
        let scope = Scope::new(policy_local(service), node);
        add_service(&mut desired, index, service, scope, &ext, &vips);
    }
    desired.skipped.sort();
    desired.skipped.dedup();
    desired
}

/// Adds the frontends of `service` to `desired`, and notes why any were left out.
fn add_service(
    desired: &mut Desired,
    index: &Index,
    service: &Service,
    scope: Scope<'_>,
    ext: &ExternalCtx<'_>,
    vips: &BTreeMap<Ipv4Addr, &ObjectKey>,
) {
    let frontends = match service_frontends(index, service, scope, ext, vips, &mut desired.skipped)
    {
        Ok(frontends) => frontends,
        Err(reason) => {
            desired.skipped.push((service.key.clone(), reason));
            return;
        }
    };
    for (key, frontend) in frontends {
        match desired.frontends.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(frontend);
            }
            // ClusterIPs are allocated uniquely, so this takes a broken or hand-written
            // state; the first Service in key order keeps the frontend.
            Entry::Occupied(taken) => desired.skipped.push((
                service.key.clone(),
                format!("frontend {} is already served by {}", describe(&key), taken.get().service),
            )),
        }
    }
}

/// Every ClusterIP and its Service. A backend must never be a ClusterIP: the datapath
/// translates once, so such a backend would be a dead end (or, with a later hop, a loop).
fn cluster_ips(index: &Index) -> BTreeMap<Ipv4Addr, &ObjectKey> {
    index.services().flat_map(|s| s.cluster_ips_v4.iter().map(move |ip| (*ip, &s.key))).collect()
}

/// Brings `desired` (the result of an earlier [`compute_for`] or `update` on the same node)
/// up to date with `index`, given what changed since. Returns the frontends that were
/// added, removed or changed, or `None` when it had to recompute everything.
///
/// Only EndpointSlice changes are applied incrementally, Service by Service: they change
/// backends, never which frontends exist, so the rules that look across Services (a
/// frontend two Services claim goes to the first in key order; a backend may not be a
/// ClusterIP) decide exactly as a full [`compute_for`] would. Any change to a Service
/// itself recomputes everything. Equality with [`compute_for`] is property-tested.
pub fn update(
    desired: &mut Desired,
    index: &Index,
    node: &NodeContext,
    dirty: &Dirty,
) -> Option<BTreeSet<ServiceKeyV4>> {
    if dirty.all {
        *desired = compute_for(index, node);
        return None;
    }
    if dirty.services.is_empty() {
        return Some(BTreeSet::new());
    }
    let vips = cluster_ips(index);
    let ext = ExternalCtx { node, node_ips: node.node_ips(index) };
    let mut changed = BTreeSet::new();
    for key in &dirty.services {
        // A Service that is gone (or never was) has no frontends: deleting one is a Service
        // change, which took the full path above.
        let Some(service) = index.service(key) else { continue };
        // Its frontend keys follow from the Service alone, which has not changed; the ones
        // it holds are those not lost to another Service.
        let mut old: BTreeMap<ServiceKeyV4, Frontend> = BTreeMap::new();
        for k in frontend_keys(service, &ext) {
            if let Entry::Occupied(f) = desired.frontends.entry(k)
                && f.get().service == *key
            {
                old.insert(k, f.remove());
            }
        }
        desired.skipped.retain(|(service, _)| service != key);
        let scope = Scope::new(service.internal_traffic_policy_local, node);
        add_service(desired, index, service, scope, &ext, &vips);
        for k in frontend_keys(service, &ext) {
            let now = desired.frontends.get(&k).filter(|f| f.service == *key);
            if now != old.get(&k) {
                changed.insert(k);
            }
        }
    }
    desired.skipped.sort();
    desired.skipped.dedup();
    Some(changed)
}

/// All frontends of one Service, or why the Service is skipped. Backends left out are
/// noted in `notes`.
fn service_frontends(
    index: &Index,
    service: &Service,
    scope: Scope<'_>,
    ext: &ExternalCtx<'_>,
    vips: &BTreeMap<Ipv4Addr, &ObjectKey>,
    notes: &mut Vec<(ObjectKey, String)>,
) -> Result<Vec<(ServiceKeyV4, Frontend)>, String> {
    // Rule 9: external traffic follows `externalTrafficPolicy`, not the internal one.
    let external_scope = Scope::new(service.external.traffic_policy_local, ext.node);
    let mut out = Vec::new();
    for port in &service.ports {
        // One port's frontends share everything but their key and external side.
        let frontend = |usable: &(Vec<BackendV4>, Vec<BackendV4>, bool), external| Frontend {
            service: service.key.clone(),
            port_name: port.name.clone(),
            backends: usable.0.clone(),
            draining: usable.1.clone(),
            session_affinity: service.session_affinity,
            no_local_endpoints: usable.2,
            external,
        };
        let internal = usable_backends(index, service, port, scope, vips, notes)?;
        for key in port_keys(service, port) {
            out.push((key, frontend(&internal, None)));
        }
        let mut external = external_keys(service, port, ext).peekable();
        if external.peek().is_none() {
            continue;
        }
        let usable = if external_scope == scope {
            internal
        } else {
            usable_backends(index, service, port, external_scope, vips, &mut Vec::new())?
        };
        for (key, kind) in external {
            let source_ranges = match kind {
                ExternalKind::LoadBalancer => service.external.source_ranges.clone(),
                _ => Vec::new(),
            };
            let traffic_policy_local = matches!(external_scope, Scope::Node(_));
            let side = ExternalFrontend { kind, traffic_policy_local, source_ranges };
            out.push((key, frontend(&usable, Some(side))));
        }
    }
    if ext.node.external_ip_allow.is_some() {
        for ip in &service.external.external_ips {
            if !ext.node.external_ip_allowed(*ip) {
                notes.push((
                    service.key.clone(),
                    format!("externalIP {ip} is outside --external-ip-cidr; not programmed"),
                ));
            }
        }
    }
    Ok(out)
}

/// The backends of one ServicePort in `scope` (rules 2 to 7): usable, draining, and
/// whether only this node lacks endpoints.
fn usable_backends(
    index: &Index,
    service: &Service,
    port: &ServicePort,
    scope: Scope<'_>,
    vips: &BTreeMap<Ipv4Addr, &ObjectKey>,
    notes: &mut Vec<(ObjectKey, String)>,
) -> Result<(Vec<BackendV4>, Vec<BackendV4>, bool), String> {
    let (mut backends, mut draining) = backends_for(index, service, port, scope);
    backends.retain(|b| {
        let addr = Ipv4Addr::from(b.addr);
        let Some(owner) = vips.get(&addr) else { return true };
        notes.push((
            service.key.clone(),
            format!("endpoint {addr} is the ClusterIP of {owner}; not used as a backend"),
        ));
        false
    });
    draining.retain(|b| !vips.contains_key(&Ipv4Addr::from(b.addr)));
    let no_local_endpoints = backends.is_empty()
        && matches!(scope, Scope::Node(_))
        && !backends_for(index, service, port, Scope::Cluster).0.is_empty();
    if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
        return Err(format!(
            "port {} has {} backends, more than the datapath's {MAX_BACKENDS_PER_SERVICE}",
            display_port(port),
            backends.len()
        ));
    }
    Ok((backends, draining, no_local_endpoints))
}

/// The frontend keys of one ServicePort: one per ClusterIP.
fn port_keys<'s>(
    service: &'s Service,
    port: &'s ServicePort,
) -> impl Iterator<Item = ServiceKeyV4> + 's {
    let proto = port.protocol.ipproto();
    service.cluster_ips_v4.iter().map(move |vip| ServiceKeyV4::new(vip.octets(), port.port, proto))
}

/// The external frontend keys of one ServicePort (rule 9): its nodePort on every node
/// address, its port on every LoadBalancer ingress IP and every allowed external IP.
fn external_keys<'s>(
    service: &'s Service,
    port: &'s ServicePort,
    ext: &'s ExternalCtx<'_>,
) -> impl Iterator<Item = (ServiceKeyV4, ExternalKind)> + 's {
    let proto = port.protocol.ipproto();
    let node_ports = port.node_port.into_iter().flat_map(move |np| {
        ext.node_ips
            .iter()
            .map(move |ip| (ServiceKeyV4::new(ip.octets(), np, proto), ExternalKind::NodePort))
    });
    let lb = service.external.lb_ingress_ips.iter().map(move |ip| {
        (ServiceKeyV4::new(ip.octets(), port.port, proto), ExternalKind::LoadBalancer)
    });
    let eips =
        service.external.external_ips.iter().filter(|ip| ext.node.external_ip_allowed(**ip)).map(
            move |ip| (ServiceKeyV4::new(ip.octets(), port.port, proto), ExternalKind::ExternalIp),
        );
    node_ports.chain(lb).chain(eips)
}

/// Every frontend key of a Service: ClusterIPs x ports, then the external ones.
fn frontend_keys<'s>(
    service: &'s Service,
    ext: &'s ExternalCtx<'_>,
) -> impl Iterator<Item = ServiceKeyV4> + 's {
    service.ports.iter().flat_map(move |port| {
        port_keys(service, port).chain(external_keys(service, port, ext).map(|(k, _)| k))
    })
}

/// `10.96.0.10:53/UDP`, for messages about a frontend.
pub fn describe(key: &ServiceKeyV4) -> String {
    let proto = match key.proto {
        IPPROTO_TCP => "TCP".to_string(),
        IPPROTO_UDP => "UDP".to_string(),
        other => other.to_string(),
    };
    format!("{}:{}/{proto}", Ipv4Addr::from(key.addr), key.port())
}

fn display_port(port: &ServicePort) -> String {
    let id = if port.name.is_empty() { port.port.to_string() } else { port.name.clone() };
    format!("{id}/{}", port.protocol)
}

/// The usable backends of one ServicePort, sorted (rules 2 to 5), and its draining ones
/// (rule 5: the other endpoints in scope, for TCP only).
fn backends_for(
    index: &Index,
    service: &Service,
    port: &ServicePort,
    scope: Scope<'_>,
) -> (Vec<BackendV4>, Vec<BackendV4>) {
    let mut merged: BTreeMap<(Ipv4Addr, u16), Merged> = BTreeMap::new();
    for slice in index.slices_for(&service.key) {
        let Some(slice_port) =
            slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let state = Merged {
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                in_scope: scope.admits(ep),
            };
            merged
                .entry((ep.addr, slice_port.port))
                .and_modify(|m| {
                    m.ready |= state.ready;
                    m.serving |= state.serving;
                    m.terminating &= state.terminating;
                    m.in_scope |= state.in_scope;
                })
                .or_insert(state);
        }
    }
    let pick = |usable: fn(&Merged) -> bool| -> Vec<BackendV4> {
        merged
            .iter()
            .filter(|(_, m)| m.in_scope && usable(m))
            .map(|((addr, p), _)| backend(*addr, *p, port.protocol))
            .collect()
    };
    // The fallback looks at the endpoints in scope only (kube-proxy's CategorizeEndpoints).
    let mut backends = pick(|m| m.ready);
    if backends.is_empty() {
        backends = pick(|m| m.serving && m.terminating);
    }
    // The map iteration is already ordered by (addr, port) and unique; sorting by the map
    // value's own order keeps the contract explicit should BackendV4 ever change.
    backends.sort();
    backends.dedup();
    let draining = if port.protocol.ipproto() == IPPROTO_TCP {
        let mut all = pick(|_| true);
        all.retain(|b| backends.binary_search(b).is_err());
        all.sort();
        all
    } else {
        Vec::new()
    };
    (backends, draining)
}

fn backend(addr: Ipv4Addr, port: u16, protocol: Protocol) -> BackendV4 {
    BackendV4::new(addr.octets(), port, protocol.ipproto())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{SERVICE_PROXY_NAME_LABEL, test_helpers::*};
    use k8s_openapi::api::discovery::v1 as discoveryv1;

    const VIP: [u8; 4] = [10, 96, 0, 10];

    fn be(addr: &str, port: u16) -> BackendV4 {
        let ip: Ipv4Addr = addr.parse().expect("test address");
        BackendV4::new(ip.octets(), port, IPPROTO_TCP)
    }

    fn tcp(port: u16) -> ServiceKeyV4 {
        ServiceKeyV4::new(VIP, port, IPPROTO_TCP)
    }

    fn backends_of(d: &Desired, key: ServiceKeyV4) -> Vec<BackendV4> {
        d.frontends
            .get(&key)
            .unwrap_or_else(|| panic!("no frontend {key:?} in {d:?}"))
            .backends
            .clone()
    }

    fn index_with(
        svc: k8s_openapi::api::core::v1::Service,
        slices: Vec<discoveryv1::EndpointSlice>,
    ) -> Index {
        let mut index = Index::new();
        index.apply(svc);
        for s in slices {
            index.apply(s);
        }
        index
    }

    fn web() -> k8s_openapi::api::core::v1::Service {
        mk_service("default", "web", "10.96.0.10", &[("http", 80, "")])
    }

    #[test]
    fn named_ports_map_to_different_numbers_per_slice() {
        let index = index_with(
            web(),
            vec![
                mk_slice("default", "web-a", "web", &[("http", 8080, "")], vec![ready("10.0.0.1")]),
                mk_slice("default", "web-b", "web", &[("http", 9090, "")], vec![ready("10.0.0.2")]),
                mk_slice(
                    "default",
                    "web-c",
                    "web",
                    &[("metrics", 80, "")],
                    vec![ready("10.0.0.3")],
                ),
            ],
        );
        let d = compute(&index);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080), be("10.0.0.2", 9090)]);
        assert_eq!(d.frontends[&tcp(80)].port_name, "http");
        assert_eq!(d.frontends[&tcp(80)].service, ObjectKey::namespaced("default", "web"));
    }

    #[test]
    fn multi_port_and_protocol() {
        let svc = mk_service(
            "default",
            "dns",
            "10.96.0.10",
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        );
        let slice = mk_slice(
            "default",
            "dns-a",
            "dns",
            &[("dns", 5353, "UDP"), ("dns-tcp", 5353, "TCP")],
            vec![ready("10.0.0.1")],
        );
        let d = compute(&index_with(svc, vec![slice]));
        assert_eq!(d.frontends.len(), 2);
        assert_eq!(
            backends_of(&d, ServiceKeyV4::new(VIP, 53, IPPROTO_UDP)),
            vec![BackendV4::new([10, 0, 0, 1], 5353, IPPROTO_UDP)]
        );
        assert_eq!(backends_of(&d, tcp(53)), vec![be("10.0.0.1", 5353)]);
    }

    #[test]
    fn same_name_other_protocol_does_not_match() {
        let slice =
            mk_slice("default", "web-a", "web", &[("http", 8080, "UDP")], vec![ready("10.0.0.1")]);
        let d = compute(&index_with(web(), vec![slice]));
        assert!(backends_of(&d, tcp(80)).is_empty());
    }

    #[test]
    fn ready_preferred_over_terminating() {
        let slice = mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![ready("10.0.0.2"), terminating("10.0.0.1", true), not_ready("10.0.0.3")],
        );
        let d = compute(&index_with(web(), vec![slice]));
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.2", 8080)]);
    }

    #[test]
    fn listed_endpoints_that_get_no_new_flows_drain_for_tcp_only() {
        let svc =
            mk_service("default", "web", "10.96.0.10", &[("http", 80, ""), ("dns", 53, "UDP")]);
        let endpoints = vec![
            ready("10.0.0.2"),
            terminating("10.0.0.1", true),
            terminating("10.0.0.4", false),
            not_ready("10.0.0.3"),
        ];
        let slice = mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, ""), ("dns", 5353, "UDP")],
            endpoints,
        );
        let d = compute(&index_with(svc, vec![slice]));
        let http = &d.frontends[&tcp(80)];
        assert_eq!(http.backends, vec![be("10.0.0.2", 8080)]);
        assert_eq!(
            http.draining,
            vec![be("10.0.0.1", 8080), be("10.0.0.3", 8080), be("10.0.0.4", 8080)],
            "every other listed endpoint keeps its established TCP flows"
        );
        let dns = &d.frontends[&ServiceKeyV4::new(VIP, 53, IPPROTO_UDP)];
        assert_eq!(dns.backends, vec![BackendV4::new([10, 0, 0, 2], 5353, IPPROTO_UDP)]);
        assert!(dns.draining.is_empty(), "UDP flows follow the slots: {:?}", dns.draining);

        // Without ready endpoints the serving terminating one is a backend, the others drain.
        let slice = mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![terminating("10.0.0.1", true), not_ready("10.0.0.3")],
        );
        let d = compute(&index_with(web(), vec![slice]));
        assert_eq!(d.frontends[&tcp(80)].backends, vec![be("10.0.0.1", 8080)]);
        assert_eq!(d.frontends[&tcp(80)].draining, vec![be("10.0.0.3", 8080)]);
    }

    #[test]
    fn terminating_serving_used_when_none_ready() {
        let slice = mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![
                terminating("10.0.0.1", true),
                terminating("10.0.0.2", false),
                not_ready("10.0.0.3"),
            ],
        );
        let d = compute(&index_with(web(), vec![slice]));
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080)]);
    }

    #[test]
    fn duplicates_across_slices_merge() {
        let slices = vec![
            mk_slice(
                "default",
                "web-a",
                "web",
                &[("http", 8080, "")],
                vec![terminating("10.0.0.1", true), ready("10.0.0.2")],
            ),
            mk_slice(
                "default",
                "web-b",
                "web",
                &[("http", 8080, "")],
                vec![ready("10.0.0.1"), ready("10.0.0.2")],
            ),
        ];
        let d = compute(&index_with(web(), slices));
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]);

        // Only terminating copies left, one of them serving: the merged endpoint serves.
        let slices = vec![
            mk_slice(
                "default",
                "web-a",
                "web",
                &[("http", 8080, "")],
                vec![terminating("10.0.0.1", false)],
            ),
            mk_slice(
                "default",
                "web-b",
                "web",
                &[("http", 8080, "")],
                vec![terminating("10.0.0.1", true)],
            ),
        ];
        let d = compute(&index_with(web(), slices));
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080)]);

        // A non-terminating (not ready) copy wins: not a fallback candidate any more.
        let slices = vec![
            mk_slice(
                "default",
                "web-a",
                "web",
                &[("http", 8080, "")],
                vec![terminating("10.0.0.1", true)],
            ),
            mk_slice("default", "web-b", "web", &[("http", 8080, "")], vec![not_ready("10.0.0.1")]),
        ];
        let d = compute(&index_with(web(), slices));
        assert!(backends_of(&d, tcp(80)).is_empty());
    }

    #[test]
    fn backends_are_sorted() {
        let slice = mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![ready("10.0.0.10"), ready("10.0.0.9"), ready("9.0.0.1")],
        );
        let d = compute(&index_with(web(), vec![slice]));
        assert_eq!(
            backends_of(&d, tcp(80)),
            vec![be("9.0.0.1", 8080), be("10.0.0.9", 8080), be("10.0.0.10", 8080)]
        );
    }

    #[test]
    fn no_endpoints_keeps_an_empty_frontend() {
        let d = compute(&index_with(web(), vec![]));
        assert_eq!(d.frontends.len(), 1);
        assert!(backends_of(&d, tcp(80)).is_empty());
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_ignored() {
        let slices = vec![
            mk_slice("default", "api-a", "api", &[("http", 8080, "")], vec![ready("10.0.0.1")]),
            mk_slice("other", "web-a", "web", &[("http", 8080, "")], vec![ready("10.0.0.2")]),
        ];
        let d = compute(&index_with(web(), slices));
        assert!(backends_of(&d, tcp(80)).is_empty());
    }

    #[test]
    fn proxy_name_and_headless_services_have_no_frontends() {
        let mut other = web();
        other.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "x".to_string())].into());
        let slice =
            mk_slice("default", "web-a", "web", &[("http", 8080, "")], vec![ready("10.0.0.1")]);
        assert!(compute(&index_with(other, vec![slice.clone()])).frontends.is_empty());
        let headless = mk_service("default", "web", "None", &[("http", 80, "")]);
        assert!(compute(&index_with(headless, vec![slice])).frontends.is_empty());
    }

    #[test]
    fn too_many_endpoints_skip_the_whole_service() {
        let svc =
            mk_service("default", "big", "10.96.0.11", &[("http", 80, ""), ("small", 81, "")]);
        let n = MAX_BACKENDS_PER_SERVICE + 1;
        let many: Vec<_> =
            (0..n).map(|i| ready(&Ipv4Addr::from(0x0a00_0000 + i).to_string())).collect();
        let mut index = index_with(
            svc,
            vec![
                mk_slice("default", "big-a", "big", &[("http", 8080, "")], many),
                mk_slice(
                    "default",
                    "big-b",
                    "big",
                    &[("small", 8081, "")],
                    vec![ready("10.1.0.1")],
                ),
            ],
        );
        index.apply(web());
        let d = compute(&index);
        assert_eq!(
            d.frontends.keys().copied().collect::<Vec<_>>(),
            vec![tcp(80)],
            "only web remains"
        );
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(d.skipped[0].0, ObjectKey::namespaced("default", "big"));
        assert!(d.skipped[0].1.contains("http/TCP"), "{}", d.skipped[0].1);
    }

    #[test]
    fn every_cluster_ip_gets_the_frontends() {
        let mut svc = web();
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ips = Some(vec!["10.96.0.10".into(), "10.96.0.20".into()]);
        }
        let slice =
            mk_slice("default", "web-a", "web", &[("http", 8080, "")], vec![ready("10.0.0.1")]);
        let d = compute(&index_with(svc, vec![slice]));
        assert_eq!(d.frontends.len(), 2);
        assert_eq!(
            backends_of(&d, ServiceKeyV4::new([10, 96, 0, 20], 80, IPPROTO_TCP)),
            vec![be("10.0.0.1", 8080)]
        );
    }

    #[test]
    fn duplicate_frontend_keeps_the_first_service() {
        let mut index = index_with(web(), vec![]);
        index.apply(mk_service("default", "zzz", "10.96.0.10", &[("http", 80, "")]));
        let d = compute(&index);
        assert_eq!(d.frontends[&tcp(80)].service.name, "web");
        assert_eq!(d.skipped.len(), 1);
        assert!(d.skipped[0].1.contains("10.96.0.10:80/TCP"), "{:?}", d.skipped);
    }

    #[test]
    fn a_backend_that_is_a_cluster_ip_is_left_out_with_a_note() {
        let other = mk_service("default", "db", "10.96.0.20", &[("", 5432, "")]);
        let slices = vec![mk_slice(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "")],
            vec![ready("10.0.0.1"), ready("10.96.0.20")],
        )];
        let mut index = index_with(web(), slices);
        index.apply(other);
        let d = compute(&index);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080)]);
        assert_eq!(d.skipped.len(), 1, "one note, not one per port: {:?}", d.skipped);
        assert_eq!(d.skipped[0].0, ObjectKey::namespaced("default", "web"));
        assert!(
            d.skipped[0].1.contains("10.96.0.20 is the ClusterIP of default/db"),
            "{:?}",
            d.skipped
        );
    }

    // --- node-aware rules (internalTrafficPolicy) ---

    fn on(node: &str, mut ep: discoveryv1::Endpoint) -> discoveryv1::Endpoint {
        ep.node_name = Some(node.to_string());
        ep
    }

    /// Services named in `local` have `internalTrafficPolicy: Local`.
    fn compute_local(index: &Index, node: Option<&str>, local: &[&str]) -> Desired {
        let node = NodeContext { node_name: node.map(str::to_string), external_ip_allow: None };
        compute_with(index, &node, &|s: &Service| local.contains(&s.key.name.as_str()))
    }

    fn spread() -> Index {
        let slices = vec![
            mk_slice(
                "default",
                "web-a",
                "web",
                &[("http", 8080, "")],
                vec![
                    on("n1", ready("10.0.1.1")),
                    on("n1", not_ready("10.0.1.2")),
                    on("n2", ready("10.0.2.1")),
                    ready("10.0.9.1"), // no nodeName: never local
                ],
            ),
            mk_slice(
                "default",
                "web-b",
                "web",
                &[("http", 8080, "")],
                vec![on("n1", ready("10.0.1.3"))],
            ),
        ];
        index_with(web(), slices)
    }

    #[test]
    fn local_policy_uses_only_this_nodes_endpoints() {
        let index = spread();
        let d = compute_local(&index, Some("n1"), &["web"]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.1.1", 8080), be("10.0.1.3", 8080)]);
        let d = compute_local(&index, Some("n2"), &["web"]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.2.1", 8080)]);
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn cluster_policy_ignores_the_node() {
        let index = spread();
        let all = vec![
            be("10.0.1.1", 8080),
            be("10.0.1.3", 8080),
            be("10.0.2.1", 8080),
            be("10.0.9.1", 8080),
        ];
        assert_eq!(backends_of(&compute_local(&index, Some("n1"), &[]), tcp(80)), all);
        assert_eq!(backends_of(&compute_for(&index, &NodeContext::named("n1")), tcp(80)), all);
    }

    #[test]
    fn local_policy_without_local_endpoints_drops() {
        // The frontend stays, with no backends and the drop flag: the datapath drops and
        // counts (no-backends) instead of sending the traffic to another node or
        // rejecting it, as kube-proxy does.
        let d = compute_local(&spread(), Some("n3"), &["web"]);
        assert_eq!(d.frontends.len(), 1);
        assert!(backends_of(&d, tcp(80)).is_empty());
        assert!(d.skipped.is_empty(), "not a skip: {:?}", d.skipped);
        assert!(d.frontends.values().all(|f| f.no_local_endpoints), "drop, not reject");
        // With local endpoints, or under Cluster, nothing is dropped for that reason.
        let here = compute_local(&spread(), Some("n1"), &["web"]);
        assert!(here.frontends.values().all(|f| !f.no_local_endpoints && !f.backends.is_empty()));
        let cluster = compute_local(&spread(), Some("n3"), &[]);
        assert!(cluster.frontends.values().all(|f| !f.no_local_endpoints));
    }

    #[test]
    fn local_policy_without_a_node_name_acts_as_cluster() {
        let index = spread();
        assert_eq!(compute_local(&index, None, &["web"]), compute_local(&index, None, &[]));
        assert_eq!(compute(&index), compute_for(&index, &NodeContext::default()));
        assert_eq!(backends_of(&compute(&index), tcp(80)).len(), 4);
    }

    #[test]
    fn local_terminating_fallback_looks_at_local_endpoints_only() {
        let slice = |eps| mk_slice("default", "web-a", "web", &[("http", 8080, "")], eps);
        // n1 only has a serving terminating endpoint: it is used although n2 has a ready
        // one (kube-proxy's CategorizeEndpoints), and a non-serving one never is.
        let index = index_with(
            web(),
            vec![slice(vec![
                on("n1", terminating("10.0.1.1", true)),
                on("n1", terminating("10.0.1.2", false)),
                on("n2", ready("10.0.2.1")),
            ])],
        );
        let d = compute_local(&index, Some("n1"), &["web"]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.1.1", 8080)]);
        // With Cluster the ready endpoint elsewhere wins: no fallback.
        let d = compute_local(&index, Some("n1"), &[]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.2.1", 8080)]);

        // A local ready endpoint is preferred over a local terminating one.
        let index = index_with(
            web(),
            vec![slice(vec![on("n1", terminating("10.0.1.1", true)), on("n1", ready("10.0.1.2"))])],
        );
        let d = compute_local(&index, Some("n1"), &["web"]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.1.2", 8080)]);

        // Only terminating endpoints elsewhere: nothing local to fall back to.
        let index = index_with(web(), vec![slice(vec![on("n2", terminating("10.0.2.1", true))])]);
        assert!(backends_of(&compute_local(&index, Some("n1"), &["web"]), tcp(80)).is_empty());
    }

    #[test]
    fn local_policy_applies_per_service() {
        let mut index = spread();
        index.apply(mk_service("default", "api", "10.96.0.11", &[("http", 80, "")]));
        index.apply(mk_slice(
            "default",
            "api-a",
            "api",
            &[("http", 8080, "")],
            vec![on("n1", ready("10.0.1.9")), on("n2", ready("10.0.2.9"))],
        ));
        let d = compute_local(&index, Some("n2"), &["web"]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.2.1", 8080)]);
        let api = ServiceKeyV4::new([10, 96, 0, 11], 80, IPPROTO_TCP);
        assert_eq!(backends_of(&d, api), vec![be("10.0.1.9", 8080), be("10.0.2.9", 8080)]);
    }

    #[test]
    fn session_affinity_is_carried_to_every_frontend_of_the_service() {
        let mut svc =
            mk_service("default", "web", "10.96.0.10", &[("http", 80, ""), ("dns", 53, "UDP")]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.session_affinity = Some("ClientIP".into());
            spec.session_affinity_config =
                Some(k8s_openapi::api::core::v1::SessionAffinityConfig {
                    client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                        timeout_seconds: Some(5),
                    }),
                });
        }
        let mut index = index_with(svc, vec![]);
        index.apply(mk_service("default", "api", "10.96.0.11", &[("http", 80, "")]));
        let d = compute(&index);
        let sticky = SessionAffinity::ClientIp { timeout_s: 5 };
        assert_eq!(d.frontends[&tcp(80)].session_affinity, sticky);
        assert_eq!(d.frontends[&ServiceKeyV4::new(VIP, 53, IPPROTO_UDP)].session_affinity, sticky);
        let api = ServiceKeyV4::new([10, 96, 0, 11], 80, IPPROTO_TCP);
        assert_eq!(d.frontends[&api].session_affinity, SessionAffinity::None);

        // A Service change (affinity on or off) is a full recompute, never incremental.
        let mut index = index_with(web(), vec![]);
        let mut d = compute(&index);
        index.take_dirty();
        let mut svc = web();
        if let Some(spec) = svc.spec.as_mut() {
            spec.session_affinity = Some("ClientIP".into());
        }
        index.apply(svc);
        let dirty = index.take_dirty();
        assert!(dirty.all);
        assert_eq!(update(&mut d, &index, &NodeContext::default(), &dirty), None);
        let default = SessionAffinity::ClientIp { timeout_s: 10_800 };
        assert_eq!(d.frontends[&tcp(80)].session_affinity, default);
    }

    #[test]
    fn internal_traffic_policy_is_read_from_the_service() {
        let mut svc = web();
        if let Some(spec) = svc.spec.as_mut() {
            spec.internal_traffic_policy = Some("Local".into());
        }
        let slice = mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![on("n1", ready("10.0.1.1")), on("n2", ready("10.0.2.1"))],
        );
        let d = compute_for(&index_with(svc, vec![slice]), &NodeContext::named("n1"));
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.1.1", 8080)]);
    }

    // --- IP families and slice provenance ---

    #[test]
    fn dual_stack_service_gets_its_ipv4_frontends() {
        let mut svc = mk_service("default", "web", "fd00::10", &[("http", 80, "")]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
            spec.ip_family_policy = Some("RequireDualStack".into());
            spec.cluster_ips = Some(vec!["fd00::10".into(), "10.96.0.10".into()]);
        }
        let slice =
            mk_slice("default", "web-a", "web", &[("http", 8080, "")], vec![ready("10.0.0.1")]);
        let d = compute(&index_with(svc, vec![slice]));
        assert_eq!(d.frontends.keys().copied().collect::<Vec<_>>(), vec![tcp(80)]);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080)]);
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn ipv6_only_service_yields_nothing_and_no_error() {
        let mut svc = mk_service("default", "web", "fd00::10", &[("http", 80, "")]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv6".into()]);
            spec.ip_family_policy = Some("SingleStack".into());
        }
        let mut v6_slice = mk_slice("default", "web-a", "web", &[("http", 8080, "")], vec![]);
        v6_slice.address_type = "IPv6".into();
        v6_slice.endpoints = vec![ready("fd00:1::1")];
        let index = index_with(svc, vec![v6_slice]);
        let d = compute_for(&index, &NodeContext::named("n1"));
        assert!(d.frontends.is_empty(), "{d:?}");
        assert!(d.skipped.is_empty(), "{d:?}");
        assert!(index.skipped_counts().is_empty());
    }

    #[test]
    fn hand_made_slices_work_like_controller_made_ones() {
        const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
        let with_manager = |name: &str, manager: Option<&str>, ep: &str| {
            let mut s = mk_slice("default", name, "web", &[("http", 8080, "")], vec![ready(ep)]);
            if let (Some(labels), Some(m)) = (s.metadata.labels.as_mut(), manager) {
                labels.insert(MANAGED_BY.to_string(), m.to_string());
            }
            s
        };
        // A Service without a selector, as for hand-made slices.
        let svc = web();
        assert!(svc.spec.as_ref().is_some_and(|s| s.selector.is_none()));
        let by_hand = index_with(
            svc.clone(),
            vec![
                with_manager("web-a", None, "10.0.0.1"),
                with_manager("web-b", Some("staff.example.com/by-hand"), "10.0.0.2"),
            ],
        );
        let by_controller = index_with(
            svc,
            vec![
                with_manager("web-a", Some("endpointslice-controller.k8s.io"), "10.0.0.1"),
                with_manager("web-b", Some("endpointslice-controller.k8s.io"), "10.0.0.2"),
            ],
        );
        let d = compute(&by_hand);
        assert_eq!(backends_of(&d, tcp(80)), vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]);
        assert_eq!(d, compute(&by_controller));
    }

    /// `web` as a LoadBalancer with nodePort 30080, an ingress IP, source ranges and an
    /// externalIP, on an index that also holds node `n1` (192.168.0.10 and 203.0.113.5).
    fn north_south(local: bool) -> Index {
        use k8s_openapi::api::core::v1 as corev1;
        let mut svc = web();
        let spec = svc.spec.as_mut().expect("spec");
        spec.type_ = Some("LoadBalancer".into());
        spec.ports.as_mut().expect("ports")[0].node_port = Some(30080);
        spec.external_ips = Some(vec!["198.51.100.7".into(), "192.0.2.9".into()]);
        spec.load_balancer_source_ranges = Some(vec!["10.1.0.0/16".into()]);
        if local {
            spec.external_traffic_policy = Some("Local".into());
        }
        svc.status = Some(corev1::ServiceStatus {
            load_balancer: Some(corev1::LoadBalancerStatus {
                ingress: Some(vec![corev1::LoadBalancerIngress {
                    ip: Some("203.0.113.10".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let mut index = index_with(svc, spread_slices());
        index.apply(corev1::Node {
            metadata: meta("", "n1", &[]),
            status: Some(corev1::NodeStatus {
                addresses: Some(vec![
                    corev1::NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.0.10".into(),
                    },
                    corev1::NodeAddress {
                        type_: "ExternalIP".into(),
                        address: "203.0.113.5".into(),
                    },
                    corev1::NodeAddress { type_: "Hostname".into(), address: "n1".into() },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        });
        index
    }

    fn spread_slices() -> Vec<discoveryv1::EndpointSlice> {
        vec![mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![on("n1", ready("10.0.1.1")), on("n2", ready("10.0.2.1"))],
        )]
    }

    fn external_of(d: &Desired, addr: [u8; 4], port: u16) -> (&Frontend, &ExternalFrontend) {
        let f = d
            .frontends
            .get(&ServiceKeyV4::new(addr, port, IPPROTO_TCP))
            .unwrap_or_else(|| panic!("no frontend {addr:?}:{port} in {:?}", d.frontends.keys()));
        (f, f.external.as_ref().expect("an external frontend"))
    }

    #[test]
    fn nodeports_lb_ips_and_external_ips_become_external_frontends() {
        let index = north_south(false);
        let d = compute_for(&index, &NodeContext::named("n1"));
        let both = vec![be("10.0.1.1", 8080), be("10.0.2.1", 8080)];
        assert!(d.frontends[&tcp(80)].external.is_none(), "the ClusterIP stays internal");
        for node_ip in [[192, 168, 0, 10], [203, 0, 113, 5]] {
            let (f, e) = external_of(&d, node_ip, 30080);
            assert_eq!((e.kind, f.backends.clone()), (ExternalKind::NodePort, both.clone()));
            assert!(e.source_ranges.is_empty(), "ranges are for the LoadBalancer IP only");
        }
        let (_, e) = external_of(&d, [203, 0, 113, 10], 80);
        assert_eq!(e.kind, ExternalKind::LoadBalancer);
        assert_eq!(e.source_ranges, vec!["10.1.0.0/16".parse().unwrap()]);
        for ip in [[198, 51, 100, 7], [192, 0, 2, 9]] {
            assert_eq!(external_of(&d, ip, 80).1.kind, ExternalKind::ExternalIp);
        }
        // 2 node IPs + 1 LB IP + 2 external IPs + the ClusterIP.
        assert_eq!(d.frontends.len(), 6);
        // Another node, without a Node object here: no NodePort keys, the rest the same.
        let d = compute_for(&index, &NodeContext::named("n9"));
        assert_eq!(d.frontends.len(), 4);
    }

    #[test]
    fn external_traffic_policy_local_keeps_this_nodes_endpoints_only() {
        let index = north_south(true);
        let d = compute_for(&index, &NodeContext::named("n1"));
        let (f, e) = external_of(&d, [192, 168, 0, 10], 30080);
        assert!(e.traffic_policy_local);
        assert_eq!(f.backends, vec![be("10.0.1.1", 8080)]);
        assert!(!f.no_local_endpoints);
        // The ClusterIP follows internalTrafficPolicy, not the external one.
        assert_eq!(d.frontends[&tcp(80)].backends.len(), 2);
        // A node with no endpoint: the external frontends drop (kube-proxy's DROP).
        let d = compute_for(&index, &NodeContext::named("n3"));
        let (f, _) = external_of(&d, [203, 0, 113, 10], 80);
        assert!(f.backends.is_empty() && f.no_local_endpoints);
    }

    #[test]
    fn the_external_ip_allowlist_skips_the_others_with_a_reason() {
        let index = north_south(false);
        let node = NodeContext {
            node_name: Some("n1".into()),
            external_ip_allow: Some(vec!["198.51.100.0/24".parse().unwrap()]),
        };
        let d = compute_for(&index, &node);
        assert!(d.frontends.contains_key(&ServiceKeyV4::new([198, 51, 100, 7], 80, IPPROTO_TCP)));
        assert!(!d.frontends.contains_key(&ServiceKeyV4::new([192, 0, 2, 9], 80, IPPROTO_TCP)));
        assert!(
            d.skipped
                .iter()
                .any(|(_, why)| why.contains("192.0.2.9") && why.contains("--external-ip-cidr")),
            "{:?}",
            d.skipped
        );
        // The LoadBalancer IP is not an externalIP: the allowlist does not apply.
        assert!(d.frontends.contains_key(&ServiceKeyV4::new([203, 0, 113, 10], 80, IPPROTO_TCP)));
    }

    #[test]
    fn endpoint_changes_update_external_frontends_incrementally() {
        let mut index = north_south(true);
        let node = NodeContext::named("n1");
        let mut d = compute_for(&index, &node);
        index.take_dirty();
        index.apply(mk_slice(
            "default",
            "web-a",
            "web",
            &[("http", 8080, "")],
            vec![on("n1", ready("10.0.1.1")), on("n1", ready("10.0.1.2"))],
        ));
        let dirty = index.take_dirty();
        let changed = update(&mut d, &index, &node, &dirty).expect("incremental");
        assert_eq!(d, compute_for(&index, &node));
        assert!(changed.contains(&ServiceKeyV4::new([192, 168, 0, 10], 30080, IPPROTO_TCP)));
        assert!(changed.contains(&ServiceKeyV4::new([203, 0, 113, 10], 80, IPPROTO_TCP)));
    }
}
