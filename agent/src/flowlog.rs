//! The NetworkPolicy verdict log: one JSON line per policy verdict the datapath reports, in
//! the spirit of GKE Dataplane V2's network policy logging and Hubble's flow records.
//!
//! ```text
//!  FLOW_EVENTS ring buffer (kernel: every deny, and allowed new flows with --flow-log-allowed)
//!      │  48-byte records                       run(): AsyncFd readiness, drain, write, flush
//!      ▼
//!  decode        bytes -> FlowEvent; short or out-of-range records counted ("malformed"), skipped
//!      ▼
//!  TokenBucket   --flow-log-rate events/s, --flow-log-burst
//!      │ within the rate                 │ over it
//!      ▼                                 ▼
//!  one "flow" line per event     Aggregates: count per (src, dst, dst port, proto, dir, verdict)
//!                                   │ at the end of each second
//!                                   ▼
//!                                one "aggregate" line per key with "count": N; keys beyond
//!                                the map's bound only add to one "overflow" line
//!      ▼
//!  Resolver      IP -> pod, (set, dir) -> isolating policies, rule -> allowing rules,
//!                identity -> description; swapped whole by the agent ([`SharedResolver`])
//!      ▼
//!  FlowWriter    stdout (`-`) or a file (append, created 0640), flushed once per batch
//! ```
//!
//! [`FlowLog`] is the synchronous core (no I/O, the clock passed in), so tests drive it
//! without a kernel; [`run`] wires it to the ring buffer, and [`spawn`] does all of it from
//! the configuration.
//!
//! # Line format
//!
//! One JSON object per line; fields in this order, names stable (new fields may be added):
//!
//! | field | present | meaning |
//! |---|---|---|
//! | `time` | always | RFC 3339 UTC with nanoseconds: when the kernel judged the packet (for an aggregate, the first packet of the group; for an overflow line, the last) |
//! | `type` | always | `flow` (one event), `aggregate` (events over the rate limit with the same key, during one second), `overflow` (events over the rate limit whose key did not fit the aggregation map) |
//! | `node` | with a node name | this node |
//! | `verdict` | not overflow | `allow` or `deny` |
//! | `direction` | not overflow | `ingress` (checked at the destination pod) or `egress` (at the source pod) |
//! | `protocol` | not overflow | `TCP`, `UDP`, `SCTP`, `ICMP`, or the IP protocol number |
//! | `src`, `dst` | not overflow | `{"ip", "port", "pod", "identity", "identity_name"}`: `port` only for TCP/UDP/SCTP (and not for an aggregate's source, which groups many ports); `pod` (`namespace/name`) when the address is a known pod; `identity` (and `identity_name` when known) on the peer side only: the source for ingress, the destination for egress |
//! | `service` | egress lines of flows to a Service | `{"ip", "port"}`: the ClusterIP and port the client sent to; `dst` is then the chosen backend. The client's node judges egress as it translates, so it knows the ClusterIP; the backend's ingress line shows the packet as it arrives (the backend), without `service` |
//! | `policies` | not overflow | deny: the policies that isolate the pod in this direction; allow: the policies whose rules allowed it (empty for a pod that is not isolated) |
//! | `rules` | allow by a rule | `[{"policy", "index"}]`: the rules (index into the policy's `ingress`/`egress` list) that allowed the flow |
//! | `reason` | always | the datapath's outcome (`policy-denied`, ...: `common/src/reason.rs`); `rate-limited` for an overflow line |
//! | `count` | always | events this line stands for: 1 for `flow` |
//!
//! ```json
//! {"time":"2026-01-01T00:00:00.000000000Z","type":"flow","verdict":"deny","direction":"ingress","protocol":"TCP","src":{"ip":"10.244.1.2","port":40000,"pod":"default/client","identity":4711},"dst":{"ip":"10.244.0.5","port":8080,"pod":"default/web"},"service":{"ip":"10.96.0.10","port":80},"policies":["default/deny-all"],"reason":"policy-denied","count":1}
//! ```
//!
//! # Time
//!
//! The kernel stamps events with `bpf_ktime_get_ns()`, i.e. `CLOCK_MONOTONIC`. [`WallClock`]
//! reads `CLOCK_REALTIME`, `CLOCK_MONOTONIC`, `CLOCK_REALTIME` (three tries, keeping the
//! tightest bracket) and keeps the offset between them; an event's wall time is its
//! `ts_ns` plus that offset. `CLOCK_MONOTONIC` follows NTP's frequency corrections but not
//! its steps, so [`run`] recalibrates once a minute: a step of the wall clock shows up in
//! the log within a minute.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::Ipv4Addr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use nodeplane_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    policy::{
        FlowEvent, IDENTITY_ANY, IDENTITY_UNSELECTED, IPPROTO_ICMP, IPPROTO_SCTP, PolicyCounterKey,
        SET_NONE, VERDICT_ALLOW, VERDICT_DENY,
    },
    reason::Reason,
};
use serde::Serialize;
use tracing::warn;

pub use crate::policy::compute::{Direction, RuleRef};
use crate::{
    metrics::{FlowOutcome, Metrics, PolicyVerdictLabel},
    model::ObjectKey,
};

/// Size of one `FLOW_EVENTS` record.
pub const RECORD_LEN: usize = std::mem::size_of::<FlowEvent>();

/// Keys the aggregation map holds per second before events only add to the overflow count.
pub const DEFAULT_MAX_AGGREGATES: usize = 1024;

