//! Unit tests of the control-plane emulation: no root, no netns.
use std::net::Ipv4Addr;

use k8s_openapi::{
    api::{core::v1::Pod, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{Value, json};

use super::*;

const SLOT: u8 = 7;

fn obj(value: Value) -> Object {
    let text = serde_json::to_string(&value).expect("json");
    let mut objects = parse("test", &text).expect("test object parses");
    objects.pop().expect("one object")
}

/// A pod with labels and `(name, containerPort, protocol)` ports.
fn pod(ns: &str, name: &str, labels: Value, ports: &[(&str, i32, &str)]) -> Object {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "containerPort": p, "protocol": proto}))
        .collect();
    obj(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": ports}]}
    }))
}

fn with_meta(
    object: Object,
    f: impl FnOnce(&mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta),
) -> Object {
    match object {
        Object::Pod(mut p) => {
            f(&mut p.metadata);
            Object::Pod(p)
        }
        other => other,
    }
}

/// A service with a selector and ports given as JSON.
fn svc(ns: &str, name: &str, selector: Value, ports: Value) -> Object {
    obj(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "ports": ports}
    }))
}

fn svc_with_ip(name: &str, cluster_ip: &str) -> Object {
    obj(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]}
    }))
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn applied(objects: Vec<Object>) -> ControlPlane {
    let mut cp = ControlPlane::new(SLOT);
    cp.apply(objects).expect("apply");
    cp
}

fn slices_of(cp: &ControlPlane, svc: &str) -> Vec<EndpointSlice> {
    let cluster = cp.cluster().expect("cluster");
    cluster
        .endpoint_slices
        .into_iter()
        .filter(|s| {
            s.metadata.labels.as_ref().and_then(|l| l.get(slices::SERVICE_NAME_LABEL))
                == Some(&svc.to_string())
        })
        .collect()
}

/// `(slice name, [(port name, port, protocol)], [(pod, ready, serving, terminating)])`
type SliceView = (String, Vec<(String, i32, String)>, Vec<(String, bool, bool, bool)>);

fn view(slices: &[EndpointSlice]) -> Vec<SliceView> {
    slices
        .iter()
        .map(|s| {
            let ports = s.ports.iter().flatten();
            let ports = ports
                .map(|p| {
                    (
                        p.name.clone().unwrap_or_default(),
                        p.port.unwrap_or(0),
                        p.protocol.clone().unwrap_or_default(),
                    )
                })
                .collect();
            let endpoints = s
                .endpoints
                .iter()
                .map(|e| {
                    let c = e.conditions.clone().unwrap_or_default();
                    let pod =
                        e.target_ref.as_ref().and_then(|r| r.name.clone()).unwrap_or_default();
                    (
                        pod,
                        c.ready == Some(true),
                        c.serving == Some(true),
                        c.terminating == Some(true),
                    )
                })
                .collect();
            (s.metadata.name.clone().unwrap_or_default(), ports, endpoints)
        })
        .collect()
}

fn s(v: &str) -> String {
    v.to_string()
}

// ---- addresses ----

#[test]
fn pod_ips_start_at_2_and_survive_reapply() {
    let mut cp = applied(vec![pod("a", "p0", json!({}), &[]), pod("a", "p1", json!({}), &[])]);
    assert_eq!(cp.pod_ip(&key("a", "p0")), Some(Ipv4Addr::new(10, 244, SLOT, 2)));
    assert_eq!(cp.pod_ip(&key("a", "p1")), Some(Ipv4Addr::new(10, 244, SLOT, 3)));
    // Replacing p0 (new labels) keeps its address.
    cp.apply([pod("a", "p0", json!({"x": "y"}), &[])]).expect("reapply");
    assert_eq!(cp.pod_ip(&key("a", "p0")), Some(Ipv4Addr::new(10, 244, SLOT, 2)));
}

#[test]
fn freed_pod_ips_are_not_reused() {
    let mut cp = applied(vec![pod("a", "p0", json!({}), &[])]);
    cp.delete(Kind::Pod, &key("a", "p0")).expect("delete");
    cp.apply([pod("a", "p0", json!({}), &[]), pod("a", "p1", json!({}), &[])]).expect("apply");
    assert_eq!(cp.pod_ip(&key("a", "p0")), Some(Ipv4Addr::new(10, 244, SLOT, 3)));
    assert_eq!(cp.pod_ip(&key("a", "p1")), Some(Ipv4Addr::new(10, 244, SLOT, 4)));
}

