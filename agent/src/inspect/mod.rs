//! `nodeplane-agent inspect`: what the datapath holds and does, read from the maps and
//! programs the agent pinned on bpffs ([`crate::pin`]), whether an agent runs or not.
//!
//! ```text
//!  <bpffs-dir>/maps/*  ──pinned::Pins──▶ services · conntrack · nat · policy  (read only)
//!  <bpffs-dir>/progs/* ──BPF_PROG_TEST_RUN──▶ trace  (a crafted packet through the real programs)
//!  <state-dir>/names.json (names::NamesSnapshot, written by the agent) ──▶ names for the numbers
//!        │
//!        ▼
//!  one report type per subcommand (serde) ──▶ -o table (table::Table) | -o json
//! ```
//!
//! Every subcommand builds a plain report from map contents (pure functions, unit-tested
//! without a kernel), then prints it as an aligned table or as JSON. The names snapshot is
//! optional: without it every number is printed as a number and pods are given by IP.
//! docs/INSPECT.md is the user's guide.
pub mod conntrack;
pub mod names;
pub mod packet;
pub mod pinned;
pub mod policy;
pub mod services;
pub mod table;
pub mod testrun;
pub mod trace;

use std::{net::SocketAddrV4, path::PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP, names as map_names},
    policy::{IPPROTO_ICMP, IPPROTO_SCTP},
};
use serde::Serialize;

use self::{
    names::{NameIndex, NamesSnapshot},
    pinned::{InspectError, PinnedMaps, Pins, monotonic_ns},
};
use crate::policy::compute::PolicyLookup as _;

/// Default `--state-dir` of the agent: where it writes the names snapshot.
pub const DEFAULT_STATE_DIR: &str = "/run/nodeplane";

/// `nodeplane-agent inspect`'s flags.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct InspectArgs {
    /// Where the agent pins the datapath: its --bpffs-dir.
    #[arg(long, env = "NODEPLANE_BPFFS_DIR", default_value = crate::pin::DEFAULT_DIR,
          value_name = "DIR", global = true)]
    pub bpffs_dir: PathBuf,

    /// Where the agent writes its names snapshot (names.json): its --state-dir. Without
    /// the file, numbers are printed as numbers and pods must be given by IP.
    #[arg(long, env = "NODEPLANE_STATE_DIR", default_value = DEFAULT_STATE_DIR,
          value_name = "DIR", global = true)]
    pub state_dir: PathBuf,

    /// Output: aligned tables for people, or JSON for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,

    #[command(subcommand)]
    pub command: InspectCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum InspectCommand {
    /// Every frontend (ClusterIP:port/protocol) with its backends, the share of slots
    /// each holds, and the live flows on each (from conntrack: the datapath counts packets
    /// per hook and reason, not per Service).
    Services,
    /// Conntrack entries of both maps: the service conntrack (CT_V4: ORIGINAL and REPLY
    /// entries with their translation) and the policy conntrack (POLICY_CT_V4: which checks
    /// passed, at which policy revision), with state, time to expiry and idle time.
    Conntrack(CtArgs),
    /// The node's address translations, one line per flow. There is no SNAT table yet:
    /// these are the service DNAT entries (ORIGINAL) and their reverse NAT (REPLY) of
    /// CT_V4, seen as translations.
    Nat(CtArgs),
    /// The identity of a pod and, for a pod of this node, the policy sets and allow
    /// entries in force for each direction, with the policies and rules behind them.
    Policy {
        /// The pod: namespace/name (needs the names snapshot) or its IP.
        #[arg(value_name = "POD|IP")]
        pod: String,
    },
    /// Runs a crafted packet (a TCP SYN or a UDP datagram) through the pinned programs with
    /// BPF_PROG_TEST_RUN, as the kernel would on the pod interfaces, and prints the decision
    /// path: the frontend matched, the backend chosen, the policy verdicts and the final
    /// verdict. Side effects as for a real first packet: conntrack entries (deleted
    /// afterwards unless --keep-conntrack), counters (kept), and a flow-log line when a
    /// policy drops it. Needs the agent's first sync done (programs pinned).
    Trace(TraceArgs),
}

