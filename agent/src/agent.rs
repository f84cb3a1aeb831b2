//! The agent's control loop: batches from a source into the index, the index into the maps.
//!
//! [`Agent`] is the synchronous core (no I/O but the [`MapWriter`]), so tests and benchmarks
//! drive it with [`FakeMaps`](crate::sync::FakeMaps) or the real maps; [`run`] wires it to a
//! source, the datapath, the health and metrics servers and the signals.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use nodeplane_common::maps::{IPPROTO_TCP, names};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    config::{Config, FlowLogConfig, Source},
    ctgc,
    datapath::{Datapath, Written},
    desired::{self, Desired, NodeContext},
    events::NodeEvents,
    external,
    flowlog::{self, NameTables, Resolver, SharedResolver},
    health::Health,
    healthcheck,
    index::Index,
    inspect::names::{NamesPublisher, NamesSnapshot},
    metrics::{self, FlowOutcome, LogLevel, Metrics, PolicyMapSizes},
    occupancy::{self, Alarms, Crossing, MapUsage},
    pin::PinDir,
    policy::{
        PolicyWriteError, PolicyWriter,
        compute::{self, PolicyMaps},
        incremental::PolicyState,
        sync::PolicySyncer,
    },
    source::{self, Batch, Event, Kind, Object, kube::SourceHealth},
    sync::{MapWriter, Syncer, WriteError},
};

/// A sync that failed: which maps, and the write that failed. Everything before it was
/// written; the next sync retries from there.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("service maps: {0}")]
    Services(#[from] WriteError),
    #[error("policy maps: {0}")]
    Policy(#[from] PolicyWriteError),
}

impl SyncError {
    /// `(maps, reason)` labels of `nodeplane_sync_errors_total`.
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            SyncError::Services(e) => ("service", e.failure.as_str()),
            SyncError::Policy(e) => ("policy", e.failure.as_str()),
        }
    }
}

/// What one successful sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Map operations written.
    pub ops: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Policy map operations written (0 when no Pod, Namespace or NetworkPolicy changed).
    pub policy_ops: usize,
    /// For every batch that changed the index since the previous sync: the time from its
    /// receipt to the end of this sync.
    pub latencies: Vec<Duration>,
    /// The service maps changed in a way that may have taken a backend from a non-TCP
    /// frontend: its UDP flows are due to be flushed ([`crate::ctgc`]).
    pub conntrack_flush: bool,
}

/// Index, translation and sync, with the bookkeeping health and metrics need.
pub struct Agent {
    index: Index,
    syncer: Syncer,
    node: NodeContext,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Receipt times of the batches not yet programmed.
    pending: Vec<Instant>,
    /// Trigger times (EndpointSlice annotation) of the changes not yet programmed.
    triggers: Vec<SystemTime>,
    /// (object, reason) pairs already logged, so a skip is reported once, not every sync.
    reported_skips: BTreeSet<(String, String)>,
    /// The desired state as of the last sync, updated incrementally.
    desired: Desired,
    /// The next sync must recompute and diff everything (at start, after a failed write).
    full: bool,
    policy: PolicySyncer,
    /// The policy maps and what they were computed from, updated in place when only Pods
    /// changed; `None` until the first policy sync.
    policy_state: Option<PolicyState>,
    /// The next sync must recompute the policy maps whole and diff them whole.
    policy_full: bool,
    /// Names for the flow log, replaced after every policy sync.
    resolver: SharedResolver,
    /// Pods by IP for the flow log, patched from the changed Pods (every resolver shares it).
    pod_names: Arc<RwLock<PodNames>>,
    /// Entries of the maps the agent writes, by `map` label, as of the last successful
    /// sync of each (the syncers know them; the maps are not walked).
    written: BTreeMap<&'static str, u64>,
    /// Where `inspect`'s names snapshot goes, if anywhere ([`crate::inspect::names`]).
    names: Option<NamesPublisher>,
}

impl Agent {
    pub fn new(node: NodeContext, health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        Self {
            index: Index::new(),
            syncer: Syncer::new(),
            node,
            health,
            metrics,
            pending: Vec::new(),
            triggers: Vec::new(),
            reported_skips: BTreeSet::new(),
            desired: Desired::default(),
            full: true,
            policy: PolicySyncer::new(),
            policy_state: None,
            policy_full: true,
            resolver: SharedResolver::new(NameTables::default()),
            pod_names: Arc::default(),
            written: BTreeMap::new(),
            names: None,
        }
    }

    /// Takes over what an earlier agent wrote to the (pinned) maps: the first sync then
    /// diffs against it, keeping every Service, backend and policy entry that still exists
    /// under its id, and continues the policy revision.
    pub fn adopt(&mut self, written: &Written) {
        self.syncer.adopt(&written.services, &written.slots, &written.backends);
        let flags = self.policy.flags();
        self.policy = PolicySyncer::new()
            .with_realized(&written.policy, written.policy_config)
            .with_flags(flags);
    }

    /// `PolicyConfig.flags` to write (flow events on, allowed flows logged).
    pub fn set_policy_flags(&mut self, flags: u32) {
        self.policy.set_flags(flags);
        self.policy_full = true;
    }

    /// What the flow log names pods, policies and identities with; kept current by `sync`.
    pub fn resolver(&self) -> SharedResolver {
        self.resolver.clone()
    }

    /// Hands a names snapshot to `publisher` after every sync that may have changed a
    /// name (`inspect`'s names.json).
    pub fn publish_names(&mut self, publisher: NamesPublisher) {
        self.names = Some(publisher);
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Entries of the maps the agent writes, by `map` label ([`occupancy::MAPS`]).
    pub fn written_map_entries(&self) -> &BTreeMap<&'static str, u64> {
        &self.written
    }

