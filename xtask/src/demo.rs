//! `cargo xtask demo`: the lab with the demo manifests and the agent, then traffic to the
//! `web` ClusterIP from the `client` pod, showing which pod answered each request; then a
//! NetworkPolicy that lets the client reach only TCP `http`, and the verdict log's lines.
//! With `--nodes N` the same on an underlay lab of N nodes, an agent on each, web-1 and
//! web-2 on the second node (lab/examples/multinode.yaml).
use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodeplane_lab::{HOST_VETH_PREFIX, Lab, LabConfig, Topology};

use crate::{Bins, step};

const DEMO: &str = include_str!("../../lab/examples/demo.yaml");
const MULTINODE: &str = include_str!("../../lab/examples/multinode.yaml");
const REQUESTS: usize = 18;
const TIMEOUT: Duration = Duration::from_secs(2);

/// Lets only `app: client` pods reach the web pods, and only on TCP `http` (8080).
const POLICY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-http-from-client, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: http}]
";

pub fn run(bins: &Bins, keep: bool, nodes: u8) -> anyhow::Result<()> {
    let topology = Topology::with_nodes(nodes)?;
    let manifest = match topology {
        Topology::Single => {
            step("bringing up the lab: node netns, pod netns with veths, pod servers, manifests");
            ("lab/examples/demo.yaml", DEMO)
        }
        Topology::Underlay { .. } => {
            step(&format!(
                "bringing up a {nodes}-node lab: node netns on an underlay bridge, routes to \
                 each other's pod CIDRs, pod netns with veths, pod servers, manifests"
            ));
            ("lab/examples/multinode.yaml", MULTINODE)
        }
    };
    let mut cfg = LabConfig::new(bins.lab.clone());
    cfg.persistent = keep;
    let lab = Lab::up_with(cfg, topology, &[manifest]).context("lab up")?;
    let mut agents = Vec::new();
    for node in lab.nodes() {
        let flows = format!("flows{}", node.agent_log_name().trim_start_matches("agent"));
        let agent: Vec<OsString> = vec![
            bins.agent.clone().into(),
            "run".into(),
            "--manifests".into(),
            lab.manifests_dir().into(),
            "--iface-prefix".into(),
            HOST_VETH_PREFIX.into(),
            "--counters-interval".into(),
            "1s".into(),
            "--flow-log".into(),
            lab.log_path(&flows).into(),
        ];
        agents.push(node.spawn(&agent, &node.agent_log_name()).context("starting the agent")?);
    }
    let vip = lab.service_ip("demo", "web").context("web has no ClusterIP")?;
    println!("    lab slot {}", lab.slot());
    for node in lab.nodes() {
        let (name, ip, netns) = (node.name(), node.ip(), node.netns());
        println!("    node {name:<10} {ip:<14} pods {:<16} netns {netns}", node.pod_cidr());
    }
    for pod in ["web-0", "web-1", "web-2", "client"] {
        let ip = lab.pod_ip("demo", pod).context("pod IP")?;
        let node = lab.pod_node("demo", pod)?.name();
        println!(
            "    pod demo/{pod:<7} {ip:<14} on {node:<10} netns {}",
            lab.pod_netns("demo", pod)
        );
    }
    println!("    service demo/web  ClusterIP {vip}  ports 80/TCP -> http(8080), 53/UDP -> 5353");

    let logs: Vec<(String, String)> = lab
        .nodes()
        .map(|n| {
            let flows = format!("flows{}", n.agent_log_name().trim_start_matches("agent"));
            (n.agent_log_name(), flows)
        })
        .collect();
    let read_log = |name: &str| std::fs::read_to_string(lab.log_path(name)).unwrap_or_default();

    step("waiting for the agent to program the datapath");
    let http = SocketAddrV4::new(vip, 80);
    let dns = SocketAddrV4::new(vip, 53);
    let start = Instant::now();
    while lab.tcp_ask("demo", "client", http, TIMEOUT).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            let log = read_log(&logs[0].0);
            bail!("the ClusterIP did not answer within 30 s; agent log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("    ready after {:?}", start.elapsed());

    for (proto, addr) in [("TCP", http), ("UDP", dns)] {
        step(&format!(
            "{REQUESTS} {proto} requests from demo/client to {addr} (a new connection each)"
        ));
        let mut tally = BTreeMap::<String, usize>::new();
        for i in 1..=REQUESTS {
            let answer = match proto {
                "TCP" => lab.tcp_ask("demo", "client", addr, TIMEOUT),
                _ => lab.udp_ask("demo", "client", addr, TIMEOUT),
            };
            let who = answer.with_context(|| format!("{proto} request {i} to {addr}"))?;
            println!("    request {i:>2} -> answered by {who}");
            *tally.entry(who).or_default() += 1;
        }
        let summary: Vec<String> = tally.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        println!("    balanced across {} pods ({})", tally.len(), summary.join(", "));
    }

    step("NetworkPolicy: the web pods accept only TCP http from app=client");
    for line in POLICY.lines() {
        println!("    {line}");
    }
    lab.apply(&[("web-http-from-client.yaml", POLICY)]).context("applying the policy")?;
    // Every backend's node enforces its pods' ingress: wait until a few requests in a row,
    // to backends picked at random, go unanswered.
    let start = Instant::now();
    let mut denied_in_a_row = 0;
    while denied_in_a_row < 6 {
        match lab.udp_ask("demo", "client", dns, Duration::from_millis(300)) {
            Ok(_) => denied_in_a_row = 0,
            Err(_) => denied_in_a_row += 1,
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("UDP to {dns} still answered 30 s after the policy was applied");
        }
    }
    println!("    programmed after {:?}", start.elapsed());
    let who = lab.tcp_ask("demo", "client", http, TIMEOUT).context("TCP http after the policy")?;
    println!("    TCP {http}: answered by {who} (allowed: port http from app=client)");
    match lab.udp_ask("demo", "client", dns, Duration::from_millis(500)) {
        Ok(who) => bail!("UDP {dns} was answered by {who}; the policy should deny it"),
        Err(_) => println!("    UDP {dns}: no answer (denied: the policy allows no UDP)"),
    }
    std::thread::sleep(Duration::from_millis(1200));
    let last = |text: &str, n: usize| -> Vec<String> {
        let lines: Vec<String> = text.lines().rev().take(n).map(String::from).collect();
        lines.into_iter().rev().collect()
    };
    for (_, flows) in &logs {
        let text = read_log(flows);
        if text.is_empty() {
            continue;
        }
        println!("    verdict log ({}), last lines:", lab.log_path(flows).display());
        for line in last(&text, 2) {
            println!("    {line}");
        }
    }

    let per_node = if logs.len() > 1 { 3 } else { 6 };
    for (agent, _) in &logs {
        step(&format!("{agent}.log (datapath counters are logged every second)"));
        for line in last(&read_log(agent), per_node) {
            println!("    {line}");
        }
    }

    if keep {
        step("the lab stays up");
        println!("    status:          cargo xtask lab status");
        println!("    shell in a pod:  ip netns exec {} bash", lab.pod_netns("demo", "client"));
        println!(
            "    ask the VIP:     ip netns exec {} nc -w1 {vip} 80",
            lab.pod_netns("demo", "client")
        );
        for (agent, _) in &logs {
            println!("    agent log:       {}", lab.log_path(agent).display());
        }
        println!("    tear down:       cargo xtask lab down");
    } else {
        step("tearing the lab down (use --keep to leave it up)");
        lab.down().context("lab down")?;
        for mut agent in agents {
            agent.wait().context("reaping the agent")?;
        }
    }
    Ok(())
}