/// Records taken from the ring per wake-up before the task yields (to its timer and to
/// other tasks); the rest are read right after.
const MAX_BATCH: usize = 4096;

// --- decoding ---

/// A record that is not a valid [`FlowEvent`]. Counted as `malformed`, never fatal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("flow event record of {len} bytes, {RECORD_LEN} expected")]
    Short { len: usize },
    #[error("flow event with unknown direction {0}")]
    Direction(u8),
    #[error("flow event with unknown verdict {0}")]
    Verdict(u8),
}

/// Decodes one ring buffer record. Longer records are accepted and their tail ignored (a
/// later datapath may append fields; the layout is an ABI and only grows).
pub fn decode(bytes: &[u8]) -> Result<FlowEvent, DecodeError> {
    let Some(b) = bytes.get(..RECORD_LEN) else {
        return Err(DecodeError::Short { len: bytes.len() });
    };
    // Field by field at the `repr(C)` offsets (the size assert in common pins them), so no
    // alignment is assumed of the ring's memory and no unsafe is needed.
    let a2 = |o: usize| [b[o], b[o + 1]];
    let a4 = |o: usize| [b[o], b[o + 1], b[o + 2], b[o + 3]];
    let u32_at = |o: usize| u32::from_ne_bytes(a4(o));
    let mut ts = [0; 8];
    ts.copy_from_slice(&b[0..8]);
    let event = FlowEvent {
        ts_ns: u64::from_ne_bytes(ts),
        saddr: a4(8),
        daddr: a4(12),
        sport: a2(16),
        dport: a2(18),
        proto: b[20],
        dir: b[21],
        verdict: b[22],
        reason: b[23],
        set: u32_at(24),
        rule: u32_at(28),
        peer_identity: u32_at(32),
        orig_daddr: a4(36),
        orig_dport: a2(40),
        _pad: a2(42),
        _reserved: u32_at(44),
    };
    check(&event)?;
    Ok(event)
}

fn check(event: &FlowEvent) -> Result<(), DecodeError> {
    Direction::from_raw(event.dir).ok_or(DecodeError::Direction(event.dir))?;
    Verdict::from_raw(event.verdict).ok_or(DecodeError::Verdict(event.verdict))?;
    Ok(())
}

/// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub const fn from_raw(verdict: u8) -> Option<Self> {
        match verdict {
            VERDICT_ALLOW => Some(Self::Allow),
            VERDICT_DENY => Some(Self::Deny),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

// --- time ---

/// Converts the kernel's `CLOCK_MONOTONIC` stamps to wall time (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// Unix time in ns minus monotonic time in ns, at calibration.
    offset_ns: i128,
}

