//! Writing computed [`PolicyMaps`] to the datapath: diff against what was written, then
//! ordered [`PolicyOp`]s through a [`PolicyWriter`].
//!
//! The [`PolicySyncer`] remembers every successful write (so after a failed one it still
//! equals the maps, and the next call retries the rest).
//!
//! # Order of writes
//!
//! Identities and set ids are content hashes: a change produces *new* ids and entries
//! beside the old ones, so a plan can add everything first and retire later.
//!
//! 1. `PutRule`: new or changed `POLICY_V4` entries, before any endpoint or ipcache entry
//!    can lead a packet to them.
//! 2. `PutIpcache`: new or changed identities of addresses.
//! 3. `PutEndpoint`: new or changed endpoints (now pointing at complete sets).
//! 4. `DelEndpoint`: endpoints of pods gone from this node.
//! 5. `DelRule`: entries no longer desired. Stale endpoints were deleted at step 4, so no
//!    endpoint ever points at a set whose entries are being removed (the design lists the
//!    rule deletions before the endpoint deletions; this order is the safe one).
//! 6. `DelIpcache`: prefixes no longer desired.
//! 7. `SetConfig` with `revision + 1`, only when something was written since the last one
//!    (or the flags changed): established flows are verified again against the new maps.
//!
//! Every prefix of a plan leaves every endpoint's sets complete (all their entries
//! present). Mid-plan, a new flow may meet a new identity with an old set (or the other
//! way round) and be denied although both the old and the new policy allow it; that lasts
//! one plan. Established flows are not re-checked until step 7 bumps the revision.
//!
//! # Capacity
//!
//! Puts come before deletes, so a plan's peak usage is what was written plus the new keys.
//! New keys are admitted while that fits ([`PolicyCapacity`]); the rest wait, with a
//! warning, and [`PolicySyncer::apply`] plans again once the deletes made room:
//!
//! * `POLICY_V4` full: new entries are admitted in key order (set, identity, protocol,
//!   port); the endpoints are still written. A pod stays isolated with fewer allow entries
//!   (fail closed), never loses its isolation.
//! * `IPCACHE_V4` full: shorter prefixes first (`0.0.0.0/0`, ipBlocks), pod `/32`s last;
//!   an address left out gets the identity of the longest listed prefix containing it.
//! * `ENDPOINTS_V4` full: new endpoints are left out in address order; such a pod has no
//!   policy at all until there is room (the same window as a pod the agent does not know
//!   yet). 16,384 pods on one node is far above any kubelet `maxPods`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use nodeplane_common::policy::{
    EndpointV4, MAX_ENDPOINTS, MAX_IPCACHE, MAX_POLICY_ENTRIES, PolicyConfig, PolicyKey,
    PolicyValue,
};

use super::compute::{PolicyLookup, PolicyMaps};
use super::lpm::{POLICY_KEY_BITS, mask_policy_key, policy_prefix_matches};
use super::{PolicyOp, PolicyWriteError, PolicyWriter};
use crate::model::Ipv4Cidr;

/// Sizes of the policy maps, as created by the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCapacity {
    pub ipcache: u32,
    pub endpoints: u32,
    pub rules: u32,
}

impl Default for PolicyCapacity {
    fn default() -> Self {
        Self { ipcache: MAX_IPCACHE, endpoints: MAX_ENDPOINTS, rules: MAX_POLICY_ENTRIES }
    }
}

/// Desired entries left out for lack of room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub ipcache: usize,
    pub endpoints: usize,
    pub rules: usize,
}

