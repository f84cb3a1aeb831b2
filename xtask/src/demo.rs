//! `cargo xtask demo`: the lab with the demo manifests and the agent, then traffic to the
//! `web` ClusterIP from the `client` pod, showing which pod answered each request; then a
//! NetworkPolicy that lets the client reach only TCP `http`, and the verdict log's lines.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodeplane_lab::{HOST_VETH_PREFIX, Lab, LabConfig};

use crate::{Bins, step};

const DEMO: &str = include_str!("../../lab/examples/demo.yaml");
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

pub fn run(bins: &Bins, keep: bool) -> anyhow::Result<()> {
    step("bringing up the lab: node netns, pod netns with veths, pod servers, manifests");
    let mut cfg = LabConfig::new(bins.lab.clone());
    cfg.persistent = keep;
    let lab = Lab::up(cfg, &[("lab/examples/demo.yaml", DEMO)]).context("lab up")?;
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
        lab.log_path("flows").into(),
    ];
    let mut agent = lab.spawn_in_node(&agent, "agent").context("starting the agent")?;
    let vip = lab.service_ip("demo", "web").context("web has no ClusterIP")?;
    println!("    lab slot {}: node netns {}", lab.slot(), lab.node_netns());
    for pod in ["web-0", "web-1", "web-2", "client"] {
        let ip = lab.pod_ip("demo", pod).context("pod IP")?;
        println!("    pod demo/{pod:<7} {ip:<14} netns {}", lab.pod_netns("demo", pod));
    }
    println!("    service demo/web  ClusterIP {vip}  ports 80/TCP -> http(8080), 53/UDP -> 5353");

    step("waiting for the agent to program the datapath");
    let http = SocketAddrV4::new(vip, 80);
    let dns = SocketAddrV4::new(vip, 53);
    let start = Instant::now();
    while lab.tcp_ask("demo", "client", http, TIMEOUT).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(lab.log_path("agent")).unwrap_or_default();
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
    let start = Instant::now();
    while lab.udp_ask("demo", "client", dns, Duration::from_millis(300)).is_ok() {
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
    let flows = std::fs::read_to_string(lab.log_path("flows")).unwrap_or_default();
    println!("    verdict log ({}), last lines:", lab.log_path("flows").display());
    for line in flows.lines().rev().take(2).collect::<Vec<_>>().into_iter().rev() {
        println!("    {line}");
    }

    step("the agent's log (datapath counters are logged every second)");
    let log = std::fs::read_to_string(lab.log_path("agent")).unwrap_or_default();
    for line in log.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev() {
        println!("    {line}");
    }

    if keep {
        step("the lab stays up");
        println!("    status:          cargo xtask lab status");
        println!("    shell in a pod:  ip netns exec {} bash", lab.pod_netns("demo", "client"));
        println!(
            "    ask the VIP:     ip netns exec {} nc -w1 {vip} 80",
            lab.pod_netns("demo", "client")
        );
        println!("    agent log:       {}", lab.log_path("agent").display());
        println!("    tear down:       cargo xtask lab down");
    } else {
        step("tearing the lab down (use --keep to leave it up)");
        lab.down().context("lab down")?;
        agent.wait().context("reaping the agent")?;
    }
    Ok(())
}
