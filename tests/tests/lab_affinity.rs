//! `sessionAffinity: ClientIP` end to end: the real agent (file source) in the lab's node
//! namespace, real TCP connections from a client pod to a Service with a 2 s
//! `timeoutSeconds`, and to a Service without affinity over the same three pods.
//! Needs root and the binaries built by `cargo xtask test`.
use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use nodeplane_tests::cluster::Cluster;

const TIMEOUT_S: u64 = 2;

const YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec:
  containers:
  - {name: web, image: nodeplane/echo, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, labels: {app: web}}
spec:
  containers:
  - {name: web, image: nodeplane/echo, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: demo, labels: {app: web}}
spec:
  containers:
  - {name: web, image: nodeplane/echo, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  containers:
  - {name: client, image: nodeplane/client}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: demo}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
"#;

fn vip(cluster: &Cluster, service: &str) -> SocketAddrV4 {
    let ip = cluster.service_ip("demo", service).unwrap_or_else(|e| panic!("{service}: {e}"));
    SocketAddrV4::new(ip, 80)
}

/// One new TCP connection from the client pod: the name of the pod that answered.
fn ask(cluster: &Cluster, to: SocketAddrV4) -> std::io::Result<String> {
    cluster.tcp_ask("demo", "client", to, Duration::from_secs(2))
}

#[test]
fn one_client_sticks_to_one_backend_until_the_timeout_then_may_move() {
    let cluster = Cluster::up(&[("affinity.yaml", YAML)], &[]);
    let (sticky, plain) = (vip(&cluster, "sticky"), vip(&cluster, "plain"));
    cluster.wait_until("both Services answer", Duration::from_secs(20), || {
        ask(&cluster, sticky).is_ok() && ask(&cluster, plain).is_ok()
    });

    // Without affinity the same client reaches more than one pod (30 connections on one
    // pod by chance: 3 * (1/3)^30): the sticky assertions below are not vacuous.
    let spread: BTreeSet<String> = (0..30)
        .map(|i| ask(&cluster, plain).unwrap_or_else(|e| panic!("plain {i}: {e}")))
        .collect();
    assert!(spread.len() > 1, "without affinity every connection went to {spread:?}");

    // With it, every new connection goes to one pod: 30 at once, then some spaced 0.8 s
    // apart for longer than the timeout (each new connection refreshes it).
    let first = ask(&cluster, sticky).unwrap_or_else(|e| panic!("sticky: {e}"));
    for i in 0..30 {
        let who = ask(&cluster, sticky).unwrap_or_else(|e| panic!("sticky {i}: {e}"));
        assert_eq!(who, first, "connection {i} left the client's backend");
    }
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(800));
        let who = ask(&cluster, sticky).unwrap_or_else(|e| panic!("spaced {i}: {e}"));
        assert_eq!(who, first, "spaced connection {i} left the client's backend");
    }

    // Idle past the timeout, the next connection picks at random: within 12 rounds the
    // client reaches another pod (12 times the same: (1/3)^12).
    let start = Instant::now();
    let mut current = first.clone();
    for round in 0..12 {
        std::thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 500));
        let who = ask(&cluster, sticky).unwrap_or_else(|e| panic!("round {round}: {e}"));
        if who != current {
            eprintln!("moved from {current} to {who} after {:?}", start.elapsed());
            return;
        }
        current = who;
    }
    panic!("the client stayed on {first} over 12 expired affinities");
}
