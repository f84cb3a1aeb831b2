//! The Kubernetes API as a source: one kube-rs [`watcher`] per [`Kind`].
//!
//! Watchers are used à la carte, not through a `Controller`: a controller reconciles objects
//! that still exist and never reports one that was deleted while it was not looking, which
//! is exactly what the datapath must not miss. The [`Index`](crate::index::Index) plays the
//! reflector's part (a store of every object), keeping only the validated model instead of
//! kube's cache of whole objects, so a second copy of every Pod is never held.
//!
//! How the watcher's events become [`Event`]s:
//!
//! | `watcher::Event`  | sent                                                              |
//! |-------------------|-------------------------------------------------------------------|
//! | `Init`            | nothing: a relist starts, its keys are collected                  |
//! | `InitApply(obj)`  | `Apply(obj)`, in chunks ([`Settings::relist_chunk`], 500)         |
//! | `InitDone`        | `Retain(kind, keys)`: what was not relisted is deleted            |
//! | `Apply(obj)`      | `Apply(obj)`                                                      |
//! | `Delete(obj)`     | `Delete(kind, key)`                                               |
//!
//! This is what makes a relist converge without a transient loss: relisted objects only
//! ever replace their previous versions (an unchanged Service never disappears), and
//! deletions wait for `InitDone`, when the `Retain` removes what the API no longer has
//! (deleted while the agent was disconnected, its DELETED event lost or compacted away
//! behind a `410 Gone`). Only keys are held across the relist, never the objects: a list of
//! 150,000 Pods streams into the index page by page.
//!
//! **Faults.** Any error from a watcher (the API server unreachable, a refused or broken
//! watch, an expired resourceVersion) marks the kind stale in [`SourceHealth`], logs how
//! stale it is, and restarts that watcher after a backoff (exponential with jitter, reset
//! by a successful relist). A restarted watcher relists first, so after an outage every
//! kind converges to exactly the API's state. Meanwhile nothing is sent: the datapath keeps
//! what was last programmed and traffic keeps flowing.
//!
//! **Memory.** Objects are [`trim`]med as they arrive, before they are queued: managed
//! fields, owner references, every annotation the agent does not read, Node images and
//! conditions. Pods, the bulk of a cluster, are not even decoded whole: they are watched as
//! [`LeanPod`]s, which hold only labels, node, host-network flag, container ports, IPs and
//! phase.
//!
//! **Filtering like kube-proxy.** Services and EndpointSlices are watched with kube-proxy's
//! label selector (`!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`),
//! so objects another proxy owns never reach the node; the index applies the same rules to
//! objects from files. The Node watch is restricted to this agent's node by a field selector.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, pin_mut};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    runtime::watcher::{self, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Batch, Event, Kind, Object, ObjectKey, lean::LeanPod};

/// The annotation an EndpointSlice carries with the time of the change that triggered it;
/// the only annotation kept, for the network programming latency metric.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// kube-proxy's selector for Services and EndpointSlices.
pub const PROXIED_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// What the source needs to know to watch.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name: only its Node object is watched.
    pub node_name: String,
    /// Page size of the lists (kube's default is 500).
    pub page_size: u32,
    /// Server-side timeout of each watch call. kube notices a silently dead connection after
    /// this plus 5 s.
    pub watch_timeout: Duration,
    /// First and longest pause before a failed watcher is restarted.
    pub backoff: (Duration, Duration),
    /// How many relisted objects travel together. A relist is sent as it arrives, in chunks
    /// of `Apply`s closed by one `Retain`, so no copy of the whole list is ever held.
    pub relist_chunk: usize,
}

impl Settings {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            page_size: 500,
            watch_timeout: Duration::from_secs(290),
            backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            relist_chunk: 500,
        }
    }
}

/// Per-kind state of the watches, shared with health checks and metrics.
#[derive(Clone, Debug, Default)]
pub struct SourceHealth(Arc<Mutex<BTreeMap<Kind, KindHealth>>>);

#[derive(Clone, Debug, Default)]
pub struct KindHealth {
    /// When the watch last failed and has not recovered since (a relist completing or an
    /// event arriving recovers it).
    pub failing_since: Option<Instant>,
    /// When the last data for this kind arrived (an event or the end of a relist).
    pub last_data: Option<Instant>,
    /// Completed lists, the first one included.
    pub lists: u64,
    /// Watcher errors seen.
    pub errors: u64,
    pub last_error: Option<String>,
}