impl Skipped {
    pub fn any(&self) -> bool {
        self.ipcache + self.endpoints + self.rules > 0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicySyncStats {
    /// Ops written by this call.
    pub ops: usize,
    /// Entries in the maps afterwards.
    pub ipcache: usize,
    pub endpoints: usize,
    pub rules: usize,
    /// Desired entries still missing for lack of room.
    pub skipped: Skipped,
    /// `PolicyConfig::revision` in the map afterwards.
    pub revision: u32,
}

/// The keys of the policy maps whose desired value may have changed since the maps the
/// syncer last saw ([`PolicySyncer::apply_changed`]); a key may be listed and unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    pub ipcache: BTreeSet<Ipv4Cidr>,
    pub endpoints: BTreeSet<Ipv4Addr>,
    pub rules: BTreeSet<(PolicyKey, u32)>,
}

/// Plans and applies the policy maps; see the module docs.
#[derive(Debug, Default)]
pub struct PolicySyncer {
    ipcache: BTreeMap<Ipv4Cidr, u32>,
    endpoints: BTreeMap<Ipv4Addr, EndpointV4>,
    rules: BTreeMap<(PolicyKey, u32), PolicyValue>,
    /// The config as written last (all zero, as the kernel creates the array, before).
    config: PolicyConfig,
    /// Desired `PolicyConfig::flags`.
    flags: u32,
    /// A map write succeeded since the last `SetConfig`.
    dirty: bool,
    capacity: PolicyCapacity,
    /// Left out by the last apply, so the warning is logged when it changes.
    last_skipped: Skipped,
}

impl PolicySyncer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity: PolicyCapacity) -> Self {
        Self { capacity, ..Self::default() }
    }

    /// Continue from the revision the (pinned) `POLICY_CONFIG` holds, so a restarted agent
    /// never reuses a revision established flows were verified at.
    pub fn with_revision(mut self, revision: u32) -> Self {
        self.config.revision = revision;
        self
    }

    /// Start from what the (pinned) maps hold, read back at start-up: the first plan then
    /// deletes what a previous run left behind instead of leaking it, and continues its
    /// revision. `current.names` is not used.
    pub fn with_realized(mut self, current: &PolicyMaps, config: PolicyConfig) -> Self {
        self.ipcache = current.ipcache.clone();
        self.endpoints = current.endpoints.clone();
        self.rules = current.rules.clone();
        self.config = config;
        self.flags = config.flags;
        self
    }

    /// `POLICY_CFG_F_*` bits for the next plan.
    pub fn set_flags(&mut self, flags: u32) {
        self.flags = flags;
    }

    /// [`PolicySyncer::set_flags`], by value.
    pub fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    /// The `POLICY_CFG_F_*` bits the next plan writes.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// The revision written last.
    pub fn revision(&self) -> u32 {
        self.config.revision
    }

    /// The ops that turn what was written into `maps`, in a safe order. Pure.
    pub fn plan(&self, maps: &PolicyMaps) -> Vec<PolicyOp> {
        self.plan_with_skips(maps).0
    }

    /// Plans and writes, recording every successful op. On error what was recorded still
    /// matches the maps; calling again retries the rest. When entries had to wait for room
    /// that the plan's deletes free, plans again (at most three rounds).
    pub fn apply(
        &mut self,
        maps: &PolicyMaps,
        w: &mut impl PolicyWriter,
    ) -> Result<PolicySyncStats, PolicyWriteError> {
        let mut written = 0;
        let mut skipped = Skipped::default();
        for _ in 0..3 {
            let (ops, s) = self.plan_with_skips(maps);
            skipped = s;
            for op in &ops {
                w.apply_policy(op)?;
                self.record(op);
                written += 1;
            }
            let freed = ops.iter().any(|op| {
                matches!(
                    op,
                    PolicyOp::DelRule { .. }
                        | PolicyOp::DelIpcache { .. }
                        | PolicyOp::DelEndpoint { .. }
                )
            });
            if !skipped.any() || !freed {
                break;
            }
        }
        self.log_skipped(skipped);
        Ok(PolicySyncStats {
            ops: written,
            ipcache: self.ipcache.len(),
            endpoints: self.endpoints.len(),
            rules: self.rules.len(),
            skipped,
            revision: self.config.revision,
        })
    }

    /// As [`PolicySyncer::apply`] when `maps` differs from the maps of the last apply only
    /// at the keys in `changed`: plans those keys alone, in the same order. Falls back to
    /// [`PolicySyncer::apply`] when entries are waiting for room or the new keys do not fit.
    pub fn apply_changed(
        &mut self,
        maps: &PolicyMaps,
        changed: &PolicyChanges,
        w: &mut impl PolicyWriter,
    ) -> Result<PolicySyncStats, PolicyWriteError> {
        let Some(ops) = self.plan_changed(maps, changed) else {
            return self.apply(maps, w);
        };
        for op in &ops {
            w.apply_policy(op)?;
            self.record(op);
        }
        self.log_skipped(Skipped::default());
        Ok(PolicySyncStats {
            ops: ops.len(),
            ipcache: self.ipcache.len(),
            endpoints: self.endpoints.len(),
            rules: self.rules.len(),
            skipped: Skipped::default(),
            revision: self.config.revision,
        })
    }

    /// [`PolicySyncer::plan`] restricted to `changed`; `None` if something was skipped
    /// last time or the puts would not fit.
    fn plan_changed(&self, maps: &PolicyMaps, changed: &PolicyChanges) -> Option<Vec<PolicyOp>> {
        if self.last_skipped.any() {
            return None;
        }
        fn puts<'a, K: Ord + Copy, V: PartialEq + Copy>(
            keys: &'a BTreeSet<K>,
            realized: &'a BTreeMap<K, V>,
            desired: &'a BTreeMap<K, V>,
            cap: u32,
        ) -> Option<Vec<(K, V)>> {
            let mut new = 0;
            let mut out = Vec::new();
            for k in keys {
                let Some(v) = desired.get(k) else { continue };
                match realized.get(k) {
                    Some(old) if old == v => {}
                    Some(_) => out.push((*k, *v)),
                    None => {
                        new += 1;
                        out.push((*k, *v));
                    }
                }
            }
            (realized.len() + new <= cap as usize).then_some(out)
        }
        let mut ops = Vec::new();
        let c = &self.capacity;
        for ((key, prefix_len), value) in puts(&changed.rules, &self.rules, &maps.rules, c.rules)? {
            ops.push(PolicyOp::PutRule { key, prefix_len, value });
        }
        for (cidr, identity) in puts(&changed.ipcache, &self.ipcache, &maps.ipcache, c.ipcache)? {
            ops.push(PolicyOp::PutIpcache { cidr, identity });
        }
        let endpoints = puts(&changed.endpoints, &self.endpoints, &maps.endpoints, c.endpoints)?;
        for (addr, value) in endpoints {
            ops.push(PolicyOp::PutEndpoint { addr, value });
        }
        let gone = |k| !maps.endpoints.contains_key(k) && self.endpoints.contains_key(k);
        for addr in changed.endpoints.iter().filter(|k| gone(k)) {
            ops.push(PolicyOp::DelEndpoint { addr: *addr });
        }
        let gone = |k| !maps.rules.contains_key(k) && self.rules.contains_key(k);
        for (key, prefix_len) in changed.rules.iter().filter(|k| gone(k)) {
            ops.push(PolicyOp::DelRule { key: *key, prefix_len: *prefix_len });
        }
        let gone = |k| !maps.ipcache.contains_key(k) && self.ipcache.contains_key(k);
        for cidr in changed.ipcache.iter().filter(|k| gone(k)) {
            ops.push(PolicyOp::DelIpcache { cidr: *cidr });
        }
        if !ops.is_empty() || self.dirty || self.config.flags != self.flags {
            let revision = self.config.revision.wrapping_add(1);
            ops.push(PolicyOp::SetConfig(PolicyConfig { revision, flags: self.flags }));
        }
        Some(ops)
    }

    fn log_skipped(&mut self, skipped: Skipped) {
        if skipped != self.last_skipped {
            if skipped.any() {
                tracing::warn!(
                    ipcache = skipped.ipcache,
                    endpoints = skipped.endpoints,
                    rules = skipped.rules,
                    "policy maps full: entries not programmed (pods stay isolated; \
                     flows those entries would allow are denied)",
                );
            } else {
                tracing::info!("policy maps have room again: every entry is programmed");
            }
        }
        self.last_skipped = skipped;
    }

    fn plan_with_skips(&self, maps: &PolicyMaps) -> (Vec<PolicyOp>, Skipped) {
        let mut skipped = Skipped::default();
        let mut ops = Vec::new();

        // 1. Rules.
        let (rules, n) = admit(&self.rules, &maps.rules, self.capacity.rules, |a, b| a.cmp(b));
        skipped.rules = n;
        ops.extend(rules.into_iter().map(|((key, prefix_len), value)| PolicyOp::PutRule {
            key,
            prefix_len,
            value,
        }));

        // 2. Ipcache: short prefixes first when room is short.
        let (ipcache, n) = admit(&self.ipcache, &maps.ipcache, self.capacity.ipcache, |a, b| {
            (a.prefix_len(), a).cmp(&(b.prefix_len(), b))
        });
        skipped.ipcache = n;
        ops.extend(
            ipcache.into_iter().map(|(cidr, identity)| PolicyOp::PutIpcache { cidr, identity }),
        );

        // 3. Endpoints.
        let (endpoints, n) =
            admit(&self.endpoints, &maps.endpoints, self.capacity.endpoints, |a, b| a.cmp(b));
        skipped.endpoints = n;
        ops.extend(
            endpoints.into_iter().map(|(addr, value)| PolicyOp::PutEndpoint { addr, value }),
        );

        // 4.-6. Deletes: endpoints, rules, ipcache.
        ops.extend(
            self.endpoints
                .keys()
                .filter(|a| !maps.endpoints.contains_key(a))
                .map(|addr| PolicyOp::DelEndpoint { addr: *addr }),
        );
        ops.extend(
            self.rules
                .keys()
                .filter(|k| !maps.rules.contains_key(k))
                .map(|(key, prefix_len)| PolicyOp::DelRule { key: *key, prefix_len: *prefix_len }),
        );
        ops.extend(
            self.ipcache
                .keys()
                .filter(|c| !maps.ipcache.contains_key(c))
                .map(|cidr| PolicyOp::DelIpcache { cidr: *cidr }),
        );

        // 7. Revision.
        if !ops.is_empty() || self.dirty || self.config.flags != self.flags {
            let revision = self.config.revision.wrapping_add(1);
            ops.push(PolicyOp::SetConfig(PolicyConfig { revision, flags: self.flags }));
        }
        (ops, skipped)
    }

    /// Mirrors one successful write.
    fn record(&mut self, op: &PolicyOp) {
        match op {
            PolicyOp::PutIpcache { cidr, identity } => {
                self.ipcache.insert(*cidr, *identity);
            }
            PolicyOp::DelIpcache { cidr } => {
                self.ipcache.remove(cidr);
            }
            PolicyOp::PutEndpoint { addr, value } => {
                self.endpoints.insert(*addr, *value);
            }
            PolicyOp::DelEndpoint { addr } => {
                self.endpoints.remove(addr);
            }
            PolicyOp::PutRule { key, prefix_len, value } => {
                self.rules.insert((*key, *prefix_len), *value);
            }
            PolicyOp::DelRule { key, prefix_len } => {
                self.rules.remove(&(*key, *prefix_len));
            }
            PolicyOp::SetConfig(config) => {
                self.config = *config;
                self.dirty = false;
                return;
            }
        }
        self.dirty = true;
    }
}

