//! The `healthCheckNodePort` servers of `LoadBalancer` Services with
//! `externalTrafficPolicy: Local`, answering as kube-proxy does.
//!
//! ```text
//!  &Index ──wanted()──▶ port -> HealthCheck { service, local_endpoints }   pure
//!                              │
//!                              ▼
//!  HealthCheckServers::update  one axum listener per port; counts shared, never rebound
//! ```
//!
//! A cloud load balancer probes every node on the Service's `healthCheckNodePort` and sends
//! the Service's traffic only to nodes that answer 200, i.e. nodes with a local endpoint
//! (Local keeps the client's source address, so a node without one would drop it).
//!
//! What is counted ([`wanted`]), as kube-proxy's `LocalReadyEndpoints`:
//!
//! 1. The distinct addresses of the Service's slices, merged over slices as
//!    [`desired`](crate::desired) rule 3 does (ready if any copy is, on this node if any
//!    copy says so). Only slices with a port matching a ServicePort (name and protocol)
//!    count: the others give the datapath no backend either.
//! 2. Only *ready* endpoints on this node. Deliberately not desired.rs rule 5's fallback to
//!    serving terminating endpoints: kube-proxy (KEP-1669, "Proxy Terminating Endpoints")
//!    still routes traffic that arrives to them, but makes the health check *fail* when a
//!    node has only terminating endpoints, so the load balancer takes the node out of its
//!    pool quickly while established and late connections drain. The count can therefore
//!    be 0 (503) while the datapath still has backends for the Service; that is intended.
//! 3. Without a node name the agent cannot tell which endpoints are local: every count is
//!    0, so load balancers avoid this node rather than trusting a guess. A DaemonSet agent
//!    always knows its node (`--node-name`).
//! 4. Two Services claiming one port (the API server allocates them uniquely, so only
//!    files or a bypassed API server can do this): the first in key order gets it, the
//!    others are listed in [`HealthCheck::conflicting`] and warned about once by
//!    [`HealthCheckServers::update`].
//!
//! The answer (any method, any path) is kube-proxy's (`pkg/proxy/healthcheck`): 200 with at
//! least one local endpoint, else 503; `Content-Type: application/json`,
//! `X-Content-Type-Options: nosniff`, `X-Load-Balancing-Endpoint-Weight: <count>`, and the
//! same tab-indented JSON body. `serviceProxyHealthy` is always `true`: the agent's own
//! health is reported on `/healthz`, not folded into every Service's answer.
use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, RwLock},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderName, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::{index::Index, model::Service, source::ObjectKey};

/// What one `healthCheckNodePort` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    /// Ready endpoints of the Service on this node (module docs).
    pub local_endpoints: usize,
    /// Other Services with the same `healthCheckNodePort`, in key order; they get no health
    /// check (module docs, rule 4).
    pub conflicting: Vec<ObjectKey>,
}

impl HealthCheck {
    pub fn new(service: ObjectKey, local_endpoints: usize) -> Self {
        Self { service, local_endpoints, conflicting: Vec::new() }
    }
}

/// The health checks this node should serve, by port (module docs for the rules).
pub fn wanted(index: &Index, node_name: Option<&str>) -> BTreeMap<u16, HealthCheck> {
    let mut out: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    // `services()` iterates in key order: the first claimant of a port keeps it.
    for service in index.services() {
        let Some(port) = service.external.health_check_node_port else {
            continue;
        };
        match out.entry(port) {
            Entry::Occupied(mut taken) => taken.get_mut().conflicting.push(service.key.clone()),
            Entry::Vacant(free) => {
                let local = node_name.map_or(0, |node| local_ready_endpoints(index, service, node));
                free.insert(HealthCheck::new(service.key.clone(), local));
            }
        }
    }
    out
}

/// Rules 1 and 2 of the module docs.
fn local_ready_endpoints(index: &Index, service: &Service, node: &str) -> usize {
    #[derive(Default)]
    struct Merged {
        ready: bool,
        local: bool,
    }
    let mut merged: BTreeMap<Ipv4Addr, Merged> = BTreeMap::new();
    for slice in index.slices_for(&service.key) {
        let has_service_port = slice
            .ports
            .iter()
            .any(|sp| service.ports.iter().any(|p| p.name == sp.name && p.protocol == sp.protocol));
        if !has_service_port {
            continue;
        }
        for ep in &slice.endpoints {
            let m = merged.entry(ep.addr).or_default();
            m.ready |= ep.ready;
            m.local |= ep.node_name.as_deref() == Some(node);
        }
    }
    merged.values().filter(|m| m.ready && m.local).count()
}

