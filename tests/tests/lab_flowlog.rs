//! The NetworkPolicy verdict log (`--flow-log`) and the policy metrics end to end, in the
//! 3x3 lab of `nodeplane_tests::netpol`: real sockets make denied and allowed flows, and
//! the test reads the JSON lines the agent appends to a file in the lab's state dir and
//! the agent's `/metrics` inside the node netns.
//!
//! ```text
//!  pod sockets ──▶ datapath ──FLOW_EVENTS──▶ agent ──JSON lines──▶ <state dir>/flows.log ◀── FlowFile
//!                     └──POLICY_COUNTERS──▶ agent ──/metrics (127.0.0.1 in the node netns)──▶ scrape
//! ```
//!
//! Every scenario installs the same two ingress policies in x (default deny, and x/a from
//! namespace y on TCP 80) and waits until the datapath denies x/b -> x/a: the first flow
//! from z/a or y/a to x/a after that is the test's own, so lines are matched by pod, not by
//! position in the file. Lines are parsed with serde_json; every wait is bounded.
//!
//! Needs root and the binaries built by `cargo xtask test`.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use nodeplane_tests::netpol::{Harness, PROBE_TIMEOUT, PodId, XA, XB, pod};
use serde_json::{Value, json};

const YA: PodId = pod("y", "a");
const ZA: PodId = pod("z", "a");

/// How long a line may take to appear: the agent drains the ring on readiness and writes
/// aggregates once a second.
const LINE_WAIT: Duration = Duration::from_secs(10);
/// How long the agent gets to program the policies.
const PROGRAM_WAIT: Duration = Duration::from_secs(15);

const DENY_POLICY: &str = "x/deny-ingress";
const ALLOW_POLICY: &str = "x/a-from-y";

/// Default deny ingress in x, and x/a open to namespace y on TCP 80: both select x/a.
const X_POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    ports: [{protocol: TCP, port: 80}]
";

const EGRESS_POLICY: &str = "y/to-x-a-http";

/// y may send only to x/a on TCP 80: makes y's egress isolated, so its allowed flows are
/// judged (and logged) in `from_pod`, where the ClusterIP is still known.
const Y_EGRESS: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: to-x-a-http, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {ns: x}}
      podSelector: {matchLabels: {pod: a}}
    ports: [{protocol: TCP, port: 80}]
";

// --- the lab ---

/// The 3x3 lab with the agent writing its flow log to a file and serving metrics on a
/// free port of the node's loopback.
struct FlowLab {
    h: Harness,
    log: FlowFile,
    metrics: SocketAddrV4,
}

impl FlowLab {
    /// Starts the lab with `--flow-log <state dir>/flows.log`, the metrics address and
    /// `extra` agent flags, then applies `policies` and waits until x/b -> x/a:80 is denied.
    fn start(extra: &[&str], policies: &str) -> FlowLab {
        let mut path = PathBuf::new();
        let mut metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let h = Harness::start_with(|lab| {
            path = lab.state_dir().join("flows.log");
            metrics.set_port(free_port_in_node(lab));
            let mut args: Vec<OsString> = vec![
                "--flow-log".into(),
                path.clone().into(),
                "--metrics-bind-address".into(),
                metrics.to_string().into(),
            ];
            args.extend(extra.iter().map(OsString::from));
            args
        });
        let lab = FlowLab { h, log: FlowFile { path, offset: 0 }, metrics };
        lab.h.apply(policies);
        lab.wait_until_denied(XB, XA);
        lab
    }

