//! Endpoint churn in the netns lab: backends leave and rejoin a Service every half second
//! while TCP and UDP traffic flows, with the real agent (file source) in the node namespace
//! and real sockets in the client pod. The conntrack rules under test are in
//! docs/ARCHITECTURE.md ("Established flows and removed backends").
//!
//! ```text
//!   web   (app=web):  http 80/TCP -> 8080, dns 53/UDP -> 5353   stable-0 stable-1 churn-0..3
//!   dns   (dns=yes):  dns 53/UDP -> 5353                         stable-0 churn-0 churn-2
//! ```
//! A churned pod leaves `web` by a relabel: it keeps running (it would answer if traffic
//! reached it), its TCP endpoint is gone from every Service, and for churn-0 and churn-2
//! the UDP endpoint stays in the maps through `dns`, so only the agent's conntrack flush
//! moves their UDP flows.
//!
//! When a removal is *programmed* is read from the agent's own maps (found through the
//! program attached to the client's veth): no slot of `web` names the pod, its TCP endpoint
//! is no longer a backend, and no UDP conntrack entry of `web` names it. Needs root and the
//! binaries built by `cargo xtask test`.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    process::Child,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use nodeplane_agent::ctgc::Pair;
use nodeplane_common::maps::{
    BackendV4, CtKeyV4, CtValueV4, IPPROTO_TCP, IPPROTO_UDP, ServiceKeyV4, ServiceValue, SlotKey,
    names,
};
use nodeplane_lab::{Lab, LabConfig, naming};
use nodeplane_tests::bin;

const NS: &str = "demo";
const CHURNED: [&str; 4] = ["churn-0", "churn-1", "churn-2", "churn-3"];
const STABLE: [&str; 2] = ["stable-0", "stable-1"];
/// Whose UDP endpoint another Service (`dns`) keeps in the maps.
const SHARED: [&str; 2] = ["churn-0", "churn-2"];
const HTTP_TARGET: u16 = 8080;

/// One step (a backend leaves, another rejoins) every half second, for 16 s.
const STEP: Duration = Duration::from_millis(500);
const STEPS: u32 = 32;
/// Traffic goes on this long after the last step, so every removal can be judged.
const TAIL: Duration = Duration::from_millis(1500);
/// A UDP flow whose backend left must be answered by another within this.
const UDP_RECOVERY: Duration = Duration::from_secs(1);
/// A removal must be programmed within this (the agent reads the manifests every 50 ms).
const PROGRAMMING: Duration = Duration::from_secs(1);
const UDP_FLOWS: usize = 8;
const HELD: usize = 12;
const TIMEOUT: Duration = Duration::from_secs(1);
const CONVERGE: Duration = Duration::from_secs(20);

fn pod(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{{labels}}}}}\n\
         spec:\n  containers:\n  - name: app\n    image: nodeplane/echo\n    ports:\n\
         \x20   - {{name: http, containerPort: {HTTP_TARGET}, protocol: TCP}}\n\
         \x20   - {{name: dns, containerPort: 5353, protocol: UDP}}\n"
    )
}

