//! The NetworkPolicy lab shared by `lab_policy` and `lab_flowlog`: three namespaces (x, y,
//! z) of three pods (a, b, c), every pod serving TCP and UDP on ports 80 and 81, the
//! Service `x/web` in front of x/a, the real agent reading the lab's manifests, and real
//! sockets probing every (from, to, port).
//!
//! ```text
//!  test ──policy YAML──▶ Lab ──cluster.yaml──▶ agent ──maps──▶ datapath (lxc… veths)
//!    │                                                                  ▲
//!    └── expectation: fn(from, to, port) -> bool ──▶ Matrix ◀── probe ──┘ (every pod, the node)
//! ```
//!
//! [`Harness::converge`] probes until the datapath agrees with an expected [`Matrix`] or the
//! deadline passes, then prints both tables and their difference, like the upstream e2e
//! "reachability" tables. What every expectation takes for granted is in [`expect`].
//!
//! Needs root and the binaries built by `cargo xtask test` (NODEPLANE_AGENT_BIN,
//! NODEPLANE_LAB_BIN).
use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::{self, Write as _},
    io,
    net::{Ipv4Addr, SocketAddrV4},
    process::Child,
    thread,
    time::{Duration, Instant},
};

use nodeplane_lab::{
    Lab, LabConfig, naming,
    server::{self, ANSWER_ANNOTATION, Protocol},
};

use crate::bin;

/// One connect, or one wait for a reply. A lab pod answers in well under a millisecond.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Attempts per probe: a denied probe is tried once more before it counts as denied.
pub const ATTEMPTS: usize = 2;
/// How long the agent gets to program a change.
pub const CONVERGE: Duration = Duration::from_secs(15);
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const NAMES: [&str; 3] = ["a", "b", "c"];

// --- the world: pods, ports, the Service ---

/// A pod of the matrix, `ns/name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId {
    pub ns: &'static str,
    pub name: &'static str,
}

pub const fn pod(ns: &'static str, name: &'static str) -> PodId {
    PodId { ns, name }
}

pub const XA: PodId = pod("x", "a");
pub const XB: PodId = pod("x", "b");
pub const YB: PodId = pod("y", "b");
pub const YC: PodId = pod("y", "c");

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

pub fn all_pods() -> impl Iterator<Item = PodId> {
    NAMESPACES.into_iter().flat_map(|ns| NAMES.into_iter().map(move |name| pod(ns, name)))
}

/// The four ports every pod serves, in the order of a cell's marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    Tcp80,
    Tcp81,
    Udp80,
    Udp81,
}

impl Port {
    pub const ALL: [Port; 4] = [Port::Tcp80, Port::Tcp81, Port::Udp80, Port::Udp81];

    pub fn protocol(self) -> Protocol {
        match self {
            Port::Tcp80 | Port::Tcp81 => Protocol::Tcp,
            Port::Udp80 | Port::Udp81 => Protocol::Udp,
        }
    }

    /// The pod's port number.
    pub fn number(self) -> u16 {
        match self {
            Port::Tcp80 | Port::Udp80 => 80,
            Port::Tcp81 | Port::Udp81 => 81,
        }
    }

    /// The port of the Service `x/web` whose target is this port of x/a.
    pub fn service_number(self) -> u16 {
        8000 + self.number()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol(), self.number())
    }
}

/// Who sends a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Pod(PodId),
    /// The node's own netns, where the kubelet would probe from.
    Node,
}

/// Where a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Pod(PodId),
    /// The ClusterIP of `x/web`, whose only backend is x/a.
    Web,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pod(p) => p.fmt(f),
            Source::Node => f.write_str("node"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pod(p) => p.fmt(f),
            Target::Web => f.write_str("svc/web"),
        }
    }
}

pub fn sources() -> Vec<Source> {
    all_pods().map(Source::Pod).chain([Source::Node]).collect()
}

pub fn destinations() -> Vec<Target> {
    all_pods().map(Target::Pod).chain([Target::Web]).collect()
}

/// Whether a (from, to) pair is probed at all. Left out, as neither works without policy
/// either: the node to the ClusterIP (the datapath translates traffic from pods, and the
/// lab node has no route to the service CIDR: "network unreachable"), and x/a to its own
/// Service (hairpin: the translated packet comes back to x/a with its own address as
/// source, which Linux drops as a martian unless the datapath masquerades it).
pub fn probed(from: Source, to: Target) -> bool {
    !matches!((from, to), (Source::Node, Target::Web) | (Source::Pod(XA), Target::Web))
}

