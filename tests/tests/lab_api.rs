//! End-to-end in the netns lab with the agent watching an API server instead of reading
//! files: the lab plays the cluster, the harness mirrors its derived state into the
//! in-process test API server, and the real agent in the node namespace lists and watches
//! it through a kubeconfig, programming the real datapath on the pod veths.
//!
//! ```text
//!   Lab (pods, ClusterIPs, EndpointSlices) ──mirror()──▶ TestApi ◀──list/watch── agent
//!        │ pod netns: client ──▶ lxc… [from_pod] ──▶ web-N          (np<N>-node)  │
//!        └───────────────────────── maps ◀──────────────────────────────────────────┘
//! ```
//!
//! The test API listens on 127.0.0.1 *inside the node namespace* (the listener is bound
//! there, then served from the harness's tokio runtime), so the agent reaches it as a node
//! process reaches its API server, and concurrent labs never share it. Each test then
//! changes the cluster or breaks the API server and asserts the datapath with real TCP and
//! UDP sockets after each step.
//!
//! Needs root and the binaries built by `cargo xtask test` (NODEPLANE_AGENT_BIN,
//! NODEPLANE_LAB_BIN).
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    process::Child,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use nodeplane_lab::{Lab, LabConfig, naming::NODE_NAME};
use nodeplane_testapi::TestApi;
use nodeplane_tests::bin;
use serde_json::Value;

const DEMO: &str = include_str!("../../lab/examples/demo.yaml");
/// A second Service the outage test leaves untouched, with pods of its own.
const STABLE: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: stable-0, namespace: demo, labels: {app: stable}}
spec:
  containers:
  - name: stable
    image: nodeplane/echo
    ports: [{name: http, containerPort: 8080, protocol: TCP}, {name: dns, containerPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: stable-1, namespace: demo, labels: {app: stable}}
spec:
  containers:
  - name: stable
    image: nodeplane/echo
    ports: [{name: http, containerPort: 8080, protocol: TCP}, {name: dns, containerPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: stable, namespace: demo}
spec:
  selector: {app: stable}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
";
/// One request's timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request that must go unanswered is given.
const SILENCE: Duration = Duration::from_millis(300);
/// The bound of every wait; past it the test fails with the agent's log.
const CONVERGE: Duration = Duration::from_secs(30);
/// The agent's defaults, inside the node namespace.
const HEALTHZ: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
/// The EndpointSlice controller's annotation, which the agent's latency SLI reads.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

// --- the harness ---

/// The kinds the lab derives, in the order a cluster creates them (deletion is the
/// reverse: slices and Services before Pods, Namespaces last, as the namespace controller
/// empties a namespace before removing it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
}

/// `(kind, namespace, name)`; the namespace is empty for cluster-scoped kinds.
type Key = (Kind, String, String);

/// The demo cluster served by a test API server that the agent watches. Dropping it tears
/// the lab down (which stops the agent), reaps the agent, then stops the API server and
/// its runtime.
struct ApiCluster {
    lab: Option<Lab>,
    agent: Option<Child>,
    api: Option<TestApi>,
    runtime: Option<tokio::runtime::Runtime>,
    /// What `mirror` last wrote to the API, as the lab derived it (before any trigger-time
    /// stamp), to write only what changed and delete what is gone.
    mirrored: Mutex<BTreeMap<Key, Value>>,
}

impl std::ops::Deref for ApiCluster {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("the lab lives until drop")
    }
}

