//! `nodeplane-agent`: the per-node daemon.
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use nodeplane_agent::config::{Config, RunArgs};

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
    /// Load the datapath, attach it to pod interfaces and keep its maps in sync with the
    /// cluster: watched on the API server, or read from a directory of YAML (--manifests).
    ///
    /// Every setting can also come from an environment variable (shown with each flag) or
    /// from the --config file; flags win over the environment, which wins over the file.
    Run(RunArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let run_matches = matches.subcommand_matches("run").expect("the run subcommand");
            let config = Config::resolve(args, run_matches)?;
            tracing::debug!(?config, "configuration");
            nodeplane_agent::agent::run(config).await
        }
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