#[test]
fn pod_ips_run_out_after_253_and_the_failed_apply_changes_nothing() {
    let pods = (0..253).map(|i| pod("a", &format!("p{i}"), json!({}), &[])).collect();
    let mut cp = applied(pods);
    assert_eq!(cp.pod_ip(&key("a", "p252")), Some(Ipv4Addr::new(10, 244, SLOT, 254)));
    let before = cp.clone();
    let err = cp.apply([pod("a", "one-more", json!({}), &[])]).expect_err("exhausted");
    assert!(matches!(err, ControlPlaneError::PodIpsExhausted { .. }), "{err}");
    assert_eq!(cp, before);
}

#[test]
fn cluster_ips_allocated_from_10_and_stable() {
    let mut cp = applied(vec![
        svc("a", "s0", json!({}), json!([{"port": 80}])),
        svc("a", "s1", json!({}), json!([])),
    ]);
    assert_eq!(cp.service_ip(&key("a", "s0")), Some(Ipv4Addr::new(10, 96, SLOT, 10)));
    assert_eq!(cp.service_ip(&key("a", "s1")), Some(Ipv4Addr::new(10, 96, SLOT, 11)));
    cp.apply([svc("a", "s0", json!({}), json!([{"port": 81}]))]).expect("reapply");
    assert_eq!(cp.service_ip(&key("a", "s0")), Some(Ipv4Addr::new(10, 96, SLOT, 10)));
}

#[test]
fn requested_cluster_ip_is_kept_and_skipped_by_the_allocator() {
    let cp = applied(vec![
        svc_with_ip("fixed", "10.96.7.11"),
        svc_with_ip("a", ""),
        svc_with_ip("b", ""),
    ]);
    assert_eq!(cp.service_ip(&key("default", "fixed")), Some(Ipv4Addr::new(10, 96, SLOT, 11)));
    assert_eq!(cp.service_ip(&key("default", "a")), Some(Ipv4Addr::new(10, 96, SLOT, 10)));
    assert_eq!(cp.service_ip(&key("default", "b")), Some(Ipv4Addr::new(10, 96, SLOT, 12)));
}

#[test]
fn requested_cluster_ip_in_use_or_invalid_is_rejected() {
    let mut cp = applied(vec![svc_with_ip("a", "")]);
    let err = cp.apply([svc_with_ip("b", "10.96.7.10")]).expect_err("in use");
    assert!(
        matches!(&err, ControlPlaneError::ClusterIpInUse { owner, .. } if owner == &key("default", "a")),
        "{err}"
    );
    let err = cp.apply([svc_with_ip("c", "10.96.7")]).expect_err("invalid");
    assert!(matches!(err, ControlPlaneError::InvalidClusterIp { .. }), "{err}");
    // Re-applying a service with its own address is not a conflict.
    cp.apply([svc_with_ip("a", "10.96.7.10")]).expect("same owner");
}

#[test]
fn headless_service_gets_no_cluster_ip() {
    let cp = applied(vec![svc_with_ip("h", "None")]);
    assert_eq!(cp.service_ip(&key("default", "h")), None);
    let cluster = cp.cluster().expect("cluster");
    let spec = cluster.services[0].spec.clone().expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.cluster_ips, Some(vec![s("None")]));
}

#[test]
fn services_show_cluster_ips_families_and_defaults() {
    let cp = applied(vec![svc("a", "s", json!({}), json!([{"name": "http", "port": 80}]))]);
    let spec = cp.cluster().expect("cluster").services[0].spec.clone().expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.7.10"));
    assert_eq!(spec.cluster_ips, Some(vec![s("10.96.7.10")]));
    assert_eq!(spec.ip_families, Some(vec![s("IPv4")]));
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(port.target_port, Some(IntOrString::Int(80)));
}

// ---- pods, node, namespaces ----

