//! The agent's settings: command-line flags, environment variables and an optional config
//! file, in that order of precedence, then the defaults.
//!
//! Every setting has a flag (`--node-name`) and an environment variable (`NODE_NAME`, as the
//! DaemonSet fills it from the downward API); the config file (`--config`, YAML) uses the
//! same names in camelCase, as kube-proxy's `KubeProxyConfiguration` does
//! (`healthzBindAddress`, `clusterCIDR`, ...). Unknown keys in the file are an error, so a
//! misspelt setting is not silently ignored.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{ArgMatches, parser::ValueSource};
use serde::Deserialize;

use crate::{flowlog::FlowLogOutput, model::Ipv4Cidr};

/// `nodeplane-agent run`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// YAML file with any of these settings in camelCase (e.g. `nodeName: n1`,
    /// `healthzBindAddress: 0.0.0.0:10256`). Flags and environment variables override it.
    #[arg(long, env = "NODEPLANE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Read cluster state from this directory of YAML (Services, EndpointSlices, Pods,
    /// Namespaces, Nodes, NetworkPolicies) instead of the API server; re-read when it
    /// changes. For labs and clusters without an API server.
    #[arg(long, env = "NODEPLANE_MANIFESTS", value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// Kubeconfig file for the API server. Default: the in-cluster configuration (the pod's
    /// service account and KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name, as in the Node object and in Pods' `spec.nodeName`. Default: the
    /// NODE_NAME environment variable (the DaemonSet sets it from `spec.nodeName`), else the
    /// host name, as kube-proxy does.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// The cluster's pod network (e.g. 10.244.0.0/16), as kube-proxy's --cluster-cidr. Checked
    /// and logged at start; this version does not masquerade yet, so nothing else uses it.
    #[arg(long, env = "NODEPLANE_CLUSTER_CIDR", value_name = "CIDR")]
    pub cluster_cidr: Option<Ipv4Cidr>,

    /// Where to serve /healthz and /readyz (kube-proxy's port); empty to disable.
    #[arg(long, env = "NODEPLANE_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256",
          value_parser = parse_bind, value_name = "IP:PORT")]
    pub healthz_bind_address: Bind,

    /// Where to serve Prometheus /metrics (node-local by default); empty to disable.
    #[arg(long, env = "NODEPLANE_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249",
          value_parser = parse_bind, value_name = "IP:PORT")]
    pub metrics_bind_address: Bind,

    /// /healthz fails (503) when cluster changes have waited longer than this to be
    /// programmed.
    #[arg(long, env = "NODEPLANE_HEALTHZ_TIMEOUT", default_value = "60s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub healthz_timeout: Duration,

    /// Attach the datapath to interfaces whose names start with one of these
    /// (comma-separated): the host side of pod veths, which depends on the CNI (`lxc` for
    /// the lab and Cilium, `veth` for kindnet, flannel and the bridge plugin, `cali` for
    /// Calico).
    #[arg(
        long,
        env = "NODEPLANE_IFACE_PREFIX",
        default_value = "lxc",
        value_delimiter = ',',
        value_name = "PREFIX,..."
    )]
    pub iface_prefix: Vec<String>,

    /// How often to look for changed manifests (with --manifests).
    #[arg(long, default_value = "200ms", value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval: Duration,

    /// How often to look for new pod interfaces.
    #[arg(long, default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub iface_interval: Duration,

    /// How often to log datapath counters that changed (0s: never).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub counters_interval: Duration,

    /// How often to count the entries of the conntrack maps and check every map's occupancy
    /// (warning above 90%); 0s: never. Counting a full conntrack map takes ~0.2 s, off the
    /// main loop.
    #[arg(long, env = "NODEPLANE_OCCUPANCY_INTERVAL", default_value = "10s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub occupancy_interval: Duration,

    /// How often to delete expired conntrack entries (and reply entries of ended flows);
    /// 0s: adaptive, as Cilium's conntrack GC: from 1 minute, shorter when a pass frees
    /// much of a table, longer when it frees little, between 10 s and 10 min. UDP flows of
    /// removed backends are flushed after every sync whatever this is.
    #[arg(long, env = "NODEPLANE_CONNTRACK_GC_INTERVAL", default_value = "0s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub conntrack_gc_interval: Duration,

    /// Where the programs, links and maps are pinned (on bpffs, mounted at /sys/fs/bpf if
    /// nothing is). The datapath keeps running from there while no agent runs; a restarted
    /// agent adopts it, and `nodeplane-agent uninstall` removes it.
    #[arg(long, env = "NODEPLANE_BPFFS_DIR", default_value = crate::pin::DEFAULT_DIR,
          value_name = "DIR")]
    pub bpffs_dir: std::path::PathBuf,

    // ── socket LB (socklb.rs) ──
    /// Translate host-network processes' connections to ClusterIPs at the socket
    /// (`connect`/`sendmsg`), with cgroup programs on --cgroup-root; only sockets of the
    /// agent's own network namespace are translated. `false` detaches them.
    #[arg(long, env = "NODEPLANE_SOCKET_LB", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub socket_lb: bool,

    /// The cgroup v2 directory the socket LB attaches to (its subtree is covered).
    /// Default: the root of the cgroup2 mount (/sys/fs/cgroup on a pure v2 host,
    /// /sys/fs/cgroup/unified in a hybrid layout).
    #[arg(long, env = "NODEPLANE_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    // ── end socket LB ──

    // ── north-south (external.rs) ──
    /// The node's external interfaces: NodePort, LoadBalancer and ExternalIP traffic is
    /// translated where it enters them, egress SNAT happens where it leaves. Repeatable.
    /// Default: every interface holding one of the node's addresses (the InternalIP and
    /// ExternalIP of its Node object).
    #[arg(
        long = "external-interface",
        env = "NODEPLANE_EXTERNAL_INTERFACES",
        value_delimiter = ',',
        value_name = "IFACE"
    )]
    pub external_interfaces: Vec<String>,

    /// XDP on the external interfaces: `auto` (native where the driver has it, generic
    /// otherwise), `native`, `generic`, or `off` (tc only).
    #[arg(long, env = "NODEPLANE_XDP", default_value = "auto", value_name = "MODE")]
    pub xdp: XdpMode,

    /// Masquerade pods' traffic leaving the cluster (SNAT to the node IP).
    #[arg(long, env = "NODEPLANE_MASQUERADE", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub masquerade: bool,

    /// Destinations pods reach with their own address, besides the cluster CIDR and every
    /// node's podCIDR (ip-masq-agent's nonMasqueradeCIDRs). Repeatable.
    #[arg(
        long = "non-masquerade-cidr",
        env = "NODEPLANE_NON_MASQUERADE_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub non_masquerade_cidrs: Vec<Ipv4Cidr>,

    /// Ports SNATed flows get (unique per destination). Must not overlap the NodePort range
    /// (30000-32767); should stay out of the node's ip_local_port_range (32768-60999 by
    /// default), which its own connections use. Ports of the node's listeners are skipped.
    #[arg(long, env = "NODEPLANE_MASQUERADE_PORT_RANGE", default_value = "1024-29999",
          value_parser = parse_port_range, value_name = "MIN-MAX")]
    pub masquerade_port_range: (u16, u16),

    /// Program a Service's externalIPs only inside these prefixes (repeatable). Without it
    /// every externalIP is programmed, as kube-proxy does; with it a user who may create
    /// Services cannot capture arbitrary addresses (CVE-2020-8554).
    #[arg(
        long = "external-ip-cidr",
        env = "NODEPLANE_EXTERNAL_IP_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub external_ip_cidrs: Vec<Ipv4Cidr>,

    /// Address the healthCheckNodePort servers listen on.
    #[arg(
        long,
        env = "NODEPLANE_HEALTH_CHECK_BIND_ADDRESS",
        default_value = "0.0.0.0",
        value_name = "IP"
    )]
    pub health_check_bind_address: std::net::IpAddr,
    // ── end north-south ──
    /// Capacity of the service conntrack table (`CT_V4`, an LRU: two entries per flow).
    /// Changing it on a running node creates a new table at the next start and copies the
    /// live flows into it, so established connections survive.
    #[arg(long, env = "NODEPLANE_CONNTRACK_ENTRIES",
          default_value_t = nodeplane_common::maps::MAX_CT_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216), value_name = "N")]
    pub conntrack_entries: u32,

    /// Where the agent writes files about its state for `nodeplane-agent inspect`: the
    /// names snapshot (names.json: Services, pods, identities, policy sets and rules by
    /// number), rewritten atomically after a sync that changed them.
    #[arg(long, env = "NODEPLANE_STATE_DIR", default_value = crate::inspect::DEFAULT_STATE_DIR,
          value_name = "DIR")]
    pub state_dir: std::path::PathBuf,

    /// Log NetworkPolicy verdicts as JSON lines (one object per denied packet, and per
    /// allowed new flow with --flow-log-allowed) to this file (appended to, created 0640) or
    /// to stdout with `-`. Default: off. The line format is in docs/METRICS.md.
    #[arg(long, env = "NODEPLANE_FLOW_LOG", value_name = "PATH|-")]
    pub flow_log: Option<String>,

    /// With --flow-log: also log allowed new flows into and out of isolated pods, not only
    /// denied packets.
    #[arg(
        long,
        env = "NODEPLANE_FLOW_LOG_ALLOWED",
        value_name = "BOOL",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::value_parser!(bool)
    )]
    pub flow_log_allowed: bool,

    /// With --flow-log: verdicts per second written as their own line. Above it, verdicts
    /// are counted per (source, destination, port, protocol, verdict) and written as one
    /// line with a count at the end of each second, so a flood cannot fill the disk or
    /// load the node. 0: only those summary lines.
    #[arg(long, env = "NODEPLANE_FLOW_LOG_RATE", default_value = "1000", value_name = "EVENTS/S")]
    pub flow_log_rate: u32,

    /// With --flow-log: verdicts written at once after a quiet period (the token bucket's
    /// size). Default: twice --flow-log-rate.
    #[arg(long, env = "NODEPLANE_FLOW_LOG_BURST", value_name = "EVENTS")]
    pub flow_log_burst: Option<u32>,
}

