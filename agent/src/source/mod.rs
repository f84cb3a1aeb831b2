//! Where cluster state comes from.
//!
//! Every source (the YAML directory in [`files`], the API server's watches in [`kube`]) speaks the same
//! small language: [`Event`]s carrying whole k8s objects. The [`Index`](crate::index::Index)
//! is the only consumer, so a new source needs no change downstream.
//!
//! The events follow kubert's index contract, which is also what kube-rs' `watcher` emits:
//!
//! | event                 | kube-rs `watcher::Event`          | meaning                                   |
//! |-----------------------|-----------------------------------|-------------------------------------------|
//! | `Apply(obj)`          | `Apply(obj)`, `InitApply(obj)`    | create or replace this object             |
//! | `Delete(kind, key)`   | `Delete(obj)`                     | this object is gone                       |
//! | `Reset(kind, objs)`   | (the file source's whole directory) | `objs` is *all* of `kind`; drop the rest  |
//! | `Retain(kind, keys)`  | `InitDone` (after `InitApply`s sent as `Apply`s) | drop every object of `kind` not in `keys` |
//!
//! A `Reset` or `Retain` is how deletions missed while disconnected are noticed: without it, a Service
//! deleted during a watch gap would keep its datapath entries forever.
use std::fmt;

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub mod files;
pub mod kube;
pub mod lean;

/// The object kinds the agent consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    Node,
    NetworkPolicy,
}

impl Kind {
    /// Every kind, in the order sources emit their `Reset`s.
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    /// Whether objects of this kind live in a namespace.
    pub const fn is_namespaced(self) -> bool {
        matches!(self, Kind::Service | Kind::EndpointSlice | Kind::Pod | Kind::NetworkPolicy)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// The API group and resource (plural) the kind is listed and watched as.
    pub const fn resource(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "endpointslices"),
            Kind::Pod => ("", "pods"),
            Kind::Namespace => ("", "namespaces"),
            Kind::Node => ("", "nodes"),
            Kind::NetworkPolicy => ("networking.k8s.io", "networkpolicies"),
        }
    }
}

/// What the agent's API source lists and watches, as `(apiGroup, resource)`: exactly what
/// its ClusterRole must grant get/list/watch on (checked by `tests/tests/manifests.rs`).
pub const WATCHED: [(&str, &str); 6] = {
    let mut out = [("", ""); 6];
    let mut i = 0;
    while i < Kind::ALL.len() {
        out[i] = Kind::ALL[i].resource();
        i += 1;
    }
    out
};

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an object within its kind: `namespace/name`, or `name` for cluster-scoped
/// kinds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn namespaced(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: Some(namespace.into()), name: name.into() }
    }

    pub fn cluster(name: impl Into<String>) -> Self {
        Self { namespace: None, name: name.into() }
    }

    /// The key of an object of `kind` described by `meta`. Cluster-scoped kinds never get a
    /// namespace, whatever the metadata says.
    pub fn from_meta(kind: Kind, meta: &ObjectMeta) -> Self {
        Self {
            namespace: if kind.is_namespaced() { meta.namespace.clone() } else { None },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A k8s object of one of the consumed kinds.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a Pod is ~2 KiB inline, but objects already own several KiB on the heap and are \
              moved a few times per event; boxing would only add an allocation"
)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Namespace(Namespace),
    Node(Node),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Namespace(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::NetworkPolicy(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey::from_meta(self.kind(), self.meta())
    }
}

macro_rules! impl_from {
    ($($t:ident),*) => {$(
        impl From<$t> for Object {
            fn from(o: $t) -> Self {
                Object::$t(o)
            }
        }
    )*};
}
impl_from!(Service, EndpointSlice, Pod, Namespace, Node, NetworkPolicy);

/// Events a source hands over together, with the time it received them (for the
/// event-to-datapath latency).
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub received: std::time::Instant,
}

impl Batch {
    pub fn now(events: Vec<Event>) -> Self {
        Self { events, received: std::time::Instant::now() }
    }
}

/// One change to the cluster state as a source saw it.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "an Apply is as large as the Object it carries; see Object"
)]
pub enum Event {
    /// Create or replace an object.
    Apply(Object),
    /// The object of this kind and key is gone.
    Delete(Kind, ObjectKey),
    /// The complete set of objects of this kind: anything of the kind not listed is deleted.
    Reset(Kind, Vec<Object>),
    /// The end of a relist whose objects came as `Apply`s: anything of this kind whose key
    /// is not in the set is deleted. Equivalent to a `Reset` with those objects, without
    /// holding them all at once.
    Retain(Kind, std::collections::BTreeSet<ObjectKey>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_display() {
        assert_eq!(ObjectKey::namespaced("default", "foo").to_string(), "default/foo");
        assert_eq!(ObjectKey::cluster("node-1").to_string(), "node-1");
    }

    #[test]
    fn cluster_scoped_keys_drop_namespace() {
        let meta = ObjectMeta {
            name: Some("kube-system".into()),
            namespace: Some("ignored".into()),
            ..Default::default()
        };
        assert_eq!(ObjectKey::from_meta(Kind::Namespace, &meta), ObjectKey::cluster("kube-system"));
        assert_eq!(
            ObjectKey::from_meta(Kind::Pod, &meta),
            ObjectKey::namespaced("ignored", "kube-system")
        );
    }
}