impl WallClock {
    /// Reads both clocks now.
    pub fn calibrate() -> Self {
        let mut best: Option<(i128, i128)> = None; // (bracket width, offset)
        for _ in 0..3 {
            let before = clock_ns(libc::CLOCK_REALTIME);
            let mono = clock_ns(libc::CLOCK_MONOTONIC);
            let after = clock_ns(libc::CLOCK_REALTIME);
            let width = after - before;
            let offset = before + width / 2 - mono;
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        Self { offset_ns: best.map_or(0, |(_, offset)| offset) }
    }

    /// A clock on which monotonic `mono_ns` is `wall` (tests).
    pub fn fixed(mono_ns: u64, wall: SystemTime) -> Self {
        let wall_ns = match wall.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        Self { offset_ns: wall_ns - i128::from(mono_ns) }
    }

    /// Unix time in ns of the monotonic stamp `ts_ns`.
    pub fn unix_ns(&self, ts_ns: u64) -> i128 {
        i128::from(ts_ns) + self.offset_ns
    }

    /// `ts_ns` as RFC 3339 UTC with nanoseconds.
    pub fn format(&self, ts_ns: u64) -> String {
        rfc3339_nanos(self.unix_ns(ts_ns))
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec that clock_gettime only writes.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    // CLOCK_REALTIME and CLOCK_MONOTONIC always exist on Linux: a failure is impossible.
    debug_assert_eq!(rc, 0, "clock_gettime({clock})");
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `2026-01-01T00:00:00.000000000Z`: fixed width, so lines sort by time as text.
pub fn rfc3339_nanos(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

// --- names ---

/// What the flow log needs to know of the agent's state to name things. The agent
/// implements it (or fills a [`NameTables`]) from its index and the computed policy maps,
/// and replaces it in the [`SharedResolver`] after every policy sync.
///
/// Called only for lines actually written (at most the rate limit per second, plus one per
/// aggregate), so owned return values are fine.
pub trait Resolver: Send + Sync {
    /// The pod that has this address (any node), if any.
    fn pod(&self, ip: Ipv4Addr) -> Option<ObjectKey>;
    /// The policies that select the pod whose policy set in `direction` is `set`, and so
    /// isolate it: the policies a deny is attributed to.
    fn isolating_policies(&self, set: u32, direction: Direction) -> Vec<ObjectKey>;
    /// The rules behind a `POLICY_V4` rule id: what an allow is attributed to.
    fn allowing_rules(&self, rule: u32) -> Vec<RuleRef>;
    /// A short description of a peer identity (e.g. `pod default/web`, `ipBlock
    /// 10.0.0.0/8`, `3 pods`), if known.
    fn identity(&self, identity: u32) -> Option<String>;
}

/// The plain-table [`Resolver`]: fill the maps from the index and the computed policy
/// maps, then [`SharedResolver::set`] it.
#[derive(Clone, Debug, Default)]
pub struct NameTables {
    pub pods: std::collections::HashMap<Ipv4Addr, ObjectKey>,
    pub sets: std::collections::HashMap<(u32, Direction), Vec<ObjectKey>>,
    pub rules: std::collections::HashMap<u32, Vec<RuleRef>>,
    pub identities: std::collections::HashMap<u32, String>,
}

impl Resolver for NameTables {
    fn pod(&self, ip: Ipv4Addr) -> Option<ObjectKey> {
        self.pods.get(&ip).cloned()
    }
    fn isolating_policies(&self, set: u32, direction: Direction) -> Vec<ObjectKey> {
        self.sets.get(&(set, direction)).cloned().unwrap_or_default()
    }
    fn allowing_rules(&self, rule: u32) -> Vec<RuleRef> {
        self.rules.get(&rule).cloned().unwrap_or_default()
    }
    fn identity(&self, identity: u32) -> Option<String> {
        self.identities.get(&identity).cloned()
    }
}

/// A [`Resolver`] shared between the agent (which replaces it whole when its state
/// changes) and the flow log task (which takes the current one per batch). Cloning shares.
#[derive(Clone)]
pub struct SharedResolver(Arc<RwLock<Arc<dyn Resolver>>>);

impl Default for SharedResolver {
    /// Knows no names until the first [`set`](Self::set): lines carry addresses only.
    fn default() -> Self {
        Self::new(NameTables::default())
    }
}

impl SharedResolver {
    pub fn new(resolver: impl Resolver + 'static) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(resolver))))
    }

    /// Replaces the resolver; the flow log uses it from its next batch on.
    pub fn set(&self, resolver: impl Resolver + 'static) {
        self.set_arc(Arc::new(resolver));
    }

    pub fn set_arc(&self, resolver: Arc<dyn Resolver>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = resolver;
    }

    /// The current resolver (an `Arc` clone under a read lock: cheap).
    pub fn get(&self) -> Arc<dyn Resolver> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Sums `POLICY_COUNTERS` (already summed over CPUs: `(key, packets)`) per policy,
/// direction and verdict, for [`Metrics::observe_policy_verdicts`]. An allow counts for
/// every policy with a rule behind its rule id, a deny for every policy isolating the pod;
/// keys with a direction or verdict the agent does not know, or no policy behind them (a
/// stale id), are left out.
pub fn policy_verdict_totals(
    counters: impl IntoIterator<Item = (PolicyCounterKey, u64)>,
    resolver: &dyn Resolver,
) -> BTreeMap<PolicyVerdictLabel, u64> {
    let mut totals = BTreeMap::new();
    for (key, packets) in counters {
        let (Some(dir), Some(verdict)) =
            (Direction::from_raw(key.dir), Verdict::from_raw(key.verdict))
        else {
            continue;
        };
        let policies: BTreeSet<ObjectKey> = match verdict {
            Verdict::Allow => {
                resolver.allowing_rules(key.id).into_iter().map(|r| r.policy).collect()
            }
            Verdict::Deny => resolver.isolating_policies(key.id, dir).into_iter().collect(),
        };
        for policy in policies {
            let label = PolicyVerdictLabel {
                policy: policy.to_string(),
                direction: dir.as_str().into(),
                verdict: verdict.as_str().into(),
            };
            *totals.entry(label).or_default() += packets;
        }
    }
    totals
}

// --- rate limiting ---

/// A token bucket: `rate` tokens per second, at most `burst` saved. Integer arithmetic in
/// nano-tokens, so a test with a fake clock gets exact counts.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    /// Capacity in nano-tokens.
    capacity: u128,
    nano_tokens: u128,
    last: Option<Instant>,
}

impl TokenBucket {
    /// Starts full. A rate of 0 never refills (after the burst, everything is limited).
    pub fn new(rate: u32, burst: u32) -> Self {
        let capacity = u128::from(burst) * 1_000_000_000;
        Self { rate: rate.into(), capacity, nano_tokens: capacity, last: None }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_nanos();
            self.nano_tokens =
                (self.nano_tokens + elapsed * u128::from(self.rate)).min(self.capacity);
        }
        if self.last.is_none_or(|last| now > last) {
            self.last = Some(now);
        }
        if self.nano_tokens >= 1_000_000_000 {
            self.nano_tokens -= 1_000_000_000;
            true
        } else {
            false
        }
    }
}

/// What events over the rate limit are grouped by: the flow without its source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct AggregateKey {
    saddr: [u8; 4],
    daddr: [u8; 4],
    dport: [u8; 2],
    proto: u8,
    dir: u8,
    verdict: u8,
}

impl AggregateKey {
    fn of(e: &FlowEvent) -> Self {
        Self {
            saddr: e.saddr,
            daddr: e.daddr,
            dport: e.dport,
            proto: e.proto,
            dir: e.dir,
            verdict: e.verdict,
        }
    }
}

struct Aggregate {
    /// The group's first event: its time, service, set and rule name the line.
    first: FlowEvent,
    count: u64,
}

// --- the core ---

/// Settings of a [`FlowLog`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogSettings {
    /// Events per second written as their own line.
    pub rate: u32,
    /// Events written at once after a quiet period.
    pub burst: u32,
    /// Aggregation keys per second (see the module docs).
    pub max_aggregates: usize,
    /// Written as `node` on every line, if given.
    pub node: Option<String>,
}

impl Default for FlowLogSettings {
    fn default() -> Self {
        Self { rate: 1000, burst: 2000, max_aggregates: DEFAULT_MAX_AGGREGATES, node: None }
    }
}

/// Events by outcome since the start (see `nodeplane_flow_events_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Events written as their own (`flow`) line.
    pub written: u64,
    /// Events over the rate limit: counted in an `aggregate` or `overflow` line.
    pub suppressed: u64,
    /// Records that were too short or held an unknown direction or verdict.
    pub malformed: u64,
}