/// A bind address, or none to disable a server.
pub type Bind = Option<SocketAddr>;

fn parse_bind(s: &str) -> Result<Bind, String> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| format!("{s:?} is not IP:PORT"))
}

/// `250ms`, `10s`, `5m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    }
}

/// The config file: every setting optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileConfig {
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    healthz_timeout: Option<String>,
    iface_prefix: Option<Vec<String>>,
    poll_interval: Option<String>,
    iface_interval: Option<String>,
    counters_interval: Option<String>,
    occupancy_interval: Option<String>,
    conntrack_gc_interval: Option<String>,
    bpffs_dir: Option<String>,
    conntrack_entries: Option<u32>,
    state_dir: Option<String>,
    socket_lb: Option<bool>,
    cgroup_root: Option<PathBuf>,
    external_interfaces: Option<Vec<String>>,
    xdp: Option<String>,
    masquerade: Option<bool>,
    #[serde(rename = "nonMasqueradeCIDRs")]
    non_masquerade_cidrs: Option<Vec<String>>,
    masquerade_port_range: Option<String>,
    #[serde(rename = "externalIPCIDRs")]
    external_ip_cidrs: Option<Vec<String>>,
    health_check_bind_address: Option<String>,
    flow_log: Option<String>,
    flow_log_allowed: Option<bool>,
    flow_log_rate: Option<u32>,
    flow_log_burst: Option<u32>,
}

