//! Conntrack hygiene: the flows of removed backends, and the entries the LRU keeps after
//! their flows died.
//!
//! ```text
//!  agent loop ── a sync changed a non-TCP frontend ──► Gc::flush() ──(coalesced)─┐
//!                                                                                ▼
//!  flush task   walk CT_V4 ─► read SERVICES_V4, BACKEND_SLOTS, BACKENDS_V4 ─► delete the
//!               non-TCP entries (ORIGINAL, then REPLY) whose (frontend, backend) is no
//!               longer programmed
//!  expiry task  every interval (adaptive): walk CT_V4 and POLICY_CT_V4 ─► delete what the
//!               datapath already ignores (expired, replies of dead flows) and, again,
//!               unprogrammed non-TCP entries
//! ```
//!
//! # What happens to a flow when its backend goes
//!
//! 1. TCP, backend still listed (in a slot, or draining): the flow stays on it until it
//!    closes (the datapath checks `BACKENDS_V4`).
//! 2. TCP, backend gone from every frontend: the next packet goes to a live backend, which
//!    answers the unknown segment with a RST (`nat-reselected`).
//! 3. UDP and other protocols: flushed here once the flow's (frontend, backend) pair leaves
//!    the slots, so the next datagram picks a live backend; when the backend entry itself
//!    is gone the datapath re-picks on the next datagram anyway.
//!
//! UDP has no connection to drain, and a datagram to a backend that is going away is the
//! classic stale-DNS blackhole; TCP connections to a terminating or unready pod must be
//! allowed to finish ([`crate::desired`] keeps such endpoints as draining backends).
//!
//! The datapath does not check, per packet, that a UDP flow's backend is still in its
//! frontend's slots: a precise check needs a reverse index (service, backend) kept in step
//! with the slots (one more map of up to 262,144 entries written before every slot), and
//! the slot a backend sits in moves whenever an earlier backend goes (slots follow sorted
//! backends), so remembering the slot would misjudge the flows of backends that stay. The
//! flush instead follows the sync that removed the pair within one walk of `CT_V4` (see
//! docs/ARCHITECTURE.md for the numbers).
//!
//! # Races
//!
//! Nothing here locks anything the packet path uses: each delete is one map operation,
//! like a packet's own insert. The programmed pairs are read *after* the walk, so an entry
//! the walk saw was created from slots at least as old as what is compared with. Every
//! deletion looks the entry up again first and deletes it only if it is still what was
//! judged (same pair, still expired), so a flow the datapath re-created meanwhile under
//! the same key survives, short of a packet landing between that lookup and the delete.
//!
//! # Reply entries
//!
//! A REPLY entry's own deadline is set when the flow starts and never refreshed: the
//! datapath trusts it only while its ORIGINAL entry is alive and names the same backend.
//! The expiry pass judges it the same way, and only once its own deadline has passed (so
//! the REPLY of a flow being created right now, inserted just before its ORIGINAL, is
//! never judged).
use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd as _,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapError};
use nodeplane_common::{
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_HAIRPIN, CtKeyV4, CtValueV4, IPPROTO_TCP,
        ServiceKeyV4, ServiceValue, SlotKey, names,
    },
    nat::NatValueV4,
    policy::{PolicyCtKey, PolicyCtValue},
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
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    datapath::{BatchReader, DatapathError, Maps},
    metrics::Metrics,
    occupancy::monotonic_ns,
};

/// Which pass: after a sync (`flush`) or on the timer (`expiry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pass {
    /// Non-TCP entries of (frontend, backend) pairs no longer programmed.
    Flush,
    /// Everything: expired entries, replies of dead flows, and what a flush deletes.
    Expiry,
}

impl Pass {
    pub const ALL: [Pass; 2] = [Pass::Flush, Pass::Expiry];

    pub const fn as_str(self) -> &'static str {
        match self {
            Pass::Flush => "flush",
            Pass::Expiry => "expiry",
        }
    }
}

/// The (frontend, backend) a `CT_V4` entry was created for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    pub frontend: ServiceKeyV4,
    pub service_id: u32,
    pub backend_id: u32,
    /// The backend's address and port, network order.
    pub addr: [u8; 4],
    pub port: [u8; 2],
}

impl Pair {
    /// ORIGINAL (`client -> vip`): the frontend is the destination, the backend the NAT
    /// address. REPLY (`backend -> client`): the backend is the source, the frontend the
    /// NAT address.
    pub fn of(key: &CtKeyV4, value: &CtValueV4) -> Self {
        let (frontend, backend) = if key.dir == CT_DIR_REPLY {
            ((value.nat_addr, value.nat_port), (key.saddr, key.sport))
        } else {
            ((key.daddr, key.dport), (value.nat_addr, value.nat_port))
        };
        Pair {
            frontend: ServiceKeyV4 {
                addr: frontend.0,
                port: frontend.1,
                proto: key.proto,
                _pad: 0,
            },
            service_id: value.service_id,
            backend_id: value.backend_id,
            addr: backend.0,
            port: backend.1,
        }
    }
}