    /// Feeds a batch into the index. Returns whether a sync is due: something changed, or a
    /// kind was (re)listed, which readiness waits on even when the list changed nothing.
    ///
    /// Nothing is due before every kind has been listed once: like kube-proxy, the first
    /// sync waits for the complete initial state, so a Service is never programmed with the
    /// first page of its endpoints and then the rest.
    pub fn handle(&mut self, batch: Batch) -> bool {
        let before = self.index.revision();
        let mut listed = false;
        for event in batch.events {
            let relisted = match &event {
                Event::Reset(kind, _) | Event::Retain(kind, _) => Some(*kind),
                _ => None,
            };
            let trigger = match &event {
                Event::Apply(Object::EndpointSlice(slice)) => trigger_time(slice),
                _ => None,
            };
            let revision = self.index.revision();
            self.index.handle(event);
            // Only a slice that changed something: a relist re-applies every slice, most of
            // them unchanged and triggered long ago.
            if let Some(t) = trigger
                && self.index.revision() != revision
            {
                self.triggers.push(t);
            }
            if let Some(kind) = relisted {
                self.health.listed(kind);
                listed = true;
                if kind == Kind::Node {
                    self.check_own_node();
                }
            }
        }
        let changed = self.index.revision() != before;
        if changed {
            self.pending.push(batch.received);
            self.health.pending(batch.received);
        }
        (changed || listed) && self.health.all_listed()
    }

    /// A wrong `--node-name` silently breaks what depends on the node; say so.
    fn check_own_node(&self) {
        let Some(name) = &self.node.node_name else { return };
        if self.index.node(name).is_none() {
            warn!(node = %name, "this node's Node object is not in the API: check --node-name \
                  (internalTrafficPolicy: Local Services get no local endpoints)");
        }
    }

    /// Writes the difference between the index and the maps.
    ///
    /// Usually incremental: when only EndpointSlices changed, only their Services are
    /// recomputed ([`desired::update`]) and only their frontends planned
    /// ([`Syncer::apply_changed`]), so the cost follows the change, not the cluster.
    ///
    /// The policy maps follow Pod changes incrementally ([`PolicyState::update_pods`]:
    /// the changed pods' identities, endpoints and the sets their identities enter or
    /// leave) and are planned for the changed keys only; a Namespace or NetworkPolicy
    /// change recomputes them whole (hundreds of milliseconds at 10,000 pods and 1,000
    /// policies) and diffs everything.
    pub fn sync<M: MapWriter + PolicyWriter>(
        &mut self,
        maps: &mut M,
    ) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        let mut dirty = self.index.take_dirty();
        dirty.all |= std::mem::take(&mut self.full);
        let policy_forced = std::mem::take(&mut self.policy_full);
        let policy_due = dirty.policy_dirty || policy_forced;
        let changed = desired::update(&mut self.desired, &self.index, &self.node, &dirty);
        // `inspect` names: only a full service recompute or a policy sync changes them.
        let names_due = changed.is_none() || policy_due;
        // The full path may change any frontend; the incremental one names them.
        let flush = changed.as_ref().is_none_or(|c| c.iter().any(|k| k.proto != IPPROTO_TCP));
        let desired = &self.desired;
        for (object, reason) in &desired.skipped {
            if self.reported_skips.insert((object.to_string(), reason.clone())) {
                warn!(service = %object, %reason, "not programmed");
            }
        }
        let result = match changed.and_then(|c| self.syncer.apply_changed(desired, &c, maps)) {
            Some(result) => result,
            None => self.syncer.apply(desired, maps),
        };
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                let e = SyncError::from(e);
                self.metrics.observe_sync_error(e.labels());
                self.full = true;
                self.policy_full |= policy_due;
                return Err(e);
            }
        };
        let policy_ops = if policy_due {
            let pods = (!policy_forced && !dirty.policy_inputs).then_some(&dirty.pods);
            match self.sync_policy(maps, pods) {
                Ok(ops) => ops,
                Err(e) => {
                    let e = SyncError::from(e);
                    self.metrics.observe_sync_error(e.labels());
                    self.policy_full = true;
                    return Err(e);
                }
            }
        } else {
            0
        };
        let done = Instant::now();
        let wall = SystemTime::now();
        self.health.synced(done);
        let m = &self.metrics;
        m.sync_duration.observe((done - started).as_secs_f64());
        let latencies: Vec<Duration> = self.pending.drain(..).map(|r| done - r).collect();
        for l in &latencies {
            m.event_programming.observe(l.as_secs_f64());
        }
        for t in self.triggers.drain(..) {
            // A clock skewed into the future would give a negative latency: not observed.
            if let Ok(l) = wall.duration_since(t) {
                m.network_programming.observe(l.as_secs_f64());
            }
        }
        m.frontends.set(stats.services as i64);
        m.backends.set(stats.backends as i64);
        let sizes = occupancy::service_map_sizes(&self.desired, stats.skipped, stats.backends);
        m.observe_service_maps(&sizes);
        self.written.insert(occupancy::SERVICES, sizes.services);
        self.written.insert(occupancy::BACKEND_SLOTS, sizes.slots);
        self.written.insert(occupancy::BACKENDS, sizes.backends);
        for kind in Kind::ALL {
            let label = metrics::KindLabel { kind: kind.as_str().to_string() };
            m.objects.get_or_create(&label).set(self.index.len(kind) as i64);
        }
        let mut skipped: BTreeMap<&str, usize> = self.index.skipped_counts().into_iter().collect();
        *skipped.entry("service_conflict").or_default() += self.desired.skipped.len();
        // Reasons that no longer occur must read 0, not their last value.
        m.skipped.clear();
        for (reason, n) in skipped {
            m.skipped.get_or_create(&metrics::ReasonLabel { reason: reason.into() }).set(n as i64);
        }
        if names_due && let Some(names) = &self.names {
            let policy_names = self.policy_state.as_ref().map(|s| &s.maps().names);
            let node = self.node.node_name.as_deref();
            names.publish(NamesSnapshot::build(&self.index, &self.desired, policy_names, node));
        }
        Ok(SyncReport {
            ops: stats.ops,
            frontends: stats.services,
            backends: stats.backends,
            policy_ops,
            latencies,
            conntrack_flush: flush && stats.ops > 0,
        })
    }

    /// Brings the policy maps up to date and writes the difference: from `pods` alone
    /// (the Pods that changed) when given and possible, else recomputed and diffed whole.
    fn sync_policy(
        &mut self,
        maps: &mut impl PolicyWriter,
        pods: Option<&BTreeSet<crate::model::ObjectKey>>,
    ) -> Result<usize, PolicyWriteError> {
        let index = &self.index;
        let changes = match (pods, self.policy_state.as_mut()) {
            (Some(pods), Some(state)) => state.update_pods(pods.iter().map(|k| (k, index.pod(k)))),
            _ => None,
        };
        {
            let mut names = self.pod_names.write().unwrap_or_else(|e| e.into_inner());
            match (pods, &changes) {
                (Some(pods), Some(_)) => {
                    for key in pods {
                        names.set(key, index.pod(key).and_then(|p| p.ip));
                    }
                }
                _ => *names = PodNames::from_pods(index.pods()),
            }
        }
        let stats = match (changes, self.policy_state.as_ref()) {
            (Some(changes), Some(state)) => {
                self.policy.apply_changed(state.maps(), &changes, maps)?
            }
            _ => {
                let namespaces: BTreeMap<String, crate::model::Labels> =
                    index.namespaces().map(|n| (n.name.clone(), n.labels.clone())).collect();
                let input = compute::Input {
                    pods: index.pods().collect(),
                    namespaces: &namespaces,
                    policies: index.network_policies().collect(),
                    node_name: self.node.node_name.as_deref().unwrap_or_default(),
                };
                let state = self.policy_state.insert(PolicyState::build(&input));
                self.policy.apply(state.maps(), maps)?
            }
        };
        let Some(state) = self.policy_state.as_ref() else { unreachable!("set above") };
        let computed = state.maps();
        self.metrics.observe_policy_maps(&PolicyMapSizes {
            identities: computed.names.identities.len(),
            ipcache: stats.ipcache,
            endpoints: stats.endpoints,
            policy: stats.rules,
        });
        self.written.insert(occupancy::IPCACHE, stats.ipcache as u64);
        self.written.insert(occupancy::ENDPOINTS, stats.endpoints as u64);
        self.written.insert(occupancy::POLICY, stats.rules as u64);
        self.resolver
            .set(PolicyNames { pods: self.pod_names.clone(), tables: name_tables(computed) });
        Ok(stats.ops)
    }
}