/// The pods' container ports `(name, number, protocol)`. The names map to different
/// numbers on c than on a and b, so a policy naming a port means 81 on a and b, 80 on c.
pub fn container_ports(name: &str) -> [(&'static str, u16, &'static str); 4] {
    let (http, metrics) = if name == "c" { (81, 80) } else { (80, 81) };
    [
        ("http", http, "TCP"),
        ("metrics", metrics, "TCP"),
        ("http-udp", http, "UDP"),
        ("metrics-udp", metrics, "UDP"),
    ]
}

/// What the port named `metrics` (and `metrics-udp`) is on `pod`.
pub fn metrics_port(pod: PodId) -> u16 {
    if pod.name == "c" { 80 } else { 81 }
}

/// Namespaces labelled `ns: <name>`, pods labelled `pod: <name>` answering `ns/name`, and
/// the Service `x/web` in front of x/a, its ports 8080 and 8081 targeting the names
/// `http` and `metrics` (80 and 81 on a).
pub fn cluster_yaml() -> String {
    let mut docs = Vec::new();
    for ns in NAMESPACES {
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for p in all_pods() {
        let ports: Vec<String> = container_ports(p.name)
            .iter()
            .map(|(name, number, proto)| {
                format!("{{name: {name}, containerPort: {number}, protocol: {proto}}}")
            })
            .collect();
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\n\
             metadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{pod: {name}}}\n  \
             annotations: {{{ANSWER_ANNOTATION}: {p}}}\n\
             spec:\n  containers:\n  - name: serve\n    image: nodeplane/echo\n    \
             ports: [{ports}]\n",
            name = p.name,
            ns = p.ns,
            ports = ports.join(", "),
        ));
    }
    docs.push(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\n\
         spec:\n  selector: {pod: a}\n  ports:\n  \
         - {name: tcp-80, port: 8080, targetPort: http, protocol: TCP}\n  \
         - {name: tcp-81, port: 8081, targetPort: metrics, protocol: TCP}\n  \
         - {name: udp-80, port: 8080, targetPort: http-udp, protocol: UDP}\n  \
         - {name: udp-81, port: 8081, targetPort: metrics-udp, protocol: UDP}\n"
            .to_string(),
    );
    docs.join("---\n")
}

// --- the matrix ---

pub type Cell = (Source, Target, Port);

/// Reachability: for every probed (from, to, port), whether the probe is answered by the
/// pod it was meant for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub cells: BTreeMap<Cell, bool>,
}

/// The matrix a scenario expects, from `allowed(from pod, to pod, port)`: what the
/// scenario's policies allow between pods. The rules every scenario shares are applied
/// here, not in `allowed`:
/// 1. a pod always reaches itself (through its own IP the traffic stays on its loopback);
/// 2. the node (kubelet) always reaches every pod: ingress from the node is allowed;
/// 3. a probe of the Service `x/web` is allowed exactly when the same probe of its
///    backend x/a on the target port is (policy judges the translated flow).
pub fn expect(allowed: impl Fn(PodId, PodId, Port) -> bool) -> Matrix {
    let mut cells = BTreeMap::new();
    for from in sources() {
        for to in destinations().into_iter().filter(|&to| probed(from, to)) {
            let backend = match to {
                Target::Pod(p) => p,
                Target::Web => XA,
            };
            for port in Port::ALL {
                let ok = match from {
                    Source::Node => true,
                    Source::Pod(f) if f == backend => true,
                    Source::Pod(f) => allowed(f, backend, port),
                };
                cells.insert((from, to, port), ok);
            }
        }
    }
    Matrix { cells }
}

pub fn everything(_: PodId, _: PodId, _: Port) -> bool {
    true
}

impl Matrix {
    /// A table with a row per source and a column per destination; each cell has one
    /// mark per port (TCP/80 TCP/81 UDP/80 UDP/81) from `mark`, blank when not probed.
    pub fn table(&self, mark: impl Fn(Cell) -> char) -> String {
        let width = destinations().iter().map(|t| t.to_string().len()).max().unwrap_or(4).max(4);
        let mut out = format!("{:>7}", "");
        for to in destinations() {
            let _ = write!(out, " {:>width$}", to.to_string());
        }
        out.push('\n');
        for from in sources() {
            let _ = write!(out, "{:>7}", from.to_string());
            for to in destinations() {
                let marks: String = Port::ALL
                    .iter()
                    .map(|&port| {
                        let cell = (from, to, port);
                        if self.cells.contains_key(&cell) { mark(cell) } else { ' ' }
                    })
                    .collect();
                let _ = write!(out, " {marks:>width$}");
            }
            out.push('\n');
        }
        out
    }

    /// `.` answered, `X` not.
    pub fn render(&self) -> String {
        self.table(|cell| if self.cells[&cell] { '.' } else { 'X' })
    }
}

/// What a round of probes found: the matrix, and why each denied probe failed.
pub struct Probed {
    pub matrix: Matrix,
    pub why: BTreeMap<Cell, String>,
}