#[test]
fn pods_are_scheduled_running_and_ready_unless_annotated() {
    let not_ready = with_meta(pod("a", "p1", json!({}), &[]), |m| {
        m.annotations = Some([(READY_ANNOTATION.to_string(), s("false"))].into());
    });
    let cp = applied(vec![pod("a", "p0", json!({}), &[]), not_ready]);
    let cluster = cp.cluster().expect("cluster");
    let status = |p: &Pod| p.status.clone().expect("status");
    let ready = |p: &Pod| status(p).conditions.expect("conditions")[0].status.clone();
    let p0 = &cluster.pods[0];
    assert_eq!(p0.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("lab-node"));
    assert_eq!(status(p0).phase.as_deref(), Some("Running"));
    assert_eq!(status(p0).pod_ip.as_deref(), Some("10.244.7.2"));
    assert_eq!(status(p0).host_ip.as_deref(), Some("10.244.7.1"));
    assert_eq!(ready(p0), "True");
    assert_eq!(ready(&cluster.pods[1]), "False");
}

#[test]
fn node_and_namespaces_are_derived() {
    let cp = applied(vec![pod("demo", "p", json!({}), &[])]);
    let cluster = cp.cluster().expect("cluster");
    let spec = cluster.node.spec.clone().expect("node spec");
    assert_eq!(cluster.node.metadata.name.as_deref(), Some("lab-node"));
    assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.7.0/24"));
    let addresses = cluster.node.status.clone().and_then(|s| s.addresses).expect("addresses");
    assert!(addresses.iter().any(|a| a.type_ == "InternalIP" && a.address == "10.244.7.1"));
    let names: Vec<_> = cluster.namespaces.iter().filter_map(|n| n.metadata.name.clone()).collect();
    assert_eq!(names, ["default", "demo"]);
}

#[test]
fn deleting_a_namespace_deletes_its_objects() {
    let mut cp = applied(vec![
        pod("a", "p", json!({}), &[]),
        svc("a", "s", json!({}), json!([])),
        pod("b", "p", json!({}), &[]),
    ]);
    cp.delete(Kind::Namespace, &key("", "a")).expect("delete ns");
    assert_eq!(cp.pods().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [key("b", "p")]);
    assert_eq!(cp.services().count(), 0);
    let err = cp.delete(Kind::Pod, &key("a", "p")).expect_err("gone");
    assert!(matches!(err, ControlPlaneError::NotFound { kind: Kind::Pod, .. }), "{err}");
}

#[test]
fn set_pod_ready_flips_the_condition() {
    let mut cp = applied(vec![
        pod("a", "p", json!({"app": "w"}), &[]),
        svc("a", "s", json!({"app": "w"}), json!([])),
    ]);
    cp.set_pod_ready(&key("a", "p"), false).expect("not ready");
    assert_eq!(view(&slices_of(&cp, "s"))[0].2, [(s("p"), false, false, false)]);
    cp.set_pod_ready(&key("a", "p"), true).expect("ready");
    assert_eq!(view(&slices_of(&cp, "s"))[0].2, [(s("p"), true, true, false)]);
    assert!(cp.set_pod_ready(&key("a", "nope"), true).is_err());
}

#[test]
fn bad_names_and_netns_clashes_are_rejected() {
    let mut cp = ControlPlane::new(SLOT);
    let err = cp.apply([pod("a", "Web_0", json!({}), &[])]).expect_err("bad name");
    assert!(matches!(err, ControlPlaneError::InvalidName { .. }), "{err}");
    let err = cp
        .apply([pod("a-b", "c", json!({}), &[]), pod("a", "b-c", json!({}), &[])])
        .expect_err("clash");
    assert!(matches!(err, ControlPlaneError::NetnsClash { .. }), "{err}");
}

// ---- EndpointSlices ----

const HTTP_DNS: &[(&str, i32, &str)] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

#[test]
fn selector_matches_labels_within_the_namespace_only() {
    let cp = applied(vec![
        pod("a", "match", json!({"app": "web", "extra": "x"}), &[]),
        pod("a", "wrong-label", json!({"app": "db"}), &[]),
        pod("a", "no-labels", json!({}), &[]),
        pod("b", "other-ns", json!({"app": "web"}), &[]),
        svc("a", "web", json!({"app": "web"}), json!([{"name": "http", "port": 80}])),
    ]);
    let expected =
        vec![(s("web-0"), vec![(s("http"), 80, s("TCP"))], vec![(s("match"), true, true, false)])];
    assert_eq!(view(&slices_of(&cp, "web")), expected);
}

