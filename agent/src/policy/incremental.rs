//! The policy maps kept up to date across Pod changes: [`PolicyState`] holds what
//! [`compute`](super::compute) computed last (signatures, identities, sets, rule lists,
//! each with the number of users) and, when only Pods changed, updates just what those
//! Pods touch. The result is the maps a full compute of the new inputs gives, bit for bit
//! (the property test below holds it to that).
//!
//! ```text
//! changed pods ──► IPs they claim(ed) ──► winner per IP ──► signature ──► identity (ref-counted)
//!                                            │                                 │ appears / disappears
//!                                            │                                 ▼
//!                                            │              ids_by_peer, ids_by_named ──► sets whose
//!                                            │                                            rules name them
//!                                            └► local: set inputs (ref-counted) ──────────► entries, ids
//!   ──► PolicyChanges (the keys written) ──► PolicySyncer::apply_changed
//! ```
//!
//! A pod whose labels change but whose signature stays (or whose new signature already
//! exists) changes its `/32` and, if local, its endpoint: no entry. A new identity adds
//! entries to the sets whose rules select it (and so gives those sets new ids); one that
//! disappears removes them.
//!
//! # When it gives up
//!
//! [`PolicyState::update_pods`] returns `None`, and the caller computes whole
//! ([`PolicyState::build`]), when the incremental result could differ from the batch one
//! by construction rather than by bug:
//!
//! * an id space has an id off its hash slot (two canonical encodings collided, or two set
//!   inputs have equal contents), or a new identity, set or rule list finds its slot
//!   taken: the batch assignment probes in byte order, which an update cannot replay;
//! * a changed IP is also a listed `/32` ipBlock prefix (the pod's entry shadows it).
//!
//! Namespace and NetworkPolicy changes always compute whole: they change peers, prefixes
//! and positions every intermediate result is keyed by.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use nodeplane_common::policy::{
    EndpointV4, IDENTITY_FIRST_DYNAMIC, PolicyKey, PolicyValue, SET_NONE,
};

use super::compute::{
    self, Direction, Input, NamedPort, PeerRef, PolicyMaps, RuleIdx, SetContent, SetCtx, SetInput,
    Signature, claims_before, eligible, encode_identity, encode_rules, encode_set, endpoint_flags,
    fnv1a64, pod_namespace, rule_ref, set_content, set_input, set_name,
};
use super::lpm::{self, mask_policy_key};
use super::sync::PolicyChanges;
use super::{NamespaceScope, Peer, Policy};
use crate::model::{Ipv4Cidr, Labels, ObjectKey, Pod};

/// Ids of one kind in `[lo, hi)`, as `compute::assign_ids` hands them out. While every id
/// sits at its hash slot, adding or removing one changes no other, exactly as a batch
/// assignment of the new population would.
#[derive(Debug)]
struct IdSpace {
    lo: u32,
    hi: u32,
    taken: HashSet<u32>,
    /// Some id is not at its slot: an update cannot know the batch result.
    probed: bool,
}

impl IdSpace {
    fn new(lo: u32, hi: u32) -> Self {
        Self { lo, hi, taken: HashSet::new(), probed: false }
    }

    fn slot(&self, bytes: &[u8]) -> u32 {
        self.lo + (fnv1a64(bytes) % u64::from(self.hi - self.lo)) as u32
    }

    /// Records an id of the batch assignment.
    fn seed(&mut self, bytes: &[u8], id: u32) {
        self.taken.insert(id);
        self.probed |= id != self.slot(bytes);
    }

    /// The slot of `bytes`, if free.
    fn claim(&mut self, bytes: &[u8]) -> Option<u32> {
        let id = self.slot(bytes);
        self.taken.insert(id).then_some(id)
    }

    fn release(&mut self, id: u32) {
        self.taken.remove(&id);
    }
}

#[derive(Debug)]
struct SigState {
    id: u32,
    /// Pod IPs and prefixes with this signature.
    refs: usize,
}

