//! North-south on two nodes: NodePort, LoadBalancer and external IPs from the external
//! client, `externalTrafficPolicy`, `loadBalancerSourceRanges`, and pods' egress SNAT.
//! Real sockets; the external client reaches only the node IPs (and, through routes a
//! cloud load balancer or MetalLB would stand for, the LoadBalancer and external IPs).
//!
//! ```text
//!   lab-node  (np{N}-node):  client, web-0
//!   lab-node1 (np{N}-node1): client1, web-1, web-2, peer-1 (echoes the source it sees)
//! ```
//! Needs root and the binaries (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::{
    collections::BTreeSet,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use nodeplane_lab::{Lab, netns, server};
use nodeplane_tests::{
    http,
    multinode::{MultiCluster, PeerEcho},
};

const MULTINODE: &str = include_str!("../../lab/examples/multinode.yaml");
const TIMEOUT: Duration = Duration::from_secs(2);
const SILENCE: Duration = Duration::from_millis(600);
const CONVERGE: Duration = Duration::from_secs(20);
/// A LoadBalancer ingress IP and an external IP (TEST-NET-3), routed to the nodes by the
/// external client as a load balancer would.
const LB_OPEN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_CLOSED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// lb-local's healthCheckNodePort.
const HEALTH_PORT: u16 = 32_000;
/// How many connections the SNAT test holds open at once.
const EGRESS_CONNECTIONS: usize = 1_000;

/// The echo pod on the second node and the Services of this test. `{external}` is the
/// external client's address (the open LoadBalancer admits it alone).
fn services(external: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: peer-1, namespace: demo, labels: {{app: peer}}}}\n\
         spec: {{nodeName: lab-node1, containers: [{{name: peer}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web-np, namespace: demo}}\n\
         spec:\n  type: NodePort\n  selector: {{app: web}}\n  ports:\n\
         \x20 - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}\n\
         \x20 - {{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: peer-cluster, namespace: demo}}\n\
         spec:\n  type: NodePort\n  selector: {{app: peer}}\n  ports:\n\
         \x20 - {{name: t, port: 7000, nodePort: 30700, protocol: TCP}}\n\
         \x20 - {{name: u, port: 7000, nodePort: 30700, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: peer-local, namespace: demo}}\n\
         spec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  selector: {{app: peer}}\n  ports:\n\
         \x20 - {{name: t, port: 7000, nodePort: 30701, protocol: TCP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb-open, namespace: demo}}\n\
         spec:\n  type: LoadBalancer\n  selector: {{app: peer}}\n\
         \x20 loadBalancerSourceRanges: [\"{external}/32\", \"10.99.0.0/16\"]\n  ports:\n\
         \x20 - {{name: t, port: 80, targetPort: 7000, nodePort: 30702, protocol: TCP}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: \"{LB_OPEN}\"}}]}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb-closed, namespace: demo}}\n\
         spec:\n  type: LoadBalancer\n  selector: {{app: peer}}\n\
         \x20 loadBalancerSourceRanges: [\"10.99.0.0/16\"]\n  ports:\n\
         \x20 - {{name: t, port: 80, targetPort: 7000, nodePort: 30703, protocol: TCP}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: \"{LB_CLOSED}\"}}]}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb-local, namespace: demo}}\n\
         spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n\
         \x20 selector: {{app: peer}}\n  ports:\n\
         \x20 - {{name: t, port: 80, targetPort: 7000, nodePort: 30704, protocol: TCP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: np-empty, namespace: demo}}\n\
         spec:\n  type: NodePort\n  selector: {{app: nobody}}\n  ports:\n\
         \x20 - {{name: t, port: 80, nodePort: 30705, protocol: TCP}}\n\
         \x20 - {{name: u, port: 80, nodePort: 30705, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: peer-eip, namespace: demo}}\n\
         spec:\n  selector: {{app: peer}}\n  externalIPs: [\"{EXTERNAL_IP}\"]\n  ports:\n\
         \x20 - {{name: t, port: 80, targetPort: 7000, protocol: TCP}}\n"
    )
}

struct Setup {
    cluster: MultiCluster,
    _peer: PeerEcho,
}

impl std::ops::Deref for Setup {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.cluster
    }
}

fn cluster() -> Setup {
    cluster_with(&[])
}

