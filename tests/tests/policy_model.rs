//! The key correctness property of NetworkPolicy enforcement: on random worlds of pods,
//! namespaces and NetworkPolicies ([`policy_gen`]), the datapath's verdict on random flows
//! (BPF_PROG_TEST_RUN of the real `from_pod` and `to_pod` programs, with the maps the agent
//! computes and writes) is the reference model's, direction by direction.
//!
//! ```text
//! GenWorld ──convert_policy──► Policy ─┬─► reference::verdict ───────────────┐ compare per
//!                                      └─► compute ─► PolicySyncer (diff) ─► │ direction
//!                                           kernel maps ─► from_pod / to_pod ┘
//! ```
//!
//! One datapath for the whole run; each world is written as a diff against the previous
//! one by one [`PolicySyncer`] (so transitions are exercised too), and checked to be exactly
//! what was computed. Each flow's policy conntrack entry is deleted after the flow: every
//! flow is new, and no verdict (a reply, an established flow) leaks into the next one.
//!
//! Only the checks this node makes are compared: the egress check when the source is a
//! local endpoint (`from_pod`), the ingress check when the destination is (`to_pod`, on a
//! forwarded packet: `ingress_ifindex` non-zero).
//!
//! Environment: `NODEPLANE_POLICY_SEED` (default [`DEFAULT_SEED`]),
//! `NODEPLANE_POLICY_CASES` (default [`DEFAULT_CASES`]; the longer mode is just a larger
//! number), `NODEPLANE_POLICY_WORLD` (run only that world index: reproduction). Needs root
//! (run with `cargo xtask test -- --test policy_model`).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use nodeplane_agent::{
    datapath::Datapath,
    model::{Ipv4Cidr, ObjectKey},
    policy::{
        PortSpec, Ports,
        compute::{self, Direction, Input, PolicyLookup, PolicyMaps},
        reference::{self, DirVerdict},
        sync::PolicySyncer,
    },
};
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP, names},
    policy::{IPPROTO_ICMP, IPPROTO_SCTP, PolicyCtKey, PolicyKey},
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    packet::{Frame, TCP_SYN},
    policy_gen::{Case, GenWorld, NODE, PROTOCOLS, Rng, proto_name, world_rng},
    run::{TC_ACT_OK, run_once_from},
};

/// "nodeplan".
const DEFAULT_SEED: u64 = 0x6e6f_6465_706c_616e;
/// Flows per `cargo xtask test` run.
const DEFAULT_CASES: usize = 30_000;
/// Flows per world: each world costs one compute and one map sync, each flow one or two
/// program runs.
const CASES_PER_WORLD: usize = 40;
/// The ifindex a forwarded packet arrived on (non-zero: not from the host).
const FORWARDED: u32 = 3;
/// Mismatches printed in full (all are listed in one line each).
const DETAILED: usize = 3;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

struct Settings {
    seed: u64,
    worlds: std::ops::Range<u64>,
}

impl Settings {
    fn from_env() -> Self {
        let seed = env_u64("NODEPLANE_POLICY_SEED").unwrap_or(DEFAULT_SEED);
        let cases = env_u64("NODEPLANE_POLICY_CASES").map_or(DEFAULT_CASES, |c| c as usize);
        let worlds = match env_u64("NODEPLANE_POLICY_WORLD") {
            Some(w) => w..w + 1,
            None => 0..cases.div_ceil(CASES_PER_WORLD) as u64,
        };
        Self { seed, worlds }
    }
}

/// One generated world with its flows.
fn world(seed: u64, index: u64) -> (GenWorld, Vec<Case>) {
    let mut rng: Rng = world_rng(seed, index);
    let w = GenWorld::generate(&mut rng);
    let cases = w.cases(&mut rng, CASES_PER_WORLD);
    (w, cases)
}

fn compute_maps(w: &GenWorld) -> PolicyMaps {
    compute::compute(&Input {
        pods: w.pods.iter().collect(),
        namespaces: &w.namespaces,
        policies: w.policies.iter().collect(),
        node_name: NODE,
    })
}

/// What the reference says about the checks this node makes: `(egress, ingress)`, `None`
/// for a direction whose local end is no endpoint here.
fn expected(
    rw: &reference::World,
    m: &PolicyMaps,
    c: &Case,
) -> (reference::Verdict, Option<bool>, Option<bool>) {
    let v = reference::verdict(rw, &rw.addr_of(c.src), &rw.addr_of(c.dst), c.proto, c.dport);
    let egress = m.endpoints.contains_key(&c.src).then(|| v.egress.allowed());
    let ingress = m.endpoints.contains_key(&c.dst).then(|| v.ingress.allowed());
    (v, egress, ingress)
}