impl Drop for ApiCluster {
    fn drop(&mut self) {
        drop(self.lab.take());
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        drop(self.api.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl ApiCluster {
    /// The demo lab, without the stable Service.
    fn start() -> Self {
        Self::start_with(&[("demo.yaml", DEMO)])
    }

    /// A lab from `docs`, its state mirrored into a fresh test API server listening in the
    /// node namespace, and the agent watching that server.
    fn start_with(docs: &[(&str, &str)]) -> Self {
        let cfg = LabConfig::new(bin("NODEPLANE_LAB_BIN"));
        let lab = Lab::up(cfg, docs).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the test API");
        let listener = lab
            .in_node(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("entering the node netns: {e:#}"))
            .expect("binding the test API's listener in the node netns");
        let api = {
            let _entered = runtime.enter();
            TestApi::serve(listener).expect("serving the test API")
        };
        let kubeconfig = lab.state_dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("writing the kubeconfig");
        let mut cluster = ApiCluster {
            lab: Some(lab),
            agent: None,
            api: Some(api),
            runtime: Some(runtime),
            mirrored: Mutex::default(),
        };
        cluster.mirror();

        // `env -u`: a proxy from the environment would be unreachable from the node netns
        // (kube-rs honours HTTPS_PROXY when the kubeconfig names none). `env` execs, so the
        // child is the agent itself.
        let argv: Vec<OsString> = vec![
            "env".into(),
            "-u".into(),
            "HTTPS_PROXY".into(),
            "-u".into(),
            "https_proxy".into(),
            bin("NODEPLANE_AGENT_BIN").into(),
            "run".into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--iface-prefix".into(),
            nodeplane_lab::HOST_VETH_PREFIX.into(),
        ];
        let agent = cluster
            .spawn_in_node(&argv, "agent")
            .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
        cluster.agent = Some(agent);
        cluster
    }

    fn api(&self) -> &TestApi {
        self.api.as_ref().expect("the API lives until drop")
    }

    fn mirrored(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Value>> {
        self.mirrored.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Copies the lab's derived cluster into the API, as its controllers would: objects
    /// that are new or changed since the last mirror are written (an unchanged object is
    /// not rewritten, as a real API server makes no-op updates invisible), objects mirrored
    /// before and no longer derived are deleted. A written EndpointSlice carries the time
    /// of this mirror as its `last-change-trigger-time`, as the EndpointSlice controller
    /// stamps the slices it changes.
    fn mirror(&self) {
        let cluster = self
            .control_plane()
            .cluster()
            .unwrap_or_else(|e| panic!("deriving the lab's cluster: {e:#}"));
        let mut desired = BTreeMap::new();
        add_all(&mut desired, Kind::Namespace, &cluster.namespaces);
        add_all(&mut desired, Kind::Node, std::slice::from_ref(&cluster.node));
        add_all(&mut desired, Kind::Pod, &cluster.pods);
        add_all(&mut desired, Kind::Service, &cluster.services);
        add_all(&mut desired, Kind::EndpointSlice, &cluster.endpoint_slices);

        // RFC 3339 in whole seconds, as metav1.Time serializes (truncated, never ahead).
        let now = Timestamp::from_second(Timestamp::now().as_second())
            .expect("now is a valid timestamp")
            .to_string();
        let mut mirrored = self.mirrored();
        for (key, object) in &desired {
            if mirrored.get(key) == Some(object) {
                continue;
            }
            let mut object = object.clone();
            if key.0 == Kind::EndpointSlice {
                let annotations = &mut object["metadata"]["annotations"];
                if annotations.is_null() {
                    *annotations = Value::Object(Default::default());
                }
                annotations[TRIGGER_TIME] = Value::String(now.clone());
            }
            self.api().apply_value(object).unwrap_or_else(|e| panic!("applying {key:?}: {e}"));
        }
        for key in mirrored.keys().rev().filter(|k| !desired.contains_key(*k)) {
            self.delete_from_api(key, false);
        }
        *mirrored = desired;
    }

    /// Deletes one object from the API; `silently`, no watcher hears of it (only a relist
    /// shows it). The lab is not told: a later `mirror` does not bring it back unless the
    /// lab changes it.
    fn delete_from_api(&self, (kind, namespace, name): &Key, silently: bool) {
        fn delete<K: k8s_openapi::Resource>(api: &TestApi, ns: &str, name: &str, silently: bool) {
            let ns = Some(ns).filter(|ns| !ns.is_empty());
            let existed = if silently {
                api.delete_silently::<K>(ns, name)
            } else {
                api.delete::<K>(ns, name)
            };
            assert!(existed, "deleting {} {ns:?}/{name}: not in the API", K::KIND);
        }
        let api = self.api();
        match kind {
            Kind::Namespace => delete::<Namespace>(api, namespace, name, silently),
            Kind::Node => delete::<Node>(api, namespace, name, silently),
            Kind::Pod => delete::<Pod>(api, namespace, name, silently),
            Kind::Service => delete::<Service>(api, namespace, name, silently),
            Kind::EndpointSlice => delete::<EndpointSlice>(api, namespace, name, silently),
        }
    }

    /// Deletes a mirrored object from the API without a watch event (as if the agent missed
    /// it while disconnected) and forgets it.
    fn delete_silently(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_string(), name.to_string());
        assert!(self.mirrored().remove(&key).is_some(), "{key:?} was never mirrored");
        self.delete_from_api(&key, true);
    }

    /// Empties and deletes a namespace in the API as the namespace controller does: its
    /// EndpointSlices, Services and Pods, then the Namespace. The lab keeps its pods
    /// running, as pods outlive their API objects for their grace period.
    fn delete_namespace(&self, namespace: &str) {
        let mut mirrored = self.mirrored();
        let doomed: Vec<Key> = mirrored
            .keys()
            .rev()
            .filter(|(kind, ns, name)| {
                ns == namespace || (*kind == Kind::Namespace && name == namespace)
            })
            .cloned()
            .collect();
        assert!(doomed.iter().any(|k| k.0 == Kind::Namespace), "{namespace} is not mirrored");
        for key in &doomed {
            self.delete_from_api(key, false);
            mirrored.remove(key);
        }
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.log_path("agent")).unwrap_or_default()
    }

    /// Polls `f` until it is true or `CONVERGE` passes; panics with the agent's log.
    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        self.wait_for(what, || if f() { Ok(()) } else { Err(String::new()) });
    }

    /// Polls `f` until it is `Ok` or `CONVERGE` passes; panics with its last error and
    /// the agent's log.
    fn wait_for(&self, what: &str, mut f: impl FnMut() -> Result<(), String>) {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < CONVERGE {
            match f() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let last = if last.is_empty() { String::new() } else { format!(" (last: {last})") };
        self.fail(format!("timed out after {CONVERGE:?} waiting until {what}{last}"));
    }

    /// Panics with the agent's log.
    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{what}; agent log:\n{}", self.agent_log());
    }

    fn vip(&self, service: &str, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.service_ip("demo", service).expect("a ClusterIP"), port)
    }

    fn tcp(&self, to: SocketAddrV4) -> io::Result<String> {
        self.tcp_ask("demo", "client", to, TIMEOUT)
    }

    fn udp(&self, to: SocketAddrV4) -> io::Result<String> {
        self.udp_ask("demo", "client", to, TIMEOUT)
    }

    /// An HTTP GET from the node netns (where the agent serves): status and body.
    fn http_get(&self, addr: SocketAddrV4, path: &str) -> io::Result<(u16, String)> {
        self.in_node(|| nodeplane_tests::http::get(addr, path, TIMEOUT))
            .map_err(io::Error::other)?
    }

    /// `/healthz` or `/readyz`'s status.
    fn probe(&self, path: &str) -> u16 {
        self.http_get(HEALTHZ, path).map_or(0, |(status, _)| status)
    }

    fn scrape(&self) -> String {
        match self.http_get(METRICS, "/metrics") {
            Ok((200, body)) => body,
            Ok((status, body)) => self.fail(format!("/metrics answered {status}: {body}")),
            Err(e) => self.fail(format!("scraping /metrics: {e}")),
        }
    }

    /// One sample, by its full series name (`name{labels}`); absent reads as `None`.
    fn metric(&self, series: &str) -> Option<f64> {
        self.scrape().lines().find_map(|line| {
            line.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok()
        })
    }

    /// The `web` Service's TCP and UDP ClusterIP addresses.
    fn web(&self) -> (SocketAddrV4, SocketAddrV4) {
        (self.vip("web", 80), self.vip("web", 53))
    }

    /// Waits until `service` answers over TCP.
    fn wait_serving(&self, service: &str) {
        let http = self.vip(service, 80);
        self.wait_until(&format!("{service}'s ClusterIP answers over TCP"), || {
            self.tcp(http).is_ok()
        });
    }

    /// Who answers `n` TCP and `n` UDP requests to the `web` Service; every one must.
    fn ask_web(&self, n: usize, when: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let (http, dns) = (self.vip("web", 80), self.vip("web", 53));
        let (mut tcp, mut udp) = (BTreeSet::new(), BTreeSet::new());
        for i in 0..n {
            tcp.insert(
                self.tcp(http).unwrap_or_else(|e| self.fail(format!("TCP {i} {when}: {e}"))),
            );
            udp.insert(self.udp(dns).unwrap_or_else(|e| self.fail(format!("UDP {i} {when}: {e}"))));
        }
        (tcp, udp)
    }

    /// Waits until `pod` has had no new TCP connection for 20 requests in a row, then
    /// checks 40 more.
    fn wait_no_new_connections(&self, pod: &str) {
        let http = self.vip("web", 80);
        let mut clean_streak = 0;
        self.wait_until(&format!("{pod} gets no new connections"), || {
            let hit = self.tcp(http).map(|who| who == pod).unwrap_or(true);
            clean_streak = if hit { 0 } else { clean_streak + 1 };
            clean_streak >= 20
        });
        for i in 0..40 {
            let who = self.tcp(http).unwrap_or_else(|e| self.fail(format!("request {i}: {e}")));
            assert_ne!(who, pod, "request {i} reached the removed backend {pod}");
        }
    }

    /// Waits until the `web` ClusterIP (`http`, `dns`) stops answering, then checks that it
    /// stays silent over TCP and UDP while the pods still answer directly (only the
    /// translation is gone).
    fn wait_translation_gone(&self, (http, dns): (SocketAddrV4, SocketAddrV4)) {
        self.wait_until("the ClusterIP stops answering", || {
            self.tcp_ask("demo", "client", http, SILENCE).is_err()
        });
        // A lab pod answers in well under a millisecond, so a short timeout is a fair
        // "no answer" (an unanswered UDP request gets no error, only the timeout).
        for i in 0..3 {
            let tcp = self.tcp_ask("demo", "client", http, SILENCE);
            assert!(tcp.is_err(), "TCP request {i} still answered: {tcp:?}");
            let udp = self.udp_ask("demo", "client", dns, SILENCE);
            assert!(udp.is_err(), "UDP request {i} still answered: {udp:?}");
        }
        let web0 = self.pod_ip("demo", "web-0").expect("web-0 has an IP");
        let direct = self.tcp(SocketAddrV4::new(web0, 8080));
        assert_eq!(direct.expect("web-0 directly"), "web-0", "the pod itself must still answer");
    }
}

fn add_all<T: serde::Serialize>(out: &mut BTreeMap<Key, Value>, kind: Kind, objects: &[T]) {
    for object in objects {
        let value = serde_json::to_value(object).expect("a k8s-openapi object serializes");
        let field = |f: &str| value["metadata"][f].as_str().unwrap_or_default().to_string();
        out.insert((kind, field("namespace"), field("name")), value);
    }
}

fn web_pods() -> BTreeSet<String> {
    ["web-0", "web-1", "web-2"].into_iter().map(String::from).collect()
}

// --- the tests ---

#[test]
fn the_agent_syncs_from_the_api_and_the_datapath_carries_tcp_and_udp() {
    let cluster = ApiCluster::start();
    cluster.wait_serving("web");
    assert_eq!(cluster.probe("/healthz"), 200, "/healthz once synced");
    // Every kind has been listed by now (the agent lists them at once, and the ClusterIP
    // answers), so readiness needs no further change from the API, even when the last kind
    // listed is an empty one (no NetworkPolicies here) that changes nothing in the index.
    cluster.wait_for("/readyz answers 200", || match cluster.http_get(HEALTHZ, "/readyz") {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("{status} {}", body.trim())),
        Err(e) => Err(e.to_string()),
    });

