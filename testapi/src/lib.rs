//! An in-process Kubernetes API server for tests, speaking the real HTTP list/watch protocol
//! so that kube-rs's own [`kube::Client`], [`kube::Api`] and [`kube::runtime::watcher()`] run
//! against it unchanged, from a kubeconfig that points at it (plain HTTP, no TLS, no auth).
//!
//! ```text
//!  test code ── apply / delete / compact / drop_connections / set_unavailable ──┐
//!                                                                              ▼
//!  kube::Client ──HTTP──▶ http (axum routes) ──▶ store (objects, one global RV, event log,
//!       ▲                       │                       list snapshots) ──feed──┐
//!       └── chunked ND-JSON ◀── watch (replay, live changes, bookmarks) ◀────────┘
//! ```
//!
//! ```no_run
//! # async fn demo() {
//! use k8s_openapi::api::core::v1::Service;
//! use kube::{Api, api::ListParams};
//! use nodeplane_testapi::TestApi;
//!
//! let api = TestApi::start().await.unwrap();
//! let mut svc = Service::default();
//! svc.metadata.name = Some("web".into());
//! svc.metadata.namespace = Some("default".into());
//! api.apply(&svc);
//! let services: Api<Service> = Api::all(api.client().await);
//! assert_eq!(services.list(&ListParams::default()).await.unwrap().items.len(), 1);
//! # }
//! ```
//!
//! # What is emulated
//!
//! - **Kinds:** core/v1 `services`, `pods`, `namespaces`, `nodes`, `endpoints`, `events`;
//!   `discovery.k8s.io/v1` `endpointslices`; `networking.k8s.io/v1` `networkpolicies`;
//!   `events.k8s.io/v1` `events`. Every kind supports list, watch, get, create (POST),
//!   replace (PUT), patch and delete. `/version`, `/api`, `/apis` and per-group discovery
//!   answer too.
//! - **resourceVersion:** one global counter bumped by every write, delete and
//!   [`TestApi::compact`], like etcd's revision.
//! - **Lists** are sorted by namespace then name, honour `limit` (capped by
//!   [`TestApi::set_max_page`]) and `continue`, and every page of one list is the snapshot
//!   taken by its first page. Items carry `apiVersion` and `kind` (the real server omits them
//!   in lists; kube-rs accepts both).
//! - **Watches** replay every change after `resourceVersion` from the event log, then stream
//!   live ones; `resourceVersion` absent or `0` (or `sendInitialEvents=true`) starts with the
//!   current objects as ADDED (then, for `sendInitialEvents`, a BOOKMARK annotated
//!   `k8s.io/initial-events-end`). An update that moves an object into or out of a watch's
//!   selector arrives as ADDED or DELETED, as from the watch cache. `allowWatchBookmarks`
//!   gets a BOOKMARK every [`TestApi::set_bookmark_interval`] (1 s by default);
//!   `timeoutSeconds` ends the stream.
//! - **Selectors:** the full label selector grammar; field selectors on `metadata.name`,
//!   `metadata.namespace` and the per-kind fields the real server registers (for Pods
//!   `spec.nodeName`, `status.phase`, ...). Anything unparsable is a 400.
//! - **Faults:** [`TestApi::compact`] (410 Gone for older watches and continue tokens),
//!   [`TestApi::drop_connections`], [`TestApi::set_unavailable`] (503, which kube-rs retries),
//!   [`TestApi::set_unreachable`] (connections closed), [`TestApi::delete_silently`]
//!   (a deletion only a relist reveals), and a bounded event log
//!   ([`TestApi::set_history_limit`], 100,000 changes by default) past which resuming watches
//!   get 410 as after etcd compaction.
//!
//! # What is not
//!
//! No authentication, authorization, admission, validation or defaulting: objects are
//! stored as given. No `generation`, `managedFields`, finalizers or graceful deletion, no
//! owner-reference garbage collection (deleting a Namespace leaves its objects), no
//! `deletecollection`. Lists are always served at the current resourceVersion
//! (`resourceVersion`/`resourceVersionMatch` on a list are ignored). Optimistic concurrency
//! only on PUT (a stale `metadata.resourceVersion` is a 409).
//! Strategic-merge and server-side-apply patches are applied as JSON merge patches (lists
//! replaced whole); JSON patch is refused with 415. No protobuf, no table output, no
//! `watch` on a single object's URL (kube-rs uses a `metadata.name` field selector).
//!
//! # Performance
//!
//! Each write serializes its object once, into the watch line that the store, the event log
//! and every watcher share; a list page copies those bytes into one buffer. Lists are
//! O(matching objects); a namespaced list only walks its namespace.
#![forbid(unsafe_code)]