/// The pairs the service maps program for non-TCP frontends: a frontend entry (not a VIP
/// marker), a slot below its count, the backend that slot names.
pub fn programmed_pairs(
    services: impl IntoIterator<Item = (ServiceKeyV4, ServiceValue)>,
    slots: impl IntoIterator<Item = (SlotKey, u32)>,
    backends: &HashMap<u32, BackendV4>,
) -> HashSet<Pair> {
    let frontends: HashMap<u32, (ServiceKeyV4, u32)> = services
        .into_iter()
        .filter(|(k, _)| !k.is_vip_marker() && k.proto != IPPROTO_TCP)
        .map(|(k, v)| (v.service_id, (k, v.backend_count)))
        .collect();
    let mut pairs = HashSet::new();
    for (slot, backend_id) in slots {
        let Some((frontend, count)) = frontends.get(&slot.service_id) else { continue };
        let Some(backend) = backends.get(&backend_id) else { continue };
        if slot.slot < *count {
            pairs.insert(Pair {
                frontend: *frontend,
                service_id: slot.service_id,
                backend_id,
                addr: backend.addr,
                port: backend.port,
            });
        }
    }
    pairs
}

/// The ORIGINAL key of the flow a REPLY entry (`backend -> client`, value: the VIP)
/// belongs to. A hairpin flow's REPLY entry (`CT_F_HAIRPIN`) is keyed
/// `backend -> HAIRPIN_ADDR_V4`: its client is the backend itself.
pub fn original_of_reply(key: &CtKeyV4, value: &CtValueV4) -> CtKeyV4 {
    let hairpin = value.flags & CT_F_HAIRPIN != 0;
    CtKeyV4 {
        saddr: if hairpin { key.saddr } else { key.daddr },
        daddr: value.nat_addr,
        sport: key.dport,
        dport: value.nat_port,
        proto: key.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    }
}

/// What one walk of `CT_V4` found to judge.
#[derive(Debug, Default)]
pub struct CtFindings {
    /// Non-TCP entries (both directions) by pair, to be judged against the programmed pairs.
    pub non_tcp: HashMap<Pair, Vec<CtKeyV4>>,
    /// ORIGINAL entries past their deadline (expiry pass only).
    pub expired: Vec<CtKeyV4>,
    /// REPLY entries past their own (first) deadline, judged by their ORIGINAL (expiry pass).
    pub old_replies: Vec<(CtKeyV4, CtValueV4)>,
    /// Live ORIGINAL entries with their backend (expiry pass).
    pub live: HashSet<(CtKeyV4, [u8; 4], [u8; 2])>,
    pub scanned: u64,
}

impl CtFindings {
    /// Files one entry; `now` on `bpf_ktime_get_ns()`'s clock ([`monotonic_ns`]).
    pub fn add(&mut self, key: &CtKeyV4, value: &CtValueV4, now: u64, pass: Pass) {
        self.scanned += 1;
        if key.proto != IPPROTO_TCP {
            self.non_tcp.entry(Pair::of(key, value)).or_default().push(*key);
        }
        if pass != Pass::Expiry {
            return;
        }
        // The datapath's liveness test is `expires_ns > now`.
        let expired = value.expires_ns <= now;
        match (key.dir, expired) {
            (CT_DIR_REPLY, true) => self.old_replies.push((*key, *value)),
            (CT_DIR_REPLY, false) => {}
            (_, true) => self.expired.push(*key),
            (_, false) => {
                self.live.insert((*key, value.nat_addr, value.nat_port));
            }
        }
    }

    /// The non-TCP entries whose pair is not in `programmed`: ORIGINAL entries first (a
    /// REPLY deleted first would leave a flow whose replies are no longer translated).
    pub fn stale(&self, programmed: &HashSet<Pair>) -> Vec<(Pair, CtKeyV4)> {
        let mut stale: Vec<(Pair, CtKeyV4)> = self
            .non_tcp
            .iter()
            .filter(|(pair, _)| !programmed.contains(pair))
            .flat_map(|(pair, keys)| keys.iter().map(move |k| (*pair, *k)))
            .collect();
        stale.sort_by_key(|(pair, key)| (key.dir, *pair, *key));
        stale
    }
}

/// Entries one pass deleted from one table, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Past their deadline.
    pub expired: u64,
    /// REPLY entries whose flow is gone (its ORIGINAL expired, vanished or moved).
    pub orphaned: u64,
    /// Non-TCP flows whose (frontend, backend) pair is no longer programmed.
    pub backend_removed: u64,
}

impl Deleted {
    pub const REASONS: [&str; 3] = ["expired", "orphaned", "backend_removed"];

    pub fn total(&self) -> u64 {
        self.expired + self.orphaned + self.backend_removed
    }

    /// `(reason label, count)`, in [`Deleted::REASONS`] order.
    pub fn by_reason(&self) -> [(&'static str, u64); 3] {
        let [e, o, b] = Self::REASONS;
        [(e, self.expired), (o, self.orphaned), (b, self.backend_removed)]
    }
}

/// What one pass did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassReport {
    pub pass: Pass,
    /// `CT_V4`.
    pub service: Deleted,
    /// `POLICY_CT_V4` (expiry passes only).
    pub policy: Deleted,
    /// `NAT_V4` (expiry passes only): `expired` past the lifetime of their TCP state,
    /// `orphaned` when the other entry of their flow is gone.
    pub nat: Deleted,
    /// Entries read: `CT_V4`, `POLICY_CT_V4`.
    pub scanned: (u64, u64),
    /// `max_entries`: `CT_V4`, `POLICY_CT_V4`.
    pub capacity: (u64, u64),
    pub elapsed: Duration,
}