fn manifests() -> String {
    let mut docs = vec![format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n")];
    for name in STABLE.iter().chain(&CHURNED) {
        let dns = if *name == "stable-0" || SHARED.contains(name) { ", dns: \"yes\"" } else { "" };
        docs.push(pod(name, &format!("app: web{dns}")));
    }
    docs.push(format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NS}}}\n\
         spec: {{containers: [{{name: client, image: nodeplane/client}}]}}\n"
    ));
    docs.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NS}}}\n\
         spec:\n  selector: {{app: web}}\n  ports:\n\
         \x20 - {{name: http, port: 80, targetPort: http, protocol: TCP}}\n\
         \x20 - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    ));
    docs.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: {NS}}}\n\
         spec:\n  selector: {{dns: \"yes\"}}\n  ports:\n\
         \x20 - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    ));
    docs.join("---\n")
}

/// The lab with the agent in its node namespace; dropping it tears the lab down (which
/// stops the agent) and reaps the agent.
struct Cluster {
    lab: Option<Lab>,
    agent: Child,
}

impl std::ops::Deref for Cluster {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("the lab lives until drop")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.lab.take());
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

impl Cluster {
    fn up(docs: &[(&str, &str)]) -> Cluster {
        let cfg = LabConfig::new(bin("NODEPLANE_LAB_BIN"));
        let lab = Lab::up(cfg, docs).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let argv: Vec<OsString> = vec![
            bin("NODEPLANE_AGENT_BIN").into(),
            "run".into(),
            "--manifests".into(),
            lab.manifests_dir().into(),
            "--iface-prefix".into(),
            nodeplane_lab::HOST_VETH_PREFIX.into(),
            "--poll-interval".into(),
            "50ms".into(),
        ];
        let agent = lab.spawn_in_node(&argv, "agent").unwrap_or_else(|e| panic!("agent: {e:#}"));
        Cluster { lab: Some(lab), agent }
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let log = std::fs::read_to_string(self.log_path("agent")).unwrap_or_default();
        panic!("{what}; agent log:\n{log}");
    }

    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < CONVERGE {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fail(format!("timed out waiting until {what}"));
    }

    fn vip(&self, service: &str, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.service_ip(NS, service).expect("a ClusterIP"), port)
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pod_ip(NS, pod).unwrap_or_else(|e| panic!("{e}"))
    }

    fn set_in_web(&self, pod: &str, member: bool) {
        let app = if member { "web" } else { "off" };
        self.label("pod", NS, pod, &[("app", Some(app))]).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// A UDP socket in the client pod connected to `to`: one flow, as a resolver's socket.
    fn udp_flow(&self, to: SocketAddrV4) -> UdpSocket {
        let open = || -> io::Result<UdpSocket> {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        };
        self.in_pod(NS, "client", open).expect("the client pod").expect("a UDP socket")
    }
}

/// The agent's service maps and conntrack, found through the program on the client's veth
/// (whether or not the agent pinned them).
struct AgentMaps {
    services: HashMap<MapData, ServiceKeyV4, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, BackendV4>,
    ct: HashMap<MapData, CtKeyV4, CtValueV4>,
}

impl AgentMaps {
    fn find(lab: &Lab) -> AgentMaps {
        let veth = naming::host_veth(NS, "client");
        let ids = lab
            .in_node(|| SchedClassifier::query_tcx(&veth, TcAttachType::Ingress))
            .expect("the node netns")
            .unwrap_or_else(|e| panic!("querying the programs on {veth}: {e}"));
        let program = ids.1.first().unwrap_or_else(|| panic!("no program on {veth}"));
        let map_ids = program.map_ids().expect("map ids").expect("map ids supported");
        let mut found: BTreeMap<String, MapData> = BTreeMap::new();
        for id in map_ids {
            let data = MapData::from_id(id).unwrap_or_else(|e| panic!("map {id}: {e}"));
            let name = data.info().ok().and_then(|i| i.name_as_str().map(String::from));
            found.insert(name.unwrap_or_default(), data);
        }
        let mut take = |name: &str| {
            found.remove(name).unwrap_or_else(|| panic!("{name} is not a map of the program"))
        };
        AgentMaps {
            services: HashMap::try_from(Map::HashMap(take(names::SERVICES_V4))).expect("services"),
            slots: HashMap::try_from(Map::HashMap(take(names::BACKEND_SLOTS))).expect("slots"),
            backends: HashMap::try_from(Map::HashMap(take(names::BACKENDS_V4))).expect("backends"),
            ct: HashMap::try_from(Map::LruHashMap(take(names::CT_V4))).expect("conntrack"),
        }
    }

    /// Whether `web` (`vip`) no longer sends anything to `pod`: no slot of its frontends
    /// names it, its TCP endpoint is not a backend (so established connections are not
    /// followed to it), and no UDP conntrack entry of `web` names it.
    fn removal_programmed(&self, vip: Ipv4Addr, pod: Ipv4Addr) -> bool {
        self.services_programmed(vip, pod) && self.conntrack_flushed(vip, pod)
    }

    /// The service maps' part of [`AgentMaps::removal_programmed`].
    fn services_programmed(&self, vip: Ipv4Addr, pod: Ipv4Addr) -> bool {
        let pod = pod.octets();
        for (port, proto) in [(80, IPPROTO_TCP), (53, IPPROTO_UDP)] {
            let Ok(svc) = self.services.get(&ServiceKeyV4::new(vip.octets(), port, proto), 0)
            else {
                return false;
            };
            for slot in 0..svc.backend_count {
                let key = SlotKey { service_id: svc.service_id, slot };
                let named = self.slots.get(&key, 0).and_then(|id| self.backends.get(&id, 0));
                if named.map_or(true, |b| b.addr == pod) {
                    return false;
                }
            }
        }
        let tcp = BackendV4::new(pod, HTTP_TARGET, IPPROTO_TCP);
        !self.backends.iter().flatten().any(|(_, b)| b == tcp)
    }

    /// The conntrack part of [`AgentMaps::removal_programmed`].
    fn conntrack_flushed(&self, vip: Ipv4Addr, pod: Ipv4Addr) -> bool {
        let pod = pod.octets();
        let udp = ServiceKeyV4::new(vip.octets(), 53, IPPROTO_UDP);
        !self.ct.iter().flatten().any(|(k, v)| {
            let pair = Pair::of(&k, &v);
            k.proto == IPPROTO_UDP && pair.frontend == udp && pair.addr == pod
        })
    }
}

/// One removal of a churned pod from `web`.
#[derive(Clone, Debug)]
struct Removal {
    pod: &'static str,
    written: Instant,
    programmed: Option<Instant>,
    rejoined: Option<Instant>,
}

impl Removal {
    /// Whether a request sent at `t` must not be answered by the pod.
    fn forbids(&self, t: Instant) -> bool {
        self.programmed.is_some_and(|p| t >= p) && self.rejoined.is_none_or(|r| t < r)
    }
}

/// One datagram of a UDP flow: sent at, answered at and by.
struct Datagram {
    flow: usize,
    sent: Instant,
    answer: Option<(Instant, String)>,
}

/// One UDP flow after another from thread `thread`, a datagram every 10 ms. A flow on a
/// stable pod would never meet a removal, so after 200 ms there it is replaced by a new
/// one (a new source port, a new backend); a flow on a churned pod is kept until its pod
/// leaves, which is what is under test.
fn udp_traffic(c: &Cluster, thread: usize, stop: &AtomicBool) -> Vec<Datagram> {
    let vip = c.vip("web", 53);
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    let mut generation = 0;
    'flows: while !stop.load(Ordering::Relaxed) {
        let flow = thread * 100_000 + generation;
        generation += 1;
        let socket = c.udp_flow(vip);
        let opened = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            // A late answer to an earlier datagram must not be taken for this one's.
            socket.set_nonblocking(true).expect("non-blocking");
            while socket.recv(&mut buf).is_ok() {}
            socket.set_nonblocking(false).expect("blocking");
            let sent = Instant::now();
            let answer = match socket.send(b"who?\n").and_then(|_| socket.recv(&mut buf)) {
                Ok(n) => {
                    Some((Instant::now(), String::from_utf8_lossy(&buf[..n]).trim().to_string()))
                }
                Err(_) => None,
            };
            let on_stable = answer.as_ref().is_some_and(|(_, who)| STABLE.contains(&who.as_str()));
            out.push(Datagram { flow, sent, answer });
            std::thread::sleep(Duration::from_millis(10));
            if on_stable && opened.elapsed() > Duration::from_millis(200) {
                continue 'flows;
            }
        }
    }
    out
}