impl SourceHealth {
    pub fn get(&self, kind: Kind) -> KindHealth {
        self.lock().get(&kind).cloned().unwrap_or_default()
    }

    /// How long `kind` has been without a working watch: zero while it works.
    pub fn stale_for(&self, kind: Kind, now: Instant) -> Duration {
        let h = self.get(kind);
        match h.failing_since {
            // Stale since the last data we had (or the failure, if there never was any).
            Some(since) => now.saturating_duration_since(h.last_data.unwrap_or(since).min(since)),
            None => Duration::ZERO,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Kind, KindHealth>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, kind: Kind, f: impl FnOnce(&mut KindHealth)) {
        f(self.lock().entry(kind).or_default())
    }
}

/// Watches every [`Kind`] until `tx` closes. Each kind runs on its own task.
pub async fn run(
    client: Client,
    settings: Settings,
    tx: mpsc::Sender<Batch>,
    health: SourceHealth,
) {
    let proxied = || {
        watcher::Config::default()
            .labels(PROXIED_SELECTOR)
            .page_size(settings.page_size)
            .timeout(settings.watch_timeout.as_secs() as u32)
    };
    let plain = || {
        watcher::Config::default()
            .page_size(settings.page_size)
            .timeout(settings.watch_timeout.as_secs() as u32)
    };
    let own_node = plain().fields(&format!("metadata.name={}", settings.node_name));
    let spawn = Spawner { client: &client, settings: &settings, tx: &tx, health: &health };
    let tasks = [
        spawn.watch::<Namespace>(Kind::Namespace, plain()),
        spawn.watch::<Node>(Kind::Node, own_node),
        // Pods are decoded lean: only what the index reads (see `lean`).
        spawn.watch::<LeanPod>(Kind::Pod, plain()),
        spawn.watch::<NetworkPolicy>(Kind::NetworkPolicy, plain()),
        spawn.watch::<Service>(Kind::Service, proxied()),
        spawn.watch::<EndpointSlice>(Kind::EndpointSlice, proxied()),
    ];
    for task in tasks {
        let _ = task.await;
    }
}

/// What every kind's watcher task shares.
struct Spawner<'a> {
    client: &'a Client,
    settings: &'a Settings,
    tx: &'a mpsc::Sender<Batch>,
    health: &'a SourceHealth,
}

impl Spawner<'_> {
    /// Starts `kind`'s watcher (objects of type `K`) on its own task.
    fn watch<K>(&self, kind: Kind, config: watcher::Config) -> tokio::task::JoinHandle<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        Object: From<K>,
    {
        let api = Api::<K>::all(self.client.clone());
        tokio::spawn(watch_kind(kind, api, config, self.settings, self.tx, self.health))
    }
}

