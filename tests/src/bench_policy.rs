//! NetworkPolicy at scale: 10,000 Pods in 100 Namespaces with 1 or 1,000 NetworkPolicies,
//! built from k8s objects through the agent's own index and policy computation.
//!
//! 1. Each world is indexed, computed (`policy::compute::compute`) and written by a
//!    `PolicySyncer` into its own, freshly loaded datapath (timed separately).
//! 2. Per-packet cost of `to_pod` (ingress) and `from_pod` (egress) on both datapaths,
//!    interleaved: a new allowed flow, a new denied flow, an established flow and a new flow
//!    of a pod no policy isolates (the baseline). Method as in the `datapath` section: one
//!    `BPF_PROG_TEST_RUN` with `repeat = 1` per sample, the kernel's run time.
//! 3. The real [`Agent`] holding the 1,000-policy world: one Pod relabel, then
//!    `Agent::sync` (index dirty -> compute -> diff -> map writes), back and forth.
//!
//! The flows are not hand-picked addresses: the computed maps are asked
//! ([`PolicyLookup::verdict`]) for a pair that is allowed (denied, not isolated) in *both*
//! worlds, and every sample's tc action is checked against it.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use nodeplane_agent::{
    agent::Agent,
    datapath::Datapath,
    desired::NodeContext,
    health::Health,
    index::Index,
    metrics::Metrics,
    model::Labels,
    policy::{
        compute::{self, Direction, PolicyLookup, PolicyMaps, Verdict},
        sync::PolicySyncer,
    },
    source::{Batch, Event, Kind, Object},
};
use nodeplane_common::maps::{IPPROTO_TCP, names};
use serde_json::{Value, json};

use crate::{
    bench_agent::ip,
    packet::{Frame, TCP_ACK, TCP_SYN},
    run::{Series, TC_ACT_OK, TC_ACT_SHOT, timed},
};

pub const NAMESPACES: u32 = 100;
pub const PODS_PER_NAMESPACE: u32 = 100;
pub const NODES: u32 = 100;
/// The node the agent runs on.
pub const NODE: &str = "node-0";

const SAMPLES: usize = 20_000;
const ROUNDS: usize = 5;
const RELABELS: usize = 10;

/// An ifindex for `__sk_buff.ingress_ifindex`: `to_pod` skips its ingress check for 0
/// (a packet generated on this node), so every sample says it was forwarded.
const FORWARDED: u32 = 3;

const TIERS: [&str; 3] = ["frontend", "backend", "db"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

fn pod_ip(ns: u32, j: u32) -> String {
    ip([10, 244], ns * PODS_PER_NAMESPACE + j + 1)
}

fn node_of(ns: u32, j: u32) -> u32 {
    (j + ns) % NODES
}

/// Pod `j` of namespace `ns`: a replica of `app-{j / 10}` (10 replicas per app), tier by
/// app, team by namespace, version alternating; `app-9` is a StatefulSet, whose pods carry
/// their unique `statefulset.kubernetes.io/pod-name`. Named container ports by tier.
fn pod(ns: u32, j: u32, app: u32) -> Pod {
    let name = format!("app-{}-{j}", j / 10);
    let tier = TIERS[(app % 3) as usize];
    let mut labels = json!({
        "app": format!("app-{app}"),
        "tier": tier,
        "team": format!("team-{}", ns % 10),
        "version": if j.is_multiple_of(2) { "v1" } else { "v2" },
        "pod-template-hash": format!("{:08x}", (ns * 31 + app).wrapping_mul(2_654_435_761)),
    });
    if app == 9 {
        labels["statefulset.kubernetes.io/pod-name"] = json!(name);
    }
    let ports = match tier {
        "frontend" => json!([
            { "name": "http", "containerPort": 8080 },
            { "name": "metrics", "containerPort": 9090 }
        ]),
        "backend" => json!([
            { "name": "http", "containerPort": 8080 },
            { "name": "grpc", "containerPort": 9000 },
            { "name": "metrics", "containerPort": 9090 }
        ]),
        _ => json!([
            { "name": "db", "containerPort": 5432 },
            { "name": "metrics", "containerPort": 9090 }
        ]),
    };
    let ip = pod_ip(ns, j);
    serde_json::from_value(json!({
        "metadata": { "namespace": format!("ns-{ns}"), "name": name, "labels": labels },
        "spec": {
            "nodeName": format!("node-{}", node_of(ns, j)),
            "containers": [{ "name": "main", "image": "registry.example/app:1", "ports": ports }]
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
    }))
    .expect("bench Pod")
}

fn namespace(ns: u32) -> Namespace {
    serde_json::from_value(json!({
        "metadata": { "name": format!("ns-{ns}"), "labels": {
            "kubernetes.io/metadata.name": format!("ns-{ns}"),
            "team": format!("team-{}", ns % 10),
            "env": ENVS[(ns % 3) as usize],
        } }
    }))
    .expect("bench Namespace")
}

fn network_policy(ns: u32, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": { "namespace": format!("ns-{ns}"), "name": name },
        "spec": spec
    }))
    .expect("bench NetworkPolicy")
}

