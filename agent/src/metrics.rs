//! Prometheus metrics of the agent, and the HTTP servers for them and for health.
//!
//! Names follow Prometheus conventions (base units, `_seconds`, `_total`); every metric is
//! listed in docs/METRICS.md. They cover the control plane (how fresh the sources are, how
//! fast changes reach the maps, what was skipped), the datapath's per-hook and per-reason
//! counters and how full its maps are. The metrics server also carries `/loglevel` ([`LogLevel`]).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    Router,
    extract::{ConnectInfo, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;

use nodeplane_common::reason::{Hook, Reason};

use crate::{
    health::Health,
    occupancy::{CtCounts, MapUsage},
    source::{Kind, kube::SourceHealth},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

use crate::sync::WriteFailure;

/// A failed sync: which maps (`service`, `policy`) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncErrorLabel {
    pub maps: String,
    pub reason: String,
}

/// A datapath outcome: the program that counted it (`from_pod`, `to_pod`), its reason and
/// what became of the packet (`Reason::verdict`: `pass`, `drop` or `reject`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub hook: String,
    pub reason: String,
    pub verdict: String,
}

/// A NetworkPolicy's verdicts in one direction: `policy` is `namespace/name`, `direction`
/// `ingress`/`egress`, `verdict` `allow`/`deny`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PolicyVerdictLabel {
    pub policy: String,
    pub direction: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// What became of a policy verdict event (`nodeplane_flow_events_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowOutcome {
    /// Written to the flow log as its own line.
    Written,
    /// Not written: the ring buffer was full (the kernel's `FLOW_EVENT_COUNTERS[1]`).
    Lost,
    /// Over the rate limit: counted in an aggregate or overflow line instead.
    Suppressed,
    /// A record the agent could not decode.
    Malformed,
    /// Its line could not be written (disk full, closed stdout).
    WriteError,
}

impl FlowOutcome {
    pub const ALL: [FlowOutcome; 5] =
        [Self::Written, Self::Lost, Self::Suppressed, Self::Malformed, Self::WriteError];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Lost => "lost",
            Self::Suppressed => "suppressed",
            Self::Malformed => "malformed",
            Self::WriteError => "write_error",
        }
    }
}

/// Sizes of the policy maps after a policy sync ([`Metrics::observe_policy_maps`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyMapSizes {
    /// Distinct peer identities in use.
    pub identities: usize,
    /// Entries of `IPCACHE_V4`.
    pub ipcache: usize,
    /// Entries of `ENDPOINTS_V4`.
    pub endpoints: usize,
    /// Entries of `POLICY_V4`.
    pub policy: usize,
}

/// A conntrack table (`service`: `CT_V4`, `policy`: `POLICY_CT_V4`), protocol and state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConntrackLabel {
    pub table: String,
    pub protocol: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: String,
}

