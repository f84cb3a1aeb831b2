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
