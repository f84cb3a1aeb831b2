//! `nodeplane-bench nodeport`: NodePort from outside the cluster, measured from the
//! external client of a two-node underlay lab, through four datapaths side by side:
//!
//! ```text
//!   external client ──▶ node0:30080 ──(DNAT, SNAT to node0, XDP_TX | routed)──▶ node1 ──▶ backend-{0,1}
//!                  └──▶ node1:30080 ──(DNAT, local backend)───────────────────────────────▶ backend-{0,1}
//!                  └──▶ backend-0:8081 (a route to node1's pod CIDR, for this bench only)
//! ```
//!
//! | config   | lab                                        | nodes run                               |
//! |----------|--------------------------------------------|-----------------------------------------|
//! | XDP      | agents with `--xdp native`                 | xdp_netdev + tc                         |
//! | tc       | agents with `--xdp off`                    | from_netdev / to_netdev                 |
//! | iptables | no agent                                   | a kube-proxy shaped ruleset ([`kube_proxy_rules`]) |
//! | pod IP   | the XDP and the iptables lab, to backend-0 | the limit: no service translation       |
//!
//! The three labs are up at once so every configuration is measured in each round
//! (machine noise hits them alike). The Service count grows in phases (1, 1,000, 10,000):
//! the extra Services are ClusterIP Services with both backends as endpoints, written as
//! Service and EndpointSlice manifests into the lab's manifest directory (the agents' real
//! files source, index, sync and maps) or, for iptables, as the rules kube-proxy would write
//! for them, before the NodePort jump, which kube-proxy always keeps last in
//! `KUBE-SERVICES`.
//!
//! One request is: connect, read the backend's one-line greeting, close. Latency is
//! `connect()` to the first byte of the greeting; the rate is completed requests per second
//! of one client, and of four concurrent clients. Every loop stops at a count or a
//! deadline, whichever comes first. Needs root and NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN.
use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nodeplane_lab::{Lab, LabConfig, Topology, netns};

use crate::{bin, multinode::MultiCluster};

const NAMESPACE: &str = "bench";
const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
/// A second port of the same backend server, for the pod-IP path alone. On the NodePort
/// port, a direct connection whose client port a recent local-backend NodePort flow used
/// has the same reply tuple (`pod:8080 -> client:port`): the agent's conntrack entry of
/// that flow (10 s after its FIN) reverse-translates the reply to the NodePort, and the
/// connection times out.
const DIRECT_PORT: u16 = 8081;
/// Service counts, the measured one included.
const COUNTS: [usize; 3] = [1, 1_000, 10_000];
const ROUNDS: usize = 5;
/// One client, per configuration and round: this many requests or this long.
const SINGLE_REQUESTS: usize = 600;
const SINGLE_TIME: Duration = Duration::from_millis(1_500);
/// Concurrent clients, each: this many requests or this long.
const CLIENTS: usize = 4;
const CLIENT_REQUESTS: usize = 300;
const CLIENT_TIME: Duration = Duration::from_millis(1_500);
const TIMEOUT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(120);
/// The extra Services' ClusterIPs: outside the lab's /24 service range (its allocator
/// holds 253 addresses), inside no other range of the lab.
const DUMMY_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// Extra Services per manifest file.
const DUMMY_FILE: usize = 500;
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The agents' SNAT ports for NodePort flows to another node. They are unique per backend
/// and a finished flow's port comes back only after its closing lifetime (10 s) and the
/// next conntrack GC pass, so the default range (61000-65535, 4,536 ports) holds a few
/// hundred new flows per second per backend; this bench makes thousands.
const MASQ_PORTS: &str = "1024-29999";
/// Every slot's underlay (the external client's network) is exempt from the agents' egress
/// masquerade, so the pod-IP path never depends on the masquerade telling a pod's replies
/// from its new flows (early builds SNATed the replies to a client that reached the pod
/// directly).
const UNDERLAYS: &str = "192.168.0.0/16";
/// How long a path may take to answer once it should.
const ANSWER: Duration = Duration::from_secs(20);