/// The entries of `desired` to put: changed values always (no extra room), new keys in
/// `order` while `realized` plus the admitted ones fit `cap`. Returns them in key order
/// and the number of new keys left out.
fn admit<K: Ord + Copy, V: PartialEq + Copy>(
    realized: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    cap: u32,
    order: impl Fn(&K, &K) -> std::cmp::Ordering,
) -> (Vec<(K, V)>, usize) {
    let mut puts: Vec<(K, V)> = Vec::new();
    let mut new: Vec<(K, V)> = Vec::new();
    for (k, v) in desired {
        match realized.get(k) {
            Some(old) if old == v => {}
            Some(_) => puts.push((*k, *v)),
            None => new.push((*k, *v)),
        }
    }
    let room = (cap as usize).saturating_sub(realized.len());
    let skipped = new.len().saturating_sub(room);
    if skipped > 0 {
        new.sort_by(|a, b| order(&a.0, &b.0));
        new.truncate(room);
    }
    puts.extend(new);
    puts.sort_by_key(|e| e.0);
    (puts, skipped)
}

/// The policy maps in memory, for tests. Behaves like the kernel maps where it matters:
/// inserting a new key into a full map fails, deleting a missing key fails, LPM keys are
/// matched on their prefix only, and lookups are real longest-prefix matches (a scan of
/// every entry, independent of the masking lookups of [`PolicyMaps`]).
#[derive(Clone, Debug, Default)]
pub struct FakePolicyMaps {
    pub ipcache: BTreeMap<Ipv4Cidr, u32>,
    pub endpoints: BTreeMap<Ipv4Addr, EndpointV4>,
    pub rules: BTreeMap<(PolicyKey, u32), PolicyValue>,
    pub config: PolicyConfig,
    pub capacity: PolicyCapacity,
    /// Inject one failure: the write after this many successful writes fails, and the
    /// knob resets to `None`.
    pub fail_after: Option<usize>,
    /// Successful writes so far.
    pub writes: usize,
}

