//! Diff desired frontends against what was written and emit ordered map operations.
//!
//! The [`Syncer`] remembers exactly what it has written (updated after every successful
//! op, so after a failed write it still equals the maps and the next call retries), hands
//! out stable ids, and plans the writes that turn the maps into the [`Desired`] state.
//!
//! # Ids
//!
//! * One service id per frontend key, kept while the frontend exists.
//! * One backend id per distinct [`BackendV4`], shared by every frontend that uses it,
//!   in a slot or as a draining backend ([`Frontend::draining`]: an entry, no slot).
//! * An id is in use while any map entry mentions it (the service entry or its slots; the
//!   backend entry or a slot pointing at it). Ids freed while applying one plan become
//!   reusable only in a later plan, so a plan never reuses an id it is still retiring.
//! * Free ids are reused lowest first, so ids stay dense instead of growing forever.
//!
//! # Order of writes
//!
//! Every prefix of a plan leaves the maps consistent: every frontend entry's slots
//! `0..backend_count` exist and name existing backends, and its VIP has a marker. A packet
//! may see a mix of old and new slots while a frontend changes, never a dangling one.
//!
//! 1. Removed frontends: `DelService`, then their slots (and any orphaned slots).
//! 2. New VIP markers: `PutService` with [`SVC_F_VIP_MARKER`].
//! 3. New backends (draining ones included): `PutBackend`.
//! 4. Each new or changed frontend: `PutSlot` for changed slots `0..new_count`, then
//!    `PutService` with the new count, then `DelSlot` for `new_count..old_count`.
//! 5. Backends no longer referenced by a slot or as a draining backend: `DelBackend`.
//! 6. VIP markers of VIPs without frontends: `DelService`.
//!
//! Unchanged frontends produce no ops, so planning the same desired state twice yields an
//! empty plan.
//!
//! # Capacity
//!
//! The maps are fixed-size hash maps. Before planning, frontends are admitted in key order
//! while the *peak* usage of the plan (old entries are deleted only at steps 5 and 6) fits
//! [`Capacity`]; the first frontend that does not fit and all after it are left out (with
//! a warning), so no write ever hits a full map.
use std::collections::{BTreeMap, BTreeSet};

use nodeplane_common::maps::{
    BackendV4, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS, SVC_F_AFFINITY, SVC_F_DROP_EMPTY,
    SVC_F_ETP_LOCAL, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES, SVC_F_VIP_MARKER, ServiceKeyV4,
    ServiceValue, SlotKey,
};

use crate::desired::{Desired, Frontend, describe};

/// One write to the datapath maps. A plan is a `Vec<Op>` whose every prefix leaves the
/// maps consistent: every `backend_count` of a service has its slots, every slot names an
/// existing backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend { id: u32, backend: BackendV4 },
    PutSlot { key: SlotKey, backend_id: u32 },
    PutService { key: ServiceKeyV4, value: ServiceValue },
    DelService { key: ServiceKeyV4 },
    DelSlot { key: SlotKey },
    DelBackend { id: u32 },
}

/// Where ops go: the kernel maps (`datapath::Maps`) or an in-memory fake.
pub trait MapWriter {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError>;
}

#[derive(Debug, thiserror::Error)]
#[error("{op:?} failed: {reason}")]
pub struct WriteError {
    pub op: Op,
    pub reason: String,
    pub failure: WriteFailure,
}

/// Why a map write failed: the `reason` of `nodeplane_sync_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// The map is full (`E2BIG`, `ENOSPC`; the fakes' capacity).
    MapFull,
    /// An update or delete of a key that is not there (`ENOENT`).
    NoEntry,
    /// Anything else (permissions, a bad key, an injected test failure).
    Other,
}

impl WriteFailure {
    /// Classifies an aya map error by the errno of its syscall.
    pub fn of_map_error(e: &aya::maps::MapError) -> Self {
        match e {
            aya::maps::MapError::SyscallError(s) => match s.io_error.raw_os_error() {
                Some(libc::E2BIG | libc::ENOSPC) => Self::MapFull,
                Some(libc::ENOENT) => Self::NoEntry,
                _ => Self::Other,
            },
            aya::maps::MapError::KeyNotFound => Self::NoEntry,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MapFull => "map_full",
            Self::NoEntry => "no_entry",
            Self::Other => "write_failed",
        }
    }
}

/// Sizes of the service maps, as created by the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends plus VIP markers.
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self { services: MAX_SERVICES, slots: MAX_SLOTS, backends: MAX_BACKENDS }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Ops written by this call.
    pub ops: usize,
    /// Frontends (not VIP markers) in the maps afterwards.
    pub services: usize,
    /// Backends in the maps afterwards.
    pub backends: usize,
    /// Desired frontends left out for lack of capacity.
    pub skipped: usize,
}

/// The value of every VIP marker entry.
pub const VIP_MARKER_VALUE: ServiceValue = ServiceValue {
    service_id: 0,
    backend_count: 0,
    flags: SVC_F_VIP_MARKER,
    affinity_timeout_s: 0,
};

/// The `SERVICES_V4` value of frontend `id` with `count` slots: [`SVC_F_AFFINITY`] and the
/// timeout for `sessionAffinity: ClientIP`, the drop and external flags. A change of any
/// of them changes the value, so the plan rewrites the entry (and only it).
pub fn service_value(id: u32, count: u32, frontend: &Frontend) -> ServiceValue {
    let (mut flags, affinity_timeout_s) = match frontend.session_affinity.timeout_s() {
        Some(t) => (SVC_F_AFFINITY, t),
        None => (0, 0),
    };
    if frontend.no_local_endpoints {
        flags |= SVC_F_DROP_EMPTY;
    }
    if let Some(external) = &frontend.external {
        flags |= SVC_F_EXTERNAL;
        if external.traffic_policy_local {
            flags |= SVC_F_ETP_LOCAL;
        }
        if !external.source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
        }
    }
    ServiceValue { service_id: id, backend_count: count, flags, affinity_timeout_s }
}

/// Plans and applies the service maps; see the module docs.
#[derive(Debug, Default)]
pub struct Syncer {
    realized: Realized,
    capacity: Capacity,
    /// Frontends left out for capacity by the last apply, so the warning is logged once.
    capacity_skipped: BTreeSet<ServiceKeyV4>,
    /// The draining backends of the frontends written, for [`Syncer::apply_changed`].
    draining: Draining,
}