/// The pods and the measured Service.
fn base_docs() -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: measured, namespace: {NAMESPACE}}}\n\
         spec:\n  type: NodePort\n  selector: {{app: backend}}\n  ports:\n\
         \x20 - {{name: http, port: 80, targetPort: {BACKEND_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}\n"
    );
    for pod in ["backend-0", "backend-1"] {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\n\
             metadata: {{name: {pod}, namespace: {NAMESPACE}, labels: {{app: backend}}}}\n\
             spec:\n  nodeName: lab-node1\n  containers:\n  - name: web\n    ports:\n\
             \x20   - {{name: http, containerPort: {BACKEND_PORT}, protocol: TCP}}\n\
             \x20   - {{name: direct, containerPort: {DIRECT_PORT}, protocol: TCP}}\n"
        ));
    }
    s
}

fn dummy_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(DUMMY_BASE) + i as u32)
}

/// Extra Services `from..to`: ClusterIP Services without a selector and an EndpointSlice
/// each naming `endpoints` (the backends, on lab-node1), as the EndpointSlice controller
/// would write them.
fn dummy_docs(from: usize, to: usize, endpoints: &[Ipv4Addr]) -> String {
    let mut s = String::new();
    for i in from..to {
        let ip = dummy_ip(i);
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: dummy-{i}, namespace: {NAMESPACE}}}\n\
             spec:\n  clusterIP: {ip}\n  ports:\n\
             \x20 - {{name: http, port: 80, targetPort: {BACKEND_PORT}, protocol: TCP}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: dummy-{i}-0\n  namespace: {NAMESPACE}\n\
             \x20 labels: {{kubernetes.io/service-name: dummy-{i}}}\n\
             addressType: IPv4\nports:\n- {{name: http, port: {BACKEND_PORT}, protocol: TCP}}\n\
             endpoints:\n"
        );
        for ep in endpoints {
            let _ = writeln!(
                s,
                "- {{addresses: [\"{ep}\"], nodeName: lab-node1, \
                 conditions: {{ready: true, serving: true, terminating: false}}}}"
            );
        }
    }
    s
}

/// A kube-proxy-like chain suffix: 16 characters from a hash of the name.
fn chain_id(kind: &str, name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind.bytes().chain(name.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16).map(|i| ALPHABET[((h >> ((i * 4) % 60)) as usize + i) % 32] as char).collect()
}

/// One Service port as kube-proxy's iptables mode programs it.
struct RuleService {
    name: String,
    cluster_ip: Ipv4Addr,
    port: u16,
    node_port: Option<u16>,
}

/// The ruleset kube-proxy (iptables mode, v1.28+, `--cluster-cidr` set, no
/// `--masquerade-all`) would write for `services` with `endpoints`, in `iptables-restore`
/// form. Included: the nat table's `KUBE-SERVICES` (one ClusterIP rule per Service, in the
/// given order, the `KUBE-NODEPORTS` jump last), `KUBE-NODEPORTS`, `KUBE-EXT-*` (mark for
/// masquerade), `KUBE-SVC-*` (the off-cluster-source masquerade rule, then one
/// `statistic --mode random` rule per endpoint), `KUBE-SEP-*` (hairpin mark, DNAT),
/// `KUBE-MARK-MASQ`, `KUBE-POSTROUTING` (MASQUERADE of marked packets), and the filter
/// table's `KUBE-FORWARD`. Omitted: firewall, external-IP, load-balancer and health-check
/// chains, `KUBE-PROXY-CANARY`, and the per-rule comments beyond the Service name.
fn kube_proxy_rules(services: &[RuleService], endpoints: &[Ipv4Addr], target: u16) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut svc_rules = String::new();
    let mut nodeports = String::new();
    for s in services {
        let svc = format!("KUBE-SVC-{}", chain_id("svc", &s.name));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            svc_rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp \
             --dport {} -j {svc}",
            s.cluster_ip, s.name, s.port
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" \
             -m tcp --dport {} -j KUBE-MARK-MASQ",
            s.cluster_ip, s.name, s.port
        );
        for (k, ep) in endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_id(&s.name, &ep.to_string()));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = endpoints.len() - k;
            let statistic = if left > 1 {
                format!(" -m statistic --mode random --probability {:.11}", 1.0 / left as f64)
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {ep}:{target}\"{statistic} -j {sep}",
                s.name
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                s.name
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{}\" -m tcp -j DNAT \
                 --to-destination {ep}:{target}",
                s.name
            );
        }
        if let Some(np) = s.node_port {
            let ext = format!("KUBE-EXT-{}", chain_id("ext", &s.name));
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                nodeports,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{}\" -m tcp --dport {np} -j {ext}",
                s.name
            );
            let _ = writeln!(
                rules,
                "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" \
                 -j KUBE-MARK-MASQ",
                s.name
            );
            let _ = writeln!(rules, "-A {ext} -j {svc}");
        }
    }
    format!(
        "*filter\n:KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark \
         0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m \
         conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n{chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n\
         {svc_rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         {nodeports}{rules}COMMIT\n"
    )
}