/// The pod owning an IP.
#[derive(Debug)]
struct Live {
    key: ObjectKey,
    sig: Signature,
    /// Set inputs per direction, for a pod on this node.
    sets: Option<[Option<SetInput>; 2]>,
}

#[derive(Debug)]
struct SetState {
    /// Local pods using the set.
    refs: usize,
    /// Content and id, once computed.
    built: Option<(SetContent, u32)>,
}

/// The policy maps and what they were computed from; see the module docs.
#[derive(Debug)]
pub struct PolicyState {
    policies: Vec<Policy>,
    namespaces: BTreeMap<String, Labels>,
    node_name: String,
    pods: HashMap<ObjectKey, Pod>,
    /// Eligible pods by the IP they claim.
    claims: HashMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    named: Vec<NamedPort>,
    /// Every listed prefix (ipBlock `cidr`s, `except`s and `0.0.0.0/0`) and the ipBlock
    /// peers matching the addresses it owns.
    prefix_peers: BTreeMap<Ipv4Cidr, Vec<PeerRef>>,
    /// Pod peers matched by a (namespace, labels) group, filled on demand.
    groups: HashMap<(String, Labels), Vec<PeerRef>>,
    sigs: HashMap<Signature, SigState>,
    live: HashMap<Ipv4Addr, Live>,
    local: BTreeSet<Ipv4Addr>,
    ids_by_peer: HashMap<PeerRef, Vec<u32>>,
    ids_by_named: Vec<Vec<(u32, u16)>>,
    /// Pods per identity, for [`compute::IdentityName`].
    members: HashMap<u32, BTreeSet<ObjectKey>>,
    sets: HashMap<SetInput, SetState>,
    /// Rule list -> (rule id, entries using it).
    rule_lists: HashMap<Vec<RuleIdx>, (u32, usize)>,
    identity_ids: IdSpace,
    set_ids: IdSpace,
    rule_ids: IdSpace,
    maps: PolicyMaps,
    /// An update gave up half-way: only a rebuild helps.
    broken: bool,
}

/// What one update touched, before the maps are patched.
#[derive(Default)]
struct Touched {
    peers: HashSet<PeerRef>,
    named: HashSet<u32>,
    identities: BTreeSet<u32>,
    changes: PolicyChanges,
}

