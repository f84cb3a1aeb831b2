//! The Kubernetes API source at scale: 10,000 Services x 10 endpoints (and 50,000 Pods)
//! served by the in-process test API server (real HTTP list/watch), watched by the agent's
//! kube-rs source.
//!
//! ```text
//!  API runtime (2 workers): TestApi "services" and TestApi "+pods", the change generator
//!        │ HTTP list/watch on loopback
//!        ▼
//!  agent runtime (a fresh one per run, like the agent's #[tokio::main]): source::kube::run
//!        │ mpsc<Batch>
//!        ▼
//!  the agent loop on the calling thread: Agent::handle, drain, Agent::sync -> real BPF maps
//! ```
//!
//! Three measurements, each bounded in count and time:
//!
//! 1. **Start to first full sync**: source started -> `Health::readyz().ok`, with and without
//!    the Pods, interleaved, [`START_RUNS`] runs each, fresh maps every run.
//! 2. **Resident memory**: the real `nodeplane-agent` binary as a subprocess, VmRSS and
//!    VmHWM once `/readyz` answers 200, with and without the Pods, interleaved.
//! 3. **Network programming latency**: [`CHANGES`] single-endpoint changes at [`RATE`] per
//!    second (after [`WARMUP`] unmeasured ones), each timed from the API write and from the
//!    agent's receipt to the end of the sync that wrote it, matched by resourceVersion.
//!
//! A fresh agent runtime per run means dropping it cancels the source's watch tasks, so no
//! watcher of one run relists during the next.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use nodeplane_agent::{
    agent::Agent,
    datapath::Datapath,
    desired::NodeContext,
    health::Health,
    metrics::Metrics,
    source::{
        Batch, Event, Kind,
        kube::{Settings, SourceHealth},
        lean::LeanPod,
    },
};
use nodeplane_testapi::TestApi;
use serde_json::{Value, json};
use tokio::{runtime::Runtime, sync::mpsc};

use crate::bench_agent::{ENDPOINTS, SERVICES, ip};

/// Which of the three measurements to run (`nodeplane-bench api-start` etc.).
#[derive(Clone, Copy, Debug, Default)]
pub struct Parts {
    pub start: bool,
    pub memory: bool,
    pub latency: bool,
}

pub const PODS: u32 = 50_000;
/// Nodes the Pods are spread over; only [`NODE`] exists as a Node object.
const NODES: u32 = 500;
const NODE: &str = "node-0";
const NAMESPACE: &str = "bench";

/// Runs of each configuration for start-to-ready and for memory.
pub const START_RUNS: usize = 3;
pub const MEMORY_RUNS: usize = 3;
/// Endpoint changes per second, measured changes, and unmeasured ones before them.
pub const RATE: u32 = 20;
pub const CHANGES: u32 = 400;
pub const WARMUP: u32 = 20;

/// Bound on any one wait for readiness (in-process or the agent binary).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the latency run beyond the time the changes take at [`RATE`].
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

// --- objects ---

/// Deterministic lowercase hex, for hashes, uids and container ids.
fn hex(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(len);
    s
}

fn uid(seed: u64) -> String {
    let h = hex(seed, 32);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
           "spec": {"podCIDR": "10.244.0.0/24"},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}})
}

