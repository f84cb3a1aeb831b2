//! `nodeplane-agent`: the per-node daemon.
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use nodeplane_agent::{
    config::{Config, RunArgs},
    metrics::LogLevel,
};

#[derive(Parser)]
#[command(version, about = "eBPF Kubernetes service dataplane: the node agent")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "NODEPLANE_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`, ...) or tracing directives
    /// (`nodeplane_agent=debug,info`). Default: RUST_LOG (tracing's EnvFilter syntax), else
    /// `info`. Changeable while the
    /// agent runs: `PUT /loglevel` on the metrics address, or SIGUSR1 to toggle `debug`.
    #[arg(long, env = "NODEPLANE_LOG_LEVEL", global = true, value_name = "FILTER")]
    log_level: Option<String>,
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
    /// Load the datapath, attach it to pod interfaces and keep its maps in sync with the
    /// cluster: watched on the API server, or read from a directory of YAML (--manifests).
    ///
    /// Every setting can also come from an environment variable (shown with each flag) or
    /// from the --config file; flags win over the environment, which wins over the file.
    Run(Box<RunArgs>),
    /// Remove the datapath from this node: unpin every link (which detaches the programs
    /// from the pod interfaces), program and map the agent pinned, and the directory.
    /// Stop the agent first (delete the DaemonSet): a running agent attaches again.
    /// Nothing pinned is not an error.
    Uninstall {
        /// The agent's --bpffs-dir.
        #[arg(long, env = "NODEPLANE_BPFFS_DIR", default_value = nodeplane_agent::pin::DEFAULT_DIR,
              value_name = "DIR")]
        bpffs_dir: std::path::PathBuf,
    },
    // --- inspect (docs/INSPECT.md) ---
    /// Show what the datapath on this node holds and does, from the maps and programs the
    /// agent pinned: Services and their backends, conntrack, NAT, a pod's policy, and a
    /// traced packet. Works while the agent runs or not; needs root.
    Inspect(nodeplane_agent::inspect::InspectArgs),
    // --- end inspect ---
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let log = init_tracing(cli.log_format, cli.log_level.as_deref())?;
    match cli.command {
        Command::Run(args) => {
            let run_matches = matches.subcommand_matches("run").expect("the run subcommand");
            let config = Config::resolve(*args, run_matches)?;
            tracing::debug!(?config, "configuration");
            nodeplane_agent::agent::run(config, log).await
        }
        Command::Uninstall { bpffs_dir } => {
            let pins = nodeplane_agent::pin::PinDir::new(&bpffs_dir);
            if !pins.root().exists() {
                println!("nothing pinned at {}", bpffs_dir.display());
                return Ok(());
            }
            anyhow::ensure!(
                !pins.in_use()?,
                "an agent is running with {}: stop it first (delete the DaemonSet)",
                bpffs_dir.display()
            );
            let removed = pins.remove_all()?;
            println!("removed {removed} pins and {}", bpffs_dir.display());
            Ok(())
        }
        Command::Inspect(args) => match nodeplane_agent::inspect::run(&args) {
            Ok(out) => {
                print!("{out}");
                Ok(())
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
    }
}

/// Installs the subscriber with its filter behind a reload layer, and returns the handle
/// on that filter. `level`: the flag's value; else RUST_LOG; else `info`.
fn init_tracing(format: LogFormat, level: Option<&str>) -> anyhow::Result<LogLevel> {
    use tracing_subscriber::{
        EnvFilter, Layer as _, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
    };
    let (directives, filter) = match level {
        Some(level) => {
            let filter = LogLevel::parse(level)
                .map_err(|e| anyhow::anyhow!("--log-level {level:?}: {e}"))?;
            (level.trim().to_string(), filter)
        }
        // RUST_LOG as before: EnvFilter's own syntax, `info` when unset or invalid.
        None => match EnvFilter::try_from_default_env() {
            Ok(filter) => (filter.to_string(), filter),
            Err(_) => ("info".to_string(), EnvFilter::new("info")),
        },
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // try_init, not set_global_default: it also forwards the `log` crate's records.
    tracing_subscriber::registry().with(filter).with(fmt).try_init()?;
    let log = LogLevel::new(&directives, move |filter: EnvFilter| {
        handle.reload(filter).map_err(|e| e.to_string())
    });
    Ok(log)
}