    let (tcp, udp) = cluster.ask_web(60, "through the ClusterIP");
    assert_eq!(tcp, web_pods(), "60 TCP connections must reach every backend");
    assert_eq!(udp, web_pods(), "60 UDP flows must reach every backend");

    // The agent announced itself on its own Node.
    let recorded = |reason: &str| {
        cluster.api().created("events").iter().any(|e| {
            e["reason"] == reason
                && e["regarding"]["kind"] == "Node"
                && e["regarding"]["name"] == NODE_NAME
        })
    };
    cluster.wait_until("the Starting and Ready Events are recorded on the Node", || {
        recorded("Starting") && recorded("Ready")
    });
}

#[test]
fn endpoint_changes_through_the_api_reach_the_datapath() {
    let cluster = ApiCluster::start();
    cluster.wait_serving("web");
    let http = cluster.vip("web", 80);
    let programmed = "nodeplane_network_programming_duration_seconds_count";
    let before = cluster.metric(programmed).unwrap_or(0.0);

    // An established connection through the ClusterIP.
    let held = cluster.tcp_connect("demo", "client", http, TIMEOUT).expect("connect via the VIP");
    held.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut reader = BufReader::new(held.try_clone().expect("clone stream"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting on the held connection");
    let kept = line.trim().to_string();
    let removed = web_pods().into_iter().find(|p| *p != kept).expect("another pod");

    // Not ready -> not an endpoint: the slice changes in the API.
    cluster.set_pod_ready("demo", &removed, false).unwrap_or_else(|e| panic!("{e:#}"));
    cluster.mirror();
    cluster.wait_no_new_connections(&removed);

    // The held connection to a remaining backend still works.
    let mut stream = held;
    for i in 0..3 {
        stream.write_all(b"again\n").expect("write on the held connection");
        line.clear();
        reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("held connection, exchange {i}: {e}"));
        assert_eq!(line.trim(), kept, "the held connection moved backend");
    }

    // The slice carried a trigger time: the SLI observed its programming.
    cluster.wait_until("network programming latency is observed for the change", || {
        cluster.metric(programmed).is_some_and(|n| n > before)
    });

    // Ready again: it receives new connections again.
    cluster.set_pod_ready("demo", &removed, true).unwrap_or_else(|e| panic!("{e:#}"));
    cluster.mirror();
    cluster.wait_until(&format!("{removed} receives connections again"), || {
        cluster.tcp(http).is_ok_and(|who| who == removed)
    });
}

#[test]
fn an_api_outage_keeps_the_datapath_and_recovery_converges_without_loss() {
    let cluster = ApiCluster::start_with(&[("demo.yaml", DEMO), ("stable.yaml", STABLE)]);
    cluster.wait_serving("web");
    cluster.wait_serving("stable");
    let stale = "nodeplane_source_stale_seconds{kind=\"Service\"}";
    assert_eq!(cluster.metric(stale), Some(0.0), "a working watch is not stale");

    // The API server goes away: traffic keeps flowing, the source turns stale, the agent
    // stays healthy (a restart would not bring the API back).
    cluster.api().set_unreachable(true);
    let outage = Instant::now();
    let mut seen = (BTreeSet::new(), BTreeSet::new());
    while outage.elapsed() < Duration::from_secs(3) {
        let (tcp, udp) = cluster.ask_web(5, "while the API is unreachable");
        seen.0.extend(tcp);
        seen.1.extend(udp);
        assert_eq!(cluster.probe("/healthz"), 200, "/healthz during the outage");
    }
    assert_eq!(seen, (web_pods(), web_pods()), "every backend serves during the outage");
    cluster.wait_until("the Service source is reported stale", || {
        cluster.metric(stale).is_some_and(|s| s > 0.0)
    });

    // A backend leaves while the agent cannot hear of it: it keeps receiving.
    let removed = "web-2";
    cluster.set_pod_ready("demo", removed, false).unwrap_or_else(|e| panic!("{e:#}"));
    cluster.mirror();
    let http = cluster.vip("web", 80);
    cluster.wait_until(&format!("{removed} still receives while the API is down"), || {
        cluster.tcp(http).is_ok_and(|who| who == removed)
    });
    assert_eq!(cluster.probe("/healthz"), 200, "/healthz during the outage");

    // The API comes back. While the agent relists, the unchanged Service must never lose
    // a backend: every request to it is answered, without a single failure.
    let stop = AtomicBool::new(false);
    let (stable_http, stable_dns) = (cluster.vip("stable", 80), cluster.vip("stable", 53));
    let (requests, failures) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut requests, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (what, answer) in
                    [("TCP", cluster.tcp(stable_http)), ("UDP", cluster.udp(stable_dns))]
                {
                    requests += 1;
                    if let Err(e) = answer {
                        failures.push(format!("{what} after {:?}: {e}", outage.elapsed()));
                    }
                }
            }
            (requests, failures)
        });
        cluster.api().set_unreachable(false);
        let recovery = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cluster.wait_no_new_connections(removed);
            cluster.wait_until("the Service source is no longer stale", || {
                cluster.metric(stale) == Some(0.0)
            });
        }));
        stop.store(true, Ordering::Relaxed);
        let result = traffic.join().expect("the traffic thread");
        if let Err(panic) = recovery {
            std::panic::resume_unwind(panic);
        }
        result
    });
    assert!(
        failures.is_empty(),
        "{} of {requests} requests to the unchanged Service failed during recovery: {failures:#?}",
        failures.len()
    );
    assert_eq!(cluster.probe("/healthz"), 200, "/healthz after recovery");
    let (tcp, _) = cluster.ask_web(30, "after recovery");
    assert!(!tcp.contains(removed), "{removed} is not an endpoint any more: {tcp:?}");
}