impl PolicyState {
    /// Computes whole, keeping the intermediate results.
    pub fn build(input: &Input<'_>) -> Self {
        let (maps, parts) = compute::compute_parts(input);
        let policies: Vec<Policy> =
            compute::sorted_policies(&input.policies).into_iter().cloned().collect();
        let prefs: Vec<&Policy> = policies.iter().collect();
        let winners = compute::live_pods(&input.pods);
        let mut pods = HashMap::with_capacity(input.pods.len());
        let mut claims: HashMap<Ipv4Addr, BTreeSet<ObjectKey>> = HashMap::new();
        for pod in &input.pods {
            if let Some(ip) = pod.ip.filter(|_| eligible(pod)) {
                claims.entry(ip).or_default().insert(pod.key.clone());
            }
            pods.insert(pod.key.clone(), (*pod).clone());
        }

        let mut identity_ids = IdSpace::new(IDENTITY_FIRST_DYNAMIC, 1 << 31);
        let mut refs = vec![0usize; parts.sigs.len()];
        for s in parts.pod_sig.values().chain(parts.prefix_sig.values()) {
            refs[*s] += 1;
        }
        let mut sigs = HashMap::with_capacity(parts.sigs.len());
        for ((sig, id), refs) in parts.sigs.iter().zip(&parts.sig_ids).zip(refs) {
            if !sig.is_empty() {
                identity_ids.seed(&encode_identity(&prefs, &parts.named, sig), *id);
            }
            sigs.insert(sig.clone(), SigState { id: *id, refs });
        }

        let mut set_ids = IdSpace::new(1, 1 << 31);
        let mut rule_ids = IdSpace::new(1, 1 << 31);
        let mut rule_lists: HashMap<Vec<RuleIdx>, (u32, usize)> = HashMap::new();
        for (list, id) in &parts.rule_ids {
            let mut b = vec![b'R'];
            encode_rules(&prefs, list, &mut b);
            rule_ids.seed(&b, *id);
            rule_lists.insert(list.clone(), (*id, 0));
        }
        let mut sets: HashMap<SetInput, SetState> = HashMap::new();
        for (input, content, id) in &parts.sets {
            set_ids.seed(&encode_set(&prefs, content), *id);
            for rules in content.entries.values() {
                if let Some(r) = rule_lists.get_mut(rules) {
                    r.1 += 1;
                }
            }
            sets.insert(input.clone(), SetState { refs: 0, built: Some((content.clone(), *id)) });
        }

        let mut live = HashMap::with_capacity(parts.pod_sig.len());
        let mut members: HashMap<u32, BTreeSet<ObjectKey>> = HashMap::new();
        let mut local = BTreeSet::new();
        for (ip, s) in &parts.pod_sig {
            let pod = winners[ip];
            let local_sets = parts.local.get(ip).map(|idx| {
                idx.map(|i| {
                    let input = i.map(|i| parts.sets[i].0.clone());
                    if let Some(set) = input.as_ref().and_then(|k| sets.get_mut(k)) {
                        set.refs += 1;
                    }
                    input
                })
            });
            if local_sets.is_some() {
                local.insert(*ip);
            }
            members.entry(parts.sig_ids[*s]).or_default().insert(pod.key.clone());
            live.insert(
                *ip,
                Live { key: pod.key.clone(), sig: parts.sigs[*s].clone(), sets: local_sets },
            );
        }
        Self {
            policies,
            namespaces: input.namespaces.clone(),
            node_name: input.node_name.to_string(),
            pods,
            claims,
            named: parts.named,
            prefix_peers: parts.prefix_peers,
            groups: HashMap::new(),
            sigs,
            live,
            local,
            ids_by_peer: parts.ids_by_peer,
            ids_by_named: parts.ids_by_named,
            members,
            sets,
            rule_lists,
            identity_ids,
            set_ids,
            rule_ids,
            maps,
            broken: false,
        }
    }

    /// The maps as of the last build or update.
    pub fn maps(&self) -> &PolicyMaps {
        &self.maps
    }