/// Expected and actual tables, their difference, and the differing probes one per line;
/// empty when they agree.
pub fn difference(expected: &Matrix, probed: &Probed) -> String {
    let actual = &probed.matrix;
    let wrong: Vec<Cell> = expected
        .cells
        .iter()
        .filter(|&(cell, ok)| actual.cells.get(cell) != Some(ok))
        .map(|(cell, _)| *cell)
        .collect();
    if wrong.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{} of {} probes differ. Rows: from; columns: to; each cell: TCP/80 TCP/81 UDP/80 \
         UDP/81 (for svc/web: its ports 8080 and 8081, which target x/a's 80 and 81); blank: \
         not probed.\n\nexpected ('.' answered, 'X' not):\n{}\nactual:\n{}\n\
         difference ('+' answered but should not be, '-' should be answered but was not):\n{}\n",
        wrong.len(),
        expected.cells.len(),
        expected.render(),
        actual.render(),
        expected.table(|cell| match (expected.cells[&cell], actual.cells.get(&cell)) {
            (true, Some(false)) => '-',
            (false, Some(true)) => '+',
            _ => '_',
        }),
    );
    for &cell @ (from, to, port) in wrong.iter().take(40) {
        let port = match to {
            Target::Pod(_) => port.to_string(),
            Target::Web => {
                format!("{}/{} (x/a:{})", port.protocol(), port.service_number(), port.number())
            }
        };
        let got = match probed.why.get(&cell) {
            Some(why) => format!("denied ({why})"),
            None => "allowed".to_string(),
        };
        let want = if expected.cells[&cell] { "allowed" } else { "denied" };
        let _ = writeln!(out, "  {from} -> {to} {port}: expected {want}, got {got}");
    }
    if wrong.len() > 40 {
        let _ = writeln!(out, "  ... and {} more", wrong.len() - 40);
    }
    out
}

/// Panics with [`difference`] unless the probes found what was expected.
pub fn assert_reachability(step: &str, expected: &Matrix, probed: &Probed) {
    let diff = difference(expected, probed);
    assert!(diff.is_empty(), "{step}: reachability differs from the expectation\n{diff}");
}

// --- the harness ---

/// The 3x3 lab with the agent running in the node namespace. Dropping it tears the lab
/// down (which stops the agent) and then reaps the agent process.
pub struct Harness {
    lab: Option<Lab>,
    agent: Child,
    pod_ips: BTreeMap<PodId, Ipv4Addr>,
    web: Ipv4Addr,
}