/// A new TCP connection: when it started and who greeted it (or the error).
struct Connection {
    started: Instant,
    greeting: Result<String, String>,
}

fn new_connections(c: &Cluster, stop: &AtomicBool) -> Vec<Connection> {
    let http = c.vip("web", 80);
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let greeting = c.tcp_ask(NS, "client", http, TIMEOUT).map_err(|e| e.to_string());
        out.push(Connection { started, greeting });
        std::thread::sleep(Duration::from_millis(10));
    }
    out
}

/// A long-lived connection and every exchange on it.
struct Held {
    backend: String,
    opened: Instant,
    exchanges: Vec<(Instant, Result<String, io::ErrorKind>)>,
}

struct Open {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    held: Held,
}

fn open_held(c: &Cluster) -> Option<Open> {
    let opened = Instant::now();
    let stream = c.tcp_connect(NS, "client", c.vip("web", 80), TIMEOUT).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok().filter(|n| *n > 0)?;
    let held = Held { backend: line.trim().to_string(), opened, exchanges: Vec::new() };
    Some(Open { stream, reader, held })
}

/// `HELD` connections, each asking every ~50 ms; one that fails is replaced.
fn held_connections(c: &Cluster, stop: &AtomicBool) -> Vec<Held> {
    let mut open: Vec<Open> = Vec::new();
    let mut done = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while open.len() < HELD {
            match open_held(c) {
                Some(o) => open.push(o),
                None => break,
            }
        }
        let mut still = Vec::new();
        for mut o in open.drain(..) {
            let sent = Instant::now();
            let mut line = String::new();
            let result =
                match o.stream.write_all(b"again\n").and_then(|_| o.reader.read_line(&mut line)) {
                    Ok(0) => Err(io::ErrorKind::UnexpectedEof),
                    Ok(_) => Ok(line.trim().to_string()),
                    Err(e) => Err(e.kind()),
                };
            let failed = result.is_err();
            o.held.exchanges.push((sent, result));
            if failed { done.push(o.held) } else { still.push(o) }
        }
        open = still;
        std::thread::sleep(Duration::from_millis(50));
    }
    done.extend(open.into_iter().map(|o| o.held));
    done
}