/// Every pod by IP (of two with one IP, the greater key), kept up to date in place:
/// rebuilding it for 10,000 pods took longer than the rest of a relabel's policy sync.
#[derive(Debug, Default)]
struct PodNames {
    by_ip: HashMap<Ipv4Addr, BTreeSet<crate::model::ObjectKey>>,
    ip_of: HashMap<crate::model::ObjectKey, Ipv4Addr>,
}

impl PodNames {
    fn from_pods<'a>(pods: impl Iterator<Item = &'a crate::model::Pod>) -> Self {
        let mut names = Self::default();
        for p in pods {
            names.set(&p.key, p.ip);
        }
        names
    }

    /// Pod `key` now has `ip` (`None`: none, or deleted).
    fn set(&mut self, key: &crate::model::ObjectKey, ip: Option<Ipv4Addr>) {
        if let Some(old) = self.ip_of.remove(key)
            && let Some(keys) = self.by_ip.get_mut(&old)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_ip.remove(&old);
            }
        }
        if let Some(ip) = ip {
            self.ip_of.insert(key.clone(), ip);
            self.by_ip.entry(ip).or_default().insert(key.clone());
        }
    }
}

/// The flow log's [`Resolver`]: the shared pod table and the names of the last policy sync.
struct PolicyNames {
    pods: Arc<RwLock<PodNames>>,
    tables: NameTables,
}

impl Resolver for PolicyNames {
    fn pod(&self, ip: Ipv4Addr) -> Option<crate::model::ObjectKey> {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        pods.by_ip.get(&ip)?.last().cloned()
    }
    fn isolating_policies(
        &self,
        set: u32,
        direction: compute::Direction,
    ) -> Vec<crate::model::ObjectKey> {
        self.tables.isolating_policies(set, direction)
    }
    fn allowing_rules(&self, rule: u32) -> Vec<compute::RuleRef> {
        self.tables.allowing_rules(rule)
    }
    fn identity(&self, identity: u32) -> Option<String> {
        self.tables.identity(identity)
    }
}

/// The flow log's names of the computed sets, rules and identities (pods: [`PodNames`]).
fn name_tables(computed: &PolicyMaps) -> NameTables {
    let names = &computed.names;
    NameTables {
        pods: HashMap::new(),
        sets: names.sets.iter().map(|(id, s)| ((*id, s.dir), s.policies.clone())).collect(),
        rules: names.rules.iter().map(|(id, r)| (*id, r.clone())).collect(),
        identities: names.identities.iter().map(|(id, n)| (*id, n.to_string())).collect(),
    }
}