/// Replaces the ruleset of `netns` (`iptables-restore` without `--noflush`).
fn iptables_restore(netns: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running iptables-restore (is iptables installed?): {e}"));
    child.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("writing the rules");
    let status = child.wait().expect("iptables-restore");
    assert!(status.success(), "iptables-restore in {netns}: {status}");
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// One request: connect, read the first byte of the greeting, close. Returns the time to
/// the first byte.
fn request(addr: SocketAddrV4) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 64];
    if stream.read(&mut buf)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(t.elapsed())
}

/// Measurements of one configuration, pooled over the rounds.
#[derive(Default)]
struct Cell {
    latency_ns: Vec<u64>,
    /// Requests per second, one per round (the median is reported: one round slowed by
    /// the machine does not move it).
    single_rps: Vec<f64>,
    multi_rps: Vec<f64>,
    errors: usize,
}

impl Cell {
    fn percentile_us(&self, p: f64) -> f64 {
        let mut v = self.latency_ns.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
        v.get(i).map_or(0.0, |&ns| ns as f64 / 1_000.0)
    }

    fn median(v: &[f64]) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
}

/// Tells the first few failed requests of a loop (a timeout costs [`TIMEOUT`] of the
/// loop's time, so a few errors weigh on the rate).
fn report_error(addr: SocketAddrV4, nth: usize, e: &std::io::Error) {
    if nth <= 2 {
        eprintln!("request to {addr} failed: {e} ({:?})", e.kind());
    }
}