impl PassReport {
    /// The larger share of a table's capacity this pass freed, what the next interval
    /// follows ([`Interval::next`]).
    pub fn delete_ratio(&self) -> f64 {
        let ratio = |n: u64, cap: u64| if cap == 0 { 0.0 } else { n as f64 / cap as f64 };
        ratio(self.service.total(), self.capacity.0)
            .max(ratio(self.policy.total(), self.capacity.1))
            .max(ratio(self.nat.total(), u64::from(nodeplane_common::nat::MAX_NAT_ENTRIES)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("{pass} pass, reading {map}: {source}")]
    Read { pass: &'static str, map: &'static str, source: std::io::Error },
    #[error("{pass} pass, {map}: {source}")]
    Map { pass: &'static str, map: &'static str, source: MapError },
}

/// A table the GC reads in batches and deletes from, on descriptors of its own.
struct Table<K, V> {
    reader: BatchReader<K, V>,
    map: BpfHashMap<MapData, K, V>,
}

impl<K: aya::Pod, V: aya::Pod> Table<K, V> {
    fn new(name: &'static str, map: &BpfHashMap<MapData, K, V>) -> Result<Self, DatapathError> {
        let reader = BatchReader::new(name, map)?;
        let fd = (map.map().fd().as_fd().try_clone_to_owned())
            .map_err(|source| DatapathError::Dup { name, source })?;
        let data = MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })?;
        // LRU or plain hash: aya's HashMap takes either.
        let map = BpfHashMap::try_from(Map::LruHashMap(data))
            .map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { reader, map })
    }

    /// Looks `key` up again and deletes it if `still(value)`: whether it was deleted.
    fn delete_if(&mut self, key: &K, still: impl FnOnce(&V) -> bool) -> Result<bool, MapError> {
        match self.map.get(key, 0) {
            Ok(v) if still(&v) => {}
            Ok(_) | Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(e),
        }
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            // Evicted or deleted by someone else since the lookup.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The maps a GC task reads and writes, on descriptors of its own (`Send`, so a pass runs
/// on tokio's blocking pool while the main loop keeps the [`Maps`]).
pub struct GcMaps {
    /// The pairs of the last sync that completed ([`Gc::flush`]).
    settled: Arc<std::sync::Mutex<HashSet<Pair>>>,
    ct: Table<CtKeyV4, CtValueV4>,
    policy_ct: Table<PolicyCtKey, PolicyCtValue>,
    nat: Table<CtKeyV4, NatValueV4>,
    services: BatchReader<ServiceKeyV4, ServiceValue>,
    slots: BatchReader<SlotKey, u32>,
    backends: BatchReader<u32, BackendV4>,
}

impl GcMaps {
    pub fn new(maps: &Maps) -> Result<Self, DatapathError> {
        Self::with_settled(maps, Arc::default())
    }

    fn with_settled(
        maps: &Maps,
        settled: Arc<std::sync::Mutex<HashSet<Pair>>>,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            settled,
            ct: Table::new(names::CT_V4, &maps.ct)?,
            policy_ct: Table::new(names::POLICY_CT_V4, &maps.policy_ct)?,
            nat: Table::new(names::NAT_V4, &maps.nat)?,
            services: BatchReader::new(names::SERVICES_V4, &maps.services)?,
            slots: BatchReader::new(names::BACKEND_SLOTS, &maps.slots)?,
            backends: BatchReader::new(names::BACKENDS_V4, &maps.backends)?,
        })
    }

    /// The pairs programmed right now, read from the kernel (maps adopted from an earlier
    /// agent count too), together with those of the last sync that completed. A sync may
    /// be writing while this reads: between its writes a pair can be briefly absent from
    /// the kernel (a backend moving to the next slot before the count grows), and a flow
    /// of a pair absent from both is the only one deleted.
    fn programmed(&self, pass: Pass) -> Result<HashSet<Pair>, GcError> {
        let read =
            |map: &'static str| move |source| GcError::Read { pass: pass.as_str(), map, source };
        let mut services = Vec::new();
        self.services.for_each(|k, v| services.push((*k, *v))).map_err(read(names::SERVICES_V4))?;
        let mut slots = Vec::new();
        self.slots.for_each(|k, v| slots.push((*k, *v))).map_err(read(names::BACKEND_SLOTS))?;
        let mut backends = HashMap::new();
        self.backends
            .for_each(|k, v| {
                backends.insert(*k, *v);
            })
            .map_err(read(names::BACKENDS_V4))?;
        let mut pairs = programmed_pairs(services, slots, &backends);
        pairs.extend(self.settled.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
        Ok(pairs)
    }
}