fn frame(c: &Case, sport: u16) -> Vec<u8> {
    match c.proto {
        IPPROTO_TCP => Frame::tcp((c.src, sport), (c.dst, c.dport), TCP_SYN).build(),
        IPPROTO_UDP => Frame::udp((c.src, sport), (c.dst, c.dport)).build(),
        IPPROTO_SCTP => Frame::sctp((c.src, sport), (c.dst, c.dport)).build(),
        IPPROTO_ICMP => Frame::icmp_echo(c.src, c.dst, sport, 1).build(),
        other => panic!("no frame for protocol {other}"),
    }
}

/// The policy conntrack key of the flow (ports 0 for ICMP).
fn pct_key(c: &Case, sport: u16) -> PolicyCtKey {
    let (sport, dport) = if c.proto == IPPROTO_ICMP { (0, 0) } else { (sport, c.dport) };
    PolicyCtKey {
        saddr: c.src.octets(),
        daddr: c.dst.octets(),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto: c.proto,
        _pad: [0; 3],
    }
}

/// Source ports: a new one per flow (1024..=65535, wrapping), so no two flows of a world
/// share a tuple even if an entry outlived its flow.
struct SourcePorts(u32);

impl SourcePorts {
    fn next(&mut self) -> u16 {
        self.0 += 1;
        (1024 + self.0 % (65536 - 1024)) as u16
    }
}

/// The datapath's verdicts on one flow: `(egress, ingress)` as in [`expected`].
fn run_case(
    dp: &mut Datapath,
    c: &Case,
    sport: u16,
    m: &PolicyMaps,
) -> (Option<bool>, Option<bool>) {
    let f = frame(c, sport);
    let run = |dp: &Datapath, program: &str| {
        run_once_from(dp, program, &f, FORWARDED).action == TC_ACT_OK
    };
    let egress = m.endpoints.contains_key(&c.src).then(|| run(dp, names::PROG_FROM_POD));
    let ingress = m.endpoints.contains_key(&c.dst).then(|| run(dp, names::PROG_TO_POD));
    // A check that allowed the new flow recorded it under this key (a wrong key here would
    // leak verdicts into later flows as replies); one that denied it recorded nothing.
    let recorded = dp.maps().policy_ct.remove(&pct_key(c, sport)).is_ok();
    let allowed_once = egress == Some(true) || ingress == Some(true);
    assert_eq!(
        recorded,
        allowed_once,
        "{c} (sport {sport}): policy conntrack entry present after (egress, ingress) {:?}",
        (egress, ingress)
    );
    (egress, ingress)
}

/// Packets per (hook, reason) name.
type Counts = BTreeMap<(&'static str, &'static str), u64>;

fn counters(dp: &Datapath) -> Counts {
    let all = dp.counters().unwrap_or_else(|e| panic!("reading counters: {e}"));
    all.into_iter().map(|(h, r, c)| ((h.name(), r.name()), c.packets)).collect()
}

fn counter_delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// The kernel maps hold exactly `m` (ipcache, endpoints, policy entries).
fn check_kernel_maps(dp: &mut Datapath, m: &PolicyMaps) -> Result<(), String> {
    let maps = dp.maps();
    let mut ipcache = BTreeMap::new();
    for entry in maps.ipcache.iter() {
        let (k, v): (Key<[u8; 4]>, u32) = entry.map_err(|e| format!("ipcache iter: {e}"))?;
        let cidr =
            Ipv4Cidr::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8).ok_or_else(|| {
                format!("ipcache key {:?}/{} not canonical", k.data(), k.prefix_len())
            })?;
        ipcache.insert(cidr, v);
    }
    if ipcache != m.ipcache {
        return Err(format!("IPCACHE_V4 {ipcache:?}\n  computed {:?}", m.ipcache));
    }
    let mut endpoints = BTreeMap::new();
    for entry in maps.endpoints.iter() {
        let (k, v) = entry.map_err(|e| format!("endpoints iter: {e}"))?;
        endpoints.insert(Ipv4Addr::from(k), v);
    }
    if endpoints != m.endpoints {
        return Err(format!("ENDPOINTS_V4 {endpoints:?}\n  computed {:?}", m.endpoints));
    }
    let mut rules = BTreeMap::new();
    for entry in maps.policy.iter() {
        let (k, v) = entry.map_err(|e| format!("policy iter: {e}"))?;
        rules.insert((k.data(), k.prefix_len()), v);
    }
    // Full-length entries live in the exact hash; the trie must hold none of them.
    if let Some(((k, _), _)) = rules.iter().find(|((_, len), _)| *len == PolicyKey::PREFIX_FULL) {
        return Err(format!("a full-length entry {k:?} is in the POLICY_V4 trie"));
    }
    for entry in maps.policy_exact.iter() {
        let (k, v) = entry.map_err(|e| format!("policy exact iter: {e}"))?;
        rules.insert((k, PolicyKey::PREFIX_FULL), v);
    }
    if rules != m.rules {
        let extra: Vec<_> = rules.keys().filter(|k| !m.rules.contains_key(k)).collect();
        let missing: Vec<_> = m.rules.keys().filter(|k| !rules.contains_key(k)).collect();
        return Err(format!("POLICY_V4 differs: extra {extra:?}, missing {missing:?}"));
    }
    Ok(())
}