/// One round of one configuration, in the external client's netns: one client, then
/// [`CLIENTS`] at once.
fn measure(ext: &str, addr: SocketAddrV4, cell: &mut Cell) {
    let (samples, errors, single, multi, multi_errors) = netns::run_in(ext, || {
        let mut samples = Vec::with_capacity(SINGLE_REQUESTS);
        let mut errors = 0;
        let start = Instant::now();
        while samples.len() + errors < SINGLE_REQUESTS && start.elapsed() < SINGLE_TIME {
            match request(addr) {
                Ok(d) => samples.push(d.as_nanos() as u64),
                Err(e) => {
                    errors += 1;
                    report_error(addr, errors, &e);
                }
            }
        }
        let single = samples.len() as f64 / start.elapsed().as_secs_f64();
        let start = Instant::now();
        // Threads made here are in this netns too (they inherit the creator's).
        let done: Vec<(usize, usize)> = thread::scope(|s| {
            let workers: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    s.spawn(|| {
                        let (mut ok, mut err) = (0, 0);
                        while ok + err < CLIENT_REQUESTS && start.elapsed() < CLIENT_TIME {
                            match request(addr) {
                                Ok(_) => ok += 1,
                                Err(e) => {
                                    err += 1;
                                    report_error(addr, err, &e);
                                }
                            }
                        }
                        (ok, err)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("client thread")).collect()
        });
        let elapsed = start.elapsed().as_secs_f64();
        let ok: usize = done.iter().map(|d| d.0).sum();
        let err: usize = done.iter().map(|d| d.1).sum();
        (samples, errors, single, ok as f64 / elapsed, err)
    })
    .unwrap_or_else(|e| panic!("entering {ext}: {e}"));
    cell.latency_ns.extend(samples);
    cell.errors += errors + multi_errors;
    cell.single_rps.push(single);
    cell.multi_rps.push(multi);
}

/// The highest `frontends=` an agent logged in a "datapath synced" line.
fn frontends_synced(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("datapath synced"))
        .filter_map(|l| {
            let rest = &l[l.find("frontends=")? + "frontends=".len()..];
            rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until `addr` answers from `ext`.
fn wait_answers(ext: &str, addr: SocketAddrV4, what: &str) {
    let start = Instant::now();
    while start.elapsed() < ANSWER {
        let ok = netns::run_in(ext, || request(addr).is_ok()).unwrap_or(false);
        if ok {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: {addr} does not answer from the external client");
}

/// An external client's netns, ready for many short connections: a wide ephemeral range so
/// TIME_WAIT never runs it dry.
fn prepare_external(lab: &Lab) -> String {
    let ext = lab.external_netns().expect("an underlay lab has an external client");
    netns::sysctls(&ext, &[("net.ipv4.ip_local_port_range", "1024 65000")])
        .unwrap_or_else(|e| panic!("{e}"));
    ext
}

struct AgentLab {
    name: &'static str,
    cluster: MultiCluster,
    ext: String,
    frontends_at_start: usize,
}

impl AgentLab {
    fn up(name: &'static str, xdp: &str) -> AgentLab {
        let t = Instant::now();
        let args = [
            "--xdp",
            xdp,
            "--masquerade-port-range",
            MASQ_PORTS,
            "--non-masquerade-cidr",
            UNDERLAYS,
        ];
        let cluster = MultiCluster::up(2, &[("bench.yaml", &base_docs())], &args);
        cluster.wait_ready(CONVERGE);
        let ext = prepare_external(&cluster);
        for node in 0..2 {
            let addr = SocketAddrV4::new(cluster.node(node).expect("node").ip(), NODE_PORT);
            wait_answers(&ext, addr, name);
        }
        let frontends_at_start = (0..2).map(|n| frontends_synced(&cluster.agent_log(n))).min();
        eprintln!("{name} lab up in {:?}", t.elapsed());
        AgentLab { name, cluster, ext, frontends_at_start: frontends_at_start.unwrap_or(0) }
    }

    /// Adds Services `from..to` and waits until both agents programmed them. They go into
    /// the lab's manifest directory as files of their own, [`DUMMY_FILE`] Services each, next
    /// to the lab's `cluster.yaml`: the agents' files source reads them like any manifest.
    /// (Through `Lab::apply` they would land in the one `cluster.yaml`, which the files
    /// source parses in time quadratic in its length: minutes at 10,000 Services.)
    fn grow(&self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        let t = Instant::now();
        let endpoints = backends(&self.cluster);
        let dir = self.cluster.manifests_dir();
        for start in (from..to).step_by(DUMMY_FILE) {
            let end = (start + DUMMY_FILE).min(to);
            let path = dir.join(format!("bench-dummies-{start:05}.yaml"));
            nodeplane_lab::files::write_atomic(
                &path,
                dummy_docs(start, end, &endpoints).as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{}: writing {}: {e}", self.name, path.display()));
        }
        // Each dummy is one frontend (its ClusterIP), on top of what the lab started with.
        let want = self.frontends_at_start + to;
        self.cluster.wait_until(&format!("{want} frontends programmed"), CONVERGE, || {
            (0..2).all(|n| frontends_synced(&self.cluster.agent_log(n)) >= want)
        });
        eprintln!(
            "{}: {} Services added, programmed on both nodes after {:?}",
            self.name,
            to - from,
            t.elapsed()
        );
    }
}

/// The backends' pod IPs.
fn backends(lab: &Lab) -> Vec<Ipv4Addr> {
    ["backend-0", "backend-1"].map(|p| lab.pod_ip(NAMESPACE, p).expect("backend IP")).into()
}

struct IptablesLab {
    lab: Lab,
    ext: String,
}

impl IptablesLab {
    fn up() -> IptablesLab {
        let t = Instant::now();
        let cfg = LabConfig::new(bin("NODEPLANE_LAB_BIN"));
        let lab =
            Lab::up_with(cfg, Topology::Underlay { nodes: 2 }, &[("bench.yaml", base_docs())])
                .unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let ext = prepare_external(&lab);
        let me = IptablesLab { lab, ext };
        me.load(1);
        eprintln!("iptables lab up in {:?}", t.elapsed());
        me
    }

    /// Loads on both nodes the ruleset of `count` Services, the measured NodePort one
    /// last among the ClusterIP rules.
    fn load(&self, count: usize) {
        let t = Instant::now();
        let measured_ip = self.lab.service_ip(NAMESPACE, "measured").expect("measured's IP");
        let mut services: Vec<RuleService> = (0..count - 1)
            .map(|i| RuleService {
                name: format!("{NAMESPACE}/dummy-{i}:http"),
                cluster_ip: dummy_ip(i),
                port: 80,
                node_port: None,
            })
            .collect();
        services.push(RuleService {
            name: format!("{NAMESPACE}/measured:http"),
            cluster_ip: measured_ip,
            port: 80,
            node_port: Some(NODE_PORT),
        });
        let endpoints = backends(&self.lab);
        let rules = kube_proxy_rules(&services, &endpoints, BACKEND_PORT);
        for node in self.lab.nodes() {
            iptables_restore(&node.netns(), &rules);
        }
        eprintln!(
            "iptables: {} rules for {count} Services restored on both nodes in {:?}",
            rules.lines().filter(|l| l.starts_with("-A")).count(),
            t.elapsed()
        );
        for node in 0..2 {
            let addr = SocketAddrV4::new(self.lab.node(node).expect("node").ip(), NODE_PORT);
            wait_answers(&self.ext, addr, "iptables");
        }
    }
}

/// A configuration measured each round.
struct Config {
    name: String,
    ext: String,
    addr: SocketAddrV4,
    cell: Cell,
}

pub fn run() {
    let started = Instant::now();
    let xdp = AgentLab::up("XDP", "native");
    let tc = AgentLab::up("tc", "off");
    let ipt = IptablesLab::up();

    // The pod-IP limit: a route on the external clients of the XDP and the iptables lab to
    // node1's pods, via node1 (they have none by design); removed at the end.
    let mut routes = Vec::new();
    let mut direct = Vec::new();
    for (lab, ext) in [(&*xdp.cluster, &xdp.ext), (&ipt.lab, &ipt.ext)] {
        let node1 = lab.node(1).expect("node 1");
        let route = [ext.clone(), node1.pod_cidr(), node1.ip().to_string()];
        ip(&["-n", &route[0], "route", "replace", &route[1], "via", &route[2]]);
        routes.push(route);
        let pod = lab.pod_ip(NAMESPACE, "backend-0").expect("backend-0");
        let addr = SocketAddrV4::new(pod, DIRECT_PORT);
        wait_answers(ext, addr, "pod IP");
        direct.push((ext.clone(), addr));
    }

    let mut results: Vec<(usize, Vec<Config>)> = Vec::new();
    let mut have = 1;
    for count in COUNTS {
        xdp.grow(have - 1, count - 1);
        tc.grow(have - 1, count - 1);
        if count != have {
            ipt.load(count);
        }
        have = count;
        let np =
            |lab: &Lab, node: u8| SocketAddrV4::new(lab.node(node).expect("node").ip(), NODE_PORT);
        let mut configs: Vec<Config> = ["pod IP, XDP node", "pod IP, iptables node"]
            .iter()
            .zip(&direct)
            .map(|(name, (ext, addr))| Config {
                name: (*name).into(),
                ext: ext.clone(),
                addr: *addr,
                cell: Cell::default(),
            })
            .collect();
        for (name, lab, ext) in [
            ("XDP", &*xdp.cluster, &xdp.ext),
            ("tc", &*tc.cluster, &tc.ext),
            ("iptables", &ipt.lab, &ipt.ext),
        ] {
            for (variant, node) in [("remote", 0), ("local", 1)] {
                configs.push(Config {
                    name: format!("{name}, {variant}"),
                    ext: ext.clone(),
                    addr: np(lab, node),
                    cell: Cell::default(),
                });
            }
        }
        let t = Instant::now();
        for _ in 0..ROUNDS {
            for c in &mut configs {
                measure(&c.ext, c.addr, &mut c.cell);
            }
        }
        eprintln!("{count} Services: {ROUNDS} rounds measured in {:?}", t.elapsed());
        print_phase(count, &configs);
        results.push((count, configs));
    }
    print_summary(&results);
    for [ext, cidr, via] in &routes {
        ip(&["-n", ext, "route", "del", cidr, "via", via]);
    }
    drop((xdp, tc, ipt));
    eprintln!("nodeport section done in {:?}", started.elapsed());
}

fn print_phase(count: usize, configs: &[Config]) {
    println!(
        "\nNodePort from the external client, {count} Service(s); {ROUNDS} rounds, interleaved \
         (latency: connect to first byte, µs; rate: requests/s, median of rounds)"
    );
    println!(
        "{:<20} {:>9} {:>9} {:>11} {:>11} {:>7}",
        "path", "median", "p99", "1 client", "4 clients", "errors"
    );
    for c in configs {
        println!(
            "{:<20} {:>9.1} {:>9.1} {:>11.0} {:>11.0} {:>7}",
            c.name,
            c.cell.percentile_us(0.5),
            c.cell.percentile_us(0.99),
            Cell::median(&c.cell.single_rps),
            Cell::median(&c.cell.multi_rps),
            c.cell.errors
        );
    }
}

/// Ratios against the pod IP and between the datapaths, per Service count.
fn print_summary(results: &[(usize, Vec<Config>)]) {
    println!(
        "\nNodePort, remote backend: ratios (median latency vs the pod IP; 4-client rate vs the pod IP)"
    );
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "services", "XDP lat", "tc lat", "iptables lat", "XDP rate", "tc rate", "iptables rate"
    );
    for (count, configs) in results {
        let find = |name: &str| configs.iter().find(|c| c.name == name).expect("config");
        let base = find("pod IP, XDP node");
        let (bl, br) = (base.cell.percentile_us(0.5), Cell::median(&base.cell.multi_rps));
        let lat = |n: &str| find(n).cell.percentile_us(0.5) / bl;
        let rate = |n: &str| Cell::median(&find(n).cell.multi_rps) / br;
        println!(
            "{:<10} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>14.2}",
            count,
            lat("XDP, remote"),
            lat("tc, remote"),
            lat("iptables, remote"),
            rate("XDP, remote"),
            rate("tc, remote"),
            rate("iptables, remote"),
        );
    }
    let at = |count: usize, name: &str| -> (f64, f64) {
        let (_, configs) = results.iter().find(|(c, _)| *c == count).expect("phase");
        let c = configs.iter().find(|c| c.name == name).expect("config");
        (c.cell.percentile_us(0.5), Cell::median(&c.cell.multi_rps))
    };
    let (first, last) = (COUNTS[0], COUNTS[COUNTS.len() - 1]);
    println!(
        "\nremote backend, {last} Services vs {first}: median latency ratio, 4-client rate ratio"
    );
    for name in [
        "pod IP, XDP node",
        "pod IP, iptables node",
        "XDP, remote",
        "tc, remote",
        "iptables, remote",
    ] {
        let (l0, r0) = at(first, name);
        let (l1, r1) = at(last, name);
        println!("  {name:<22} {:>6.2} {:>6.2}", l1 / l0, r1 / r0);
    }
    println!("\nremote backend, 4-client rate: XDP / tc, XDP / iptables, tc / iptables");
    for (count, _) in results {
        let x = at(*count, "XDP, remote").1;
        let t = at(*count, "tc, remote").1;
        let i = at(*count, "iptables, remote").1;
        println!("  {count:<6} {:>6.2} {:>6.2} {:>6.2}", x / t, x / i, t / i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodeport_jump_stays_last_and_probabilities_split_evenly() {
        let services = [
            RuleService { name: "a".into(), cluster_ip: dummy_ip(0), port: 80, node_port: None },
            RuleService {
                name: "m".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                node_port: Some(30080),
            },
        ];
        let eps = [Ipv4Addr::new(10, 244, 0, 66), Ipv4Addr::new(10, 244, 0, 67)];
        let rules = kube_proxy_rules(&services, &eps, 8080);
        let svc: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert_eq!(svc.len(), 3);
        assert!(svc[0].contains("10.100.0.1/32") && svc[1].contains("10.96.0.10/32"));
        assert!(svc[2].contains("-j KUBE-NODEPORTS"), "{}", svc[2]);
        assert_eq!(rules.matches("--probability 0.50000000000").count(), 2);
        assert_eq!(rules.matches("-j DNAT").count(), 4);
        assert_eq!(rules.matches("-A KUBE-NODEPORTS").count(), 1);
        assert_eq!(rules.matches("COMMIT").count(), 2);
    }
}