/// [`cluster`] with extra agent flags.
fn cluster_with(flags: &[&str]) -> Setup {
    // The external client's address is fixed by the slot, known only once the lab is up:
    // the Services go in afterwards.
    let cluster = MultiCluster::up(2, &[("multinode.yaml", MULTINODE)], flags);
    let external = cluster.external_ip().expect("an underlay lab has an external client");
    cluster
        .apply(&[("nodeport.yaml", services(external))])
        .unwrap_or_else(|e| panic!("applying the Services: {e:#}"));
    cluster.wait_ready(CONVERGE);
    let peer = PeerEcho::start(&cluster.pod_netns("demo", "peer-1"), 7000);
    // The load balancer's and the external IP's routes, on the external client.
    let ext = cluster.external_netns().expect("external netns");
    let node0 = cluster.node(0).expect("node 0").ip();
    let node1 = cluster.node(1).expect("node 1").ip();
    for (ip, via) in [(LB_OPEN, node0), (LB_CLOSED, node0), (EXTERNAL_IP, node1)] {
        let status = Command::new("ip")
            .args(["-n", &ext, "route", "replace", &format!("{ip}/32"), "via", &via.to_string()])
            .status()
            .expect("running ip");
        assert!(status.success(), "route to {ip} via {via}");
    }
    Setup { cluster, _peer: peer }
}

fn external_tcp(lab: &Lab, addr: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    lab.in_external(|| server::tcp_ask(addr, timeout)).expect("entering the external client")
}

fn external_udp(lab: &Lab, addr: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    lab.in_external(|| server::udp_ask(addr, timeout)).expect("entering the external client")
}

fn node_ip(lab: &Lab, node: u8) -> Ipv4Addr {
    lab.node(node).expect("node").ip()
}

#[test]
fn nodeport_on_every_node_reaches_every_backend_over_tcp_and_udp() {
    let lab = cluster();
    let want: BTreeSet<String> = ["web-0", "web-1", "web-2"].map(String::from).into();
    for node in 0..2 {
        let http = SocketAddrV4::new(node_ip(&lab, node), 30080);
        let dns = SocketAddrV4::new(node_ip(&lab, node), 30053);
        lab.cluster.wait_until(&format!("node {node}'s NodePort answers"), CONVERGE, || {
            external_tcp(&lab, http, TIMEOUT).is_ok()
        });
        let (mut tcp_seen, mut udp_seen) = (BTreeSet::new(), BTreeSet::new());
        // Missing one of three backends in 60 tries: 3 · (2/3)^60 ≈ 10⁻¹⁰.
        for i in 0..60 {
            let who = external_tcp(&lab, http, TIMEOUT)
                .unwrap_or_else(|e| panic!("node {node}: TCP {i} to {http}: {e}"));
            tcp_seen.insert(who);
            let who = external_udp(&lab, dns, TIMEOUT)
                .unwrap_or_else(|e| panic!("node {node}: UDP {i} to {dns}: {e}"));
            udp_seen.insert(who);
        }
        assert_eq!(tcp_seen, want, "node {node}: TCP through the NodePort");
        assert_eq!(udp_seen, want, "node {node}: UDP through the NodePort");
    }
}

