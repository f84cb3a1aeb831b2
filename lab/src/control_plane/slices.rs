//! EndpointSlices for a Service with a selector, derived as the EndpointSlice controller
//! (`pkg/controller/endpointslice`) does:
//!
//! 1. Candidates are the pods in the Service's namespace whose labels contain every
//!    selector label (an empty selector counts as none: the API server stores `{}` as nil).
//! 2. Each pod resolves each ServicePort on its own: an int `targetPort` is used as is, a
//!    named one is looked up in that pod's container ports by name *and* protocol. A pod
//!    lacking the name is not an endpoint for that port.
//! 3. Pods are grouped by their resolved port list; each group becomes one slice (split
//!    at 100 endpoints, the controller's default), named `<svc>-<k>` in sorted order of
//!    the groups. A Service matching no pods gets one empty slice, like the controller's
//!    placeholder.
//! 4. Conditions: ready = Ready and not terminating; serving = Ready; terminating =
//!    `deletionTimestamp` set.
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    MANAGED_BY,
    render::{is_ready, is_terminating},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// One resolved port of an endpoint group; the derived order groups pods deterministically.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey {
    name: String,
    protocol: String,
    port: i32,
}

/// Slices for `svc` (with defaults applied) over `pods` (running, with `status.podIP`).
/// Empty for services without a selector.
pub fn derive(svc: &Service, pods: &[Pod]) -> Vec<EndpointSlice> {
    let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let service_ports = spec.ports.as_deref().unwrap_or_default();
    let mut groups: BTreeMap<Vec<PortKey>, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        let labels = pod.metadata.labels.as_ref();
        let matches = selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        if pod.metadata.namespace.as_deref() != Some(namespace) || !matches {
            continue;
        }
        let Some(endpoint) = endpoint(pod) else { continue };
        let ports = service_ports.iter().filter_map(|sp| resolve(sp, pod)).collect();
        groups.entry(ports).or_default().push(endpoint);
    }
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    let mut slices = Vec::new();
    for (ports, endpoints) in &mut groups {
        endpoints.sort_by_key(|e| e.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()));
        if endpoints.is_empty() {
            slices.push(slice(svc, slices.len(), ports, &[]));
        }
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(slice(svc, slices.len(), ports, chunk));
        }
    }
    slices
}

/// The port `sp` resolves to on `pod`, or `None` if the pod lacks the named port.
fn resolve(sp: &ServicePort, pod: &Pod) -> Option<PortKey> {
    let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
    let port = match &sp.target_port {
        None | Some(IntOrString::Int(0)) => sp.port,
        Some(IntOrString::Int(port)) => *port,
        Some(IntOrString::String(name)) => {
            let containers = pod.spec.iter().flat_map(|s| &s.containers);
            let mut ports = containers.flat_map(|c| c.ports.iter().flatten());
            let found = ports.find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            });
            found?.container_port
        }
    };
    Some(PortKey { name: sp.name.clone().unwrap_or_default(), protocol, port })
}

fn endpoint(pod: &Pod) -> Option<Endpoint> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let (ready, terminating) = (is_ready(pod), is_terminating(pod));
    Some(Endpoint {
        addresses: vec![ip],
        conditions: Some(EndpointConditions {
            ready: Some(ready && !terminating),
            serving: Some(ready),
            terminating: Some(terminating),
        }),
        // The node `running_pod` scheduled it on.
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn slice(svc: &Service, k: usize, ports: &[PortKey], endpoints: &[Endpoint]) -> EndpointSlice {
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let mut labels = BTreeMap::from([
        (SERVICE_NAME_LABEL.to_string(), svc_name.clone()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
    ]);
    let headless = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    if headless {
        labels.insert(HEADLESS_LABEL.to_string(), String::new());
    }
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{svc_name}-{k}")),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: endpoints.to_vec(),
        ports: Some(
            ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(p.port),
                    protocol: Some(p.protocol.clone()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}