/// Policy `p` (0..10) of namespace `ns`; ten templates mixing pod, namespace and ipBlock
/// peers, numeric, range and named ports, selecting overlapping pods. Template 1 in `ns-0`
/// is the only policy of the small world.
fn policy(ns: u32, p: u32) -> NetworkPolicy {
    let team = |k: u32| format!("team-{}", k % 10);
    let app = |k: u32| format!("app-{}", k % 10);
    let spec = match p {
        0 if ns.is_multiple_of(2) => json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        0 => json!({
            "podSelector": { "matchLabels": { "tier": "db" } },
            "ingress": [{
                "from": [{ "namespaceSelector": { "matchLabels": { "team": team(ns) } } }],
                "ports": [{ "port": "db" }]
            }]
        }),
        1 => json!({
            "podSelector": { "matchLabels": { "app": app(ns) } },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": { "tier": "frontend" } } }],
                "ports": [{ "protocol": "TCP", "port": 8080 }]
            }],
            "egress": [{
                "to": [{
                    "namespaceSelector": { "matchLabels": { "env": "prod" } },
                    "podSelector": { "matchLabels": { "tier": "db" } }
                }],
                "ports": [{ "protocol": "TCP", "port": 5432 }]
            }]
        }),
        2 => json!({
            "podSelector": { "matchLabels": { "tier": "backend" } },
            "ingress": [{
                "from": [{
                    "namespaceSelector": { "matchLabels": { "team": team(ns + 1) } },
                    "podSelector": { "matchExpressions": [
                        { "key": "app", "operator": "In", "values": ["app-1", "app-4"] }
                    ] }
                }],
                "ports": [{ "port": "http" }]
            }]
        }),
        3 => json!({
            "podSelector": { "matchExpressions": [
                { "key": "tier", "operator": "In", "values": ["backend", "db"] }
            ] },
            "ingress": [{
                "from": [{ "ipBlock": {
                    "cidr": "10.0.0.0/8",
                    "except": [format!("10.250.{ns}.0/24")]
                } }],
                "ports": [{ "protocol": "TCP", "port": 9000, "endPort": 9099 }]
            }]
        }),
        4 => json!({
            "podSelector": { "matchLabels": { "app": app(ns + 5) } },
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{ "ipBlock": {
                        "cidr": "0.0.0.0/0",
                        "except": ["169.254.169.254/32"]
                    } }],
                    "ports": [{ "protocol": "TCP", "port": 443 }]
                },
                {
                    "to": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "tier": "backend" } } }],
                    "ports": [{ "port": "grpc" }, { "protocol": "UDP", "port": 53 }]
                }
            ]
        }),
        5 => json!({
            "podSelector": {
                "matchLabels": { "tier": "frontend", "version": "v1" },
                "matchExpressions": [{ "key": "app", "operator": "In", "values": ["app-6", "app-9"] }]
            },
            "ingress": [{
                "ports": [{ "protocol": "TCP", "port": 8080 }, { "protocol": "TCP", "port": 8443 }]
            }]
        }),
        6 => json!({
            "podSelector": { "matchLabels": { "app": app(ns + 3) } },
            "ingress": [{
                "from": [
                    { "podSelector": {} },
                    { "namespaceSelector": { "matchLabels": { "env": "staging" } } }
                ],
                "ports": [{ "port": 8000, "endPort": 8999 }, { "port": "metrics" }]
            }]
        }),
        7 => json!({
            "podSelector": { "matchLabels": { "app": "app-9" } },
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": {
                    "statefulset.kubernetes.io/pod-name": format!("app-9-{}", 90 + ns % 10)
                } } }],
                "ports": [{ "protocol": "TCP", "port": 7000 }]
            }]
        }),
        8 => json!({
            "podSelector": { "matchLabels": { "team": team(ns), "tier": "db" } },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [{ "namespaceSelector": { "matchLabels": { "team": team(ns) } } }],
                "ports": [{ "protocol": "TCP", "port": 5432 }, { "port": "db" }]
            }],
            "egress": [{
                "to": [{ "ipBlock": { "cidr": "10.96.0.0/12" } }],
                "ports": [{ "protocol": "TCP", "port": 443 }]
            }]
        }),
        _ => json!({
            "podSelector": {
                "matchLabels": { "version": "v2" },
                "matchExpressions": [{ "key": "app", "operator": "NotIn",
                    "values": ["app-0", "app-1", "app-2", "app-3", "app-4"] }]
            },
            "ingress": [{
                "from": [
                    {
                        "namespaceSelector": { "matchExpressions": [
                            { "key": "env", "operator": "In", "values": ["prod", "staging"] }
                        ] },
                        "podSelector": { "matchLabels": { "tier": "frontend" } }
                    },
                    { "ipBlock": { "cidr": format!("192.168.{ns}.0/24") } }
                ],
                "ports": [
                    { "protocol": "UDP", "port": 5000, "endPort": 5100 },
                    { "protocol": "SCTP", "port": 3868 }
                ]
            }]
        }),
    };
    network_policy(ns, &format!("np-{p}"), spec)
}

