//! The API source end to end without a kernel: kube-rs watchers against the in-process test
//! API server (real HTTP list/watch), the agent's index, translation and sync, and in-memory
//! maps that check their consistency after every single write.
//!
//! Each test asserts the maps after each step, including through faults: the API server
//! unreachable, watches dropped, history compacted (`410 Gone`), deletions missed while
//! disconnected, paged lists.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nodeplane_agent::{
    agent::Agent,
    desired::NodeContext,
    health::Health,
    metrics::Metrics,
    policy::{PolicyOp, PolicyWriteError, PolicyWriter},
    source::{
        Batch, Kind,
        kube::{Settings, SourceHealth},
    },
    sync::{FakeMaps, MapWriter, Op, WriteError},
};
use nodeplane_common::maps::{BackendV4, IPPROTO_TCP, ServiceKeyV4};
use nodeplane_testapi::TestApi;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const CONVERGE: Duration = Duration::from_secs(20);
const NODE: &str = "node-a";

// --- objects ---

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDR": "10.244.1.0/24"}})
}

fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, u16, &str)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": ns, "name": name},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports}})
}

/// An EndpointSlice of `svc` with ready endpoints `addrs` on port `http` 8080/TCP.
fn slice(ns: &str, name: &str, svc: &str, addrs: &[&str]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": ns, "name": name,
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn fe(ip: &str, port: u16) -> ServiceKeyV4 {
    ServiceKeyV4::new(ip.parse::<Ipv4Addr>().unwrap().octets(), port, IPPROTO_TCP)
}

fn be(ip: &str) -> BackendV4 {
    BackendV4::new(ip.parse::<Ipv4Addr>().unwrap().octets(), 8080, IPPROTO_TCP)
}

// --- the harness ---

/// In-memory maps that record every write and check consistency after each one.
#[derive(Default)]
struct Recorded {
    maps: FakeMaps,
    ops: Vec<Op>,
    /// The first inconsistency seen after a write, if any.
    broken: Option<String>,
}

impl PolicyWriter for Recorded {
    fn apply_policy(&mut self, op: &PolicyOp) -> Result<(), PolicyWriteError> {
        self.maps.apply_policy(op)
    }
}

impl MapWriter for Recorded {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        self.maps.apply(op)?;
        self.ops.push(op.clone());
        if self.broken.is_none()
            && let Err(e) = self.maps.check_consistent()
        {
            self.broken = Some(format!("after {op:?}: {e}"));
        }
        Ok(())
    }
}