/// One disagreement, with what is needed to see who is wrong.
struct Mismatch {
    world: u64,
    case: Case,
    dir: Direction,
    datapath: bool,
    reference: DirVerdict,
    maps: compute::Verdict,
}

impl Mismatch {
    fn line(&self) -> String {
        let culprit = if self.maps.allowed() == self.reference.allowed() {
            "datapath/sync disagrees with the computed maps"
        } else if self.maps.allowed() == self.datapath {
            "computed maps (compute or reference) disagree with the reference"
        } else {
            "?"
        };
        format!(
            "world {} {} {}: datapath {}, reference {:?}, maps {:?} -> {culprit}",
            self.world,
            self.case,
            self.dir,
            if self.datapath { "allow" } else { "deny" },
            self.reference,
            self.maps
        )
    }
}

/// Everything about a mismatch: the world, the maps' view of both ends, and the programs'
/// drop reasons on a re-run.
fn report(dp: &mut Datapath, seed: u64, w: &GenWorld, m: &PolicyMaps, mm: &Mismatch) -> String {
    let mut s = String::new();
    let c = &mm.case;
    let _ = writeln!(s, "=== MISMATCH {}", mm.line());
    let _ = writeln!(
        s,
        "reproduce: NODEPLANE_POLICY_SEED={seed:#x} NODEPLANE_POLICY_WORLD={} cargo xtask test -- --test policy_model",
        mm.world
    );
    let _ = writeln!(s, "--- world\n{w}");
    let _ = writeln!(s, "--- computed maps");
    for (who, addr) in [("src", c.src), ("dst", c.dst)] {
        let id = m.identity_of(addr);
        let name = m.names.identities.get(&id).map(|n| n.to_string()).unwrap_or_default();
        let _ = writeln!(
            s,
            "{who} {addr}: identity {id} ({name}), endpoint {:?}",
            m.endpoints.get(&addr)
        );
    }
    let local = if mm.dir == Direction::Egress { c.src } else { c.dst };
    if let Some(ep) = m.endpoints.get(&local) {
        let set = if mm.dir == Direction::Egress { ep.egress_set } else { ep.ingress_set };
        let _ = writeln!(s, "set {set} {:?}:", m.names.sets.get(&set));
        for ((key, len), v) in m.rules.iter().filter(|((k, _), _)| k.set == set.to_be_bytes()) {
            let _ = writeln!(
                s,
                "  identity {} proto {} port {} /{len} -> rule {} {:?}",
                u32::from_be_bytes(key.identity),
                key.proto,
                u16::from_be_bytes(key.port),
                v.rule,
                m.names.rules.get(&v.rule)
            );
        }
    }
    // The run again, with the reasons the programs counted.
    let sport = 1000;
    let before = counters(dp);
    let got = run_case(dp, c, sport, m);
    let _ = writeln!(
        s,
        "--- re-run: {got:?} (egress, ingress), counted {:?}",
        counter_delta(&before, &counters(dp))
    );
    s
}