/// The agent's metrics. Cheap to update; encoded on scrape.
pub struct Metrics {
    registry: Registry,
    /// Time from a change's trigger (EndpointSlice annotation) to the maps.
    pub network_programming: Histogram,
    /// Time from the agent receiving a change to the maps.
    pub event_programming: Histogram,
    pub sync_duration: Histogram,
    /// By `(maps, reason)`: see [`Metrics::observe_sync_error`].
    pub sync_errors: Family<SyncErrorLabel, Counter>,
    pub source_stale: Family<KindLabel, Gauge<f64, AtomicU64>>,
    pub source_errors: Family<KindLabel, Counter>,
    pub source_lists: Family<KindLabel, Counter>,
    pub objects: Family<KindLabel, Gauge>,
    pub skipped: Family<ReasonLabel, Gauge>,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub datapath_packets: Family<VerdictLabel, Counter>,
    pub datapath_bytes: Family<VerdictLabel, Counter>,
    pub policy_verdicts: Family<PolicyVerdictLabel, Counter>,
    pub flow_events: Family<OutcomeLabel, Counter>,
    pub policy_identities: Gauge,
    pub policy_entries: Family<MapLabel, Gauge>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub conntrack_entries: Family<ConntrackLabel, Gauge>,
    pub census_duration: Histogram,
    /// The conntrack GC's (`nodeplane_conntrack_gc_*`).
    pub conntrack_gc: crate::ctgc::GcMetrics,
    /// Last seen totals of the source's counters, to add only the difference.
    seen: Mutex<BTreeMap<Kind, (u64, u64)>>,
    /// Last seen datapath totals per hook and reason (packets, bytes).
    seen_datapath: Mutex<BTreeMap<(Hook, Reason), (u64, u64)>>,
    /// Last seen policy verdict totals.
    seen_verdicts: Mutex<BTreeMap<PolicyVerdictLabel, u64>>,
    /// Last seen flow event totals per outcome.
    seen_flow_events: Mutex<BTreeMap<FlowOutcome, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nodeplane");
        // 1 ms .. ~65 s.
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let m = Self {
            network_programming: latency(),
            event_programming: latency(),
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            sync_errors: Family::default(),
            source_stale: Family::default(),
            source_errors: Family::default(),
            source_lists: Family::default(),
            objects: Family::default(),
            skipped: Family::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            datapath_packets: Family::default(),
            datapath_bytes: Family::default(),
            policy_verdicts: Family::default(),
            flow_events: Family::default(),
            policy_identities: Gauge::default(),
            policy_entries: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            conntrack_entries: Family::default(),
            // 100 us .. ~3 s.
            census_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            conntrack_gc: Default::default(),
            seen: Mutex::default(),
            seen_datapath: Mutex::default(),
            seen_verdicts: Mutex::default(),
            seen_flow_events: Mutex::default(),
            registry: Registry::default(),
        };
        // Every failure kind exported from the start, so `increase()` sees the first one.
        for maps in ["service", "policy"] {
            for reason in [WriteFailure::MapFull, WriteFailure::NoEntry, WriteFailure::Other] {
                let label = SyncErrorLabel { maps: maps.into(), reason: reason.as_str().into() };
                drop(m.sync_errors.get_or_create(&label));
            }
        }
        let build = Family::<BuildLabel, Gauge>::default();
        build.get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "The agent's version (always 1)", build);
        registry.register(
            "datapath_packets",
            "Packets seen by the datapath programs, by hook and outcome (per-CPU counters summed)",
            m.datapath_packets.clone(),
        );
        registry.register(
            "datapath_bytes",
            "Bytes seen by the datapath programs, by hook and outcome",
            m.datapath_bytes.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "Time from a change's trigger (the EndpointSlice's last-change-trigger-time) until the datapath maps reflect it",
            m.network_programming.clone(),
        );
        registry.register(
            "event_programming_duration_seconds",
            "Time from the agent receiving a change until the datapath maps reflect it",
            m.event_programming.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time to compute and write one sync of the service maps",
            m.sync_duration.clone(),
        );
        registry.register(
            "sync_errors",
            "Syncs that failed to write the maps, by maps (service, policy) and reason \
             (map_full, no_entry, write_failed)",
            m.sync_errors.clone(),
        );
        registry.register(
            "source_stale_seconds",
            "How long a watched kind has been without a working watch (0 while it works)",
            m.source_stale.clone(),
        );
        registry.register(
            "source_watch_errors",
            "Watch failures per kind",
            m.source_errors.clone(),
        );
        registry.register("source_lists", "Completed (re)lists per kind", m.source_lists.clone());
        registry.register("objects", "Objects held in the index per kind", m.objects.clone());
        registry.register(
            "skipped_objects",
            "Objects (or parts) not programmed because they are invalid, by reason",
            m.skipped.clone(),
        );
        registry.register(
            "service_frontends",
            "Service frontends (VIP, port, protocol) programmed",
            m.frontends.clone(),
        );
        registry.register(
            "service_backends",
            "Backends programmed, summed over frontends",
            m.backends.clone(),
        );
        registry.register(
            "policy_verdicts",
            "Policy verdicts on new flows per NetworkPolicy, direction and verdict (an allow \
             counts for every policy with a rule allowing it, a deny for every policy isolating the pod)",
            m.policy_verdicts.clone(),
        );
        registry.register(
            "flow_events",
            "Policy verdict events from the datapath by outcome: written to the flow log, lost \
             (ring buffer full), suppressed (rate limit), malformed, write_error",
            m.flow_events.clone(),
        );
        for outcome in FlowOutcome::ALL {
            m.flow_events
                .get_or_create(&OutcomeLabel { outcome: outcome.as_str().into() })
                .inc_by(0);
        }
        registry.register(
            "policy_identities",
            "Peer identities (equivalence classes of addresses) the policy maps use",
            m.policy_identities.clone(),
        );
        registry.register(
            "policy_entries",
            "Entries in the policy maps, by map (ipcache, endpoints, policy)",
            m.policy_entries.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in a datapath map (services, backend_slots, backends, conntrack, \
             policy_conntrack, frags, ipcache, endpoints, policy), expired conntrack entries included",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of a datapath map, as the kernel created it",
            m.map_capacity.clone(),
        );
        registry.register(
            "conntrack_entries",
            "Conntrack entries by table (service: CT_V4, policy: POLICY_CT_V4), protocol \
             (tcp, udp, other) and state (live, expired: past their deadline, not yet evicted)",
            m.conntrack_entries.clone(),
        );
        registry.register(
            "map_census_duration_seconds",
            "Time to count the entries of the maps the datapath fills (conntrack, frags)",
            m.census_duration.clone(),
        );
        m.conntrack_gc.register(&mut registry);
        Self { registry, ..m }
    }

    /// Counts a failed sync in `nodeplane_sync_errors_total{maps,reason}`.
    pub fn observe_sync_error(&self, (maps, reason): (&str, &str)) {
        let label = SyncErrorLabel { maps: maps.to_string(), reason: reason.to_string() };
        self.sync_errors.get_or_create(&label).inc();
    }

    /// Sets `nodeplane_map_capacity{map}`.
    pub fn observe_capacity(&self, map: &str, capacity: u64) {
        self.map_capacity.get_or_create(&MapLabel { map: map.into() }).set(capacity as i64);
    }

    /// Sets `nodeplane_map_entries{map}` (and the capacity, which is known with it).
    pub fn observe_usage(&self, usage: &MapUsage) {
        let label = MapLabel { map: usage.map.into() };
        self.map_entries.get_or_create(&label).set(usage.entries as i64);
        self.map_capacity.get_or_create(&label).set(usage.capacity as i64);
    }

    /// Sets `nodeplane_conntrack_entries{table,...}` from a census of one table.
    pub fn observe_conntrack(&self, table: &str, counts: &CtCounts) {
        for (protocol, state, n) in counts.iter() {
            let label = ConntrackLabel {
                table: table.into(),
                protocol: protocol.into(),
                state: state.into(),
            };
            self.conntrack_entries.get_or_create(&label).set(n as i64);
        }
    }

    /// Adds the policy verdicts counted since the last call. `totals` are cumulative
    /// (`POLICY_COUNTERS` summed over CPUs, then per policy:
    /// [`crate::flowlog::policy_verdict_totals`]); a total that went down (the datapath was
    /// reloaded, an entry removed) counts from zero again.
    pub fn observe_policy_verdicts(&self, totals: &BTreeMap<PolicyVerdictLabel, u64>) {
        let mut seen = self.seen_verdicts.lock().unwrap_or_else(|e| e.into_inner());
        for (label, &total) in totals {
            let before = seen.entry(label.clone()).or_default();
            let grow = if total >= *before { total - *before } else { total };
            self.policy_verdicts.get_or_create(label).inc_by(grow);
            *before = total;
        }
    }

    /// Sets `nodeplane_flow_events_total{outcome}` from a cumulative `total` (the flow log's
    /// [`FlowStats`](crate::flowlog::FlowStats), or for [`FlowOutcome::Lost`] the kernel's
    /// `FLOW_EVENT_COUNTERS[1]` summed over CPUs). A total that went down counts from zero.
    pub fn observe_flow_events(&self, outcome: FlowOutcome, total: u64) {
        let mut seen = self.seen_flow_events.lock().unwrap_or_else(|e| e.into_inner());
        let before = seen.entry(outcome).or_default();
        let grow = if total >= *before { total - *before } else { total };
        self.flow_events
            .get_or_create(&OutcomeLabel { outcome: outcome.as_str().into() })
            .inc_by(grow);
        *before = total;
    }

    /// Sets the policy map gauges after a policy sync (`nodeplane_map_entries` too).
    pub fn observe_policy_maps(&self, sizes: &PolicyMapSizes) {
        use crate::occupancy::{ENDPOINTS, IPCACHE, POLICY};
        self.policy_identities.set(sizes.identities as i64);
        for (map, n) in
            [(IPCACHE, sizes.ipcache), (ENDPOINTS, sizes.endpoints), (POLICY, sizes.policy)]
        {
            let label = MapLabel { map: map.into() };
            self.policy_entries.get_or_create(&label).set(n as i64);
            self.map_entries.get_or_create(&label).set(n as i64);
        }
    }

    /// Sets `nodeplane_map_entries` of the service maps after a service sync.
    pub fn observe_service_maps(&self, sizes: &crate::occupancy::ServiceMapSizes) {
        use crate::occupancy::{BACKEND_SLOTS, BACKENDS, SERVICES};
        for (map, n) in
            [(SERVICES, sizes.services), (BACKEND_SLOTS, sizes.slots), (BACKENDS, sizes.backends)]
        {
            self.map_entries.get_or_create(&MapLabel { map: map.into() }).set(n as i64);
        }
    }

    /// Copies the watches' state into the source metrics.
    pub fn observe_source(&self, health: &SourceHealth, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for kind in Kind::ALL {
            let label = KindLabel { kind: kind.as_str().to_string() };
            let h = health.get(kind);
            self.source_stale.get_or_create(&label).set(health.stale_for(kind, now).as_secs_f64());
            let (errors, lists) = seen.entry(kind).or_default();
            self.source_errors.get_or_create(&label).inc_by(h.errors.saturating_sub(*errors));
            self.source_lists.get_or_create(&label).inc_by(h.lists.saturating_sub(*lists));
            (*errors, *lists) = (h.errors, h.lists);
        }
    }

    /// Adds what the datapath counted since the last call. A total that went down (the
    /// maps were recreated with a new datapath) counts from zero again.
    pub fn observe_datapath(&self, counters: &[(Hook, Reason, nodeplane_common::maps::Counter)]) {
        let mut seen = self.seen_datapath.lock().unwrap_or_else(|e| e.into_inner());
        for &(hook, reason, c) in counters {
            let label = VerdictLabel {
                hook: hook.name().into(),
                reason: reason.name().into(),
                verdict: reason.verdict().into(),
            };
            let (packets, bytes) = seen.entry((hook, reason)).or_default();
            let grow = |now: u64, before: u64| if now >= before { now - before } else { now };
            self.datapath_packets.get_or_create(&label).inc_by(grow(c.packets, *packets));
            self.datapath_bytes.get_or_create(&label).inc_by(grow(c.bytes, *bytes));
            (*packets, *bytes) = (c.packets, c.bytes);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The agent's log filter, changeable at runtime (`GET`/`PUT /loglevel`, SIGUSR1).
///
/// Holds the directives as given and a function that installs a new filter (in the binary,
/// a `tracing_subscriber::reload` handle), so the HTTP side is tested without a subscriber.
#[derive(Clone)]
pub struct LogLevel {
    inner: Arc<LogLevelInner>,
}

struct LogLevelInner {
    current: Mutex<String>,
    /// The filter before SIGUSR1 switched to `debug`, while it is on.
    before_debug: Mutex<Option<String>>,
    install: Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel").field("current", &self.get()).finish()
    }
}

impl LogLevel {
    /// `current`: the directives installed at start; `install` replaces the filter.
    pub fn new(
        current: &str,
        install: impl Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(LogLevelInner {
                current: Mutex::new(current.trim().to_string()),
                before_debug: Mutex::new(None),
                install: Box::new(install),
            }),
        }
    }

    /// One that changes nothing but its own record (tests, embedding without a subscriber).
    pub fn detached(current: &str) -> Self {
        Self::new(current, |_| Ok(()))
    }

    /// A level or `EnvFilter` directives; an empty string is an error (not "log nothing").
    pub fn parse(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
        let directives = directives.trim();
        if directives.is_empty() {
            return Err("empty filter: give a level (info, debug, ...) or directives".into());
        }
        // EnvFilter reads a bare word as a target to trace: `degub` would silence everything
        // but a target of that name. Here a bare word must be a level.
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        for d in directives.split(',').map(str::trim) {
            if !d.contains(['=', '[']) && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)) {
                return Err(format!(
                    "{d:?} is not a level (off, error, warn, info, debug, trace); for a \
                     target write {d}=LEVEL"
                ));
            }
        }
        tracing_subscriber::EnvFilter::builder()
            .with_regex(false)
            .parse(directives)
            .map_err(|e| e.to_string())
    }

    /// The directives in force.
    pub fn get(&self) -> String {
        self.inner.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `directives`; returns them as the filter reads them back.
    pub fn set(&self, directives: &str) -> Result<String, String> {
        let filter = Self::parse(directives)?;
        let shown = filter.to_string();
        let mut current = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        (self.inner.install)(filter)?;
        *current = shown.clone();
        *self.inner.before_debug.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(shown)
    }

    /// SIGUSR1: `debug` if it is off, else back to the filter before it. Returns the new one.
    pub fn toggle_debug(&self) -> Result<String, String> {
        let before = self.inner.before_debug.lock().unwrap_or_else(|e| e.into_inner()).take();
        match before {
            Some(before) => self.set(&before),
            None => {
                let previous = self.get();
                let now = self.set("debug")?;
                *self.inner.before_debug.lock().unwrap_or_else(|e| e.into_inner()) = Some(previous);
                Ok(now)
            }
        }
    }

    /// `PUT /loglevel` with `body`: 200 and the new filter, 400 and why not. Only from
    /// the node itself (`peer` on loopback): the metrics address may be opened for scraping,
    /// changing the log level must stay local.
    pub fn put(&self, peer: std::net::IpAddr, body: &str) -> (StatusCode, String) {
        if !peer.is_loopback() {
            return (
                StatusCode::FORBIDDEN,
                "the log level can only be changed from the node\n".into(),
            );
        }
        match self.set(body) {
            Ok(filter) => {
                tracing::info!(%filter, "log level changed");
                (StatusCode::OK, filter + "\n")
            }
            Err(e) => {
                (StatusCode::BAD_REQUEST, format!("invalid log filter {:?}: {e}\n", body.trim()))
            }
        }
    }
}