/// The EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`, if valid.
fn trigger_time(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<SystemTime> {
    let value = slice.metadata.annotations.as_ref()?.get(source::kube::TRIGGER_TIME_ANNOTATION)?;
    let t: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    let since_epoch =
        Duration::try_from(t.duration_since(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)).ok()?;
    Some(SystemTime::UNIX_EPOCH + since_epoch)
}

/// Runs the agent until SIGINT or SIGTERM. `log` is the log filter `/loglevel` and
/// SIGUSR1 change.
pub async fn run(config: Config, log: LogLevel) -> anyhow::Result<()> {
    let pins = PinDir::new(&config.bpffs_dir);
    let sizes = [(names::CT_V4, config.conntrack_entries)];
    let mut datapath = Datapath::open_pinned(pins, &sizes).context("loading the datapath")?;
    let written = datapath.maps().read_written().context("reading the pinned maps")?;
    let adopted = datapath.adopted(names::SERVICES_V4);
    info!(
        dir = %config.bpffs_dir.display(),
        adopted,
        frontends = written.services.values().filter(|v| v.service_id != 0).count(),
        policy_entries = written.policy.rules.len(),
        "datapath loaded"
    );
    let health = Arc::new(Health::new(config.healthz_timeout));
    let metrics = Arc::new(Metrics::new());
    let capacities: BTreeMap<&'static str, u64> = (datapath.maps().capacities())
        .context("reading the maps' sizes")?
        .into_iter()
        .filter_map(|(name, n)| Some((occupancy::label_of(name)?, u64::from(n))))
        .collect();
    for (map, capacity) in &capacities {
        metrics.observe_capacity(map, *capacity);
    }
    let census_maps = Arc::new(datapath.maps().census_handles().context("the conntrack maps")?);
    let ctgc = ctgc::Gc::spawn(datapath.maps(), config.conntrack_gc, metrics.clone())
        .context("the conntrack GC's maps")?;
    let source_health = SourceHealth::default();
    if let Some(cidr) = config.cluster_cidr {
        info!(cluster_cidr = %cidr, "cluster CIDR");
    }
    if let Some(addr) = config.healthz_bind_address {
        let listener = bind(addr, "healthz").await?;
        tokio::spawn(log_exit("healthz server", metrics::serve_health(listener, health.clone())));
    }
    if let Some(addr) = config.metrics_bind_address {
        let listener = bind(addr, "metrics").await?;
        let server = metrics::serve_metrics(listener, metrics.clone(), Some(log.clone()));
        tokio::spawn(log_exit("metrics server", server));
    }

    let (tx, mut rx) = mpsc::channel::<Batch>(1024);
    let events = match &config.source {
        Source::Files { dir, poll_interval } => {
            info!(dir = %dir.display(), "reading cluster state from files");
            tokio::spawn(source::files::run(dir.clone(), *poll_interval, tx));
            NodeEvents::disabled()
        }
        Source::Api { kubeconfig } => {
            let client = client(kubeconfig.as_deref()).await?;
            let node = config.node_name.clone().expect("the API source always has a node name");
            info!(node = %node, "watching the API server");
            let events = NodeEvents::start(client.clone(), &node);
            let settings = source::kube::Settings::new(node);
            tokio::spawn(source::kube::run(client, settings, tx, source_health.clone()));
            events
        }
    };
    events.normal("Starting", format!("Starting nodeplane-agent {}", env!("CARGO_PKG_VERSION")));
    let mut announced_ready = false;
    let mut retire_warned = false;
    let mut health_checks = healthcheck::HealthCheckServers::new(config.external.health_check_bind);

    let node = NodeContext {
        node_name: config.node_name.clone(),
        external_ip_allow: config.external.external_ip_allow.clone(),
    };
    let mut agent = Agent::new(node, health.clone(), metrics.clone());
    agent.adopt(&written);
    drop(written);
    match NamesPublisher::spawn(config.state_dir.clone()) {
        Ok(names) => agent.publish_names(names),
        Err(e) => warn!(error = %e, "no names snapshot for `inspect`: starting its writer"),
    }
    agent.set_policy_flags(FlowLogConfig::policy_flags(config.flow_log.as_ref()));
    if let Some(flow_log) = &config.flow_log {
        let ring = datapath.maps().take_flow_events().context("the flow events ring buffer")?;
        flowlog::spawn(flow_log, ring, agent.resolver(), metrics.clone(), config.node_name.clone())
            .context("starting the flow log")?;
        info!(output = ?flow_log.output, "NetworkPolicy flow log on");
    }
    // A failed write (e.g. a full map) is retried on this tick even if nothing changes.
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut in_sync = true;
    let mut ifaces = tokio::time::interval(config.iface_interval);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let counters_interval = config.counters_interval.max(Duration::from_secs(1));
    let mut counters = tokio::time::interval(counters_interval);
    let mut last_counters = BTreeMap::new();
    let mut occupancy_ticks =
        tokio::time::interval(config.occupancy_interval.max(Duration::from_secs(1)));
    occupancy_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut census: Option<tokio::task::JoinHandle<_>> = None;
    let mut census_failed = false;
    let mut alarms = Alarms::default();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("installing a SIGUSR1 handler")?;
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut stale_logged: BTreeMap<Kind, u64> = BTreeMap::new();
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { anyhow::bail!("the source stopped") };
                let mut changed = agent.handle(batch);
                // Take whatever else is queued: one sync for a burst.
                while let Ok(batch) = rx.try_recv() {
                    changed |= agent.handle(batch);
                }
                if changed || !in_sync {
                    in_sync = sync(&mut agent, &mut datapath, &events, &ctgc, &config);
                    // The healthCheckNodePorts answer from the index: current whatever the
                    // maps' state (a load balancer asks about endpoints, not about us).
                    let wanted = healthcheck::wanted(agent.index(), config.node_name.as_deref());
                    health_checks.update(wanted).await;
                }
                if !announced_ready && health.readyz().ok {
                    announced_ready = true;
                    let frontends = agent.index().services().count();
                    info!(services = frontends, "first full sync programmed; ready");
                    events.normal("Ready", format!("Datapath programmed with {frontends} Services"));
                    // The maps are complete: now the programs may run on them.
                    attach_external(&mut datapath, &agent, &config);
                    attach(&mut datapath, &config.iface_prefixes, &mut retire_warned);
                    // Host-network clients (socklb.rs): attached, or detached when off.
                    let (on, root) = (config.socket_lb, config.cgroup_root.as_deref());
                    if let Err(e) = crate::socklb::reconcile(&mut datapath, on, root) {
                        warn!(error = %e, "socket LB of host-network clients");
                    }
                }
            }
            _ = retry.tick(), if !in_sync => in_sync = sync(&mut agent, &mut datapath, &events, &ctgc, &config),
            // Not before the first full sync: a restarted agent's new programs must not run
            // on maps that do not hold the cluster yet (the last agent's programs keep
            // running on the adopted maps meanwhile).
            _ = ifaces.tick(), if announced_ready => {
                attach_external(&mut datapath, &agent, &config);
                attach(&mut datapath, &config.iface_prefixes, &mut retire_warned);
            }
            _ = ticks.tick() => {
                let now = Instant::now();
                metrics.observe_source(&source_health, now);
                if let Ok(counters) = datapath.counters() {
                    metrics.observe_datapath(&counters);
                }
                if let Ok(policy) = datapath.maps().policy_counters() {
                    let verdicts = policy.verdicts.iter().map(|(k, c)| (*k, c.packets));
                    let resolver = agent.resolver().get();
                    metrics.observe_policy_verdicts(&flowlog::policy_verdict_totals(verdicts, &*resolver));
                    metrics.observe_flow_events(FlowOutcome::Lost, policy.events_lost);
                }
                log_staleness(&source_health, now, &mut stale_logged, &events);
            }
            _ = counters.tick(), if !config.counters_interval.is_zero() => {
                log_counters(&datapath, &mut last_counters);
            }
            // Counting the conntrack maps takes up to ~0.2 s: on a blocking thread, one at a
            // time (a tick while one runs is skipped).
            _ = occupancy_ticks.tick(), if !config.occupancy_interval.is_zero() && census.is_none() => {
                let maps = census_maps.clone();
                census = Some(tokio::task::spawn_blocking(move || occupancy::take_census(&maps)));
            }
            done = async { census.as_mut().expect("guarded by is_some").await }, if census.is_some() => {
                census = None;
                match done {
                    Ok(Ok(c)) => {
                        census_failed = false;
                        metrics.census_duration.observe(c.elapsed.as_secs_f64());
                        metrics.observe_conntrack("service", &c.service_ct);
                        metrics.observe_conntrack("policy", &c.policy_ct);
                        let mut usage: Vec<MapUsage> = c.usage().into();
                        usage.extend(agent.written_map_entries().iter().map(|(map, n)| MapUsage {
                            map,
                            entries: *n,
                            live: None,
                            capacity: capacities.get(map).copied().unwrap_or_default(),
                        }));
                        for u in &usage {
                            metrics.observe_usage(u);
                        }
                        for crossing in alarms.check(&usage) {
                            log_crossing(crossing, &events);
                        }
                    }
                    Ok(Err(e)) if !census_failed => {
                        census_failed = true;
                        warn!(error = %e, "counting map entries failed; retrying every interval");
                    }
                    Ok(Err(_)) => {}
                    Err(e) => warn!(error = %e, "the map census task failed"),
                }
            }
            _ = usr1.recv() => match log.toggle_debug() {
                Ok(filter) => info!(%filter, "SIGUSR1: log level changed"),
                Err(e) => warn!(error = %e, "SIGUSR1: changing the log level"),
            },
            _ = &mut shutdown => {
                info!(dir = %config.bpffs_dir.display(),
                      "shutting down; the pinned datapath keeps running (`uninstall` removes it)");
                return Ok(());
            }
        }
    }
}