/// The verdict log's synchronous core: events in, JSON lines out.
pub struct FlowLog {
    settings: FlowLogSettings,
    clock: WallClock,
    resolver: SharedResolver,
    bucket: TokenBucket,
    aggregates: BTreeMap<AggregateKey, Aggregate>,
    /// Suppressed events whose key did not fit `aggregates` this second, and the last one's
    /// time.
    overflow: u64,
    overflow_ts: u64,
    /// End of the current aggregation second; set by the first suppressed event.
    window_end: Option<Instant>,
    stats: FlowStats,
}

impl FlowLog {
    pub fn new(settings: FlowLogSettings, clock: WallClock, resolver: SharedResolver) -> Self {
        Self {
            bucket: TokenBucket::new(settings.rate, settings.burst),
            settings,
            clock,
            resolver,
            aggregates: BTreeMap::new(),
            overflow: 0,
            overflow_ts: 0,
            window_end: None,
            stats: FlowStats::default(),
        }
    }

    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    /// Replaces the wall clock calibration ([`run`] does every minute).
    pub fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    /// One ring buffer record: decoded, then [`handle`](Self::handle)d; a malformed one is
    /// counted and yields nothing.
    pub fn handle_record(&mut self, bytes: &[u8], now: Instant) -> Vec<String> {
        match decode(bytes) {
            Ok(event) => self.handle(&event, now),
            Err(_) => {
                self.stats.malformed += 1;
                self.tick(now)
            }
        }
    }

    /// One event at `now`: its own line if within the rate, else counted in this second's
    /// aggregates. Also returns the previous second's aggregate lines once it is over.
    pub fn handle(&mut self, event: &FlowEvent, now: Instant) -> Vec<String> {
        let mut lines = self.tick(now);
        if check(event).is_err() {
            self.stats.malformed += 1;
            return lines;
        }
        if self.bucket.try_take(now) {
            self.stats.written += 1;
            let resolver = self.resolver.get();
            lines.push(self.line(&*resolver, "flow", event, 1, true));
            return lines;
        }
        self.stats.suppressed += 1;
        self.window_end.get_or_insert(now + Duration::from_secs(1));
        let key = AggregateKey::of(event);
        if let Some(agg) = self.aggregates.get_mut(&key) {
            agg.count += 1;
        } else if self.aggregates.len() < self.settings.max_aggregates {
            self.aggregates.insert(key, Aggregate { first: *event, count: 1 });
        } else {
            self.overflow += 1;
            self.overflow_ts = event.ts_ns;
        }
        lines
    }

    /// The aggregate lines of the second that ended by `now`, if any. Call at least once a
    /// second ([`run`] does); [`handle`](Self::handle) calls it too.
    pub fn tick(&mut self, now: Instant) -> Vec<String> {
        match self.window_end {
            Some(end) if now >= end => self.flush(),
            _ => Vec::new(),
        }
    }

    /// The aggregate lines collected so far, whether or not their second is over (at exit).
    pub fn flush(&mut self) -> Vec<String> {
        self.window_end = None;
        let aggregates = std::mem::take(&mut self.aggregates);
        let mut lines = Vec::with_capacity(aggregates.len() + 1);
        if !aggregates.is_empty() {
            let resolver = self.resolver.get();
            for agg in aggregates.values() {
                lines.push(self.line(&*resolver, "aggregate", &agg.first, agg.count, false));
            }
        }
        if self.overflow > 0 {
            let line = OverflowLine {
                time: self.clock.format(self.overflow_ts),
                kind: "overflow",
                node: self.settings.node.as_deref(),
                reason: "rate-limited",
                count: std::mem::take(&mut self.overflow),
            };
            lines.push(serde_json::to_string(&line).expect("serializing a flow line"));
        }
        lines
    }