/// `/metrics`, and `/loglevel` when `log` is given.
pub fn metrics_router(metrics: Arc<Metrics>, log: Option<LogLevel>) -> Router {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .with_state(metrics);
    let Some(log) = log else { return app };
    let log_routes = Router::new()
        .route(
            "/loglevel",
            get(|State(l): State<LogLevel>| async move { l.get() + "\n" }).put(
                |State(l): State<LogLevel>,
                 ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
                 body: String| async move { l.put(peer.ip(), &body) },
            ),
        )
        .with_state(log);
    app.merge(log_routes)
}

/// Serves [`metrics_router`] on `listener` until the process ends.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    log: Option<LogLevel>,
) -> std::io::Result<()> {
    let app = metrics_router(metrics, log);
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
}

/// Serves `/healthz` and `/readyz` on `listener` until the process ends.
pub async fn serve_health(listener: TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    fn answer(v: crate::health::Verdict) -> impl IntoResponse {
        let code = if v.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (code, v.detail + "\n")
    }
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Arc<Health>>| async move { answer(h.healthz(Instant::now())) }),
        )
        .route("/readyz", get(|State(h): State<Arc<Health>>| async move { answer(h.readyz()) }))
        .with_state(health);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::new();
        m.event_programming.observe(0.003);
        m.observe_source(&SourceHealth::default(), Instant::now());
        let text = m.encode();
        for name in [
            "nodeplane_network_programming_duration_seconds_bucket",
            "nodeplane_event_programming_duration_seconds_count 1",
            "nodeplane_sync_errors_total",
            "nodeplane_source_stale_seconds{kind=\"Service\"} 0.0",
            "nodeplane_source_watch_errors_total{kind=\"Pod\"}",
            "nodeplane_build_info{version=",
            "nodeplane_flow_events_total{outcome=\"lost\"} 0",
            "nodeplane_policy_identities 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn datapath_counters_become_prometheus_counters() {
        use nodeplane_common::maps::Counter;
        let m = Metrics::new();
        let at = |p, b| Counter { packets: p, bytes: b };
        let (from, to) = (Hook::FromPod, Hook::ToPod);
        let policy = Reason::DropPolicy;
        m.observe_datapath(&[
            (from, Reason::NatNew, at(3, 300)),
            (from, Reason::DropNoBackends, at(1, 60)),
            (from, policy, at(0, 0)),
            (to, policy, at(2, 120)),
        ]);
        m.observe_datapath(&[
            (from, Reason::NatNew, at(5, 500)),
            (from, Reason::DropNoBackends, at(1, 60)),
            (from, policy, at(0, 0)),
            (to, policy, at(4, 240)),
        ]);
        let text = m.encode();
        for line in [
            "nodeplane_datapath_packets_total{hook=\"from_pod\",reason=\"nat-new\",verdict=\"pass\"} 5",
            "nodeplane_datapath_bytes_total{hook=\"from_pod\",reason=\"nat-new\",verdict=\"pass\"} 500",
            "nodeplane_datapath_packets_total{hook=\"from_pod\",reason=\"no-backends\",verdict=\"drop\"} 1",
            // The same reason at two hooks: two series, each with its own count.
            "nodeplane_datapath_packets_total{hook=\"to_pod\",reason=\"policy-denied\",verdict=\"drop\"} 4",
            "nodeplane_datapath_bytes_total{hook=\"to_pod\",reason=\"policy-denied\",verdict=\"drop\"} 240",
            "nodeplane_datapath_packets_total{hook=\"from_pod\",reason=\"policy-denied\",verdict=\"drop\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // A new datapath starts from zero: its counts are added, not subtracted.
        m.observe_datapath(&[(from, Reason::NatNew, at(2, 200)), (to, policy, at(1, 60))]);
        let text = m.encode();
        for line in [
            "nodeplane_datapath_packets_total{hook=\"from_pod\",reason=\"nat-new\",verdict=\"pass\"} 7",
            "nodeplane_datapath_packets_total{hook=\"to_pod\",reason=\"policy-denied\",verdict=\"drop\"} 5",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn policy_metrics_add_differences_and_set_gauges() {
        let m = Metrics::new();
        let label = |policy: &str, verdict: &str| PolicyVerdictLabel {
            policy: policy.into(),
            direction: "ingress".into(),
            verdict: verdict.into(),
        };
        let totals =
            |a, d| BTreeMap::from([(label("d/web", "allow"), a), (label("d/web", "deny"), d)]);
        m.observe_policy_verdicts(&totals(3, 1));
        m.observe_policy_verdicts(&totals(5, 1));
        m.observe_flow_events(FlowOutcome::Written, 4);
        m.observe_flow_events(FlowOutcome::Written, 6);
        m.observe_flow_events(FlowOutcome::Lost, 2);
        m.observe_policy_maps(&PolicyMapSizes {
            identities: 7,
            ipcache: 12,
            endpoints: 3,
            policy: 40,
        });
        let text = m.encode();
        for line in [
            "nodeplane_policy_verdicts_total{policy=\"d/web\",direction=\"ingress\",verdict=\"allow\"} 5",
            "nodeplane_policy_verdicts_total{policy=\"d/web\",direction=\"ingress\",verdict=\"deny\"} 1",
            "nodeplane_flow_events_total{outcome=\"written\"} 6",
            "nodeplane_flow_events_total{outcome=\"lost\"} 2",
            "nodeplane_flow_events_total{outcome=\"suppressed\"} 0",
            "nodeplane_policy_identities 7",
            "nodeplane_policy_entries{map=\"ipcache\"} 12",
            "nodeplane_policy_entries{map=\"policy\"} 40",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // A reloaded datapath starts from zero: its counts are added.
        m.observe_flow_events(FlowOutcome::Lost, 1);
        assert!(m.encode().contains("nodeplane_flow_events_total{outcome=\"lost\"} 3"));
    }

    #[test]
    fn occupancy_metrics_have_map_and_conntrack_labels() {
        use crate::occupancy::{CONNTRACK, CtCounts, MapUsage, ServiceMapSizes};
        let m = Metrics::new();
        m.observe_capacity("services", 65_536);
        m.observe_service_maps(&ServiceMapSizes { services: 3, slots: 4, backends: 2 });
        m.observe_usage(&MapUsage { map: CONNTRACK, entries: 7, live: Some(5), capacity: 100 });
        let mut ct = CtCounts::default();
        ct.add(nodeplane_common::maps::IPPROTO_TCP, 10, 5);
        ct.add(nodeplane_common::maps::IPPROTO_UDP, 10, 50);
        m.observe_conntrack("service", &ct);
        let text = m.encode();
        for line in [
            "nodeplane_map_capacity{map=\"services\"} 65536",
            "nodeplane_map_entries{map=\"services\"} 3",
            "nodeplane_map_entries{map=\"backend_slots\"} 4",
            "nodeplane_map_entries{map=\"conntrack\"} 7",
            "nodeplane_map_capacity{map=\"conntrack\"} 100",
            "nodeplane_conntrack_entries{table=\"service\",protocol=\"tcp\",state=\"live\"} 1",
            "nodeplane_conntrack_entries{table=\"service\",protocol=\"udp\",state=\"expired\"} 1",
            "nodeplane_conntrack_entries{table=\"service\",protocol=\"other\",state=\"live\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn the_log_level_is_read_and_changed_with_clear_errors() {
        use std::net::{IpAddr, Ipv4Addr};
        let installed = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = installed.clone();
        let log = LogLevel::new("info", move |f| {
            seen.lock().unwrap().push(f.to_string());
            Ok(())
        });
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(log.get(), "info");
        assert_eq!(log.put(local, "debug\n"), (StatusCode::OK, "debug\n".into()));
        let (code, body) = log.put(local, "nodeplane_agent=trace,warn");
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("nodeplane_agent=trace") && body.contains("warn"), "{body}");
        assert_eq!(log.get(), body.trim());
        for bad in ["", "  ", "loud", "nodeplane_agent=loud"] {
            let (code, body) = log.put(local, bad);
            assert_eq!(code, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
            assert!(body.starts_with("invalid log filter"), "{body}");
        }
        assert_eq!(log.get(), body.trim(), "a bad filter changes nothing");
        let (code, _) = log.put(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), "debug");
        assert_eq!(code, StatusCode::FORBIDDEN, "only from the node");
        assert_eq!(installed.lock().unwrap().len(), 2, "{installed:?}");

        // SIGUSR1 toggles debug and back to what was there.
        let log = LogLevel::detached("nodeplane_agent=info,warn");
        assert_eq!(log.toggle_debug().unwrap(), "debug");
        let back = log.toggle_debug().unwrap();
        assert!(back.contains("nodeplane_agent=info"), "{back}");
        // An install that fails (the subscriber is gone) is an error and changes nothing.
        let log = LogLevel::new("info", |_| Err("no subscriber".into()));
        assert_eq!(log.set("debug"), Err("no subscriber".into()));
        assert_eq!(log.get(), "info");
    }

    /// The sample names the registry renders: from each `# TYPE name type` line, `name` for
    /// gauges, `name_total` for counters, `name_bucket|_sum|_count` for histograms.
    fn exported_series(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        out
    }

    /// The label names of each exported series, from its samples (`le` of a histogram's
    /// buckets included).
    fn exported_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::<String, BTreeSet<String>>::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, rest)) = line.split_once('{') else { continue };
            let labels = out.entry(name.to_string()).or_default();
            let pairs = rest.rsplit_once('}').map_or(rest, |(pairs, _)| pairs);
            for pair in pairs.split("\",") {
                labels.extend(pair.split_once('=').map(|(k, _)| k.to_string()));
            }
        }
        out
    }

    /// Metrics with a sample in every family: the text format leaves empty families out.
    /// A new family must get one here before the dashboard may use it.
    fn populated() -> Metrics {
        use crate::occupancy::{CONNTRACK, CtCounts, MapUsage};
        let m = Metrics::new();
        m.observe_source(&SourceHealth::default(), Instant::now());
        let all: Vec<_> = Hook::ALL
            .iter()
            .flat_map(|h| Reason::ALL.iter().map(|r| (*h, *r, Default::default())))
            .collect();
        m.observe_datapath(&all);
        m.objects.get_or_create(&KindLabel { kind: "Service".into() }).set(1);
        m.skipped.get_or_create(&ReasonLabel { reason: "invalid_port".into() }).set(1);
        let verdict = PolicyVerdictLabel {
            policy: "d/p".into(),
            direction: "ingress".into(),
            verdict: "allow".into(),
        };
        m.observe_policy_verdicts(&BTreeMap::from([(verdict, 1)]));
        m.observe_policy_maps(&PolicyMapSizes::default());
        m.observe_usage(&MapUsage { map: CONNTRACK, entries: 1, live: None, capacity: 2 });
        m.observe_conntrack("service", &CtCounts::default());
        m
    }

    /// `manifests/grafana-dashboard.json` uses only series the agent exports, so renaming a
    /// metric without the dashboard fails here.
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/grafana-dashboard.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let dash: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        let text = populated().encode();
        let exported = exported_series(&text);
        let labels = exported_labels(&text);
        assert!(exported.contains("nodeplane_sync_errors_total"), "{exported:?}");
        assert!(exported.contains("nodeplane_map_entries"), "{exported:?}");

        let vars: Vec<&str> = dash["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(vars, ["datasource", "node"]);

        let mut used = BTreeSet::new();
        let mut used_labels = BTreeSet::new();
        let panels = dash["panels"].as_array().expect("panels");
        for panel in panels.iter().filter(|p| p["type"] != "row") {
            let title = panel["title"].as_str().unwrap_or("?");
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title}: targets"));
            assert!(!targets.is_empty(), "{title}: no query");
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{title}: expr"));
                assert!(expr.contains("instance=~\"$node\""), "{title}: {expr} ignores $node");
                let names: Vec<&str> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|t| t.starts_with("nodeplane_"))
                    .collect();
                assert!(!names.is_empty(), "{title}: {expr} uses no nodeplane metric");
                // A `by (...)` label the series lack would silently give one line for all.
                let known: BTreeSet<&str> = names
                    .iter()
                    .flat_map(|n| labels.get(*n).into_iter().flatten())
                    .map(String::as_str)
                    .chain(["instance"])
                    .collect();
                for clause in expr.split("by (").skip(1) {
                    let grouped = clause.split_once(')').map_or(clause, |(g, _)| g);
                    for label in grouped.split(',').map(str::trim) {
                        assert!(known.contains(label), "{title}: {expr} groups by {label}");
                        used_labels.insert(label.to_string());
                    }
                }
                for name in names {
                    assert!(
                        exported.contains(name),
                        "{title}: {name} is not exported by the agent:\n{exported:#?}"
                    );
                    used.insert(name.to_string());
                }
            }
        }
        // Everything the issue asks the dashboard to plot is there.
        for name in [
            "nodeplane_network_programming_duration_seconds_bucket",
            "nodeplane_event_programming_duration_seconds_bucket",
            "nodeplane_sync_duration_seconds_bucket",
            "nodeplane_sync_errors_total",
            "nodeplane_objects",
            "nodeplane_skipped_objects",
            "nodeplane_service_frontends",
            "nodeplane_service_backends",
            "nodeplane_datapath_packets_total",
            "nodeplane_policy_verdicts_total",
            "nodeplane_flow_events_total",
            "nodeplane_map_entries",
            "nodeplane_map_capacity",
            "nodeplane_conntrack_entries",
            "nodeplane_source_stale_seconds",
            "nodeplane_source_watch_errors_total",
        ] {
            assert!(used.contains(name), "the dashboard does not plot {name}");
        }
        assert!(used_labels.contains("hook"), "the dashboard does not split packets by hook");
    }

    /// One HTTP/1.0 request; returns the status code and the body.
    async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn loglevel_is_served_next_to_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = LogLevel::detached("info");
        tokio::spawn(serve_metrics(listener, Arc::new(Metrics::new()), Some(log.clone())));
        assert_eq!(request(addr, "GET", "/loglevel", "").await, (200, "info\n".into()));
        assert_eq!(request(addr, "PUT", "/loglevel", "debug").await, (200, "debug\n".into()));
        assert_eq!(log.get(), "debug");
        let (status, body) = request(addr, "PUT", "/loglevel", "x=loud").await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(request(addr, "GET", "/loglevel", "").await, (200, "debug\n".into()));
        let (status, body) = request(addr, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        assert!(body.contains("nodeplane_build_info"), "{body}");
    }
}