#[test]
fn a_deletion_hidden_behind_410_gone_stops_the_translation_after_the_relist() {
    let cluster = ApiCluster::start();
    cluster.wait_serving("web");
    let lists = "nodeplane_source_lists_total{kind=\"Service\"}";
    let listed = cluster.metric(lists).unwrap_or_else(|| cluster.fail("no Service list count"));

    // Deleted without a watch event: the agent does not know, the translation stays.
    cluster.delete_silently(Kind::Service, "demo", "web");
    let (tcp, _) = cluster.ask_web(10, "after a silent deletion");
    assert!(!tcp.is_empty());

    // History compacted and watches cut: resuming gets 410 Gone, the agent relists and
    // the relist shows the Service gone.
    cluster.api().compact();
    cluster.api().drop_connections();
    cluster.wait_translation_gone(cluster.web());
    let relisted = cluster.metric(lists).unwrap_or_default();
    assert!(relisted > listed, "the Service kind was relisted ({listed} -> {relisted} lists)");
}

#[test]
fn deleting_the_service_through_the_api_stops_the_translation() {
    let cluster = ApiCluster::start();
    cluster.wait_serving("web");
    let (tcp, udp) = cluster.ask_web(3, "before the delete");
    assert!(!tcp.is_empty() && !udp.is_empty());
    let web = cluster.web();

    cluster.delete("Service", "demo", "web").unwrap_or_else(|e| panic!("{e:#}"));
    cluster.mirror();
    let slices = cluster.api().list_values("endpointslices");
    assert!(slices.is_empty(), "the Service's slices went with it: {slices:#?}");
    cluster.wait_translation_gone(web);
}

#[test]
fn deleting_the_namespace_through_the_api_stops_the_translation() {
    let cluster = ApiCluster::start();
    cluster.wait_serving("web");
    let (tcp, udp) = cluster.ask_web(3, "before the delete");
    assert!(!tcp.is_empty() && !udp.is_empty());

    cluster.delete_namespace("demo");
    assert!(cluster.api().get_value("namespaces", None, "demo").is_none());
    cluster.wait_translation_gone(cluster.web());
}