    /// Applies changed Pods (`None`: deleted) and returns the map keys whose desired
    /// value may have changed. `None` when the update cannot be done incrementally (see
    /// the module docs): the state is then unusable and must be rebuilt.
    pub fn update_pods<'p>(
        &mut self,
        changed: impl IntoIterator<Item = (&'p ObjectKey, Option<&'p Pod>)>,
    ) -> Option<PolicyChanges> {
        if self.broken || self.identity_ids.probed || self.set_ids.probed || self.rule_ids.probed {
            return None;
        }
        let policies = std::mem::take(&mut self.policies);
        let result = {
            let prefs: Vec<&Policy> = policies.iter().collect();
            self.update(&prefs, changed)
        };
        self.policies = policies;
        self.broken = result.is_none();
        result
    }

    fn update<'p>(
        &mut self,
        policies: &[&Policy],
        changed: impl IntoIterator<Item = (&'p ObjectKey, Option<&'p Pod>)>,
    ) -> Option<PolicyChanges> {
        // Groups of pods long gone (every rollout brings a new `pod-template-hash`) must not
        // pile up: start over once the cache outgrows the pods.
        if self.groups.len() > 2 * self.live.len() + 1024 {
            self.groups.clear();
        }
        // The IPs whose owner may have changed.
        let mut ips: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for (key, pod) in changed {
            if let Some(old) = self.pods.remove(key)
                && let Some(ip) = old.ip.filter(|_| eligible(&old))
            {
                if let Some(c) = self.claims.get_mut(&ip) {
                    c.remove(key);
                    if c.is_empty() {
                        self.claims.remove(&ip);
                    }
                }
                ips.insert(ip);
            }
            if let Some(pod) = pod {
                if let Some(ip) = pod.ip.filter(|_| eligible(pod)) {
                    self.claims.entry(ip).or_default().insert(key.clone());
                    ips.insert(ip);
                }
                self.pods.insert(key.clone(), pod.clone());
            }
        }
        if ips.iter().any(|ip| self.prefix_peers.contains_key(&lpm::ipv4_prefix(*ip, 32))) {
            return None;
        }
        let mut t = Touched::default();

        // Forget the old owners (ids are released below, once the new owners hold theirs).
        let mut dropped: Vec<Signature> = Vec::new();
        for ip in &ips {
            let Some(old) = self.live.remove(ip) else { continue };
            let sig = self.sigs.get_mut(&old.sig)?;
            sig.refs -= 1;
            if let Some(m) = self.members.get_mut(&sig.id) {
                m.remove(&old.key);
            }
            t.identities.insert(sig.id);
            dropped.push(old.sig);
            if let Some(sets) = old.sets {
                self.local.remove(ip);
                for input in sets.into_iter().flatten() {
                    self.sets.get_mut(&input)?.refs -= 1;
                }
            }
        }
        // The new owners.
        for ip in &ips {
            let Some(key) = self.claims.get(ip).and_then(|c| {
                c.iter().min_by(|a, b| {
                    let (a, b) = (&self.pods[*a], &self.pods[*b]);
                    if claims_before(a, b) {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    }
                })
            }) else {
                continue;
            };
            let key = key.clone();
            let sig = self.signature(policies, *ip, &key);
            let id = match self.sigs.get_mut(&sig) {
                Some(s) => {
                    s.refs += 1;
                    s.id
                }
                None => {
                    let id =
                        self.identity_ids.claim(&encode_identity(policies, &self.named, &sig))?;
                    for p in &sig.peers {
                        let ids = self.ids_by_peer.entry(*p).or_default();
                        if let Err(at) = ids.binary_search(&id) {
                            ids.insert(at, id);
                        }
                        t.peers.insert(*p);
                    }
                    for (n, port) in &sig.named {
                        let ids = &mut self.ids_by_named[*n as usize];
                        if let Err(at) = ids.binary_search(&(id, *port)) {
                            ids.insert(at, (id, *port));
                        }
                        t.named.insert(*n);
                    }
                    self.maps.names.identities.entry(id).or_default();
                    self.sigs.insert(sig.clone(), SigState { id, refs: 1 });
                    id
                }
            };
            self.members.entry(id).or_default().insert(key.clone());
            t.identities.insert(id);
            let pod = &self.pods[&key];
            let sets = (pod.node_name.as_deref() == Some(self.node_name.as_str())).then(|| {
                Direction::ALL.map(|dir| {
                    let input = set_input(policies, pod, dir)?;
                    self.sets
                        .entry(input.clone())
                        .or_insert(SetState { refs: 0, built: None })
                        .refs += 1;
                    Some(input)
                })
            });
            if sets.is_some() {
                self.local.insert(*ip);
            }
            self.live.insert(*ip, Live { key, sig, sets });
        }
        // Identities no IP or prefix has any more.
        for sig in dropped {
            if sig.is_empty() || self.sigs.get(&sig).is_none_or(|s| s.refs > 0) {
                continue;
            }
            let Some(state) = self.sigs.remove(&sig) else { continue };
            let id = state.id;
            self.identity_ids.release(id);
            for p in &sig.peers {
                if let Some(ids) = self.ids_by_peer.get_mut(p)
                    && let Ok(at) = ids.binary_search(&id)
                {
                    ids.remove(at);
                    if ids.is_empty() {
                        self.ids_by_peer.remove(p);
                    }
                }
                t.peers.insert(*p);
            }
            for (n, port) in &sig.named {
                let ids = &mut self.ids_by_named[*n as usize];
                if let Ok(at) = ids.binary_search(&(id, *port)) {
                    ids.remove(at);
                }
                t.named.insert(*n);
            }
            self.members.remove(&id);
            self.maps.names.identities.remove(&id);
            t.identities.remove(&id);
        }

        self.update_sets(policies, &mut t)?;

        // Names of the identities whose pods changed.
        for id in &t.identities {
            let Some(name) = self.maps.names.identities.get_mut(id) else { continue };
            let members = self.members.get(id);
            name.pods = members.map_or(0, BTreeSet::len);
            name.example = members.and_then(|m| m.first().cloned());
            name.labels = name
                .example
                .as_ref()
                .and_then(|k| self.pods.get(k))
                .map(|p| p.labels.clone())
                .unwrap_or_default();
        }
        // Ipcache entries of the changed IPs, endpoints of every local pod (their sets may
        // have new ids) and of the changed IPs.
        for ip in &ips {
            let cidr = lpm::ipv4_prefix(*ip, 32);
            match self.live.get(ip) {
                Some(l) => {
                    let id = self.sigs[&l.sig].id;
                    self.maps.ipcache.insert(cidr, id);
                }
                None => {
                    self.maps.ipcache.remove(&cidr);
                }
            }
            t.changes.ipcache.insert(cidr);
            if !self.local.contains(ip) && self.maps.endpoints.remove(ip).is_some() {
                t.changes.endpoints.insert(*ip);
            }
        }
        for ip in &self.local {
            let l = &self.live[ip];
            let built =
                |s: &Option<SetInput>| s.as_ref().and_then(|k| self.sets.get(k)?.built.as_ref());
            let set = |s: &Option<SetInput>| built(s).map_or(SET_NONE, |(_, id)| *id);
            let sets = l.sets.as_ref()?;
            let ep = EndpointV4 {
                ingress_set: set(&sets[0]),
                egress_set: set(&sets[1]),
                identity: self.sigs[&l.sig].id,
                flags: endpoint_flags(
                    built(&sets[0]).map(|(c, _)| c),
                    built(&sets[1]).map(|(c, _)| c),
                ),
            };
            if self.maps.endpoints.insert(*ip, ep) != Some(ep) {
                t.changes.endpoints.insert(*ip);
            }
        }
        Some(t.changes)
    }

    /// The signature of `ip`, owned by pod `key`.
    fn signature(&mut self, policies: &[&Policy], ip: Ipv4Addr, key: &ObjectKey) -> Signature {
        let pod = &self.pods[key];
        let group = (pod_namespace(pod).to_string(), pod.labels.clone());
        if !self.groups.contains_key(&group) {
            let peers = group_peers(policies, &self.namespaces, &group.0, &group.1);
            self.groups.insert(group.clone(), peers);
        }
        let pod = &self.pods[key];
        let mut peers = self.groups[&group].clone();
        if let Some(block) =
            (0..=32u8).rev().find_map(|len| self.prefix_peers.get(&lpm::ipv4_prefix(ip, len)))
        {
            peers.extend_from_slice(block);
        }
        peers.sort_unstable();
        peers.dedup();
        let mut named: Vec<(u32, u16)> = pod
            .container_ports
            .iter()
            .filter_map(|cp| {
                let name = cp.name.as_deref()?;
                let i = self
                    .named
                    .binary_search_by(|(n, p)| (n.as_str(), *p).cmp(&(name, cp.protocol)))
                    .ok()?;
                Some((i as u32, cp.port))
            })
            .collect();
        named.sort_unstable();
        named.dedup();
        Signature { peers, named }
    }

    /// Recomputes the sets whose peers' identities changed and computes the new ones;
    /// drops the unused ones; patches entries, set and rule names.
    fn update_sets(&mut self, policies: &[&Policy], t: &mut Touched) -> Option<()> {
        let changed_rules: HashSet<(u32, Direction)> =
            t.peers.iter().map(|p| (p.policy, p.dir)).collect();
        let named_users: HashSet<u32> = if t.named.is_empty() {
            HashSet::new()
        } else {
            let names: HashSet<NamedPort> =
                t.named.iter().map(|n| self.named[*n as usize].clone()).collect();
            (0u32..)
                .zip(policies)
                .filter(|(_, p)| {
                    p.egress.iter().flatten().any(|r| match &r.ports {
                        super::Ports::Only(l) => l.iter().any(|pm| match &pm.port {
                            super::PortSpec::Named(n) => names.contains(&(n.clone(), pm.protocol)),
                            _ => false,
                        }),
                        super::Ports::All => false,
                    })
                })
                .map(|(i, _)| i)
                .collect()
        };
        // Unused sets go; affected sets are recomputed.
        let mut drop: Vec<SetInput> = Vec::new();
        let mut rebuild: Vec<SetInput> = Vec::new();
        for (input, state) in &self.sets {
            if state.refs == 0 {
                drop.push(input.clone());
            } else if state.built.is_none()
                || input.policies.iter().any(|p| {
                    changed_rules.contains(&(*p, input.dir))
                        || (input.dir == Direction::Egress && named_users.contains(p))
                })
            {
                rebuild.push(input.clone());
            }
        }
        let ctx = SetCtx {
            policies,
            named: &self.named,
            ids_by_peer: &self.ids_by_peer,
            ids_by_named: &self.ids_by_named,
        };
        let mut fresh: Vec<(SetInput, SetContent)> = Vec::new();
        for input in rebuild {
            let content = set_content(&ctx, &input);
            let same = self.sets[&input].built.as_ref().is_some_and(|(c, _)| *c == content);
            if !same {
                fresh.push((input, content));
            }
        }
        for input in drop {
            if let Some(state) = self.sets.remove(&input)
                && let Some((content, id)) = state.built
            {
                self.remove_set(&content, id, t);
            }
        }
        for (input, _) in &fresh {
            let built = self.sets.get_mut(input)?.built.take();
            if let Some((content, id)) = built {
                self.remove_set(&content, id, t);
            }
        }
        fresh.sort_by(|a, b| a.0.cmp(&b.0));
        for (input, content) in fresh {
            let id = self.set_ids.claim(&encode_set(policies, &content))?;
            self.maps.names.sets.insert(id, set_name(policies, &content));
            for ((identity, proto, port, len), rules) in &content.entries {
                let rule = match self.rule_lists.get_mut(rules) {
                    Some(r) => {
                        r.1 += 1;
                        r.0
                    }
                    None => {
                        let mut b = vec![b'R'];
                        encode_rules(policies, rules, &mut b);
                        let rule = self.rule_ids.claim(&b)?;
                        self.rule_lists.insert(rules.clone(), (rule, 1));
                        self.maps
                            .names
                            .rules
                            .insert(rule, rules.iter().map(|r| rule_ref(policies, *r)).collect());
                        rule
                    }
                };
                let key = mask_policy_key(&PolicyKey::new(id, *identity, *proto, *port), *len);
                self.maps.rules.insert((key, *len), PolicyValue { rule, _reserved: 0 });
                t.changes.rules.insert((key, *len));
            }
            self.sets.get_mut(&input)?.built = Some((content, id));
        }
        Some(())
    }

    /// Removes the entries of set `id` and its name; releases its id and rule lists.
    fn remove_set(&mut self, content: &SetContent, id: u32, t: &mut Touched) {
        self.set_ids.release(id);
        self.maps.names.sets.remove(&id);
        for ((identity, proto, port, len), rules) in &content.entries {
            let key = mask_policy_key(&PolicyKey::new(id, *identity, *proto, *port), *len);
            self.maps.rules.remove(&(key, *len));
            t.changes.rules.insert((key, *len));
            if let Some(r) = self.rule_lists.get_mut(rules) {
                r.1 -= 1;
                if r.1 == 0 {
                    let rule = r.0;
                    self.rule_lists.remove(rules);
                    self.rule_ids.release(rule);
                    self.maps.names.rules.remove(&rule);
                }
            }
        }
    }
}