/// One pass over the conntrack tables (blocking: run it on the blocking pool).
pub fn run_pass(maps: &mut GcMaps, pass: Pass) -> Result<PassReport, GcError> {
    let started = Instant::now();
    let p = pass.as_str();
    let map_err = |map: &'static str| move |source| GcError::Map { pass: p, map, source };
    let now = monotonic_ns();
    let mut found = CtFindings::default();
    maps.ct.reader.for_each(|k, v| found.add(k, v, now, pass)).map_err(|source| GcError::Read {
        pass: p,
        map: names::CT_V4,
        source,
    })?;
    let mut report = PassReport {
        pass,
        service: Deleted::default(),
        policy: Deleted::default(),
        nat: Deleted::default(),
        scanned: (found.scanned, 0),
        capacity: (maps.ct.reader.max_entries().into(), maps.policy_ct.reader.max_entries().into()),
        elapsed: Duration::ZERO,
    };

    // Non-TCP flows of pairs no longer programmed (read after the walk: see "Races").
    if !found.non_tcp.is_empty() {
        let programmed = maps.programmed(pass)?;
        for (pair, key) in found.stale(&programmed) {
            if maps
                .ct
                .delete_if(&key, |v| Pair::of(&key, v) == pair)
                .map_err(map_err(names::CT_V4))?
            {
                report.service.backend_removed += 1;
            }
        }
    }
    if pass == Pass::Expiry {
        for key in &found.expired {
            let now = monotonic_ns();
            if maps.ct.delete_if(key, |v| v.expires_ns <= now).map_err(map_err(names::CT_V4))? {
                report.service.expired += 1;
            }
        }
        for (key, value) in &found.old_replies {
            let backend = (key.saddr, key.sport);
            let original = original_of_reply(key, value);
            if found.live.contains(&(original, backend.0, backend.1)) {
                continue;
            }
            // Created after the walk passed its bucket, or refreshed since: ask again.
            let now = monotonic_ns();
            match maps.ct.map.get(&original, 0) {
                Ok(o) if o.expires_ns > now && (o.nat_addr, o.nat_port) == backend => continue,
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::CT_V4)(e)),
            }
            let (vip, vport) = (value.nat_addr, value.nat_port);
            let still =
                |v: &CtValueV4| v.expires_ns <= now && (v.nat_addr, v.nat_port) == (vip, vport);
            if maps.ct.delete_if(key, still).map_err(map_err(names::CT_V4))? {
                report.service.orphaned += 1;
            }
        }
        let now = monotonic_ns();
        let mut expired = Vec::new();
        let scanned = maps
            .policy_ct
            .reader
            .for_each(|k, v| {
                if v.expires_ns <= now {
                    expired.push(*k);
                }
            })
            .map_err(|source| GcError::Read { pass: p, map: names::POLICY_CT_V4, source })?;
        report.scanned.1 = scanned as u64;
        for key in &expired {
            let now = monotonic_ns();
            let deleted = maps.policy_ct.delete_if(key, |v| v.expires_ns <= now);
            if deleted.map_err(map_err(names::POLICY_CT_V4))? {
                report.policy.expired += 1;
            }
        }
        report.nat = expire_nat(&mut maps.nat, p)?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Whether a `NAT_V4` entry is dead at `now` (`nodeplane_common::nat::dead`, the rule the
/// datapath's allocator reclaims ports by).
pub fn nat_dead(key: &CtKeyV4, value: &NatValueV4, now: u64, partner: Option<&NatValueV4>) -> bool {
    nodeplane_common::nat::dead(key.proto, value, now, partner)
}

/// The `NAT_V4` part of an expiry pass.
fn expire_nat(
    nat: &mut Table<CtKeyV4, NatValueV4>,
    pass: &'static str,
) -> Result<Deleted, GcError> {
    let map_err = |source| GcError::Map { pass, map: names::NAT_V4, source };
    let mut entries = HashMap::new();
    nat.reader
        .for_each(|k, v| {
            entries.insert(*k, *v);
        })
        .map_err(|source| GcError::Read { pass, map: names::NAT_V4, source })?;
    let now = monotonic_ns();
    let mut deleted = Deleted::default();
    for (key, value) in &entries {
        let partner = entries.get(&value.partner(key));
        let partner_alive = partner.is_some();
        if !nat_dead(key, value, now, partner) {
            continue;
        }
        // Only if not used since the walk read it.
        let seen = value.last_seen_ns;
        if nat.delete_if(key, |v| v.last_seen_ns == seen).map_err(map_err)? {
            if partner_alive {
                deleted.expired += 1;
            } else {
                deleted.orphaned += 1;
            }
        }
    }
    Ok(deleted)
}

/// How often the expiry pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    /// Always this long (`--conntrack-gc-interval` above zero).
    Fixed(Duration),
    /// Starts at [`Interval::START`] and adapts between [`Interval::MIN`] and
    /// [`Interval::MAX`] to how much each pass deletes, as Cilium's conntrack GC does.
    Adaptive,
}

impl Interval {
    pub const START: Duration = Duration::from_secs(60);
    pub const MIN: Duration = Duration::from_secs(10);
    pub const MAX: Duration = Duration::from_secs(600);

    /// `--conntrack-gc-interval`: `0s` is adaptive.
    pub fn from_flag(d: Duration) -> Self {
        if d.is_zero() { Self::Adaptive } else { Self::Fixed(d) }
    }

    pub fn first(self) -> Duration {
        match self {
            Self::Fixed(d) => d,
            Self::Adaptive => Self::START,
        }
    }