/// The cluster's objects, as the sources hand them to the index.
pub struct World {
    pub namespaces: Vec<Object>,
    pub nodes: Vec<Object>,
    pub pods: Vec<Object>,
    pub policies: Vec<Object>,
}

impl World {
    /// 10,000 Pods (1% on [`NODE`]) in 100 Namespaces, with `policies` NetworkPolicies:
    /// 1 (template 1 in `ns-0`) or 10 per Namespace.
    pub fn new(policies: u32) -> Self {
        let namespaces = (0..NAMESPACES).map(|n| Object::from(namespace(n))).collect();
        let nodes = (0..NODES)
            .map(|n| {
                let node: Node =
                    serde_json::from_value(json!({ "metadata": { "name": format!("node-{n}") } }))
                        .expect("bench Node");
                Object::from(node)
            })
            .collect();
        let pods = (0..NAMESPACES)
            .flat_map(|n| (0..PODS_PER_NAMESPACE).map(move |j| Object::from(pod(n, j, j / 10))))
            .collect();
        let policies = if policies == 1 {
            vec![Object::from(policy(0, 1))]
        } else {
            assert_eq!(policies, NAMESPACES * 10, "1 or 1,000 policies");
            (0..NAMESPACES).flat_map(|n| (0..10).map(move |p| Object::from(policy(n, p)))).collect()
        };
        Self { namespaces, nodes, pods, policies }
    }

    fn events(&self) -> Vec<Event> {
        vec![
            Event::Reset(Kind::Namespace, self.namespaces.clone()),
            Event::Reset(Kind::Node, self.nodes.clone()),
            Event::Reset(Kind::Pod, self.pods.clone()),
            Event::Reset(Kind::NetworkPolicy, self.policies.clone()),
            Event::Reset(Kind::Service, Vec::new()),
            Event::Reset(Kind::EndpointSlice, Vec::new()),
        ]
    }
}