#[test]
fn named_target_port_resolves_per_pod_and_groups_slices() {
    let cp = applied(vec![
        pod("a", "w0", json!({"app": "web"}), HTTP_DNS),
        pod("a", "w1", json!({"app": "web"}), &[("http", 9090, "TCP"), ("dns", 5353, "UDP")]),
        // Lacks `http`: an endpoint for dns only.
        pod("a", "w2", json!({"app": "web"}), &[("dns", 5353, "UDP")]),
        // Has `http` but as UDP: names match only with the ServicePort's protocol.
        pod("a", "w3", json!({"app": "web"}), &[("http", 8080, "UDP"), ("dns", 5353, "UDP")]),
        svc(
            "a",
            "web",
            json!({"app": "web"}),
            json!([
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}
            ]),
        ),
    ]);
    let dns = (s("dns"), 5353, s("UDP"));
    let expected = vec![
        (
            s("web-0"),
            vec![dns.clone()],
            vec![(s("w2"), true, true, false), (s("w3"), true, true, false)],
        ),
        (
            s("web-1"),
            vec![dns.clone(), (s("http"), 8080, s("TCP"))],
            vec![(s("w0"), true, true, false)],
        ),
        (s("web-2"), vec![dns, (s("http"), 9090, s("TCP"))], vec![(s("w1"), true, true, false)]),
    ];
    // Ports inside a slice keep ServicePort order (http before dns); compare as sets.
    let mut got = view(&slices_of(&cp, "web"));
    for (_, ports, _) in &mut got {
        ports.sort();
    }
    assert_eq!(got, expected);
}

#[test]
fn int_and_absent_target_ports() {
    let cp = applied(vec![
        pod("a", "w0", json!({"app": "web"}), &[]),
        svc(
            "a",
            "web",
            json!({"app": "web"}),
            json!([{"name": "a", "port": 80, "targetPort": 8080}, {"name": "b", "port": 443}]),
        ),
    ]);
    let got = view(&slices_of(&cp, "web"));
    assert_eq!(got[0].1, [(s("a"), 8080, s("TCP")), (s("b"), 443, s("TCP"))]);
}

#[test]
fn conditions_follow_readiness_and_termination() {
    let terminating = |name: &str, ready: &str| {
        with_meta(pod("a", name, json!({"app": "web"}), &[]), |m| {
            m.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-01-01T00:00:00Z".parse().expect("timestamp"),
            ));
            m.annotations = Some([(READY_ANNOTATION.to_string(), ready.to_string())].into());
        })
    };
    let not_ready = with_meta(pod("a", "not-ready", json!({"app": "web"}), &[]), |m| {
        m.annotations = Some([(READY_ANNOTATION.to_string(), s("false"))].into());
    });
    let cp = applied(vec![
        pod("a", "ready", json!({"app": "web"}), &[]),
        not_ready,
        terminating("term-serving", "true"),
        terminating("term-gone", "false"),
        svc("a", "web", json!({"app": "web"}), json!([{"port": 80}])),
    ]);
    let mut endpoints = view(&slices_of(&cp, "web")).remove(0).2;
    endpoints.sort();
    assert_eq!(
        endpoints,
        [
            (s("not-ready"), false, false, false),
            (s("ready"), true, true, false),
            (s("term-gone"), false, false, true),
            (s("term-serving"), false, true, true),
        ]
    );
}

#[test]
fn slices_carry_labels_address_type_and_target_refs() {
    let cp = applied(vec![
        pod("a", "w0", json!({"app": "web"}), &[]),
        svc("a", "web", json!({"app": "web"}), json!([])),
    ]);
    let slice = slices_of(&cp, "web").remove(0);
    let labels = slice.metadata.labels.clone().expect("labels");
    assert_eq!(labels.get(slices::MANAGED_BY_LABEL).map(String::as_str), Some(MANAGED_BY));
    assert_eq!(slice.metadata.namespace.as_deref(), Some("a"));
    assert_eq!(slice.address_type, "IPv4");
    let endpoint = &slice.endpoints[0];
    assert_eq!(endpoint.addresses, [s("10.244.7.2")]);
    assert_eq!(endpoint.node_name.as_deref(), Some("lab-node"));
    let target = endpoint.target_ref.clone().expect("targetRef");
    assert_eq!((target.kind.as_deref(), target.namespace.as_deref()), (Some("Pod"), Some("a")));
}