/// Where cluster state comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A directory of YAML, polled.
    Files { dir: PathBuf, poll_interval: Duration },
    /// The API server: from a kubeconfig file, or in-cluster.
    Api { kubeconfig: Option<PathBuf> },
}

/// `--xdp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
    /// No XDP: tc does everything.
    Off,
}

/// `MIN-MAX`, 1 <= MIN <= MAX.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let min: u16 = a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?;
    let max: u16 = b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?;
    if min == 0 || min > max {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

/// The north-south settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ExternalConfig {
    /// Empty: the interfaces holding the node's addresses.
    pub interfaces: Vec<String>,
    pub xdp: XdpMode,
    pub masquerade: bool,
    pub non_masquerade_cidrs: Vec<Ipv4Cidr>,
    pub port_range: (u16, u16),
    /// `None`: every externalIP is programmed.
    pub external_ip_allow: Option<Vec<Ipv4Cidr>>,
    pub health_check_bind: std::net::IpAddr,
}

/// The resolved settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub source: Source,
    /// Known when given or read from the host name; `None` only with the file source and
    /// no name given (then `internalTrafficPolicy: Local` acts as `Cluster`).
    pub node_name: Option<String>,
    pub cluster_cidr: Option<Ipv4Cidr>,
    pub healthz_bind_address: Bind,
    pub metrics_bind_address: Bind,
    pub healthz_timeout: Duration,
    pub iface_prefixes: Vec<String>,
    pub iface_interval: Duration,
    pub counters_interval: Duration,
    /// 0: no map census.
    pub occupancy_interval: Duration,
    /// The conntrack expiry pass's interval.
    pub conntrack_gc: crate::ctgc::Interval,
    pub bpffs_dir: std::path::PathBuf,
    pub conntrack_entries: u32,
    /// Where `inspect`'s names snapshot is written.
    pub state_dir: std::path::PathBuf,
    /// `None`: no flow log (`--flow-log` not given or empty).
    pub flow_log: Option<FlowLogConfig>,
    /// NodePort, LoadBalancer, ExternalIPs, masquerade, XDP.
    pub external: ExternalConfig,
    /// The socket LB of host-network clients ([`crate::socklb`]) is on.
    pub socket_lb: bool,
    /// `--cgroup-root`; `None`: the cgroup2 mount's root.
    pub cgroup_root: Option<PathBuf>,
}

