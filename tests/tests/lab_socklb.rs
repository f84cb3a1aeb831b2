//! Host-network clients reach ClusterIPs through the socket-level load balancer (cgroup
//! `sock_addr` programs, `dataplane-ebpf/src/sock.rs`), end to end in the netns lab: a
//! client in the node's network namespace (where the agent runs: the host of a real node)
//! gets a backend's answer, sees the VIP as its peer and as the source of UDP answers, is
//! refused at once by a Service without endpoints, while a client in another namespace is
//! left alone. The translation outlives the agent, a restart replaces it without a gap,
//! and `uninstall` detaches it.
//! Needs root and the binaries built by `cargo xtask test` (NODEPLANE_AGENT_BIN,
//! NODEPLANE_LAB_BIN).
use std::{
    io::{self, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use nodeplane_agent::{inspect::pinned::Pins, socklb};
use nodeplane_common::{
    maps::{Counter, names},
    reason::{Hook, Reason, counter_index},
};
use nodeplane_lab::{netns, server};
use nodeplane_tests::{bin, cluster::Cluster, multinode::MultiCluster};

const MULTINODE: &str = include_str!("../../lab/examples/multinode.yaml");

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: sl}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: sl, labels: {app: web}}
spec:
  containers:
  - name: web
    image: nodeplane/echo
    ports:
    - {name: http, containerPort: 8080, protocol: TCP}
    - {name: dns, containerPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: live, namespace: sl}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: sl}
spec:
  selector: {app: nothing-has-this-label}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

const TIMEOUT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(20);
/// A refusal decided in the `connect` call itself: no packet, no round trip.
const FAST: Duration = Duration::from_millis(50);
/// The log line of `socklb::reconcile`.
const ATTACHED: &str = "socket LB of host-network clients attached";

fn vip(c: &Cluster, name: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(c.service_ip("sl", name).unwrap_or_else(|e| panic!("{name}: {e:#}")), port)
}

/// Runs `f` in the node's network namespace (a host-network client).
fn on_node<R: Send>(c: &Cluster, f: impl FnOnce() -> R + Send) -> R {
    c.in_node(f).unwrap_or_else(|e| panic!("in the node netns: {e:#}"))
}

/// One datagram on an unconnected socket and the answer: its text and its source as
/// `recvfrom` reports it.
fn udp_from(to: SocketAddrV4) -> io::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"who?\n", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

/// Packets counted under (`sock`, `reason`) in the node's pinned `COUNTERS`, over CPUs.
fn counted(pins: &Path, reason: Reason) -> u64 {
    let pins = Pins::open(pins).unwrap_or_else(|e| panic!("the node's pins: {e}"));
    let path = pins.map_path(names::COUNTERS).unwrap_or_else(|e| panic!("COUNTERS pin: {e}"));
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("COUNTERS: {e}"));
    let counters: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(map).unwrap_or_else(|e| panic!("COUNTERS as a per-CPU array: {e}"));
    let per_cpu = counters
        .get(&counter_index(Hook::Sock, reason), 0)
        .unwrap_or_else(|e| panic!("COUNTERS[sock, {}]: {e}", reason.name()));
    per_cpu.iter().map(|c| c.packets).sum()
}

fn assert_refused<T: std::fmt::Debug>(what: &str, r: io::Result<T>, took: Duration) {
    match r {
        Err(e) => assert!(
            e.kind() == ErrorKind::ConnectionRefused,
            "{what}: want ECONNREFUSED, got {e} after {took:?}"
        ),
        Ok(v) => panic!("{what}: want ECONNREFUSED, got {v:?} after {took:?}"),
    }
    assert!(took < FAST, "{what}: refused only after {took:?} (bound {FAST:?})");
}

/// `(link id, program id)` of every socket LB link pinned under `pins`, by hook.
fn sock_links(pins: &Path) -> Vec<(String, u32, u32)> {
    let dir = nodeplane_agent::pin::PinDir::new(pins);
    let found = socklb::link_pins(&dir).unwrap_or_else(|e| panic!("listing link pins: {e}"));
    found
        .into_iter()
        .map(|(_, hook, path)| {
            let link = PinnedLink::from_pin(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let info = FdLink::from(link).info().unwrap_or_else(|e| panic!("{path:?}: {e}"));
            (hook, info.id(), info.program_id())
        })
        .collect()
}

/// The program ids `bpftool cgroup show` lists on the cgroup2 root, if bpftool is
/// installed (the link ids above say the same without it).
fn bpftool_cgroup_progs() -> Option<Vec<u32>> {
    let root = socklb::default_cgroup_root().expect("a cgroup2 mount");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&root)
        .output()
        .ok()?;
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // An empty cgroup prints nothing at all.
    let list: Vec<serde_json::Value> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool output {text:?}: {e}"))
    };
    Some(list.iter().filter_map(|p| p["id"].as_u64()).map(|id| id as u32).collect())
}