#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct CtArgs {
    /// Only entries with this address (source, destination or translation).
    #[arg(long)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Only entries with this port (source, destination or translation).
    #[arg(long)]
    pub port: Option<u16>,
    /// Only this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<Proto>,
    /// Also expired entries (the LRU maps keep them until evicted; they count for nothing).
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct TraceArgs {
    /// The sender: a pod as namespace/name (needs the names snapshot) or an IP (a pod's,
    /// this host's, or any other).
    #[arg(long, value_name = "POD|IP")]
    pub from: String,
    /// Where the packet goes: a ClusterIP and port, or any address and port.
    #[arg(long, value_name = "IP:PORT")]
    pub to: SocketAddrV4,
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
    /// Source port. Default: a random free one in 61000-65535, above Linux's ephemeral
    /// range, so the trace never meets a real flow.
    #[arg(long)]
    pub sport: Option<u16>,
    /// Leave the conntrack entries the trace created (e.g. to look at them with
    /// `inspect conntrack`); they expire like any first packet's.
    #[arg(long)]
    pub keep_conntrack: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

/// `TCP`, `UDP`, `SCTP`, `ICMP`, or the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        IPPROTO_ICMP => "ICMP".into(),
        other => other.to_string(),
    }
}

/// Runs a subcommand and returns what to print.
pub fn run(args: &InspectArgs) -> Result<String, InspectError> {
    let pins = Pins::open(&args.bpffs_dir)?;
    let mut maps = pins.maps()?;
    let names = NameIndex::new(NamesSnapshot::read(&args.state_dir)?);
    let out = match &args.command {
        InspectCommand::Services => {
            let tables = services::ServiceTables {
                services: PinnedMaps::all(&maps.services, map_names::SERVICES_V4)?,
                slots: PinnedMaps::all(&maps.slots, map_names::BACKEND_SLOTS)?,
                backends: PinnedMaps::all(&maps.backends, map_names::BACKENDS_V4)?,
                ct: PinnedMaps::all(&maps.ct, map_names::CT_V4)?,
                now_ns: monotonic_ns(),
            };
            let r = services::report(&tables, &names);
            render(args.output, &r, services::table)
        }
        InspectCommand::Conntrack(ct) | InspectCommand::Nat(ct) => {
            let tables = conntrack::CtTables {
                ct: PinnedMaps::all(&maps.ct, map_names::CT_V4)?,
                policy_ct: PinnedMaps::all(&maps.policy_ct, map_names::POLICY_CT_V4)?,
                nat: match &args.command {
                    InspectCommand::Nat(_) => PinnedMaps::all(&maps.nat, map_names::NAT_V4)?,
                    _ => Default::default(),
                },
                now_ns: monotonic_ns(),
                revision: maps.policy_revision()?,
            };
            let filter = conntrack::Filter {
                ip: ct.ip,
                port: ct.port,
                proto: ct.proto.map(Proto::number),
                all: ct.all,
            };
            match &args.command {
                InspectCommand::Nat(_) => render(
                    args.output,
                    &conntrack::nat(&tables, &filter, &names),
                    conntrack::nat_table,
                ),
                _ => render(
                    args.output,
                    &conntrack::conntrack(&tables, &filter, &names),
                    conntrack::conntrack_table,
                ),
            }
        }
        InspectCommand::Policy { pod } => {
            let ip = trace::resolve(pod, &names)?;
            let facts = policy::PolicyFacts {
                ip: Some(ip),
                endpoint: maps.endpoint(ip),
                identity: maps.ipcache(ip),
                entries: maps.policy_entries()?,
                revision: maps.policy_revision()?,
            };
            let name = names.pod_at(ip).map(|p| p.pod.clone());
            render(args.output, &policy::report(name, ip, &facts, &names), policy::table)
        }
        InspectCommand::Trace(t) => {
            let progs = pins.programs()?;
            let req = trace::TraceRequest {
                from: t.from.clone(),
                to: t.to,
                proto: t.proto.number(),
                sport: t.sport,
                keep_conntrack: t.keep_conntrack,
            };
            let r = trace::trace(&pins, &mut maps, &progs, &names, &req)?;
            render(args.output, &r, trace::table)
        }
    };
    let stale = names.snapshot().map(|s| s.written_at);
    Ok(match (args.output, stale) {
        (Output::Table, None) => {
            format!("{out}\n(no names snapshot in {}: numbers only)\n", args.state_dir.display())
        }
        _ => out,
    })
}