/// The NetworkPolicy verdict log's settings ([`crate::flowlog`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogConfig {
    pub output: FlowLogOutput,
    /// Log allowed new flows too: the datapath needs [`FlowLogConfig::policy_flags`] in
    /// `PolicyConfig.flags` for it.
    pub log_allowed: bool,
    /// Events per second written as their own line.
    pub rate: u32,
    /// Token bucket size.
    pub burst: u32,
}

impl FlowLogConfig {
    /// The `POLICY_CFG_F_*` bits the flow log asks of the datapath.
    pub fn policy_flags(config: Option<&Self>) -> u32 {
        use nodeplane_common::policy::{POLICY_CFG_F_EVENTS, POLICY_CFG_F_LOG_ALLOWED};
        match config {
            Some(c) if c.log_allowed => POLICY_CFG_F_EVENTS | POLICY_CFG_F_LOG_ALLOWED,
            Some(_) => POLICY_CFG_F_EVENTS,
            None => 0,
        }
    }
}

impl Config {
    /// Resolves `args` (parsed from `matches`, which tells where each value came from) with
    /// the config file, if any.
    pub fn resolve(args: RunArgs, matches: &ArgMatches) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, matches, file)
    }

    fn merge(mut args: RunArgs, matches: &ArgMatches, file: FileConfig) -> anyhow::Result<Self> {
        // A value given on the command line or in the environment wins over the file.
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        let bad = |key: &str, e: String| anyhow::anyhow!("config file: {key}: {e}");
        macro_rules! from_file {
            ($field:ident, $key:literal, |$v:ident| $conv:expr) => {
                if !given(stringify!($field)) {
                    if let Some($v) = file.$field {
                        args.$field = $conv.map_err(|e: String| bad($key, e))?;
                    }
                }
            };
        }
        from_file!(manifests, "manifests", |v| Ok(Some(v)));
        from_file!(kubeconfig, "kubeconfig", |v| Ok(Some(v)));
        from_file!(node_name, "nodeName", |v| Ok(Some(v)));
        from_file!(cluster_cidr, "clusterCIDR", |v| v
            .parse::<Ipv4Cidr>()
            .map(Some)
            .map_err(|e| e.to_string()));
        from_file!(healthz_bind_address, "healthzBindAddress", |v| parse_bind(&v));
        from_file!(metrics_bind_address, "metricsBindAddress", |v| parse_bind(&v));
        from_file!(healthz_timeout, "healthzTimeout", |v| parse_duration(&v));
        from_file!(iface_prefix, "ifacePrefix", |v| Ok(v));
        from_file!(poll_interval, "pollInterval", |v| parse_duration(&v));
        from_file!(iface_interval, "ifaceInterval", |v| parse_duration(&v));
        from_file!(counters_interval, "countersInterval", |v| parse_duration(&v));
        from_file!(occupancy_interval, "occupancyInterval", |v| parse_duration(&v));
        from_file!(conntrack_gc_interval, "conntrackGcInterval", |v| parse_duration(&v));
        from_file!(bpffs_dir, "bpffsDir", |v| Ok(std::path::PathBuf::from(v)));
        from_file!(conntrack_entries, "conntrackEntries", |v| ct_entries(v));
        from_file!(state_dir, "stateDir", |v| Ok(std::path::PathBuf::from(v)));
        from_file!(socket_lb, "socketLb", |v| Ok(v));
        from_file!(cgroup_root, "cgroupRoot", |v| Ok(Some(v)));
        from_file!(external_interfaces, "externalInterfaces", |v| Ok(v));
        from_file!(xdp, "xdp", |v| <XdpMode as clap::ValueEnum>::from_str(&v, false));
        from_file!(masquerade, "masquerade", |v| Ok(v));
        from_file!(non_masquerade_cidrs, "nonMasqueradeCIDRs", |v| cidrs(&v));
        from_file!(masquerade_port_range, "masqueradePortRange", |v| parse_port_range(&v));
        from_file!(external_ip_cidrs, "externalIPCIDRs", |v| cidrs(&v));
        from_file!(health_check_bind_address, "healthCheckBindAddress", |v| v
            .parse::<std::net::IpAddr>()
            .map_err(|e| e.to_string()));
        from_file!(flow_log, "flowLog", |v| Ok(Some(v)));
        from_file!(flow_log_allowed, "flowLogAllowed", |v| Ok(v));
        from_file!(flow_log_rate, "flowLogRate", |v| Ok(v));
        from_file!(flow_log_burst, "flowLogBurst", |v| Ok(Some(v)));

        let node_name = args.node_name.filter(|n| !n.is_empty());
        let (source, node_name) = match args.manifests {
            Some(dir) => (Source::Files { dir, poll_interval: args.poll_interval }, node_name),
            None => {
                let node_name = match node_name {
                    Some(n) => n,
                    None => host_name().context(
                        "no --node-name (or NODE_NAME) given and the host name is unreadable",
                    )?,
                };
                (Source::Api { kubeconfig: args.kubeconfig }, Some(node_name))
            }
        };
        let iface_prefixes: Vec<String> =
            args.iface_prefix.into_iter().filter(|p| !p.is_empty()).collect();
        anyhow::ensure!(!iface_prefixes.is_empty(), "--iface-prefix: at least one prefix needed");
        let flow_log_burst =
            args.flow_log_burst.unwrap_or_else(|| args.flow_log_rate.saturating_mul(2));
        anyhow::ensure!(
            args.flow_log_rate == 0 || flow_log_burst > 0,
            "--flow-log-burst: at least 1 with a --flow-log-rate above 0"
        );
        // A path, `-` for stdout, or empty for off (so an environment variable or the file
        // can turn it off).
        let output = args.flow_log.filter(|s| !s.is_empty()).map(|s| s.parse());
        let output = output.transpose().map_err(|e| anyhow::anyhow!("--flow-log: {e}"))?;
        let flow_log = output.map(|output| FlowLogConfig {
            output,
            log_allowed: args.flow_log_allowed,
            rate: args.flow_log_rate,
            burst: flow_log_burst,
        });
        let (min, max) = args.masquerade_port_range;
        anyhow::ensure!(
            max < 30_000 || min > 32_767,
            "--masquerade-port-range {min}-{max} overlaps the NodePort range 30000-32767"
        );
        let external = ExternalConfig {
            interfaces: args.external_interfaces.into_iter().filter(|i| !i.is_empty()).collect(),
            xdp: args.xdp,
            masquerade: args.masquerade,
            non_masquerade_cidrs: args.non_masquerade_cidrs,
            port_range: args.masquerade_port_range,
            external_ip_allow: (!args.external_ip_cidrs.is_empty())
                .then_some(args.external_ip_cidrs),
            health_check_bind: args.health_check_bind_address,
        };
        Ok(Self {
            external,
            source,
            node_name,
            cluster_cidr: args.cluster_cidr,
            healthz_bind_address: args.healthz_bind_address,
            metrics_bind_address: args.metrics_bind_address,
            healthz_timeout: args.healthz_timeout,
            iface_prefixes,
            iface_interval: args.iface_interval,
            counters_interval: args.counters_interval,
            occupancy_interval: args.occupancy_interval,
            conntrack_gc: crate::ctgc::Interval::from_flag(args.conntrack_gc_interval),
            bpffs_dir: args.bpffs_dir,
            conntrack_entries: args.conntrack_entries,
            state_dir: args.state_dir,
            flow_log,
            socket_lb: args.socket_lb,
            cgroup_root: args.cgroup_root.filter(|p| !p.as_os_str().is_empty()),
        })
    }
}