#[test]
fn no_selector_means_no_slices_and_no_match_means_one_empty_slice() {
    let cp = applied(vec![
        obj(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}}),
        ),
        svc("default", "empty", json!({}), json!([{"port": 80}])),
        svc("default", "lonely", json!({"app": "nobody"}), json!([{"port": 80}])),
    ]);
    assert!(slices_of(&cp, "manual").is_empty());
    assert!(slices_of(&cp, "empty").is_empty());
    assert_eq!(view(&slices_of(&cp, "lonely")), [(s("lonely-0"), vec![], vec![])]);
}

#[test]
fn hand_written_slices_pass_through_and_clashes_are_errors() {
    let manual = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.7.200"]}],
        "ports": [{"name": "", "port": 9000}]
    });
    let cp = applied(vec![obj(manual.clone())]);
    let slices = slices_of(&cp, "ext");
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].metadata.namespace.as_deref(), Some("default"));
    assert_eq!(slices[0].endpoints[0].addresses, [s("10.244.7.200")]);
    assert_eq!(slices[0].endpoints[0].conditions, None, "passed through unchanged");

    let mut clash = manual;
    clash["metadata"]["name"] = json!("web-0");
    let mut cp = applied(vec![pod("default", "w", json!({"app": "web"}), &[])]);
    let err = cp
        .apply([obj(clash), svc("default", "web", json!({"app": "web"}), json!([]))])
        .expect_err("clash");
    assert!(matches!(err, ControlPlaneError::SliceClash { .. }), "{err}");
}

#[test]
fn output_is_deterministic_whatever_the_input_order() {
    let objects = vec![
        pod("a", "w2", json!({"app": "web"}), HTTP_DNS),
        pod("a", "w0", json!({"app": "web"}), HTTP_DNS),
        pod("a", "w1", json!({"app": "web"}), HTTP_DNS),
        svc(
            "a",
            "web",
            json!({"app": "web"}),
            json!([{"name": "http", "port": 80, "targetPort": "http"}]),
        ),
    ];
    let render = |batch: Vec<Object>| {
        let mut cp = ControlPlane::new(SLOT);
        // Pods first, in one fixed order, so both runs assign the same addresses.
        cp.apply(objects.iter().filter(|o| o.kind() == Kind::Pod).cloned()).expect("pods");
        cp.apply(batch).expect("apply");
        cp.cluster().expect("cluster").to_yaml().expect("yaml")
    };
    let mut reversed = objects.clone();
    reversed.reverse();
    assert_eq!(render(objects.clone()), render(reversed));
    let endpoints: Vec<_> =
        view(&slices_of(&applied(objects), "web"))[0].2.iter().map(|e| e.0.clone()).collect();
    assert_eq!(endpoints, ["w2", "w0", "w1"], "sorted by address, which follows apply order");
}

#[test]
fn demo_manifest_derives_the_expected_cluster() {
    let demo = include_str!("../../examples/demo.yaml");
    let cp = applied(parse("demo.yaml", demo).expect("demo parses"));
    // Addresses follow the order of the file.
    assert_eq!(cp.pod_ip(&key("demo", "web-0")), Some(Ipv4Addr::new(10, 244, SLOT, 2)));
    assert_eq!(cp.pod_ip(&key("demo", "client")), Some(Ipv4Addr::new(10, 244, SLOT, 5)));
    assert_eq!(cp.service_ip(&key("demo", "web")), Some(Ipv4Addr::new(10, 96, SLOT, 10)));
    let got = view(&slices_of(&cp, "web"));
    let web = |n: &str| (format!("web-{n}"), true, true, false);
    assert_eq!(
        got,
        [(
            s("web-0"),
            vec![(s("http"), 8080, s("TCP")), (s("dns"), 5353, s("UDP"))],
            vec![web("0"), web("1"), web("2")]
        )]
    );
    let yaml = cp.cluster().expect("cluster").to_yaml().expect("yaml");
    for needle in
        ["kind: Namespace", "kind: Node", "kind: Pod", "kind: Service", "kind: EndpointSlice"]
    {
        assert!(yaml.contains(needle), "{needle} missing");
    }
}