struct Harness {
    api: TestApi,
    maps: Arc<Mutex<Recorded>>,
    health: Arc<Health>,
    source: SourceHealth,
    metrics: Arc<Metrics>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Harness {
    /// A test API server holding `objects`, and an agent watching it.
    async fn start(objects: Vec<Value>) -> Self {
        let api = TestApi::start().await.expect("test API server");
        for obj in objects {
            api.apply_value(obj).expect("valid test object");
        }
        Self::watch(api).await
    }

    async fn watch(api: TestApi) -> Self {
        let client = api.client().await;
        let mut settings = Settings::new(NODE);
        settings.backoff = (Duration::from_millis(50), Duration::from_millis(400));
        settings.page_size = 3;
        settings.relist_chunk = 4;
        let source = SourceHealth::default();
        let (tx, mut rx) = mpsc::channel::<Batch>(64);
        let source_task =
            tokio::spawn(nodeplane_agent::source::kube::run(client, settings, tx, source.clone()));
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Arc::new(Metrics::new());
        let maps = Arc::new(Mutex::new(Recorded::default()));
        let mut agent = Agent::new(NodeContext::named(NODE), health.clone(), metrics.clone());
        let loop_maps = maps.clone();
        let loop_task = tokio::spawn(async move {
            // As the agent's own loop: one sync for whatever is queued, when one is due.
            while let Some(batch) = rx.recv().await {
                let mut due = agent.handle(batch);
                while let Ok(batch) = rx.try_recv() {
                    due |= agent.handle(batch);
                }
                if due {
                    let mut maps = loop_maps.lock().unwrap();
                    agent.sync(&mut *maps).expect("in-memory maps never fail");
                }
            }
        });
        Self { api, maps, health, source, metrics, _tasks: vec![source_task, loop_task] }
    }

    fn frontends(&self) -> BTreeMap<ServiceKeyV4, Vec<BackendV4>> {
        let maps = self.maps.lock().unwrap();
        if let Some(broken) = &maps.broken {
            panic!("maps were inconsistent {broken}");
        }
        maps.maps.frontends()
    }

    /// Waits until `f` holds for the maps; panics with them otherwise.
    async fn until(&self, what: &str, f: impl Fn(&BTreeMap<ServiceKeyV4, Vec<BackendV4>>) -> bool) {
        let start = Instant::now();
        loop {
            let got = self.frontends();
            if f(&got) {
                return;
            }
            if start.elapsed() > CONVERGE {
                panic!("timed out waiting for {what}; maps: {got:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn until_ready(&self) {
        let start = Instant::now();
        while !self.health.readyz().ok {
            assert!(start.elapsed() < CONVERGE, "not ready: {}", self.health.readyz().detail);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ops written since the last call.
    fn take_ops(&self) -> Vec<Op> {
        std::mem::take(&mut self.maps.lock().unwrap().ops)
    }
}

fn base() -> Vec<Value> {
    vec![
        namespace("default"),
        namespace("shop"),
        node(NODE),
        node("node-b"),
        service("default", "web", "10.96.0.10", &[("http", 80, "TCP")]),
        slice("default", "web-1", "web", &["10.244.1.2", "10.244.1.3"]),
        service("shop", "cart", "10.96.0.20", &[("http", 80, "TCP")]),
        slice("shop", "cart-1", "cart", &["10.244.1.7"]),
    ]
}

fn has(
    maps: &BTreeMap<ServiceKeyV4, Vec<BackendV4>>,
    key: ServiceKeyV4,
    backends: &[&str],
) -> bool {
    let want: Vec<BackendV4> = backends.iter().map(|a| be(a)).collect();
    maps.get(&key) == Some(&want)
}

// --- tests ---

#[tokio::test]
async fn syncs_from_the_api_and_follows_changes() {
    let h = Harness::start(base()).await;
    h.until("both Services", |m| {
        has(m, fe("10.96.0.10", 80), &["10.244.1.2", "10.244.1.3"])
            && has(m, fe("10.96.0.20", 80), &["10.244.1.7"])
    })
    .await;
    h.until_ready().await;
    let node_b_watched = h.source.get(Kind::Node);
    assert!(node_b_watched.lists >= 1);

    // An endpoint change.
    h.api.apply_value(slice("default", "web-1", "web", &["10.244.1.3", "10.244.1.4"])).unwrap();
    h.until("web's new endpoints", |m| has(m, fe("10.96.0.10", 80), &["10.244.1.3", "10.244.1.4"]))
        .await;

    // A second slice for the same Service adds to it.
    h.api.apply_value(slice("default", "web-2", "web", &["10.244.1.9"])).unwrap();
    h.until("web's second slice", |m| {
        has(m, fe("10.96.0.10", 80), &["10.244.1.3", "10.244.1.4", "10.244.1.9"])
    })
    .await;

    // Service deletion.
    assert!(h.api.delete::<k8s_openapi::api::core::v1::Service>(Some("default"), "web"));
    h.until("web gone", |m| !m.contains_key(&fe("10.96.0.10", 80))).await;
    assert!(h.frontends().contains_key(&fe("10.96.0.20", 80)), "cart untouched");

    // Namespace deletion: the namespace controller deletes what is in it.
    use k8s_openapi::api::{core::v1::Namespace, core::v1::Service, discovery::v1::EndpointSlice};
    assert!(h.api.delete::<EndpointSlice>(Some("shop"), "cart-1"));
    assert!(h.api.delete::<Service>(Some("shop"), "cart"));
    assert!(h.api.delete::<Namespace>(None, "shop"));
    h.until("everything gone", |m| m.is_empty()).await;
}

#[tokio::test]
async fn services_other_proxies_own_and_headless_ones_are_not_watched() {
    let mut other = service("default", "other", "10.96.0.30", &[("http", 80, "TCP")]);
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "foo"});
    let mut headless = service("default", "hl", "None", &[("http", 80, "TCP")]);
    headless["spec"]["clusterIPs"] = json!(["None"]);
    let mut objs = base();
    objs.extend([other, slice("default", "other-1", "other", &["10.244.1.5"]), headless]);
    let h = Harness::start(objs).await;
    h.until_ready().await;
    h.until("web", |m| m.contains_key(&fe("10.96.0.10", 80))).await;
    assert!(!h.frontends().contains_key(&fe("10.96.0.30", 80)));
    // Labelling a Service for another proxy later takes it away (the selector turns the
    // change into a deletion).
    let mut web = service("default", "web", "10.96.0.10", &[("http", 80, "TCP")]);
    web["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "foo"});
    h.api.apply_value(web).unwrap();
    h.until("web handed to another proxy", |m| !m.contains_key(&fe("10.96.0.10", 80))).await;
}

#[tokio::test]
async fn an_unreachable_api_keeps_the_datapath_and_a_relist_converges_without_loss() {
    let h = Harness::start(base()).await;
    h.until_ready().await;
    h.until("both Services", |m| m.len() == 2).await;
    h.take_ops();

    h.api.set_unreachable(true);
    // While it is down: web changes, cart is deleted and its DELETED event is lost, a new
    // Service appears.
    h.api.apply_value(slice("default", "web-1", "web", &["10.244.1.2", "10.244.1.8"])).unwrap();
    assert!(
        h.api.delete_silently::<k8s_openapi::api::discovery::v1::EndpointSlice>(
            Some("shop"),
            "cart-1"
        )
    );
    assert!(h.api.delete_silently::<k8s_openapi::api::core::v1::Service>(Some("shop"), "cart"));
    h.api.apply_value(service("default", "db", "10.96.0.40", &[("pg", 5432, "TCP")])).unwrap();
    h.api.drop_connections();

    // The source notices, the datapath keeps its last state.
    let start = Instant::now();
    while h.source.stale_for(Kind::Service, Instant::now()).is_zero() {
        assert!(start.elapsed() < CONVERGE, "the source never noticed the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(has(&h.frontends(), fe("10.96.0.20", 80), &["10.244.1.7"]), "last state kept");
    assert!(h.take_ops().is_empty(), "nothing written while the API is down");
    h.metrics.observe_source(&h.source, Instant::now());
    let text = h.metrics.encode();
    let stale = text
        .lines()
        .find_map(|l| l.strip_prefix("nodeplane_source_stale_seconds{kind=\"Service\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no stale gauge for Services:\n{text}"));
    assert!(stale > 0.0, "stale for {stale}s");
    assert!(h.health.healthz(Instant::now()).ok, "an unreachable API does not fail healthz");

    h.api.set_unreachable(false);
    h.until("converged to the API's state", |m| {
        has(m, fe("10.96.0.10", 80), &["10.244.1.2", "10.244.1.8"])
            && !m.contains_key(&fe("10.96.0.20", 80))
            && m.get(&ServiceKeyV4::new([10, 96, 0, 40], 5432, IPPROTO_TCP)) == Some(&vec![])
    })
    .await;
    assert!(h.source.stale_for(Kind::Service, Instant::now()).is_zero());
    // web kept a frontend through the relist: its entry was only ever replaced, and its
    // surviving backend was never removed.
    let ops = h.take_ops();
    let web = fe("10.96.0.10", 80);
    assert!(
        !ops.iter().any(|op| matches!(op, Op::DelService { key } if *key == web)),
        "web's frontend was deleted during the relist: {ops:?}"
    );
    let kept = be("10.244.1.2");
    let maps = h.maps.lock().unwrap();
    let kept_id = maps.maps.backends.iter().find(|(_, b)| **b == kept).map(|(id, _)| *id).unwrap();
    assert!(
        !ops.iter().any(|op| matches!(op, Op::DelBackend { id } if *id == kept_id)),
        "an unchanged backend was removed: {ops:?}"
    );
}

#[tokio::test]
async fn compaction_410_and_missed_deletes_converge() {
    let h = Harness::start(base()).await;
    h.until_ready().await;
    h.until("both Services", |m| m.len() == 2).await;
    let lists_before = h.api.stats();

    // Deleted without an event, then history compacted and watches cut: the watchers come
    // back with a resourceVersion the server no longer has.
    assert!(h.api.delete_silently::<k8s_openapi::api::core::v1::Service>(Some("shop"), "cart"));
    h.api.apply_value(slice("default", "web-1", "web", &["10.244.1.3"])).unwrap();
    h.api.compact();
    h.api.drop_connections();
    h.until("converged after 410", |m| {
        m.len() == 1 && has(m, fe("10.96.0.10", 80), &["10.244.1.3"])
    })
    .await;
    let stats = h.api.stats();
    assert!(stats.gone > lists_before.gone, "a 410 was served: {stats:?}");
}

#[tokio::test]
async fn paged_lists_of_many_services() {
    let mut objs = vec![namespace("default"), node(NODE)];
    for i in 0..25u8 {
        let ip = format!("10.96.1.{i}");
        objs.push(service("default", &format!("s{i}"), &ip, &[("http", 80, "TCP")]));
        objs.push(slice(
            "default",
            &format!("s{i}-1"),
            &format!("s{i}"),
            &[&format!("10.244.2.{i}")],
        ));
    }
    let api = TestApi::start().await.unwrap();
    api.set_max_page(4);
    for obj in objs {
        api.apply_value(obj).unwrap();
    }
    let h = Harness::watch(api).await;
    h.until_ready().await;
    h.until("all 25", |m| m.len() == 25 && m.values().all(|b| b.len() == 1)).await;
}

/// One clear skip per bad object, everything else programmed.
#[tokio::test]
async fn a_hostile_object_set_is_skipped_object_by_object() {
    let mut objs = base();
    // Invalid ClusterIPs: leading zeros, an IPv4-mapped IPv6 form.
    objs.push(service("default", "zeros", "010.96.0.11", &[("http", 80, "TCP")]));
    objs.push(service("default", "mapped", "::ffff:10.96.0.12", &[("http", 80, "TCP")]));
    // Port 0 (that port only) next to a good one.
    objs.push(service("default", "port0", "10.96.0.13", &[("bad", 0, "TCP"), ("http", 80, "TCP")]));
    // Endpoints with bad addresses next to a good one.
    objs.push(slice(
        "default",
        "port0-1",
        "port0",
        &["10.244.1.01", "::ffff:10.244.1.2", "127.0.0.1", "10.244.1.20"],
    ));
    // A slice in another namespace claiming web, by label or by a qualified name.
    objs.push(namespace("evil"));
    objs.push(slice("evil", "steal-1", "web", &["10.244.9.9"]));
    objs.push(slice("evil", "steal-2", "default/web", &["10.244.9.8"]));
    // A backend that is another Service's ClusterIP.
    objs.push(service("default", "loop", "10.96.0.14", &[("http", 80, "TCP")]));
    objs.push(slice("default", "loop-1", "loop", &["10.96.0.20", "10.244.1.30"]));
    // 20 slices x 1,000 endpoints for one Service: more than a frontend holds.
    objs.push(service("default", "huge", "10.96.0.15", &[("http", 80, "TCP")]));
    for s in 0..20u32 {
        let addrs: Vec<String> =
            (0..1000u32).map(|i| Ipv4Addr::from(0x0a64_0000 + s * 1000 + i).to_string()).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        objs.push(slice("default", &format!("huge-{s}"), "huge", &addrs));
    }
    let h = Harness::start(objs).await;
    h.until_ready().await;
    h.until("the good parts", |m| {
        has(m, fe("10.96.0.10", 80), &["10.244.1.2", "10.244.1.3"])
            && has(m, fe("10.96.0.20", 80), &["10.244.1.7"])
            && has(m, fe("10.96.0.13", 80), &["10.244.1.20"])
            && has(m, fe("10.96.0.14", 80), &["10.244.1.30"])
    })
    .await;
    let m = h.frontends();
    assert!(!m.contains_key(&fe("10.96.0.15", 80)), "the oversized Service is left out");
    assert!(!m.keys().any(|k| k.addr == [10, 96, 0, 11] || k.addr == [10, 96, 0, 12]));
    assert_eq!(m.len(), 4, "{m:#?}");
    let text = h.metrics.encode();
    for (reason, n) in [
        ("invalid_cluster_ip", 2),
        ("invalid_port", 1),
        ("invalid_endpoint_address", 2),
        ("forbidden_endpoint_address", 1),
        ("invalid_service_name", 1),
        ("service_conflict", 2),
    ] {
        let line = format!("nodeplane_skipped_objects{{reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
}