mod http;
mod resource;
mod selector;
mod store;
mod watch;

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::Arc,
    time::Duration,
};

use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use serde_json::Value;
use tokio::sync::watch as signal;

pub use store::Stats;
use store::{Store, WriteError, WriteMode};

/// The name of the cluster, user and context in [`TestApi::kubeconfig`].
pub const CONTEXT: &str = "testapi";

/// Why [`TestApi::apply_value`] refused an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the object is not a JSON object")]
    NotAnObject,
    #[error("the object has no {0}")]
    MissingField(&'static str),
    #[error("the test API does not serve {kind} in {api_version}")]
    UnsupportedKind { api_version: String, kind: String },
}

/// Stops the server when the last [`TestApi`] handle is dropped.
struct Shared {
    store: Arc<Store>,
    addr: SocketAddr,
    shutdown: signal::Sender<bool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        // Graceful shutdown waits for open responses: end the watches.
        self.store.disconnect_all();
    }
}

/// A running test API server. Clones share it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct TestApi {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TestApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApi").field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

fn resource_of<K: k8s_openapi::Resource>() -> resource::ResourceId {
    resource::by_type(K::API_VERSION, K::KIND)
        .unwrap_or_else(|| panic!("the test API does not serve {} in {}", K::KIND, K::API_VERSION))
}

fn resource_named(name: &str) -> resource::ResourceId {
    resource::by_name(name).unwrap_or_else(|| panic!("the test API does not serve {name:?}"))
}

/// The namespace an object of `resource` is stored under: `""` for cluster-scoped kinds,
/// `default` when a namespaced kind is given none.
fn namespace_for(resource: resource::ResourceId, namespace: Option<&str>) -> &str {
    if resource::def(resource).namespaced { namespace.unwrap_or("default") } else { "" }
}

