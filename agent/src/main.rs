//! `nodeplane-agent`: the per-node daemon.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use nodeplane_agent::{
    datapath::Datapath,
    desired,
    index::Index,
    source::{self, Event},
    sync::Syncer,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

#[derive(Parser)]
#[command(version, about = "eBPF Kubernetes service dataplane: the node agent")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "NODEPLANE_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach it to pod interfaces and keep the maps in sync with the
    /// cluster state read from a directory of YAML manifests.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of Kubernetes YAML (Services, EndpointSlices, Pods, Namespaces, Nodes),
    /// re-read when it changes.
    #[arg(long, env = "NODEPLANE_MANIFESTS")]
    manifests: PathBuf,
    /// Attach to every interface whose name starts with this (the host side of pod veths).
    #[arg(long, default_value = "lxc", env = "NODEPLANE_IFACE_PREFIX")]
    iface_prefix: String,
    /// How often to look for changed manifests.
    #[arg(long, default_value = "200ms", value_parser = humantime_parse)]
    poll_interval: Duration,
    /// How often to look for new pod interfaces.
    #[arg(long, default_value = "500ms", value_parser = humantime_parse)]
    iface_interval: Duration,
    /// How often to log datapath counters that changed (0s: never).
    #[arg(long, default_value = "10s", value_parser = humantime_parse)]
    counters_interval: Duration,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run(args) => run(args).await,
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let datapath = Datapath::load().context("loading the datapath")?;
    info!("datapath loaded");
    let (tx, mut rx) = mpsc::channel::<Vec<Event>>(16);
    tokio::spawn(source::files::run(args.manifests.clone(), args.poll_interval, tx));

    let mut agent = Agent {
        datapath,
        index: Index::default(),
        syncer: Syncer::new(),
        reported_skips: BTreeSet::new(),
    };
    // A failed write (e.g. a full map) is retried on this tick even if nothing changes.
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut in_sync = true;
    let mut ifaces = tokio::time::interval(args.iface_interval);
    let mut counters = tokio::time::interval(args.counters_interval.max(Duration::from_secs(1)));
    let mut last_counters = BTreeMap::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { anyhow::bail!("the manifest source stopped") };
                for event in batch {
                    agent.index.handle(event);
                }
                in_sync = agent.sync();
            }
            _ = retry.tick(), if !in_sync => in_sync = agent.sync(),
            _ = ifaces.tick() => {
                match agent.datapath.attach_matching(&args.iface_prefix) {
                    Ok(new) => for iface in new { info!(%iface, "attached to pod interface") },
                    Err(e) => warn!(error = %e, "attaching to pod interfaces"),
                }
            }
            _ = counters.tick(), if !args.counters_interval.is_zero() => {
                agent.log_counters(&mut last_counters);
            }
            _ = &mut shutdown => {
                info!("shutting down; programs are detached when the agent exits");
                return Ok(());
            }
        }
    }
}

struct Agent {
    datapath: Datapath,
    index: Index,
    syncer: Syncer,
    /// (service, reason) pairs already logged, so a skip is reported once, not every sync.
    reported_skips: BTreeSet<(String, String)>,
}

impl Agent {
    /// Writes the difference between the index and the maps. Returns false on a failed write.
    fn sync(&mut self) -> bool {
        let started = Instant::now();
        let desired = desired::compute(&self.index);
        for (object, reason) in &desired.skipped {
            if self.reported_skips.insert((object.to_string(), reason.clone())) {
                warn!(service = %object, %reason, "skipping service");
            }
        }
        match self.syncer.apply(&desired, self.datapath.maps()) {
            Ok(stats) if stats.ops > 0 => {
                info!(
                    ops = stats.ops,
                    frontends = stats.services,
                    backends = stats.backends,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "datapath synced"
                );
                true
            }
            Ok(_) => {
                debug!("datapath already in sync");
                true
            }
            Err(e) => {
                warn!(error = %e, "datapath sync failed; retrying in 1s");
                false
            }
        }
    }

    /// Logs the packet counters that moved since the last call.
    fn log_counters(&self, last: &mut BTreeMap<&'static str, u64>) {
        let Ok(now) = self.datapath.counters() else { return };
        let mut moved = Vec::new();
        for (reason, counter) in now {
            let prev = last.insert(reason.name(), counter.packets).unwrap_or(0);
            if counter.packets != prev {
                moved.push(format!("{}={}", reason.name(), counter.packets));
            }
        }
        if !moved.is_empty() {
            info!(counters = %moved.join(" "), "datapath packets");
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
