//! End-to-end in the netns lab: real sockets in pod namespaces, the real agent in the node
//! namespace reading the lab's manifests, the real datapath on the pod veths.
//! Needs root and the binaries built by `cargo xtask test` (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::{
    collections::BTreeSet,
    ffi::OsString,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use nodeplane_lab::Lab;
use nodeplane_tests::{bin, cluster::Cluster};

const DEMO: &str = include_str!("../../lab/examples/demo.yaml");
const TIMEOUT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(20);

/// The demo cluster with the agent running in the node namespace.
fn lab() -> Cluster {
    Cluster::up(&[("demo.yaml", DEMO)], &[])
}

fn vip(lab: &Lab, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(lab.service_ip("demo", "web").expect("web has a ClusterIP"), port)
}

fn tcp(lab: &Lab, to: SocketAddrV4) -> std::io::Result<String> {
    lab.tcp_ask("demo", "client", to, TIMEOUT)
}

fn udp(lab: &Lab, to: SocketAddrV4) -> std::io::Result<String> {
    lab.udp_ask("demo", "client", to, TIMEOUT)
}

/// Polls `f` until it is true or `CONVERGE` passes; panics with the agent's log otherwise.
fn wait_until(lab: &Lab, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < CONVERGE {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(lab.log_path("agent")).unwrap_or_default();
    panic!("timed out waiting until {what}; agent log:\n{log}");
}

fn all_web_pods() -> BTreeSet<String> {
    ["web-0", "web-1", "web-2"].into_iter().map(String::from).collect()
}

#[test]
fn clusterip_balances_tcp_and_udp_across_every_backend() {
    let lab = lab();
    let (http, dns) = (vip(&lab, 80), vip(&lab, 53));
    wait_until(&lab, "the ClusterIP answers over TCP", || tcp(&lab, http).is_ok());

    let mut tcp_seen = BTreeSet::new();
    for i in 0..60 {
        let who = tcp(&lab, http).unwrap_or_else(|e| panic!("TCP request {i} to {http}: {e}"));
        tcp_seen.insert(who);
    }
    assert_eq!(tcp_seen, all_web_pods(), "60 TCP connections must reach every backend");

    let mut udp_seen = BTreeSet::new();
    for i in 0..60 {
        let who = udp(&lab, dns).unwrap_or_else(|e| panic!("UDP request {i} to {dns}: {e}"));
        udp_seen.insert(who);
    }
    assert_eq!(udp_seen, all_web_pods(), "60 UDP flows must reach every backend");
}

#[test]
fn removed_backend_gets_no_new_connections_while_established_ones_live_on_and_added_one_receives() {
    use std::io::{BufRead, BufReader, Write};

    let lab = lab();
    let http = vip(&lab, 80);
    wait_until(&lab, "the ClusterIP answers over TCP", || tcp(&lab, http).is_ok());

    // An established connection through the ClusterIP.
    let held = lab.tcp_connect("demo", "client", http, TIMEOUT).expect("connect through the VIP");
    held.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut reader = BufReader::new(held.try_clone().expect("clone stream"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting on the held connection");
    let kept = line.trim().to_string();
    let removed = all_web_pods().into_iter().find(|p| *p != kept).expect("another pod");

    // Take `removed` out of the Service's EndpointSlice (not ready -> not an endpoint).
    lab.set_pod_ready("demo", &removed, false).unwrap_or_else(|e| panic!("{e:#}"));
    let mut clean_streak = 0;
    wait_until(&lab, &format!("{removed} gets no new connections"), || {
        let hit = tcp(&lab, http).map(|who| who == removed).unwrap_or(true);
        clean_streak = if hit { 0 } else { clean_streak + 1 };
        clean_streak >= 20
    });
    for i in 0..40 {
        let who = tcp(&lab, http).unwrap_or_else(|e| panic!("request {i} after removal: {e}"));
        assert_ne!(who, removed, "request {i} reached the removed backend");
    }

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

    // Put it back: it starts receiving new connections again.
    lab.set_pod_ready("demo", &removed, true).unwrap_or_else(|e| panic!("{e:#}"));
    wait_until(&lab, &format!("{removed} receives connections again"), || {
        tcp(&lab, http).is_ok_and(|who| who == removed)
    });
}

#[test]
fn deleting_the_service_stops_the_translation() {
    let lab = lab();
    let (http, dns) = (vip(&lab, 80), vip(&lab, 53));
    wait_until(&lab, "the ClusterIP answers over TCP", || tcp(&lab, http).is_ok());
    assert!(udp(&lab, dns).is_ok(), "UDP through the ClusterIP before the delete");

    lab.delete("Service", "demo", "web").unwrap_or_else(|e| panic!("{e:#}"));
    wait_until(&lab, "the ClusterIP stops answering", || tcp(&lab, http).is_err());
    for i in 0..5 {
        assert!(tcp(&lab, http).is_err(), "TCP request {i} still answered after the delete");
        assert!(udp(&lab, dns).is_err(), "UDP request {i} still answered after the delete");
    }
    // The pods themselves are still reachable directly: only the translation is gone.
    let web0 = lab.pod_ip("demo", "web-0").expect("web-0 has an IP");
    assert_eq!(tcp(&lab, SocketAddrV4::new(web0, 8080)).expect("direct to web-0"), "web-0");
    let _: Ipv4Addr = web0;
}

#[test]
fn a_manifest_that_does_not_parse_is_reported_and_the_programmed_state_stays() {
    let lab = lab();
    let http = vip(&lab, 80);
    wait_until(&lab, "the ClusterIP answers over TCP", || tcp(&lab, http).is_ok());

    let broken = lab.manifests_dir().join("broken.yaml");
    std::fs::write(&broken, "apiVersion: v1\nkind: Service\nmetadata:\n  name: [oops\n")
        .expect("writing a broken manifest");
    wait_until(&lab, "the agent reports the broken file", || {
        let log = std::fs::read_to_string(lab.log_path("agent")).unwrap_or_default();
        log.lines().any(|l| l.contains("broken.yaml") && l.contains("line"))
    });
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        seen.insert(
            tcp(&lab, http).unwrap_or_else(|e| panic!("request {i} with a broken file: {e}")),
        );
    }
    assert_eq!(seen, all_web_pods(), "the previous state must stay programmed");

    // A change made while the file is broken is not applied (the directory is read as a
    // whole), and is applied once the file is fixed.
    lab.delete("Service", "demo", "web").unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(tcp(&lab, http).is_ok(), "a partial directory was applied");
    std::fs::remove_file(&broken).expect("removing the broken manifest");
    wait_until(&lab, "the fixed directory is applied", || tcp(&lab, http).is_err());
}

/// A backend on the host network (here the node's own address, as for the `kubernetes`
/// Service): its reply is routed to the client's veth without leaving any pod, so only
/// `to_pod` on the client's veth can turn its source back into the VIP.
#[test]
fn a_host_network_backend_answers_through_the_cluster_ip() {
    let lab = lab();
    let node_ip = nodeplane_lab::naming::node_ip(lab.slot());
    let server: Vec<OsString> = vec![
        bin("NODEPLANE_LAB_BIN").into(),
        "serve".into(),
        "--name".into(),
        "the-node".into(),
        "--tcp".into(),
        "9443".into(),
        "--udp".into(),
        "9443".into(),
    ];
    let mut server =
        lab.spawn_in_node(&server, "node-server").unwrap_or_else(|e| panic!("node server: {e:#}"));
    let objects = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: demo, name: hostnet}}\n\
         spec: {{ports: [{{name: https, port: 443, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{namespace: demo, name: hostnet-1, labels: {{kubernetes.io/service-name: hostnet}}}}\n\
         addressType: IPv4\n\
         ports: [{{name: https, port: 9443, protocol: TCP}}, {{name: dns, port: 9443, protocol: UDP}}]\n\
         endpoints: [{{addresses: [\"{node_ip}\"]}}]\n"
    );
    lab.apply(&[("hostnet.yaml", objects.as_str())]).unwrap_or_else(|e| panic!("{e:#}"));
    let ip = lab.service_ip("demo", "hostnet").expect("hostnet has a ClusterIP");
    let (https, dns) = (SocketAddrV4::new(ip, 443), SocketAddrV4::new(ip, 53));
    wait_until(&lab, "the host-network backend answers over TCP", || {
        tcp(&lab, https).is_ok_and(|who| who == "the-node")
    });
    for i in 0..10 {
        assert_eq!(tcp(&lab, https).unwrap_or_else(|e| panic!("TCP {i}: {e}")), "the-node");
        assert_eq!(udp(&lab, dns).unwrap_or_else(|e| panic!("UDP {i}: {e}")), "the-node");
    }
    let _ = server.kill();
    let _ = server.wait();
}