#[test]
fn state_round_trips_through_json() {
    let cp = applied(parse("demo.yaml", include_str!("../../examples/demo.yaml")).expect("demo"));
    let json = serde_json::to_string(&cp).expect("to json");
    let back: ControlPlane = serde_json::from_str(&json).expect("from json");
    assert_eq!(back, cp);
    // Allocation continues where it left off.
    let mut back = back;
    back.apply([pod("demo", "new", json!({}), &[])]).expect("apply");
    assert_eq!(back.pod_ip(&key("demo", "new")), Some(Ipv4Addr::new(10, 244, SLOT, 6)));
}

#[test]
fn kinds_parse_like_kubectl() {
    assert_eq!("svc".parse::<Kind>().expect("svc"), Kind::Service);
    assert_eq!("Pods".parse::<Kind>().expect("pods"), Kind::Pod);
    assert_eq!("ns".parse::<Kind>().expect("ns"), Kind::Namespace);
    assert_eq!("EndpointSlice".parse::<Kind>().expect("eps"), Kind::EndpointSlice);
    assert_eq!("netpol".parse::<Kind>().expect("netpol"), Kind::NetworkPolicy);
    assert!("deployment".parse::<Kind>().is_err());
}

// ---- NetworkPolicies and labels ----

fn deny_all(ns: &str, name: &str) -> Object {
    obj(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
    }))
}

#[test]
fn network_policies_pass_through_and_go_with_their_namespace() {
    let mut cp = applied(vec![deny_all("x", "deny"), deny_all("y", "deny")]);
    let cluster = cp.cluster().expect("cluster");
    let keys: Vec<_> = cluster
        .network_policies
        .iter()
        .map(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()))
        .collect();
    let some = |ns: &str| (Some(s(ns)), Some(s("deny")));
    assert_eq!(keys, [some("x"), some("y")]);
    // A policy's namespace exists, as it would have to in a cluster.
    let names: Vec<_> = cluster.namespaces.iter().filter_map(|n| n.metadata.name.clone()).collect();
    assert_eq!(names, ["default", "x", "y"]);
    let yaml = cluster.to_yaml().expect("yaml");
    assert!(yaml.contains("kind: NetworkPolicy\n"), "{yaml}");
    assert!(yaml.contains("apiVersion: networking.k8s.io/v1\n"), "{yaml}");

    cp.delete(Kind::NetworkPolicy, &key("x", "deny")).expect("delete policy");
    cp.delete(Kind::Namespace, &key("", "y")).expect("delete namespace");
    assert_eq!(cp.network_policies().count(), 0);
    assert!(cp.delete(Kind::NetworkPolicy, &key("x", "deny")).is_err());
}

#[test]
fn namespaces_carry_their_name_label() {
    let ns = obj(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "labels": {"team": "blue"}}
    }));
    let cp = applied(vec![ns, pod("y", "p", json!({}), &[])]);
    let labels: Vec<_> =
        cp.cluster().expect("cluster").namespaces.into_iter().map(|n| n.metadata.labels).collect();
    let expected = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), s(name))]);
        labels.extend(extra.iter().map(|&(k, v)| (s(k), s(v))));
        Some(labels)
    };
    assert_eq!(
        labels,
        [expected("default", &[]), expected("x", &[("team", "blue")]), expected("y", &[])]
    );
}

