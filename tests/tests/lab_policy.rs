//! NetworkPolicy end to end in the netns lab, as a truth table: three namespaces (x, y, z)
//! of three pods (a, b, c), every pod serving TCP and UDP on ports 80 and 81, the real
//! agent reading the lab's manifests, and real sockets probing every (from, to, port).
//!
//! ```text
//!  scenario ──policy YAML──▶ Lab ──cluster.yaml──▶ agent ──maps──▶ datapath (lxc… veths)
//!     │                                                                  ▲
//!     └── expectation: fn(from, to, port) -> bool ──▶ Matrix ◀── probe ──┘ (every pod, the node)
//! ```
//!
//! The expected [`Matrix`] of each step comes from a few lines of plain Rust in the test
//! (what the policies mean, written from the Kubernetes docs), never from the code under
//! test. [`Harness::converge`] probes until the datapath agrees or the deadline passes,
//! then prints both tables and their difference, like the upstream e2e "reachability"
//! tables.
//!
//! What every expectation takes for granted (see [`expect`]):
//! 1. a pod always reaches itself (through its own IP the traffic stays on its loopback);
//! 2. the node (kubelet) always reaches every pod: ingress from the node is allowed;
//! 3. a probe of the Service `x/web` is allowed exactly when the same probe of its
//!    backend x/a on the target port is (policy judges the translated flow).
//!
//! The lab, the matrix and the harness are in `nodeplane_tests::netpol` (shared with
//! `lab_flowlog`). Needs root and the binaries built by `cargo xtask test`
//! (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::time::Instant;

use nodeplane_tests::netpol::{
    Harness, PodId, Port, XA, XB, YB, YC, assert_reachability, everything, expect, metrics_port,
    pod,
};

// --- policies ---

const DENY_INGRESS_X: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

const DENY_EGRESS_Y: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: y}
spec: {podSelector: {}, policyTypes: [Egress]}
";

/// x/a accepts only namespaces labelled `ns: <from_ns>`.
fn x_a_from_namespace(from_ns: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: a-from-namespace, namespace: x}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{ns: {from_ns}}}}}
"
    )
}

// --- the scenarios ---

#[test]
fn baseline_every_pod_and_the_node_reach_every_pod_and_the_service() {
    let begin = Instant::now();
    let h = Harness::start();
    // Converged once in start; a second round shows it is stable, and how long a round of
    // all-allowed probes takes.
    let round = Instant::now();
    let probed = h.probe();
    eprintln!("one round of {} probes: {:?}", probed.matrix.cells.len(), round.elapsed());
    assert_reachability("baseline, again", &expect(everything), &probed);
    eprintln!("baseline test: {:?}", begin.elapsed());
}

#[test]
fn default_deny_ingress_isolates_namespace_x_except_from_the_node() {
    let h = Harness::start();
    h.apply(DENY_INGRESS_X);
    h.step("default deny ingress in x", &expect(|_, to, _| to.ns != "x"));
}

#[test]
fn default_deny_egress_isolates_namespace_y() {
    let h = Harness::start();
    h.apply(DENY_EGRESS_Y);
    h.step("default deny egress in y", &expect(|from, _, _| from.ns != "y"));
}

#[test]
fn a_namespace_selector_allows_one_namespace_and_an_edit_in_place_switches_it() {
    let h = Harness::start();
    h.apply(&x_a_from_namespace("y"));
    h.step("x/a from namespace y", &expect(|from, to, _| to != XA || from.ns == "y"));
    // The same policy, edited: now only z.
    h.apply(&x_a_from_namespace("z"));
    h.step("x/a from namespace z (edited)", &expect(|from, to, _| to != XA || from.ns == "z"));
}

#[test]
fn selectors_in_one_peer_are_anded_and_separate_peers_are_ored() {
    let h = Harness::start();
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and-or, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
",
    );
    // One peer: pods labelled b in namespaces labelled y, i.e. y/b alone.
    h.step("AND: y/b only", &expect(|from, to, _| to != XA || from == YB));
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and-or, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}
",
    );
    // Two peers: all of y, or pods labelled b in the policy's own namespace (x/b).
    h.step(
        "OR: all of y, and x/b",
        &expect(|from, to, _| to != XA || from.ns == "y" || from == XB),
    );
}

#[test]
fn a_named_port_resolves_on_each_destination_pod() {
    let h = Harness::start();
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: metrics-only, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - {protocol: TCP, port: metrics}
    - {protocol: UDP, port: metrics-udp}
",
    );
    // `metrics` is 81 on x/a and x/b but 80 on x/c.
    h.step(
        "x accepts only its pods' metrics ports",
        &expect(|_, to, port| to.ns != "x" || port.number() == metrics_port(to)),
    );
}