/// One HTTP listener per wanted `healthCheckNodePort`.
#[derive(Debug)]
pub struct HealthCheckServers {
    bind: IpAddr,
    servers: BTreeMap<u16, Server>,
    /// Ports that failed to bind, with the last error; retried on every update.
    bind_errors: BTreeMap<u16, String>,
    /// The conflicts last warned about, per port, so each is warned about once.
    conflicts: BTreeMap<u16, Vec<ObjectKey>>,
}

#[derive(Debug)]
struct Server {
    /// Read by every request, so a new count needs no rebind.
    answer: Arc<RwLock<HealthCheck>>,
    task: JoinHandle<()>,
}

impl HealthCheckServers {
    /// Servers listening on `bind` (kube-proxy: every address, `0.0.0.0`).
    pub fn new(bind: IpAddr) -> Self {
        Self {
            bind,
            servers: BTreeMap::new(),
            bind_errors: BTreeMap::new(),
            conflicts: BTreeMap::new(),
        }
    }

    /// Makes the listeners match `wanted`: closes the ports no longer wanted (they are free
    /// when this returns), updates the answers of the others in place and binds the new
    /// ones. A port that fails to bind is logged (again only if its error changes) and
    /// retried on the next update; the other ports are unaffected.
    pub async fn update(&mut self, wanted: BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> =
            self.servers.keys().filter(|p| !wanted.contains_key(p)).copied().collect();
        for port in gone {
            if let Some(server) = self.servers.remove(&port) {
                server.task.abort();
                // Awaiting the aborted task drops its listener: the port is free after this.
                let _ = server.task.await;
                info!(port, "closed healthCheckNodePort");
            }
        }
        self.bind_errors.retain(|port, _| wanted.contains_key(port));
        self.conflicts.retain(|port, _| wanted.contains_key(port));

        for (port, check) in wanted {
            self.warn_conflicts(port, &check);
            if let Some(server) = self.servers.get(&port) {
                *server.answer.write().unwrap_or_else(|e| e.into_inner()) = check;
                continue;
            }
            match TcpListener::bind((self.bind, port)).await {
                Ok(listener) => {
                    if self.bind_errors.remove(&port).is_some() {
                        info!(service = %check.service, port, "healthCheckNodePort bound after failing");
                    } else {
                        debug!(service = %check.service, port, "healthCheckNodePort bound");
                    }
                    self.servers.insert(port, serve(listener, port, check));
                }
                Err(e) => {
                    let err = e.to_string();
                    if self.bind_errors.get(&port) != Some(&err) {
                        error!(
                            service = %check.service,
                            port,
                            error = %err,
                            "cannot listen on healthCheckNodePort {}:{port} of Service {}; retrying on the next update",
                            self.bind,
                            check.service,
                        );
                    }
                    self.bind_errors.insert(port, err);
                }
            }
        }
    }

    /// The ports being served, ascending.
    pub fn serving(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }

    /// Wanted ports that could not be bound, with the last error.
    pub fn bind_errors(&self) -> &BTreeMap<u16, String> {
        &self.bind_errors
    }