/// Drives the churn: every `STEP` one churned pod rejoins `web` and the next leaves, so each
/// is out for three steps (1.5 s) and in for one. Polls the agent's maps meanwhile to time
/// when each removal is programmed.
fn churn(c: &Cluster, maps: &AgentMaps, removals: &Mutex<Vec<Removal>>) {
    let vip = *c.vip("web", 80).ip();
    let ips: BTreeMap<&str, Ipv4Addr> = CHURNED.iter().map(|p| (*p, c.ip(p))).collect();
    let start = Instant::now();
    let end = start + STEP * STEPS + TAIL;
    let mut step = 0;
    while Instant::now() < end {
        if step < STEPS && Instant::now() >= start + STEP * step {
            let (back, out) = (CHURNED[(step as usize + 1) % 4], CHURNED[step as usize % 4]);
            // Taken before the writes: the agent may program a change before the call that
            // wrote it returns.
            let rejoined = Instant::now();
            c.set_in_web(back, true);
            let written = Instant::now();
            c.set_in_web(out, false);
            let mut all = removals.lock().unwrap();
            if let Some(r) = all.iter_mut().rev().find(|r| r.pod == back) {
                r.rejoined = Some(rejoined);
            }
            all.push(Removal { pod: out, written, programmed: None, rejoined: None });
            step += 1;
        }
        let mut all = removals.lock().unwrap();
        for r in all.iter_mut().filter(|r| r.programmed.is_none() && r.rejoined.is_none()) {
            if maps.removal_programmed(vip, ips[r.pod]) {
                r.programmed = Some(Instant::now());
            }
        }
        drop(all);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A violation if `who` answered a request sent at `sent` after its removal was programmed.
fn stale(removals: &[Removal], kind: &str, sent: Instant, who: &str) -> Option<String> {
    let r = removals.iter().find(|r| r.pod == who && r.forbids(sent))?;
    Some(format!(
        "{kind} sent {} ms after {who}'s removal was programmed was answered by it",
        ms(sent - r.programmed.expect("forbids() needs it"))
    ))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[test]
fn endpoint_churn_keeps_tcp_to_staying_backends_and_moves_udp_off_removed_ones() {
    let yaml = manifests();
    let c = Cluster::up(&[("churn.yaml", yaml.as_str())]);
    let (http, dns) = (c.vip("web", 80), c.vip("web", 53));
    c.wait_until("web answers over TCP and UDP", || {
        c.tcp_ask(NS, "client", http, TIMEOUT).is_ok()
            && c.udp_ask(NS, "client", dns, TIMEOUT).is_ok()
    });
    let maps = AgentMaps::find(&c);
    let vip = *http.ip();

    // Start with churn-0 in and the other three out (only the service maps are waited
    // for: what happens to conntrack is judged during the churn).
    let removals = Mutex::new(Vec::new());
    for pod in &CHURNED[1..] {
        let written = Instant::now();
        c.set_in_web(pod, false);
        c.wait_until(&format!("{pod}'s removal reaches the service maps"), || {
            maps.services_programmed(vip, c.ip(pod))
        });
        let programmed = Some(Instant::now());
        removals.lock().unwrap().push(Removal { pod, written, programmed, rejoined: None });
    }

    let stop = AtomicBool::new(false);
    let (datagrams, connections, held) = std::thread::scope(|s| {
        let udp: Vec<_> = (0..UDP_FLOWS)
            .map(|f| {
                s.spawn({
                    let (c, stop) = (&c, &stop);
                    move || udp_traffic(c, f, stop)
                })
            })
            .collect();
        let new = s.spawn(|| new_connections(&c, &stop));
        let held = s.spawn(|| held_connections(&c, &stop));
        let driven =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| churn(&c, &maps, &removals)));
        stop.store(true, Ordering::Relaxed);
        let datagrams: Vec<Datagram> =
            udp.into_iter().flat_map(|t| t.join().expect("a UDP thread")).collect();
        let connections = new.join().expect("the new-connection thread");
        let held = held.join().expect("the held-connection thread");
        if let Err(panic) = driven {
            std::panic::resume_unwind(panic);
        }
        (datagrams, connections, held)
    });
    let removals = removals.into_inner().unwrap();
    let churned = |who: &str| CHURNED.iter().find(|p| **p == who).copied();
    let mut violations = Vec::new();

    // UDP: a flow whose backend left is answered by another within a second...
    let mut flows: BTreeMap<usize, Vec<&Datagram>> = BTreeMap::new();
    for d in &datagrams {
        flows.entry(d.flow).or_default().push(d);
    }
    let (mut moved, mut moved_shared, mut slowest) = (0, 0, Duration::ZERO);
    for r in &removals {
        for (flow, ds) in &flows {
            let mut before =
                ds.iter().filter_map(|d| d.answer.as_ref()).filter(|(at, _)| *at < r.written);
            let Some((_, last)) = before.next_back() else { continue };
            if last != r.pod {
                continue;
            }
            let recovered = ds
                .iter()
                .filter(|d| d.sent >= r.written)
                .filter_map(|d| d.answer.as_ref())
                .find(|(_, who)| who != r.pod)
                .map(|(at, _)| *at - r.written);
            match recovered {
                Some(took) if took <= UDP_RECOVERY => {
                    moved += 1;
                    moved_shared += usize::from(SHARED.contains(&r.pod));
                    slowest = slowest.max(took);
                }
                Some(took) => violations.push(format!(
                    "UDP flow {flow} on {} answered by another backend only {} ms after the removal",
                    r.pod,
                    ms(took)
                )),
                None if r.written.elapsed() > UDP_RECOVERY => violations.push(format!(
                    "UDP flow {flow} on {} never recovered after its removal",
                    r.pod
                )),
                None => {}
            }
        }
    }
    // ... and no datagram sent after a removal is programmed is answered by the removed pod.
    for d in &datagrams {
        if let Some((_, who)) = &d.answer {
            violations.extend(stale(&removals, "a UDP datagram", d.sent, who));
        }
    }
    let lost = datagrams.iter().filter(|d| d.answer.is_none()).count();

    // TCP: new connections never reach a removed pod; one fails only when it started while
    // a pod was being removed (its last packets may meet the removal).
    for conn in &connections {
        match &conn.greeting {
            Ok(who) => {
                violations.extend(stale(&removals, "a new TCP connection", conn.started, who))
            }
            Err(e) => {
                let near = |r: &Removal| {
                    let until = r.programmed.unwrap_or(r.written + PROGRAMMING);
                    conn.started + Duration::from_millis(100) >= r.written
                        && conn.started <= until + Duration::from_millis(100)
                };
                if !removals.iter().any(near) {
                    violations.push(format!("a new TCP connection failed, no removal near: {e}"));
                }
            }
        }
    }
    let failed_new = connections.iter().filter(|c| c.greeting.is_err()).count();

    // Held connections: to a pod that stays, never a reset; to a removed pod, answers stop
    // once the removal is programmed, and the connection is reset (re-routed to a live
    // backend, which answers the unknown segment with a RST), not left to time out.
    let (mut reset, mut exchanges) = (0, 0);
    for h in &held {
        for (sent, result) in &h.exchanges {
            exchanges += 1;
            match result {
                Ok(who) => violations.extend(stale(
                    &removals,
                    "a request on a held connection",
                    *sent,
                    who,
                )),
                Err(kind) => {
                    let Some(pod) = churned(&h.backend) else {
                        violations.push(format!(
                            "a held connection to {}, which stays, failed: {kind:?}",
                            h.backend
                        ));
                        continue;
                    };
                    let removed = removals.iter().any(|r| {
                        r.pod == pod
                            && r.written <= *sent
                            && r.rejoined.is_none_or(|j| j > h.opened)
                    });
                    if !removed {
                        violations.push(format!(
                            "a held connection to {pod} failed while it was in the Service: {kind:?}"
                        ));
                    } else if !matches!(
                        kind,
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::UnexpectedEof
                    ) {
                        violations.push(format!(
                            "a held connection to the removed {pod} ended with {kind:?}, not a reset"
                        ));
                    } else {
                        reset += 1;
                    }
                }
            }
        }
    }

    // Every removal was programmed in time.
    let mut latencies: Vec<Duration> = Vec::new();
    for r in removals.iter().skip(CHURNED.len() - 1) {
        match r.programmed {
            Some(p) if p - r.written <= PROGRAMMING => latencies.push(p - r.written),
            Some(p) => violations.push(format!(
                "{}'s removal took {} ms to program",
                r.pod,
                ms(p - r.written)
            )),
            None => violations.push(format!("{}'s removal was never programmed", r.pod)),
        }
    }
    latencies.sort();
    let summary = format!(
        "{} removals, programmed in {}..{} ms (median {} ms); UDP: {} datagrams, {} unanswered, \
         {moved} flows moved off a removed backend ({moved_shared} kept in the maps by `dns`), \
         slowest {} ms; TCP: {} new connections ({failed_new} failed near a removal), {} held \
         connections, {exchanges} exchanges, {reset} reset after their backend left",
        latencies.len(),
        latencies.first().map_or(0, |d| ms(*d)),
        latencies.last().map_or(0, |d| ms(*d)),
        latencies.get(latencies.len() / 2).map_or(0, |d| ms(*d)),
        datagrams.len(),
        lost,
        ms(slowest),
        connections.len(),
        held.len(),
    );
    println!("{summary}");
    if !violations.is_empty() {
        c.fail(format!("{} violations:\n{}\n({summary})", violations.len(), violations.join("\n")));
    }
    assert!(
        moved_shared > 0,
        "no UDP flow was on a pod `dns` keeps in the maps: nothing tested the flush ({summary})"
    );
    assert!(reset > 0, "no held connection met a removal ({summary})");
    assert!(
        held.iter().any(|h| STABLE.contains(&h.backend.as_str()) && h.exchanges.len() > 100),
        "no long-lived connection to a stable backend ({summary})"
    );
}

/// A pod that starts terminating (still serving) while others are ready gets no new flows
/// and its UDP flows move, but its TCP connections go on; once it is out of every slice,
/// the next packet of such a connection is answered with a reset, at once.
#[test]
fn a_terminating_backend_keeps_its_tcp_connections_until_it_is_gone() {
    let yaml = manifests();
    let c = Cluster::up(&[("churn.yaml", yaml.as_str())]);
    let (http, dns) = (c.vip("web", 80), c.vip("web", 53));
    c.wait_until("web answers", || c.tcp_ask(NS, "client", http, TIMEOUT).is_ok());
    let maps = AgentMaps::find(&c);
    let doomed = "churn-1";

    let mut held = None;
    c.wait_until(&format!("a connection to {doomed}"), || {
        held = open_held(&c).filter(|o| o.held.backend == doomed);
        held.is_some()
    });
    let mut held = held.expect("just opened");
    let mut udp = None;
    c.wait_until(&format!("a UDP flow on {doomed}"), || {
        let s = c.udp_flow(dns);
        let mut buf = [0u8; 64];
        let on = s
            .send(b"who?\n")
            .and_then(|_| s.recv(&mut buf))
            .is_ok_and(|n| &buf[..n] == b"churn-1\n");
        udp = on.then_some(s);
        on
    });
    let udp = udp.expect("just found");
    let ask_held = |o: &mut Open| -> Result<String, io::Error> {
        let mut line = String::new();
        o.stream.write_all(b"again\n")?;
        match o.reader.read_line(&mut line)? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(line.trim().to_string()),
        }
    };

    // Terminating, still serving: the slice says ready=false, serving=true, terminating=true.
    let terminating = pod(doomed, "app: web").replacen(
        &format!("namespace: {NS},"),
        &format!("namespace: {NS}, deletionTimestamp: \"2026-01-01T00:00:00Z\","),
        1,
    );
    c.apply(&[("terminating.yaml", terminating.as_str())]).unwrap_or_else(|e| panic!("{e:#}"));
    let mut clean = 0;
    c.wait_until(&format!("{doomed} gets no new connections"), || {
        let hit = c.tcp_ask(NS, "client", http, TIMEOUT).map_or(true, |who| who == doomed);
        clean = if hit { 0 } else { clean + 1 };
        clean >= 20
    });
    for i in 0..40 {
        let who = c.tcp_ask(NS, "client", http, TIMEOUT).unwrap_or_else(|e| c.fail(e));
        assert_ne!(who, doomed, "new connection {i} reached the terminating pod");
    }
    for i in 0..10 {
        let who = ask_held(&mut held).unwrap_or_else(|e| c.fail(format!("exchange {i}: {e}")));
        assert_eq!(who, doomed, "the connection to the terminating pod moved");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut buf = [0u8; 64];
    let n = udp.send(b"who?\n").and_then(|_| udp.recv(&mut buf)).unwrap_or_else(|e| c.fail(e));
    assert_ne!(&buf[..n], b"churn-1\n", "the UDP flow stayed on the terminating pod");

    // Gone from every slice (as when its deletion completes; relabelled here so the pod
    // itself lives on and would answer, had the packet reached it). The next request on
    // the connection is sent to a live backend instead, which resets it.
    let gone = BackendV4::new(c.ip(doomed).octets(), HTTP_TARGET, IPPROTO_TCP);
    c.set_in_web(doomed, false);
    c.wait_until(&format!("{doomed}'s endpoint is no longer a backend"), || {
        !maps.backends.iter().flatten().any(|(_, b)| b == gone)
    });
    let started = Instant::now();
    let end = ask_held(&mut held);
    let kind = end.as_ref().map_err(io::Error::kind);
    assert!(
        matches!(kind, Err(io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof)),
        "the connection to a pod that is gone must be reset, got {end:?}"
    );
    assert!(started.elapsed() < TIMEOUT, "the reset came after {:?}", started.elapsed());
}