#[test]
fn end_port_allows_a_range_and_narrowing_it_denies_the_rest() {
    let h = Harness::start();
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - {protocol: TCP, port: 80, endPort: 81}
    - {protocol: UDP, port: 81, endPort: 90}
",
    );
    h.step(
        "x/a on TCP 80-81 and UDP 81-90",
        &expect(|_, to, port| to != XA || port != Port::Udp80),
    );
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - {protocol: TCP, port: 80}
",
    );
    h.step("x/a on TCP 80 only", &expect(|_, to, port| to != XA || port == Port::Tcp80));
}

#[test]
fn an_ip_block_except_carves_one_pod_out_for_ingress_and_for_egress() {
    let h = Harness::start();
    let cidr = h.pod_cidr();
    h.apply(&format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: pods-but-y-b, namespace: x}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  ingress:
  - from:
    - ipBlock: {{cidr: {cidr}, except: [{}/32]}}
",
        h.ip(YB)
    ));
    h.step("x/a from the pod CIDR except y/b", &expect(|from, to, _| to != XA || from != YB));
    h.apply(&format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: pods-but-x-b, namespace: y}}
spec:
  podSelector: {{matchLabels: {{pod: c}}}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {{cidr: {cidr}, except: [{}/32]}}
",
        h.ip(XB)
    ));
    // y/c's egress to the Service is judged on the backend's address, inside the CIDR.
    h.step(
        "and y/c to the pod CIDR except x/b",
        &expect(|from, to, _| (to != XA || from != YB) && (from != YC || to != XB)),
    );
}

#[test]
fn relabeling_pods_changes_who_is_isolated_and_who_is_a_peer() {
    let h = Harness::start();
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: guard, namespace: x}
spec:
  podSelector: {matchLabels: {role: guarded}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {role: friend}}
",
    );
    // No pod is labelled guarded yet: nothing is isolated.
    h.step("guard selects nobody", &expect(everything));
    h.label("pod", "x", "b", &[("role", Some("guarded"))]);
    h.step("x/b guarded, no friends", &expect(|_, to, _| to != XB));
    h.label("pod", "z", "c", &[("role", Some("friend"))]);
    h.step("z/c is a friend of x/b", &expect(|from, to, _| to != XB || from == pod("z", "c")));
    h.label("pod", "x", "b", &[("role", None)]);
    h.step("x/b no longer guarded", &expect(everything));
}

#[test]
fn relabeling_namespaces_changes_which_namespace_is_a_peer() {
    let h = Harness::start();
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: team-blue, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: blue}}
",
    );
    h.step("no namespace is blue", &expect(|_, to, _| to != XA));
    h.label("namespace", "", "z", &[("team", Some("blue"))]);
    h.step("z is blue", &expect(|from, to, _| to != XA || from.ns == "z"));
    h.label("namespace", "", "z", &[("team", None)]);
    h.label("namespace", "", "y", &[("team", Some("blue"))]);
    h.step("y is blue, z is not", &expect(|from, to, _| to != XA || from.ns == "y"));
}

#[test]
fn deleting_policies_restores_reachability() {
    let h = Harness::start();
    h.apply(&format!("{DENY_INGRESS_X}---\n{DENY_EGRESS_Y}"));
    h.step(
        "deny ingress in x and egress in y",
        &expect(|from, to, _| to.ns != "x" && from.ns != "y"),
    );
    h.delete_policy("y", "deny-egress");
    h.step("egress policy deleted", &expect(|_, to, _| to.ns != "x"));
    h.delete_policy("x", "deny-ingress");
    h.step("both deleted", &expect(everything));
}

#[test]
fn a_policy_through_a_cluster_ip_follows_the_backends_target_port() {
    let h = Harness::start();
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-http-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 80}]
",
    );
    // svc/web:8080 targets x/a:80 (allowed), :8081 targets x/a:81 (denied).
    let a_http_only = |to: PodId, port: Port| to != XA || port.number() == 80;
    h.step("x/a and svc/web on 80 only", &expect(|_, to, port| a_http_only(to, port)));
    h.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-to-a-http, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}
      podSelector: {matchLabels: {pod: a}}
    ports: [{protocol: TCP, port: 80}]
",
    );
    // y's egress is judged after translation: svc/web:8080 is x/a:80 over TCP.
    h.step(
        "and y may only reach x/a on TCP 80, through svc/web too",
        &expect(|from, to, port| {
            a_http_only(to, port) && (from.ns != "y" || (to == XA && port == Port::Tcp80))
        }),
    );
}