#[test]
fn label_sets_and_removes_pod_and_namespace_labels() {
    let mut cp = applied(vec![pod("x", "a", json!({"pod": "a", "role": "web"}), &[])]);
    let before = cp.pod_ip(&key("x", "a"));
    cp.label(Kind::Pod, &key("x", "a"), &[("role", None), ("team", Some("blue"))])
        .expect("pod label");
    let labels = cp.pod(&key("x", "a")).and_then(|p| p.metadata.labels.clone());
    assert_eq!(labels, Some(BTreeMap::from([(s("pod"), s("a")), (s("team"), s("blue"))])));
    assert_eq!(cp.pod_ip(&key("x", "a")), before, "a relabeled pod keeps its IP");

    // `x` was never declared: labeling it declares it.
    cp.label(Kind::Namespace, &key("", "x"), &[("team", Some("red"))]).expect("ns label");
    let cluster = cp.cluster().expect("cluster");
    let x = cluster.namespaces.iter().find(|n| n.metadata.name.as_deref() == Some("x"));
    let team = x.and_then(|n| n.metadata.labels.as_ref()?.get("team").cloned());
    assert_eq!(team.as_deref(), Some("red"));

    let err = cp.label(Kind::Pod, &key("x", "a"), &[("bad key!", Some("v"))]).expect_err("key");
    assert!(matches!(err, ControlPlaneError::InvalidLabel { .. }), "{err}");
    let err = cp.label(Kind::Pod, &key("x", "a"), &[("k", Some("-v"))]).expect_err("value");
    assert!(matches!(err, ControlPlaneError::InvalidLabel { .. }), "{err}");
    assert!(cp.label(Kind::Pod, &key("x", "nope"), &[("k", Some("v"))]).is_err());
    assert!(cp.label(Kind::Namespace, &key("", "nope"), &[("k", Some("v"))]).is_err());
    let err = cp.label(Kind::Service, &key("x", "a"), &[]).expect_err("not labelable");
    assert!(matches!(err, ControlPlaneError::NotLabelable { .. }), "{err}");
    assert!(valid_label_key("kubernetes.io/metadata.name"));
    assert!(!valid_label_key("/name") && !valid_label_key("a/"));
}

// ---- several nodes ----

/// A pod scheduled by its `spec.nodeName` (none: the first node).
fn pod_on(ns: &str, name: &str, node: Option<&str>) -> Object {
    let mut spec = json!({"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    obj(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": spec
    }))
}

fn three_nodes(objects: Vec<Object>) -> ControlPlane {
    let topology = Topology::with_nodes(3).expect("three nodes");
    let mut cp = ControlPlane::with_topology(SLOT, topology);
    cp.apply(objects).expect("apply");
    cp
}

#[test]
fn pods_run_on_their_node_name_with_an_ip_of_its_pod_cidr() {
    let cp = three_nodes(vec![
        pod_on("a", "p0", None),
        pod_on("a", "p1", Some("lab-node1")),
        pod_on("a", "p2", Some("lab-node2")),
        pod_on("a", "q1", Some("lab-node1")),
        pod_on("a", "q0", Some("lab-node")),
        svc("a", "web", json!({"app": "web"}), json!([{"port": 80}])),
    ]);
    let ip = |name: &str| cp.pod_ip(&key("a", name)).expect("ip").to_string();
    assert_eq!(
        [ip("p0"), ip("q0"), ip("p1"), ip("q1"), ip("p2")],
        ["10.244.7.2", "10.244.7.3", "10.244.7.66", "10.244.7.67", "10.244.7.130"]
    );
    assert_eq!(cp.pod_node(&key("a", "p0")), Some(0));
    assert_eq!(cp.pod_node(&key("a", "p2")), Some(2));

    let cluster = cp.cluster().expect("cluster");
    let running = |name: &str| {
        let pod = cluster.pods.iter().find(|p| p.metadata.name.as_deref() == Some(name));
        let pod = pod.expect("running pod");
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        (node.expect("nodeName"), pod.status.as_ref().and_then(|s| s.host_ip.clone()))
    };
    assert_eq!(running("p0"), (s("lab-node"), Some(s("192.168.7.10"))));
    assert_eq!(running("p2"), (s("lab-node2"), Some(s("192.168.7.12"))));

    let nodes: Vec<(String, String, String)> = cluster
        .nodes()
        .map(|n| {
            let spec = n.spec.clone().expect("spec");
            let addresses = n.status.clone().and_then(|s| s.addresses).expect("addresses");
            let internal = addresses.iter().find(|a| a.type_ == "InternalIP").expect("IP");
            let name = n.metadata.name.clone().expect("name");
            (name, internal.address.clone(), spec.pod_cidr.expect("podCIDR"))
        })
        .collect();
    assert_eq!(
        nodes,
        [
            (s("lab-node"), s("192.168.7.10"), s("10.244.7.0/26")),
            (s("lab-node1"), s("192.168.7.11"), s("10.244.7.64/26")),
            (s("lab-node2"), s("192.168.7.12"), s("10.244.7.128/26")),
        ]
    );
    let yaml = cluster.to_yaml().expect("yaml");
    assert_eq!(yaml.matches("kind: Node\n").count(), 3, "{yaml}");

    // Every endpoint names the node its pod runs on (topology-aware routing reads it).
    let slice = slices_of(&cp, "web").remove(0);
    let mut endpoints: Vec<(String, String)> = slice
        .endpoints
        .iter()
        .map(|e| (e.addresses[0].clone(), e.node_name.clone().expect("nodeName")))
        .collect();
    endpoints.sort();
    assert_eq!(endpoints[0], (s("10.244.7.130"), s("lab-node2")));
    assert_eq!(endpoints[4], (s("10.244.7.67"), s("lab-node1")));
}

