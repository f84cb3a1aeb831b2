//! Pods as the API source reads them: only the fields the index uses are deserialized.
//!
//! A Pod from the API server is ~6 KB of JSON, 40% of it `managedFields`, and most of the
//! rest container images, env, probes, volumes and status conditions. Decoding all of that
//! into k8s-openapi's `Pod` (FieldsV1 into `serde_json::Value` trees) only to drop it cost
//! half of a Pod's decoding time and most of the allocator churn of a large Pod list.
//! [`LeanPod`] declares just what the index reads; serde skips everything else without
//! allocating. It is a `kube::Resource` (kind Pod), so kube's watcher lists and
//! watches it like any Pod, and it converts into a k8s-openapi `Pod` holding just those
//! fields, which the index reads exactly as it reads a full one.

use std::collections::BTreeMap;

use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{Deserialize, Deserializer};

use super::Object;

/// A Pod with only what the agent reads.
#[derive(Clone, Debug, Deserialize)]
pub struct LeanPod {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<LeanSpec>,
    #[serde(default)]
    status: Option<LeanStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    uid: Option<String>,
    resource_version: Option<String>,
    deletion_timestamp: Option<Time>,
}

fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        uid: m.uid,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanSpec {
    node_name: Option<String>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<LeanContainer>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanContainer {
    #[serde(default)]
    name: String,
    ports: Option<Vec<LeanPort>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPort {
    name: Option<String>,
    container_port: i32,
    protocol: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<LeanIp>>,
}

#[derive(Clone, Debug, Deserialize)]
struct LeanIp {
    ip: String,
}

impl k8s_openapi::Resource for LeanPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::Metadata for LeanPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl From<LeanPod> for Pod {
    fn from(p: LeanPod) -> Self {
        let container = |c: LeanContainer| Container {
            name: c.name,
            ports: c.ports.map(|ps| {
                ps.into_iter()
                    .map(|p| ContainerPort {
                        name: p.name,
                        container_port: p.container_port,
                        protocol: p.protocol,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
        Pod {
            metadata: p.metadata,
            spec: p.spec.map(|s| PodSpec {
                node_name: s.node_name,
                host_network: s.host_network,
                containers: s.containers.into_iter().map(container).collect(),
                ..Default::default()
            }),
            status: p.status.map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s.pod_ips.map(|ips| ips.into_iter().map(|i| PodIP { ip: i.ip }).collect()),
                ..Default::default()
            }),
        }
    }
}

impl From<LeanPod> for Object {
    fn from(p: LeanPod) -> Self {
        Object::Pod(p.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{index::Index, source::kube::trim};

    /// A Pod as the API server returns it, with everything the agent ignores.
    fn full_pod() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "demo", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web", "uid": "r"}]
            },
            "spec": {
                "nodeName": "n1", "hostNetwork": false,
                "containers": [
                    {"name": "web", "image": "nginx:1.27", "env": [{"name": "A", "value": "b"}],
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP",
                                "hostPort": 80},
                               {"name": "diameter", "containerPort": 3868, "protocol": "SCTP"}],
                     "livenessProbe": {"httpGet": {"path": "/", "port": 8080}}},
                    {"name": "sidecar", "image": "envoy"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "web", "image": "nginx", "imageID": "x",
                                       "ready": true, "restartCount": 0}]
            }
        })
    }

    #[test]
    fn a_lean_pod_keeps_what_the_index_reads_and_nothing_else() {
        let full: Pod = serde_json::from_value(full_pod()).unwrap();
        let lean: LeanPod = serde_json::from_value(full_pod()).unwrap();
        let Object::Pod(pod) = Object::from(lean) else { unreachable!() };
        let m = &pod.metadata;
        assert!(
            m.managed_fields.is_none() && m.owner_references.is_none() && m.annotations.is_none()
        );
        assert_eq!(m.labels.as_ref().unwrap()["app"], "web");
        let spec = pod.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none());
        assert_eq!(
            (spec.containers[0].image.as_ref(), spec.containers[0].env.as_ref()),
            (None, None)
        );
        assert!(spec.containers[0].liveness_probe.is_none());
        assert_eq!(spec.containers[0].ports.as_ref().unwrap()[0].host_port, None);
        let status = pod.status.as_ref().unwrap();
        assert!(status.conditions.is_none() && status.container_statuses.is_none());
        // The index sees the same Pod either way, and trim has nothing left to drop.
        let mut from_full = Index::new();
        from_full.apply(full);
        let mut from_lean = Index::new();
        from_lean.apply(pod.clone());
        assert_eq!(from_full.pods().collect::<Vec<_>>(), from_lean.pods().collect::<Vec<_>>());
        // SCTP ports too: a policy's named port may name one.
        assert_eq!(from_lean.pods().next().unwrap().container_ports.len(), 2);
        let mut trimmed = Object::Pod(pod.clone());
        trim(&mut trimmed);
        assert_eq!(trimmed, Object::Pod(pod));
    }

    #[test]
    fn absent_and_null_fields_are_fine() {
        let lean: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "d", "labels": null},
            "spec": {"containers": [{"name": "c", "ports": null}]}
        }))
        .unwrap();
        let Object::Pod(pod) = Object::from(lean) else { unreachable!() };
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert!(pod.status.is_none());
    }
}