#[derive(Default)]
struct Stats {
    cases: usize,
    per_proto: BTreeMap<&'static str, usize>,
    /// Per compared direction.
    checks: BTreeMap<(&'static str, bool), usize>,
    /// Per flow, both directions together.
    allowed: usize,
    denied: usize,
    both_local: usize,
    named_port_allows: usize,
    ops: usize,
    compute: Duration,
    sync: Duration,
    run: Duration,
}

impl Stats {
    fn record(
        &mut self,
        c: &Case,
        v: &reference::Verdict,
        e: Option<bool>,
        i: Option<bool>,
        w: &GenWorld,
    ) {
        self.cases += 1;
        *self.per_proto.entry(proto_name(c.proto)).or_default() += 1;
        for (dir, x) in [("egress", e), ("ingress", i)] {
            if let Some(x) = x {
                *self.checks.entry((dir, x)).or_default() += 1;
            }
        }
        if e.unwrap_or(true) && i.unwrap_or(true) {
            self.allowed += 1;
        } else {
            self.denied += 1;
        }
        if e.is_some() && i.is_some() {
            self.both_local += 1;
        }
        // Checks where a named port of an allowing rule matched the flow.
        let dst_pod = w.pods.iter().find(|p| p.ip == Some(c.dst));
        let named_matches = |rules: &[(ObjectKey, usize)], dir: Direction| {
            rules.iter().any(|(key, i)| {
                let policy = w.policies.iter().find(|p| p.key == *key);
                let rules = policy.and_then(|p| match dir {
                    Direction::Ingress => p.ingress.as_ref(),
                    Direction::Egress => p.egress.as_ref(),
                });
                let Some(Ports::Only(ports)) = rules.and_then(|r| r.get(*i)).map(|r| &r.ports)
                else {
                    return false;
                };
                ports.iter().any(|p| {
                    let PortSpec::Named(name) = &p.port else { return false };
                    p.protocol.ipproto() == c.proto
                        && dst_pod.is_some_and(|d| {
                            d.container_ports.iter().any(|cp| {
                                cp.name.as_deref() == Some(name.as_str())
                                    && cp.protocol == p.protocol
                                    && cp.port == c.dport
                            })
                        })
                })
            })
        };
        for (d, dir, checked) in
            [(&v.egress, Direction::Egress, e), (&v.ingress, Direction::Ingress, i)]
        {
            if let (DirVerdict::Allowed { rules }, Some(_)) = (d, checked)
                && named_matches(rules, dir)
            {
                self.named_port_allows += 1;
            }
        }
    }

