//! Root-only: builds real labs out of network namespaces. Run as root (`cargo test`).
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::SocketAddrV4,
    path::PathBuf,
    time::Duration,
};

use nodeplane_lab::{HOST_VETH_PREFIX, Kind, Lab, LabConfig, netns};

const TIMEOUT: Duration = Duration::from_secs(3);

fn config() -> LabConfig {
    LabConfig::from_env().unwrap_or_else(|_| LabConfig::new(env!("CARGO_BIN_EXE_nodeplane-lab")))
}

fn demo() -> [(&'static str, &'static str); 1] {
    [("demo.yaml", include_str!("../examples/demo.yaml"))]
}

/// Asserts that nothing of slot `slot` is left: no netns, no slot file, no state dir.
fn assert_gone(slot: u8, state_dir: PathBuf) {
    let left = netns::list(&format!("np{slot}-")).expect("list netns");
    assert!(left.is_empty(), "netns left behind: {left:?}");
    assert!(!state_dir.exists(), "{} left behind", state_dir.display());
    let slot_file = PathBuf::from(nodeplane_lab::slot::SLOT_DIR).join(slot.to_string());
    assert!(!slot_file.exists(), "{} left behind", slot_file.display());
}

#[test]
fn client_reaches_web_1_by_pod_ip_and_drop_cleans_up() {
    let lab = Lab::up(config(), &demo()).expect("lab up");
    let (slot, state_dir) = (lab.slot(), lab.state_dir().to_path_buf());
    let web1 = lab.pod_ip("demo", "web-1").expect("web-1 has an IP");

    let http = SocketAddrV4::new(web1, 8080);
    assert_eq!(lab.tcp_ask("demo", "client", http, TIMEOUT).expect("tcp from client"), "web-1");
    let dns = SocketAddrV4::new(web1, 5353);
    assert_eq!(lab.udp_ask("demo", "client", dns, TIMEOUT).expect("udp from client"), "web-1");

    // One connection, several exchanges; the stream stays in the client's netns.
    let mut stream = lab.tcp_connect("demo", "client", http, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    for _ in 0..3 {
        assert_eq!(line, "web-1\n");
        stream.write_all(b"again\n").expect("write");
        line.clear();
        reader.read_line(&mut line).expect("reply");
    }
    drop((stream, reader));

    // The agent's inputs: manifests with the derived slice, interfaces with the prefix.
    let manifest = fs::read_to_string(lab.manifests_dir().join("cluster.yaml")).expect("manifest");
    assert!(manifest.contains("kind: EndpointSlice"), "{manifest}");
    let links = std::process::Command::new("ip")
        .args(["-n", &lab.node_netns(), "-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.matches(&format!(": {HOST_VETH_PREFIX}")).count(), 4, "{links}");

    drop(lab);
    assert_gone(slot, state_dir);
}

#[test]
fn apply_and_delete_change_pods_in_place() {
    let lab = Lab::up(config(), &demo()).expect("lab up");
    let (slot, state_dir) = (lab.slot(), lab.state_dir().to_path_buf());
    let web0 = lab.pod_ip("demo", "web-0").expect("web-0");

    let extra = "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: demo, labels: {app: web}}\n\
                 spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n";
    lab.apply(&[("extra.yaml", extra)]).expect("apply extra");
    lab.apply(&demo()).expect("re-apply demo");
    assert_eq!(lab.pod_ip("demo", "web-0").expect("web-0"), web0, "IP kept across applies");
    let extra_ip = lab.pod_ip("demo", "extra").expect("extra");
    let extra_http = SocketAddrV4::new(extra_ip, 8080);
    assert_eq!(lab.tcp_ask("demo", "client", extra_http, TIMEOUT).expect("reach extra"), "extra");

    lab.set_pod_ready("demo", "extra", false).expect("not ready");
    let manifest = fs::read_to_string(lab.manifests_dir().join("cluster.yaml")).expect("manifest");
    assert!(manifest.contains("ready: false"), "{manifest}");

    lab.delete(Kind::Pod, "demo", "extra").expect("delete extra");
    assert!(!netns::exists(&lab.pod_netns("demo", "extra")));
    let gone = lab.tcp_ask("demo", "client", extra_http, TIMEOUT);
    assert!(gone.is_err(), "extra's address still answers: {gone:?}");
    let out =
        lab.exec("demo", "client", &["ip", "-4", "-o", "addr", "show", "eth0"]).expect("exec");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&lab.pod_ip("demo", "client").expect("ip").to_string())
    );

    // Kinds by kubectl name work too; the Service's slice goes with it.
    lab.delete("svc", "demo", "web").expect("delete service");
    let manifest = fs::read_to_string(lab.manifests_dir().join("cluster.yaml")).expect("manifest");
    assert!(!manifest.contains("kind: EndpointSlice"), "{manifest}");

    lab.down().expect("down");
    assert_gone(slot, state_dir);
}

/// Three nodes on an underlay, no agent: pods reach each other across nodes by pod IP, a
/// pod applied later lands on its node, the external client reaches node IPs only, and
/// every netns goes at teardown.
#[test]
fn underlay_lab_routes_pods_between_nodes_and_keeps_the_external_client_out() {
    let topology = nodeplane_lab::Topology::with_nodes(3).expect("three nodes");
    let docs = [("multinode.yaml", include_str!("../examples/multinode.yaml"))];
    let lab = Lab::up_with(config(), topology, &docs).expect("lab up");
    let (slot, state_dir) = (lab.slot(), lab.state_dir().to_path_buf());
    assert_eq!(lab.pod_node("demo", "web-1").expect("web-1").name(), "lab-node1");
    let web1 = SocketAddrV4::new(lab.pod_ip("demo", "web-1").expect("web-1"), 8080);
    assert_eq!(lab.tcp_ask("demo", "client", web1, TIMEOUT).expect("across nodes"), "web-1");
    let web0 = SocketAddrV4::new(lab.pod_ip("demo", "web-0").expect("web-0"), 5353);
    assert_eq!(lab.udp_ask("demo", "web-2", web0, TIMEOUT).expect("and back"), "web-0");

    // A pod on the third node: wired to that node's netns, reachable from the first.
    let third = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-9, namespace: demo}\n\
                 spec: {nodeName: lab-node2, containers: [{name: c, ports: [{containerPort: 8080}]}]}\n";
    lab.apply(&[("third.yaml", third)]).expect("apply on lab-node2");
    let node2 = lab.node(2).expect("node 2");
    let links = std::process::Command::new("ip")
        .args(["-n", &node2.netns(), "-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.matches(&format!(": {HOST_VETH_PREFIX}")).count(), 1, "{links}");
    let web9 = SocketAddrV4::new(lab.pod_ip("demo", "web-9").expect("web-9"), 8080);
    assert_eq!(lab.tcp_ask("demo", "client", web9, TIMEOUT).expect("to node 2"), "web-9");
    let moved = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-9, namespace: demo}\n\
                 spec: {nodeName: lab-node1, containers: [{name: c}]}\n";
    assert!(lab.apply(&[("moved.yaml", moved)]).is_err(), "a pod cannot change nodes");

    // The external client: node IPs yes, pods no (it has no route to them).
    for node in lab.nodes() {
        let ip = node.ip();
        let reached = lab.in_external(|| {
            std::net::TcpStream::connect_timeout(&SocketAddrV4::new(ip, 9).into(), TIMEOUT)
        });
        let err = reached.expect("enter").expect_err("nothing listens on port 9");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{}: {err}", node.name());
    }
    let to_pod = lab.in_external(|| std::net::TcpStream::connect_timeout(&web1.into(), TIMEOUT));
    let err = to_pod.expect("enter").expect_err("a pod from outside");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");

    drop(lab);
    assert_gone(slot, state_dir);
}