/// A scratch network namespace (not the lab's), deleted on drop.
struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = netns::delete(&self.0);
    }
}

/// Answers `name` to every TCP connection and UDP datagram on `addr`, from a thread that
/// lives as long as the test process.
fn serve_here(addr: SocketAddrV4, name: &'static str) -> io::Result<()> {
    let tcp = TcpListener::bind(addr)?;
    let udp = UdpSocket::bind(addr)?;
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().flatten() {
            let _ = stream.write_all(format!("{name}\n").as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{name}\n").as_bytes(), peer);
        }
    });
    Ok(())
}

#[test]
fn host_clients_reach_clusterips_through_their_sockets() {
    let c = Cluster::up(&[("socklb.yaml", CLUSTER)], &[]);
    let (http, dns) = (vip(&c, "live", 80), vip(&c, "live", 53));
    let (empty_http, empty_dns) = (vip(&c, "empty", 80), vip(&c, "empty", 53));
    c.wait_until("a host client reaches the ClusterIP", CONVERGE, || {
        on_node(&c, || server::tcp_ask(http, TIMEOUT)).is_ok_and(|who| who == "web")
    });
    assert!(c.agent_log().contains(ATTACHED), "{}", c.agent_log());
    let pins = c.pins();
    let (new0, rev0) = (counted(&pins, Reason::NatNew), counted(&pins, Reason::RevNat));

    // TCP: a backend answers, and the socket's peer is the VIP, not the pod.
    let (who, peer) = on_node(&c, || {
        let stream = TcpStream::connect_timeout(&http.into(), TIMEOUT)?;
        let peer = stream.peer_addr()?;
        Ok::<_, io::Error>((server::read_name(&stream, TIMEOUT)?, peer))
    })
    .expect("TCP from the node to the ClusterIP");
    assert_eq!(who, "web");
    assert_eq!(peer, SocketAddr::V4(http), "getpeername shows the ClusterIP");

    // UDP, connected (connect4) and not (sendmsg4): the answer comes "from" the VIP.
    let who = on_node(&c, || server::udp_ask(dns, TIMEOUT)).expect("connected UDP");
    assert_eq!(who, "web");
    let (who, from) = on_node(&c, || udp_from(dns)).expect("unconnected UDP");
    assert_eq!((who.as_str(), from), ("web", SocketAddr::V4(dns)), "recvfrom's source");
    let peer = on_node(&c, || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(dns)?;
        s.peer_addr()
    })
    .expect("a connected UDP socket's peer");
    assert_eq!(peer, SocketAddr::V4(dns), "getpeername on UDP");
    // One translation per connect or unconnected send (TCP, two connected UDP, one send).
    assert_eq!(counted(&pins, Reason::NatNew) - new0, 4, "nat-new under the sock hook");
    assert!(counted(&pins, Reason::RevNat) - rev0 >= 3, "rev-nat under the sock hook");

    // No endpoints: refused in the call itself.
    let (tcp0, udp0) = (counted(&pins, Reason::RejectTcp), counted(&pins, Reason::RejectUdp));
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let (r, took) = on_node(&c, || {
            let start = Instant::now();
            (TcpStream::connect_timeout(&empty_http.into(), TIMEOUT).map(drop), start.elapsed())
        });
        assert_refused(&format!("TCP connect {i} to {empty_http}"), r, took);
        slowest = slowest.max(took);
        let (r, took) = on_node(&c, || {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let start = Instant::now();
            (s.send_to(b"who?\n", empty_dns), start.elapsed())
        });
        assert_refused(&format!("UDP send {i} to {empty_dns}"), r, took);
        slowest = slowest.max(took);
    }
    eprintln!("refused: 10 TCP connects and 10 UDP sends, the slowest in {slowest:?}");
    assert_eq!(counted(&pins, Reason::RejectTcp) - tcp0, 10, "reject-tcp under the sock hook");
    assert_eq!(counted(&pins, Reason::RejectUdp) - udp0, 10, "reject-udp under the sock hook");

    // Another network namespace: the same cgroup programs run for its sockets, but they
    // are not the agent's namespace. Its own server on the ClusterIP answers, untranslated.
    let scratch = Scratch(format!("npsock-{}", std::process::id()));
    netns::add(&scratch.0).expect("a scratch netns");
    let ip = std::process::Command::new("ip")
        .args(["-n", &scratch.0, "addr", "add", &format!("{}/32", http.ip()), "dev", "lo"])
        .status()
        .expect("ip addr add");
    assert!(ip.success(), "the ClusterIP on the scratch netns' lo");
    let (new1, refused1) = (counted(&pins, Reason::NatNew), counted(&pins, Reason::RejectTcp));
    netns::run_in(&scratch.0, || {
        serve_here(http, "local").expect("server in the scratch netns");
        serve_here(dns, "local").expect("server in the scratch netns");
    })
    .expect("in the scratch netns");
    let (tcp, udp) = netns::run_in(&scratch.0, || {
        (server::tcp_ask(http, TIMEOUT), udp_from(dns).map(|(who, _)| who))
    })
    .expect("in the scratch netns");
    assert_eq!(tcp.expect("TCP in the scratch netns"), "local", "not translated");
    assert_eq!(udp.expect("UDP in the scratch netns"), "local", "not translated");
    let (_, empty) = netns::run_in(&scratch.0, || {
        ((), TcpStream::connect_timeout(&empty_http.into(), TIMEOUT).map(drop))
    })
    .expect("in the scratch netns");
    // The empty Service's ClusterIP has no route there: the kernel's own error, not the
    // programs' refusal.
    assert!(empty.is_err());
    assert_eq!(counted(&pins, Reason::NatNew), new1, "nothing translated for other netns");
    assert_eq!(counted(&pins, Reason::RejectTcp), refused1, "nothing refused for other netns");

    // Pods keep the per-packet path; the socket hooks leave their sockets alone.
    let sock_before = counted(&pins, Reason::NatNew);
    let who = c.in_pod("sl", "web", || server::tcp_ask(http, TIMEOUT)).expect("in the pod");
    assert_eq!(who.expect("the pod reaches its own Service"), "web");
    assert_eq!(counted(&pins, Reason::NatNew), sock_before, "a pod's connect is not translated");
}