    /// Waits until a TCP connection `from` -> `to`:80 fails: the policies are programmed.
    fn wait_until_denied(&self, from: PodId, to: PodId) {
        let begin = Instant::now();
        while self.tcp(from, SocketAddrV4::new(self.h.ip(to), 80)).is_ok() {
            assert!(
                begin.elapsed() < PROGRAM_WAIT,
                "{from} -> {to}:80 still allowed after {PROGRAM_WAIT:?}\nagent log:\n{}",
                self.h.agent_log_tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("policies programmed in {:?}", begin.elapsed());
    }

    /// One TCP connection attempt from `from` (a single SYN: the timeout is shorter than
    /// the first retransmission), returning who answered.
    fn tcp(&self, from: PodId, to: SocketAddrV4) -> Result<String, String> {
        self.h
            .lab()
            .tcp_ask(from.ns, from.name, to, PROBE_TIMEOUT)
            .map_err(|e| format!("{from} -> {to}: {e}"))
    }

    /// `/metrics`, fetched from inside the node netns.
    fn scrape(&self) -> Metrics {
        let addr = self.metrics;
        let text = self
            .h
            .lab()
            .in_node(move || http_get(addr, "/metrics"))
            .unwrap_or_else(|e| panic!("entering the node netns: {e:#}"))
            .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
        Metrics::parse(&text)
    }

    /// Scrapes until `done` holds (the agent copies counters once a second).
    fn scrape_until(&self, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        let begin = Instant::now();
        loop {
            let m = self.scrape();
            if done(&m) {
                return m;
            }
            assert!(
                begin.elapsed() < LINE_WAIT,
                "{what}: not on /metrics after {LINE_WAIT:?}:\n{}",
                m.text
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn free_port_in_node(lab: &nodeplane_lab::Lab) -> u16 {
    lab.in_node(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding port 0");
        listener.local_addr().expect("a bound address").port()
    })
    .unwrap_or_else(|e| panic!("entering the node netns: {e:#}"))
}

/// A GET that must answer 200: the body.
fn http_get(addr: SocketAddrV4, path: &str) -> std::io::Result<String> {
    match nodeplane_tests::http::get(addr, path, Duration::from_secs(5))? {
        (200, body) => Ok(body),
        (status, _) => Err(std::io::Error::other(format!("answered {status}"))),
    }
}

// --- the flow log file ---

/// The flow log, read incrementally: only whole lines, each parsed as JSON.
struct FlowFile {
    path: PathBuf,
    /// Bytes of the file already returned.
    offset: usize,
}

impl FlowFile {
    /// The lines appended since the last call.
    fn read_new(&mut self) -> Vec<Value> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading {}: {e}", self.path.display()),
        };
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1) else {
            return Vec::new();
        };
        if end <= self.offset {
            return Vec::new();
        }
        let text = std::str::from_utf8(&bytes[self.offset..end]).expect("the log is UTF-8");
        self.offset = end;
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    /// Reads until `done(lines so far)` holds or [`LINE_WAIT`] passes; returns the lines.
    fn wait_for(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let begin = Instant::now();
        let mut lines = Vec::new();
        loop {
            lines.extend(self.read_new());
            if done(&lines) {
                return lines;
            }
            assert!(
                begin.elapsed() < LINE_WAIT,
                "{what}: not in the flow log after {LINE_WAIT:?}; read:\n{}",
                render(&lines)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads until nothing new has come for `quiet` (the log has settled: one-second
    /// aggregates written, the token bucket refilled), at most [`LINE_WAIT`].
    fn settle(&mut self, quiet: Duration) -> Vec<Value> {
        let begin = Instant::now();
        let mut last_new = Instant::now();
        let mut lines = Vec::new();
        while last_new.elapsed() < quiet {
            let new = self.read_new();
            if !new.is_empty() {
                last_new = Instant::now();
                lines.extend(new);
            }
            assert!(begin.elapsed() < LINE_WAIT, "the flow log keeps growing:\n{}", render(&lines));
            thread::sleep(Duration::from_millis(50));
        }
        lines
    }
}

fn render(lines: &[Value]) -> String {
    lines.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
}

/// Whether `line` is a `type` line with `verdict` in `direction` from pod `src` to pod `dst`.
fn is(line: &Value, kind: &str, verdict: &str, direction: &str, src: PodId, dst: PodId) -> bool {
    line["type"] == kind
        && line["verdict"] == verdict
        && line["direction"] == direction
        && line["src"]["pod"] == src.to_string()
        && line["dst"]["pod"] == dst.to_string()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("not a string: {s}")))
        .collect()
}

// --- metrics ---

/// One scrape: `(name, labels) -> value` for every sample.
struct Metrics {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    text: String,
}

impl Metrics {
    /// The OpenMetrics text format, as far as the agent uses it (no escapes in values).
    fn parse(text: &str) -> Metrics {
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            samples.insert((name.to_string(), labels), value);
        }
        Metrics { samples, text: text.to_string() }
    }

    /// The sample `name{labels}` (exactly these labels), 0 if absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.get(&(name.to_string(), labels)).copied().unwrap_or(0.0)
    }

    fn verdicts(&self, policy: &str, direction: &str, verdict: &str) -> f64 {
        let labels = [("policy", policy), ("direction", direction), ("verdict", verdict)];
        self.get("nodeplane_policy_verdicts_total", &labels)
    }

    fn flow_events(&self, outcome: &str) -> f64 {
        self.get("nodeplane_flow_events_total", &[("outcome", outcome)])
    }

    /// Packets NetworkPolicy dropped at `hook` (`from_pod`: a sender's egress, `to_pod`: a
    /// receiver's ingress).
    fn policy_drops(&self, hook: &str) -> f64 {
        let labels = [("hook", hook), ("reason", "policy-denied"), ("verdict", "drop")];
        self.get("nodeplane_datapath_packets_total", &labels)
    }
}

// --- the scenarios ---

/// One allowed connection y/a -> x/a:80, then one denied z/a -> x/a:80; returns z/a's
/// deny line, checked field by field.
fn allowed_then_denied(lab: &mut FlowLab) -> Value {
    let xa80 = SocketAddrV4::new(lab.h.ip(XA), 80);
    assert_eq!(lab.tcp(YA, xa80).as_deref(), Ok("x/a"), "y/a may reach x/a:80");
    let denied = lab.tcp(ZA, xa80);
    assert!(denied.is_err(), "z/a reached x/a:80: {denied:?}");
    let lines = lab.log.wait_for("the deny line of z/a -> x/a:80", |lines| {
        lines.iter().any(|l| is(l, "flow", "deny", "ingress", ZA, XA))
    });
    let deny: Vec<&Value> =
        lines.iter().filter(|l| is(l, "flow", "deny", "ingress", ZA, XA)).collect();
    assert_eq!(deny.len(), 1, "one SYN, one line:\n{}", render(&lines));
    let line = deny[0].clone();
    assert_eq!(line["protocol"], "TCP", "{line}");
    assert_eq!(line["dst"]["ip"], lab.h.ip(XA).to_string(), "{line}");
    assert_eq!(line["dst"]["port"], 80, "{line}");
    assert_eq!(line["src"]["ip"], lab.h.ip(ZA).to_string(), "{line}");
    assert!(line["src"]["port"].as_u64().is_some_and(|p| p > 0), "a source port: {line}");
    assert!(line["src"]["identity"].is_u64(), "the peer's identity: {line}");
    assert_eq!(line["reason"], "policy-denied", "{line}");
    assert_eq!(line["count"], 1, "{line}");
    assert_eq!(line["node"], nodeplane_lab::naming::NODE_NAME, "{line}");
    assert_eq!(line.get("service"), None, "not sent to a Service: {line}");
    // Both policies select x/a, so both isolate it for ingress.
    assert_eq!(strings(&line["policies"]), [ALLOW_POLICY, DENY_POLICY], "{line}");
    line
}

#[test]
fn a_denied_connection_is_logged_with_its_pods_and_isolating_policies() {
    let begin = Instant::now();
    let mut lab = FlowLab::start(&[], X_POLICIES);
    allowed_then_denied(&mut lab);
    // Without --flow-log-allowed no allow line is ever written: the allowed connection
    // came before the deny line, and a second more covers the writer's batching.
    thread::sleep(Duration::from_millis(1100));
    let mut all = FlowFile { path: lab.log.path.clone(), offset: 0 }.read_new();
    all.retain(|l| l["verdict"] == "allow");
    assert!(all.is_empty(), "allow lines without --flow-log-allowed:\n{}", render(&all));
    eprintln!("deny test: {:?}", begin.elapsed());
}

#[test]
fn the_metrics_endpoint_counts_verdicts_and_written_events() {
    let mut lab = FlowLab::start(&[], X_POLICIES);
    allowed_then_denied(&mut lab);
    // A deny counts for every policy isolating the pod; the allow for the rule's policy
    // (counted whether or not allowed flows are logged). The agent copies the kernel's
    // counters once a second, so all of them are waited for together.
    let m = lab.scrape_until("denies of x/a, y/a's allow and a written event", |m| {
        m.verdicts(DENY_POLICY, "ingress", "deny") >= 1.0
            && m.verdicts(ALLOW_POLICY, "ingress", "deny") >= 1.0
            && m.verdicts(ALLOW_POLICY, "ingress", "allow") >= 1.0
            && m.flow_events("written") >= 1.0
    });
    assert_eq!(m.flow_events("malformed"), 0.0, "{}", m.text);
    assert_eq!(m.flow_events("lost"), 0.0, "{}", m.text);
}

#[test]
fn an_allowed_connection_through_the_service_names_the_service_and_the_rules() {
    let mut lab = FlowLab::start(&["--flow-log-allowed"], &format!("{X_POLICIES}---\n{Y_EGRESS}"));
    let web = SocketAddrV4::new(lab.h.web(), 8080);
    assert_eq!(lab.tcp(YA, web).as_deref(), Ok("x/a"), "y/a may reach svc/web:8080");
    let lines = lab.log.wait_for("the allow lines of y/a -> svc/web -> x/a:80", |lines| {
        ["egress", "ingress"]
            .iter()
            .all(|dir| lines.iter().any(|l| is(l, "flow", "allow", dir, YA, XA)))
    });
    let find = |dir: &str| {
        let found: Vec<&Value> =
            lines.iter().filter(|l| is(l, "flow", "allow", dir, YA, XA)).collect();
        assert_eq!(found.len(), 1, "one new flow, one {dir} line:\n{}", render(&lines));
        found[0].clone()
    };

    // Egress, judged in y/a's from_pod: the ClusterIP is known there.
    let egress = find("egress");
    assert_eq!(egress["protocol"], "TCP", "{egress}");
    assert_eq!(egress["service"], json!({"ip": lab.h.web().to_string(), "port": 8080}));
    assert_eq!(egress["dst"]["ip"], lab.h.ip(XA).to_string(), "the backend: {egress}");
    assert_eq!(egress["dst"]["port"], 80, "the target port: {egress}");
    assert!(egress["dst"]["identity"].is_u64(), "the peer's identity: {egress}");
    assert_eq!(egress["rules"], json!([{"policy": EGRESS_POLICY, "index": 0}]), "{egress}");
    assert_eq!(strings(&egress["policies"]), [EGRESS_POLICY], "{egress}");
    assert_eq!(egress["count"], 1, "{egress}");

    // Ingress, judged in x/a's to_pod on the translated packet.
    let ingress = find("ingress");
    assert_eq!(ingress["protocol"], "TCP", "{ingress}");
    assert_eq!(ingress["dst"]["port"], 80, "{ingress}");
    assert_eq!(ingress["rules"], json!([{"policy": ALLOW_POLICY, "index": 0}]), "{ingress}");
    assert_eq!(strings(&ingress["policies"]), [ALLOW_POLICY], "{ingress}");
}

#[test]
fn a_flood_of_denied_datagrams_is_rate_limited_and_aggregated_without_loss() {
    const RATE: u64 = 5;
    const BURST: u64 = 5;
    const DATAGRAMS: usize = 200;
    let mut lab = FlowLab::start(&["--flow-log-rate", "5", "--flow-log-burst", "5"], X_POLICIES);
    // Let the readiness probes' lines, aggregates and counters settle, and the bucket fill.
    lab.log.settle(Duration::from_millis(2500));
    let before = lab.scrape();

    // 200 datagrams from as many sockets (distinct source ports), all open until the last
    // is sent; the send loop is bounded in count and takes a few milliseconds.
    let xa80 = SocketAddrV4::new(lab.h.ip(XA), 80);
    let (sent, took) = lab
        .h
        .lab()
        .in_pod(ZA.ns, ZA.name, move || {
            let begin = Instant::now();
            let sockets: Vec<UdpSocket> = (0..DATAGRAMS)
                .map(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("binding a socket"))
                .collect();
            let sent = sockets.iter().filter(|s| s.send_to(b"who?\n", xa80).is_ok()).count();
            (sent, begin.elapsed())
        })
        .unwrap_or_else(|e| panic!("entering z/a: {e:#}"));
    assert_eq!(sent, DATAGRAMS, "every send succeeded");
    assert!(took < Duration::from_millis(500), "the flood took {took:?}: not one second");

    // The datapath's own count of policy drops, as the expected total: x/a's ingress
    // dropped them, in to_pod on its veth; z/a's egress is not isolated.
    let drops = |m: &Metrics, hook: &str| m.policy_drops(hook) - before.policy_drops(hook);
    let after = lab.scrape_until("the flood's drops", |m| drops(m, "to_pod") >= sent as f64);
    let dropped = drops(&after, "to_pod") as u64;
    assert_eq!(dropped, sent as u64, "only the flood was dropped (no other traffic runs)");
    assert_eq!(drops(&after, "from_pod"), 0.0, "no drop at a sender's egress");

    let key = |l: &Value| is(l, l["type"].as_str().unwrap_or(""), "deny", "ingress", ZA, XA);
    let counted = |lines: &[Value]| -> u64 {
        lines.iter().filter(|l| key(l)).map(|l| l["count"].as_u64().unwrap_or(0)).sum()
    };
    let mut lines = lab
        .log
        .wait_for("lines accounting for every dropped datagram", |lines| counted(lines) >= dropped);
    // Anything late (a second aggregate) would show within the next second.
    lines.extend(lab.log.settle(Duration::from_millis(1500)));
    let text = render(&lines);
    let flows: Vec<&Value> = lines.iter().filter(|l| key(l) && l["type"] == "flow").collect();
    let aggregates: Vec<&Value> =
        lines.iter().filter(|l| key(l) && l["type"] == "aggregate").collect();
    eprintln!(
        "{sent} datagrams sent in {took:?}, {dropped} dropped: {} flow lines, aggregates:\n{}",
        flows.len(),
        render(&aggregates.iter().map(|&a| a.clone()).collect::<Vec<_>>())
    );
    assert!(lines.iter().all(key), "only lines of the flood:\n{text}");
    assert!(
        (BURST..=BURST + RATE).contains(&(flows.len() as u64)),
        "between burst and burst + rate flow lines in the flood's second:\n{text}"
    );
    assert!(flows.iter().all(|l| l["protocol"] == "UDP" && l["count"] == 1), "{text}");
    assert!((1..=2).contains(&aggregates.len()), "one aggregate per second:\n{text}");
    for a in &aggregates {
        assert_eq!(a["protocol"], "UDP", "{a}");
        assert_eq!(a["dst"]["port"], 80, "{a}");
        assert_eq!(a["src"].get("port"), None, "an aggregate spans source ports: {a}");
        assert_eq!(strings(&a["policies"]), [ALLOW_POLICY, DENY_POLICY], "{a}");
    }
    assert_eq!(counted(&lines), dropped, "flow lines + aggregate counts = drops:\n{text}");

    let m = lab.scrape_until("the flood's suppressed events", |m| {
        m.flow_events("suppressed") >= (dropped - flows.len() as u64) as f64
    });
    assert_eq!(m.flow_events("lost"), 0.0, "{}", m.text);
}