/// Attaches the netdev programs to the node's external interfaces not attached yet.
fn attach_external(datapath: &mut Datapath, agent: &Agent, config: &Config) {
    let node_ips = agent.node.node_ips(agent.index());
    let ifaces = match external::interfaces(&config.external.interfaces, &node_ips) {
        Ok(ifaces) => ifaces,
        Err(e) => {
            warn!(error = %e, "listing the node's addresses");
            return;
        }
    };
    match datapath.attach_netdev(&ifaces) {
        Ok(new) => {
            for iface in new {
                info!(%iface, "attached to external interface");
            }
        }
        Err(e) => warn!(error = %e, "attaching to the external interfaces"),
    }
    match datapath.attach_xdp(config.external.xdp) {
        Ok(new) => {
            for (iface, mode) in new {
                info!(%iface, mode, "XDP attached to external interface");
            }
        }
        Err(e) => warn!(error = %e, "attaching XDP; tc handles the external interfaces alone"),
    }
}

/// Attaches to new pod interfaces. After the first pass that attached everywhere (every
/// pinned link runs this build's programs), retires what the old programs used
/// ([`Datapath::finish_upgrade`], once).
fn attach(datapath: &mut Datapath, prefixes: &[String], warned: &mut bool) {
    let mut ok = true;
    for prefix in prefixes {
        match datapath.attach_matching(prefix) {
            Ok(new) => {
                for iface in new {
                    debug!(%iface, "attached to pod interface");
                }
            }
            Err(e) => {
                ok = false;
                warn!(error = %e, "attaching to pod interfaces");
            }
        }
    }
    if ok {
        match datapath.finish_upgrade() {
            Ok(r) if r != Default::default() => {
                info!(maps = r.maps, links = r.links, copied = r.copied, "retired the old datapath")
            }
            Ok(_) => {}
            // Retried on every interface poll; said once.
            Err(e) if !*warned => {
                *warned = true;
                warn!(error = %e, "retiring the old datapath failed; retrying");
            }
            Err(e) => debug!(error = %e, "retiring the old datapath failed"),
        }
    }
}

/// One sync; then, if it may have taken backends from UDP frontends (or failed part-way),
/// a conntrack flush.
fn sync(
    agent: &mut Agent,
    datapath: &mut Datapath,
    events: &NodeEvents,
    gc: &ctgc::Gc,
    config: &Config,
) -> bool {
    let started = Instant::now();
    let result = agent.sync(datapath.maps());
    if result.is_ok() {
        let want = external::wanted(
            &config.external,
            config.cluster_cidr,
            &agent.node,
            agent.index(),
            &agent.desired,
            agent.syncer.written_services(),
        );
        match external::write(datapath.maps(), &want) {
            Ok(0) => {}
            Ok(writes) => debug!(writes, "NAT and source range maps updated"),
            Err(e) => {
                warn!(error = %e, "writing the NAT and source range maps; retrying in 1s");
                return false;
            }
        }
    }
    match &result {
        Ok(r) if r.conntrack_flush => gc.flush(Some(agent.syncer.programmed_pairs())),
        Ok(_) => {}
        Err(_) => gc.flush(None),
    }
    match result {
        Ok(report) if report.ops + report.policy_ops > 0 => {
            info!(
                ops = report.ops,
                policy_ops = report.policy_ops,
                frontends = report.frontends,
                backends = report.backends,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "datapath synced"
            );
            true
        }
        Ok(_) => {
            debug!("datapath already in sync");
            true
        }
        Err(e) => {
            warn!(error = %e, "datapath sync failed; retrying in 1s");
            events.warning("SyncFailed", format!("Datapath sync failed: {e}"));
            false
        }
    }
}