#[test]
fn translation_outlives_the_agent_survives_restarts_and_goes_with_uninstall() {
    let mut c = Cluster::up(&[("socklb.yaml", CLUSTER)], &[]);
    let (http, dns) = (vip(&c, "live", 80), vip(&c, "live", 53));
    c.wait_until("a host client reaches the ClusterIP", CONVERGE, || {
        on_node(&c, || server::tcp_ask(http, TIMEOUT)).is_ok_and(|who| who == "web")
    });
    let pins = c.pins();
    let first = sock_links(&pins);
    assert_eq!(first.len(), 4, "one pinned link per hook: {first:?}");

    // SIGTERM: the pinned links keep translating.
    c.stop_agent();
    for i in 0..5 {
        let who = on_node(&c, || server::tcp_ask(http, TIMEOUT));
        assert_eq!(who.ok().as_deref(), Some("web"), "TCP {i} with the agent stopped");
        let (who, from) = on_node(&c, || udp_from(dns)).expect("UDP with the agent stopped");
        assert_eq!((who.as_str(), from), ("web", SocketAddr::V4(dns)));
    }

    // A restart replaces every link while host clients keep asking: none may fail.
    let node = c.node_netns();
    let stop = AtomicBool::new(false);
    let (asked, failures) = std::thread::scope(|s| {
        let client = s.spawn(|| {
            netns::run_in(&node, || {
                let (mut asked, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    asked += 1;
                    match server::tcp_ask(http, TIMEOUT) {
                        Ok(who) if who == "web" => {}
                        other => failures.push(format!("TCP: {other:?}")),
                    }
                    match udp_from(dns) {
                        Ok((who, from)) if who == "web" && from == SocketAddr::V4(dns) => {}
                        other => failures.push(format!("UDP: {other:?}")),
                    }
                }
                (asked, failures)
            })
            .expect("in the node netns")
        });
        c.start_agent();
        c.wait_until("the restarted agent attached", CONVERGE, || {
            c.agent_log().matches(ATTACHED).count() == 2
        });
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        client.join().expect("the client thread")
    });
    assert!(failures.is_empty(), "{} of {asked} rounds failed: {failures:?}", failures.len());
    assert!(asked > 10, "too few rounds to tell: {asked}");
    eprintln!("{asked} rounds (a TCP connection and a UDP request each) across the restart");
    let second = sock_links(&pins);
    assert_eq!(second.len(), 4, "{second:?}");
    for ((hook, link0, prog0), (_, link1, prog1)) in first.iter().zip(&second) {
        assert!(link0 != link1 && prog0 != prog1, "{hook}: the link and program were replaced");
    }
    let links_now: Vec<u32> =
        aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    for (hook, link0, _) in &first {
        assert!(!links_now.contains(link0), "{hook}: the old link is gone");
    }

    // Uninstall (agent stopped): the links go, and with them the translation.
    let progs: Vec<u32> = second.iter().map(|(_, _, prog)| *prog).collect();
    if let Some(attached) = bpftool_cgroup_progs() {
        assert!(progs.iter().all(|p| attached.contains(p)), "bpftool: {attached:?} {progs:?}");
    }
    c.stop_agent();
    let out = std::process::Command::new(bin("NODEPLANE_AGENT_BIN"))
        .args(["uninstall", "--bpffs-dir"])
        .arg(&pins)
        .output()
        .expect("run uninstall");
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    let ours: Vec<u32> = second.iter().map(|(_, id, _)| *id).collect();
    let start = Instant::now();
    let left = || -> Vec<u32> {
        let now: Vec<u32> =
            aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
        ours.iter().copied().filter(|id| now.contains(id)).collect()
    };
    while !left().is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(left(), Vec::<u32>::new(), "cgroup links still in the kernel after uninstall");
    if let Some(attached) = bpftool_cgroup_progs() {
        assert!(progs.iter().all(|p| !attached.contains(p)), "bpftool: {attached:?} {progs:?}");
    }
    let who = on_node(&c, || server::tcp_ask(http, Duration::from_millis(500)));
    assert!(who.is_err(), "the ClusterIP is still translated for host clients: {who:?}");
}