impl FakePolicyMaps {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity: PolicyCapacity) -> Self {
        Self { capacity, ..Self::default() }
    }

    /// The maps hold exactly `maps` (and the config has been written).
    pub fn check_matches(&self, maps: &PolicyMaps) -> Result<(), String> {
        if self.ipcache != maps.ipcache {
            return Err(format!("ipcache {:?}, want {:?}", self.ipcache, maps.ipcache));
        }
        if self.endpoints != maps.endpoints {
            return Err(format!("endpoints {:?}, want {:?}", self.endpoints, maps.endpoints));
        }
        if self.rules != maps.rules {
            let missing = maps.rules.keys().filter(|k| !self.rules.contains_key(k)).count();
            let extra = self.rules.keys().filter(|k| !maps.rules.contains_key(k)).count();
            return Err(format!("rules differ: {missing} missing, {extra} extra"));
        }
        Ok(())
    }

    /// Every endpoint's sets are complete: for each set an endpoint names, every entry
    /// of that set in the first of `known` that has the set is present.
    pub fn check_sets_complete(&self, known: &[&PolicyMaps]) -> Result<(), String> {
        let sets: BTreeSet<u32> = self
            .endpoints
            .values()
            .flat_map(|e| [e.ingress_set, e.egress_set])
            .filter(|s| *s != nodeplane_common::policy::SET_NONE)
            .collect();
        for set in sets {
            let Some(maps) = known.iter().find(|m| m.names.sets.contains_key(&set)) else {
                return Err(format!("set {set} unknown"));
            };
            for key in maps.rules.keys().filter(|(k, _)| k.set == set.to_be_bytes()) {
                if !self.rules.contains_key(key) {
                    return Err(format!("set {set} lacks entry {key:?}"));
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, op: &PolicyOp) -> Result<(), String> {
        fn full(len: usize, cap: u32) -> Result<(), String> {
            if len >= cap as usize { Err(format!("map full ({cap} entries)")) } else { Ok(()) }
        }
        fn missing<T>(removed: Option<T>) -> Result<(), String> {
            removed.map(|_| ()).ok_or_else(|| "no such key".to_string())
        }
        fn rule_key(key: &PolicyKey, prefix_len: u32) -> Result<(PolicyKey, u32), String> {
            if prefix_len > POLICY_KEY_BITS {
                return Err(format!("prefix length {prefix_len} > {POLICY_KEY_BITS}"));
            }
            // The trie compares the first prefix_len bits only.
            Ok((mask_policy_key(key, prefix_len), prefix_len))
        }
        match op {
            PolicyOp::PutIpcache { cidr, identity } => {
                if !self.ipcache.contains_key(cidr) {
                    full(self.ipcache.len(), self.capacity.ipcache)?;
                }
                self.ipcache.insert(*cidr, *identity);
            }
            PolicyOp::DelIpcache { cidr } => missing(self.ipcache.remove(cidr))?,
            PolicyOp::PutEndpoint { addr, value } => {
                if !self.endpoints.contains_key(addr) {
                    full(self.endpoints.len(), self.capacity.endpoints)?;
                }
                self.endpoints.insert(*addr, *value);
            }
            PolicyOp::DelEndpoint { addr } => missing(self.endpoints.remove(addr))?,
            PolicyOp::PutRule { key, prefix_len, value } => {
                let k = rule_key(key, *prefix_len)?;
                if !self.rules.contains_key(&k) {
                    full(self.rules.len(), self.capacity.rules)?;
                }
                self.rules.insert(k, *value);
            }
            PolicyOp::DelRule { key, prefix_len } => {
                let k = rule_key(key, *prefix_len)?;
                missing(self.rules.remove(&k))?;
            }
            PolicyOp::SetConfig(config) => self.config = *config,
        }
        Ok(())
    }
}

impl PolicyWriter for FakePolicyMaps {
    fn apply_policy(&mut self, op: &PolicyOp) -> Result<(), PolicyWriteError> {
        if let Some(n) = self.fail_after
            && self.writes >= n
        {
            self.fail_after = None;
            return Err(PolicyWriteError {
                op: op.clone(),
                reason: "injected failure".into(),
                failure: crate::sync::WriteFailure::Other,
            });
        }
        self.write(op).map_err(|reason| PolicyWriteError {
            op: op.clone(),
            failure: crate::sync::fake_failure(&reason),
            reason,
        })?;
        self.writes += 1;
        Ok(())
    }
}

impl PolicyLookup for FakePolicyMaps {
    fn ipcache(&self, addr: Ipv4Addr) -> Option<u32> {
        self.ipcache
            .iter()
            .filter(|(c, _)| c.contains(addr))
            .max_by_key(|(c, _)| c.prefix_len())
            .map(|(_, id)| *id)
    }

    fn endpoint(&self, addr: Ipv4Addr) -> Option<EndpointV4> {
        self.endpoints.get(&addr).copied()
    }

    fn rule(&self, key: &PolicyKey) -> Option<PolicyValue> {
        self.rules
            .iter()
            .filter(|((k, len), _)| policy_prefix_matches(k, *len, key))
            .max_by_key(|((_, len), _)| *len)
            .map(|(_, v)| *v)
    }
}

/// Applies ops to a fake and checks after every single one that every endpoint's sets are
/// complete, with `known` naming the sets of the old and the new state.
#[cfg(test)]
pub(crate) struct Checked<'a> {
    pub(crate) maps: &'a mut FakePolicyMaps,
    pub(crate) known: Vec<&'a PolicyMaps>,
}

#[cfg(test)]
impl PolicyWriter for Checked<'_> {
    fn apply_policy(&mut self, op: &PolicyOp) -> Result<(), PolicyWriteError> {
        self.maps.apply_policy(op)?;
        if let Err(e) = self.maps.check_sets_complete(&self.known) {
            panic!("after {op:?}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use nodeplane_common::maps::IPPROTO_TCP;
    use proptest::prelude::*;

    use super::*;
    use crate::policy::compute::fixtures::*;
    use crate::policy::compute::{Direction, Verdict};

    fn allow_web_to_db(port_no: u16) -> Vec<crate::policy::Policy> {
        vec![policy(
            "prod",
            "db",
            sel(&[("app", "db")]),
            Some(vec![rule(
                Some(vec![pods_in("prod", &[("app", "web")])]),
                Some(vec![tcp(port_no)]),
            )]),
            None,
        )]
    }

    fn world(pods: usize, policies: Vec<crate::policy::Policy>) -> TestWorld {
        let mut all = vec![pod("prod", "db", &[("app", "db")], 1, NODE)];
        for i in 0..pods {
            let n = 10 + i as u8;
            all.push(pod("prod", &format!("web{i}"), &[("app", "web")], n, NODE));
        }
        TestWorld::new(all, policies)
    }

    fn kind(op: &PolicyOp) -> &'static str {
        match op {
            PolicyOp::PutRule { .. } => "PutRule",
            PolicyOp::PutIpcache { .. } => "PutIpcache",
            PolicyOp::PutEndpoint { .. } => "PutEndpoint",
            PolicyOp::DelEndpoint { .. } => "DelEndpoint",
            PolicyOp::DelRule { .. } => "DelRule",
            PolicyOp::DelIpcache { .. } => "DelIpcache",
            PolicyOp::SetConfig(_) => "SetConfig",
        }
    }

    /// The op kinds of a plan, each run collapsed to one.
    fn shape(ops: &[PolicyOp]) -> Vec<&'static str> {
        let mut s: Vec<&'static str> = ops.iter().map(kind).collect();
        s.dedup();
        s
    }

    #[test]
    fn a_second_plan_is_empty_and_the_revision_counts_changes() {
        let m = world(2, allow_web_to_db(5432)).compute();
        let mut s = PolicySyncer::new();
        let mut f = FakePolicyMaps::new();
        let plan = s.plan(&m);
        assert_eq!(shape(&plan), ["PutRule", "PutIpcache", "PutEndpoint", "SetConfig"]);
        let stats = s.apply(&m, &mut f).expect("apply");
        assert_eq!(stats.ops, plan.len());
        assert_eq!(stats.revision, 1);
        assert_eq!(f.config.revision, 1);
        f.check_matches(&m).expect("maps");
        assert_eq!(s.plan(&m), vec![]);
        assert_eq!(s.apply(&m, &mut f).expect("apply").ops, 0);
        assert_eq!(f.config.revision, 1);

        let m2 = world(2, allow_web_to_db(5433)).compute();
        s.apply(&m2, &mut f).expect("apply");
        f.check_matches(&m2).expect("maps");
        assert_eq!(f.config.revision, 2);
        assert!(f.verdict(ip(10), ip(1), IPPROTO_TCP, 5433, Direction::Ingress).allowed());
        assert!(!f.verdict(ip(10), ip(1), IPPROTO_TCP, 5432, Direction::Ingress).allowed());

        s.set_flags(nodeplane_common::policy::POLICY_CFG_F_LOG_ALLOWED);
        assert_eq!(shape(&s.plan(&m2)), ["SetConfig"]);
        s.apply(&m2, &mut f).expect("apply");
        assert_eq!(f.config, PolicyConfig { revision: 3, flags: 1 });
    }

    #[test]
    fn restarts_continue_the_revision() {
        let m = world(1, allow_web_to_db(80)).compute();
        let mut s = PolicySyncer::new().with_revision(41);
        let mut f = FakePolicyMaps::new();
        assert_eq!(s.apply(&m, &mut f).expect("apply").revision, 42);
    }

    #[test]
    fn a_restart_cleans_up_what_the_last_run_left() {
        let old = world(3, allow_web_to_db(80)).compute();
        let new = world(1, allow_web_to_db(81)).compute();
        let mut f = FakePolicyMaps::new();
        PolicySyncer::new().apply(&old, &mut f).expect("apply");
        let pinned = PolicyMaps {
            ipcache: f.ipcache.clone(),
            endpoints: f.endpoints.clone(),
            rules: f.rules.clone(),
            ..PolicyMaps::default()
        };
        let mut s = PolicySyncer::new().with_realized(&pinned, f.config);
        assert!(s.plan(&old).is_empty(), "nothing to do for the same state");
        s.apply(&new, &mut f).expect("apply");
        f.check_matches(&new).expect("stale entries deleted");
        assert_eq!(f.config.revision, 2);
    }

    #[test]
    fn writes_add_before_they_remove() {
        let old = world(3, allow_web_to_db(80)).compute();
        // New port (new set), two web pods gone (stale ipcache, endpoints, identities).
        let new = world(1, allow_web_to_db(81)).compute();
        let mut s = PolicySyncer::new();
        let mut f = FakePolicyMaps::new();
        s.apply(&old, &mut Checked { maps: &mut f, known: vec![&old] }).expect("apply");
        let plan = s.plan(&new);
        assert_eq!(
            shape(&plan),
            ["PutRule", "PutEndpoint", "DelEndpoint", "DelRule", "DelIpcache", "SetConfig"]
        );
        s.apply(&new, &mut Checked { maps: &mut f, known: vec![&new, &old] }).expect("apply");
        f.check_matches(&new).expect("maps");
        assert!(s.plan(&new).is_empty());
        // And back.
        s.apply(&old, &mut Checked { maps: &mut f, known: vec![&old, &new] }).expect("apply");
        f.check_matches(&old).expect("maps");
    }

    #[test]
    fn a_failed_write_is_retried() {
        let old = world(2, allow_web_to_db(80)).compute();
        let new = world(3, allow_web_to_db(81)).compute();
        let n = {
            let mut s = PolicySyncer::new();
            let mut f = FakePolicyMaps::new();
            s.apply(&old, &mut f).expect("apply");
            s.plan(&new).len()
        };
        for fail_at in 0..n {
            let mut s = PolicySyncer::new();
            let mut f = FakePolicyMaps::new();
            s.apply(&old, &mut f).expect("apply");
            let before = f.writes;
            f.fail_after = Some(before + fail_at);
            let err = s.apply(&new, &mut f).expect_err("injected");
            assert_eq!(err.reason, "injected failure");
            assert_eq!(f.config.revision, 1, "no revision bump before the end");
            s.apply(&new, &mut f).expect("retry");
            f.check_matches(&new).expect("maps");
            assert_eq!(f.config.revision, 2);
            assert!(s.plan(&new).is_empty());
        }
    }

    #[test]
    fn a_full_rule_map_keeps_pods_isolated() {
        // The db pod allows ports 80..=83 from anyone: 4 entries, room for 2.
        let rules = |n| {
            vec![policy(
                "prod",
                "db",
                sel(&[("app", "db")]),
                Some(vec![rule(None, Some((0..n).map(|i| tcp(80 + i)).collect()))]),
                None,
            )]
        };
        let m = world(1, rules(4)).compute();
        assert_eq!(m.rules.len(), 4);
        let cap = PolicyCapacity { rules: 2, ..PolicyCapacity::default() };
        let mut s = PolicySyncer::with_capacity(cap);
        let mut f = FakePolicyMaps::with_capacity(cap);
        let stats = s.apply(&m, &mut f).expect("apply");
        assert_eq!(stats.skipped, Skipped { rules: 2, ..Skipped::default() });
        assert_eq!(f.rules.len(), 2);
        assert_eq!(f.endpoints, m.endpoints, "endpoints written: isolated");
        let allowed: Vec<bool> = (80..84)
            .map(|p| f.verdict(ip(10), ip(1), IPPROTO_TCP, p, Direction::Ingress).allowed())
            .collect();
        assert_eq!(allowed, [true, true, false, false]);
        assert!(matches!(
            f.verdict(ip(10), ip(1), IPPROTO_TCP, 83, Direction::Ingress),
            Verdict::Deny { .. }
        ));

        // Shrinking frees room: the entries of the old set go, the new ones follow within
        // the same apply.
        let m2 = world(1, rules(2)).compute();
        let stats = s.apply(&m2, &mut f).expect("apply");
        assert_eq!(stats.skipped, Skipped::default());
        f.check_matches(&m2).expect("maps");
    }

    #[test]
    fn a_full_ipcache_drops_pod_addresses_first() {
        let m = world(3, allow_web_to_db(80)).compute();
        let cap = PolicyCapacity { ipcache: 3, ..PolicyCapacity::default() };
        let mut s = PolicySyncer::with_capacity(cap);
        let mut f = FakePolicyMaps::with_capacity(cap);
        let stats = s.apply(&m, &mut f).expect("apply");
        assert_eq!(stats.skipped.ipcache, m.ipcache.len() - 3);
        assert!(f.ipcache.contains_key(&cidr("0.0.0.0/0")));
    }

    #[test]
    fn changed_keys_are_planned_alone_and_a_full_map_falls_back() {
        let old = world(2, allow_web_to_db(80)).compute();
        let new = world(3, allow_web_to_db(80)).compute();
        let changed = PolicyChanges {
            ipcache: new.ipcache.keys().chain(old.ipcache.keys()).copied().collect(),
            endpoints: new.endpoints.keys().chain(old.endpoints.keys()).copied().collect(),
            rules: new.rules.keys().chain(old.rules.keys()).copied().collect(),
        };
        let mut s = PolicySyncer::new();
        let mut f = FakePolicyMaps::new();
        s.apply(&old, &mut f).expect("apply");
        let full = s.plan(&new);
        assert_eq!(s.plan_changed(&new, &changed), Some(full), "every key listed: the same plan");
        let none = PolicyChanges::default();
        assert_eq!(s.plan_changed(&new, &none), Some(vec![]), "nothing listed, nothing planned");
        s.apply_changed(&new, &changed, &mut f).expect("apply_changed");
        f.check_matches(&new).expect("maps");
        assert!(s.plan(&new).is_empty());

        // No room for the new keys: a full apply, with its skips.
        let cap = PolicyCapacity { ipcache: old.ipcache.len() as u32, ..PolicyCapacity::default() };
        let mut s = PolicySyncer::with_capacity(cap);
        let mut f = FakePolicyMaps::with_capacity(cap);
        s.apply(&old, &mut f).expect("apply");
        assert_eq!(s.plan_changed(&new, &changed), None);
        let stats = s.apply_changed(&new, &changed, &mut f).expect("apply_changed");
        assert_eq!(stats.skipped.ipcache, new.ipcache.len() - old.ipcache.len());
    }

    fn two_worlds() -> impl Strategy<Value = (TestWorld, TestWorld)> {
        (crate::policy::compute::fixtures::world(), crate::policy::compute::fixtures::world())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Going from one random world to another: every prefix of the plan leaves every
        /// endpoint's sets complete, the end state is the new maps, the fake (scanning LPM)
        /// decides like the computed maps, and planning again is empty.
        #[test]
        fn transitions_are_safe_and_complete((a, b) in two_worlds()) {
            let (ma, mb) = (a.compute(), b.compute());
            let mut s = PolicySyncer::new();
            let mut f = FakePolicyMaps::new();
            s.apply(&ma, &mut Checked { maps: &mut f, known: vec![&ma] }).expect("apply a");
            s.apply(&mb, &mut Checked { maps: &mut f, known: vec![&mb, &ma] }).expect("apply b");
            prop_assert_eq!(f.check_matches(&mb), Ok(()));
            prop_assert!(s.plan(&mb).is_empty());
            let addrs = addresses(&b);
            for src in &addrs {
                for dst in &addrs {
                    for (proto, port) in flows() {
                        for dir in Direction::ALL {
                            prop_assert_eq!(
                                f.verdict(*src, *dst, proto, port, dir),
                                mb.verdict(*src, *dst, proto, port, dir)
                            );
                        }
                    }
                }
            }
        }
    }
}