/// A list of CIDRs in the file.
fn cidrs(v: &[String]) -> Result<Vec<Ipv4Cidr>, String> {
    v.iter().map(|c| c.parse::<Ipv4Cidr>().map_err(|e| e.to_string())).collect()
}

/// `conntrackEntries` in the file: the flag's range.
fn ct_entries(v: u32) -> Result<u32, String> {
    if (1024..=16_777_216).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not in 1024..=16777216"))
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// The host name in lower case, as kube-proxy derives the node name.
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let name = name.trim().to_lowercase();
    anyhow::ensure!(!name.is_empty(), "empty host name");
    Ok(name)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn resolve(argv: &[&str], file: &str) -> anyhow::Result<Config> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("agent").chain(argv.iter().copied()))?;
        let args = Cli::from_arg_matches(&matches)?.run;
        let file: FileConfig =
            if file.is_empty() { FileConfig::default() } else { serde_yaml::from_str(file)? };
        Config::merge(args, &matches, file)
    }

    #[test]
    fn defaults_are_kube_proxys_ports() {
        let c = resolve(&["--node-name", "n1"], "").unwrap();
        assert_eq!(
            c.source,
            Source::Api { kubeconfig: std::env::var_os("KUBECONFIG").map(PathBuf::from) }
        );
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(c.iface_prefixes, ["lxc"]);
    }

    #[test]
    fn the_file_beats_defaults_and_flags_beat_the_file() {
        let file = "nodeName: from-file\nmetricsBindAddress: 0.0.0.0:9999\n\
                    clusterCIDR: 10.244.0.0/16\nifacePrefix: [veth, cali]\nhealthzTimeout: 5s\n";
        let c = resolve(&["--node-name", "from-flag"], file).unwrap();
        assert_eq!(c.node_name.as_deref(), Some("from-flag"));
        assert_eq!(c.metrics_bind_address, Some("0.0.0.0:9999".parse().unwrap()));
        assert_eq!(c.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.iface_prefixes, ["veth", "cali"]);
        assert_eq!(c.healthz_timeout, Duration::from_secs(5));
        let c = resolve(&["--metrics-bind-address", "127.0.0.1:1"], file).unwrap();
        assert_eq!(c.metrics_bind_address, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(c.node_name.as_deref(), Some("from-file"));
    }

    #[test]
    fn empty_bind_address_disables_a_server() {
        let c = resolve(&["--node-name=n", "--metrics-bind-address="], "").unwrap();
        assert_eq!(c.metrics_bind_address, None);
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let e = resolve(&["--node-name=n"], "nodeNmae: typo\n").unwrap_err();
        assert!(e.to_string().contains("nodeNmae"), "{e:#}");
        let e = resolve(&["--node-name=n"], "clusterCIDR: 10.244.0.1/16\n").unwrap_err();
        assert!(e.to_string().contains("clusterCIDR"), "{e:#}");
        assert!(resolve(&["--cluster-cidr", "10.0.0.0/33"], "").is_err());
        assert!(resolve(&["--healthz-bind-address", "10256"], "").is_err());
        assert!(resolve(&["--node-name=n", "--iface-prefix="], "").is_err());
    }

    #[test]
    fn manifests_select_the_file_source_and_need_no_node_name() {
        let c = resolve(&["--manifests", "/tmp/m"], "").unwrap();
        assert_eq!(
            c.source,
            Source::Files { dir: "/tmp/m".into(), poll_interval: Duration::from_millis(200) }
        );
        let c = resolve(&[], "manifests: /tmp/x\nnodeName: n2\n").unwrap();
        assert_eq!(c.node_name.as_deref(), Some("n2"));
        assert!(matches!(c.source, Source::Files { .. }));
    }

    #[test]
    fn the_flow_log_is_off_by_default_and_configurable() {
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert_eq!(c.flow_log, None);
        assert_eq!(FlowLogConfig::policy_flags(c.flow_log.as_ref()), 0);
        // An empty value (e.g. an empty environment variable) is off too.
        assert_eq!(resolve(&["--node-name=n", "--flow-log="], "").unwrap().flow_log, None);

        let c = resolve(&["--node-name=n", "--flow-log", "-"], "").unwrap();
        let want = FlowLogConfig {
            output: FlowLogOutput::Stdout,
            log_allowed: false,
            rate: 1000,
            burst: 2000,
        };
        assert_eq!(c.flow_log, Some(want));
        assert_eq!(
            FlowLogConfig::policy_flags(c.flow_log.as_ref()),
            nodeplane_common::policy::POLICY_CFG_F_EVENTS
        );

        let c = resolve(
            &[
                "--node-name=n",
                "--flow-log=/var/log/flows.log",
                "--flow-log-allowed",
                "--flow-log-rate=10",
            ],
            "",
        )
        .unwrap();
        let want = FlowLogConfig {
            output: FlowLogOutput::File("/var/log/flows.log".into()),
            log_allowed: true,
            rate: 10,
            burst: 20,
        };
        assert_eq!(c.flow_log.as_ref(), Some(&want));
        assert_eq!(
            FlowLogConfig::policy_flags(c.flow_log.as_ref()),
            nodeplane_common::policy::POLICY_CFG_F_EVENTS
                | nodeplane_common::policy::POLICY_CFG_F_LOG_ALLOWED
        );
        let c =
            resolve(&["--node-name=n", "--flow-log=-", "--flow-log-allowed=false"], "").unwrap();
        assert!(!c.flow_log.unwrap().log_allowed);
    }

    #[test]
    fn flow_log_settings_come_from_the_file_and_flags_beat_it() {
        let file = "flowLog: /tmp/f.log\nflowLogAllowed: true\nflowLogRate: 5\nflowLogBurst: 7\n";
        let c = resolve(&["--node-name=n"], file).unwrap();
        let want = FlowLogConfig {
            output: FlowLogOutput::File("/tmp/f.log".into()),
            log_allowed: true,
            rate: 5,
            burst: 7,
        };
        assert_eq!(c.flow_log, Some(want));
        let c = resolve(&["--node-name=n", "--flow-log=-", "--flow-log-rate=50"], file).unwrap();
        let got = c.flow_log.unwrap();
        assert_eq!((got.output, got.rate, got.burst), (FlowLogOutput::Stdout, 50, 7));
        // The burst follows a rate from the file when not given.
        let c = resolve(&["--node-name=n"], "flowLog: \"-\"\nflowLogRate: 3\n").unwrap();
        assert_eq!(c.flow_log.unwrap().burst, 6);
        // The file can turn it off again with an empty value.
        assert_eq!(resolve(&["--node-name=n"], "flowLog: \"\"\n").unwrap().flow_log, None);
    }

    #[test]
    fn state_dir_from_flag_file_and_default() {
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert_eq!(c.state_dir, std::path::PathBuf::from("/run/nodeplane"));
        let c = resolve(&["--node-name=n"], "stateDir: /var/run/np\n").unwrap();
        assert_eq!(c.state_dir, std::path::PathBuf::from("/var/run/np"));
        let c =
            resolve(&["--node-name=n", "--state-dir=/tmp/x"], "stateDir: /var/run/np\n").unwrap();
        assert_eq!(c.state_dir, std::path::PathBuf::from("/tmp/x"), "the flag wins");
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("[env: NODEPLANE_STATE_DIR"), "{help}");
    }

    #[test]
    fn conntrack_entries_from_flag_file_and_default_within_range() {
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert_eq!(c.conntrack_entries, nodeplane_common::maps::MAX_CT_ENTRIES);
        let c = resolve(&["--node-name=n"], "conntrackEntries: 65536\n").unwrap();
        assert_eq!(c.conntrack_entries, 65536);
        let c =
            resolve(&["--node-name=n", "--conntrack-entries=4096"], "conntrackEntries: 65536\n")
                .unwrap();
        assert_eq!(c.conntrack_entries, 4096, "the flag wins");
        let e = resolve(&["--node-name=n"], "conntrackEntries: 10\n").unwrap_err();
        assert!(format!("{e:#}").contains("conntrackEntries"), "{e:#}");
        assert!(resolve(&["--node-name=n", "--conntrack-entries=10"], "").is_err());
    }

    #[test]
    fn occupancy_interval_from_flag_env_file_and_default() {
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert_eq!(c.occupancy_interval, Duration::from_secs(10));
        let c = resolve(&["--node-name=n"], "occupancyInterval: 30s\n").unwrap();
        assert_eq!(c.occupancy_interval, Duration::from_secs(30));
        let c = resolve(&["--node-name=n", "--occupancy-interval=0s"], "occupancyInterval: 30s\n")
            .unwrap();
        assert_eq!(c.occupancy_interval, Duration::ZERO, "0 turns it off; the flag wins");
        assert!(resolve(&["--node-name=n", "--occupancy-interval=often"], "").is_err());
        let e = resolve(&["--node-name=n"], "occupancyInterval: 5h\n").unwrap_err();
        assert!(format!("{e:#}").contains("occupancyInterval"), "{e:#}");
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("[env: NODEPLANE_OCCUPANCY_INTERVAL"), "{help}");
    }

    #[test]
    fn conntrack_gc_interval_is_adaptive_unless_set() {
        use crate::ctgc::Interval;
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert_eq!(c.conntrack_gc, Interval::Adaptive);
        let c = resolve(&["--node-name=n"], "conntrackGcInterval: 30s\n").unwrap();
        assert_eq!(c.conntrack_gc, Interval::Fixed(Duration::from_secs(30)));
        let c =
            resolve(&["--node-name=n", "--conntrack-gc-interval=2s"], "conntrackGcInterval: 30s\n")
                .unwrap();
        assert_eq!(c.conntrack_gc, Interval::Fixed(Duration::from_secs(2)), "the flag wins");
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("[env: NODEPLANE_CONNTRACK_GC_INTERVAL"), "{help}");
    }

    #[test]
    fn bad_flow_log_settings_are_errors() {
        assert!(resolve(&["--node-name=n", "--flow-log-rate=-1"], "").is_err());
        assert!(resolve(&["--node-name=n", "--flow-log-rate=fast"], "").is_err());
        assert!(resolve(&["--node-name=n", "--flow-log=-", "--flow-log-burst=0"], "").is_err());
        let e = resolve(&["--node-name=n"], "flowLogRate: many\n").unwrap_err();
        assert!(format!("{e:#}").contains("flowLogRate"), "{e:#}");
        // Rate 0 (summaries only) needs no burst.
        let c = resolve(&["--node-name=n", "--flow-log=-", "--flow-log-rate=0"], "").unwrap();
        assert_eq!(c.flow_log.map(|f| (f.rate, f.burst)), Some((0, 0)));
    }

    #[test]
    fn flow_log_flags_are_explained_in_help() {
        let help = Cli::command().render_long_help().to_string();
        for (flag, env) in [
            ("--flow-log <PATH|->", "NODEPLANE_FLOW_LOG"),
            ("--flow-log-allowed", "NODEPLANE_FLOW_LOG_ALLOWED"),
            ("--flow-log-rate <EVENTS/S>", "NODEPLANE_FLOW_LOG_RATE"),
            ("--flow-log-burst <EVENTS>", "NODEPLANE_FLOW_LOG_BURST"),
        ] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
            assert!(help.contains(&format!("[env: {env}")), "{env} missing from:\n{help}");
        }
    }

    // ── socket LB ──
    #[test]
    fn socket_lb_is_on_by_default_and_turns_off() {
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert!(c.socket_lb);
        assert_eq!(c.cgroup_root, None);
        let c = resolve(&["--node-name=n", "--socket-lb=false", "--cgroup-root=/cg"], "").unwrap();
        assert!(!c.socket_lb);
        assert_eq!(c.cgroup_root.as_deref(), Some(Path::new("/cg")));
        let c = resolve(&["--node-name=n"], "socketLb: false\ncgroupRoot: /x\n").unwrap();
        assert!(!c.socket_lb);
        assert_eq!(c.cgroup_root.as_deref(), Some(Path::new("/x")));
        let c = resolve(&["--node-name=n", "--socket-lb=true"], "socketLb: false\n").unwrap();
        assert!(c.socket_lb, "the flag wins");
    }

    #[test]
    fn north_south_settings_from_flags_and_file_with_their_checks() {
        let c = resolve(&["--node-name=n"], "").unwrap();
        assert_eq!(c.external.xdp, XdpMode::Auto);
        assert!(c.external.masquerade);
        assert_eq!(c.external.port_range, (1024, 29_999));
        assert_eq!(c.external.external_ip_allow, None, "kube-proxy programs every externalIP");
        let c = resolve(
            &[
                "--node-name=n",
                "--xdp=off",
                "--external-interface=eth0,eth1",
                "--external-ip-cidr=203.0.113.0/24",
                "--non-masquerade-cidr=10.0.0.0/8",
                "--masquerade-port-range=40000-50000",
            ],
            "",
        )
        .unwrap();
        assert_eq!(c.external.xdp, XdpMode::Off);
        assert_eq!(c.external.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.external.external_ip_allow, Some(vec!["203.0.113.0/24".parse().unwrap()]));
        assert_eq!(c.external.non_masquerade_cidrs, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(c.external.port_range, (40_000, 50_000));
        let file = "xdp: generic\nmasquerade: false\nexternalIPCIDRs: [198.51.100.0/24]\n\
                    masqueradePortRange: 33000-34000\nhealthCheckBindAddress: 10.0.0.1\n";
        let c = resolve(&["--node-name=n"], file).unwrap();
        assert_eq!(c.external.xdp, XdpMode::Generic);
        assert!(!c.external.masquerade);
        assert_eq!(c.external.port_range, (33_000, 34_000));
        assert_eq!(c.external.health_check_bind.to_string(), "10.0.0.1");
        let err = resolve(&["--node-name=n", "--masquerade-port-range=30000-40000"], "");
        assert!(err.unwrap_err().to_string().contains("NodePort range"));
        assert!(resolve(&["--node-name=n", "--masquerade-port-range=5-4"], "").is_err());
        assert!(resolve(&["--node-name=n"], "xdp: turbo\n").is_err());
    }
}