impl Drop for Harness {
    fn drop(&mut self) {
        drop(self.lab.take());
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

impl Harness {
    /// Brings the lab and the agent up and waits until everything reaches everything,
    /// the Service included (which shows the agent has programmed the lab).
    pub fn start() -> Harness {
        Harness::start_with(|_| Vec::new())
    }

    /// [`start`](Self::start) with more agent flags, from the lab before the agent starts
    /// (e.g. a flow log file in [`Lab::state_dir`]).
    pub fn start_with(agent_args: impl FnOnce(&Lab) -> Vec<OsString>) -> Harness {
        let begin = Instant::now();
        let cfg = LabConfig::new(bin("NODEPLANE_LAB_BIN"));
        let yaml = cluster_yaml();
        let lab = Lab::up(cfg, &[("netpol.yaml", yaml.as_str())])
            .unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let mut argv: Vec<OsString> = vec![
            bin("NODEPLANE_AGENT_BIN").into(),
            "run".into(),
            "--manifests".into(),
            lab.manifests_dir().into(),
            "--iface-prefix".into(),
            nodeplane_lab::HOST_VETH_PREFIX.into(),
        ];
        argv.extend(agent_args(&lab));
        let agent = lab
            .spawn_in_node(&argv, "agent")
            .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
        let pod_ips = all_pods()
            .map(|p| (p, lab.pod_ip(p.ns, p.name).unwrap_or_else(|e| panic!("{e:#}"))))
            .collect();
        let web = lab.service_ip("x", "web").unwrap_or_else(|e| panic!("{e:#}"));
        let harness = Harness { lab: Some(lab), agent, pod_ips, web };
        eprintln!("lab {} up in {:?}", harness.lab().slot(), begin.elapsed());
        harness.converge("baseline", &expect(everything), CONVERGE);
        harness
    }

    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("the lab lives until drop")
    }

    /// Adds or replaces objects (policies, typically) from YAML.
    pub fn apply(&self, yaml: &str) {
        self.lab().apply(&[("step.yaml", yaml)]).unwrap_or_else(|e| panic!("apply: {e:#}"));
    }

    pub fn delete_policy(&self, ns: &str, name: &str) {
        self.lab()
            .delete("NetworkPolicy", ns, name)
            .unwrap_or_else(|e| panic!("deleting policy {ns}/{name}: {e:#}"));
    }

    pub fn label(&self, kind: &str, ns: &str, name: &str, changes: &[(&str, Option<&str>)]) {
        self.lab()
            .label(kind, ns, name, changes)
            .unwrap_or_else(|e| panic!("labeling {kind} {ns}/{name}: {e:#}"));
    }

    pub fn pod_cidr(&self) -> String {
        naming::pod_cidr(self.lab().slot())
    }

    pub fn ip(&self, pod: PodId) -> Ipv4Addr {
        self.pod_ips[&pod]
    }

    /// The ClusterIP of `x/web`.
    pub fn web(&self) -> Ipv4Addr {
        self.web
    }

    /// The last `n` lines of the agent's log, for failure messages.
    pub fn agent_log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.lab().log_path("agent")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The address a probe goes to, and the answer that counts as reaching it.
    pub fn address(&self, to: Target, port: Port) -> (SocketAddrV4, String) {
        match to {
            Target::Pod(p) => (SocketAddrV4::new(self.ip(p), port.number()), p.to_string()),
            Target::Web => (SocketAddrV4::new(self.web, port.service_number()), XA.to_string()),
        }
    }

    /// One probe, from the calling thread's netns: `Ok` if the intended pod answered
    /// within [`ATTEMPTS`] tries, otherwise why not.
    pub fn ask(&self, to: Target, port: Port) -> Result<(), String> {
        let (addr, expected) = self.address(to, port);
        let mut why = String::new();
        for _ in 0..ATTEMPTS {
            let answer = match port.protocol() {
                Protocol::Tcp => server::tcp_ask(addr, PROBE_TIMEOUT),
                Protocol::Udp => server::udp_ask(addr, PROBE_TIMEOUT),
            };
            why = match answer {
                Ok(name) if name == expected => return Ok(()),
                Ok(name) => format!("{addr} answered {name:?}"),
                Err(e) => failure(&e),
            };
        }
        Err(why)
    }

    /// Every probe of `from`, at once, each on its own thread inside `from`'s netns
    /// (threads inherit the netns of the thread that starts them).
    pub fn probe_from(&self, from: Source) -> Vec<(Cell, Result<(), String>)> {
        let work: Vec<(Target, Port)> = destinations()
            .into_iter()
            .filter(|&to| probed(from, to))
            .flat_map(|to| Port::ALL.map(|port| (to, port)))
            .collect();
        let run = || {
            thread::scope(|s| {
                let probes: Vec<_> = work
                    .iter()
                    .map(|&(to, port)| s.spawn(move || ((from, to, port), self.ask(to, port))))
                    .collect();
                probes.into_iter().map(|p| p.join().expect("a probe thread")).collect()
            })
        };
        let entered = match from {
            Source::Pod(p) => self.lab().in_pod(p.ns, p.name, run),
            Source::Node => self.lab().in_node(run),
        };
        entered.unwrap_or_else(|e| panic!("entering the netns of {from}: {e:#}"))
    }

    /// One round: every source probes every destination on every port, concurrently.
    pub fn probe(&self) -> Probed {
        let results: Vec<_> = thread::scope(|s| {
            let rows: Vec<_> =
                sources().into_iter().map(|from| s.spawn(move || self.probe_from(from))).collect();
            rows.into_iter().flat_map(|r| r.join().expect("a source thread")).collect()
        });
        let mut probed = Probed { matrix: Matrix { cells: BTreeMap::new() }, why: BTreeMap::new() };
        for (cell, result) in results {
            probed.matrix.cells.insert(cell, result.is_ok());
            if let Err(why) = result {
                probed.why.insert(cell, why);
            }
        }
        probed
    }

    /// Probes until the datapath shows `expected` or `deadline` passes; then fails with
    /// the difference and the end of the agent's log.
    pub fn converge(&self, step: &str, expected: &Matrix, deadline: Duration) {
        let begin = Instant::now();
        let mut rounds = 0;
        loop {
            let probed = self.probe();
            rounds += 1;
            if probed.matrix == *expected {
                eprintln!("{step}: converged in {:?} ({rounds} rounds)", begin.elapsed());
                return;
            }
            if begin.elapsed() >= deadline {
                eprintln!("agent log (last 40 lines):\n{}", self.agent_log_tail(40));
                assert_reachability(
                    &format!("{step} (after {:?}, {rounds} rounds)", begin.elapsed()),
                    expected,
                    &probed,
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `converge` with the default deadline.
    pub fn step(&self, step: &str, expected: &Matrix) {
        self.converge(step, expected, CONVERGE);
    }
}

/// Short reasons for the tables: a dropped probe times out, a rejected one is refused.
pub fn failure(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "no answer".to_string(),
        io::ErrorKind::ConnectionRefused => "refused".to_string(),
        _ => e.to_string(),
    }
}