/// A map crossed 90% (or fell back below 85%): a warning and a Node event, once per crossing.
fn log_crossing(crossing: Crossing, events: &NodeEvents) {
    match crossing {
        Crossing::Above(u) => {
            let percent = u.live.unwrap_or(u.entries) * 100 / u.capacity.max(1);
            warn!(
                map = u.map,
                entries = u.entries,
                live = u.live,
                capacity = u.capacity,
                percent,
                "map above {}% of its capacity",
                Alarms::HIGH_PERCENT
            );
            events.warning(
                "MapNearlyFull",
                format!(
                    "Datapath map {} is {percent}% full ({} entries of {})",
                    u.map, u.entries, u.capacity
                ),
            );
        }
        Crossing::Below(u) => info!(
            map = u.map,
            entries = u.entries,
            capacity = u.capacity,
            "map back below {}% of its capacity",
            Alarms::LOW_PERCENT
        ),
    }
}

/// Logs, every 10 s per kind, how stale a failing watch has made the agent's view.
fn log_staleness(
    health: &SourceHealth,
    now: Instant,
    logged: &mut BTreeMap<Kind, u64>,
    events: &NodeEvents,
) {
    for kind in Kind::ALL {
        let stale = health.stale_for(kind, now).as_secs();
        let last = logged.entry(kind).or_default();
        if stale == 0 {
            if *last > 0 {
                info!(%kind, "watch recovered");
            }
            *last = 0;
        } else if stale >= *last + 10 || *last == 0 {
            let error = health.get(kind).last_error.unwrap_or_default();
            if *last == 0 {
                events.warning("WatchFailed", format!("Watching {kind}s failed: {error}"));
            }
            warn!(%kind, stale_s = stale, %error, "no working watch; the datapath keeps its last state");
            *last = stale.max(1);
        }
    }
}

async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no --kubeconfig given and no in-cluster configuration (KUBERNETES_SERVICE_HOST, \
             service account token)",
        )?,
    };
    kube::Client::try_from(config).context("building the API client")
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

async fn log_exit(what: &str, f: impl Future<Output = std::io::Result<()>>) {
    if let Err(e) = f.await {
        warn!(error = %e, "{what} stopped");
    }
}