/// One kind's watcher, restarted (and so relisted) after every error, until `tx` closes.
fn watch_kind<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    settings: &Settings,
    tx: &mpsc::Sender<Batch>,
    health: &SourceHealth,
) -> impl Future<Output = ()> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Object: From<K>,
{
    let (settings, tx, health) = (settings.clone(), tx.clone(), health.clone());
    async move {
        let mut backoff = Backoff::new(settings.backoff.0, settings.backoff.1);
        loop {
            let chunk = settings.relist_chunk.max(1);
            match watch_once(&api, config.clone(), kind, chunk, &tx, &health, &mut backoff).await {
                Stop::ChannelClosed => return,
                Stop::Failed(error) => {
                    let now = Instant::now();
                    health.update(kind, |h| {
                        h.errors += 1;
                        h.failing_since.get_or_insert(now);
                        h.last_error = Some(error.clone());
                    });
                    let stale = health.stale_for(kind, now);
                    let pause = backoff.next();
                    warn!(
                        %kind, %error,
                        stale_s = stale.as_secs(),
                        retry_in_ms = pause.as_millis() as u64,
                        "watch failed; the datapath keeps its last state; relisting after a pause"
                    );
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

enum Stop {
    ChannelClosed,
    Failed(String),
}

async fn watch_once<K>(
    api: &Api<K>,
    config: watcher::Config,
    kind: Kind,
    chunk: usize,
    tx: &mpsc::Sender<Batch>,
    health: &SourceHealth,
    backoff: &mut Backoff,
) -> Stop
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Object: From<K>,
{
    let stream = watcher(api.clone(), config);
    pin_mut!(stream);
    // During a relist: the keys seen so far, and the Applys not sent yet.
    let mut relist: Option<BTreeSet<ObjectKey>> = None;
    let mut pending: Vec<Event> = Vec::new();
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => return Stop::Failed(e.to_string()),
        };
        let received = Instant::now();
        match event {
            watcher::Event::Init => {
                relist = Some(BTreeSet::new());
                pending.clear();
                continue;
            }
            watcher::Event::InitApply(obj) => {
                let mut obj = Object::from(obj);
                trim(&mut obj);
                relist.get_or_insert_with(BTreeSet::new).insert(obj.key());
                pending.push(Event::Apply(obj));
                if pending.len() < chunk {
                    continue;
                }
            }
            watcher::Event::InitDone => {
                let keys = relist.take().unwrap_or_default();
                let count = keys.len();
                let first = health.get(kind).lists == 0;
                health.update(kind, |h| {
                    h.lists += 1;
                    h.failing_since = None;
                    h.last_data = Some(received);
                });
                backoff.reset();
                if first {
                    info!(%kind, objects = count, "initial list done");
                } else {
                    info!(%kind, objects = count, "relisted");
                }
                pending.push(Event::Retain(kind, keys));
            }
            watcher::Event::Apply(obj) => {
                let mut obj = Object::from(obj);
                trim(&mut obj);
                pending.push(Event::Apply(obj));
            }
            watcher::Event::Delete(obj) => {
                pending.push(Event::Delete(kind, Object::from(obj).key()));
            }
        }
        if relist.is_none() {
            health.update(kind, |h| {
                h.failing_since = None;
                h.last_data = Some(received);
            });
        }
        let events = std::mem::take(&mut pending);
        if tx.send(Batch { events, received }).await.is_err() {
            return Stop::ChannelClosed;
        }
    }
    // The watcher stream never ends on its own; treat it as a failure if it does.
    Stop::Failed("watch stream ended".to_string())
}

/// Drops what the agent never reads, so that watching every Pod of a large cluster stays
/// small: see the module docs.
pub fn trim(obj: &mut Object) {
    let keep_annotation = |name: &str| match obj.kind() {
        Kind::EndpointSlice => name == TRIGGER_TIME_ANNOTATION,
        _ => false,
    };
    let annotations = obj.meta().annotations.as_ref().map(|a| {
        a.iter().filter(|(k, _)| keep_annotation(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
    });
    let meta = obj.meta_mut();
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        annotations: annotations.filter(|a: &BTreeMap<_, _>| !a.is_empty()),
        resource_version: meta.resource_version.take(),
        uid: meta.uid.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
    match obj {
        Object::Node(node) => {
            if let Some(status) = &mut node.status {
                // Keep the addresses; drop images (often the largest part), conditions...
                *status = k8s_openapi::api::core::v1::NodeStatus {
                    addresses: status.addresses.take(),
                    ..Default::default()
                };
            }
        }
        Object::Service(svc) => {
            if let Some(status) = &mut svc.status {
                status.conditions = None;
            }
        }
        // Pods arrive lean (`lean::LeanPod`): nothing left to drop.
        Object::Pod(_)
        | Object::EndpointSlice(_)
        | Object::Namespace(_)
        | Object::NetworkPolicy(_) => {}
    }
}

/// Exponential backoff with jitter, as client-go's reflector does.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, next: first }
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to +50% jitter so a fleet of agents does not relist in lockstep.
        let jitter = base.mul_f64(0.5 * jitter_fraction());
        (base + jitter).min(self.max)
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A fraction in [0, 1) from the clock's low bits: enough to spread retries.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::SERVICE_PROXY_NAME_LABEL;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next();
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(150));
        for _ in 0..10 {
            b.next();
        }
        assert_eq!(b.next(), Duration::from_secs(1));
        b.reset();
        assert!(b.next() < Duration::from_millis(150));
    }

    #[test]
    fn trimming_keeps_only_the_trigger_time_annotation_of_slices() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "d", "annotations": {
                TRIGGER_TIME_ANNOTATION: "2026-11-28T10:00:00Z", "other": "x"}},
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap();
        let mut obj = Object::EndpointSlice(slice);
        trim(&mut obj);
        let annotations = obj.meta().annotations.clone().unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), [TRIGGER_TIME_ANNOTATION]);
    }

    #[test]
    fn selector_is_kube_proxys() {
        assert!(PROXIED_SELECTOR.contains(&format!("!{SERVICE_PROXY_NAME_LABEL}")));
    }
}