    /// The interval after a pass that freed `ratio` of a table's capacity (the larger of
    /// the two): above 25% the next pass comes sooner, by up to 10x at 90% (the table
    /// fills with dead entries faster than they are collected); below 5% it comes 1.5x
    /// later (little to do); in between it stays.
    pub fn next(self, prev: Duration, ratio: f64) -> Duration {
        let Self::Adaptive = self else { return self.first() };
        let next = if ratio > 0.25 {
            prev.mul_f64(1.0 - ratio.min(0.9))
        } else if ratio < 0.05 {
            prev.mul_f64(1.5)
        } else {
            prev
        };
        next.clamp(Self::MIN, Self::MAX)
    }
}

/// The GC's metrics, registered by [`Metrics::new`] (docs/METRICS.md).
pub struct GcMetrics {
    pub deleted: Family<DeletedLabel, Counter>,
    pub duration: Family<PassLabel, Histogram, fn() -> Histogram>,
    pub errors: Family<PassLabel, Counter>,
    pub interval: Gauge<f64, AtomicU64>,
}

/// `table` (`service`: `CT_V4`, `policy`: `POLICY_CT_V4`) and `reason` ([`Deleted`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeletedLabel {
    pub table: String,
    pub reason: String,
}

/// `pass`: `flush` or `expiry`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabel {
    pub pass: String,
}

impl Default for GcMetrics {
    fn default() -> Self {
        fn histogram() -> Histogram {
            // 100 us .. ~6.5 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 17))
        }
        let m = Self {
            deleted: Family::default(),
            duration: Family::new_with_constructor(histogram),
            errors: Family::default(),
            interval: Gauge::default(),
        };
        // Every series exists from the start, at zero.
        for table in ["service", "policy"] {
            for reason in Deleted::REASONS {
                let label = DeletedLabel { table: table.into(), reason: reason.into() };
                m.deleted.get_or_create(&label).inc_by(0);
            }
        }
        for pass in Pass::ALL {
            m.errors.get_or_create(&PassLabel { pass: pass.as_str().into() }).inc_by(0);
        }
        m
    }
}

impl GcMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "conntrack_gc_deleted",
            "Conntrack entries the agent deleted, by table (service: CT_V4, policy: \
             POLICY_CT_V4) and reason (expired, orphaned: a reply entry whose flow is gone, \
             backend_removed: a UDP flow whose backend left its Service)",
            self.deleted.clone(),
        );
        registry.register(
            "conntrack_gc_duration_seconds",
            "Time of one conntrack GC pass, by pass (flush: after a sync that changed a \
             non-TCP Service; expiry: on the adaptive timer)",
            self.duration.clone(),
        );
        registry.register(
            "conntrack_gc_errors",
            "Conntrack GC passes that failed, by pass",
            self.errors.clone(),
        );
        registry.register(
            "conntrack_gc_interval_seconds",
            "The current interval of the conntrack expiry pass",
            self.interval.clone(),
        );
    }

    /// Counts what a pass did.
    pub fn observe(&self, report: &PassReport) {
        let tables = [("service", report.service), ("policy", report.policy), ("nat", report.nat)];
        for (table, deleted) in tables {
            for (reason, n) in deleted.by_reason() {
                let label = DeletedLabel { table: table.into(), reason: reason.into() };
                self.deleted.get_or_create(&label).inc_by(n);
            }
        }
        let label = PassLabel { pass: report.pass.as_str().into() };
        self.duration.get_or_create(&label).observe(report.elapsed.as_secs_f64());
    }
}

/// The running GC: a flush task woken by [`Gc::flush`] and an expiry task on its timer,
/// each with its own [`GcMaps`] and running its passes on the blocking pool, so the main
/// loop never waits for either.
pub struct Gc {
    flush: Arc<Notify>,
    settled: Arc<std::sync::Mutex<HashSet<Pair>>>,
}