/// Logs the packet counters that moved since the last call, as `hook/reason=packets`.
fn log_counters(datapath: &Datapath, last: &mut BTreeMap<(&'static str, &'static str), u64>) {
    let Ok(now) = datapath.counters() else { return };
    let mut moved = Vec::new();
    for (hook, reason, counter) in now {
        let prev = last.insert((hook.name(), reason.name()), counter.packets).unwrap_or(0);
        if counter.packets != prev {
            moved.push(format!("{}/{}={}", hook.name(), reason.name(), counter.packets));
        }
    }
    if !moved.is_empty() {
        info!(counters = %moved.join(" "), "datapath packets");
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        index::test_helpers::{mk_service, mk_slice, ready},
        sync::{FakeMaps, Op},
    };

    /// Fails the test at the first write after which the maps are inconsistent.
    struct Checked<'a>(&'a mut FakeMaps);

    impl crate::policy::PolicyWriter for Checked<'_> {
        fn apply_policy(
            &mut self,
            op: &crate::policy::PolicyOp,
        ) -> Result<(), crate::policy::PolicyWriteError> {
            self.0.apply_policy(op)
        }
    }

    impl MapWriter for Checked<'_> {
        fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
            self.0.apply(op)?;
            if let Err(e) = self.0.check_consistent() {
                panic!("inconsistent after {op:?}: {e}");
            }
            Ok(())
        }
    }

    /// One change to a small cluster: 4 Services that share 2 ClusterIPs (so frontends
    /// collide), slices whose endpoints may be a ClusterIP, on this node or another.
    #[derive(Clone, Debug)]
    enum Change {
        Service { svc: u8, ip: u8, port: u8, local: bool },
        DeleteService(u8),
        Slice { svc: u8, slice: u8, endpoints: Vec<(u8, bool)> },
        DeleteSlice { svc: u8, slice: u8 },
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        prop_oneof![
            1 => (0..4u8, 0..2u8, 0..2u8, any::<bool>())
                .prop_map(|(svc, ip, port, local)| Change::Service { svc, ip, port, local }),
            1 => (0..4u8).prop_map(Change::DeleteService),
            4 => (0..4u8, 0..2u8, prop::collection::vec((0..12u8, any::<bool>()), 0..6))
                .prop_map(|(svc, slice, endpoints)| Change::Slice { svc, slice, endpoints }),
            1 => (0..4u8, 0..2u8).prop_map(|(svc, slice)| Change::DeleteSlice { svc, slice }),
        ]
    }

    fn event(change: &Change) -> Event {
        use crate::source::ObjectKey;
        match change {
            Change::Service { svc, ip, port, local } => {
                let mut s = mk_service(
                    "d",
                    &format!("s{svc}"),
                    &format!("10.96.0.{ip}"),
                    &[("http", 80 + i32::from(*port), "")],
                );
                if *local {
                    s.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
                }
                Event::Apply(s.into())
            }
            Change::DeleteService(svc) => {
                Event::Delete(Kind::Service, ObjectKey::namespaced("d", format!("s{svc}")))
            }
            Change::Slice { svc, slice, endpoints } => {
                let eps = endpoints
                    .iter()
                    .map(|(host, here)| {
                        // Hosts 10 and 11 are the ClusterIPs.
                        let addr = if *host >= 10 {
                            format!("10.96.0.{}", host - 10)
                        } else {
                            format!("10.244.0.{host}")
                        };
                        let mut ep = ready(&addr);
                        ep.node_name = Some(if *here { "n1" } else { "n2" }.into());
                        ep
                    })
                    .collect();
                let name = format!("s{svc}-{slice}");
                let svc = format!("s{svc}");
                Event::Apply(mk_slice("d", &name, &svc, &[("http", 8080, "")], eps).into())
            }
            Change::DeleteSlice { svc, slice } => Event::Delete(
                Kind::EndpointSlice,
                ObjectKey::namespaced("d", format!("s{svc}-{slice}")),
            ),
        }
    }

    proptest! {
        /// Whatever the changes, the incremental sync leaves the maps exactly where a full
        /// recompute says, consistent after every single write, also across failed writes.
        #[test]
        fn incremental_sync_equals_a_full_recompute(
            batches in prop::collection::vec(
                (prop::collection::vec(arb_change(), 1..4), prop::option::of(0usize..6)),
                1..25,
            ),
        ) {
            let (mut agent, _) = agent();
            let mut maps = FakeMaps::new();
            for (changes, fail_after) in &batches {
                agent.handle(Batch::now(changes.iter().map(event).collect()));
                maps.fail_after = fail_after.map(|n| maps.writes + n);
                if agent.sync(&mut Checked(&mut maps)).is_err() {
                    agent.sync(&mut Checked(&mut maps)).expect("the retry");
                }
                maps.fail_after = None;
                let full = desired::compute_for(agent.index(), &NodeContext::named("n1"));
                prop_assert_eq!(&agent.desired, &full);
                prop_assert_eq!(maps.check_matches(&full), Ok(()));
            }
        }
    }

    fn agent() -> (Agent, Arc<Health>) {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let agent = Agent::new(NodeContext::named("n1"), health.clone(), Arc::new(Metrics::new()));
        (agent, health)
    }

    fn k8s<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("k8s object")
    }

    fn policy_pod(name: &str, app: &str, last: u8, node: &str) -> Object {
        let pod: k8s_openapi::api::core::v1::Pod = k8s(serde_json::json!({
            "metadata": { "namespace": "a", "name": name, "labels": { "app": app } },
            "spec": { "nodeName": node, "containers": [] },
            "status": { "phase": "Running", "podIP": format!("10.0.0.{last}") },
        }));
        pod.into()
    }

    fn web_to_db(port: u16) -> Object {
        let np: k8s_openapi::api::networking::v1::NetworkPolicy = k8s(serde_json::json!({
            "metadata": { "namespace": "a", "name": "db" },
            "spec": {
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [{
                    "from": [{ "podSelector": { "matchLabels": { "app": "web" } } }],
                    "ports": [{ "port": port }],
                }],
            },
        }));
        np.into()
    }

    /// The policy maps a full compute of the agent's index gives.
    fn computed(agent: &Agent) -> PolicyMaps {
        let namespaces: BTreeMap<String, crate::model::Labels> =
            agent.index.namespaces().map(|n| (n.name.clone(), n.labels.clone())).collect();
        compute::compute(&compute::Input {
            pods: agent.index.pods().collect(),
            namespaces: &namespaces,
            policies: agent.index.network_policies().collect(),
            node_name: "n1",
        })
    }

    #[test]
    fn pod_changes_update_the_policy_maps_as_a_full_compute_would() {
        let (mut agent, _) = agent();
        let mut maps = FakeMaps::new();
        let ns: k8s_openapi::api::core::v1::Namespace =
            k8s(serde_json::json!({ "metadata": { "name": "a" } }));
        let pods = vec![
            policy_pod("db", "db", 1, "n1"),
            policy_pod("web", "web", 2, "n2"),
            policy_pod("other", "other", 3, "n1"),
        ];
        let mut events: Vec<Event> = Kind::ALL.map(|kind| Event::Reset(kind, vec![])).into();
        events.push(Event::Apply(ns.into()));
        events.extend(pods.into_iter().map(Event::Apply));
        events.push(Event::Apply(web_to_db(80)));
        agent.handle(Batch::now(events));
        agent.sync(&mut maps).expect("sync");
        maps.policy.check_matches(&computed(&agent)).expect("first sync");
        let steps = [
            Event::Apply(policy_pod("other", "web", 3, "n1")),
            Event::Apply(policy_pod("new", "web", 4, "n1")),
            Event::Apply(policy_pod("db", "none", 1, "n1")),
            Event::Delete(Kind::Pod, crate::model::ObjectKey::namespaced("a", "web")),
            Event::Apply(policy_pod("db", "db", 1, "n1")),
            Event::Apply(web_to_db(81)),
            Event::Apply(policy_pod("new", "web", 5, "n2")),
        ];
        for step in steps {
            agent.handle(Batch::now(vec![step.clone()]));
            let report = agent.sync(&mut maps).expect("sync");
            assert!(report.policy_ops > 0, "{step:?} changes the maps");
            let want = computed(&agent);
            maps.policy.check_matches(&want).unwrap_or_else(|e| panic!("after {step:?}: {e}"));
            assert_eq!(agent.policy_state.as_ref().map(|s| s.maps()), Some(&want));
            let resolver = agent.resolver().get();
            for last in 1..=5u8 {
                let ip = Ipv4Addr::new(10, 0, 0, last);
                let pods = agent.index.pods().filter(|p| p.ip == Some(ip));
                assert_eq!(resolver.pod(ip), pods.map(|p| p.key.clone()).last(), "{ip}");
            }
        }
    }

    #[test]
    fn an_empty_cluster_becomes_ready() {
        // Every list is empty: nothing changes in the index, yet the lists completing must
        // lead to a sync and readiness.
        let (mut agent, health) = agent();
        let mut maps = FakeMaps::new();
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            let due = agent.handle(Batch::now(vec![Event::Retain(kind, Default::default())]));
            // The first sync waits for every kind.
            assert_eq!(due, i == Kind::ALL.len() - 1, "{kind}");
        }
        agent.sync(&mut maps).unwrap();
        assert!(health.readyz().ok, "{}", health.readyz().detail);
        assert!(health.healthz(Instant::now()).ok);
    }

    #[test]
    fn trigger_times_count_only_for_slices_that_changed() {
        let (mut agent, _) = agent();
        let metrics = agent.metrics.clone();
        let mut maps = FakeMaps::new();
        let lists = Kind::ALL.map(|kind| Event::Reset(kind, vec![]));
        agent.handle(Batch::now(lists.into()));
        let mut slice = mk_slice("d", "web-1", "web", &[("", 8080, "")], vec![ready("10.0.0.1")]);
        slice.metadata.annotations = Some(
            [(source::kube::TRIGGER_TIME_ANNOTATION.to_string(), "2026-01-01T00:00:00Z".into())]
                .into(),
        );
        let count = || {
            let text = metrics.encode();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("nodeplane_network_programming_duration_seconds_count ")
                })
                .map(|v| v.parse::<u64>().unwrap())
                .unwrap()
        };
        agent.handle(Batch::now(vec![Event::Apply(slice.clone().into())]));
        agent.sync(&mut maps).unwrap();
        assert_eq!(count(), 1);
        // The same slice again, as a relist brings it: not a change, not a latency.
        agent.handle(Batch::now(vec![Event::Apply(slice.into())]));
        agent.sync(&mut maps).unwrap();
        assert_eq!(count(), 1);
    }

    #[test]
    fn failed_syncs_are_counted_by_maps_and_reason() {
        let (mut agent, _) = agent();
        let metrics = agent.metrics.clone();
        let errors = |reason: &str| {
            let series =
                format!("nodeplane_sync_errors_total{{maps=\"service\",reason=\"{reason}\"}} ");
            let text = metrics.encode();
            text.lines().find_map(|l| l.strip_prefix(series.as_str())).map(|v| v.to_string())
        };
        assert_eq!(errors("map_full").as_deref(), Some("0"), "exported before any error");
        let lists = Kind::ALL.map(|kind| Event::Reset(kind, vec![]));
        agent.handle(Batch::now(lists.into()));
        let svc = crate::index::test_helpers::mk_service("d", "web", "10.96.0.1", &[("", 80, "")]);
        agent.handle(Batch::now(vec![Event::Apply(svc.into())]));
        let mut maps = FakeMaps::new();
        maps.fail_after = Some(0);
        assert!(agent.sync(&mut maps).is_err());
        assert_eq!(errors("write_failed").as_deref(), Some("1"));
        assert_eq!(errors("map_full").as_deref(), Some("0"));
    }

    #[test]
    fn latencies_are_reported_for_the_batches_a_sync_programmed() {
        let (mut agent, _) = agent();
        let mut maps = FakeMaps::new();
        let lists = Kind::ALL.map(|kind| Event::Reset(kind, vec![]));
        assert!(agent.handle(Batch::now(lists.into())));
        agent.sync(&mut maps).unwrap();
        let svc = crate::index::test_helpers::mk_service("d", "web", "10.96.0.1", &[("", 80, "")]);
        let received = Instant::now() - Duration::from_millis(5);
        assert!(agent.handle(Batch { events: vec![Event::Apply(svc.into())], received }));
        let report = agent.sync(&mut maps).unwrap();
        assert_eq!((report.frontends, report.latencies.len()), (1, 1));
        assert!(report.latencies[0] >= Duration::from_millis(5));
        assert!(agent.sync(&mut maps).unwrap().latencies.is_empty(), "reported once");
    }

    /// A sync asks for a conntrack flush when it may have taken a backend from a UDP
    /// frontend: a full sync that wrote something, or an endpoint change of a Service with
    /// a UDP port; not an endpoint change of a TCP-only Service, nor a sync without writes.
    #[test]
    fn syncs_that_may_end_udp_flows_ask_for_a_conntrack_flush() {
        let (mut agent, _) = agent();
        let mut maps = FakeMaps::new();
        let lists = Kind::ALL.map(|kind| Event::Reset(kind, vec![]));
        agent.handle(Batch::now(lists.into()));
        agent.sync(&mut maps).unwrap();
        let dns = mk_service("d", "dns", "10.96.0.10", &[("dns", 53, "UDP")]);
        let web = mk_service("d", "web", "10.96.0.11", &[("http", 80, "")]);
        agent.handle(Batch::now(vec![Event::Apply(dns.into()), Event::Apply(web.into())]));
        assert!(agent.sync(&mut maps).unwrap().conntrack_flush, "a full sync that wrote");
        let slice = |svc: &str, port: (&str, i32, &str), ips: &[&str]| -> Event {
            let eps = ips.iter().map(|ip| ready(ip)).collect();
            Event::Apply(mk_slice("d", &format!("{svc}-1"), svc, &[port], eps).into())
        };
        let cases = [
            (slice("web", ("http", 8080, ""), &["10.0.0.1", "10.0.0.2"]), false),
            (slice("web", ("http", 8080, ""), &["10.0.0.1"]), false),
            (slice("dns", ("dns", 5353, "UDP"), &["10.0.0.1", "10.0.0.2"]), true),
            (slice("dns", ("dns", 5353, "UDP"), &["10.0.0.2"]), true),
        ];
        for (i, (event, flush)) in cases.into_iter().enumerate() {
            agent.handle(Batch::now(vec![event]));
            let report = agent.sync(&mut maps).unwrap();
            assert!(report.ops > 0, "change {i} writes");
            assert_eq!(report.conntrack_flush, flush, "change {i}");
        }
        assert!(!agent.sync(&mut maps).unwrap().conntrack_flush, "nothing written");
    }
}