impl Syncer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity: Capacity) -> Self {
        Self { capacity, ..Self::default() }
    }

    /// The `SERVICES_V4` entries written (frontends with their ids, and VIP markers).
    pub fn written_services(&self) -> &BTreeMap<ServiceKeyV4, ServiceValue> {
        &self.realized.services
    }

    /// The non-TCP (frontend, backend) pairs written, as the conntrack flush compares
    /// flows against ([`crate::ctgc::programmed_pairs`]).
    pub fn programmed_pairs(&self) -> std::collections::HashSet<crate::ctgc::Pair> {
        let r = &self.realized;
        let backends = r.backends.iter().map(|(k, v)| (*k, *v)).collect();
        crate::ctgc::programmed_pairs(
            r.services.iter().map(|(k, v)| (*k, *v)),
            r.slots.iter().map(|(k, v)| (*k, *v)),
            &backends,
        )
    }

    /// Takes over maps an earlier agent wrote (pinned, read back at start-up): their entries
    /// become what was written, ids and reference counts included. The next plan keeps
    /// every frontend and backend that is still desired under its id, rewrites only what
    /// differs and deletes only what is no longer desired, also what a run that died
    /// mid-plan left half-written.
    pub fn adopt(
        &mut self,
        services: &BTreeMap<ServiceKeyV4, ServiceValue>,
        slots: &BTreeMap<SlotKey, u32>,
        backends: &BTreeMap<u32, BackendV4>,
    ) {
        let mut realized = Realized::default();
        for (id, backend) in backends {
            realized.record(&Op::PutBackend { id: *id, backend: *backend });
        }
        for (key, backend_id) in slots {
            realized.record(&Op::PutSlot { key: *key, backend_id: *backend_id });
        }
        for (key, value) in services {
            realized.record(&Op::PutService { key: *key, value: *value });
        }
        self.realized = realized;
    }

    /// The ops that would turn what was written into `desired`, in a safe order. Pure: the
    /// realized state only changes in [`Syncer::apply`].
    pub fn plan(&self, desired: &Desired) -> Vec<Op> {
        self.plan_selection(&self.select(desired))
    }

    /// Plans and writes, recording every successful op. On error the realized state still
    /// matches the maps; calling again retries what is left.
    pub fn apply(
        &mut self,
        desired: &Desired,
        w: &mut impl MapWriter,
    ) -> Result<SyncStats, WriteError> {
        let selection = self.select(desired);
        self.log_capacity_skips(desired, &selection.skipped);
        let skipped = selection.skipped.len();
        let ops = self.plan_selection(&selection);
        // Until every op is written the draining bookkeeping may not match the maps: only a
        // full apply may follow.
        self.draining.valid = false;
        for op in &ops {
            w.apply(op)?;
            self.realized.record(op);
        }
        self.draining = Draining::of(selection.frontends.iter().map(|(k, _, f)| (*k, *f)));
        Ok(self.stats(ops.len(), skipped))
    }

    /// [`Syncer::apply`] for a `desired` that differs from what was last applied only in
    /// the backends of the frontends in `changed`: plans those frontends alone, so its cost
    /// does not grow with the number of Services. Writes the same kind of ops in the same
    /// order as a full plan (new backends, then each frontend's slots, count and surplus
    /// slots, then backends nothing uses any more).
    ///
    /// Returns `None`, having written nothing, when that premise does not hold (a frontend
    /// in `changed` is new or gone, frontends are waiting for capacity) or the change might
    /// not fit the maps: the caller then runs the full [`Syncer::apply`].
    pub fn apply_changed(
        &mut self,
        desired: &Desired,
        changed: &BTreeSet<ServiceKeyV4>,
        w: &mut impl MapWriter,
    ) -> Option<Result<SyncStats, WriteError>> {
        let ops = self.plan_changed(desired, changed)?;
        self.draining.valid = false;
        for op in &ops {
            if let Err(e) = w.apply(op) {
                return Some(Err(e));
            }
            self.realized.record(op);
        }
        for key in changed {
            if let Some(frontend) = desired.frontends.get(key) {
                self.draining.set(*key, &frontend.draining);
            }
        }
        self.draining.valid = true;
        Some(Ok(self.stats(ops.len(), 0)))
    }

    fn stats(&self, ops: usize, skipped: usize) -> SyncStats {
        SyncStats {
            ops,
            services: self.realized.services.keys().filter(|k| !k.is_vip_marker()).count(),
            backends: self.realized.backends.len(),
            skipped,
        }
    }

    fn plan_changed(&self, desired: &Desired, changed: &BTreeSet<ServiceKeyV4>) -> Option<Vec<Op>> {
        let r = &self.realized;
        if !self.capacity_skipped.is_empty() || !self.draining.valid {
            return None;
        }
        let mut frontends = Vec::with_capacity(changed.len());
        for key in changed {
            let frontend = desired.frontends.get(key)?;
            let value = r.services.get(key)?;
            frontends.push((*key, value.service_id, frontend));
        }
        // New backends with fresh ids, in frontend order (as a full plan assigns them).
        let mut fresh = r.backend_ids.fresh();
        let mut ids: BTreeMap<BackendV4, u32> = BTreeMap::new();
        let mut new_backends = Vec::new();
        for (_, _, frontend) in &frontends {
            for b in frontend.backends.iter().chain(&frontend.draining) {
                if let Some(id) = r.backend_by_value.get(b) {
                    ids.insert(*b, *id);
                } else if !ids.contains_key(b) {
                    let id = fresh.next()?;
                    ids.insert(*b, id);
                    new_backends.push((id, *b));
                }
            }
        }
        let grown_slots: usize = frontends
            .iter()
            .map(|(_, id, f)| f.backends.len().saturating_sub(r.slot_count(*id)))
            .sum();
        if r.backends.len() + new_backends.len() > self.capacity.backends as usize
            || r.slots.len() + grown_slots > self.capacity.slots as usize
        {
            return None;
        }

        let mut ops: Vec<Op> = new_backends
            .iter()
            .map(|(id, backend)| Op::PutBackend { id: *id, backend: *backend })
            .collect();
        for (key, service_id, frontend) in &frontends {
            r.frontend_ops(*key, *service_id, frontend, &ids, &mut ops);
        }
        // Slot references each backend gains (+) or loses (-) in this plan.
        let mut delta: BTreeMap<u32, i64> = BTreeMap::new();
        for op in &ops {
            let (gained, slot) = match op {
                Op::PutSlot { key, backend_id } => (Some(*backend_id), key),
                Op::DelSlot { key } => (None, key),
                _ => continue,
            };
            if let Some(id) = gained {
                *delta.entry(id).or_default() += 1;
            }
            if let Some(lost) = r.slots.get(slot) {
                *delta.entry(*lost).or_default() -= 1;
            }
        }
        // Frontends draining each backend once the changed ones are written.
        let mut draining = self.draining.refs.clone();
        for (key, _, frontend) in &frontends {
            for b in self.draining.of.get(key).into_iter().flatten() {
                *draining.entry(*b).or_default() -= 1;
                // A backend only this frontend drained may lose its last reference.
                if let Some(id) = r.backend_by_value.get(b) {
                    delta.entry(*id).or_default();
                }
            }
            for b in &frontend.draining {
                *draining.entry(*b).or_default() += 1;
            }
        }
        // A backend's references are its own entry plus the slots naming it: one left means
        // no slot does. It goes unless some frontend drains it.
        for (id, d) in delta {
            let Some(backend) = r.backends.get(&id) else { continue };
            let drained = draining.get(backend).is_some_and(|n| *n > 0);
            if d <= 0 && i64::from(r.backend_ids.refs(id)) + d <= 1 && !drained {
                ops.push(Op::DelBackend { id });
            }
        }
        Some(ops)
    }

    fn log_capacity_skips(&mut self, desired: &Desired, skipped: &[ServiceKeyV4]) {
        let now: BTreeSet<ServiceKeyV4> = skipped.iter().copied().collect();
        for key in now.difference(&self.capacity_skipped) {
            let service =
                desired.frontends.get(key).map(|f| f.service.to_string()).unwrap_or_default();
            tracing::warn!(
                service = %service,
                frontend = %describe(key),
                "service maps full: frontend not programmed",
            );
        }
        if now.is_empty() && !self.capacity_skipped.is_empty() {
            tracing::info!("service maps have room again: every frontend is programmed");
        }
        self.capacity_skipped = now;
    }

    /// Admits frontends in key order while the plan's peak usage fits, and assigns ids.
    fn select<'d>(&self, desired: &'d Desired) -> Selection<'d> {
        let r = &self.realized;
        let cap = self.capacity;
        let mut service_ids = r.service_ids.fresh();
        let mut backend_ids = r.backend_ids.fresh();
        let mut sel = Selection::default();
        // Peak usage: realized entries that are only deleted late stay counted.
        let mut vips: BTreeSet<[u8; 4]> =
            r.services.keys().filter(|k| k.is_vip_marker()).map(|k| k.addr).collect();
        let mut frontends = 0u64;
        let mut slots = 0u64;

        let mut candidates = desired.frontends.iter();
        for (key, frontend) in candidates.by_ref() {
            if key.is_vip_marker() {
                // Port 0 never passes the index; a marker key is not a frontend.
                sel.skipped.push(*key);
                continue;
            }
            let existing_id = r.services.get(key).map(|v| v.service_id);
            let frontend_slots =
                existing_id.map_or(0, |id| r.slot_count(id)).max(frontend.backends.len());
            let mut new_backends: Vec<BackendV4> = Vec::new();
            for b in frontend.backends.iter().chain(&frontend.draining) {
                if !r.backend_by_value.contains_key(b)
                    && !sel.backend_id.contains_key(b)
                    && !new_backends.contains(b)
                {
                    new_backends.push(*b);
                }
            }
            let services_peak =
                frontends + 1 + vips.len() as u64 + u64::from(!vips.contains(&key.addr));
            let backends_peak =
                (r.backends.len() + sel.new_backends.len() + new_backends.len()) as u64;
            let fits = services_peak <= u64::from(cap.services)
                && slots + frontend_slots as u64 <= u64::from(cap.slots)
                && backends_peak <= u64::from(cap.backends);
            if !fits {
                sel.skipped.push(*key);
                break;
            }
            // Ids cannot run out below the capacities, but do not trust that with an unwrap.
            let id = existing_id.or_else(|| service_ids.next());
            let fresh: Option<Vec<(u32, BackendV4)>> =
                new_backends.iter().map(|b| backend_ids.next().map(|id| (id, *b))).collect();
            let (Some(id), Some(fresh)) = (id, fresh) else {
                sel.skipped.push(*key);
                break;
            };
            for (bid, b) in fresh {
                sel.backend_id.insert(b, bid);
                sel.new_backends.push((bid, b));
            }
            for b in frontend.backends.iter().chain(&frontend.draining) {
                if let Some(bid) = r.backend_by_value.get(b) {
                    sel.backend_id.entry(*b).or_insert(*bid);
                }
            }
            frontends += 1;
            if frontend.external.is_none() {
                vips.insert(key.addr);
            }
            slots += frontend_slots as u64;
            sel.frontends.push((*key, id, frontend));
        }
        // The first frontend that did not fit pushes out every later one.
        sel.skipped.extend(candidates.map(|(k, _)| *k));
        sel
    }

    fn plan_selection(&self, sel: &Selection<'_>) -> Vec<Op> {
        let r = &self.realized;
        let mut ops = Vec::new();
        let keep: BTreeSet<&ServiceKeyV4> = sel.frontends.iter().map(|(k, _, _)| k).collect();
        // External frontends (a node IP, LoadBalancer and external IPs) get no marker: the
        // address is not the Service's alone, other protocols to it must pass.
        let vips: BTreeSet<[u8; 4]> = sel
            .frontends
            .iter()
            .filter(|(_, _, f)| f.external.is_none())
            .map(|(k, _, _)| k.addr)
            .collect();

        // 1. Removed frontends, then their slots; then slots no frontend owns (left by a
        //    write that failed between a DelService and its DelSlots).
        let mut owned: BTreeSet<u32> = BTreeSet::new();
        for (key, value) in r.services.iter().filter(|(k, _)| !k.is_vip_marker()) {
            owned.insert(value.service_id);
            if !keep.contains(key) {
                ops.push(Op::DelService { key: *key });
                ops.extend(r.slots_of(value.service_id).map(|key| Op::DelSlot { key }));
            }
        }
        ops.extend(
            r.slots
                .keys()
                .filter(|k| !owned.contains(&k.service_id))
                .map(|key| Op::DelSlot { key: *key }),
        );

        // 2. Markers for new VIPs, before their first frontend.
        for vip in &vips {
            let key = ServiceKeyV4::vip_marker(*vip);
            if r.services.get(&key) != Some(&VIP_MARKER_VALUE) {
                ops.push(Op::PutService { key, value: VIP_MARKER_VALUE });
            }
        }

        // 3. New backends, before any slot names them.
        ops.extend(
            sel.new_backends
                .iter()
                .map(|(id, backend)| Op::PutBackend { id: *id, backend: *backend }),
        );

        // 4. New and changed frontends: slots, count, surplus slots.
        for (key, id, frontend) in &sel.frontends {
            r.frontend_ops(*key, *id, frontend, &sel.backend_id, &mut ops);
        }

        // 5. Backends nothing points at any more.
        for (id, backend) in &r.backends {
            if sel.backend_id.get(backend) != Some(id) {
                ops.push(Op::DelBackend { id: *id });
            }
        }

        // 6. Markers of VIPs that lost their last frontend.
        for key in r.services.keys().filter(|k| k.is_vip_marker() && !vips.contains(&k.addr)) {
            ops.push(Op::DelService { key: *key });
        }
        ops
    }
}