#[test]
fn a_pod_cannot_name_a_missing_node_or_move() {
    let mut cp = three_nodes(vec![pod_on("a", "p", Some("lab-node1"))]);
    let before = cp.clone();
    let err = cp.apply(vec![pod_on("a", "q", Some("lab-node3"))]).expect_err("no such node");
    assert!(matches!(&err, ControlPlaneError::UnknownNode { node, .. } if node == "lab-node3"));
    assert!(err.to_string().contains("lab-node, lab-node1, lab-node2"), "{err}");
    let err = cp.apply(vec![pod_on("a", "p", Some("lab-node2"))]).expect_err("moved");
    assert!(matches!(err, ControlPlaneError::NodeChanged { .. }), "{err}");
    let err = cp.apply(vec![pod_on("a", "p", None)]).expect_err("moved to the default node");
    assert!(matches!(err, ControlPlaneError::NodeChanged { .. }), "{err}");
    assert_eq!(cp, before, "a refused apply changes nothing");
    cp.apply(vec![pod_on("a", "p", Some("lab-node1"))]).expect("same node is a replace");

    // A single-node lab has only `lab-node`.
    let err = ControlPlane::new(SLOT).apply(vec![pod_on("a", "p", Some("lab-node1"))]);
    assert!(matches!(err, Err(ControlPlaneError::UnknownNode { .. })), "{err:?}");
    let single = applied(vec![pod_on("a", "p", Some("lab-node"))]);
    assert_eq!(single.pod_ip(&key("a", "p")), Some(Ipv4Addr::new(10, 244, SLOT, 2)));
}

#[test]
fn each_node_runs_out_of_pod_ips_on_its_own() {
    let many = (0..61).map(|i| pod_on("a", &format!("p{i}"), Some("lab-node1"))).collect();
    let mut cp = three_nodes(many);
    assert_eq!(cp.pod_ip(&key("a", "p60")), Some(Ipv4Addr::new(10, 244, SLOT, 126)));
    let err = cp.apply(vec![pod_on("a", "one-more", Some("lab-node1"))]).expect_err("full");
    assert!(
        matches!(&err, ControlPlaneError::PodIpsExhausted { cidr, .. } if cidr == "10.244.7.64/26"),
        "{err}"
    );
    cp.apply(vec![pod_on("a", "elsewhere", Some("lab-node2"))]).expect("node 2 has room");
}

#[test]
fn state_without_a_topology_is_a_single_node() {
    let mut json = serde_json::to_value(applied(vec![pod_on("a", "p", None)])).expect("json");
    let object = json.as_object_mut().expect("object");
    object.remove("topology");
    object.remove("next_pod_host_of");
    let cp: ControlPlane = serde_json::from_value(json).expect("old state parses");
    assert_eq!(cp.topology(), Topology::Single);
    let round: ControlPlane =
        serde_json::from_value(serde_json::to_value(three_nodes(vec![])).expect("json"))
            .expect("parses");
    assert_eq!(round.topology(), Topology::Underlay { nodes: 3 });
}
