//! Reject instead of blackhole, end to end in the netns lab: a pod talking to a Service whose
//! selector matches no pod is refused at once (ECONNREFUSED: a RST for TCP, an ICMP port
//! unreachable for UDP) instead of timing out. Needs root and the binaries built by
//! `cargo xtask test` (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::{
    io::{self, ErrorKind},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use nodeplane_agent::inspect::pinned::Pins;
use nodeplane_common::{
    maps::{Counter, names},
    reason::{Hook, Reason, counter_index},
};
use nodeplane_tests::cluster::Cluster;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: rj}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: rj, labels: {app: web}}
spec:
  containers:
  - name: web
    image: nodeplane/echo
    ports:
    - {name: http, containerPort: 8080, protocol: TCP}
    - {name: dns, containerPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: rj, labels: {app: client}}
spec:
  containers:
  - {name: client, image: nodeplane/client}
---
apiVersion: v1
kind: Service
metadata: {name: live, namespace: rj}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: rj}
spec:
  selector: {app: nothing-has-this-label}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

/// Long enough that a timed-out attempt is told apart from a refused one at a glance, far
/// shorter than a real TCP connect timeout (about 2 minutes with Linux's 6 SYN retries).
const ATTEMPT: Duration = Duration::from_secs(3);
const CONVERGE: Duration = Duration::from_secs(20);
/// What "fails fast" means here: the answer comes from the client's own node, one veth
/// away. Measured medians are well under a millisecond; the bound leaves room for a loaded
/// 2-core CI machine and is still 12x shorter than one SYN retransmission (1 s).
const FAST: Duration = Duration::from_millis(80);
const ATTEMPTS: usize = 20;

fn vip(c: &Cluster, name: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(c.service_ip("rj", name).unwrap_or_else(|e| panic!("{name}: {e:#}")), port)
}

/// A TCP connect from the client pod: its result and how long it took.
fn connect(c: &Cluster, to: SocketAddrV4) -> (io::Result<()>, Duration) {
    c.in_pod("rj", "client", || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&to.into(), ATTEMPT).map(drop);
        (r, start.elapsed())
    })
    .unwrap_or_else(|e| panic!("in the client pod: {e:#}"))
}

/// One datagram on a connected UDP socket from the client pod, then a receive: its result
/// (the answer, or the error the ICMP message turned into) and how long it took.
fn udp_request(c: &Cluster, to: SocketAddrV4) -> (io::Result<String>, Duration) {
    c.in_pod("rj", "client", || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(ATTEMPT))?;
        socket.connect(to)?;
        let start = Instant::now();
        socket.send(b"who?\n")?;
        let mut buf = [0u8; 512];
        let r = socket.recv(&mut buf);
        let took = start.elapsed();
        Ok::<_, io::Error>((r.map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_string()), took))
    })
    .unwrap_or_else(|e| panic!("in the client pod: {e:#}"))
    .unwrap_or_else(|e| panic!("UDP socket set-up in the client pod: {e}"))
}

fn assert_refused<T: std::fmt::Debug>(what: &str, r: &io::Result<T>, took: Duration) {
    match r {
        Err(e) => assert!(
            e.kind() == ErrorKind::ConnectionRefused
                && e.raw_os_error() == Some(libc::ECONNREFUSED),
            "{what}: want ECONNREFUSED, got {e} ({:?}) after {took:?}",
            e.kind()
        ),
        Ok(v) => panic!("{what}: want ECONNREFUSED, got an answer {v:?} after {took:?}"),
    }
    assert!(took < FAST, "{what}: refused only after {took:?} (bound {FAST:?})");
}

/// Packets counted under (`from_pod`, `reason`) in the node's pinned `COUNTERS`, over CPUs.
fn counted(c: &Cluster, reason: Reason) -> u64 {
    let pins = Pins::open(&c.pins()).unwrap_or_else(|e| panic!("the node's pins: {e}"));
    let path = pins.map_path(names::COUNTERS).unwrap_or_else(|e| panic!("COUNTERS pin: {e}"));
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("COUNTERS: {e}"));
    let counters: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(map).unwrap_or_else(|e| panic!("COUNTERS as a per-CPU array: {e}"));
    let per_cpu = counters
        .get(&counter_index(Hook::FromPod, reason), 0)
        .unwrap_or_else(|e| panic!("COUNTERS[{}]: {e}", reason.name()));
    per_cpu.iter().map(|c| c.packets).sum()
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

#[test]
fn a_service_without_endpoints_refuses_tcp_and_udp_at_once() {
    let c = Cluster::up(&[("reject.yaml", CLUSTER)], &[]);
    let (live_http, live_dns) = (vip(&c, "live", 80), vip(&c, "live", 53));
    let (empty_http, empty_dns) = (vip(&c, "empty", 80), vip(&c, "empty", 53));
    // The agent has programmed the cluster once the live Service answers (one sync writes
    // both Services).
    c.wait_until("the live Service answers", CONVERGE, || connect(&c, live_http).0.is_ok());
    let (answer, _) = udp_request(&c, live_dns);
    assert_eq!(answer.expect("the live Service answers over UDP"), "web");

    let (tcp_before, udp_before) = (counted(&c, Reason::RejectTcp), counted(&c, Reason::RejectUdp));
    let mut tcp = Vec::new();
    for i in 0..ATTEMPTS {
        let (r, took) = connect(&c, empty_http);
        assert_refused(&format!("TCP connect {i} to {empty_http}"), &r, took);
        tcp.push(took);
    }
    let mut udp = Vec::new();
    for i in 0..ATTEMPTS {
        let (r, took) = udp_request(&c, empty_dns);
        assert_refused(&format!("UDP request {i} to {empty_dns}"), &r, took);
        udp.push(took);
    }
    // The answers came from the datapath, one per SYN and per datagram (not from a route
    // or another host).
    let n = ATTEMPTS as u64;
    assert_eq!(counted(&c, Reason::RejectTcp) - tcp_before, n, "reject-tcp counted per SYN");
    assert_eq!(counted(&c, Reason::RejectUdp) - udp_before, n, "reject-udp counted per datagram");
    let ((tm, tx), (um, ux)) = (stats(tcp), stats(udp));
    eprintln!(
        "refused after: TCP connect median {tm:?} max {tx:?}; UDP send->recv median {um:?} \
         max {ux:?} ({ATTEMPTS} attempts each)"
    );

    // The live Service still works next to the empty one.
    assert!(connect(&c, live_http).0.is_ok(), "the live Service after the rejections");
}