fn compute_from(index: &Index) -> PolicyMaps {
    let namespaces: BTreeMap<String, Labels> =
        index.namespaces().map(|n| (n.name.clone(), n.labels.clone())).collect();
    compute::compute(&compute::Input {
        pods: index.pods().collect(),
        namespaces: &namespaces,
        policies: index.network_policies().collect(),
        node_name: NODE,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One world, programmed into its own datapath.
struct Programmed {
    name: &'static str,
    dp: Datapath,
    maps: PolicyMaps,
    /// Every pod IP, local ones flagged.
    pods: Vec<(Ipv4Addr, bool)>,
}

fn program(name: &'static str, world: &World) -> Programmed {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let mut index = Index::new();
    let t = Instant::now();
    for event in world.events() {
        index.handle(event);
    }
    let t_index = t.elapsed();
    let t = Instant::now();
    let maps = compute_from(&index);
    let t_compute = t.elapsed();
    let mut syncer = PolicySyncer::new();
    let t = Instant::now();
    let stats = syncer.apply(&maps, dp.maps()).unwrap_or_else(|e| panic!("policy sync: {e}"));
    let t_write = t.elapsed();
    assert!(!stats.skipped.any(), "{name}: policy maps full: {:?}", stats.skipped);
    let pods =
        index.pods().filter_map(|p| Some((p.ip?, p.node_name.as_deref() == Some(NODE)))).collect();
    println!("\npolicy maps of {name} (10,000 pods, {} on {NODE})", maps.endpoints.len());
    println!("  index (k8s -> model)          {}", ms(t_index));
    println!("  policy::compute               {}", ms(t_compute));
    println!("  PolicySyncer::apply ({} ops)  {}", stats.ops, ms(t_write));
    println!(
        "  entries: IPCACHE_V4 {}, ENDPOINTS_V4 {}, POLICY_V4 {}; {} identities, {} sets, {} rule ids",
        stats.ipcache,
        stats.endpoints,
        stats.rules,
        maps.names.identities.len(),
        maps.names.sets.len(),
        maps.names.rules.len()
    );
    Programmed { name, dp, maps, pods }
}

/// A flow both worlds treat alike.
#[derive(Clone, Copy, Debug)]
struct Pick {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
}

/// The first `(src, dst)` among `candidates` whose verdict satisfies `want` in every world.
fn pick(
    worlds: &[&Programmed],
    candidates: impl Iterator<Item = (Ipv4Addr, Ipv4Addr)>,
    dport: u16,
    dir: Direction,
    what: &str,
    want: impl Fn(Verdict) -> bool,
) -> Pick {
    for (src, dst) in candidates {
        if worlds.iter().all(|w| want(w.maps.verdict(src, dst, IPPROTO_TCP, dport, dir))) {
            return Pick { src, dst, dport };
        }
    }
    panic!("no {what} flow in both worlds")
}

fn allowed(v: Verdict) -> bool {
    matches!(v, Verdict::Allow { .. })
}

fn denied(v: Verdict) -> bool {
    matches!(v, Verdict::Deny { .. })
}

fn not_isolated(v: Verdict) -> bool {
    v == Verdict::NotIsolated
}

/// The flows of one program: new allowed, new denied, established (the allowed pair) and
/// new to or from a pod nothing isolates.
#[derive(Clone, Copy, Debug)]
struct Flows {
    program: &'static str,
    allow: Pick,
    deny: Pick,
    open: Pick,
}

fn flows(worlds: &[&Programmed]) -> [Flows; 2] {
    let a = worlds[0];
    let local: Vec<Ipv4Addr> = a.pods.iter().filter(|p| p.1).map(|p| p.0).collect();
    let remote: Vec<Ipv4Addr> = a.pods.iter().filter(|p| !p.1).map(|p| p.0).collect();
    let pairs = |from: &[Ipv4Addr], to: &[Ipv4Addr]| {
        let (from, to) = (from.to_vec(), to.to_vec());
        from.into_iter().flat_map(move |s| to.clone().into_iter().map(move |d| (s, d)))
    };
    let ingress = |what: &str, want: fn(Verdict) -> bool| {
        pick(worlds, pairs(&remote, &local), 8080, Direction::Ingress, what, want)
    };
    let allow = ingress("allowed ingress", allowed);
    // The same isolated pod, so both new flows look up the same set.
    let deny = pick(
        worlds,
        remote.iter().map(|s| (*s, allow.dst)),
        8080,
        Direction::Ingress,
        "denied ingress",
        denied,
    );
    let open = ingress("not isolated ingress", not_isolated);
    let to_pod = Flows { program: names::PROG_TO_POD, allow, deny, open };

    let egress = |what: &str, want: fn(Verdict) -> bool| {
        pick(worlds, pairs(&local, &remote), 5432, Direction::Egress, what, want)
    };
    let allow = egress("allowed egress", allowed);
    let deny = pick(
        worlds,
        remote.iter().map(|d| (allow.src, *d)),
        5432,
        Direction::Egress,
        "denied egress",
        denied,
    );
    let open = egress("not isolated egress", not_isolated);
    let from_pod = Flows { program: names::PROG_FROM_POD, allow, deny, open };
    [to_pod, from_pod]
}

/// `median / mean` of a cell.
trait Cell {
    fn cell(&self) -> String;
}

impl Cell for Series {
    fn cell(&self) -> String {
        format!("{:>6} / {:>6.1}", self.median(), self.mean())
    }
}

/// Samples of one program on one datapath.
#[derive(Default)]
struct Cells {
    allow: Series,
    deny: Series,
    established: Series,
    open: Series,
}

/// One sample: the program on `frame` as a packet forwarded from [`FORWARDED`]; checks
/// the tc action.
fn run_ns(dp: &Datapath, program: &str, frame: &[u8], action: u32, out: &mut [u8]) -> u64 {
    let (got, ns) = timed(dp, program, frame, Some(FORWARDED), out);
    assert_eq!(got, action, "{program}: tc action for {frame:02x?}");
    ns
}

/// Source ports of new flows: a fresh one per sample, so every SYN misses conntrack (the
/// established flow uses a port below the range).
const FIRST_PORT: u32 = 10_000;
const ESTABLISHED_PORT: u16 = 9_999;

fn measure_round(w: &Programmed, flows: &[Flows; 2], cells: &mut [Cells; 2], next: &mut u32) {
    let mut out = vec![0u8; 256];
    let ests: Vec<Vec<u8>> = flows
        .iter()
        .map(|f| {
            let est = (f.allow.src, ESTABLISHED_PORT);
            let syn = Frame::tcp(est, (f.allow.dst, f.allow.dport), TCP_SYN).build();
            run_ns(&w.dp, f.program, &syn, TC_ACT_OK, &mut out); // creates the flow
            Frame::tcp(est, (f.allow.dst, f.allow.dport), TCP_ACK).build()
        })
        .collect();
    for _ in 0..SAMPLES / ROUNDS {
        let port = u16::try_from(*next).expect("source ports left");
        *next += 1;
        for ((f, c), est) in flows.iter().zip(cells.iter_mut()).zip(&ests) {
            let syn = |p: Pick| Frame::tcp((p.src, port), (p.dst, p.dport), TCP_SYN).build();
            let (dp, prog) = (&w.dp, f.program);
            c.allow.0.push(run_ns(dp, prog, &syn(f.allow), TC_ACT_OK, &mut out));
            c.deny.0.push(run_ns(dp, prog, &syn(f.deny), TC_ACT_SHOT, &mut out));
            c.established.0.push(run_ns(dp, prog, est, TC_ACT_OK, &mut out));
            c.open.0.push(run_ns(dp, prog, &syn(f.open), TC_ACT_OK, &mut out));
        }
    }
}

fn per_packet(worlds: &[Programmed; 2]) {
    let flows = flows(&[&worlds[0], &worlds[1]]);
    for f in &flows {
        eprintln!(
            "{}: allow {:?}, deny {:?}, not isolated {:?}",
            f.program, f.allow, f.deny, f.open
        );
    }
    let mut cells: [[Cells; 2]; 2] = Default::default();
    let mut next = [FIRST_PORT; 2];
    for _ in 0..ROUNDS {
        for (i, w) in worlds.iter().enumerate() {
            measure_round(w, &flows, &mut cells[i], &mut next[i]);
        }
    }
    for (k, f) in flows.iter().enumerate() {
        let dir = if k == 0 { "ingress" } else { "egress" };
        println!(
            "\n{} ({dir}) per-packet cost, BPF_PROG_TEST_RUN, {SAMPLES} samples each \
             (median / mean ns)",
            f.program
        );
        println!(
            "{:<34} {:>15} {:>15} {:>15} {:>15}",
            "world", "new, allowed", "new, denied", "established", "new, not isol."
        );
        for (w, c) in worlds.iter().zip(&cells) {
            let c = &c[k];
            println!(
                "{:<34} {:>15} {:>15} {:>15} {:>15}",
                w.name,
                c.allow.cell(),
                c.deny.cell(),
                c.established.cell(),
                c.open.cell()
            );
        }
        let (a, b) = (&cells[0][k], &cells[1][k]);
        let ratio = |x: &Series, y: &Series| {
            (y.median() as f64 / x.median().max(1) as f64, y.mean() / x.mean())
        };
        for (what, x, y) in [("new allowed", &a.allow, &b.allow), ("new denied", &a.deny, &b.deny)]
        {
            let (median, mean) = ratio(x, y);
            println!(
                "{} {what} flow, 1,000 policies / 1 policy: {median:.3} (median), {mean:.3} (mean)",
                f.program
            );
        }
    }
}

/// The real agent holding the 1,000-policy world: time `Agent::sync` after one Pod
/// relabel that changes which policies select it (and which peers it matches).
fn relabel(world: &World) {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    let mut agent = Agent::new(NodeContext::named(NODE), health, Arc::new(Metrics::new()));
    let t = Instant::now();
    agent.handle(Batch::now(world.events()));
    let t_handle = t.elapsed();
    let t = Instant::now();
    let first = agent.sync(dp.maps()).unwrap_or_else(|e| panic!("first sync: {e}"));
    let t_first = t.elapsed();

    // ns-61's pod on this node is app-3, frontend, v2: no policy isolates it. As app-1 it
    // is selected by ns-61/np-1 (ingress and egress) and matches ns-60/np-2's peer.
    let (ns, j) = (61, (NODES - 61) % NODES);
    assert_eq!(node_of(ns, j), 0);
    let mut samples = Vec::new();
    let mut ops = Vec::new();
    let mut computes = Vec::new();
    for i in 0..RELABELS {
        let app = if i % 2 == 0 { 1 } else { j / 10 };
        agent.handle(Batch::now(vec![Event::Apply(Object::from(pod(ns, j, app)))]));
        let t = Instant::now();
        let report = agent.sync(dp.maps()).unwrap_or_else(|e| panic!("sync: {e}"));
        samples.push(t.elapsed());
        ops.push(report.policy_ops);
        // The compute alone, again, on the same index: how much of the sync it is.
        let t = Instant::now();
        std::hint::black_box(compute_from(agent.index()));
        computes.push(t.elapsed());
    }
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    println!("\nAgent::sync after one Pod relabel, 10,000 pods x 1,000 policies, real maps");
    println!(
        "  initial: handle (index) {}, first sync {} ({} policy ops)",
        ms(t_handle),
        ms(t_first),
        first.policy_ops
    );
    println!(
        "  {RELABELS} relabels (ns-{ns}/app-{}-{j}: app-{} <-> app-1): median {}, max {}",
        j / 10,
        j / 10,
        ms(sorted[sorted.len() / 2]),
        ms(sorted[sorted.len() - 1])
    );
    println!("  policy::compute alone on the same index: median {}", ms(median(&computes)));
    println!(
        "  each: {}; policy ops {:?}",
        samples.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", "),
        ops
    );
}

pub fn run() {
    let small = World::new(1);
    let large = World::new(NAMESPACES * 10);
    let worlds = [program("1 policy", &small), program("1,000 policies", &large)];
    per_packet(&worlds);
    drop(worlds);
    relabel(&large);
}
