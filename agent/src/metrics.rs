//! Prometheus metrics of the agent, and the HTTP servers for them and for health.
//!
//! Names follow Prometheus conventions (base units, `_seconds`, `_total`); every metric is
//! listed in docs/METRICS.md. They cover the control plane (how fresh the sources are, how
//! fast changes reach the maps, what was skipped) and the datapath's per-reason counters.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    Router,
    extract::State,
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

use nodeplane_common::reason::Reason;

use crate::{health::Health, source::Kind, source::kube::SourceHealth};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// A datapath outcome: its reason and whether it dropped the packet.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
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
    pub sync_errors: Counter,
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
    /// Last seen totals of the source's counters, to add only the difference.
    seen: Mutex<BTreeMap<Kind, (u64, u64)>>,
    /// Last seen datapath totals per reason (packets, bytes).
    seen_datapath: Mutex<BTreeMap<&'static str, (u64, u64)>>,
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
            sync_errors: Counter::default(),
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
            seen: Mutex::default(),
            seen_datapath: Mutex::default(),
            seen_verdicts: Mutex::default(),
            seen_flow_events: Mutex::default(),
            registry: Registry::default(),
        };
        let build = Family::<BuildLabel, Gauge>::default();
        build.get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "The agent's version (always 1)", build);
        registry.register(
            "datapath_packets",
            "Packets seen by the datapath programs, by outcome (per-CPU counters summed)",
            m.datapath_packets.clone(),
        );
        registry.register(
            "datapath_bytes",
            "Bytes seen by the datapath programs, by outcome",
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
            "Syncs that failed to write the maps",
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
        Self { registry, ..m }
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

    /// Sets the policy map gauges after a policy sync.
    pub fn observe_policy_maps(&self, sizes: &PolicyMapSizes) {
        self.policy_identities.set(sizes.identities as i64);
        for (map, n) in
            [("ipcache", sizes.ipcache), ("endpoints", sizes.endpoints), ("policy", sizes.policy)]
        {
            self.policy_entries.get_or_create(&MapLabel { map: map.into() }).set(n as i64);
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
    pub fn observe_datapath(&self, counters: &[(Reason, nodeplane_common::maps::Counter)]) {
        let mut seen = self.seen_datapath.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, c) in counters {
            let label = VerdictLabel {
                reason: reason.name().into(),
                verdict: if reason.is_drop() { "drop" } else { "pass" }.into(),
            };
            let (packets, bytes) = seen.entry(reason.name()).or_default();
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

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
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
    axum::serve(listener, app).await
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
        m.observe_datapath(&[(Reason::NatNew, at(3, 300)), (Reason::DropNoBackends, at(1, 60))]);
        m.observe_datapath(&[(Reason::NatNew, at(5, 500)), (Reason::DropNoBackends, at(1, 60))]);
        let text = m.encode();
        for line in [
            "nodeplane_datapath_packets_total{reason=\"nat-new\",verdict=\"pass\"} 5",
            "nodeplane_datapath_bytes_total{reason=\"nat-new\",verdict=\"pass\"} 500",
            "nodeplane_datapath_packets_total{reason=\"no-backends\",verdict=\"drop\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // A new datapath starts from zero: its counts are added, not subtracted.
        m.observe_datapath(&[(Reason::NatNew, at(2, 200))]);
        assert!(
            m.encode().contains(
                "nodeplane_datapath_packets_total{reason=\"nat-new\",verdict=\"pass\"} 7"
            )
        );
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
}