impl TestApi {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> std::io::Result<TestApi> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        Self::serve_tokio(listener)
    }

    /// Serves on a listener the caller bound (e.g. inside another network namespace).
    /// Must be called in a tokio runtime; outside one it returns an error.
    pub fn serve(listener: TcpListener) -> std::io::Result<TestApi> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(std::io::Error::other("TestApi::serve must be called in a tokio runtime"));
        }
        listener.set_nonblocking(true)?;
        Self::serve_tokio(tokio::net::TcpListener::from_std(listener)?)
    }

    fn serve_tokio(listener: tokio::net::TcpListener) -> std::io::Result<TestApi> {
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::new());
        let (shutdown, mut stopped) = signal::channel(false);
        let app = http::router(store.clone());
        let listener = http::GatedListener { inner: listener, store: store.clone() };
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::warn!(error = %e, "test API server failed");
            }
        });
        tracing::debug!(%addr, "test API server listening");
        Ok(TestApi { shared: Arc::new(Shared { store, addr, shutdown }) })
    }

    fn store(&self) -> &Store {
        &self.shared.store
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig whose cluster, user and context are all named [`CONTEXT`]; the context's
    /// namespace is `default`.
    pub fn kubeconfig(&self) -> Kubeconfig {
        Kubeconfig {
            clusters: vec![NamedCluster {
                name: CONTEXT.into(),
                cluster: Some(Cluster { server: Some(self.url()), ..Cluster::default() }),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: CONTEXT.into(),
                auth_info: Some(AuthInfo::default()),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: CONTEXT.into(),
                context: Some(Context {
                    cluster: CONTEXT.into(),
                    user: Some(CONTEXT.into()),
                    namespace: Some("default".into()),
                    ..Context::default()
                }),
                ..NamedContext::default()
            }],
            current_context: Some(CONTEXT.into()),
            api_version: Some("v1".into()),
            kind: Some("Config".into()),
            ..Kubeconfig::default()
        }
    }

    pub fn kubeconfig_yaml(&self) -> String {
        serde_yaml::to_string(&self.kubeconfig()).expect("a kubeconfig serializes")
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// The kube-rs config [`TestApi::client`] is built from, to adjust before building a
    /// client (e.g. `default_retry = false`, see [`TestApi::set_unavailable`]). An
    /// `HTTPS_PROXY` in the environment is ignored: loopback traffic must not go through a
    /// proxy.
    ///
    /// # Panics
    /// If kube-rs rejects the kubeconfig, which would be a bug here.
    pub async fn config(&self) -> kube::Config {
        let mut config =
            kube::Config::from_custom_kubeconfig(self.kubeconfig(), &KubeConfigOptions::default())
                .await
                .expect("kube-rs accepts the test API's kubeconfig");
        config.proxy_url = None;
        config
    }

    /// A client built from [`TestApi::kubeconfig`], with kube-rs's defaults (including its
    /// retries of 429/503/504).
    ///
    /// # Panics
    /// If kube-rs rejects the kubeconfig, which would be a bug here.
    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config().await)
            .expect("kube-rs builds a client for the test API")
    }

    /// Creates or replaces (by namespace/name) an object; bumps the global resourceVersion,
    /// sets `metadata.resourceVersion` (and `uid`/`creationTimestamp` if missing, keeping
    /// those of the object it replaces), and emits ADDED or MODIFIED. A namespaced object
    /// without a namespace goes to `default`. Returns the new resourceVersion.
    ///
    /// # Panics
    /// If the kind is not served (see the crate docs) or the object has no name.
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, obj: &K) -> u64 {
        let value = serde_json::to_value(obj).expect("a k8s-openapi object serializes");
        let resource = resource_of::<K>();
        self.write(resource, value).unwrap_or_else(|e| panic!("apply {}: {e}", K::KIND))
    }

    /// [`TestApi::apply`] for a JSON object carrying `apiVersion` and `kind`.
    pub fn apply_value(&self, obj: Value) -> Result<u64, Error> {
        if !obj.is_object() {
            return Err(Error::NotAnObject);
        }
        let field =
            |f: &'static str| obj.get(f).and_then(Value::as_str).ok_or(Error::MissingField(f));
        let (api_version, kind) = (field("apiVersion")?, field("kind")?);
        let resource = resource::by_type(api_version, kind).ok_or_else(|| {
            Error::UnsupportedKind { api_version: api_version.to_owned(), kind: kind.to_owned() }
        })?;
        self.write(resource, obj)
    }

    fn write(&self, resource: resource::ResourceId, value: Value) -> Result<u64, Error> {
        match self.store().write(resource, value, WriteMode::Upsert) {
            Ok(o) => Ok(o.rv),
            Err(WriteError::MissingName) => Err(Error::MissingField("metadata.name")),
            Err(e) => unreachable!("an upsert cannot fail with {e}"),
        }
    }

    /// Deletes an object; watchers get DELETED with its last state at a new
    /// resourceVersion. `namespace` is ignored for cluster-scoped kinds and defaults to
    /// `default` for namespaced ones. Returns false if it did not exist.
    ///
    /// # Panics
    /// If the kind is not served.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        let resource = resource_of::<K>();
        self.store().delete(resource, namespace_for(resource, namespace), name, true).is_some()
    }

    /// Deletes without a watch event, as if the client missed it while disconnected and the
    /// history was compacted: only a relist shows it. The resourceVersion still moves.
    ///
    /// # Panics
    /// If the kind is not served.
    pub fn delete_silently<K: k8s_openapi::Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let resource = resource_of::<K>();
        self.store().delete(resource, namespace_for(resource, namespace), name, false).is_some()
    }

    /// Forgets the event history, as etcd compaction does: every watch resourceVersion and
    /// continue token handed out before now gets 410 Gone (an ERROR event with a 410 Status
    /// on a watch, HTTP 410 on a list). Open watches are not touched.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// Abruptly ends every open watch stream: the client sees its connection cut mid-body.
    pub fn drop_connections(&self) {
        self.store().disconnect_all();
    }

    /// While true every request gets 503 ServiceUnavailable, and setting it drops open
    /// watches, as when the API server is overloaded or restarting.
    ///
    /// kube-rs 5's default client retries a 503 itself (up to 15 times, backing off from
    /// 5 ms), so through [`TestApi::client`] a request made while unavailable usually just
    /// waits and succeeds once this is cleared. To see the 503 as an error, build the client
    /// from [`TestApi::config`] with `default_retry = false`; for errors that any client sees
    /// at once, use [`TestApi::set_unreachable`].
    pub fn set_unavailable(&self, unavailable: bool) {
        self.store().set_unavailable(unavailable);
    }

    /// While true the server is as good as down: new connections are closed unanswered, a
    /// request on an already open connection gets 503 with `Connection: close`, and setting
    /// it drops open watches. kube-rs does not retry connection errors, so requests fail at
    /// once (a watcher reports `WatchStartFailed` or `InitialListFailed` and backs off).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.store().set_unreachable(unreachable);
    }

    /// Caps the page size of lists even when the client asks for more (0 = no cap).
    pub fn set_max_page(&self, n: usize) {
        self.store().set_max_page(n);
    }

    /// How often watches that allow bookmarks get one (1 s by default).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.store().set_bookmark_interval(every);
    }

    /// How many changes the event log keeps for resuming watches (100,000 by default);
    /// older ones are compacted away and resuming before them gets 410 Gone.
    pub fn set_history_limit(&self, changes: usize) {
        self.store().set_history_limit(changes);
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// Counters of requests served.
    pub fn stats(&self) -> Stats {
        self.store().stats()
    }

    /// Objects created over HTTP POST to `resource`, in creation order, each in its current
    /// state if it still exists (so a Recorder's later PATCH shows). `"events"` names both
    /// core/v1 and events.k8s.io/v1 Events; `"events.events.k8s.io"` only the latter.
    pub fn created(&self, resource: &str) -> Vec<Value> {
        self.store().created(resource)
    }

    /// One object as stored, by resource name (`"services"`, `"endpointslices"`,
    /// `"events.events.k8s.io"`); `namespace` as for [`TestApi::delete`].
    ///
    /// # Panics
    /// If the resource is not served.
    pub fn get_value(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let resource = resource_named(resource);
        self.store().get(resource, namespace_for(resource, namespace), name).map(|o| o.value())
    }

    /// One object as stored, typed.
    ///
    /// # Panics
    /// If the kind is not served.
    pub fn get<K: k8s_openapi::Resource + serde::de::DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let resource = resource_of::<K>();
        let object = self.store().get(resource, namespace_for(resource, namespace), name)?;
        Some(
            serde_json::from_slice(object.json())
                .expect("a stored object deserializes as its kind"),
        )
    }

    /// Every object of a resource as stored, sorted by namespace and name.
    ///
    /// # Panics
    /// If the resource is not served.
    pub fn list_values(&self, resource: &str) -> Vec<Value> {
        self.store().all(resource_named(resource)).iter().map(|o| o.value()).collect()
    }
}