/// Two nodes, one machine: both agents attach their programs to the same cgroup, and each
/// translates the host clients of its own node alone (counted in its own `COUNTERS`).
#[test]
fn each_node_translates_its_own_host_clients_only() {
    const N: u64 = 20;
    let lab = MultiCluster::up(2, &[("multinode.yaml", MULTINODE)], &[]);
    lab.wait_ready(CONVERGE);
    let http = SocketAddrV4::new(lab.service_ip("demo", "web").expect("web's ClusterIP"), 80);
    let node = |i: u8| lab.node(i).unwrap_or_else(|e| panic!("node {i}: {e:#}"));
    let ask =
        |i: u8| node(i).run(|| server::tcp_ask(http, TIMEOUT)).unwrap_or_else(|e| panic!("{e:#}"));
    lab.wait_until("both nodes' host clients reach the ClusterIP", CONVERGE, || {
        ask(0).is_ok() && ask(1).is_ok()
    });
    for i in [0u8, 1] {
        let other = 1 - i;
        let (mine, theirs) = (node(i).bpffs_dir(), node(other).bpffs_dir());
        let (mine0, theirs0) = (counted(&mine, Reason::NatNew), counted(&theirs, Reason::NatNew));
        for k in 0..N {
            let who = ask(i);
            assert!(who.as_ref().is_ok_and(|w| w.starts_with("web")), "node {i} #{k}: {who:?}");
        }
        assert_eq!(counted(&mine, Reason::NatNew) - mine0, N, "node {i} translated its own");
        assert_eq!(counted(&theirs, Reason::NatNew), theirs0, "node {other} left node {i} alone");
    }
}

const AFFINITY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: sa}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: sa, labels: {app: web}}
spec:
  containers:
  - {name: web, image: nodeplane/echo, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: sa, labels: {app: web}}
spec:
  containers:
  - {name: web, image: nodeplane/echo, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: sa}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: sa}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
"#;

/// `sessionAffinity: ClientIP` holds for host clients (the node is one client), and a
/// Service without it spreads their connections over its backends.
#[test]
fn host_clients_honour_session_affinity() {
    const N: usize = 24;
    let c = Cluster::up(&[("affinity.yaml", AFFINITY)], &[]);
    let addr = |name: &str| {
        SocketAddrV4::new(c.service_ip("sa", name).unwrap_or_else(|e| panic!("{e:#}")), 80)
    };
    let (sticky, plain) = (addr("sticky"), addr("plain"));
    c.wait_until("a host client reaches both Services", CONVERGE, || {
        on_node(&c, || server::tcp_ask(sticky, TIMEOUT).and(server::tcp_ask(plain, TIMEOUT)))
            .is_ok()
    });
    let answers = |to: SocketAddrV4| -> std::collections::BTreeSet<String> {
        (0..N)
            .map(|i| {
                on_node(&c, || server::tcp_ask(to, TIMEOUT))
                    .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"))
            })
            .collect()
    };
    // Missing one of two backends by chance in 24 connections: 2 · 2^-24.
    let spread = answers(plain);
    assert_eq!(spread.len(), 2, "without affinity: {spread:?}");
    let stuck = answers(sticky);
    assert_eq!(stuck.len(), 1, "with affinity every host connection has one backend: {stuck:?}");
}