fn render<T: Serialize>(output: Output, report: &T, table: impl Fn(&T) -> String) -> String {
    match output {
        Output::Table => table(report),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(report).expect("reports serialize");
            s.push('\n');
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Subcommand, Debug)]
    enum Top {
        Inspect(InspectArgs),
    }

    fn parse(args: &[&str]) -> Result<InspectArgs, clap::Error> {
        let argv = std::iter::once("agent").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| match c.cmd {
            Top::Inspect(a) => a,
        })
    }

    #[test]
    fn defaults_and_global_flags_after_the_subcommand() {
        let a = parse(&["inspect", "services"]).unwrap();
        assert_eq!(a.bpffs_dir, PathBuf::from(crate::pin::DEFAULT_DIR));
        assert_eq!(a.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!((a.output, a.command), (Output::Table, InspectCommand::Services));
        let a = parse(&["inspect", "services", "-o", "json", "--bpffs-dir", "/x"]).unwrap();
        assert_eq!((a.output, a.bpffs_dir), (Output::Json, PathBuf::from("/x")));
        assert!(parse(&["inspect", "-o", "yaml", "services"]).is_err());
    }

    #[test]
    fn conntrack_filters() {
        let a = parse(&[
            "inspect",
            "conntrack",
            "--ip",
            "10.0.0.1",
            "--port",
            "80",
            "--proto",
            "udp",
            "--all",
        ])
        .unwrap();
        let InspectCommand::Conntrack(ct) = a.command else { panic!("{:?}", a.command) };
        assert_eq!(ct.ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!((ct.port, ct.proto, ct.all), (Some(80), Some(Proto::Udp), true));
        assert!(parse(&["inspect", "nat", "--ip", "not-an-ip"]).is_err());
        assert!(matches!(parse(&["inspect", "nat"]).unwrap().command, InspectCommand::Nat(_)));
    }

    #[test]
    fn trace_arguments() {
        let a = parse(&["inspect", "trace", "--from", "x/a", "--to", "10.96.0.10:80"]).unwrap();
        let InspectCommand::Trace(t) = a.command else { panic!() };
        assert_eq!(
            (t.from.as_str(), t.proto, t.sport, t.keep_conntrack),
            ("x/a", Proto::Tcp, None, false)
        );
        assert_eq!(t.to, "10.96.0.10:80".parse().unwrap());
        let a = parse(&[
            "inspect",
            "-o",
            "json",
            "trace",
            "--from",
            "10.0.0.1",
            "--to",
            "10.96.0.10:53",
            "--proto",
            "udp",
            "--sport",
            "61001",
        ])
        .unwrap();
        let InspectCommand::Trace(t) = a.command else { panic!() };
        assert_eq!((t.proto, t.sport, a.output), (Proto::Udp, Some(61001), Output::Json));
        assert!(
            parse(&["inspect", "trace", "--from", "x/a", "--to", "10.96.0.10"]).is_err(),
            "a port is needed"
        );
        assert!(parse(&["inspect", "trace", "--to", "10.96.0.10:80"]).is_err(), "--from is needed");
        assert!(parse(&["inspect", "policy"]).is_err());
        assert_eq!(
            parse(&["inspect", "policy", "x/a"]).unwrap().command,
            InspectCommand::Policy { pod: "x/a".into() }
        );
    }

    #[test]
    fn json_and_table_rendering() {
        #[derive(Serialize)]
        struct R {
            a: u32,
        }
        assert_eq!(render(Output::Json, &R { a: 1 }, |_| "t".into()), "{\n  \"a\": 1\n}\n");
        assert_eq!(render(Output::Table, &R { a: 1 }, |r| format!("a={}", r.a)), "a=1");
        assert_eq!(proto_name(6), "TCP");
        assert_eq!(proto_name(99), "99");
    }

    #[test]
    fn an_empty_or_missing_directory_is_a_clear_error() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let err = Pins::open(std::path::Path::new("/nonexistent")).err().unwrap();
            assert!(err.to_string().contains("needs root"), "{err}");
            return;
        }
        let err = Pins::open(std::path::Path::new("/nonexistent/nodeplane")).err().unwrap();
        assert!(
            err.to_string().contains("nothing is pinned under /nonexistent/nodeplane"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = Pins::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
    }
}
