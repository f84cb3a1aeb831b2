//! The lab on two nodes: node netns on an underlay bridge, each routing the other's pod
//! CIDR, an agent on each node, an external client on the underlay and an internet behind
//! the router (lab/src/topology.rs). Real TCP and UDP sockets throughout.
//!
//! Placement (lab/examples/multinode.yaml plus `client1`):
//!
//! ```text
//!   lab-node  (np{N}-node):  client, web-0
//!   lab-node1 (np{N}-node1): client1, web-1, web-2
//! ```
//!
//! Egress is masqueraded: the internet sees the pod's node address, so the router's routes
//! to the pod CIDRs (`Lab::set_egress_return_routes`) are not needed.
//! Needs root and the binaries (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::{collections::BTreeSet, io, net::SocketAddrV4, time::Duration};

use nodeplane_lab::{Lab, netns, server};
use nodeplane_tests::multinode::{MultiCluster, PeerEcho};

const MULTINODE: &str = include_str!("../../lab/examples/multinode.yaml");
/// A second client, on the second node.
const CLIENT1: &str = "apiVersion: v1\nkind: Pod\n\
    metadata: {name: client1, namespace: demo, labels: {app: client}}\n\
    spec: {nodeName: lab-node1, containers: [{name: client}]}\n";
const TIMEOUT: Duration = Duration::from_secs(2);
/// For what must not answer: long enough for an answer on a quiet lab, short enough to
/// ask several times.
const SILENCE: Duration = Duration::from_millis(500);
const CONVERGE: Duration = Duration::from_secs(20);
/// Connections per client in the balancing checks: missing one of three backends by
/// chance is 3 · (2/3)^60 ≈ 10⁻¹⁰.
const REQUESTS: usize = 60;

fn cluster() -> MultiCluster {
    let lab = MultiCluster::up(2, &[("multinode.yaml", MULTINODE), ("client1.yaml", CLIENT1)], &[]);
    lab.wait_ready(CONVERGE);
    lab
}

fn pod_addr(lab: &Lab, pod: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(lab.pod_ip("demo", pod).unwrap_or_else(|e| panic!("{e:#}")), port)
}

fn vip(lab: &Lab, service: &str, port: u16) -> SocketAddrV4 {
    let ip = lab.service_ip("demo", service).unwrap_or_else(|e| panic!("{e:#}"));
    SocketAddrV4::new(ip, port)
}

fn tcp(lab: &Lab, from: &str, to: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    lab.tcp_ask("demo", from, to, timeout)
}

fn udp(lab: &Lab, from: &str, to: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    lab.udp_ask("demo", from, to, timeout)
}

fn node_of(lab: &Lab, pod: &str) -> u8 {
    lab.pod_node("demo", pod).unwrap_or_else(|e| panic!("{e:#}")).index()
}

fn all_web_pods() -> BTreeSet<String> {
    ["web-0", "web-1", "web-2"].into_iter().map(String::from).collect()
}