    fn line(
        &self,
        resolver: &dyn Resolver,
        kind: &'static str,
        e: &FlowEvent,
        count: u64,
        with_sport: bool,
    ) -> String {
        let dir = Direction::from_raw(e.dir).expect("checked");
        let verdict = Verdict::from_raw(e.verdict).expect("checked");
        let has_ports = matches!(e.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP);
        let endpoint = |addr: [u8; 4], port: [u8; 2], show_port: bool, peer: bool| {
            let ip = Ipv4Addr::from(addr);
            let identity = peer.then_some(e.peer_identity);
            EndpointJson {
                ip,
                port: (has_ports && show_port).then(|| u16::from_be_bytes(port)),
                pod: resolver.pod(ip).map(|k| k.to_string()),
                identity,
                identity_name: identity.and_then(|id| identity_name(resolver, id)),
            }
        };
        let service = (e.orig_daddr != [0; 4]).then(|| ServiceJson {
            ip: Ipv4Addr::from(e.orig_daddr),
            port: u16::from_be_bytes(e.orig_dport),
        });
        let mut rules = Vec::new();
        let policies: BTreeSet<String> = match verdict {
            Verdict::Deny if e.set != SET_NONE => {
                resolver.isolating_policies(e.set, dir).iter().map(ToString::to_string).collect()
            }
            Verdict::Allow if e.rule != 0 => {
                let mut refs = resolver.allowing_rules(e.rule);
                refs.sort();
                rules = refs
                    .iter()
                    .map(|r| RuleJson { policy: r.policy.to_string(), index: r.rule as usize })
                    .collect();
                refs.iter().map(|r| r.policy.to_string()).collect()
            }
            _ => BTreeSet::new(),
        };
        let line = FlowLine {
            time: self.clock.format(e.ts_ns),
            kind,
            node: self.settings.node.as_deref(),
            verdict: verdict.as_str(),
            direction: dir.as_str(),
            protocol: protocol_name(e.proto),
            src: endpoint(e.saddr, e.sport, with_sport, dir == Direction::Ingress),
            dst: endpoint(e.daddr, e.dport, true, dir == Direction::Egress),
            service,
            policies: policies.into_iter().collect(),
            rules,
            reason: Reason::from_index(e.reason.into()).map_or("unknown", Reason::name),
            count,
        };
        serde_json::to_string(&line).expect("serializing a flow line")
    }
}

/// Reserved identities have fixed names: `unselected` stands for every address no peer of
/// any policy matches, so an example pod of it would mislead.
fn identity_name(resolver: &dyn Resolver, id: u32) -> Option<String> {
    match id {
        IDENTITY_ANY => Some("any".into()),
        IDENTITY_UNSELECTED => Some("unselected".into()),
        _ => resolver.identity(id),
    }
}

fn protocol_name(proto: u8) -> std::borrow::Cow<'static, str> {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        IPPROTO_ICMP => "ICMP".into(),
        other => other.to_string().into(),
    }
}

#[derive(Serialize)]
struct FlowLine<'a> {
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    verdict: &'static str,
    direction: &'static str,
    protocol: std::borrow::Cow<'static, str>,
    src: EndpointJson,
    dst: EndpointJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<ServiceJson>,
    policies: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rules: Vec<RuleJson>,
    reason: &'static str,
    count: u64,
}

#[derive(Serialize)]
struct EndpointJson {
    ip: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_name: Option<String>,
}

#[derive(Serialize)]
struct ServiceJson {
    ip: Ipv4Addr,
    port: u16,
}

#[derive(Serialize)]
struct RuleJson {
    policy: String,
    index: usize,
}

#[derive(Serialize)]
struct OverflowLine<'a> {
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    reason: &'static str,
    count: u64,
}

// --- output ---

/// Where the lines go (`--flow-log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowLogOutput {
    /// `-`: the agent's stdout (its own logs go to stderr).
    Stdout,
    /// Appended to; created with mode 0640. Rotate with `copytruncate` (the file stays open).
    File(PathBuf),
}

impl std::str::FromStr for FlowLogOutput {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("empty path".into()),
            "-" => Ok(Self::Stdout),
            path => Ok(Self::File(path.into())),
        }
    }
}

/// Writes batches of lines, flushing once per batch.
pub struct FlowWriter {
    out: BufWriter<Box<dyn Write + Send>>,
}

impl FlowWriter {
    pub fn open(output: &FlowLogOutput) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match output {
            FlowLogOutput::Stdout => Box::new(io::stdout()),
            FlowLogOutput::File(path) => Box::new(open_log_file(path)?),
        };
        Ok(Self::new(out))
    }

    /// Any writer (tests).
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out: BufWriter::with_capacity(64 * 1024, out) }
    }

    /// Writes `lines`, one per line, and flushes.
    pub fn write_batch(&mut self, lines: &[String]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        for line in lines {
            self.out.write_all(line.as_bytes())?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }
}

/// Opens `path` for appending; a new file gets mode 0640 whatever the umask (an existing
/// one keeps the mode its owner gave it).
fn open_log_file(path: &Path) -> io::Result<File> {
    match OpenOptions::new().append(true).create_new(true).mode(0o640).open(path) {
        Ok(file) => {
            file.set_permissions(std::fs::Permissions::from_mode(0o640))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path)
        }
        Err(e) => Err(e),
    }
}

// --- the task ---

/// Reads `ring` until the process ends: drains it on every readiness notification, turns
/// records into lines, writes and flushes them per batch; once a second emits the aggregate
/// lines and copies the counters into `metrics`. Write errors are logged (once a minute)
/// and counted as `write_error`; the task goes on. Returns only if the ring cannot be
/// polled.
pub async fn run(
    ring: RingBuf<MapData>,
    mut log: FlowLog,
    mut writer: FlowWriter,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    use tokio::io::{Interest, unix::AsyncFd};

    // SAFETY: the fd is the ring buffer map's own, owned by `ring`'s `MapData`: it stays
    // open and the same for as long as the `AsyncFd` holds `ring`.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calibrated = Instant::now();
    let mut write_errors = 0u64;
    let mut last_error_logged: Option<Instant> = None;
    let mut lines = Vec::new();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let now = Instant::now();
                let mut taken = 0;
                let drained = loop {
                    if taken == MAX_BATCH {
                        break false;
                    }
                    let Some(item) = guard.get_inner_mut().next() else { break true };
                    lines.extend(log.handle_record(&item, now));
                    taken += 1;
                };
                // Readiness is edge-triggered: clear it only once the ring is empty, else
                // the next `readable_mut` returns at once and the rest is read then.
                if drained {
                    guard.clear_ready();
                }
            }
            _ = second.tick() => {
                let now = Instant::now();
                if now.duration_since(calibrated) >= Duration::from_secs(60) {
                    log.set_clock(WallClock::calibrate());
                    calibrated = now;
                }
                lines.extend(log.tick(now));
                let stats = log.stats();
                metrics.observe_flow_events(FlowOutcome::Written, stats.written);
                metrics.observe_flow_events(FlowOutcome::Suppressed, stats.suppressed);
                metrics.observe_flow_events(FlowOutcome::Malformed, stats.malformed);
                metrics.observe_flow_events(FlowOutcome::WriteError, write_errors);
            }
        }
        if let Err(e) = writer.write_batch(&lines) {
            write_errors += lines.len() as u64;
            let now = Instant::now();
            if last_error_logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                warn!(error = %e, lines = lines.len(), "writing the flow log failed");
                last_error_logged = Some(now);
            }
        }
        lines.clear();
    }
}