/// Which frontends drain which backends ([`Frontend::draining`]) as last written: what the
/// incremental plan needs to know before deleting a backend that lost its last slot.
#[derive(Debug, Default)]
struct Draining {
    /// Non-empty draining lists by frontend.
    of: BTreeMap<ServiceKeyV4, Vec<BackendV4>>,
    /// Frontends draining each backend.
    refs: BTreeMap<BackendV4, i64>,
    /// False from the start of a write until it completes: after a failed write only a
    /// full apply (which rebuilds this) may follow.
    valid: bool,
}

impl Draining {
    fn of<'a>(frontends: impl Iterator<Item = (ServiceKeyV4, &'a Frontend)>) -> Self {
        let mut d = Self { valid: true, ..Self::default() };
        for (key, frontend) in frontends {
            d.set(key, &frontend.draining);
        }
        d
    }

    fn set(&mut self, key: ServiceKeyV4, draining: &[BackendV4]) {
        for b in self.of.remove(&key).into_iter().flatten() {
            if let Some(n) = self.refs.get_mut(&b) {
                *n -= 1;
                if *n <= 0 {
                    self.refs.remove(&b);
                }
            }
        }
        if !draining.is_empty() {
            for b in draining {
                *self.refs.entry(*b).or_default() += 1;
            }
            self.of.insert(key, draining.to_vec());
        }
    }
}

/// The frontends a plan programs, with their ids.
#[derive(Debug, Default)]
struct Selection<'d> {
    frontends: Vec<(ServiceKeyV4, u32, &'d Frontend)>,
    /// Id of every backend the selected frontends use.
    backend_id: BTreeMap<BackendV4, u32>,
    /// Backends not in the maps yet, with fresh ids.
    new_backends: Vec<(u32, BackendV4)>,
    /// Left out for capacity, in key order.
    skipped: Vec<ServiceKeyV4>,
}

/// What has been written, op by op, plus the id bookkeeping derived from it.
#[derive(Debug, Default)]
struct Realized {
    services: BTreeMap<ServiceKeyV4, ServiceValue>,
    slots: BTreeMap<SlotKey, u32>,
    backends: BTreeMap<u32, BackendV4>,
    backend_by_value: BTreeMap<BackendV4, u32>,
    service_ids: Ids,
    backend_ids: Ids,
}