#[test]
fn pods_are_placed_by_node_name_and_reach_each_other_across_nodes() {
    let lab = cluster();
    let placed: Vec<u8> =
        ["client", "web-0", "client1", "web-1", "web-2"].iter().map(|p| node_of(&lab, p)).collect();
    assert_eq!(placed, [0, 0, 1, 1, 1]);
    let node1 = lab.node(1).expect("node 1");
    let web1 = lab.pod_ip("demo", "web-1").expect("web-1");
    assert_eq!(node1.pod_cidr(), format!("10.244.{}.64/26", lab.slot()));
    assert!((64..128).contains(&web1.octets()[3]), "{web1} is not in {}", node1.pod_cidr());

    // Both directions between the nodes, TCP and UDP, and on one node for comparison.
    for (from, to) in
        [("client", "web-1"), ("web-2", "web-0"), ("client1", "web-0"), ("client", "web-0")]
    {
        let answer = tcp(&lab, from, pod_addr(&lab, to, 8080), TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP {from} -> {to}: {e}"));
        assert_eq!(answer, to, "TCP {from} -> {to}");
        let answer = udp(&lab, from, pod_addr(&lab, to, 5353), TIMEOUT)
            .unwrap_or_else(|e| panic!("UDP {from} -> {to}: {e}"));
        assert_eq!(answer, to, "UDP {from} -> {to}");
    }

    // A pod reaching the other node's address keeps its own source address (no SNAT).
    let echo = PeerEcho::start(&node1.netns(), 7000);
    let seen = tcp(&lab, "client", SocketAddrV4::new(node1.ip(), 7000), TIMEOUT)
        .unwrap_or_else(|e| panic!("client -> node 1's address: {e}"));
    assert_eq!(seen, lab.pod_ip("demo", "client").expect("client").to_string());
    drop(echo);
}

/// The client's node keeps the conntrack entry: `from_pod` on the client's veth picks a
/// backend and rewrites the destination, the packet crosses the underlay, and the reply
/// comes back over the underlay to the client's node, where `to_pod` on the client's veth
/// turns its source back into the VIP. The backend's node never sees the VIP, so a
/// connected socket only gets its answers if the client's node reverse-translated them.
#[test]
fn clusterip_reaches_backends_on_the_other_node_and_replies_are_reverse_translated() {
    let lab = cluster();
    let (http, dns) = (vip(&lab, "web", 80), vip(&lab, "web", 53));
    for client in ["client", "client1"] {
        lab.wait_until(&format!("{client} gets answers from the ClusterIP"), CONVERGE, || {
            tcp(&lab, client, http, TIMEOUT).is_ok()
        });
        let mut tcp_seen = BTreeSet::new();
        let mut udp_seen = BTreeSet::new();
        for i in 0..REQUESTS {
            let who = tcp(&lab, client, http, TIMEOUT)
                .unwrap_or_else(|e| panic!("{client}: TCP request {i} to {http}: {e}"));
            tcp_seen.insert(who);
            let who = udp(&lab, client, dns, TIMEOUT)
                .unwrap_or_else(|e| panic!("{client}: UDP request {i} to {dns}: {e}"));
            udp_seen.insert(who);
        }
        assert_eq!(tcp_seen, all_web_pods(), "{client}: TCP reaches local and remote backends");
        assert_eq!(udp_seen, all_web_pods(), "{client}: UDP reaches local and remote backends");
    }
}

/// A backend on the other node's own address (host network there): its reply leaves that
/// node without crossing any pod veth, so only the client's node can turn it back into the
/// VIP; and the backend sees the client pod's address, untranslated.
#[test]
fn clusterip_to_a_host_network_backend_on_the_other_node() {
    let lab = cluster();
    let node1 = lab.node(1).expect("node 1");
    let _echo = PeerEcho::start(&node1.netns(), 9443);
    let objects = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: demo, name: hostnet}}\n\
         spec: {{ports: [{{name: https, port: 443, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{namespace: demo, name: hostnet-1, labels: {{kubernetes.io/service-name: hostnet}}}}\n\
         addressType: IPv4\n\
         ports: [{{name: https, port: 9443, protocol: TCP}}, {{name: dns, port: 9443, protocol: UDP}}]\n\
         endpoints: [{{addresses: [\"{}\"], nodeName: {}}}]\n",
        node1.ip(),
        node1.name()
    );
    lab.apply(&[("hostnet.yaml", objects.as_str())]).unwrap_or_else(|e| panic!("{e:#}"));
    let (https, dns) = (vip(&lab, "hostnet", 443), vip(&lab, "hostnet", 53));
    let client_ip = lab.pod_ip("demo", "client").expect("client").to_string();
    lab.wait_until("the host-network backend answers through the VIP", CONVERGE, || {
        tcp(&lab, "client", https, TIMEOUT).is_ok()
    });
    for i in 0..10 {
        let seen = tcp(&lab, "client", https, TIMEOUT).unwrap_or_else(|e| panic!("TCP {i}: {e}"));
        assert_eq!(seen, client_ip, "TCP {i}: the backend sees the client pod");
        let seen = udp(&lab, "client", dns, TIMEOUT).unwrap_or_else(|e| panic!("UDP {i}: {e}"));
        assert_eq!(seen, client_ip, "UDP {i}: the backend sees the client pod");
    }
}

#[test]
fn the_external_client_reaches_node_ips_but_not_pods_or_cluster_ips() {
    let lab = cluster();
    let external = lab.external_ip().expect("an underlay lab has an external client");
    let echoes: Vec<PeerEcho> = lab.nodes().map(|n| PeerEcho::start(&n.netns(), 7000)).collect();
    for node in lab.nodes() {
        let addr = SocketAddrV4::new(node.ip(), 7000);
        let seen = lab.in_external(|| server::tcp_ask(addr, TIMEOUT)).expect("enter");
        let seen = seen.unwrap_or_else(|e| panic!("external -> {} over TCP: {e}", node.name()));
        assert_eq!(seen, external.to_string());
        let seen = lab.in_external(|| server::udp_ask(addr, TIMEOUT)).expect("enter");
        let seen = seen.unwrap_or_else(|e| panic!("external -> {} over UDP: {e}", node.name()));
        assert_eq!(seen, external.to_string());
    }
    // No route: the pod network and the service CIDR do not exist for it.
    for (what, addr) in [
        ("a pod on the first node", pod_addr(&lab, "web-0", 8080)),
        ("a pod on the second node", pod_addr(&lab, "web-1", 8080)),
        ("the ClusterIP", vip(&lab, "web", 80)),
    ] {
        let result = lab.in_external(|| server::tcp_ask(addr, SILENCE)).expect("enter");
        let err = result.expect_err(&format!("the external client reached {what} at {addr}"));
        assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{what}: {err}");
    }
    drop(echoes);
}

#[test]
fn pods_reach_the_internet_masqueraded_with_or_without_the_return_routes() {
    let lab = cluster();
    let internet = lab.internet_ip().expect("an underlay lab has an internet");
    let _echo = PeerEcho::start(&lab.internet_netns().expect("internet"), 80);
    let addr = SocketAddrV4::new(internet, 80);
    let node_ip = |pod: &str| lab.node(node_of(&lab, pod)).expect("node").ip().to_string();

    // The internet sees each pod's node address (SNAT), so the router's routes to the pod
    // CIDRs do not matter; the nodes' own traffic is theirs either way.
    for routes in [true, false] {
        lab.set_egress_return_routes(routes).unwrap_or_else(|e| panic!("{e:#}"));
        for pod in ["client", "client1"] {
            let seen = tcp(&lab, pod, addr, TIMEOUT).unwrap_or_else(|e| panic!("{pod} TCP: {e}"));
            assert_eq!(seen, node_ip(pod), "{pod}: TCP to the internet (routes {routes})");
            let seen = udp(&lab, pod, addr, TIMEOUT).unwrap_or_else(|e| panic!("{pod} UDP: {e}"));
            assert_eq!(seen, node_ip(pod), "{pod}: UDP to the internet (routes {routes})");
        }
        for node in lab.nodes() {
            let seen = node.run(|| server::tcp_ask(addr, TIMEOUT)).expect("enter");
            let seen = seen.unwrap_or_else(|e| panic!("{} -> internet: {e}", node.name()));
            assert_eq!(seen, node.ip().to_string());
        }
    }
    lab.set_egress_return_routes(true).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Each agent knows its own pods from `spec.nodeName` and `NODE_NAME`: a pod's ingress
/// policy is enforced on its node, for peers on either node.
#[test]
fn each_node_enforces_network_policy_for_its_own_pods() {
    let lab = cluster();
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: web-http-from-clients, namespace: demo}\n\
        spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n\
        \x20 - from: [{podSelector: {matchLabels: {app: client}}}]\n\
        \x20   ports: [{protocol: TCP, port: http}]\n";
    let (web0, web1) = (pod_addr(&lab, "web-0", 8080), pod_addr(&lab, "web-1", 8080));
    assert_eq!(tcp(&lab, "web-0", web1, TIMEOUT).expect("no policy yet"), "web-1");
    lab.apply(&[("policy.yaml", policy)]).unwrap_or_else(|e| panic!("{e:#}"));
    lab.wait_until("web-0 -> web-1 is denied on node 1", CONVERGE, || {
        tcp(&lab, "web-0", web1, SILENCE).is_err()
    });
    lab.wait_until("web-1 -> web-0 is denied on node 0", CONVERGE, || {
        tcp(&lab, "web-1", web0, SILENCE).is_err()
    });
    for (from, to, allowed) in [
        ("client", "web-1", true),
        ("client1", "web-0", true),
        ("client", "web-0", true),
        ("web-0", "web-1", false),
        ("web-1", "web-0", false),
        ("web-2", "web-1", false),
    ] {
        let result =
            tcp(&lab, from, pod_addr(&lab, to, 8080), if allowed { TIMEOUT } else { SILENCE });
        match (allowed, result) {
            (true, Ok(who)) => assert_eq!(who, to),
            (false, Err(_)) => {}
            (true, Err(e)) => panic!("TCP {from} -> {to} should be allowed: {e}"),
            (false, Ok(who)) => panic!("TCP {from} -> {to} should be denied, {who} answered"),
        }
        let udp_answer = udp(&lab, from, pod_addr(&lab, to, 5353), SILENCE);
        assert!(udp_answer.is_err(), "UDP {from} -> {to} should be denied: {udp_answer:?}");
    }
}

#[test]
fn dropping_the_lab_removes_every_nodes_netns_and_pins() {
    let lab = cluster();
    let slot = lab.slot();
    let state_dir = lab.state_dir().to_path_buf();
    let pins: Vec<_> = lab.nodes().map(|n| n.bpffs_dir()).collect();
    for dir in &pins {
        assert!(dir.join("maps").is_dir(), "{} has no maps", dir.display());
    }
    let netns_before = netns::list(&format!("np{slot}-")).expect("list netns");
    for name in ["node", "node1", "underlay", "external", "internet"] {
        assert!(netns_before.contains(&format!("np{slot}-{name}")), "{name}: {netns_before:?}");
    }
    drop(lab);
    let left = netns::list(&format!("np{slot}-")).expect("list netns");
    assert!(left.is_empty(), "netns left behind: {left:?}");
    assert!(!nodeplane_lab::naming::bpffs_dir(slot).exists(), "pins left behind");
    assert!(!state_dir.exists(), "{} left behind", state_dir.display());
}
