//! What an API server and its controllers would show for the lab's inputs.
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{
            HostIP, Namespace, NamespaceStatus, Node, NodeAddress, NodeCondition, NodeSpec,
            NodeStatus, Pod, PodCondition, PodIP, PodStatus, Service,
        },
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;

use super::{ControlPlane, ControlPlaneError, ObjectKey, READY_ANNOTATION, slices};
use crate::topology::{self, Topology};

/// The label the API server puts on every namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The derived cluster state, each list sorted by namespace and name.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    /// The first node (the only one of a single-node lab).
    pub node: Node,
    /// The nodes after the first, in order; empty on a single-node lab.
    pub other_nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub network_policies: Vec<NetworkPolicy>,
}

impl ControlPlane {
    /// Derives the cluster state from the inputs; see the module docs.
    pub fn cluster(&self) -> Result<Cluster, ControlPlaneError> {
        let (slot, topology) = (self.slot, self.topology);
        let pods: Vec<Pod> = self
            .pods
            .iter()
            .filter_map(|(key, pod)| {
                let node = self.pod_node(key)?;
                Some(running_pod(pod, self.pod_ip(key)?, node, topology.node_ip(slot, node)))
            })
            .collect();
        let services: Vec<Service> = self
            .services
            .iter()
            .map(|(key, svc)| allocated_service(svc, self.service_ip(key)))
            .collect();
        let endpoint_slices = self.endpoint_slices(&pods, &services)?;
        let namespaces = self.namespaces_in_use().into_iter().map(|n| self.namespace(n)).collect();
        let network_policies = self.network_policies.values().cloned().collect();
        let mut nodes = topology.indices().map(|i| node(slot, topology, i));
        let first = nodes.next().expect("a lab has at least one node");
        Ok(Cluster {
            namespaces,
            node: first,
            other_nodes: nodes.collect(),
            pods,
            services,
            endpoint_slices,
            network_policies,
        })
    }

    /// Derived slices plus the hand-written ones, sorted by key.
    fn endpoint_slices(
        &self,
        pods: &[Pod],
        services: &[Service],
    ) -> Result<Vec<EndpointSlice>, ControlPlaneError> {
        let mut all: BTreeMap<ObjectKey, EndpointSlice> = BTreeMap::new();
        for svc in services {
            for slice in slices::derive(svc, pods) {
                all.insert(key_of(&slice.metadata), slice);
            }
        }
        for (key, slice) in &self.endpoint_slices {
            if all.insert(key.clone(), slice.clone()).is_some() {
                return Err(ControlPlaneError::SliceClash { key: key.clone() });
            }
        }
        Ok(all.into_values().collect())
    }

    /// The namespace with the label the API server adds to every namespace (GA in 1.22),
    /// which lets a policy select a namespace by name.
    fn namespace(&self, name: String) -> Namespace {
        let mut ns = self.namespaces.get(&name).cloned().unwrap_or_default();
        ns.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        ns.metadata.name = Some(name);
        ns.status = Some(NamespaceStatus { phase: Some("Active".into()), ..Default::default() });
        ns
    }
}

impl Cluster {
    /// Every node, the first one first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.node).chain(&self.other_nodes)
    }

    /// Multi-document YAML: namespaces, the nodes, pods, services, slices, policies.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut docs = Vec::new();
        push_all(&mut docs, &self.namespaces)?;
        push_all(&mut docs, std::slice::from_ref(&self.node))?;
        push_all(&mut docs, &self.other_nodes)?;
        push_all(&mut docs, &self.pods)?;
        push_all(&mut docs, &self.services)?;
        push_all(&mut docs, &self.endpoint_slices)?;
        push_all(&mut docs, &self.network_policies)?;
        Ok(format!(
            "# Written by nodeplane-lab; rewritten on every change.\n{}",
            docs.join("---\n")
        ))
    }
}

fn push_all<T: Serialize>(docs: &mut Vec<String>, objects: &[T]) -> Result<(), serde_yaml::Error> {
    for object in objects {
        docs.push(serde_yaml::to_string(object)?);
    }
    Ok(())
}

fn key_of(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Ready unless the lab annotation says `"false"`.
pub(super) fn is_ready(pod: &Pod) -> bool {
    let annotation = pod.metadata.annotations.as_ref().and_then(|a| a.get(READY_ANNOTATION));
    annotation.is_none_or(|v| !v.trim().eq_ignore_ascii_case("false"))
}

pub(super) fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// The pod as the kubelet would report it: scheduled on node `node`, running, with its IP.
fn running_pod(pod: &Pod, ip: Ipv4Addr, node: u8, node_ip: Ipv4Addr) -> Pod {
    let mut pod = pod.clone();
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.node_name = Some(topology::node_name(node));
    for port in spec.containers.iter_mut().flat_map(|c| c.ports.iter_mut().flatten()) {
        port.protocol.get_or_insert_with(|| "TCP".into());
    }
    let ready = if is_ready(&pod) { "True" } else { "False" };
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.to_string()),
        pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
        host_ip: Some(node_ip.to_string()),
        host_ips: Some(vec![HostIP { ip: node_ip.to_string() }]),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: ready.into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

/// The service with API-server defaults filled in and its ClusterIP (or `None`).
fn allocated_service(svc: &Service, ip: Option<Ipv4Addr>) -> Service {
    let mut svc = svc.clone();
    let spec = svc.spec.get_or_insert_with(Default::default);
    let external = spec.type_.as_deref() == Some("ExternalName");
    spec.type_.get_or_insert_with(|| "ClusterIP".into());
    for port in spec.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".into());
        port.target_port.get_or_insert(IntOrString::Int(port.port));
    }
    if !external {
        let ip = ip.map_or_else(|| "None".to_string(), |ip| ip.to_string());
        spec.cluster_ip = Some(ip.clone());
        spec.cluster_ips = Some(vec![ip]);
        spec.ip_families = Some(vec!["IPv4".into()]);
        spec.ip_family_policy.get_or_insert_with(|| "SingleStack".into());
    }
    svc
}

/// Node `index` as the kubelet and the node IPAM controller would show it.
fn node(slot: u8, topology: Topology, index: u8) -> Node {
    let name = topology::node_name(index);
    let labels = [("kubernetes.io/hostname", name.as_str()), ("kubernetes.io/os", "linux")];
    let pod_cidr = topology.pod_cidr(slot, index);
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.into_iter().map(|(k, v)| (k.into(), v.into())).collect()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(pod_cidr.clone()),
            pod_cidrs: Some(vec![pod_cidr]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: topology.node_ip(slot, index).to_string(),
                },
                NodeAddress { type_: "Hostname".into(), address: name },
            ]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}