impl Realized {
    fn slots_of(&self, service_id: u32) -> impl Iterator<Item = SlotKey> + '_ {
        let from = SlotKey { service_id, slot: 0 };
        let to = SlotKey { service_id, slot: u32::MAX };
        self.slots.range(from..=to).map(|(k, _)| *k)
    }

    fn slot_count(&self, service_id: u32) -> usize {
        self.slots_of(service_id).count()
    }

    /// Step 4 for one frontend with service id `id`: its changed slots, then its entry with
    /// the new count, then its surplus slots. `ids` names every backend it uses.
    fn frontend_ops(
        &self,
        key: ServiceKeyV4,
        id: u32,
        frontend: &Frontend,
        ids: &BTreeMap<BackendV4, u32>,
        ops: &mut Vec<Op>,
    ) {
        let count = frontend.backends.len() as u32;
        for (slot, backend) in (0..).zip(&frontend.backends) {
            let Some(backend_id) = ids.get(backend).copied() else {
                continue; // unreachable: every backend was given an id before planning
            };
            let key = SlotKey { service_id: id, slot };
            if self.slots.get(&key) != Some(&backend_id) {
                ops.push(Op::PutSlot { key, backend_id });
            }
        }
        let value = service_value(id, count, frontend);
        if self.services.get(&key) != Some(&value) {
            ops.push(Op::PutService { key, value });
        }
        ops.extend(self.slots_of(id).filter(|k| k.slot >= count).map(|key| Op::DelSlot { key }));
    }

    /// Mirrors one successful write, keeping id reference counts.
    fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, backend } => {
                match self.backends.insert(*id, *backend) {
                    Some(old) => {
                        if self.backend_by_value.get(&old) == Some(id) {
                            self.backend_by_value.remove(&old);
                        }
                    }
                    None => self.backend_ids.acquire(*id),
                }
                self.backend_by_value.entry(*backend).or_insert(*id);
            }
            Op::DelBackend { id } => {
                if let Some(old) = self.backends.remove(id) {
                    self.backend_ids.release(*id);
                    if self.backend_by_value.get(&old) == Some(id) {
                        self.backend_by_value.remove(&old);
                    }
                }
            }
            Op::PutSlot { key, backend_id } => {
                match self.slots.insert(*key, *backend_id) {
                    Some(old) => self.backend_ids.release(old),
                    None => self.service_ids.acquire(key.service_id),
                }
                self.backend_ids.acquire(*backend_id);
            }
            Op::DelSlot { key } => {
                if let Some(old) = self.slots.remove(key) {
                    self.service_ids.release(key.service_id);
                    self.backend_ids.release(old);
                }
            }
            Op::PutService { key, value } => {
                if let Some(old) = self.services.insert(*key, *value) {
                    self.service_ids.release(old.service_id);
                }
                self.service_ids.acquire(value.service_id);
            }
            Op::DelService { key } => {
                if let Some(old) = self.services.remove(key) {
                    self.service_ids.release(old.service_id);
                }
            }
        }
    }
}

/// A reference-counted id allocator: ids start at 1 (0 means "none" in the maps), an id
/// with no references is free, and the lowest free id is handed out first.
#[derive(Clone, Debug)]
struct Ids {
    refs: BTreeMap<u32, u32>,
    /// Free ids below `next`.
    free: BTreeSet<u32>,
    /// Every id from here on is free.
    next: u64,
}

impl Default for Ids {
    fn default() -> Self {
        Self { refs: BTreeMap::new(), free: BTreeSet::new(), next: 1 }
    }
}

impl Ids {
    fn acquire(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        let refs = self.refs.entry(id).or_insert(0);
        *refs += 1;
        if *refs > 1 {
            return;
        }
        let id64 = u64::from(id);
        if id64 >= self.next {
            self.free.extend((self.next..id64).filter_map(|i| u32::try_from(i).ok()));
            self.next = id64 + 1;
        } else {
            self.free.remove(&id);
        }
    }

    fn release(&mut self, id: u32) {
        let Some(refs) = self.refs.get_mut(&id) else {
            return;
        };
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        self.refs.remove(&id);
        self.free.insert(id);
        // Keep `free` small: give the top of the range back to `next`.
        while let Some(last) = self.free.last().copied() {
            if u64::from(last) + 1 != self.next {
                break;
            }
            self.free.remove(&last);
            self.next -= 1;
        }
    }

    /// References to `id` (0 if unused).
    fn refs(&self, id: u32) -> u32 {
        self.refs.get(&id).copied().unwrap_or(0)
    }

    /// Ids free right now, lowest first. Not consumed: a plan takes from it without
    /// changing the allocator, which only learns about ids as writes succeed.
    fn fresh(&self) -> impl Iterator<Item = u32> + '_ {
        let top = (self.next..=u64::from(u32::MAX)).filter_map(|i| u32::try_from(i).ok());
        self.free.iter().copied().chain(top)
    }
}

/// The service maps in memory, for tests here and elsewhere.
///
/// Behaves like the kernel maps where it matters: inserting a new key into a full map
/// fails, deleting a missing key fails.
#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKeyV4, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, BackendV4>,
    /// Inject one failure: the write after this many successful writes (counted in
    /// `writes`) fails, and the knob resets to `None`.
    pub fail_after: Option<usize>,
    pub capacity: Capacity,
    /// Successful writes so far.
    pub writes: usize,
    /// The policy maps, so one fake stands for the whole datapath.
    pub policy: crate::policy::sync::FakePolicyMaps,
}

impl crate::policy::PolicyWriter for FakeMaps {
    fn apply_policy(
        &mut self,
        op: &crate::policy::PolicyOp,
    ) -> Result<(), crate::policy::PolicyWriteError> {
        self.policy.apply_policy(op)
    }
}