/// Everything [`run`] needs from the configuration: opens the output, calibrates the
/// clock and spawns the task. The caller keeps `resolver` and [`SharedResolver::set`]s it
/// after every policy sync.
pub fn spawn(
    config: &crate::config::FlowLogConfig,
    ring: RingBuf<MapData>,
    resolver: SharedResolver,
    metrics: Arc<Metrics>,
    node: Option<String>,
) -> io::Result<tokio::task::JoinHandle<io::Result<()>>> {
    let writer = FlowWriter::open(&config.output)?;
    let settings = FlowLogSettings {
        rate: config.rate,
        burst: config.burst,
        max_aggregates: DEFAULT_MAX_AGGREGATES,
        node,
    };
    let log = FlowLog::new(settings, WallClock::calibrate(), resolver);
    Ok(tokio::spawn(run(ring, log, writer, metrics)))
}

#[cfg(test)]
mod tests {
    use nodeplane_common::policy::{DIR_EGRESS, DIR_INGRESS};
    use serde_json::{Value, json};

    use super::*;

    const T0_NS: u64 = 1_000_000_000_000;

    fn clock() -> WallClock {
        // Monotonic T0_NS is 2026-01-01T00:00:00Z.
        WallClock::fixed(T0_NS, SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    fn ev(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowEvent {
        FlowEvent {
            ts_ns: T0_NS,
            saddr: src,
            daddr: dst,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto: IPPROTO_TCP,
            dir: DIR_INGRESS,
            verdict: VERDICT_DENY,
            reason: Reason::DropPolicy as u8,
            set: 7,
            rule: 0,
            peer_identity: 300,
            ..Default::default()
        }
    }

    fn bytes(e: &FlowEvent) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(e.ts_ns.to_ne_bytes());
        b.extend(e.saddr);
        b.extend(e.daddr);
        b.extend(e.sport);
        b.extend(e.dport);
        b.extend([e.proto, e.dir, e.verdict, e.reason]);
        for v in [e.set, e.rule, e.peer_identity] {
            b.extend(v.to_ne_bytes());
        }
        b.extend(e.orig_daddr);
        b.extend(e.orig_dport);
        b.extend([0, 0, 0, 0, 0, 0]); // _pad and the tail padding to 8-byte alignment
        b
    }

    fn names() -> NameTables {
        let mut t = NameTables::default();
        t.pods.insert(Ipv4Addr::new(10, 244, 1, 2), ObjectKey::namespaced("default", "client"));
        t.pods.insert(Ipv4Addr::new(10, 244, 0, 5), ObjectKey::namespaced("default", "web"));
        t.sets.insert(
            (7, Direction::Ingress),
            vec![ObjectKey::namespaced("default", "b"), ObjectKey::namespaced("default", "a")],
        );
        t.rules.insert(
            42,
            vec![RuleRef {
                policy: ObjectKey::namespaced("default", "allow-web"),
                dir: Direction::Ingress,
                rule: 1,
            }],
        );
        t.identities.insert(300, "pod default/client".into());
        t
    }

    fn log(rate: u32, burst: u32, max_aggregates: usize) -> FlowLog {
        let settings = FlowLogSettings { rate, burst, max_aggregates, node: None };
        FlowLog::new(settings, clock(), SharedResolver::new(names()))
    }

    fn parse(line: &str) -> Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    const CLIENT: [u8; 4] = [10, 244, 1, 2];
    const WEB: [u8; 4] = [10, 244, 0, 5];

    #[test]
    fn records_decode_and_short_ones_are_counted_not_fatal() {
        let mut e = ev(CLIENT, 40000, WEB, 8080);
        e.orig_daddr = [10, 96, 0, 10];
        e.orig_dport = 80u16.to_be_bytes();
        let b = bytes(&e);
        assert_eq!(b.len(), RECORD_LEN);
        assert_eq!(decode(&b), Ok(e));
        // A longer record (a later datapath) decodes its known prefix.
        let mut longer = b.clone();
        longer.extend([9; 8]);
        assert_eq!(decode(&longer), Ok(e));
        assert_eq!(decode(&b[..47]), Err(DecodeError::Short { len: 47 }));
        assert_eq!(decode(&[]), Err(DecodeError::Short { len: 0 }));
        let mut bad = b.clone();
        bad[21] = 9;
        assert_eq!(decode(&bad), Err(DecodeError::Direction(9)));
        bad[21] = DIR_EGRESS;
        bad[22] = 3;
        assert_eq!(decode(&bad), Err(DecodeError::Verdict(3)));

        let mut log = log(10, 10, 8);
        let now = Instant::now();
        assert!(log.handle_record(&b[..10], now).is_empty());
        assert!(log.handle_record(&bad, now).is_empty());
        assert_eq!(log.handle_record(&b, now).len(), 1);
        assert_eq!(log.stats(), FlowStats { written: 1, suppressed: 0, malformed: 2 });
    }

    #[test]
    fn a_deny_line_names_pods_identity_and_isolating_policies() {
        let mut log = log(10, 10, 8);
        let mut e = ev(CLIENT, 40000, WEB, 8080);
        e.ts_ns = T0_NS + 1_500;
        let lines = log.handle(&e, Instant::now());
        assert_eq!(lines.len(), 1);
        assert_eq!(
            parse(&lines[0]),
            json!({
                "time": "2026-01-01T00:00:00.000001500Z",
                "type": "flow",
                "verdict": "deny",
                "direction": "ingress",
                "protocol": "TCP",
                "src": {"ip": "10.244.1.2", "port": 40000, "pod": "default/client",
                        "identity": 300, "identity_name": "pod default/client"},
                "dst": {"ip": "10.244.0.5", "port": 8080, "pod": "default/web"},
                "policies": ["default/a", "default/b"],
                "reason": "policy-denied",
                "count": 1,
            })
        );
        // Field order is part of the format.
        let start = concat!(
            r#"{"time":"2026-01-01T00:00:00.000001500Z","type":"flow","verdict":"deny","#,
            r#""direction":"ingress","protocol":"TCP","src":{"ip":"10.244.1.2","port":40000,"#
        );
        assert!(lines[0].starts_with(start), "{}", lines[0]);
    }

    #[test]
    fn an_allowed_service_flow_names_the_service_and_the_rules() {
        let mut log = log(10, 10, 8);
        let mut e = ev(WEB, 33000, [1, 1, 1, 1], 53);
        e.proto = IPPROTO_UDP;
        e.dir = DIR_EGRESS;
        e.verdict = VERDICT_ALLOW;
        e.reason = Reason::NatNew as u8;
        e.rule = 42;
        e.peer_identity = IDENTITY_UNSELECTED;
        e.orig_daddr = [10, 96, 0, 10];
        e.orig_dport = 53u16.to_be_bytes();
        let settings = FlowLogSettings { node: Some("n1".into()), ..FlowLogSettings::default() };
        log.settings = settings;
        let line = parse(&log.handle(&e, Instant::now())[0]);
        assert_eq!(
            line,
            json!({
                "time": "2026-01-01T00:00:00.000000000Z",
                "type": "flow",
                "node": "n1",
                "verdict": "allow",
                "direction": "egress",
                "protocol": "UDP",
                "src": {"ip": "10.244.0.5", "port": 33000, "pod": "default/web"},
                "dst": {"ip": "1.1.1.1", "port": 53, "identity": 1, "identity_name": "unselected"},
                "service": {"ip": "10.96.0.10", "port": 53},
                "policies": ["default/allow-web"],
                "rules": [{"policy": "default/allow-web", "index": 1}],
                "reason": "nat-new",
                "count": 1,
            })
        );
    }

    #[test]
    fn icmp_has_no_ports_and_unknown_names_are_left_out() {
        let mut log = FlowLog::new(FlowLogSettings::default(), clock(), SharedResolver::default());
        let mut e = ev([192, 168, 0, 1], 0, WEB, 0);
        e.proto = IPPROTO_ICMP;
        let line = parse(&log.handle(&e, Instant::now())[0]);
        assert_eq!(line["protocol"], "ICMP");
        assert_eq!(line["src"], json!({"ip": "192.168.0.1", "identity": 300}));
        assert_eq!(line["dst"], json!({"ip": "10.244.0.5"}));
        assert_eq!(line["policies"], json!([]));
        e.proto = 47;
        assert_eq!(parse(&log.handle(&e, Instant::now())[0])["protocol"], "47");
    }

    #[test]
    fn the_resolver_is_swapped_whole() {
        let resolver = SharedResolver::default();
        let mut log = FlowLog::new(FlowLogSettings::default(), clock(), resolver.clone());
        let e = ev(CLIENT, 1, WEB, 80);
        let now = Instant::now();
        assert_eq!(parse(&log.handle(&e, now)[0])["src"].get("pod"), None);
        resolver.set(names());
        assert_eq!(parse(&log.handle(&e, now)[0])["src"]["pod"], "default/client");
    }

    #[test]
    fn exactly_the_rate_passes_in_a_second_and_the_rest_is_aggregated() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 1, 3]);
        let mut log = log(10, 10, 8);
        let t0 = Instant::now();
        let mut flows = 0;
        for i in 0..25u16 {
            let src = if i % 2 == 0 { a } else { b };
            let lines = log.handle(&ev(src, 40000 + i, WEB, 8080), t0);
            flows += lines.len();
        }
        assert_eq!(flows, 10);
        assert_eq!(log.stats(), FlowStats { written: 10, suppressed: 15, malformed: 0 });
        assert!(log.tick(t0 + Duration::from_millis(999)).is_empty(), "the second is not over");
        let summary: Vec<Value> =
            log.tick(t0 + Duration::from_secs(1)).iter().map(|l| parse(l)).collect();
        // Events 10..25: a at the even ones (8), b at the odd ones (7).
        assert_eq!(summary.len(), 2, "{summary:?}");
        for (line, src, count) in [(&summary[0], "10.244.1.2", 8), (&summary[1], "10.244.1.3", 7)] {
            assert_eq!(line["type"], "aggregate");
            assert_eq!(line["count"], count);
            assert_eq!(line["src"]["ip"], src);
            assert_eq!(line["src"].get("port"), None, "an aggregate spans source ports");
            assert_eq!(line["dst"]["port"], 8080);
            assert_eq!(line["policies"], json!(["default/a", "default/b"]));
        }
        assert!(log.tick(t0 + Duration::from_secs(5)).is_empty(), "emitted once");

