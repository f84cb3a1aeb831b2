//! `nodeplane-lab`: make a lab node from YAML, poke at it, tear it down.
use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nodeplane_lab::{
    Kind, Lab, LabConfig, Topology,
    control_plane::ObjectKey,
    lab::{self, DEFAULT_STATE_ROOT},
    naming::HOST_VETH_PREFIX,
    server::{self, ServeConfig},
    slot::Slots,
    topology,
};

#[derive(Parser)]
#[command(version, about = "A Kubernetes node and its pods made of network namespaces")]
struct Cli {
    /// Where labs keep their state (`lab-N/`, `current`).
    #[arg(long, env = "NODEPLANE_LAB_STATE", default_value = DEFAULT_STATE_ROOT, global = true)]
    state_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a lab from manifests; it lives until `down`.
    Up {
        /// Manifest files (multi-document YAML).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Start this agent in the node netns, reading the lab's manifests (one per node).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Keep the current lab running; by default `up` replaces it.
        #[arg(long)]
        keep: bool,
        /// Nodes: 1 is the single-node lab; 2 to 4 are joined by an underlay, with an
        /// external client and an internet. Pods go to their `spec.nodeName` (`lab-node`,
        /// `lab-node1`, ...), the first node without one.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=i64::from(nodeplane_lab::topology::MAX_NODES)))]
        nodes: u8,
    },
    /// Add or replace objects in the current lab.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        slot: Option<u8>,
    },
    /// Delete an object: KIND NS/NAME (or KIND NAME in namespace default; namespace NAME).
    Delete {
        kind: Kind,
        target: String,
        #[arg(long)]
        slot: Option<u8>,
    },
    /// Relabel a pod or a namespace: KIND NS/NAME key=value... key-... (as kubectl label
    /// --overwrite).
    Label {
        kind: Kind,
        target: String,
        #[arg(required = true)]
        labels: Vec<String>,
        #[arg(long)]
        slot: Option<u8>,
    },
    /// Run a command in a pod's netns: exec NS/POD -- CMD...
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
        #[arg(long)]
        slot: Option<u8>,
    },
    /// List the labs on this machine.
    Status,
    /// Tear down the current lab, or every lab with --all.
    Down {
        #[arg(long)]
        all: bool,
        #[arg(long, conflicts_with = "all")]
        slot: Option<u8>,
    },
    /// (internal) The pod server: answers its name on every port.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, num_args = 1..)]
        tcp: Vec<u16>,
        #[arg(long, num_args = 1..)]
        udp: Vec<u16>,
        /// Exit when this PID exits.
        #[arg(long)]
        owner: Option<u32>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodeplane-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cfg = LabConfig {
        lab_bin: std::env::current_exe().context("locating the nodeplane-lab binary")?,
        state_root: cli.state_root,
        persistent: true,
    };
    match cli.command {
        Command::Up { files, agent, keep, nodes } => up(cfg, &files, agent, keep, nodes)?,
        Command::Apply { files, slot } => {
            let lab = open(cfg, slot)?;
            lab.apply(&lab::read_sources(&files)?)?;
            print_lab(&lab);
        }
        Command::Delete { kind, target, slot } => {
            let key = split_target(&target, kind);
            open(cfg, slot)?.delete(kind, &key.namespace, &key.name)?;
        }
        Command::Label { kind, target, labels, slot } => {
            let key = split_target(&target, kind);
            let changes =
                labels.iter().map(|l| parse_label_change(l)).collect::<Result<Vec<_>>>()?;
            open(cfg, slot)?.label(kind, &key.namespace, &key.name, &changes)?;
        }
        Command::Exec { target, command, slot } => {
            let key = split_target(&target, Kind::Pod);
            let lab = open(cfg, slot)?;
            let status = lab.pod_command(&key.namespace, &key.name, &command)?.status()?;
            return Ok(ExitCode::from(
                status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1),
            ));
        }
        Command::Status => status(&cfg)?,
        Command::Down { all: true, .. } => {
            let slots = lab::down_all(&cfg.state_root)?;
            println!("removed labs {slots:?} and any stray np<N>- netns");
        }
        Command::Down { all: false, slot } => {
            let lab = open(cfg, slot)?;
            let slot = lab.slot();
            lab.down()?;
            println!("lab {slot} is down");
        }
        Command::Serve { name, tcp, udp, owner } => {
            server::serve(&ServeConfig { name, tcp, udp }, owner)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open(cfg: LabConfig, slot: Option<u8>) -> Result<Lab> {
    Ok(match slot {
        Some(slot) => Lab::open(cfg, slot)?,
        None => Lab::open_current(cfg)?,
    })
}

/// `NS/NAME`, or `NAME` in `default` (for namespaces, the name alone).
fn split_target(target: &str, kind: Kind) -> ObjectKey {
    match (kind, target.split_once('/')) {
        (Kind::Namespace, _) => ObjectKey::new("", target),
        (_, Some((ns, name))) => ObjectKey::new(ns, name),
        (_, None) => ObjectKey::new("default", target),
    }
}

/// `key=value` sets, `key-` removes.
fn parse_label_change(arg: &str) -> Result<(&str, Option<&str>)> {
    if let Some((key, value)) = arg.split_once('=') {
        return Ok((key, Some(value)));
    }
    match arg.strip_suffix('-') {
        Some(key) => Ok((key, None)),
        None => anyhow::bail!("{arg:?} is neither key=value nor key-"),
    }
}

fn up(
    cfg: LabConfig,
    files: &[PathBuf],
    agent: Option<PathBuf>,
    keep: bool,
    nodes: u8,
) -> Result<()> {
    let topology = Topology::with_nodes(nodes)?;
    let sources = lab::read_sources(files)?;
    if !keep && let Some(slot) = lab::current_slot(&cfg.state_root)? {
        match Lab::open(cfg.clone(), slot) {
            Ok(old) => {
                old.down().with_context(|| format!("taking down the current lab {slot}"))?;
                eprintln!("took down the previous lab {slot} (use --keep to keep it)");
            }
            Err(e) => eprintln!("ignoring the stale current lab {slot}: {e}"),
        }
    }
    let lab = Lab::up_with(cfg, topology, &sources)?;
    if let Some(agent) = agent {
        let manifests = lab.manifests_dir();
        let cmd: Vec<OsString> = vec![
            agent.into(),
            "run".into(),
            "--manifests".into(),
            manifests.into(),
            "--iface-prefix".into(),
            HOST_VETH_PREFIX.into(),
        ];
        for node in lab.nodes() {
            let log = node.agent_log_name();
            let child = node.spawn(&cmd, &log)?;
            println!(
                "agent on {}: pid {} (log {})",
                node.name(),
                child.id(),
                lab.log_path(&log).display()
            );
        }
    }
    print_lab(&lab);
    Ok(())
}

fn print_lab(lab: &Lab) {
    let cp = lab.control_plane();
    println!(
        "lab {}: node netns {}, state {}",
        lab.slot(),
        lab.node_netns(),
        lab.state_dir().display()
    );
    println!("manifests: {}", lab.manifests_dir().display());
    if lab.topology().has_underlay() {
        println!("nodes:");
        for node in lab.nodes() {
            println!(
                "  {:<30} {:<15} pods {:<18} {}",
                node.name(),
                node.ip().to_string(),
                node.pod_cidr(),
                node.netns()
            );
        }
        for (what, ip, netns) in [
            ("external client", lab.external_ip(), lab.external_netns()),
            ("internet", lab.internet_ip(), lab.internet_netns()),
        ] {
            if let (Ok(ip), Ok(netns)) = (ip, netns) {
                println!("  {what:<30} {:<15} {netns}", ip.to_string());
            }
        }
    }
    println!("pods:");
    for (key, _) in cp.pods() {
        let ip = cp.pod_ip(key).map_or_else(|| "-".into(), |ip| ip.to_string());
        let node = cp.pod_node(key).map_or_else(|| "-".into(), topology::node_name);
        println!(
            "  {:<30} {:<15} {:<10} {}",
            key.to_string(),
            ip,
            node,
            lab.pod_netns(&key.namespace, &key.name)
        );
    }
    println!("services:");
    for (key, svc) in cp.services() {
        let ip = cp.service_ip(key).map_or_else(|| "None".into(), |ip| ip.to_string());
        let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
        let ports: Vec<String> = ports
            .map(|p| {
                format!(
                    "{} {}/{}",
                    p.name.as_deref().unwrap_or("-"),
                    p.port,
                    p.protocol.as_deref().unwrap_or("TCP")
                )
            })
            .collect();
        println!("  {:<30} {:<15} {}", key.to_string(), ip, ports.join(", "));
    }
    if let Some((key, _)) = cp.pods().next() {
        let netns = lab.pod_netns(&key.namespace, &key.name);
        println!("poke:");
        println!("  ip netns exec {netns} bash");
        println!("  nodeplane-lab exec {key} -- ip addr");
        println!("  ip netns exec {} ip route", lab.node_netns());
    }
}

fn status(cfg: &LabConfig) -> Result<()> {
    let records = Slots::system().list()?;
    let current = lab::current_slot(&cfg.state_root)?;
    if records.is_empty() {
        println!("no labs");
    }
    for record in records {
        let owner = record.owner.as_ref().map_or_else(|| "?".into(), ToString::to_string);
        let stale = if record.is_stale() { " (stale: owner gone)" } else { "" };
        let marker = if current == Some(record.slot) { " [current]" } else { "" };
        println!("lab {} owner {owner}{stale}{marker}", record.slot);
        match Lab::open(cfg.clone(), record.slot) {
            Ok(lab) => {
                let cp = lab.control_plane();
                println!(
                    "  {} node(s), {} pods, {} services, manifests {}",
                    lab.topology().nodes(),
                    cp.pods().count(),
                    cp.services().count(),
                    lab.manifests_dir().display()
                );
            }
            Err(e) => println!("  ({e})"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_default_to_namespace_default() {
        assert_eq!(split_target("demo/web", Kind::Pod), ObjectKey::new("demo", "web"));
        assert_eq!(split_target("web", Kind::Service), ObjectKey::new("default", "web"));
        assert_eq!(split_target("demo", Kind::Namespace), ObjectKey::new("", "demo"));
    }

    #[test]
    fn label_changes_set_and_remove() {
        assert_eq!(parse_label_change("team=blue").expect("set"), ("team", Some("blue")));
        assert_eq!(parse_label_change("team=").expect("empty"), ("team", Some("")));
        assert_eq!(parse_label_change("team-").expect("remove"), ("team", None));
        assert!(parse_label_change("team").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "nodeplane-lab",
            "serve",
            "--name",
            "a",
            "--tcp",
            "1",
            "2",
            "--udp",
            "3",
        ])
        .expect("parses");
        assert!(
            matches!(cli.command, Command::Serve { tcp, udp, .. } if tcp == [1, 2] && udp == [3])
        );
    }
}