/// The pod peers (in [`PeerRef`] order) matching pods of namespace `ns` with `labels`.
fn group_peers(
    policies: &[&Policy],
    namespaces: &BTreeMap<String, Labels>,
    ns: &str,
    labels: &Labels,
) -> Vec<PeerRef> {
    compute::all_peers(policies)
        .filter(|(_, peer)| match peer {
            Peer::Pods { namespaces: scope, pods } => {
                let in_scope = match scope {
                    NamespaceScope::Own(own) => own == ns,
                    // An unknown namespace matches no selector, not even `{}`.
                    NamespaceScope::Matching(sel) => {
                        namespaces.get(ns).is_some_and(|l| sel.matches(l))
                    }
                };
                in_scope && pods.matches(labels)
            }
            Peer::IpBlock { .. } => false,
        })
        .map(|(pref, _)| pref)
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::PodPhase;
    use crate::policy::PolicyProtocol;
    use crate::policy::compute::fixtures::*;
    use crate::policy::sync::Checked;
    use crate::policy::sync::{FakePolicyMaps, PolicySyncer};

    fn input(w: &TestWorld) -> Input<'_> {
        Input {
            pods: w.pods.iter().collect(),
            namespaces: &w.namespaces,
            policies: w.policies.iter().collect(),
            node_name: NODE,
        }
    }

    /// One change to a random world's pods.
    #[derive(Clone, Debug)]
    enum Change {
        Relabel(usize, Labels),
        Delete(usize),
        Add { ns: &'static str, labels: Labels, last: u8, local: bool, http: Option<u16> },
        Ip(usize, Option<u8>),
        Node(usize, bool),
        Phase(usize, PodPhase),
    }

    fn change() -> impl Strategy<Value = Change> {
        let i = 0usize..16;
        prop_oneof![
            3 => (i.clone(), label_set()).prop_map(|(i, l)| Change::Relabel(i, l)),
            1 => i.clone().prop_map(Change::Delete),
            2 => (
                prop::sample::select(vec!["a", "b", "c", "ghost"]),
                label_set(),
                1u8..12,
                any::<bool>(),
                prop::option::of(prop::sample::select(vec![80u16, 8080]))
            )
                .prop_map(|(ns, labels, last, local, http)| Change::Add { ns, labels, last, local, http }),
            1 => (i.clone(), prop::option::of(1u8..12)).prop_map(|(i, ip)| Change::Ip(i, ip)),
            1 => (i.clone(), any::<bool>()).prop_map(|(i, l)| Change::Node(i, l)),
            1 => (i, prop::sample::select(vec![PodPhase::Running, PodPhase::Pending, PodPhase::Failed]))
                .prop_map(|(i, p)| Change::Phase(i, p)),
        ]
    }

    /// Applies `c` to `w`; returns the keys of the pods it changed.
    fn apply(w: &mut TestWorld, c: &Change, serial: &mut u32) -> Vec<ObjectKey> {
        let n = w.pods.len();
        let pick = |i: usize| (n > 0).then(|| i % n);
        match c {
            Change::Relabel(i, l) => pick(*i).map(|i| {
                w.pods[i].labels = l.clone();
                w.pods[i].key.clone()
            }),
            Change::Delete(i) => pick(*i).map(|i| w.pods.remove(i).key),
            Change::Add { ns, labels, last, local, http } => {
                *serial += 1;
                let mut p =
                    pod(ns, &format!("q{serial}"), &[], *last, if *local { NODE } else { "n2" });
                p.labels = labels.clone();
                if let Some(h) = http {
                    p = with_port(p, "http", *h, PolicyProtocol::Tcp);
                }
                let key = p.key.clone();
                w.pods.push(p);
                Some(key)
            }
            Change::Ip(i, last) => pick(*i).map(|i| {
                w.pods[i].ip = last.map(ip);
                w.pods[i].key.clone()
            }),
            Change::Node(i, local) => pick(*i).map(|i| {
                w.pods[i].node_name = Some(if *local { NODE } else { "n2" }.to_string());
                w.pods[i].key.clone()
            }),
            Change::Phase(i, phase) => pick(*i).map(|i| {
                w.pods[i].phase = *phase;
                w.pods[i].key.clone()
            }),
        }
        .into_iter()
        .collect()
    }

    /// Runs `changes` (a batch per element) against `w`: after every batch the state's maps
    /// equal a full compute and the syncer's writes equal the maps. Returns how many
    /// batches were incremental.
    fn run(mut w: TestWorld, batches: &[Vec<Change>]) -> Result<usize, TestCaseError> {
        let mut state = PolicyState::build(&input(&w));
        prop_assert_eq!(state.maps(), &w.compute());
        let mut syncer = PolicySyncer::new();
        let mut fake = FakePolicyMaps::new();
        syncer.apply(state.maps(), &mut fake).expect("apply");
        let mut serial = 0;
        let mut incremental = 0;
        for batch in batches {
            let mut keys = BTreeSet::new();
            for c in batch {
                keys.extend(apply(&mut w, c, &mut serial));
            }
            let by_key: HashMap<&ObjectKey, &Pod> = w.pods.iter().map(|p| (&p.key, p)).collect();
            let before = state.maps().clone();
            let changes = state.update_pods(keys.iter().map(|k| (k, by_key.get(k).copied())));
            match changes {
                Some(c) => {
                    incremental += 1;
                    let mut checked =
                        Checked { maps: &mut fake, known: vec![state.maps(), &before] };
                    syncer.apply_changed(state.maps(), &c, &mut checked).expect("apply_changed");
                }
                None => {
                    state = PolicyState::build(&input(&w));
                    syncer.apply(state.maps(), &mut fake).expect("apply");
                }
            }
            let want = w.compute();
            prop_assert_eq!(state.maps(), &want, "after {:?}", batch);
            prop_assert_eq!(fake.check_matches(&want), Ok(()));
            prop_assert!(syncer.plan(&want).is_empty(), "nothing left to write");
        }
        Ok(incremental)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random worlds, random sequences of pod changes (one or several at a time): the
        /// incremental maps equal a full compute after every step, names included.
        #[test]
        fn updates_equal_a_full_compute(
            w in world(),
            batches in prop::collection::vec(prop::collection::vec(change(), 1..3), 1..12),
        ) {
            run(w, &batches)?;
        }
    }

    #[test]
    fn a_relabel_is_incremental_in_a_larger_world() {
        let mut w = TestWorld::new(Vec::new(), Vec::new());
        for i in 1..=60u8 {
            let app = ["web", "db", "cache"][usize::from(i) % 3];
            let ns = ["a", "b"][usize::from(i) % 2];
            let node = if i % 2 == 0 { NODE } else { "n2" };
            let p = pod(ns, &format!("p{i}"), &[("app", app)], i, node);
            w.pods.push(with_port(p, "http", 8000 + u16::from(i % 3), PolicyProtocol::Tcp));
        }
        w.namespaces.insert("a".into(), labels(&[("name", "a")]));
        w.namespaces.insert("b".into(), labels(&[("name", "b")]));
        w.policies = vec![
            policy(
                "a",
                "web",
                sel(&[("app", "web")]),
                Some(vec![rule(
                    Some(vec![pods_where(&[], &[("app", "db")])]),
                    Some(vec![named("http")]),
                )]),
                None,
            ),
            policy(
                "b",
                "db",
                sel(&[("app", "db")]),
                None,
                Some(vec![rule(
                    Some(vec![pods_where(&[], &[("app", "web")]), block("10.0.0.0/29", &[])]),
                    Some(vec![named("http"), tcp(53)]),
                )]),
            ),
        ];
        let relabel = |app: &str| {
            let l = labels(&[("app", app)]);
            vec![Change::Relabel(3, l.clone())]
        };
        let batches = vec![relabel("db"), relabel("web"), relabel("new"), relabel("cache")];
        let n = run(w, &batches).expect("equal");
        assert_eq!(n, batches.len(), "every step incremental");
    }
}