#[test]
fn traffic_policy_cluster_snats_to_other_nodes_and_local_keeps_the_client_address() {
    let lab = cluster();
    let external = lab.external_ip().expect("external").to_string();
    let (node0, node1) = (node_ip(&lab, 0), node_ip(&lab, 1));
    let cluster_via0 = SocketAddrV4::new(node0, 30700);
    lab.cluster.wait_until("the NodePort answers", CONVERGE, || {
        external_tcp(&lab, cluster_via0, TIMEOUT).is_ok()
    });
    for i in 0..5 {
        // Cluster, entering the node without the backend: forwarded with the entry node's
        // address as source, so the reply comes back through it.
        let seen = external_tcp(&lab, cluster_via0, TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP {i} via node 0: {e}"));
        assert_eq!(seen, node0.to_string(), "Cluster, remote backend: SNATed to node 0");
        let seen = external_udp(&lab, cluster_via0, TIMEOUT)
            .unwrap_or_else(|e| panic!("UDP {i} via node 0: {e}"));
        assert_eq!(seen, node0.to_string(), "Cluster, remote backend, UDP");
        // Cluster, entering the backend's node: nothing to SNAT (as Cilium does).
        let seen = external_tcp(&lab, SocketAddrV4::new(node1, 30700), TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP {i} via node 1: {e}"));
        assert_eq!(seen, external, "Cluster, local backend: the client's address");
        // Local: the client's address, end to end.
        let seen = external_tcp(&lab, SocketAddrV4::new(node1, 30701), TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP {i} to the Local NodePort on node 1: {e}"));
        assert_eq!(seen, external, "Local: the backend sees the client");
    }
    // Local on a node without a local endpoint: dropped, never forwarded.
    let err = external_tcp(&lab, SocketAddrV4::new(node0, 30701), SILENCE)
        .expect_err("the Local NodePort answered on a node without endpoints");
    assert!(
        matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock),
        "dropped, not refused: {err}"
    );
}

#[test]
fn load_balancer_ips_honour_source_ranges_and_external_ips_are_served() {
    let lab = cluster();
    let open = SocketAddrV4::new(LB_OPEN, 80);
    lab.cluster.wait_until("the LoadBalancer IP answers", CONVERGE, || {
        external_tcp(&lab, open, TIMEOUT).is_ok()
    });
    for i in 0..5 {
        let seen = external_tcp(&lab, open, TIMEOUT).unwrap_or_else(|e| panic!("LB {i}: {e}"));
        assert_eq!(seen, node_ip(&lab, 0).to_string(), "through node 0 to peer-1 on node 1");
        let seen = external_tcp(&lab, SocketAddrV4::new(EXTERNAL_IP, 80), TIMEOUT)
            .unwrap_or_else(|e| panic!("external IP {i}: {e}"));
        assert_eq!(seen, lab.external_ip().expect("external").to_string(), "local backend");
    }
    // The client is outside lb-closed's ranges: dropped at the node.
    let closed = SocketAddrV4::new(LB_CLOSED, 80);
    let err = external_tcp(&lab, closed, SILENCE).expect_err("a source outside the ranges");
    assert!(matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{err}");
    // The ranges apply to the LoadBalancer IP, not to the Service's NodePort (kube-proxy).
    let np = SocketAddrV4::new(node_ip(&lab, 1), 30703);
    let seen = external_tcp(&lab, np, TIMEOUT).expect("lb-closed's NodePort");
    assert_eq!(seen, lab.external_ip().expect("external").to_string());
}

/// The agent of `node`'s packet counter for `hook` and `reason` (its `/metrics` on
/// 127.0.0.1:10249 in the node netns).
fn counter(lab: &Lab, node: u8, hook: &str, reason: &str) -> u64 {
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
    let (_, text) = lab
        .node(node)
        .expect("node")
        .run(|| http::get(metrics, "/metrics", TIMEOUT))
        .expect("entering the node")
        .expect("scraping the agent's metrics");
    let series = format!("nodeplane_datapath_packets_total{{hook=\"{hook}\",reason=\"{reason}\",");
    text.lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// NodePort requests through node 0 to peer-1 (on node 1): the remote path.
fn remote_requests(lab: &Setup, n: usize) {
    let addr = SocketAddrV4::new(node_ip(lab, 0), 30700);
    lab.cluster
        .wait_until("the NodePort answers", CONVERGE, || external_tcp(lab, addr, TIMEOUT).is_ok());
    for i in 0..n {
        let seen = external_tcp(lab, addr, TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(seen, node_ip(lab, 0).to_string());
    }
}

#[test]
fn xdp_translates_nodeport_flows_and_tc_alone_does_the_same_with_xdp_off() {
    // The agent's counters are read every second; 20 requests, then a little more than that.
    let lab = cluster_with(&["--xdp", "native"]);
    remote_requests(&lab, 20);
    thread::sleep(Duration::from_millis(1500));
    let tx_new = counter(&lab, 0, "xdp_netdev", "snat-new");
    let tx_back = counter(&lab, 0, "xdp_netdev", "rev-snat");
    // The first SYN may go through tc while the node learns the neighbour.
    assert!(tx_new >= 19, "XDP started {tx_new} of 20 flows");
    assert!(tx_back >= 19 * 2, "XDP sent {tx_back} replies back");
    drop(lab);

    let lab = cluster_with(&["--xdp", "off"]);
    remote_requests(&lab, 20);
    thread::sleep(Duration::from_millis(1500));
    let xdp: u64 = ["snat-new", "snat", "rev-snat", "nat-new", "pass-not-service"]
        .iter()
        .map(|r| counter(&lab, 0, "xdp_netdev", r))
        .sum();
    assert_eq!(xdp, 0, "no XDP program runs with --xdp off");
    assert!(counter(&lab, 0, "from_netdev", "nat-new") >= 20, "tc DNATs the flows");
    assert!(counter(&lab, 0, "to_netdev", "snat-new") >= 20, "tc SNATs them");
    assert!(counter(&lab, 0, "from_netdev", "rev-snat") >= 20, "and reverses the replies");
}

#[test]
fn nodeport_keeps_working_while_the_agent_is_killed_and_restarted() {
    let mut lab = cluster();
    remote_requests(&lab, 5);
    lab.cluster.kill_agent(0);
    // The pinned programs (XDP, tc) and maps keep translating with no agent.
    remote_requests(&lab, 10);
    lab.cluster.start_agent(0);
    // The new agent replaces the programs of the pinned XDP link in one step.
    lab.cluster.wait_until("the restarted agent takes over the XDP link", CONVERGE, || {
        lab.cluster.agent_log(0).contains("mode=\"pinned\"")
    });
    remote_requests(&lab, 10);
}

/// `GET /healthz` on `addr` from the external client: the status code and the body.
fn http_get(lab: &Lab, addr: SocketAddrV4) -> io::Result<(u16, String)> {
    lab.in_external(|| http::get(addr, "/healthz", TIMEOUT)).expect("entering the external client")
}

#[test]
fn health_check_node_port_answers_200_where_endpoints_are_local_and_503_elsewhere() {
    let lab = cluster();
    let with = SocketAddrV4::new(node_ip(&lab, 1), HEALTH_PORT);
    let without = SocketAddrV4::new(node_ip(&lab, 0), HEALTH_PORT);
    lab.cluster.wait_until("both nodes answer the health check", CONVERGE, || {
        http_get(&lab, with).is_ok() && http_get(&lab, without).is_ok()
    });
    let (status, body) = http_get(&lab, with).expect("node 1");
    assert_eq!(status, 200, "node 1 has peer-1: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["localEndpoints"], 1, "{body}");
    assert_eq!(json["service"]["name"], "lb-local");
    assert_eq!(json["service"]["namespace"], "demo");
    let (status, body) = http_get(&lab, without).expect("node 0");
    assert_eq!(status, 503, "node 0 has no endpoint of lb-local: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["localEndpoints"], 0, "{body}");
    // What the load balancer acts on: node 1 serves the Local Service with the client's
    // address, node 0 drops it.
    let seen = external_tcp(&lab, SocketAddrV4::new(node_ip(&lab, 1), 30704), TIMEOUT)
        .expect("the Local NodePort of lb-local on node 1");
    assert_eq!(seen, lab.external_ip().expect("external").to_string());
    assert!(external_tcp(&lab, SocketAddrV4::new(node_ip(&lab, 0), 30704), SILENCE).is_err());
}

#[test]
fn a_nodeport_without_endpoints_refuses_at_once() {
    let lab = cluster();
    remote_requests(&lab, 1);
    for node in 0..2 {
        let addr = SocketAddrV4::new(node_ip(&lab, node), 30705);
        let started = std::time::Instant::now();
        let err = external_tcp(&lab, addr, TIMEOUT).expect_err("a Service without endpoints");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "node {node} TCP: {err}");
        assert!(started.elapsed() < Duration::from_millis(500), "refused, not timed out");
        let err = external_udp(&lab, addr, TIMEOUT).expect_err("UDP without endpoints");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "node {node} UDP: {err}");
    }
}

/// Raises the open-files limit to its hard maximum: the SNAT test holds 2,000 sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// In the internet netns: answers each connection's first line with
/// `<line> <peer ip>:<peer port>` and keeps the connection open until stopped.
struct TokenEcho {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<SocketAddrV4>>>,
}

impl TokenEcho {
    fn start(netns: &str, port: u16) -> TokenEcho {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let listener = netns::run_in(netns, || TcpListener::bind(any))
            .expect("entering the internet")
            .expect("binding the echo");
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            let mut peers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, std::net::SocketAddr::V4(peer))) => {
                        stream.set_nonblocking(false).expect("blocking");
                        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                        let mut line = String::new();
                        if BufReader::new(&stream).read_line(&mut line).is_ok() {
                            let _ =
                                (&stream).write_all(format!("{} {peer}\n", line.trim()).as_bytes());
                        }
                        peers.push(peer);
                        held.push(stream);
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            peers
        });
        TokenEcho { stop, thread: Some(thread) }
    }

    /// Stops and returns the peers seen, in order.
    fn finish(mut self) -> Vec<SocketAddrV4> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("echo thread")
    }
}

#[test]
fn pods_leave_the_cluster_masqueraded_and_a_thousand_concurrent_flows_keep_their_own_replies() {
    raise_nofile();
    let lab = cluster();
    // No route back to the pods on the router: only SNAT to the node IP brings answers.
    lab.set_egress_return_routes(false).unwrap_or_else(|e| panic!("{e:#}"));
    let internet = lab.internet_ip().expect("internet");
    let inet = lab.internet_netns().expect("internet netns");
    let echo = PeerEcho::start(&inet, 80);
    let addr = SocketAddrV4::new(internet, 80);
    for (pod, node) in [("client", 0), ("web-1", 1)] {
        let seen = lab.tcp_ask("demo", pod, addr, TIMEOUT).unwrap_or_else(|e| panic!("{pod}: {e}"));
        assert_eq!(seen, node_ip(&lab, node).to_string(), "{pod}: TCP seen from its node");
        let seen = lab.udp_ask("demo", pod, addr, TIMEOUT).unwrap_or_else(|e| panic!("{pod}: {e}"));
        assert_eq!(seen, node_ip(&lab, node).to_string(), "{pod}: UDP seen from its node");
    }
    drop(echo);

    // Pod to pod and pod to node stay unmasqueraded.
    let web1 = SocketAddrV4::new(lab.pod_ip("demo", "web-1").expect("web-1"), 8080);
    assert_eq!(lab.tcp_ask("demo", "client", web1, TIMEOUT).expect("pod to pod"), "web-1");

    // 1,000 connections from one pod, all open at once, each with its own token.
    let tokens = TokenEcho::start(&inet, 8000);
    let target = SocketAddrV4::new(internet, 8000);
    let pod = lab.pod_netns("demo", "client");
    // Each writes its token at once (the echo answers connections in order); the replies
    // are read once all of them are open.
    let streams: Vec<TcpStream> = netns::run_in(&pod, || {
        (0..EGRESS_CONNECTIONS)
            .map(|i| {
                let mut stream = TcpStream::connect_timeout(&target.into(), TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                stream.write_all(format!("token-{i}\n").as_bytes()).expect("write");
                stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                stream
            })
            .collect()
    })
    .expect("entering the pod");
    let node0 = node_ip(&lab, 0);
    for (i, stream) in streams.iter().enumerate() {
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap_or_else(|e| panic!("reply {i}: {e}"));
        let (token, peer) = line.trim().split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(token, format!("token-{i}"), "connection {i} got another's reply");
        let peer: SocketAddrV4 = peer.parse().expect("peer address");
        assert_eq!(*peer.ip(), node0, "connection {i} not SNATed to the node");
        let port = peer.port();
        assert!((1024..=29_999).contains(&port), "port {port} outside the SNAT range");
    }
    // While they are all open, `inspect nat` lists each of them, translated, with its reply
    // path in place.
    let node = lab.node(0).expect("node 0");
    let argv = [
        "inspect".to_string(),
        "--bpffs-dir".into(),
        node.bpffs_dir().display().to_string(),
        "--state-dir".into(),
        node.agent_state_dir().display().to_string(),
        "-o".into(),
        "json".into(),
        "nat".into(),
    ];
    let agent = std::env::var("NODEPLANE_AGENT_BIN").expect("NODEPLANE_AGENT_BIN");
    let out = netns::enter_command(&node.netns(), agent, &argv)
        .expect("entering node 0")
        .output()
        .expect("running inspect nat");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let to_target: Vec<&serde_json::Value> = report["snat"]
        .as_array()
        .expect("snat lines")
        .iter()
        .filter(|e| e["peer"] == target.to_string())
        .collect();
    assert_eq!(to_target.len(), EGRESS_CONNECTIONS, "one SNAT line per connection");
    assert!(to_target.iter().all(|e| e["kind"] == "masquerade" && e["reverse_nat"] == true));
    let peers = tokens.finish();
    let ports: BTreeSet<u16> = peers.iter().map(SocketAddrV4::port).collect();
    assert_eq!(peers.len(), EGRESS_CONNECTIONS);
    assert_eq!(ports.len(), EGRESS_CONNECTIONS, "two live flows shared a port");
    drop(streams);
    lab.set_egress_return_routes(true).unwrap_or_else(|e| panic!("{e:#}"));
}