impl Gc {
    /// Starts both tasks (inside a tokio runtime).
    pub fn spawn(
        maps: &Maps,
        interval: Interval,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DatapathError> {
        let flush = Arc::new(Notify::new());
        let settled = Arc::<std::sync::Mutex<HashSet<Pair>>>::default();
        let flush_maps = GcMaps::with_settled(maps, settled.clone())?;
        tokio::spawn(flush_loop(flush_maps, flush.clone(), metrics.clone()));
        tokio::spawn(expiry_loop(GcMaps::with_settled(maps, settled.clone())?, interval, metrics));
        Ok(Self { flush, settled })
    }

    /// Asks for a flush pass and returns at once. Requests made while one runs collapse
    /// into one more pass after it. `settled`: the pairs of the sync that just completed
    /// (`None` after a failed one: the last completed sync's stay).
    pub fn flush(&self, settled: Option<HashSet<Pair>>) {
        if let Some(pairs) = settled {
            *self.settled.lock().unwrap_or_else(|e| e.into_inner()) = pairs;
        }
        self.flush.notify_one();
    }
}

/// Runs one pass on the blocking pool; `None` if the pass panicked (the maps are lost with
/// it, and the task stops).
async fn pass_off_loop(maps: GcMaps, pass: Pass) -> Option<(GcMaps, Result<PassReport, GcError>)> {
    let mut maps = maps;
    let joined = tokio::task::spawn_blocking(move || {
        let result = run_pass(&mut maps, pass);
        (maps, result)
    })
    .await;
    match joined {
        Ok(done) => Some(done),
        Err(e) => {
            warn!(pass = pass.as_str(), error = %e, "the conntrack GC task failed; it stops");
            None
        }
    }
}

async fn flush_loop(mut maps: GcMaps, wake: Arc<Notify>, metrics: Arc<Metrics>) {
    let mut failing = false;
    loop {
        wake.notified().await;
        let Some((back, result)) = pass_off_loop(maps, Pass::Flush).await else { return };
        maps = back;
        failing = record(&metrics, result, failing).is_none();
    }
}

async fn expiry_loop(mut maps: GcMaps, interval: Interval, metrics: Arc<Metrics>) {
    let mut every = interval.first();
    let mut failing = false;
    loop {
        metrics.conntrack_gc.interval.set(every.as_secs_f64());
        tokio::time::sleep(every).await;
        let Some((back, result)) = pass_off_loop(maps, Pass::Expiry).await else { return };
        maps = back;
        let report = record(&metrics, result, failing);
        failing = report.is_none();
        if let Some(report) = report {
            every = interval.next(every, report.delete_ratio());
        }
    }
}

/// Metrics and logs of one pass. A failure is logged once until a pass succeeds again.
fn record(
    metrics: &Metrics,
    result: Result<PassReport, GcError>,
    failing: bool,
) -> Option<PassReport> {
    let m = &metrics.conntrack_gc;
    match result {
        Ok(r) => {
            m.observe(&r);
            let (service, policy) = (r.service.total(), r.policy.total());
            if r.service.backend_removed > 0 {
                info!(
                    pass = r.pass.as_str(),
                    flows = r.service.backend_removed,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    "conntrack: flushed the UDP entries of removed backends"
                );
            }
            debug!(
                pass = r.pass.as_str(),
                scanned = r.scanned.0 + r.scanned.1,
                service,
                policy,
                elapsed_ms = r.elapsed.as_millis() as u64,
                "conntrack GC pass"
            );
            if failing {
                info!(pass = r.pass.as_str(), "conntrack GC works again");
            }
            Some(r)
        }
        Err(e) => {
            let pass = match &e {
                GcError::Read { pass, .. } | GcError::Map { pass, .. } => *pass,
            };
            m.errors.get_or_create(&PassLabel { pass: pass.into() }).inc();
            if !failing {
                warn!(error = %e, "conntrack GC pass failed; retried on the next trigger");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use nodeplane_common::maps::IPPROTO_UDP;

    use super::*;
    use crate::{
        desired::{Desired, Frontend},
        source::ObjectKey,
        sync::{FakeMaps, Syncer},
    };

    const VIP: [u8; 4] = [10, 96, 0, 10];
    const CLIENT: [u8; 4] = [10, 244, 0, 2];

    fn be(host: u8, proto: u8) -> BackendV4 {
        BackendV4::new([10, 244, 0, host], 5353, proto)
    }

    /// The ORIGINAL and REPLY entries of a flow `client:cport -> VIP:53/proto` on `backend`.
    fn flow(
        cport: u16,
        proto: u8,
        (service_id, backend_id): (u32, u32),
        backend: BackendV4,
        expires_ns: u64,
    ) -> [(CtKeyV4, CtValueV4); 2] {
        let original = CtKeyV4 {
            saddr: CLIENT,
            daddr: VIP,
            sport: cport.to_be_bytes(),
            dport: 53u16.to_be_bytes(),
            proto,
            dir: CT_DIR_ORIGINAL,
            _pad: [0; 2],
        };
        let value = CtValueV4 {
            nat_addr: backend.addr,
            nat_port: backend.port,
            service_id,
            backend_id,
            expires_ns,
            ..Default::default()
        };
        let reply = CtKeyV4 {
            saddr: backend.addr,
            daddr: CLIENT,
            sport: backend.port,
            dport: original.sport,
            dir: CT_DIR_REPLY,
            ..original
        };
        let reply_value = CtValueV4 { nat_addr: VIP, nat_port: original.dport, ..value };
        [(original, value), (reply, reply_value)]
    }

    #[test]
    fn both_entries_of_a_flow_name_the_same_pair_and_the_reply_finds_its_original() {
        let [(ok, ov), (rk, rv)] = flow(40000, IPPROTO_UDP, (2, 7), be(11, IPPROTO_UDP), 5);
        let pair = Pair::of(&ok, &ov);
        assert_eq!(pair, Pair::of(&rk, &rv));
        assert_eq!(pair.frontend, ServiceKeyV4::new(VIP, 53, IPPROTO_UDP));
        assert_eq!((pair.service_id, pair.backend_id), (2, 7));
        assert_eq!((pair.addr, pair.port), ([10, 244, 0, 11], 5353u16.to_be_bytes()));
        assert_eq!(original_of_reply(&rk, &rv), ok);
    }

    #[test]
    fn a_hairpin_reply_finds_its_original_from_its_source() {
        // The pod is its own backend: ORIGINAL pod -> VIP, REPLY pod -> HAIRPIN_ADDR_V4.
        let pod = [10, 244, 0, 11];
        let [(ok, _), (rk, rv)] = flow(40000, IPPROTO_TCP, (2, 7), be(11, IPPROTO_TCP), 5);
        let ok = CtKeyV4 { saddr: pod, ..ok };
        let rk = CtKeyV4 { daddr: nodeplane_common::maps::HAIRPIN_ADDR_V4, ..rk };
        let rv = CtValueV4 { flags: CT_F_HAIRPIN, ..rv };
        assert_eq!(original_of_reply(&rk, &rv), ok);
    }

    fn frontend(backends: Vec<BackendV4>) -> Frontend {
        let service = ObjectKey::namespaced("d", "dns");
        Frontend {
            service,
            port_name: String::new(),
            backends,
            draining: Vec::new(),
            session_affinity: crate::model::SessionAffinity::None,
            no_local_endpoints: false,
            external: None,
        }
    }

    #[test]
    fn programmed_pairs_are_the_slots_of_non_tcp_frontends_below_their_count() {
        let udp = ServiceKeyV4::new(VIP, 53, IPPROTO_UDP);
        let tcp = ServiceKeyV4::new(VIP, 53, IPPROTO_TCP);
        let desired = Desired {
            frontends: [
                (udp, frontend(vec![be(11, IPPROTO_UDP), be(12, IPPROTO_UDP)])),
                (tcp, frontend(vec![be(11, IPPROTO_TCP)])),
            ]
            .into(),
            skipped: Vec::new(),
        };
        let mut maps = FakeMaps::new();
        Syncer::new().apply(&desired, &mut maps).expect("sync");
        let programmed = |maps: &FakeMaps| {
            let backends = maps.backends.iter().map(|(k, v)| (*k, *v)).collect();
            programmed_pairs(
                maps.services.iter().map(|(k, v)| (*k, *v)),
                maps.slots.iter().map(|(k, v)| (*k, *v)),
                &backends,
            )
        };
        let pairs = programmed(&maps);
        let mut got: Vec<_> = pairs.iter().map(|p| (p.frontend, p.addr[3])).collect();
        got.sort();
        assert_eq!(got, [(udp, 11), (udp, 12)], "UDP only, VIP marker and TCP left out");
        let sid = maps.services[&udp].service_id;
        assert!(
            pairs
                .iter()
                .all(|p| p.service_id == sid && maps.backends[&p.backend_id].addr == p.addr)
        );

        // A slot left over above the count (a write that failed half-way) is not programmed.
        let mut value = maps.services[&udp];
        value.backend_count = 1;
        maps.services.insert(udp, value);
        let pairs = programmed(&maps);
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs.iter().next().map(|p| p.addr[3]), Some(11));
    }

    #[test]
    fn a_walk_files_entries_for_the_pass() {
        let now = 1_000;
        let mut found = CtFindings::default();
        let live_udp = flow(1, IPPROTO_UDP, (2, 7), be(11, IPPROTO_UDP), now + 1);
        let dead_tcp = flow(2, IPPROTO_TCP, (1, 3), be(12, IPPROTO_TCP), now);
        for (k, v) in live_udp.iter().chain(&dead_tcp) {
            found.add(k, v, now, Pass::Flush);
        }
        assert_eq!(found.scanned, 4);
        assert_eq!(found.non_tcp.len(), 1, "one pair, both of its entries");
        assert_eq!(found.non_tcp.values().next().map(Vec::len), Some(2));
        assert!(found.expired.is_empty() && found.old_replies.is_empty() && found.live.is_empty());

        let mut found = CtFindings::default();
        for (k, v) in live_udp.iter().chain(&dead_tcp) {
            found.add(k, v, now, Pass::Expiry);
        }
        // `expires_ns == now` is dead, as in the datapath.
        assert_eq!(found.expired, [dead_tcp[0].0]);
        assert_eq!(found.old_replies, [dead_tcp[1]]);
        let (k, v) = live_udp[0];
        assert_eq!(found.live, [(k, v.nat_addr, v.nat_port)].into());
    }

    #[test]
    fn stale_entries_are_those_of_unprogrammed_pairs_originals_first() {
        let a = flow(1, IPPROTO_UDP, (2, 7), be(11, IPPROTO_UDP), 9);
        let b = flow(2, IPPROTO_UDP, (2, 8), be(12, IPPROTO_UDP), 9);
        let c = flow(3, IPPROTO_UDP, (2, 8), be(12, IPPROTO_UDP), 9);
        let mut found = CtFindings::default();
        // Replies first, as a walk may meet them.
        for (k, v) in [a[1], b[1], c[1], a[0], b[0], c[0]] {
            found.add(&k, &v, 0, Pass::Flush);
        }
        let programmed: HashSet<Pair> = [Pair::of(&a[0].0, &a[0].1)].into();
        let stale = found.stale(&programmed);
        let keys: Vec<CtKeyV4> = stale.iter().map(|(_, k)| *k).collect();
        let dirs: Vec<u8> = keys.iter().map(|k| k.dir).collect();
        assert_eq!(dirs, [CT_DIR_ORIGINAL, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_DIR_REPLY]);
        let mut want = vec![b[0].0, c[0].0, b[1].0, c[1].0];
        let mut got = keys.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "the flows of the removed backend, nothing of the programmed one");
        // The same backend id now naming another address is another pair.
        let moved = Pair { addr: [10, 244, 0, 99], ..Pair::of(&a[0].0, &a[0].1) };
        assert_eq!(found.stale(&[moved].into()).len(), 6);
    }

    #[test]
    fn the_interval_adapts_within_bounds_or_stays_fixed() {
        let adaptive = Interval::from_flag(Duration::ZERO);
        assert_eq!(adaptive.first(), Interval::START);
        let s = |n| Duration::from_secs(n);
        assert_eq!(adaptive.next(s(60), 0.0), s(90), "little to do: later");
        assert_eq!(adaptive.next(s(60), 0.1), s(60), "in between: the same");
        assert_eq!(adaptive.next(s(60), 0.5), s(30), "half the table freed: twice as often");
        assert_eq!(adaptive.next(s(60), 1.0), s(10), "at most 10x sooner, and never below MIN");
        assert_eq!(adaptive.next(s(500), 0.0), Interval::MAX);
        let mut every = adaptive.first();
        for _ in 0..50 {
            every = adaptive.next(every, 0.95);
        }
        assert_eq!(every, Interval::MIN);
        let fixed = Interval::from_flag(s(5));
        assert_eq!(
            (fixed.first(), fixed.next(s(5), 0.9), fixed.next(s(5), 0.0)),
            (s(5), s(5), s(5))
        );
    }

    #[test]
    fn nat_entries_live_as_long_as_their_tcp_state_or_their_partner() {
        use nodeplane_common::{
            ct::{NSEC_PER_SEC, TcpState},
            maps::IPPROTO_UDP,
            nat::{NAT_DIR_IN, NAT_DIR_OUT},
        };
        let out = CtKeyV4 {
            saddr: [10, 244, 0, 2],
            daddr: [198, 18, 0, 2],
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            dir: NAT_DIR_OUT,
            _pad: [0; 2],
        };
        let value = |state: TcpState, last_seen_s: u64| NatValueV4 {
            addr: [192, 168, 0, 10],
            port: 61000u16.to_be_bytes(),
            state: state as u8,
            last_seen_ns: last_seen_s * NSEC_PER_SEC,
            ..NatValueV4::default()
        };
        let now = 100_000 * NSEC_PER_SEC;
        let est = value(TcpState::Established, 100_000 - 3600);
        let live = value(TcpState::Established, 100_000 - 1);
        assert!(!nat_dead(&out, &est, now, Some(&live)), "an established flow idle 1 h lives");
        assert!(nat_dead(&out, &est, now, None), "but not once its IN entry is gone");
        let closing = value(TcpState::Closing, 100_000 - 11);
        assert!(nat_dead(&out, &closing, now, Some(&live)), "closed: its port is free after 10 s");
        assert!(nat_dead(&out, &est, now, Some(&closing)), "closed on the other side too");
        let fresh = value(TcpState::Closing, 100_000 - 5);
        assert!(!nat_dead(&out, &fresh, now, None));
        assert!(!nat_dead(&out, &est, now, Some(&fresh)), "closed only 5 s ago");
        let udp = CtKeyV4 { proto: IPPROTO_UDP, ..out };
        assert!(nat_dead(&udp, &value(TcpState::None, 100_000 - 61), now, Some(&live)));
        assert!(!nat_dead(&udp, &value(TcpState::None, 100_000 - 59), now, Some(&live)));
        // The partner keys point at each other.
        let partner = est.partner(&out);
        assert_eq!(partner.dir, NAT_DIR_IN);
        assert_eq!((partner.saddr, partner.daddr), (out.daddr, est.addr));
        let back = NatValueV4 { addr: out.saddr, port: out.sport, ..est };
        assert_eq!(back.partner(&partner), out);
    }

    #[test]
    fn the_delete_ratio_is_the_larger_share_of_a_table() {
        let report = PassReport {
            pass: Pass::Expiry,
            service: Deleted { expired: 10, orphaned: 10, backend_removed: 0 },
            policy: Deleted { expired: 30, ..Deleted::default() },
            nat: Deleted::default(),
            scanned: (0, 0),
            capacity: (100, 100),
            elapsed: Duration::ZERO,
        };
        assert!((report.delete_ratio() - 0.3).abs() < 1e-9);
        let empty = PassReport { capacity: (0, 0), ..report };
        assert_eq!(empty.delete_ratio(), 0.0);
    }

    #[test]
    fn metrics_count_by_table_and_reason() {
        let mut registry = Registry::with_prefix("nodeplane");
        let m = GcMetrics::default();
        m.register(&mut registry);
        m.observe(&PassReport {
            pass: Pass::Flush,
            service: Deleted { backend_removed: 4, ..Deleted::default() },
            policy: Deleted::default(),
            nat: Deleted { orphaned: 2, ..Deleted::default() },
            scanned: (10, 0),
            capacity: (100, 100),
            elapsed: Duration::from_millis(3),
        });
        m.interval.set(60.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "nodeplane_conntrack_gc_deleted_total{table=\"service\",reason=\"backend_removed\"} 4",
            "nodeplane_conntrack_gc_deleted_total{table=\"nat\",reason=\"orphaned\"} 2",
            "nodeplane_conntrack_gc_deleted_total{table=\"policy\",reason=\"expired\"} 0",
            "nodeplane_conntrack_gc_duration_seconds_count{pass=\"flush\"} 1",
            "nodeplane_conntrack_gc_errors_total{pass=\"expiry\"} 0",
            "nodeplane_conntrack_gc_interval_seconds 60.0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