    fn warn_conflicts(&mut self, port: u16, check: &HealthCheck) {
        if check.conflicting.is_empty() {
            self.conflicts.remove(&port);
            return;
        }
        if self.conflicts.get(&port) != Some(&check.conflicting) {
            let others: Vec<String> = check.conflicting.iter().map(ToString::to_string).collect();
            warn!(
                port,
                service = %check.service,
                "healthCheckNodePort {port} is claimed by Service {} and also by {}; only the first is served",
                check.service,
                others.join(", "),
            );
            self.conflicts.insert(port, check.conflicting.clone());
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

fn serve(listener: TcpListener, port: u16, check: HealthCheck) -> Server {
    let answer = Arc::new(RwLock::new(check));
    let app = Router::new().fallback(respond).with_state(answer.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(port, error = %e, "healthCheckNodePort server stopped");
        }
    });
    Server { answer, task }
}

async fn respond(State(answer): State<Arc<RwLock<HealthCheck>>>) -> Response {
    let (count, body) = {
        let check = answer.read().unwrap_or_else(|e| e.into_inner());
        (check.local_endpoints, body(&check.service, check.local_endpoints))
    };
    let status = if count > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let headers = [
        (header::CONTENT_TYPE, "application/json".to_string()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        (HeaderName::from_static("x-load-balancing-endpoint-weight"), count.to_string()),
    ];
    (status, headers, body).into_response()
}

/// kube-proxy's body, byte for byte: tab-indented, no trailing newline.
fn body(service: &ObjectKey, local_endpoints: usize) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": true\n}}",
        quote(service.namespace.as_deref().unwrap_or_default()),
        quote(&service.name),
    )
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{Ipv4Addr, SocketAddr},
        sync::Mutex,
    };

    use k8s_openapi::api::{core::v1 as corev1, discovery::v1 as discoveryv1};
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::TcpStream,
    };

    use super::*;
    use crate::index::test_helpers::*;

    // --- wanted() ---

    fn key(name: &str) -> ObjectKey {
        ObjectKey::namespaced("default", name)
    }

    /// A LoadBalancer Service with `externalTrafficPolicy: Local` and a health check port.
    fn lb_local(name: &str, health_port: i32) -> corev1::Service {
        let mut svc = mk_service("default", name, "10.96.0.10", &[("http", 80, "")]);
        let spec = svc.spec.as_mut().expect("spec");
        spec.type_ = Some("LoadBalancer".into());
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(health_port);
        svc
    }

    fn on(node: &str, mut ep: discoveryv1::Endpoint) -> discoveryv1::Endpoint {
        ep.node_name = Some(node.to_string());
        ep
    }

    fn slice(
        name: &str,
        service: &str,
        eps: Vec<discoveryv1::Endpoint>,
    ) -> discoveryv1::EndpointSlice {
        mk_slice("default", name, service, &[("http", 8080, "")], eps)
    }

    fn index_of(services: Vec<corev1::Service>, slices: Vec<discoveryv1::EndpointSlice>) -> Index {
        let mut index = Index::new();
        services.into_iter().for_each(|s| index.apply(s));
        slices.into_iter().for_each(|s| index.apply(s));
        index
    }

    fn counts(wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, String, usize)> {
        wanted.iter().map(|(p, c)| (*p, c.service.to_string(), c.local_endpoints)).collect()
    }

    #[test]
    fn counts_distinct_ready_endpoints_on_this_node() {
        let index = index_of(
            vec![lb_local("web", 30100)],
            vec![
                slice(
                    "web-a",
                    "web",
                    vec![
                        on("n1", ready("10.0.1.1")),
                        on("n1", ready("10.0.1.2")),
                        on("n1", not_ready("10.0.1.3")),
                        on("n2", ready("10.0.2.1")),
                    ],
                ),
                // The same address in a second slice is one endpoint.
                slice("web-b", "web", vec![on("n1", ready("10.0.1.1"))]),
                // A slice without a port of the Service gives no backend: not counted.
                mk_slice(
                    "default",
                    "web-c",
                    "web",
                    &[("metrics", 9090, "")],
                    vec![on("n1", ready("10.0.1.9"))],
                ),
            ],
        );
        assert_eq!(counts(&wanted(&index, Some("n1"))), vec![(30100, "default/web".into(), 2)]);
        assert_eq!(counts(&wanted(&index, Some("n2"))), vec![(30100, "default/web".into(), 1)]);
    }

    #[test]
    fn no_local_endpoint_is_zero() {
        let index = index_of(
            vec![lb_local("web", 30100)],
            vec![slice("web-a", "web", vec![on("n2", ready("10.0.2.1"))])],
        );
        assert_eq!(counts(&wanted(&index, Some("n1"))), vec![(30100, "default/web".into(), 0)]);
        // No slices at all: still served, with 0.
        let index = index_of(vec![lb_local("web", 30100)], vec![]);
        assert_eq!(counts(&wanted(&index, Some("n1"))), vec![(30100, "default/web".into(), 0)]);
    }

    #[test]
    fn only_terminating_local_endpoints_fail_the_check() {
        // KEP-1669: the datapath falls back to the serving terminating endpoint, but the
        // health check fails so the load balancer drains the node.
        let index = index_of(
            vec![lb_local("web", 30100)],
            vec![slice(
                "web-a",
                "web",
                vec![
                    on("n1", terminating("10.0.1.1", true)),
                    on("n1", terminating("10.0.1.2", false)),
                    on("n2", ready("10.0.2.1")),
                ],
            )],
        );
        assert_eq!(counts(&wanted(&index, Some("n1"))), vec![(30100, "default/web".into(), 0)]);
        // With one ready local endpoint next to them, only the ready one counts.
        let index = index_of(
            vec![lb_local("web", 30100)],
            vec![slice(
                "web-a",
                "web",
                vec![on("n1", terminating("10.0.1.1", true)), on("n1", ready("10.0.1.2"))],
            )],
        );
        assert_eq!(counts(&wanted(&index, Some("n1"))), vec![(30100, "default/web".into(), 1)]);
    }

    #[test]
    fn without_a_node_name_every_count_is_zero() {
        let index = index_of(
            vec![lb_local("web", 30100)],
            vec![slice("web-a", "web", vec![on("n1", ready("10.0.1.1"))])],
        );
        assert_eq!(counts(&wanted(&index, None)), vec![(30100, "default/web".into(), 0)]);
    }

    #[test]
    fn only_local_load_balancers_get_a_port_and_the_first_claimant_wins() {
        let mut cluster = lb_local("cluster", 30300);
        cluster.spec.as_mut().expect("spec").external_traffic_policy = Some("Cluster".into());
        let index = index_of(
            vec![lb_local("b", 30100), lb_local("a", 30100), lb_local("c", 30200), cluster],
            vec![
                slice("a-1", "a", vec![on("n1", ready("10.0.1.1"))]),
                slice("b-1", "b", vec![on("n1", ready("10.0.1.2")), on("n1", ready("10.0.1.3"))]),
            ],
        );
        let got = wanted(&index, Some("n1"));
        assert_eq!(
            counts(&got),
            vec![(30100, "default/a".into(), 1), (30200, "default/c".into(), 0)]
        );
        assert_eq!(got[&30100].conflicting, vec![key("b")]);
        assert!(got[&30200].conflicting.is_empty());
    }

    // --- the servers ---

    #[derive(Debug)]
    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// A port nobody listens on right now.
    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("ephemeral port");
        l.local_addr().expect("local addr").port()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// One HTTP/1.1 GET on an open connection, which stays open (keep-alive).
    async fn get_on(conn: &mut BufReader<TcpStream>, path: &str) -> Answer {
        let req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n");
        conn.get_mut().write_all(req.as_bytes()).await.expect("send request");
        let mut line = String::new();
        conn.read_line(&mut line).await.expect("status line");
        let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut headers = Vec::new();
        loop {
            line.clear();
            conn.read_line(&mut line).await.expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("bad header {l:?}"));
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut answer = Answer { status, headers, body: String::new() };
        let len: usize =
            answer.header("content-length").and_then(|v| v.parse().ok()).expect("content-length");
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await.expect("body");
        answer.body = String::from_utf8(body).expect("utf-8 body");
        answer
    }

    async fn connect(port: u16) -> io::Result<BufReader<TcpStream>> {
        TcpStream::connect(addr(port)).await.map(BufReader::new)
    }

    async fn get(port: u16) -> Answer {
        let mut conn = connect(port).await.unwrap_or_else(|e| panic!("connect to {port}: {e}"));
        get_on(&mut conn, "/healthz").await
    }

    fn one(port: u16, name: &str, n: usize) -> BTreeMap<u16, HealthCheck> {
        BTreeMap::from([(port, HealthCheck::new(key(name), n))])
    }

    const BODY_2: &str = "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}";

    #[tokio::test]
    async fn answers_as_kube_proxy_updates_in_place_and_frees_removed_ports() {
        let port = free_port();
        let mut servers = HealthCheckServers::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        servers.update(one(port, "web", 2)).await;
        assert_eq!(servers.serving().collect::<Vec<_>>(), vec![port]);

        let mut conn = connect(port).await.expect("connect");
        let a = get_on(&mut conn, "/any/path?x=1").await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("2"));
        assert_eq!(a.body, BODY_2);
        let json: serde_json::Value = serde_json::from_str(&a.body).expect("json body");
        assert_eq!(
            json,
            serde_json::json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true
            })
        );

        // Count 0: the open connection (served by the listener bound above) sees the new
        // answer, so the answer was changed in place, not by a new server.
        servers.update(one(port, "web", 0)).await;
        let a = get_on(&mut conn, "/").await;
        assert_eq!(a.status, 503, "{a:?}");
        assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("0"));
        assert!(a.body.contains("\"localEndpoints\": 0,"), "{}", a.body);
        assert_eq!(get(port).await.status, 503);

        // The port passes to another Service: same listener, new name.
        servers.update(one(port, "shop", 3)).await;
        let a = get_on(&mut conn, "/").await;
        assert_eq!((a.status, a.header("x-load-balancing-endpoint-weight")), (200, Some("3")));
        assert!(a.body.contains("\"name\": \"shop\""), "{}", a.body);
        drop(conn);

        servers.update(BTreeMap::new()).await;
        assert_eq!(servers.serving().count(), 0);
        let err = connect(port).await.expect_err("port closed");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        // And free for anyone else.
        std::net::TcpListener::bind(addr(port)).expect("port is free again");
    }

    #[tokio::test]
    async fn bind_failure_is_logged_does_not_stop_other_ports_and_is_retried() {
        let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("blocker");
        let taken = blocker.local_addr().expect("blocker addr").port();
        // Above the blocked port, so it is bound after the failure (ports go in order).
        let other = std::iter::repeat_with(free_port)
            .take(10_000)
            .find(|p| *p > taken)
            .expect("a higher free port");
        let want = || {
            let mut w = one(taken, "blocked", 1);
            w.insert(other, HealthCheck::new(key("fine"), 1));
            w
        };
        let mut servers = HealthCheckServers::new(IpAddr::V4(Ipv4Addr::LOCALHOST));

        let logs = Logs::capture();
        servers.update(want()).await;
        let errors = logs.lines("ERROR");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("default/blocked"), "{}", errors[0]);
        assert!(errors[0].contains(&taken.to_string()), "{}", errors[0]);
        assert!(errors[0].to_lowercase().contains("in use"), "{}", errors[0]);
        assert!(servers.bind_errors().contains_key(&taken));
        assert_eq!(get(other).await.status, 200);

        // Still blocked: retried, not logged again.
        servers.update(want()).await;
        assert_eq!(logs.lines("ERROR").len(), 1);
        assert_eq!(servers.serving().collect::<Vec<_>>(), vec![other]);

        drop(blocker);
        servers.update(want()).await;
        assert!(servers.bind_errors().is_empty(), "{:?}", servers.bind_errors());
        let a = get(taken).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.body.contains("\"name\": \"blocked\""), "{}", a.body);
        assert_eq!(get(other).await.status, 200);
    }

    #[tokio::test]
    async fn a_conflict_is_warned_about_once() {
        let port = free_port();
        let mut check = HealthCheck::new(key("a"), 1);
        check.conflicting = vec![key("b")];
        let mut servers = HealthCheckServers::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let logs = Logs::capture();
        servers.update(BTreeMap::from([(port, check.clone())])).await;
        servers.update(BTreeMap::from([(port, check)])).await;
        let warnings = logs.lines("WARN");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("default/a") && warnings[0].contains("default/b"));
    }

    /// Formatted log lines of the current thread (tokio tests run on one thread).
    struct Logs {
        buf: Arc<Mutex<Vec<u8>>>,
        _guard: tracing::subscriber::DefaultGuard,
    }

    impl Logs {
        fn capture() -> Self {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let writer = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || SharedBuf(writer.clone()))
                .finish();
            Self { buf, _guard: tracing::subscriber::set_default(subscriber) }
        }

        fn lines(&self, level: &str) -> Vec<String> {
            let text =
                String::from_utf8(self.buf.lock().expect("log buffer").clone()).expect("utf-8");
            text.lines().filter(|l| l.contains(level)).map(str::to_string).collect()
        }
    }

    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
