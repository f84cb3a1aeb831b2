//! The datapath outlives the agent: kill -9, graceful restarts (what an upgrade of the
//! DaemonSet does) and uninstall, in the netns lab with real sockets.
//! Needs root and the binaries built by `cargo xtask test`.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use nodeplane_tests::{bin, cluster::Cluster};

const DEMO: &str = include_str!("../../lab/examples/demo.yaml");
const TIMEOUT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(20);
/// Long-lived connections held through every kill and restart.
const HELD: usize = 50;
/// How long traffic flows while no agent runs.
const DOWN: Duration = Duration::from_secs(2);

fn vip(c: &Cluster, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(c.service_ip("demo", "web").expect("web has a ClusterIP"), port)
}

struct Held {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    backend: String,
}

impl Held {
    fn open(c: &Cluster) -> Held {
        let stream = c.tcp_connect("demo", "client", vip(c, 80), TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        let mut backend = String::new();
        reader.read_line(&mut backend).expect("the backend's greeting");
        Held { stream, reader, backend: backend.trim().to_string() }
    }

    /// One request and its answer on the open connection: the same backend must answer.
    fn exchange(&mut self) -> Result<(), String> {
        self.stream.write_all(b"again\n").map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if line.trim() != self.backend {
            return Err(format!("answered by {:?}, opened to {}", line.trim(), self.backend));
        }
        Ok(())
    }
}

/// Requests made and failures seen, by kind.
#[derive(Default)]
struct Tally {
    new_tcp: usize,
    udp: usize,
    held_exchanges: usize,
    failures: Vec<String>,
}

/// Traffic until `done` (checked between rounds): every round a new TCP connection and
/// a UDP request through the ClusterIP, and every fifth round one exchange on every held
/// connection. Bounded by `limit`.
fn traffic(
    c: &Cluster,
    held: &mut [Held],
    phase: &str,
    limit: Duration,
    tally: &mut Tally,
    mut done: impl FnMut() -> bool,
) {
    let (http, dns) = (vip(c, 80), vip(c, 53));
    let start = Instant::now();
    let mut round = 0;
    loop {
        tally.new_tcp += 1;
        if let Err(e) = c.tcp_ask("demo", "client", http, TIMEOUT) {
            tally.failures.push(format!("{phase}: new TCP connection: {e}"));
        }
        tally.udp += 1;
        if let Err(e) = c.udp_ask("demo", "client", dns, TIMEOUT) {
            tally.failures.push(format!("{phase}: UDP request: {e}"));
        }
        if round % 5 == 0 {
            for (i, h) in held.iter_mut().enumerate() {
                tally.held_exchanges += 1;
                if let Err(e) = h.exchange() {
                    tally.failures.push(format!("{phase}: held connection {i}: {e}"));
                }
            }
        }
        round += 1;
        if done() {
            return;
        }
        assert!(start.elapsed() < limit, "{phase}: not done within {limit:?}:\n{}", c.agent_log());
    }
}

/// Program id behind every pinned link.
fn link_programs(pins: &Path) -> BTreeMap<PathBuf, u32> {
    let dir = pins.join("links");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a link pin").path();
        let link = FdLink::from(PinnedLink::from_pin(&path).expect("open a pinned link"));
        out.insert(path, link.info().expect("link info").program_id());
    }
    out
}

/// kill -9 twice and a graceful restart, each with traffic while no agent runs and while
/// the next one starts: no held connection breaks, no new connection or UDP request to
/// the unchanged Service fails, and every restart puts its own programs on every link.
#[test]
fn connections_survive_agent_kills_and_restarts() {
    let mut c = Cluster::up(&[("demo.yaml", DEMO)], &[]);
    let http = vip(&c, 80);
    c.wait_until("the ClusterIP answers", CONVERGE, || {
        c.tcp_ask("demo", "client", http, TIMEOUT).is_ok()
    });
    c.wait_until("every pod interface runs pinned programs", CONVERGE, || {
        // Two tc links per pod veth, and the socket LB's cgroup links (same restart rules).
        link_programs(&c.pins()).len() == 2 * 4 + nodeplane_agent::socklb::HOOKS.len()
    });
    let synced = c.agent_log().matches("datapath synced").count();
    let mut held: Vec<Held> = (0..HELD).map(|_| Held::open(&c)).collect();
    let backends: BTreeSet<&str> = held.iter().map(|h| h.backend.as_str()).collect();
    assert!(backends.len() > 1, "50 connections over one backend only: {backends:?}");

    let mut tally = Tally::default();
    for (round, graceful) in [(1, false), (2, false), (3, true)] {
        let before = link_programs(&c.pins());
        let ready = c.ready_count();
        if graceful {
            c.stop_agent();
        } else {
            c.kill_agent();
        }
        let how = if graceful { "SIGTERM" } else { "kill -9" };
        let phase = format!("round {round}: agent down after {how}");
        let down = Instant::now();
        traffic(&c, &mut held, &phase, DOWN * 5, &mut tally, || down.elapsed() >= DOWN);

        c.start_agent();
        let phase = format!("round {round}: agent restarting");
        let mut ready_at = None;
        traffic(&c, &mut held, &phase, CONVERGE, &mut tally, || {
            if ready_at.is_none() && c.ready_count() > ready {
                ready_at = Some(Instant::now());
            }
            ready_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
        });
        let after = link_programs(&c.pins());
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "round {round}: the same links stay pinned"
        );
        for (link, id) in &after {
            assert_ne!(
                before[link],
                *id,
                "round {round}: {} still runs the old program",
                link.display()
            );
        }
    }
    eprintln!(
        "{} new TCP connections, {} UDP requests, {} exchanges on {HELD} held connections",
        tally.new_tcp, tally.udp, tally.held_exchanges
    );
    assert!(
        tally.failures.is_empty(),
        "{} failures:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    assert!(tally.new_tcp > 30 && tally.held_exchanges > 30 * HELD, "too little traffic to tell");
    let log = c.agent_log();
    assert_eq!(
        log.matches("datapath synced").count(),
        synced,
        "a restarted agent wrote to maps it should have adopted as they were:\n{log}"
    );
}