        // The bucket refills at the rate: half a second after the burst, 5 more pass.
        let t1 = t0 + Duration::from_millis(500);
        let mut log = log_after_burst(t0);
        let passed = (0..8).filter(|_| !log.handle(&ev(a, 1, WEB, 80), t1).is_empty()).count();
        assert_eq!(passed, 5);
    }

    fn log_after_burst(t0: Instant) -> FlowLog {
        let mut log = log(10, 10, 8);
        for _ in 0..10 {
            assert_eq!(log.handle(&ev(CLIENT, 1, WEB, 80), t0).len(), 1);
        }
        log
    }

    #[test]
    fn a_later_event_emits_the_finished_seconds_aggregates() {
        let mut log = log(1, 1, 8);
        let t0 = Instant::now();
        assert_eq!(log.handle(&ev(CLIENT, 1, WEB, 80), t0).len(), 1);
        assert!(log.handle(&ev(CLIENT, 2, WEB, 80), t0).is_empty());
        // 1.5 s later: the aggregate of the first second, then the new event's own line.
        let lines = log.handle(&ev(CLIENT, 3, WEB, 80), t0 + Duration::from_millis(1500));
        let kinds: Vec<Value> = lines.iter().map(|l| parse(l)["type"].clone()).collect();
        assert_eq!(kinds, [json!("aggregate"), json!("flow")]);
    }

    #[test]
    fn the_aggregation_map_is_bounded() {
        // Rate 0: everything is aggregated. Two keys fit; the other three only count.
        let mut log = log(0, 0, 2);
        let t0 = Instant::now();
        for host in 1..=5u8 {
            for _ in 0..host {
                let mut e = ev([10, 0, 0, host], 1, WEB, 80);
                e.ts_ns = T0_NS + u64::from(host);
                assert!(log.handle(&e, t0).is_empty());
            }
        }
        let lines: Vec<Value> =
            log.tick(t0 + Duration::from_secs(1)).iter().map(|l| parse(l)).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            (lines[0]["src"]["ip"].as_str(), lines[0]["count"].as_u64()),
            (Some("10.0.0.1"), Some(1))
        );
        assert_eq!(
            (lines[1]["src"]["ip"].as_str(), lines[1]["count"].as_u64()),
            (Some("10.0.0.2"), Some(2))
        );
        assert_eq!(
            lines[2],
            json!({"time": "2026-01-01T00:00:00.000000005Z", "type": "overflow",
                   "reason": "rate-limited", "count": 3 + 4 + 5})
        );
        assert_eq!(log.stats().suppressed, 15);
        assert_eq!(log.stats().written, 0);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339_nanos(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
        assert_eq!(rfc3339_nanos(-1), "1969-12-31T23:59:59.999999999Z");
        for s in ["2026-03-04T05:06:07.123456789Z", "2099-12-31T23:59:59.000000000Z"] {
            let t: k8s_openapi::jiff::Timestamp = s.parse().unwrap();
            assert_eq!(rfc3339_nanos(t.as_nanosecond()), s);
        }
        // The calibrated clock puts "now" at now.
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
        let got = WallClock::calibrate().unix_ns(mono);
        assert!((got - wall as i128).abs() < 50_000_000, "{got} vs {wall}");
    }

    #[test]
    fn policy_counters_are_summed_per_policy() {
        let names = names();
        let key = |id, verdict, dir| PolicyCounterKey { id, verdict, dir, _pad: [0; 2] };
        let totals = policy_verdict_totals(
            [
                (key(7, VERDICT_DENY, DIR_INGRESS), 3),
                (key(42, VERDICT_ALLOW, DIR_INGRESS), 5),
                (key(99, VERDICT_ALLOW, DIR_INGRESS), 1), // stale id: no policy
                (key(7, 9, DIR_INGRESS), 1),              // unknown verdict
            ],
            &names,
        );
        let label = |p: &str, v: &str| PolicyVerdictLabel {
            policy: p.into(),
            direction: "ingress".into(),
            verdict: v.into(),
        };
        assert_eq!(
            totals,
            BTreeMap::from([
                (label("default/a", "deny"), 3),
                (label("default/allow-web", "allow"), 5),
                (label("default/b", "deny"), 3),
            ])
        );
    }

    #[test]
    fn the_file_is_appended_and_created_0640() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.log");
        let output: FlowLogOutput = path.to_str().unwrap().parse().unwrap();
        let mut w = FlowWriter::open(&output).unwrap();
        w.write_batch(&["{\"a\":1}".into(), "{\"b\":2}".into()]).unwrap();
        drop(w);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let mut w = FlowWriter::open(&output).unwrap();
        w.write_batch(&["{\"c\":3}".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        assert_eq!("-".parse(), Ok(FlowLogOutput::Stdout));
        assert!("".parse::<FlowLogOutput>().is_err());
    }
}