    fn assert_not_degenerate(&self) {
        for proto in PROTOCOLS {
            let n = self.per_proto.get(proto_name(proto)).copied().unwrap_or(0);
            assert!(
                n * 20 > self.cases,
                "only {n} of {} flows are {}",
                self.cases,
                proto_name(proto)
            );
        }
        assert!(
            self.allowed * 10 > self.cases,
            "only {} of {} flows allowed",
            self.allowed,
            self.cases
        );
        assert!(
            self.denied * 10 > self.cases,
            "only {} of {} flows denied",
            self.denied,
            self.cases
        );
        for dir in ["egress", "ingress"] {
            for verdict in [true, false] {
                let n = self.checks.get(&(dir, verdict)).copied().unwrap_or(0);
                assert!(
                    n * 20 > self.cases,
                    "only {n} {dir} checks {verdict} in {} flows",
                    self.cases
                );
            }
        }
        assert!(
            self.both_local * 10 > self.cases,
            "only {} flows between local pods",
            self.both_local
        );
        assert!(
            self.named_port_allows * 200 > self.cases,
            "only {} checks allowed by a named port",
            self.named_port_allows
        );
    }
}

/// The property: zero differences between the datapath and the reference.
#[test]
fn datapath_verdicts_agree_with_the_reference_model() {
    let settings = Settings::from_env();
    let seed = settings.seed;
    eprintln!(
        "policy_model: seed {seed:#x}, worlds {:?} x {CASES_PER_WORLD} flows \
         (NODEPLANE_POLICY_SEED, NODEPLANE_POLICY_CASES, NODEPLANE_POLICY_WORLD)",
        settings.worlds
    );
    let started = Instant::now();
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let mut syncer = PolicySyncer::new();
    let mut ports = SourcePorts(0);
    let mut stats = Stats::default();
    let mut mismatches = Vec::new();
    let mut details = Vec::new();
    for index in settings.worlds.clone() {
        let (w, cases) = world(seed, index);
        let t = Instant::now();
        let m = compute_maps(&w);
        stats.compute += t.elapsed();
        let locals: Vec<Ipv4Addr> = m.endpoints.keys().copied().collect();
        assert_eq!(
            locals,
            w.local_ips().into_iter().collect::<Vec<_>>(),
            "world {index}: endpoints are the live local pods\n{w}"
        );

        let t = Instant::now();
        let sync = syncer
            .apply(&m, dp.maps())
            .unwrap_or_else(|e| panic!("world {index}: writing the policy maps: {e}"));
        stats.sync += t.elapsed();
        stats.ops += sync.ops;
        assert!(!sync.skipped.any(), "world {index}: entries skipped for room: {sync:?}");
        if let Err(e) = check_kernel_maps(&mut dp, &m) {
            panic!("world {index}: kernel maps differ from the computed ones after sync: {e}\n{w}");
        }

        let rw = w.reference();
        let before = counters(&dp);
        // What each run must count: a pass or a policy drop, under the hook that judged it.
        let mut judged = Counts::new();
        let t = Instant::now();
        for c in &cases {
            let (v, want_e, want_i) = expected(&rw, &m, c);
            let sport = ports.next();
            let (got_e, got_i) = run_case(&mut dp, c, sport, &m);
            for (hook, got) in [(Hook::FromPod, got_e), (Hook::ToPod, got_i)] {
                let Some(ok) = got else { continue };
                let reason = if ok { Reason::PassNotService } else { Reason::DropPolicy };
                *judged.entry((hook.name(), reason.name())).or_default() += 1;
            }
            stats.record(c, &v, want_e, want_i, &w);
            for (dir, got, want, rv) in [
                (Direction::Egress, got_e, want_e, &v.egress),
                (Direction::Ingress, got_i, want_i, &v.ingress),
            ] {
                if got != want {
                    let mm = Mismatch {
                        world: index,
                        case: *c,
                        dir,
                        datapath: got.unwrap_or(true),
                        reference: rv.clone(),
                        maps: m.verdict(c.src, c.dst, c.proto, c.dport, dir),
                    };
                    if details.len() < DETAILED {
                        details.push(report(&mut dp, seed, &w, &m, &mm));
                    }
                    mismatches.push(mm);
                }
            }
        }
        stats.run += t.elapsed();
        // Every run was judged by policy: nothing was dropped (or passed) for another reason.
        let delta = counter_delta(&before, &counters(&dp));
        if details.is_empty() {
            assert_eq!(delta, judged, "world {index}: reasons counted for the flows' runs\n{w}");
        }
    }
    eprintln!(
        "policy_model: {} flows in {} worlds, {:?} total: compute {:?}, map sync {:?} ({} ops), \
         program runs {:?}",
        stats.cases,
        settings.worlds.end - settings.worlds.start,
        started.elapsed(),
        stats.compute,
        stats.sync,
        stats.ops,
        stats.run,
    );
    eprintln!(
        "policy_model: per protocol {:?}; checks (direction, allowed) {:?}; flows allowed {}, denied {}, \
         between local pods {}; allowed by a named port {}",
        stats.per_proto,
        stats.checks,
        stats.allowed,
        stats.denied,
        stats.both_local,
        stats.named_port_allows
    );
    if !mismatches.is_empty() {
        for d in &details {
            eprintln!("{d}");
        }
        let lines: Vec<String> = mismatches.iter().take(50).map(Mismatch::line).collect();
        panic!(
            "{} of {} checks disagree with the reference (seed {seed:#x}):\n{}",
            mismatches.len(),
            stats.checks.values().sum::<usize>(),
            lines.join("\n")
        );
    }
    if settings.worlds.end - settings.worlds.start > 1 {
        stats.assert_not_degenerate();
    }
}

/// The generator under the default seed is not degenerate: every protocol (ICMP echo and
/// SCTP included) occurs, and allowed and denied flows, egress and ingress checks, and
/// flows between two local pods each make a substantial share. Pure (no datapath).
#[test]
fn the_generated_flows_cover_every_protocol_and_both_verdicts() {
    let settings = Settings::from_env();
    let mut stats = Stats::default();
    for index in settings.worlds.clone() {
        let (w, cases) = world(settings.seed, index);
        let m = compute_maps(&w);
        let rw = w.reference();
        for c in &cases {
            let (v, e, i) = expected(&rw, &m, c);
            stats.record(c, &v, e, i, &w);
        }
    }
    eprintln!(
        "generated: {} flows, per protocol {:?}, checks {:?}, allowed {}, denied {}, local-local {}, named-port allows {}",
        stats.cases,
        stats.per_proto,
        stats.checks,
        stats.allowed,
        stats.denied,
        stats.both_local,
        stats.named_port_allows
    );
    assert!(stats.cases >= 10_000 || settings.worlds.end - settings.worlds.start == 1);
    stats.assert_not_degenerate();
}