/// The ids of the kernel objects pinned under `pins`: (maps, programs, links).
fn pinned_ids(pins: &Path) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let ids = |sub: &str, id: &dyn Fn(&Path) -> u32| -> Vec<u32> {
        let dir = pins.join(sub);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        entries.map(|e| id(&e.expect("a pin").path())).collect()
    };
    let maps = ids("maps", &|p| {
        aya::maps::MapData::from_pin(p).expect("map pin").info().expect("info").id()
    });
    let progs = ids("progs", &|p| {
        aya::programs::SchedClassifier::from_pin(p).expect("program pin").info().expect("info").id()
    });
    let links = ids("links", &|p| {
        FdLink::from(PinnedLink::from_pin(p).expect("link pin")).info().expect("info").id()
    });
    (maps, progs, links)
}

/// After a graceful stop the datapath still translates; `uninstall` then removes every
/// pin, and with them every map, program and link the agent created.
#[test]
fn uninstall_leaves_no_program_map_link_or_pin() {
    let mut c = Cluster::up(&[("demo.yaml", DEMO)], &[]);
    let http = vip(&c, 80);
    c.wait_until("the ClusterIP answers", CONVERGE, || {
        c.tcp_ask("demo", "client", http, TIMEOUT).is_ok()
    });
    c.wait_until("the programs are pinned", CONVERGE, || c.pins().join("progs/to_pod").exists());
    let socklb_links = nodeplane_agent::socklb::HOOKS.len();
    c.wait_until("the socket LB is pinned", CONVERGE, || {
        let dir = nodeplane_agent::pin::PinDir::new(c.pins());
        nodeplane_agent::socklb::link_pins(&dir).is_ok_and(|p| p.len() == socklb_links)
    });
    let (maps, progs, links) = pinned_ids(&c.pins());
    assert!(
        // 8 tc links (4 pod veths, 2 hooks) and the socket LB's cgroup links.
        maps.len() >= 10 && progs.len() == 2 && links.len() == 8 + socklb_links,
        "{maps:?} {progs:?} {links:?}"
    );

    c.stop_agent();
    for i in 0..5 {
        let who = c.tcp_ask("demo", "client", http, TIMEOUT);
        assert!(who.is_ok(), "request {i} with the agent stopped: {who:?}");
    }

    let out = std::process::Command::new(bin("NODEPLANE_AGENT_BIN"))
        .args(["uninstall", "--bpffs-dir"])
        .arg(c.pins())
        .output()
        .expect("run uninstall");
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!c.pins().exists(), "the pin directory is gone");

    // The kernel frees them once nothing refers to them (after an RCU grace period).
    let live = || {
        let maps_left: Vec<u32> =
            maps.iter().copied().filter(|id| aya::maps::MapInfo::from_id(*id).is_ok()).collect();
        let programs: BTreeSet<u32> =
            aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
        let links_now: BTreeSet<u32> =
            aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
        let progs_left: Vec<u32> =
            progs.iter().copied().filter(|id| programs.contains(id)).collect();
        let links_left: Vec<u32> =
            links.iter().copied().filter(|id| links_now.contains(id)).collect();
        (maps_left, progs_left, links_left)
    };
    let start = Instant::now();
    let mut left = live();
    while left != (vec![], vec![], vec![]) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        left = live();
    }
    assert_eq!(left, (vec![], vec![], vec![]), "(maps, programs, links) still in the kernel");
    assert!(
        c.tcp_ask("demo", "client", http, TIMEOUT).is_err(),
        "the ClusterIP is still translated after uninstall"
    );

    let again = std::process::Command::new(bin("NODEPLANE_AGENT_BIN"))
        .args(["uninstall", "--bpffs-dir"])
        .arg(c.pins())
        .output()
        .expect("run uninstall again");
    assert!(again.status.success(), "a second uninstall is not an error");
}