impl FakeMaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every frontend entry's slots `0..backend_count` exist and name existing backends;
    /// frontend ids are unique; every frontend's VIP has a marker; markers look like one.
    pub fn check_consistent(&self) -> Result<(), String> {
        let mut ids: BTreeMap<u32, &ServiceKeyV4> = BTreeMap::new();
        for (key, value) in &self.services {
            if key.is_vip_marker() {
                if *value != VIP_MARKER_VALUE {
                    return Err(format!("marker {key:?} has value {value:?}"));
                }
                continue;
            }
            if value.service_id == 0 || value.flags & SVC_F_VIP_MARKER != 0 {
                return Err(format!("frontend {key:?} has value {value:?}"));
            }
            if let Some(other) = ids.insert(value.service_id, key) {
                return Err(format!("{key:?} and {other:?} share service id {}", value.service_id));
            }
            // External frontends (node IPs, LB and external IPs) have none, on purpose.
            if value.flags & SVC_F_EXTERNAL == 0
                && !self.services.contains_key(&ServiceKeyV4::vip_marker(key.addr))
            {
                return Err(format!("frontend {key:?} has no VIP marker"));
            }
            for slot in 0..value.backend_count {
                let slot_key = SlotKey { service_id: value.service_id, slot };
                let Some(backend_id) = self.slots.get(&slot_key) else {
                    return Err(format!(
                        "frontend {key:?} count {} but no {slot_key:?}",
                        value.backend_count
                    ));
                };
                if !self.backends.contains_key(backend_id) {
                    return Err(format!(
                        "{slot_key:?} of {key:?} names missing backend {backend_id}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every frontend with its backends resolved through the slots (missing ones left out).
    pub fn frontends(&self) -> BTreeMap<ServiceKeyV4, Vec<BackendV4>> {
        self.services
            .iter()
            .filter(|(k, _)| !k.is_vip_marker())
            .map(|(k, v)| {
                let backends = (0..v.backend_count)
                    .filter_map(|slot| self.slots.get(&SlotKey { service_id: v.service_id, slot }))
                    .filter_map(|id| self.backends.get(id).copied())
                    .collect();
                (*k, backends)
            })
            .collect()
    }

    /// The maps hold exactly what `desired` implies, and nothing else (ids aside).
    pub fn check_matches(&self, desired: &Desired) -> Result<(), String> {
        self.check_consistent()?;
        let want: BTreeMap<ServiceKeyV4, Vec<BackendV4>> =
            desired.frontends.iter().map(|(k, f)| (*k, f.backends.clone())).collect();
        let got = self.frontends();
        if got != want {
            return Err(format!("frontends differ:\n got  {got:?}\n want {want:?}"));
        }
        for (key, frontend) in &desired.frontends {
            let value = self.services.get(key).map(|v| (v.flags, v.affinity_timeout_s));
            let want = service_value(0, 0, frontend);
            if value != Some((want.flags, want.affinity_timeout_s)) {
                return Err(format!("frontend {key:?}: affinity {value:?}, want {want:?}"));
            }
        }
        let want_vips: BTreeSet<[u8; 4]> = desired
            .frontends
            .iter()
            .filter(|(_, f)| f.external.is_none())
            .map(|(k, _)| k.addr)
            .collect();
        let got_vips: BTreeSet<[u8; 4]> =
            self.services.keys().filter(|k| k.is_vip_marker()).map(|k| k.addr).collect();
        if got_vips != want_vips {
            return Err(format!("VIP markers differ: got {got_vips:?}, want {want_vips:?}"));
        }
        let want_slots: usize = want.values().map(Vec::len).sum();
        if self.slots.len() != want_slots {
            return Err(format!("{} slots, want {want_slots}", self.slots.len()));
        }
        let draining = desired.frontends.values().flat_map(|f| &f.draining);
        let want_backends: BTreeSet<&BackendV4> = want.values().flatten().chain(draining).collect();
        let got_backends: Vec<&BackendV4> = self.backends.values().collect();
        if got_backends.len() != want_backends.len()
            || got_backends.iter().any(|b| !want_backends.contains(b))
        {
            return Err(format!("backends {got_backends:?}, want {want_backends:?}"));
        }
        Ok(())
    }

    fn write(&mut self, op: &Op) -> Result<(), String> {
        fn full(len: usize, cap: u32) -> Result<(), String> {
            if len >= cap as usize { Err(format!("map full ({cap} entries)")) } else { Ok(()) }
        }
        fn missing<T>(removed: Option<T>) -> Result<(), String> {
            removed.map(|_| ()).ok_or_else(|| "no such key".to_string())
        }
        match op {
            Op::PutBackend { id, backend } => {
                if !self.backends.contains_key(id) {
                    full(self.backends.len(), self.capacity.backends)?;
                }
                self.backends.insert(*id, *backend);
            }
            Op::PutSlot { key, backend_id } => {
                if !self.slots.contains_key(key) {
                    full(self.slots.len(), self.capacity.slots)?;
                }
                self.slots.insert(*key, *backend_id);
            }
            Op::PutService { key, value } => {
                if !self.services.contains_key(key) {
                    full(self.services.len(), self.capacity.services)?;
                }
                self.services.insert(*key, *value);
            }
            Op::DelService { key } => missing(self.services.remove(key))?,
            Op::DelSlot { key } => missing(self.slots.remove(key))?,
            Op::DelBackend { id } => missing(self.backends.remove(id))?,
        }
        Ok(())
    }
}

/// The fakes' error texts ("map full (N entries)", "... not in the map").
pub(crate) fn fake_failure(reason: &str) -> WriteFailure {
    if reason.starts_with("map full") {
        WriteFailure::MapFull
    } else if reason == "no such key" {
        WriteFailure::NoEntry
    } else {
        WriteFailure::Other
    }
}

impl MapWriter for FakeMaps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        if let Some(n) = self.fail_after
            && self.writes >= n
        {
            self.fail_after = None;
            return Err(WriteError {
                op: op.clone(),
                reason: "injected failure".to_string(),
                failure: WriteFailure::Other,
            });
        }
        self.write(op).map_err(|reason| WriteError {
            op: op.clone(),
            failure: fake_failure(&reason),
            reason,
        })?;
        self.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use nodeplane_common::maps::{IPPROTO_TCP, IPPROTO_UDP};
    use proptest::prelude::*;

    use super::*;
    use crate::{model::SessionAffinity, source::ObjectKey};

    fn fe(vip: u8, port: u16) -> ServiceKeyV4 {
        ServiceKeyV4::new([10, 96, 0, vip], port, IPPROTO_TCP)
    }

    fn be(host: u8) -> BackendV4 {
        BackendV4::new([10, 0, 0, host], 8080, IPPROTO_TCP)
    }

    /// A desired state from `(vip, port, backend hosts)`.
    fn desired(frontends: &[(u8, u16, &[u8])]) -> Desired {
        let frontends = frontends
            .iter()
            .map(|(vip, port, hosts)| {
                let mut backends: Vec<_> = hosts.iter().map(|h| be(*h)).collect();
                backends.sort();
                backends.dedup();
                let frontend = Frontend {
                    service: ObjectKey::namespaced("default", format!("svc{vip}")),
                    port_name: String::new(),
                    backends,
                    draining: Vec::new(),
                    session_affinity: SessionAffinity::None,
                    no_local_endpoints: false,
                    external: None,
                };
                (fe(*vip, *port), frontend)
            })
            .collect();
        Desired { frontends, skipped: Vec::new() }
    }

    /// Applies the ops of `apply` and checks the maps after every single one.
    struct Checked<'a>(&'a mut FakeMaps);

    impl MapWriter for Checked<'_> {
        fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
            self.0.apply(op)?;
            if let Err(e) = self.0.check_consistent() {
                panic!("inconsistent after {op:?}: {e}\n{:?}", self.0);
            }
            Ok(())
        }
    }

    fn sync(syncer: &mut Syncer, maps: &mut FakeMaps, d: &Desired) -> SyncStats {
        let stats = syncer.apply(d, &mut Checked(maps)).expect("apply");
        maps.check_matches(d).expect("maps match desired");
        assert_realized_is_maps(syncer, maps);
        stats
    }

    fn assert_realized_is_maps(syncer: &Syncer, maps: &FakeMaps) {
        assert_eq!(syncer.realized.services, maps.services);
        assert_eq!(syncer.realized.slots, maps.slots);
        assert_eq!(syncer.realized.backends, maps.backends);
    }

    fn service_id(maps: &FakeMaps, key: ServiceKeyV4) -> u32 {
        maps.services.get(&key).expect("frontend in maps").service_id
    }

    fn backend_id(maps: &FakeMaps, b: BackendV4) -> u32 {
        maps.backends.iter().find(|(_, v)| **v == b).map(|(id, _)| *id).expect("backend in maps")
    }

    /// Op kinds in order, for asserting the ordering rules.
    fn shape(ops: &[Op]) -> Vec<&'static str> {
        ops.iter()
            .map(|op| match op {
                Op::PutBackend { .. } => "PutBackend",
                Op::PutSlot { .. } => "PutSlot",
                Op::PutService { key, .. } if key.is_vip_marker() => "PutMarker",
                Op::PutService { .. } => "PutService",
                Op::DelService { key } if key.is_vip_marker() => "DelMarker",
                Op::DelService { .. } => "DelService",
                Op::DelSlot { .. } => "DelSlot",
                Op::DelBackend { .. } => "DelBackend",
            })
            .collect()
    }

    #[test]
    fn add_writes_marker_backends_slots_then_service() {
        let syncer = Syncer::new();
        let ops = syncer.plan(&desired(&[(1, 80, &[2, 1])]));
        assert_eq!(
            shape(&ops),
            ["PutMarker", "PutBackend", "PutBackend", "PutSlot", "PutSlot", "PutService"]
        );
        assert_eq!(ops[1], Op::PutBackend { id: 1, backend: be(1) }, "sorted, ids from 1");
        assert_eq!(
            ops[5],
            Op::PutService {
                key: fe(1, 80),
                value: ServiceValue {
                    service_id: 1,
                    backend_count: 2,
                    flags: 0,
                    affinity_timeout_s: 0
                }
            }
        );
    }

    #[test]
    fn session_affinity_is_written_into_the_service_entry_and_a_change_rewrites_only_it() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        let mut d = desired(&[(1, 80, &[1, 2])]);
        let with = |d: &mut Desired, affinity| {
            for f in d.frontends.values_mut() {
                f.session_affinity = affinity;
            }
        };
        with(&mut d, SessionAffinity::ClientIp { timeout_s: 30 });
        sync(&mut syncer, &mut maps, &d);
        let value = ServiceValue {
            service_id: 1,
            backend_count: 2,
            flags: SVC_F_AFFINITY,
            affinity_timeout_s: 30,
        };
        assert_eq!(maps.services.get(&fe(1, 80)), Some(&value));

        for (affinity, flags, timeout) in [
            (SessionAffinity::ClientIp { timeout_s: 86_400 }, SVC_F_AFFINITY, 86_400),
            (SessionAffinity::None, 0, 0),
            (SessionAffinity::ClientIp { timeout_s: 1 }, SVC_F_AFFINITY, 1),
        ] {
            with(&mut d, affinity);
            let value = ServiceValue { flags, affinity_timeout_s: timeout, ..value };
            assert_eq!(
                syncer.plan(&d),
                [Op::PutService { key: fe(1, 80), value }],
                "{affinity:?}: the entry alone is rewritten"
            );
            sync(&mut syncer, &mut maps, &d);
            assert_eq!(maps.services.get(&fe(1, 80)), Some(&value));
            assert!(syncer.plan(&d).is_empty());
        }
    }

    #[test]
    fn second_plan_is_empty() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        let d = desired(&[(1, 80, &[1, 2]), (1, 443, &[2, 3]), (2, 53, &[])]);
        let stats = sync(&mut syncer, &mut maps, &d);
        assert_eq!(stats.services, 3);
        assert_eq!(stats.backends, 3, "backend 2 is shared");
        assert!(syncer.plan(&d).is_empty());
        assert_eq!(sync(&mut syncer, &mut maps, &d).ops, 0);
    }

    #[test]
    fn grow_writes_slots_before_count() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1])]));
        let ops = syncer.plan(&desired(&[(1, 80, &[1, 2, 3])]));
        assert_eq!(shape(&ops), ["PutBackend", "PutBackend", "PutSlot", "PutSlot", "PutService"]);
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2, 3])]));
    }

    #[test]
    fn shrink_writes_count_before_dropping_slots_and_backends() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2, 3])]));
        let ops = syncer.plan(&desired(&[(1, 80, &[1])]));
        assert_eq!(shape(&ops), ["PutService", "DelSlot", "DelSlot", "DelBackend", "DelBackend"]);
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1])]));
    }

    #[test]
    fn change_rewrites_only_changed_slots() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2])]));
        let ops = syncer.plan(&desired(&[(1, 80, &[1, 3])]));
        assert_eq!(shape(&ops), ["PutBackend", "PutSlot", "DelBackend"], "{ops:?}");
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 3])]));
    }

    #[test]
    fn remove_deletes_service_then_slots_then_backends_then_marker() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2]), (2, 80, &[3])]));
        let ops = syncer.plan(&desired(&[(2, 80, &[3])]));
        assert_eq!(
            shape(&ops),
            ["DelService", "DelSlot", "DelSlot", "DelBackend", "DelBackend", "DelMarker"]
        );
        sync(&mut syncer, &mut maps, &desired(&[(2, 80, &[3])]));
        sync(&mut syncer, &mut maps, &Desired::default());
        assert!(maps.services.is_empty() && maps.slots.is_empty() && maps.backends.is_empty());
    }

    /// `desired` with `draining` hosts on frontend `(vip, port)`.
    fn draining(mut d: Desired, vip: u8, port: u16, hosts: &[u8]) -> Desired {
        let frontend = d.frontends.get_mut(&fe(vip, port)).expect("the frontend");
        frontend.draining = hosts.iter().map(|h| be(*h)).collect();
        d
    }

    #[test]
    fn a_draining_backend_keeps_its_entry_and_id_without_a_slot() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2])]));
        let id2 = backend_id(&maps, be(2));
        // 2 stops getting new flows but is still listed: no slot, same entry.
        let d = draining(desired(&[(1, 80, &[1])]), 1, 80, &[2]);
        let ops = syncer.plan(&d);
        assert_eq!(shape(&ops), ["PutService", "DelSlot"], "{ops:?}");
        sync(&mut syncer, &mut maps, &d);
        assert_eq!(backend_id(&maps, be(2)), id2);
        assert_eq!(maps.frontends()[&fe(1, 80)], vec![be(1)]);
        // A new endpoint listed but not ready gets an entry, no slot.
        let d = draining(desired(&[(1, 80, &[1])]), 1, 80, &[2, 3]);
        assert_eq!(shape(&syncer.plan(&d)), ["PutBackend"]);
        sync(&mut syncer, &mut maps, &d);
        // Gone from the slices: the entries go.
        let d = desired(&[(1, 80, &[1])]);
        assert_eq!(shape(&syncer.plan(&d)), ["DelBackend", "DelBackend"]);
        sync(&mut syncer, &mut maps, &d);
        assert_eq!(maps.backends.len(), 1);
    }

    #[test]
    fn the_incremental_plan_keeps_draining_backends_as_the_full_one_does() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        // Frontend 2 drains backend 3; frontend 1 uses it in a slot.
        let start = draining(desired(&[(1, 80, &[1, 3]), (2, 80, &[4])]), 2, 80, &[3]);
        sync(&mut syncer, &mut maps, &start);
        let changed: BTreeSet<_> = [fe(1, 80)].into();
        // 3 leaves frontend 1: frontend 2 still drains it, so it stays.
        let d = draining(desired(&[(1, 80, &[1]), (2, 80, &[4])]), 2, 80, &[3]);
        let stats = syncer.apply_changed(&d, &changed, &mut Checked(&mut maps));
        assert!(stats.expect("incremental").is_ok());
        maps.check_matches(&d).expect("as a full plan");
        assert!(syncer.plan(&d).is_empty());
        // Frontend 1 drains 1 instead of using it, then nothing: 1 goes last.
        let d = draining(desired(&[(1, 80, &[]), (2, 80, &[4])]), 2, 80, &[3]);
        let d = draining(d, 1, 80, &[1]);
        syncer.apply_changed(&d, &changed, &mut Checked(&mut maps)).expect("plan").expect("apply");
        maps.check_matches(&d).expect("1 drains");
        let d = draining(desired(&[(1, 80, &[]), (2, 80, &[4])]), 2, 80, &[3]);
        syncer.apply_changed(&d, &changed, &mut Checked(&mut maps)).expect("plan").expect("apply");
        maps.check_matches(&d).expect("1 is gone");
        assert!(syncer.plan(&d).is_empty());
    }

    #[test]
    fn marker_stays_while_any_frontend_uses_the_vip() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1]), (1, 443, &[1])]));
        let ops = syncer.plan(&desired(&[(1, 443, &[1])]));
        assert_eq!(shape(&ops), ["DelService", "DelSlot"]);
        sync(&mut syncer, &mut maps, &desired(&[(1, 443, &[1])]));
        assert_eq!(
            maps.services.get(&ServiceKeyV4::vip_marker([10, 96, 0, 1])),
            Some(&VIP_MARKER_VALUE)
        );
    }

    #[test]
    fn ids_are_stable_while_things_exist() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[5]), (2, 80, &[6])]));
        let (svc2, be6) = (service_id(&maps, fe(2, 80)), backend_id(&maps, be(6)));
        // Removing an earlier frontend and backend does not renumber the others.
        sync(&mut syncer, &mut maps, &desired(&[(2, 80, &[6, 7])]));
        assert_eq!(service_id(&maps, fe(2, 80)), svc2);
        assert_eq!(backend_id(&maps, be(6)), be6);
    }

    #[test]
    fn freed_ids_are_reused_only_by_a_later_plan() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1]), (2, 80, &[2])]));
        assert_eq!(service_id(&maps, fe(1, 80)), 1);
        assert_eq!(backend_id(&maps, be(1)), 1);

        // Same plan retires frontend 1 / backend 1 and adds new ones: no id 1 for them.
        let d = desired(&[(2, 80, &[2]), (3, 80, &[3])]);
        let ops = syncer.plan(&d);
        assert!(ops.contains(&Op::PutBackend { id: 3, backend: be(3) }), "{ops:?}");
        sync(&mut syncer, &mut maps, &d);
        assert_eq!(service_id(&maps, fe(3, 80)), 3);

        // The next plan reuses the lowest freed ids.
        sync(&mut syncer, &mut maps, &desired(&[(2, 80, &[2]), (3, 80, &[3]), (4, 80, &[4])]));
        assert_eq!(service_id(&maps, fe(4, 80)), 1);
        assert_eq!(backend_id(&maps, be(4)), 1);
    }

    #[test]
    fn ids_do_not_grow_forever() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        for round in 0..50u8 {
            let host = round % 7;
            sync(&mut syncer, &mut maps, &desired(&[(round % 3, 80, &[host, host + 1])]));
            sync(&mut syncer, &mut maps, &Desired::default());
        }
        sync(&mut syncer, &mut maps, &desired(&[(9, 80, &[1, 2])]));
        assert_eq!(service_id(&maps, fe(9, 80)), 1);
        assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn failure_mid_plan_leaves_realized_equal_to_maps_and_retry_converges() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2, 3])]));
        let d = desired(&[(2, 80, &[4, 5])]);
        maps.fail_after = Some(maps.writes + 4);
        let err = syncer.apply(&d, &mut Checked(&mut maps)).expect_err("injected");
        assert_eq!(err.reason, "injected failure");
        assert_realized_is_maps(&syncer, &maps);
        let stats = sync(&mut syncer, &mut maps, &d);
        assert!(stats.ops > 0);
        assert!(syncer.plan(&d).is_empty());
    }

    #[test]
    fn orphaned_slots_are_cleaned_up() {
        let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
        sync(&mut syncer, &mut maps, &desired(&[(1, 80, &[1, 2])]));
        // Fail right after the DelService: its slots are left behind.
        maps.fail_after = Some(maps.writes + 1);
        assert!(syncer.apply(&Desired::default(), &mut Checked(&mut maps)).is_err());
        assert_eq!(maps.slots.len(), 2);
        // A new frontend must not inherit id 1 while its old slots exist.
        let d = desired(&[(2, 80, &[3])]);
        let ops = syncer.plan(&d);
        assert!(
            ops.iter()
                .all(|op| !matches!(op, Op::PutService { value, .. } if value.service_id == 1)),
            "{ops:?}"
        );
        sync(&mut syncer, &mut maps, &d);
    }

    #[test]
    fn capacity_skips_the_last_frontends() {
        let cap = Capacity { services: 4, slots: 10, backends: 10 };
        let mut syncer = Syncer::with_capacity(cap);
        let mut maps = FakeMaps { capacity: cap, ..FakeMaps::new() };
        // 3 frontends + 2 markers would need 5 entries.
        let d = desired(&[(1, 80, &[1]), (1, 81, &[1]), (2, 80, &[2])]);
        let stats = syncer.apply(&d, &mut Checked(&mut maps)).expect("never writes past capacity");
        assert_eq!(stats.skipped, 1);
        assert_eq!(
            maps.frontends().keys().copied().collect::<Vec<_>>(),
            vec![fe(1, 80), fe(1, 81)]
        );
        maps.check_matches(&desired(&[(1, 80, &[1]), (1, 81, &[1])])).expect("prefix programmed");
    }

    #[test]
    fn fake_maps_enforce_capacity_and_reject_missing_deletes() {
        let mut maps = FakeMaps {
            capacity: Capacity { services: 1, slots: 1, backends: 1 },
            ..FakeMaps::new()
        };
        maps.apply(&Op::PutBackend { id: 1, backend: be(1) }).expect("fits");
        maps.apply(&Op::PutBackend { id: 1, backend: be(2) }).expect("overwrite fits");
        assert!(maps.apply(&Op::PutBackend { id: 2, backend: be(2) }).is_err());
        assert!(maps.apply(&Op::DelSlot { key: SlotKey { service_id: 1, slot: 0 } }).is_err());
    }

    #[test]
    fn check_consistent_catches_count_without_slots() {
        let mut maps = FakeMaps::new();
        let marker = ServiceKeyV4::vip_marker([10, 96, 0, 1]);
        maps.services.insert(marker, VIP_MARKER_VALUE);
        maps.services.insert(
            fe(1, 80),
            ServiceValue { service_id: 1, backend_count: 1, flags: 0, affinity_timeout_s: 0 },
        );
        assert!(maps.check_consistent().is_err());
        maps.slots.insert(SlotKey { service_id: 1, slot: 0 }, 7);
        assert!(maps.check_consistent().is_err(), "backend 7 missing");
        maps.backends.insert(7, be(7));
        maps.check_consistent().expect("consistent");
        maps.services.remove(&marker);
        assert!(maps.check_consistent().is_err(), "marker missing");
    }

    /// Small universes so states overlap a lot: 3 VIPs, 3 ports x 2 protocols, 12 backends.
    fn arb_desired() -> impl Strategy<Value = Desired> {
        let frontend_key = (0..3u8, prop::sample::select(vec![53u16, 80, 443]), any::<bool>());
        // (host, port, draining): draining only counts for TCP, as desired.rs makes it.
        let backends = prop::collection::vec((0..6u8, 0..2u16, any::<bool>()), 0..6);
        prop::collection::btree_map(frontend_key, backends, 0..8).prop_map(|m| {
            let frontends = m
                .into_iter()
                .map(|((vip, port, udp), hosts)| {
                    let proto = if udp { IPPROTO_UDP } else { IPPROTO_TCP };
                    let pick = |drain: bool| {
                        let mut v: Vec<_> = hosts
                            .iter()
                            .filter(|(_, _, d)| *d == drain)
                            .map(|(h, p, _)| BackendV4::new([10, 0, 0, h + 1], 8080 + p, proto))
                            .collect();
                        v.sort();
                        v.dedup();
                        v
                    };
                    let backends = pick(false);
                    let mut draining = if udp { Vec::new() } else { pick(true) };
                    draining.retain(|b| !backends.contains(b));
                    let key = ServiceKeyV4::new([10, 96, 0, vip + 1], port, proto);
                    let service = ObjectKey::namespaced("default", format!("svc{vip}"));
                    (
                        key,
                        Frontend {
                            service,
                            port_name: String::new(),
                            backends,
                            draining,
                            session_affinity: SessionAffinity::None,
                            no_local_endpoints: false,
                            external: None,
                        },
                    )
                })
                .collect();
            Desired { frontends, skipped: Vec::new() }
        })
    }

    proptest! {
        /// Every op of every plan leaves the maps consistent, and each apply ends exactly in
        /// the desired state with an empty follow-up plan.
        #[test]
        fn every_prefix_is_consistent(states in prop::collection::vec(arb_desired(), 1..8)) {
            let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
            for d in &states {
                let planned = syncer.plan(d).len();
                let stats = syncer.apply(d, &mut Checked(&mut maps)).expect("apply");
                prop_assert_eq!(stats.ops, planned);
                prop_assert_eq!(maps.check_matches(d), Ok(()));
                prop_assert!(syncer.plan(d).is_empty());
            }
            // Ids stay within what is needed at the peak of a plan.
            prop_assert!(maps.services.values().all(|v| v.service_id <= 16));
            prop_assert!(maps.backends.keys().all(|id| *id <= 24));
        }

        /// A write failing anywhere leaves realized == maps, and the next apply converges.
        #[test]
        fn converges_after_a_failed_write(
            states in prop::collection::vec((arb_desired(), 0usize..40), 1..6),
        ) {
            let (mut syncer, mut maps) = (Syncer::new(), FakeMaps::new());
            for (d, fail_at) in &states {
                maps.fail_after = Some(maps.writes + fail_at);
                if syncer.apply(d, &mut Checked(&mut maps)).is_err() {
                    prop_assert_eq!(&syncer.realized.services, &maps.services);
                    prop_assert_eq!(&syncer.realized.slots, &maps.slots);
                    prop_assert_eq!(&syncer.realized.backends, &maps.backends);
                    syncer.apply(d, &mut Checked(&mut maps)).expect("retry");
                }
                maps.fail_after = None;
                prop_assert_eq!(maps.check_matches(d), Ok(()));
                prop_assert!(syncer.plan(d).is_empty());
            }
        }

        /// A restarted agent adopting what an earlier one wrote (maybe interrupted mid-plan)
        /// plans nothing for the same state, never deletes a frontend that is still
        /// desired, and converges to a new state as a fresh one would.
        #[test]
        fn adopting_the_maps_of_an_earlier_agent(
            states in prop::collection::vec((arb_desired(), 0usize..40), 1..5),
            next in arb_desired(),
        ) {
            let (mut first, mut maps) = (Syncer::new(), FakeMaps::new());
            for (d, _) in &states {
                first.apply(d, &mut Checked(&mut maps)).expect("no failure injected");
            }
            let last = &states.last().expect("1..5 states").0;
            let mut adopted = Syncer::new();
            adopted.adopt(&maps.services, &maps.slots, &maps.backends);
            prop_assert!(adopted.plan(last).is_empty(), "the same state: nothing to write");
            prop_assert_eq!(adopted.plan(&next), first.plan(&next));

            // Killed mid-plan: adopt the half-written maps.
            let fail_at = states.last().expect("1..5 states").1;
            maps.fail_after = Some(maps.writes + fail_at);
            // Failing part-way is the point (or it may finish first): either is adopted.
            let _ = first.apply(&next, &mut Checked(&mut maps));
            maps.fail_after = None;
            let mut restarted = Syncer::new();
            restarted.adopt(&maps.services, &maps.slots, &maps.backends);
            for op in restarted.plan(&next) {
                if let Op::DelService { key } = op {
                    prop_assert!(!next.frontends.contains_key(&key), "deleted a desired frontend");
                }
            }
            restarted.apply(&next, &mut Checked(&mut maps)).expect("converges");
            prop_assert_eq!(maps.check_matches(&next), Ok(()));
            prop_assert_eq!(maps.check_consistent(), Ok(()));
            prop_assert!(restarted.plan(&next).is_empty());
        }

        /// With small maps, no write ever fails for lack of room, and what is programmed is
        /// a key-order prefix of the desired frontends.
        #[test]
        fn never_writes_past_capacity(
            states in prop::collection::vec(arb_desired(), 1..8),
            services in 1u32..10,
            slots in 0u32..12,
            backends in 0u32..8,
        ) {
            let cap = Capacity { services, slots, backends };
            let mut syncer = Syncer::with_capacity(cap);
            let mut maps = FakeMaps { capacity: cap, ..FakeMaps::new() };
            for d in &states {
                let stats = syncer.apply(d, &mut Checked(&mut maps)).expect("no write past capacity");
                let programmed: Vec<_> = maps.frontends().into_keys().collect();
                let prefix: Vec<_> = d.frontends.keys().copied().take(programmed.len()).collect();
                prop_assert_eq!(&programmed, &prefix);
                prop_assert_eq!(programmed.len() + stats.skipped, d.frontends.len());
                let kept = Desired {
                    frontends: d.frontends.iter().take(programmed.len()).map(|(k, f)| (*k, f.clone())).collect(),
                    skipped: Vec::new(),
                };
                prop_assert_eq!(maps.check_matches(&kept), Ok(()));
            }
        }
    }

    #[test]
    fn external_frontends_carry_their_flags_and_no_vip_marker() {
        use crate::desired::{ExternalFrontend, ExternalKind};
        let node_ip = [192, 168, 0, 10];
        let np = ServiceKeyV4::new(node_ip, 30080, IPPROTO_TCP);
        let backends = vec![BackendV4::new([10, 0, 0, 1], 8080, IPPROTO_TCP)];
        let frontend = Frontend {
            service: ObjectKey::namespaced("d", "lb"),
            port_name: String::new(),
            backends,
            draining: Vec::new(),
            session_affinity: SessionAffinity::None,
            no_local_endpoints: false,
            external: Some(ExternalFrontend {
                kind: ExternalKind::LoadBalancer,
                traffic_policy_local: true,
                source_ranges: vec!["10.1.0.0/16".parse().unwrap()],
            }),
        };
        let desired = Desired { frontends: BTreeMap::from([(np, frontend)]), skipped: Vec::new() };
        let mut maps = FakeMaps::new();
        let mut syncer = Syncer::new();
        syncer.apply(&desired, &mut maps).unwrap();
        maps.check_matches(&desired).unwrap();
        let value = maps.services[&np];
        assert_eq!(value.flags, SVC_F_EXTERNAL | SVC_F_ETP_LOCAL | SVC_F_SOURCE_RANGES);
        assert!(
            !maps.services.contains_key(&ServiceKeyV4::vip_marker(node_ip)),
            "a node IP must not become a VIP marker: ICMP and fragments to it would be dropped"
        );
    }
}