/// Service `s`: a ClusterIP and one TCP port, as in the programming-time benchmark.
fn service(s: u32) -> Value {
    let cluster_ip = ip([10, 96], s + 1);
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": NAMESPACE, "name": format!("svc-{s}")},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

/// The EndpointSlice of Service `s` with its `ENDPOINTS` ready endpoints; `changed` replaces
/// endpoint `e` by a fresh address.
fn slice(s: u32, changed: Option<(u32, String)>) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let addr = match &changed {
                Some((c, addr)) if *c == e => addr.clone(),
                _ => ip([10, 128], s * ENDPOINTS + e + 1),
            };
            json!({"addresses": [addr], "conditions": {"ready": true}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": NAMESPACE, "name": format!("svc-{s}-abc"),
                        "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn condition(kind: &str, at: &str) -> Value {
    json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": at})
}

/// `managedFields` key for a condition of `kind`, as the kubelet writes it.
fn condition_fields(kind: &str) -> (String, Value) {
    (
        format!(r#"k:{{"type":"{kind}"}}"#),
        json!({".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}),
    )
}

/// Pod `i`, shaped like one of a Deployment's replicas on a real cluster: labels, owner
/// reference, a container with image, args, env, ports, probes, resources and the service
/// account volume, a Running status with conditions and container status, and the
/// `managedFields` of the controller manager and the kubelet.
pub fn pod(i: u32) -> Value {
    let deployment = i / 10;
    let app = format!("app-{deployment}");
    let template = hex(u64::from(deployment), 10);
    let name = format!("{app}-{template}-{}", hex(u64::from(i) + (1 << 40), 5));
    let rs_uid = uid(u64::from(deployment) + (1 << 41));
    let pod_ip = ip([10, 244], i + 1);
    let host = i % NODES;
    let host_ip = format!("192.168.{}.{}", (host + 1) >> 8, (host + 1) & 0xff);
    let created = "2026-01-05T10:00:00Z";
    let image = format!("registry.example.com/team-{}/{app}:1.42.0", deployment % 40);
    let volume = format!("kube-api-access-{}", hex(u64::from(i) + (1 << 42), 5));
    let probe = |path: &str| {
        json!({"httpGet": {"path": path, "port": "http", "scheme": "HTTP"},
               "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
               "failureThreshold": 3})
    };
    let probe_fields = json!({".": {}, "f:failureThreshold": {},
        "f:httpGet": {".": {}, "f:path": {}, "f:port": {}, "f:scheme": {}},
        "f:periodSeconds": {}, "f:successThreshold": {}, "f:timeoutSeconds": {}});
    let env_value = json!({".": {}, "f:name": {}, "f:value": {}});
    let env_ref = json!({".": {}, "f:name": {}, "f:valueFrom": {".": {}, "f:fieldRef": {}}});
    let port_fields = json!({".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}});
    let controller_fields = json!({
        "f:metadata": {
            "f:generateName": {},
            "f:annotations": {".": {}, "f:prometheus.io/port": {}, "f:prometheus.io/scrape": {}},
            "f:labels": {".": {}, "f:app.kubernetes.io/component": {},
                         "f:app.kubernetes.io/instance": {}, "f:app.kubernetes.io/name": {},
                         "f:pod-template-hash": {}},
            "f:ownerReferences": {".": {}, format!(r#"k:{{"uid":"{rs_uid}"}}"#): {}}
        },
        "f:spec": {
            "f:containers": {r#"k:{"name":"server"}"#: {
                ".": {}, "f:args": {},
                "f:env": {".": {},
                          r#"k:{"name":"GOMAXPROCS"}"#: env_value.clone(),
                          r#"k:{"name":"LOG_LEVEL"}"#: env_value,
                          r#"k:{"name":"POD_IP"}"#: env_ref.clone(),
                          r#"k:{"name":"POD_NAME"}"#: env_ref},
                "f:image": {}, "f:imagePullPolicy": {}, "f:livenessProbe": probe_fields.clone(),
                "f:name": {},
                "f:ports": {".": {},
                            r#"k:{"containerPort":8080,"protocol":"TCP"}"#: port_fields.clone(),
                            r#"k:{"containerPort":9090,"protocol":"TCP"}"#: port_fields},
                "f:readinessProbe": probe_fields,
                "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}},
                                "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}}},
                "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {}
            }},
            "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {},
            "f:schedulerName": {}, "f:securityContext": {}, "f:terminationGracePeriodSeconds": {}
        }
    });
    let kinds = ["ContainersReady", "Initialized", "PodReadyToStartContainers", "Ready"];
    let mut conditions = serde_json::Map::new();
    conditions.insert(".".into(), json!({}));
    for kind in kinds {
        let (k, v) = condition_fields(kind);
        conditions.insert(k, v);
    }
    let kubelet_fields = json!({"f:status": {
        "f:conditions": conditions, "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {},
        "f:phase": {}, "f:podIP": {},
        "f:podIPs": {".": {}, format!(r#"k:{{"ip":"{pod_ip}"}}"#): {".": {}, "f:ip": {}}},
        "f:startTime": {}
    }});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "generateName": format!("{app}-{template}-"), "namespace": NAMESPACE,
            "uid": uid(u64::from(i)), "creationTimestamp": created,
            "labels": {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": app,
                       "app.kubernetes.io/component": "server", "pod-template-hash": template},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("{app}-{template}"), "uid": rs_uid,
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": created, "fieldsType": "FieldsV1", "fieldsV1": controller_fields},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-01-05T10:00:04Z", "fieldsType": "FieldsV1",
                 "fieldsV1": kubelet_fields, "subresource": "status"}
            ]
        },
        "spec": {
            "containers": [{
                "name": "server", "image": image, "imagePullPolicy": "IfNotPresent",
                "args": ["--listen=:8080", "--metrics-listen=:9090", "--config=/etc/app/config.yaml"],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                    {"name": "LOG_LEVEL", "value": "info"},
                    {"name": "GOMAXPROCS", "value": "2"}
                ],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"memory": "256Mi"}},
                "livenessProbe": probe("/healthz"), "readinessProbe": probe("/ready"),
                "volumeMounts": [{"name": volume, "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File"
            }],
            "volumes": [{"name": volume, "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ]}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "serviceAccount": "default", "nodeName": format!("node-{host}"),
            "securityContext": {}, "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running",
            "conditions": kinds.map(|k| condition(k, "2026-01-05T10:00:04Z")),
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "startTime": created,
            "containerStatuses": [{
                "name": "server", "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-01-05T10:00:02Z"}}, "lastState": {},
                "image": image,
                "imageID": format!("registry.example.com/team-{}/{app}@sha256:{}", deployment % 40, hex(u64::from(deployment) + (1 << 43), 64)),
                "containerID": format!("containerd://{}", hex(u64::from(i) + (1 << 44), 64))
            }],
            "qosClass": "Burstable"
        }
    })
}

/// JSON sizes of a Pod: as served, its `managedFields`, and what the agent keeps of it
/// (decoded as a `LeanPod`, as the API source does).
pub fn pod_sizes() -> (usize, usize, usize) {
    let value = pod(PODS / 2);
    let len = |v: &Value| serde_json::to_vec(v).expect("JSON serializes").len();
    let managed = value.pointer("/metadata/managedFields").map_or(0, len);
    let lean: LeanPod = serde_json::from_value(value.clone()).expect("the bench Pod is a Pod");
    let kept = serde_json::to_value(Pod::from(lean)).expect("a Pod serializes");
    (len(&value), managed, len(&kept))
}

/// Median time to deserialize one Pod (and drop it) as a full k8s-openapi `Pod` and as the
/// `LeanPod` the API source decodes. Interleaved rounds.
pub fn pod_decode_cost() -> (Duration, Duration) {
    let bytes = serde_json::to_vec(&pod(PODS / 2)).expect("a Pod serializes");
    let full = || drop(std::hint::black_box(serde_json::from_slice::<Pod>(&bytes).unwrap()));
    let lean = || drop(std::hint::black_box(serde_json::from_slice::<LeanPod>(&bytes).unwrap()));
    let decoders: [&dyn Fn(); 2] = [&full, &lean];
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..10 {
        for (decode, t) in decoders.iter().zip(&mut times) {
            for _ in 0..200 {
                let start = Instant::now();
                decode();
                t.push(start.elapsed());
            }
        }
    }
    (median(&times[0]), median(&times[1]))
}

/// Writes the Namespace, the Node, the Services and their slices, and `pods` Pods.
fn load(api: &TestApi, pods: u32) {
    let put = |v: Value| {
        api.apply_value(v).unwrap_or_else(|e| panic!("loading the test API: {e}"));
    };
    put(namespace());
    put(node());
    for s in 0..SERVICES {
        put(service(s));
        put(slice(s, None));
    }
    for i in 0..pods {
        put(pod(i));
    }
}

// --- the agent loop, in process ---

/// A runtime like the agent's `#[tokio::main]` (one worker per CPU).
fn agent_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("agent")
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("building a tokio runtime: {e}"))
}

/// The agent's run loop without the servers and timers: a source feeding an [`Agent`] that
/// writes the real maps.
struct InProcess {
    agent: Agent,
    health: Arc<Health>,
    rx: mpsc::Receiver<Batch>,
    datapath: Datapath,
    started: Instant,
    /// Kinds whose initial list has been handled, and when the last one was.
    listed: std::collections::BTreeSet<Kind>,
    listed_at: Option<Instant>,
}

/// What one pass of the loop did.
#[derive(Default)]
struct Pass {
    /// For each batch that changed the index (those `SyncReport::latencies` covers), in
    /// order: the resourceVersion of the object it applied, if any.
    changed: Vec<Option<u64>>,
    /// `None` if no sync was due.
    sync: Option<nodeplane_agent::agent::SyncReport>,
    /// When the sync returned.
    done: Option<Instant>,
    sync_time: Duration,
    /// Time spent handling the batches and syncing.
    busy: Duration,
}

impl InProcess {
    /// Loads fresh maps, then starts the source on the current runtime.
    async fn start(api: &TestApi) -> Self {
        let datapath =
            Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
        let client = api.client().await;
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let agent = Agent::new(NodeContext::named(NODE), health.clone(), Arc::new(Metrics::new()));
        let (tx, rx) = mpsc::channel::<Batch>(1024);
        let started = Instant::now();
        tokio::spawn(nodeplane_agent::source::kube::run(
            client,
            Settings::new(NODE),
            tx,
            SourceHealth::default(),
        ));
        Self { agent, health, rx, datapath, started, listed: Default::default(), listed_at: None }
    }

    /// One turn of `agent::run`'s loop: a batch, whatever else is queued, one sync. `None`
    /// if nothing arrived by `deadline`.
    async fn pass(&mut self, deadline: Instant) -> Option<Pass> {
        let first = tokio::time::timeout_at(deadline.into(), self.rx.recv())
            .await
            .ok()?
            .unwrap_or_else(|| panic!("the API source stopped"));
        let t = Instant::now();
        let mut pass = Pass::default();
        let mut due = false;
        let mut batch = Some(first);
        while let Some(b) = batch {
            let rv = applied_rv(&b);
            for event in &b.events {
                if let Event::Reset(kind, _) | Event::Retain(kind, _) = event {
                    self.listed.insert(*kind);
                }
            }
            let before = self.agent.index().revision();
            due |= self.agent.handle(b);
            // The agent times exactly the batches that changed the index.
            if self.agent.index().revision() != before {
                pass.changed.push(rv);
            }
            batch = self.rx.try_recv().ok();
        }
        if self.listed_at.is_none() && self.listed.len() == Kind::ALL.len() {
            self.listed_at = Some(Instant::now());
        }
        if due {
            let t = Instant::now();
            let report = self.agent.sync(self.datapath.maps()).unwrap_or_else(|e| {
                panic!("sync into the kernel maps: {e}");
            });
            let done = Instant::now();
            pass.sync_time = done - t;
            pass.done = Some(done);
            pass.sync = Some(report);
        }
        pass.busy = t.elapsed();
        Some(pass)
    }

    /// Runs the loop until `/readyz` would answer 200.
    async fn until_ready(&mut self) -> StartRun {
        let deadline = self.started + READY_TIMEOUT;
        while !self.health.readyz().ok {
            if self.pass(deadline).await.is_none() {
                panic!("not ready after {READY_TIMEOUT:?}: {}", self.health.readyz().detail);
            }
        }
        let listed = self.listed_at.map_or(Duration::ZERO, |t| t - self.started);
        StartRun { ready: self.started.elapsed(), listed, heap: 0 }
    }
}

/// One start-to-ready run.
#[derive(Clone, Copy, Debug)]
pub struct StartRun {
    /// Source started -> readyz ok.
    pub ready: Duration,
    /// Source started -> every kind's initial list handled into the index (the first full
    /// sync starts).
    pub listed: Duration,
    /// Heap bytes in use at ready minus before the run: the agent's index, sync state,
    /// runtime and client.
    pub heap: i64,
}

/// Bytes the allocator has handed out and not got back (glibc's `mallinfo2`, all arenas).
#[cfg(target_env = "gnu")]
fn heap_in_use() -> i64 {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as i64
}

#[cfg(not(target_env = "gnu"))]
fn heap_in_use() -> i64 {
    0
}

/// The resourceVersion of the object a one-event batch applies (the kube source sends one
/// event per batch).
fn applied_rv(batch: &Batch) -> Option<u64> {
    match batch.events.as_slice() {
        [Event::Apply(obj)] => obj.meta().resource_version.as_deref()?.parse().ok(),
        _ => None,
    }
}

/// Source start to first full sync, in a fresh runtime with fresh maps.
fn start_to_ready(api: &TestApi) -> StartRun {
    let before = heap_in_use();
    let rt = agent_runtime();
    let run = rt.block_on(async {
        let mut p = InProcess::start(api).await;
        let run = p.until_ready().await;
        StartRun { heap: heap_in_use() - before, ..run }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    run
}

// --- network programming latency ---

pub struct LatencyResult {
    /// Agent receipt -> map written (the agent's `SyncReport::latencies`), per change.
    pub received: Vec<Duration>,
    /// API write -> map written, per change.
    pub written: Vec<Duration>,
    /// Per sync after the warm-up: duration, map ops, batches coalesced.
    pub syncs: Vec<(Duration, usize, usize)>,
    /// Share of the wall time after the warm-up that the loop spent in handle + sync.
    pub busy: f64,
    /// Changes never seen programmed before the deadline.
    pub lost: usize,
}

/// Writes `n` single-endpoint changes at `rate` per second; returns each change's
/// resourceVersion and the instant just before its write.
async fn write_changes(api: TestApi, n: u32, rate: u32) -> Vec<(u64, Instant)> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut out = Vec::with_capacity(n as usize);
    for k in 0..n {
        tick.tick().await;
        // 7919 is prime to SERVICES: every change hits a different slice.
        let s = (k * 7919 + 13) % SERVICES;
        let changed = slice(s, Some((k % ENDPOINTS, ip([10, 160], k + 1))));
        let at = Instant::now();
        let rv = api.apply_value(changed).unwrap_or_else(|e| panic!("change {k}: {e}"));
        out.push((rv, at));
    }
    out
}

fn programming_latency(api: &TestApi, api_rt: &tokio::runtime::Handle) -> LatencyResult {
    let rt = agent_runtime();
    let result = rt.block_on(async {
        let mut p = InProcess::start(api).await;
        p.until_ready().await;
        let total = WARMUP + CHANGES;
        let writer = api_rt.spawn(write_changes(api.clone(), total, RATE));
        let began = Instant::now();
        let deadline = began + Duration::from_secs(u64::from(total / RATE)) + DRAIN_TIMEOUT;
        // (rv, receipt -> written, done)
        let mut programmed: Vec<(u64, Duration, Instant)> = Vec::new();
        let mut syncs = Vec::new();
        let mut busy = Duration::ZERO;
        // Sync statistics and the busy share start once the warm-up changes are programmed.
        let mut measuring: Option<Instant> = None;
        while programmed.len() < total as usize {
            let Some(pass) = p.pass(deadline).await else { break };
            if measuring.is_some() {
                busy += pass.busy;
            }
            if let (Some(report), Some(done)) = (pass.sync, pass.done) {
                assert_eq!(
                    report.latencies.len(),
                    pass.changed.len(),
                    "SyncReport::latencies should hold one entry per batch that changed the index"
                );
                for (rv, latency) in pass.changed.iter().zip(&report.latencies) {
                    if let Some(rv) = rv {
                        programmed.push((*rv, *latency, done));
                    }
                }
                if measuring.is_some() {
                    syncs.push((pass.sync_time, report.ops, pass.changed.len()));
                }
            }
            if measuring.is_none() && programmed.len() >= WARMUP as usize {
                measuring = Some(Instant::now());
            }
        }
        let wall = measuring.map_or(Duration::ZERO, |t| t.elapsed());
        let writes = writer.await.unwrap_or_else(|e| panic!("the change writer failed: {e}"));
        (writes, programmed, syncs, busy, wall)
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let (writes, programmed, syncs, busy, wall) = result;
    let by_rv: std::collections::HashMap<u64, (Duration, Instant)> =
        programmed.iter().map(|(rv, l, done)| (*rv, (*l, *done))).collect();
    let mut received = Vec::new();
    let mut written = Vec::new();
    let mut lost = 0;
    for (rv, at) in writes.iter().skip(WARMUP as usize) {
        match by_rv.get(rv) {
            Some((latency, done)) => {
                received.push(*latency);
                written.push(done.saturating_duration_since(*at));
            }
            None => lost += 1,
        }
    }
    LatencyResult {
        received,
        written,
        syncs,
        busy: busy.as_secs_f64() / wall.as_secs_f64().max(1e-9),
        lost,
    }
}

// --- resident memory of the agent binary ---

#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// VmRSS and VmHWM, in bytes, when /readyz first answers 200.
    pub rss: u64,
    pub hwm: u64,
    /// Process start to /readyz 200 (includes loading the datapath).
    pub ready_after: Duration,
}

/// Kills and reaps the agent however the measurement ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary next to this one (`cargo xtask bench` builds both), or
/// `NODEPLANE_AGENT_BIN`.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEPLANE_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("locating the bench: {e}"));
    let bin = exe.with_file_name("nodeplane-agent");
    assert!(
        bin.exists(),
        "{} not found: build it (cargo build --release -p nodeplane-agent) or set \
         NODEPLANE_AGENT_BIN",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}

/// The status code of `GET /readyz`, if the server answers.
fn readyz(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 32];
    let n = s.read(&mut head).ok()?;
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..n]).ok()?.split(' ').nth(1)?.parse().ok()
}

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn vm(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs `nodeplane-agent run` against `api` until /readyz is 200, reads its memory, kills it.
fn agent_memory(api: &TestApi, bin: &Path, dir: &Path, run: usize) -> Memory {
    let kubeconfig = dir.join(format!("kubeconfig-{}", api.addr().port()));
    api.write_kubeconfig(&kubeconfig)
        .unwrap_or_else(|e| panic!("writing {}: {e}", kubeconfig.display()));
    let log_path = dir.join(format!("agent-{}-{run}.log", api.addr().port()));
    let log = std::fs::File::create(&log_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
    let healthz = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let started = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--iface-prefix", "nomatch", "--counters-interval", "0s"])
        .arg(format!("--healthz-bind-address={healthz}"))
        .arg("--metrics-bind-address=")
        .env_remove("NODEPLANE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Loopback traffic must not go through a proxy.
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
    {
        cmd.env_remove(var);
    }
    let mut child =
        Reaped(cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", bin.display())));
    let pid = child.0.id();
    loop {
        if readyz(healthz) == Some(200) {
            break;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the agent exited ({status}) before ready:\n{}", log_tail(&log_path));
        }
        if started.elapsed() > READY_TIMEOUT {
            panic!("the agent was not ready after {READY_TIMEOUT:?}:\n{}", log_tail(&log_path));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready_after = started.elapsed();
    let (rss, hwm) = vm(pid);
    drop(child);
    Memory { rss, hwm, ready_after }
}

// --- the report ---

fn median<T: Copy + Ord>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// Nearest-rank percentile, `p` in (0, 1].
fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn latency_line(what: &str, v: &[Duration]) {
    if v.is_empty() {
        println!("  {what:<34} no samples");
        return;
    }
    println!(
        "  {what:<34} p50 {:>6.1} ms   p99 {:>6.1} ms   max {:>6.1} ms   ({} changes)",
        ms(percentile(v, 0.5)),
        ms(percentile(v, 0.99)),
        ms(*v.iter().max().expect("not empty")),
        v.len()
    );
}

pub fn run(parts: Parts) {
    let api_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("testapi")
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("building a tokio runtime: {e}"));
    let t = Instant::now();
    let start = || api_rt.block_on(TestApi::start()).unwrap_or_else(|e| panic!("test API: {e}"));
    let (small, full) = (start(), start());
    load(&small, 0);
    load(&full, PODS);
    println!(
        "\nKubernetes API source: {SERVICES} Services x {ENDPOINTS} endpoints (+ {PODS} Pods) in \
         the in-process test API server (loaded in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let (pod_json, pod_managed, pod_kept) = pod_sizes();
    let (decode_full, decode_lean) = pod_decode_cost();
    println!(
        "  a Pod is {pod_json} bytes of JSON ({pod_managed} of managedFields), {pod_kept} kept by \
         the agent; deserializing one takes {:.1} us as a full Pod, {:.1} us as a LeanPod \
         ({:.2}x)",
        decode_full.as_secs_f64() * 1e6,
        decode_lean.as_secs_f64() * 1e6,
        decode_full.as_secs_f64() / decode_lean.as_secs_f64()
    );
    let configs = [("services only", &small), ("services + 50,000 pods", &full)];
    if parts.start {
        start_report(&configs);
    }
    if parts.memory {
        memory_report(&configs);
    }
    if parts.latency {
        latency_report(&full, api_rt.handle());
    }
    drop((small, full));
    api_rt.shutdown_timeout(Duration::from_secs(5));
}

/// 1. Start to first full sync, the two configurations interleaved.
fn start_report(configs: &[(&str, &TestApi); 2]) {
    let mut runs = [Vec::new(), Vec::new()];
    for _ in 0..START_RUNS {
        for (i, (_, api)) in configs.iter().enumerate() {
            runs[i].push(start_to_ready(api));
        }
    }
    println!(
        "\nstart -> first full sync (source started -> readyz ok), in process, {START_RUNS} runs, \
         medians"
    );
    let ready = |i: usize| median(&runs[i].iter().map(|r| r.ready).collect::<Vec<_>>());
    let heap = |i: usize| median(&runs[i].iter().map(|r| r.heap).collect::<Vec<_>>());
    for (i, (name, _)) in configs.iter().enumerate() {
        let listed = median(&runs[i].iter().map(|r| r.listed).collect::<Vec<_>>());
        let all: Vec<String> = runs[i].iter().map(|r| format!("{:.0}", ms(r.ready))).collect();
        println!(
            "  {name:<24} ready {:>6.0} ms (all listed at {:>6.0} ms)   heap held {:>6.1} MiB   \
             runs [{}] ms",
            ms(ready(i)),
            ms(listed),
            heap(i) as f64 / (1024.0 * 1024.0),
            all.join(", ")
        );
    }
    println!(
        "  with pods / without: {:.2}; heap held per Pod: {:.0} bytes",
        ready(1).as_secs_f64() / ready(0).as_secs_f64(),
        (heap(1) - heap(0)) as f64 / f64::from(PODS)
    );
}

/// 2. Resident memory of the agent binary, the two configurations interleaved.
fn memory_report(configs: &[(&str, &TestApi); 2]) {
    let bin = agent_bin();
    let dir = std::env::temp_dir().join(format!("nodeplane-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut mems = [Vec::new(), Vec::new()];
    for run in 0..MEMORY_RUNS {
        for (i, (_, api)) in configs.iter().enumerate() {
            mems[i].push(agent_memory(api, &bin, &dir, run));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nnodeplane-agent resident memory at readyz 200, {MEMORY_RUNS} runs, medians");
    let med = |m: &[Memory]| {
        (
            median(&m.iter().map(|m| m.rss).collect::<Vec<_>>()),
            median(&m.iter().map(|m| m.hwm).collect::<Vec<_>>()),
            median(&m.iter().map(|m| m.ready_after).collect::<Vec<_>>()),
        )
    };
    for (i, (name, _)) in configs.iter().enumerate() {
        let (rss, hwm, ready) = med(&mems[i]);
        let runs: Vec<String> = mems[i].iter().map(|m| format!("{:.1}", mib(m.rss))).collect();
        println!(
            "  {name:<24} VmRSS {:>6.1} MiB   VmHWM {:>6.1} MiB   ready after {:>5.0} ms   \
             (VmRSS runs [{}])",
            mib(rss),
            mib(hwm),
            ms(ready),
            runs.join(", ")
        );
    }
    let ((rss0, hwm0, _), (rss1, hwm1, _)) = (med(&mems[0]), med(&mems[1]));
    println!(
        "  per Pod: {:.0} bytes (VmRSS), {:.0} bytes (VmHWM)",
        (rss1 as f64 - rss0 as f64) / f64::from(PODS),
        (hwm1 as f64 - hwm0 as f64) / f64::from(PODS)
    );
}

/// 3. Network programming latency.
fn latency_report(api: &TestApi, api_rt: &tokio::runtime::Handle) {
    let r = programming_latency(api, api_rt);
    println!(
        "\nnetwork programming latency: {CHANGES} single-endpoint changes at {RATE}/s (after \
         {WARMUP} unmeasured), {SERVICES} services x {ENDPOINTS} endpoints + {PODS} pods"
    );
    latency_line("event received -> map written", &r.received);
    latency_line("API write -> map written", &r.written);
    if r.lost > 0 {
        println!("  {} changes were not seen programmed before the deadline", r.lost);
    }
    if !r.syncs.is_empty() {
        let times: Vec<Duration> = r.syncs.iter().map(|s| s.0).collect();
        let ops: Vec<usize> = r.syncs.iter().map(|s| s.1).collect();
        let batches: Vec<usize> = r.syncs.iter().map(|s| s.2).collect();
        println!(
            "  {} syncs: duration p50 {:.1} ms, max {:.1} ms; map ops p50 {}; changes per sync \
             p50 {}, max {}; agent loop busy {:.1}% of the time",
            r.syncs.len(),
            ms(percentile(&times, 0.5)),
            ms(*times.iter().max().expect("not empty")),
            median(&ops),
            median(&batches),
            batches.iter().max().expect("not empty"),
            r.busy * 100.0
        );
    }
}
