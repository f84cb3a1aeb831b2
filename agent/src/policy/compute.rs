//! Computing the datapath policy maps (identities, ipcache, endpoints, policy entries)
//! from pods, namespaces and [`Policy`]s. Pure and deterministic: the same inputs, in any
//! order, give the same maps and the same numbers.
//!
//! ```text
//! policies ──► peers (policy, dir, rule, peer) ──┐
//! pods, namespaces ──► signature per pod IP ─────┼──► identities (hash of signature) ──► IPCACHE_V4
//! ipBlock prefixes ──► signature per prefix ─────┘                 │
//! local pods ──► selecting policies ──► entries (identity, proto, port block) ──► POLICY_V4
//!                                    └► policy set (hash of entries) ─► ENDPOINTS_V4
//! ```
//!
//! # Identities
//!
//! The *signature* of a pod IP is the sorted list of peers `(policy, direction, rule,
//! peer)` that match it (pod selectors and ipBlocks containing the IP), plus the port
//! numbers every `(named port, protocol)` used in an egress rule resolves to on the pod.
//! The signature of a non-pod address is the list of ipBlock peers containing it. Addresses
//! with equal signatures are treated alike by every policy, so they share an identity.
//!
//! * The empty signature is [`IDENTITY_UNSELECTED`].
//! * Otherwise the id is FNV-1a 64 of the signature's canonical bytes (policy keys by
//!   name, not by position) mapped into `[IDENTITY_FIRST_DYNAMIC, 2^31)`; on a collision
//!   the next free id is taken, signatures claiming ids in their canonical byte order. An
//!   identity keeps its id as long as its signature does (and no new colliding signature
//!   sorts before it, which takes a 64-bit hash collision modulo 2^31).
//! * Pods count when they have an IP, are not `hostNetwork` and are not `Succeeded` or
//!   `Failed`. Two such pods with one IP: the `Running` one wins, then the smaller key.
//! * A pod whose namespace is not in the input (the Namespace not seen yet) matches no
//!   `namespaceSelector`, not even the empty one; the own-namespace scope still works. As
//!   [`reference`](super::reference) does: an unknown namespace widens nothing.
//!
//! # Ipcache
//!
//! One `/32` per pod IP, one entry per ipBlock `cidr` and `except` prefix, and `0.0.0.0/0`.
//! Longest-prefix match makes the ipBlock part of a signature constant over the addresses
//! a prefix owns (those not in a longer listed prefix): a peer matches them iff its `cidr`
//! covers the prefix and none of its `except`s does. (Evaluating at the network address
//! would be wrong when a longer prefix starts at the same address.)
//!
//! # Policy sets and entries
//!
//! For each local pod and direction, the policies in its namespace that select it and
//! have that direction isolate it; none: [`SET_NONE`]. Each of their rules contributes
//! allow entries per peer identity ([`IDENTITY_ANY`] for a rule without peers):
//!
//! | `ports` element              | entry prefix            |
//! |------------------------------|-------------------------|
//! | none (`Ports::All`)          | 64                      |
//! | protocol, no port            | 72                      |
//! | `port`..`endPort`            | 72 + k per aligned block ([`port_blocks`]) |
//! | named, ingress               | 88 per port the *local* pod names so (none: no entry) |
//! | named, egress                | 88 per peer identity, with the port *that* identity's pods name so |
//!
//! An egress named port on a rule without peers becomes one entry per pod identity that
//! resolves the name; non-pod addresses never match a named port. The set's content
//! (direction, isolating policies, entries with their rules) is hashed into a set id in
//! `[1, 2^31)` as identities are, so pods with equal policies share a set.
//!
//! # Rule ids
//!
//! An entry's rule id names the sorted list of rules that allow every flow the entry
//! matches: the rules that produced it, plus those of any shorter entry of the same set
//! covering it (same identity or [`IDENTITY_ANY`]), since the datapath reports only the
//! longest match. Each distinct list gets an id in `[1, 2^31)` by hash and probing;
//! [`Names::rules`] maps it back.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
};

use nodeplane_common::policy::{
    DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ANY, EP_F_EGRESS_LPM, EP_F_INGRESS_ANY, EP_F_INGRESS_LPM,
    EndpointV4, IDENTITY_ANY, IDENTITY_FIRST_DYNAMIC, IDENTITY_UNSELECTED, PolicyKey, PolicyValue,
    SET_NONE,
};

use super::lpm::{self, covers, ipv4_lookup, mask_policy_key, policy_lookup, port_blocks};
use super::{Peer, Peers, Policy, PolicyProtocol, PortSpec, Ports, Rule};
use crate::model::{Ipv4Cidr, Labels, ObjectKey, Pod, PodPhase};

/// Everything the computation reads.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub pods: Vec<&'a Pod>,
    /// Namespace labels by namespace name.
    pub namespaces: &'a BTreeMap<String, Labels>,
    pub policies: Vec<&'a Policy>,
    /// This node: its pods get `ENDPOINTS_V4` entries.
    pub node_name: &'a str,
}

/// Direction of a policy, as seen from the pod it selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Self::Ingress, Self::Egress];

    /// The inverse of [`Direction::as_u8`].
    pub const fn from_raw(dir: u8) -> Option<Self> {
        match dir {
            DIR_INGRESS => Some(Self::Ingress),
            DIR_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }

    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], as in map keys and flow events.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Ingress => DIR_INGRESS,
            Self::Egress => DIR_EGRESS,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    pub(super) fn rules(self, policy: &Policy) -> Option<&[Rule]> {
        match self {
            Self::Ingress => policy.ingress.as_deref(),
            Self::Egress => policy.egress.as_deref(),
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule of one policy: what a rule id names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: ObjectKey,
    pub dir: Direction,
    /// Index in the policy's `ingress` or `egress` list.
    pub rule: u32,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.dir, self.rule)
    }
}

/// The content of the policy maps, plus names for their numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyMaps {
    /// `IPCACHE_V4`: prefix -> identity.
    pub ipcache: BTreeMap<Ipv4Cidr, u32>,
    /// `ENDPOINTS_V4`: local pod IP -> sets and identity.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointV4>,
    /// `POLICY_V4`: (canonical key, prefix length) -> value.
    pub rules: BTreeMap<(PolicyKey, u32), PolicyValue>,
    pub names: Names,
}

/// What the numbers in the maps stand for (flow logs, metrics, `inspect`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// Rule id -> the rules allowing what an entry with that id matches.
    pub rules: BTreeMap<u32, Vec<RuleRef>>,
    /// Set id -> its direction and the policies isolating the pods that use it (deny
    /// attribution).
    pub sets: BTreeMap<u32, SetName>,
    /// Identity -> what it stands for.
    pub identities: BTreeMap<u32, IdentityName>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetName {
    pub dir: Direction,
    pub policies: Vec<ObjectKey>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityName {
    /// Pods with this identity.
    pub pods: usize,
    /// The pod with the smallest key, if any.
    pub example: Option<ObjectKey>,
    /// Its labels.
    pub labels: Labels,
    /// Ipcache prefixes other than pod `/32`s that carry this identity.
    pub cidrs: Vec<Ipv4Cidr>,
}

impl fmt::Display for IdentityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(example) = &self.example {
            write!(f, "{} pod(s), e.g. {example}", self.pods)?;
            sep = "; ";
        }
        if !self.cidrs.is_empty() {
            f.write_str(sep)?;
            for (i, c) in self.cidrs.iter().take(4).enumerate() {
                write!(f, "{}{c}", if i == 0 { "" } else { "," })?;
            }
            if self.cidrs.len() > 4 {
                write!(f, ",+{}", self.cidrs.len() - 4)?;
            }
        }
        Ok(())
    }
}

/// What the datapath decides for a new flow in one direction ([`PolicyMaps::verdict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The local address has no endpoint entry: no policy in this direction here.
    NoEndpoint,
    /// The endpoint is not isolated in this direction.
    NotIsolated,
    Allow {
        rule: u32,
    },
    Deny {
        set: u32,
    },
}

impl Verdict {
    pub fn allowed(self) -> bool {
        !matches!(self, Verdict::Deny { .. })
    }
}

/// Lookups in the policy maps, as the datapath makes them; implemented by the computed
/// [`PolicyMaps`] and by the syncer's fake maps, so both answer [`PolicyLookup::verdict`]
/// the same way.
pub trait PolicyLookup {
    /// `IPCACHE_V4`: longest-prefix match of `addr`.
    fn ipcache(&self, addr: Ipv4Addr) -> Option<u32>;
    /// `ENDPOINTS_V4`.
    fn endpoint(&self, addr: Ipv4Addr) -> Option<EndpointV4>;
    /// `POLICY_V4`: longest-prefix match of a full key.
    fn rule(&self, key: &PolicyKey) -> Option<PolicyValue>;

    /// The identity the datapath sees for `addr`.
    fn identity_of(&self, addr: Ipv4Addr) -> u32 {
        self.ipcache(addr).unwrap_or(IDENTITY_UNSELECTED)
    }

    /// The datapath's verdict on a new flow `src -> dst` (after service translation) in
    /// `dir`: ingress is checked at `dst`'s endpoint with peer `src`, egress at `src`'s
    /// with peer `dst`. `dport` is 0 for protocols without ports. Traffic from the node
    /// itself (always allowed for ingress by the datapath) is not modelled.
    fn verdict(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        dport: u16,
        dir: Direction,
    ) -> Verdict {
        let (local, peer) = match dir {
            Direction::Ingress => (dst, src),
            Direction::Egress => (src, dst),
        };
        let Some(ep) = self.endpoint(local) else {
            return Verdict::NoEndpoint;
        };
        let set = match dir {
            Direction::Ingress => ep.ingress_set,
            Direction::Egress => ep.egress_set,
        };
        if set == SET_NONE {
            return Verdict::NotIsolated;
        }
        let identity = self.identity_of(peer);
        self.rule(&PolicyKey::new(set, identity, proto, dport))
            .or_else(|| self.rule(&PolicyKey::new(set, IDENTITY_ANY, proto, dport)))
            .map_or(Verdict::Deny { set }, |v| Verdict::Allow { rule: v.rule })
    }
}

impl PolicyLookup for PolicyMaps {
    fn ipcache(&self, addr: Ipv4Addr) -> Option<u32> {
        ipv4_lookup(&self.ipcache, addr).map(|(_, id)| id)
    }

    fn endpoint(&self, addr: Ipv4Addr) -> Option<EndpointV4> {
        self.endpoints.get(&addr).copied()
    }

    fn rule(&self, key: &PolicyKey) -> Option<PolicyValue> {
        policy_lookup(&self.rules, key).map(|(_, v)| v)
    }
}

/// Computes the policy maps; see the module docs.
pub fn compute(input: &Input<'_>) -> PolicyMaps {
    let policies = sorted_policies(&input.policies);
    let pods = live_pods(&input.pods);
    let world = World::new(input, &policies, &pods);
    world.maps()
}

/// Policies by key; a duplicate key (never produced by the index) keeps the first.
pub(super) fn sorted_policies<'a>(policies: &[&'a Policy]) -> Vec<&'a Policy> {
    let mut sorted = policies.to_vec();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    sorted.dedup_by(|a, b| a.key == b.key);
    sorted
}

/// Pods that own their IP for policy, by IP.
pub(super) fn live_pods<'a>(pods: &[&'a Pod]) -> BTreeMap<Ipv4Addr, &'a Pod> {
    let mut by_ip: BTreeMap<Ipv4Addr, &Pod> = BTreeMap::new();
    for pod in pods {
        let Some(ip) = pod.ip.filter(|_| eligible(pod)) else { continue };
        let better = by_ip.get(&ip).is_none_or(|cur| claims_before(pod, cur));
        if better {
            by_ip.insert(ip, pod);
        }
    }
    by_ip
}

/// Whether a pod counts for policy at all (owns its IP if no better pod claims it).
pub(super) fn eligible(pod: &Pod) -> bool {
    pod.ip.is_some()
        && !pod.host_network
        && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
}

/// Of two pods claiming one IP, whether `a` wins over `b`: `Running` first, then the
/// smaller key.
pub(super) fn claims_before(a: &Pod, b: &Pod) -> bool {
    (a.phase != PodPhase::Running, &a.key) < (b.phase != PodPhase::Running, &b.key)
}

/// One peer of one rule, by position in the sorted policy list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct PeerRef {
    pub(super) policy: u32,
    pub(super) dir: Direction,
    pub(super) rule: u32,
    pub(super) peer: u32,
}

/// One rule, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct RuleIdx {
    pub(super) policy: u32,
    pub(super) dir: Direction,
    pub(super) rule: u32,
}

/// A named port with its protocol, as egress rules use them.
pub(super) type NamedPort = (String, PolicyProtocol);

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Signature {
    pub(super) peers: Vec<PeerRef>,
    /// (index in `World::named`, port) pairs, sorted.
    pub(super) named: Vec<(u32, u16)>,
}

pub(super) fn pod_namespace(pod: &Pod) -> &str {
    pod.key.namespace.as_deref().unwrap_or("")
}

/// The intermediate results every later step reads.
struct World<'a> {
    node_name: &'a str,
    policies: &'a [&'a Policy],
    pods: &'a BTreeMap<Ipv4Addr, &'a Pod>,
    /// Every (named port, protocol) of an egress rule, sorted; signatures index into it.
    named: Vec<NamedPort>,
    /// Identity of each signature.
    sig_ids: Vec<u32>,
    /// Signature index of each live pod IP.
    pod_sig: BTreeMap<Ipv4Addr, usize>,
    /// Signature index of each ipBlock prefix (and 0.0.0.0/0).
    prefix_sig: BTreeMap<Ipv4Cidr, usize>,
    /// Identities matched by each peer.
    ids_by_peer: HashMap<PeerRef, Vec<u32>>,
    /// Per named port: (identity, port) for every identity resolving it, sorted.
    ids_by_named: Vec<Vec<(u32, u16)>>,
    /// Every signature (index 0 the empty one).
    sigs: Vec<Signature>,
    /// The ipBlock peers of each prefix's own addresses.
    prefix_peers: BTreeMap<Ipv4Cidr, Vec<PeerRef>>,
}

/// What [`compute_parts`] keeps besides the maps: the intermediate results an incremental
/// update starts from ([`super::incremental`]).
pub(super) struct Parts {
    pub(super) named: Vec<NamedPort>,
    pub(super) sigs: Vec<Signature>,
    pub(super) sig_ids: Vec<u32>,
    pub(super) pod_sig: BTreeMap<Ipv4Addr, usize>,
    pub(super) prefix_sig: BTreeMap<Ipv4Cidr, usize>,
    pub(super) prefix_peers: BTreeMap<Ipv4Cidr, Vec<PeerRef>>,
    pub(super) ids_by_peer: HashMap<PeerRef, Vec<u32>>,
    pub(super) ids_by_named: Vec<Vec<(u32, u16)>>,
    /// Set inputs in use, with their content and id.
    pub(super) sets: Vec<(SetInput, SetContent, u32)>,
    /// Local pod IP -> index in `sets` per direction.
    pub(super) local: BTreeMap<Ipv4Addr, [Option<usize>; 2]>,
    /// Rule list -> rule id.
    pub(super) rule_ids: BTreeMap<Vec<RuleIdx>, u32>,
}

/// [`compute`], keeping the intermediate results.
pub(super) fn compute_parts(input: &Input<'_>) -> (PolicyMaps, Parts) {
    let policies = sorted_policies(&input.policies);
    let pods = live_pods(&input.pods);
    let world = World::new(input, &policies, &pods);
    let (maps, sets) = world.maps_and_sets();
    let World {
        named,
        sig_ids,
        pod_sig,
        prefix_sig,
        ids_by_peer,
        ids_by_named,
        sigs,
        prefix_peers,
        ..
    } = world;
    let parts = Parts {
        named,
        sigs,
        sig_ids,
        pod_sig,
        prefix_sig,
        prefix_peers,
        ids_by_peer,
        ids_by_named,
        sets: sets.sets,
        local: sets.local,
        rule_ids: sets.rule_ids,
    };
    (maps, parts)
}

/// The set part of [`Parts`].
struct SetParts {
    sets: Vec<(SetInput, SetContent, u32)>,
    local: BTreeMap<Ipv4Addr, [Option<usize>; 2]>,
    rule_ids: BTreeMap<Vec<RuleIdx>, u32>,
}

/// What computing a set's entries reads besides its input.
pub(super) struct SetCtx<'w> {
    pub(super) policies: &'w [&'w Policy],
    pub(super) named: &'w [NamedPort],
    pub(super) ids_by_peer: &'w HashMap<PeerRef, Vec<u32>>,
    pub(super) ids_by_named: &'w [Vec<(u32, u16)>],
}

impl<'a> World<'a> {
    fn new(
        input: &'a Input<'a>,
        policies: &'a [&'a Policy],
        pods: &'a BTreeMap<Ipv4Addr, &'a Pod>,
    ) -> Self {
        let named = egress_named_ports(policies);
        let mut interner = Interner::default();
        interner.intern(Signature::default()); // index 0: empty

        // ipBlock peers and the prefixes they list.
        let mut blocks: Vec<(PeerRef, Ipv4Cidr, &[Ipv4Cidr])> = Vec::new();
        let mut pod_peers: Vec<(PeerRef, &super::NamespaceScope, &super::Selector)> = Vec::new();
        for (pref, peer) in all_peers(policies) {
            match peer {
                Peer::IpBlock { cidr, except } => blocks.push((pref, *cidr, except)),
                Peer::Pods { namespaces, pods } => pod_peers.push((pref, namespaces, pods)),
            }
        }
        let mut prefixes: BTreeSet<Ipv4Cidr> = BTreeSet::new();
        prefixes.insert(lpm::ipv4_prefix(Ipv4Addr::UNSPECIFIED, 0));
        for (_, cidr, except) in &blocks {
            prefixes.insert(*cidr);
            prefixes.extend(except.iter().copied());
        }
        let mut prefix_peers: BTreeMap<Ipv4Cidr, Vec<PeerRef>> = BTreeMap::new();
        let mut prefix_sig = BTreeMap::new();
        // Only blocks whose cidr is one of the (at most 33) prefixes covering p can match.
        let mut blocks_by_cidr: HashMap<Ipv4Cidr, Vec<usize>> = HashMap::new();
        for (i, (_, cidr, _)) in blocks.iter().enumerate() {
            blocks_by_cidr.entry(*cidr).or_default().push(i);
        }
        for p in &prefixes {
            let mut peers: Vec<PeerRef> = (0..=p.prefix_len())
                .filter_map(|len| blocks_by_cidr.get(&lpm::ipv4_prefix(p.addr(), len)))
                .flatten()
                .map(|i| &blocks[*i])
                .filter(|(_, _, except)| !except.iter().any(|e| covers(e, p)))
                .map(|(pref, _, _)| *pref)
                .collect();
            peers.sort_unstable();
            prefix_sig
                .insert(*p, interner.intern(Signature { peers: peers.clone(), named: vec![] }));
            prefix_peers.insert(*p, peers);
        }

        // Pods grouped by (namespace, labels): selectors are evaluated once per group.
        let mut groups: BTreeMap<(&str, &Labels), usize> = BTreeMap::new();
        let mut group_of: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for (ip, pod) in pods {
            let next = groups.len();
            let g = *groups.entry((pod_namespace(pod), &pod.labels)).or_insert(next);
            group_of.insert(*ip, g);
        }
        let mut groups_by_ns: BTreeMap<&str, Vec<(usize, &Labels)>> = BTreeMap::new();
        for ((ns, labels), g) in &groups {
            groups_by_ns.entry(ns).or_default().push((*g, labels));
        }
        let mut group_peers: Vec<Vec<PeerRef>> = vec![Vec::new(); groups.len()];
        // Many peers repeat a (scope, selector) pair: evaluate each distinct pair once.
        type PairKey<'p> = (Option<&'p str>, Option<&'p super::Selector>, &'p super::Selector);
        let mut matching: HashMap<PairKey<'_>, Vec<usize>> = HashMap::new();
        // `pod_peers` is in PeerRef order, so every group's list comes out sorted.
        for (pref, scope, selector) in &pod_peers {
            let key: PairKey<'_> = match scope {
                super::NamespaceScope::Own(own) => (Some(own.as_str()), None, selector),
                super::NamespaceScope::Matching(sel) => (None, Some(sel), selector),
            };
            let members = matching.entry(key).or_insert_with(|| {
                let mut found = Vec::new();
                for (ns, members) in &groups_by_ns {
                    let in_scope = match scope {
                        super::NamespaceScope::Own(own) => own.as_str() == *ns,
                        // An unknown namespace matches no selector, not even `{}`.
                        super::NamespaceScope::Matching(sel) => {
                            input.namespaces.get(*ns).is_some_and(|labels| sel.matches(labels))
                        }
                    };
                    if in_scope {
                        found.extend(
                            members.iter().filter(|(_, l)| selector.matches(l)).map(|(g, _)| *g),
                        );
                    }
                }
                found
            });
            for g in members.iter() {
                group_peers[*g].push(*pref);
            }
        }

        // Pod signatures.
        let named_idx: BTreeMap<(&str, PolicyProtocol), u32> =
            (0..).zip(&named).map(|(i, (n, p))| ((n.as_str(), *p), i)).collect();
        let mut pod_sig = BTreeMap::new();
        for (ip, pod) in pods {
            let block_peers = ipv4_lookup(&prefix_sig, *ip)
                .and_then(|(p, _)| prefix_peers.get(&p))
                .map_or(&[][..], Vec::as_slice);
            let mut peers = group_peers[group_of[ip]].clone();
            peers.extend_from_slice(block_peers);
            peers.sort_unstable();
            peers.dedup();
            let mut resolved: Vec<(u32, u16)> = pod
                .container_ports
                .iter()
                .filter_map(|cp| {
                    let name = cp.name.as_deref()?;
                    let i = named_idx.get(&(name, cp.protocol))?;
                    Some((*i, cp.port))
                })
                .collect();
            resolved.sort_unstable();
            resolved.dedup();
            pod_sig.insert(*ip, interner.intern(Signature { peers, named: resolved }));
        }

        let sigs = interner.sigs;
        let sig_ids = assign_identity_ids(policies, &named, &sigs);
        let mut ids_by_peer: HashMap<PeerRef, Vec<u32>> = HashMap::new();
        let mut ids_by_named: Vec<Vec<(u32, u16)>> = vec![Vec::new(); named.len()];
        for (sig, id) in sigs.iter().zip(&sig_ids) {
            for p in &sig.peers {
                ids_by_peer.entry(*p).or_default().push(*id);
            }
            for (n, port) in &sig.named {
                ids_by_named[*n as usize].push((*id, *port));
            }
        }
        for v in ids_by_peer.values_mut() {
            v.sort_unstable();
        }
        for v in &mut ids_by_named {
            v.sort_unstable();
        }
        World {
            node_name: input.node_name,
            policies,
            pods,
            named,
            sig_ids,
            pod_sig,
            prefix_sig,
            ids_by_peer,
            ids_by_named,
            sigs,
            prefix_peers,
        }
    }

    fn ctx(&self) -> SetCtx<'_> {
        SetCtx {
            policies: self.policies,
            named: &self.named,
            ids_by_peer: &self.ids_by_peer,
            ids_by_named: &self.ids_by_named,
        }
    }

    fn maps(&self) -> PolicyMaps {
        self.maps_and_sets().0
    }

    fn maps_and_sets(&self) -> (PolicyMaps, SetParts) {
        let ctx = self.ctx();
        let mut maps = PolicyMaps::default();
        let mut identities: BTreeMap<u32, IdentityName> = BTreeMap::new();
        identities.insert(IDENTITY_UNSELECTED, IdentityName::default());
        // Every identity, even one no ipcache entry carries (a /32 ipBlock region taken
        // over by a pod's own entry): entries may still name it.
        for id in &self.sig_ids {
            identities.entry(*id).or_default();
        }
        for (p, s) in &self.prefix_sig {
            if p.prefix_len() == 32 && self.pod_sig.contains_key(&p.addr()) {
                continue; // the pod's own entry below
            }
            let id = self.sig_ids[*s];
            maps.ipcache.insert(*p, id);
            identities.entry(id).or_default().cidrs.push(*p);
        }
        for (ip, s) in &self.pod_sig {
            let id = self.sig_ids[*s];
            maps.ipcache.insert(lpm::ipv4_prefix(*ip, 32), id);
            let pod = self.pods[ip];
            let name = identities.entry(id).or_default();
            name.pods += 1;
            if name.example.as_ref().is_none_or(|e| pod.key < *e) {
                name.example = Some(pod.key.clone());
                name.labels = pod.labels.clone();
            }
        }
        maps.names.identities = identities;

        // Policy sets of local pods, computed once per distinct input.
        let mut set_of: BTreeMap<SetInput, usize> = BTreeMap::new();
        let mut contents: Vec<SetContent> = Vec::new();
        let mut local: Vec<(Ipv4Addr, u32, [Option<usize>; 2])> = Vec::new();
        for (ip, pod) in self.pods {
            if pod.node_name.as_deref() != Some(self.node_name) {
                continue;
            }
            let mut sets = [None, None];
            for (slot, dir) in sets.iter_mut().zip(Direction::ALL) {
                let Some(key) = set_input(self.policies, pod, dir) else { continue };
                let next = contents.len();
                let i = *set_of.entry(key).or_insert_with_key(|key| {
                    contents.push(set_content(&ctx, key));
                    next
                });
                *slot = Some(i);
            }
            local.push((*ip, self.sig_ids[self.pod_sig[ip]], sets));
        }

        // Rule ids for every distinct rule list, then set ids, then the entries.
        let rule_lists: BTreeSet<&Vec<RuleIdx>> =
            contents.iter().flat_map(|c| c.entries.values()).collect();
        let encoded: Vec<(Vec<u8>, &Vec<RuleIdx>)> = rule_lists
            .into_iter()
            .map(|l| {
                let mut b = vec![b'R'];
                encode_rules(self.policies, l, &mut b);
                (b, l)
            })
            .collect();
        let rule_ids: BTreeMap<&Vec<RuleIdx>, u32> =
            assign_ids(encoded, 1, 1 << 31).into_iter().collect();
        for (list, id) in &rule_ids {
            maps.names
                .rules
                .insert(*id, list.iter().map(|r| rule_ref(self.policies, *r)).collect());
        }
        let set_ids: Vec<u32> = {
            let encoded: Vec<(Vec<u8>, usize)> = contents
                .iter()
                .enumerate()
                .map(|(i, c)| (encode_set(self.policies, c), i))
                .collect();
            let ids: BTreeMap<usize, u32> = assign_ids(encoded, 1, 1 << 31).into_iter().collect();
            (0..contents.len()).map(|i| ids[&i]).collect()
        };
        for (c, set) in contents.iter().zip(&set_ids) {
            maps.names.sets.insert(*set, set_name(self.policies, c));
            for ((identity, proto, port, len), rules) in &c.entries {
                let key = mask_policy_key(&PolicyKey::new(*set, *identity, *proto, *port), *len);
                maps.rules.insert((key, *len), PolicyValue { rule: rule_ids[rules], _reserved: 0 });
            }
        }
        let local_sets = local.iter().map(|(ip, _, sets)| (*ip, *sets)).collect();
        for (ip, identity, sets) in local {
            let set = |s: Option<usize>| s.map_or(SET_NONE, |i| set_ids[i]);
            let content = |s: Option<usize>| s.map(|i| &contents[i]);
            maps.endpoints.insert(
                ip,
                EndpointV4 {
                    ingress_set: set(sets[0]),
                    egress_set: set(sets[1]),
                    identity,
                    flags: endpoint_flags(content(sets[0]), content(sets[1])),
                },
            );
        }
        let rule_ids = rule_ids.into_iter().map(|(l, id)| (l.clone(), id)).collect();
        let mut set_inputs: Vec<Option<SetInput>> = vec![None; contents.len()];
        for (input, i) in set_of {
            set_inputs[i] = Some(input);
        }
        let sets = set_inputs
            .into_iter()
            .zip(contents)
            .zip(set_ids)
            .filter_map(|((input, content), id)| Some((input?, content, id)))
            .collect();
        (maps, SetParts { sets, local: local_sets, rule_ids })
    }
}

/// What a pod's set in `dir` depends on; `None` if no policy isolates it. `policies`
/// sorted by key.
pub(super) fn set_input(policies: &[&Policy], pod: &Pod, dir: Direction) -> Option<SetInput> {
    // Policies are sorted by key, so those of one namespace are a range.
    let ns = &pod.key.namespace;
    let start = policies.partition_point(|p| p.key.namespace < *ns);
    let end = policies.partition_point(|p| p.key.namespace <= *ns);
    let isolating: Vec<u32> = (start as u32..)
        .zip(&policies[start..end])
        .filter(|(_, p)| dir.rules(p).is_some() && p.pod_selector.matches(&pod.labels))
        .map(|(i, _)| i)
        .collect();
    if isolating.is_empty() {
        return None;
    }
    // Ingress named ports resolve against the pod itself.
    let uses_named = dir == Direction::Ingress
        && isolating
            .iter()
            .any(|p| dir.rules(policies[*p as usize]).into_iter().flatten().any(rule_uses_named));
    let mut ports: Vec<(String, PolicyProtocol, u16)> = if uses_named {
        pod.container_ports
            .iter()
            .filter_map(|cp| Some((cp.name.clone()?, cp.protocol, cp.port)))
            .collect()
    } else {
        Vec::new()
    };
    ports.sort();
    ports.dedup();
    Some(SetInput { dir, policies: isolating, ports })
}

/// The entries of the set `input` names. Ingress named ports resolve against
/// `input.ports` (the pod's named ports, present whenever a rule uses one).
pub(super) fn set_content(ctx: &SetCtx<'_>, input: &SetInput) -> SetContent {
    let dir = input.dir;
    let mut entries: BTreeMap<EntryKey, BTreeSet<RuleIdx>> = BTreeMap::new();
    for p in &input.policies {
        let rules = dir.rules(ctx.policies[*p as usize]).unwrap_or_default();
        for (r, rule) in (0..).zip(rules) {
            let idx = RuleIdx { policy: *p, dir, rule: r };
            let mut add = |key: EntryKey| {
                entries.entry(key).or_default().insert(idx);
            };
            let peers: Vec<u32> = match &rule.peers {
                Peers::All => vec![IDENTITY_ANY],
                Peers::Only(list) => {
                    let mut ids: Vec<u32> = (0..list.len() as u32)
                        .filter_map(|peer| {
                            ctx.ids_by_peer.get(&PeerRef { policy: *p, dir, rule: r, peer })
                        })
                        .flatten()
                        .copied()
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids
                }
            };
            let port_list = match &rule.ports {
                Ports::All => {
                    for id in &peers {
                        add((*id, 0, 0, PolicyKey::PREFIX_ANY_PROTO));
                    }
                    continue;
                }
                Ports::Only(list) => list,
            };
            for pm in port_list {
                let proto = pm.protocol.ipproto();
                match &pm.port {
                    PortSpec::Any => {
                        for id in &peers {
                            add((*id, proto, 0, PolicyKey::PREFIX_ANY_PORT));
                        }
                    }
                    PortSpec::Range { first, last } => {
                        for b in port_blocks(*first, *last) {
                            for id in &peers {
                                add((*id, proto, b.first, b.prefix_len()));
                            }
                        }
                    }
                    PortSpec::Named(name) if dir == Direction::Ingress => {
                        let mut ports: Vec<u16> = input
                            .ports
                            .iter()
                            .filter(|(n, pr, _)| n == name && *pr == pm.protocol)
                            .map(|(_, _, port)| *port)
                            .collect();
                        ports.dedup();
                        for port in ports {
                            for id in &peers {
                                add((*id, proto, port, PolicyKey::PREFIX_FULL));
                            }
                        }
                    }
                    PortSpec::Named(name) => {
                        let Ok(n) = ctx.named.binary_search_by(|(nn, pr)| {
                            (nn.as_str(), *pr).cmp(&(name.as_str(), pm.protocol))
                        }) else {
                            continue;
                        };
                        for (id, port) in &ctx.ids_by_named[n] {
                            let peer_ok = match &rule.peers {
                                Peers::All => true,
                                Peers::Only(_) => peers.binary_search(id).is_ok(),
                            };
                            if peer_ok {
                                add((*id, proto, *port, PolicyKey::PREFIX_FULL));
                            }
                        }
                    }
                }
            }
        }
    }
    SetContent { dir, policies: input.policies.clone(), entries: attribute(entries) }
}

pub(super) fn set_name(policies: &[&Policy], c: &SetContent) -> SetName {
    SetName {
        dir: c.dir,
        policies: c.policies.iter().map(|p| policies[*p as usize].key.clone()).collect(),
    }
}

pub(super) fn rule_ref(policies: &[&Policy], r: RuleIdx) -> RuleRef {
    RuleRef { policy: policies[r.policy as usize].key.clone(), dir: r.dir, rule: r.rule }
}

pub(super) fn encode_rules(policies: &[&Policy], rules: &[RuleIdx], b: &mut Vec<u8>) {
    put_u32(b, rules.len() as u32);
    for r in rules {
        encode_key(&policies[r.policy as usize].key, b);
        b.push(r.dir.as_u8());
        put_u32(b, r.rule);
    }
}

pub(super) fn encode_set(policies: &[&Policy], c: &SetContent) -> Vec<u8> {
    let mut b = vec![b'S', c.dir.as_u8()];
    put_u32(&mut b, c.policies.len() as u32);
    for p in &c.policies {
        encode_key(&policies[*p as usize].key, &mut b);
    }
    for ((identity, proto, port, len), rules) in &c.entries {
        put_u32(&mut b, *identity);
        b.push(*proto);
        b.extend_from_slice(&port.to_be_bytes());
        b.push(*len as u8);
        encode_rules(policies, rules, &mut b);
    }
    b
}

/// Everything a policy set depends on: pods with equal inputs get equal sets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SetInput {
    pub(super) dir: Direction,
    /// Isolating policies, by position.
    pub(super) policies: Vec<u32>,
    /// The pod's named container ports, when an ingress rule uses a named port.
    pub(super) ports: Vec<(String, PolicyProtocol, u16)>,
}

/// (identity, proto, port, prefix length): an entry of a set before it has an id.
pub(super) type EntryKey = (u32, u8, u16, u32);

/// `EndpointV4::flags` of a pod with these ingress and egress sets: which of them has
/// entries for [`IDENTITY_ANY`], and which has entries shorter than the full key (in the
/// trie); the datapath skips the lookups a set cannot hit.
pub(super) fn endpoint_flags(ingress: Option<&SetContent>, egress: Option<&SetContent>) -> u32 {
    let has = |c: Option<&SetContent>, f: fn(&EntryKey) -> bool| {
        c.is_some_and(|c| c.entries.keys().any(f))
    };
    let any = |k: &EntryKey| k.0 == IDENTITY_ANY;
    let lpm = |k: &EntryKey| k.3 < PolicyKey::PREFIX_FULL;
    let mut flags = 0;
    for (set, any_bit, lpm_bit) in
        [(ingress, EP_F_INGRESS_ANY, EP_F_INGRESS_LPM), (egress, EP_F_EGRESS_ANY, EP_F_EGRESS_LPM)]
    {
        if has(set, any) {
            flags |= any_bit;
        }
        if has(set, lpm) {
            flags |= lpm_bit;
        }
    }
    flags
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SetContent {
    pub(super) dir: Direction,
    pub(super) policies: Vec<u32>,
    /// Entry -> sorted rules it is attributed to.
    pub(super) entries: BTreeMap<EntryKey, Vec<RuleIdx>>,
}

pub(super) fn rule_uses_named(rule: &Rule) -> bool {
    matches!(&rule.ports, Ports::Only(l) if l.iter().any(|p| matches!(p.port, PortSpec::Named(_))))
}

/// The protocol and port bits of an entry (24 bits), for coverage tests.
fn entry_bits(proto: u8, port: u16) -> u32 {
    (u32::from(proto) << 16) | u32::from(port)
}

/// Whether entry `outer` (same set) matches every flow `inner` matches.
fn entry_covers(outer: &EntryKey, inner: &EntryKey) -> bool {
    let (oid, oproto, oport, olen) = *outer;
    let (iid, iproto, iport, ilen) = *inner;
    if !(oid == iid || oid == IDENTITY_ANY) || olen > ilen {
        return false;
    }
    let shift = 24 - (olen - PolicyKey::PREFIX_ANY_PROTO);
    let high = |v: u32| v.checked_shr(shift).unwrap_or(0);
    high(entry_bits(oproto, oport)) == high(entry_bits(iproto, iport))
}

/// Each entry's rules plus those of every covering entry (see "Rule ids").
fn attribute(entries: BTreeMap<EntryKey, BTreeSet<RuleIdx>>) -> BTreeMap<EntryKey, Vec<RuleIdx>> {
    let mut by_identity: BTreeMap<u32, Vec<(EntryKey, &BTreeSet<RuleIdx>)>> = BTreeMap::new();
    for (k, r) in &entries {
        by_identity.entry(k.0).or_default().push((*k, r));
    }
    let none = Vec::new();
    let any = by_identity.get(&IDENTITY_ANY).unwrap_or(&none);
    let mut out = BTreeMap::new();
    for (id, list) in &by_identity {
        for (k, rules) in list {
            let mut all: BTreeSet<RuleIdx> = (*rules).clone();
            let candidates = list.iter().chain(if *id == IDENTITY_ANY { &none } else { any });
            for (other, other_rules) in candidates {
                if other != k && entry_covers(other, k) {
                    all.extend(other_rules.iter().copied());
                }
            }
            out.insert(*k, all.into_iter().collect());
        }
    }
    out
}

/// Every peer of every rule, in [`PeerRef`] order.
pub(super) fn all_peers<'a>(
    policies: &'a [&'a Policy],
) -> impl Iterator<Item = (PeerRef, &'a Peer)> + 'a {
    (0..).zip(policies).flat_map(|(policy, p)| {
        Direction::ALL.into_iter().flat_map(move |dir| {
            (0..).zip(dir.rules(p).unwrap_or_default()).flat_map(move |(rule, r)| {
                let peers = match &r.peers {
                    Peers::All => &[][..],
                    Peers::Only(list) => list.as_slice(),
                };
                (0..).zip(peers).map(move |(peer, x)| (PeerRef { policy, dir, rule, peer }, x))
            })
        })
    })
}

pub(super) fn egress_named_ports(policies: &[&Policy]) -> Vec<NamedPort> {
    let mut named: BTreeSet<NamedPort> = BTreeSet::new();
    for p in policies {
        for rule in p.egress.iter().flatten() {
            if let Ports::Only(list) = &rule.ports {
                for pm in list {
                    if let PortSpec::Named(n) = &pm.port {
                        named.insert((n.clone(), pm.protocol));
                    }
                }
            }
        }
    }
    named.into_iter().collect()
}

#[derive(Default)]
struct Interner {
    index: HashMap<Signature, usize>,
    sigs: Vec<Signature>,
}

impl Interner {
    fn intern(&mut self, sig: Signature) -> usize {
        if let Some(i) = self.index.get(&sig) {
            return *i;
        }
        let i = self.sigs.len();
        self.sigs.push(sig.clone());
        self.index.insert(sig, i);
        i
    }
}

/// Identity of every signature (index-aligned with `sigs`).
pub(super) fn assign_identity_ids(
    policies: &[&Policy],
    named: &[NamedPort],
    sigs: &[Signature],
) -> Vec<u32> {
    let mut ids = vec![IDENTITY_UNSELECTED; sigs.len()];
    let encoded: Vec<(Vec<u8>, usize)> = sigs
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(i, s)| (encode_identity(policies, named, s), i))
        .collect();
    for (i, id) in assign_ids(encoded, IDENTITY_FIRST_DYNAMIC, 1 << 31) {
        ids[i] = id;
    }
    ids
}

impl Signature {
    /// The empty signature: [`IDENTITY_UNSELECTED`], no hashed id.
    pub(super) fn is_empty(&self) -> bool {
        self.peers.is_empty() && self.named.is_empty()
    }
}

/// The canonical bytes of a non-empty signature, hashed into its identity.
pub(super) fn encode_identity(policies: &[&Policy], named: &[NamedPort], s: &Signature) -> Vec<u8> {
    let mut b = vec![b'I'];
    put_u32(&mut b, s.peers.len() as u32);
    for p in &s.peers {
        encode_key(&policies[p.policy as usize].key, &mut b);
        b.push(p.dir.as_u8());
        put_u32(&mut b, p.rule);
        put_u32(&mut b, p.peer);
    }
    for (n, port) in &s.named {
        let (name, proto) = &named[*n as usize];
        put_str(&mut b, name);
        b.push(proto.ipproto());
        b.extend_from_slice(&port.to_be_bytes());
    }
    b
}

/// Ids in `[lo, hi)` for distinct canonical encodings: FNV-1a 64 of the bytes, then linear
/// probing, claimed in byte order so the result does not depend on input order.
pub(super) fn assign_ids<T>(mut items: Vec<(Vec<u8>, T)>, lo: u32, hi: u32) -> Vec<(T, u32)> {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let span = u64::from(hi - lo);
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (bytes, item) in items {
        let mut id = lo + (fnv1a64(&bytes) % span) as u32;
        while !taken.insert(id) {
            id = if id + 1 == hi { lo } else { id + 1 };
        }
        out.push((item, id));
    }
    out
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s.as_bytes());
}

fn encode_key(key: &ObjectKey, b: &mut Vec<u8>) {
    put_str(b, key.namespace.as_deref().unwrap_or(""));
    put_str(b, &key.name);
}

/// Builders for small worlds, shared by the tests of this module and of the syncer.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::{Input, PolicyMaps, compute};
    use crate::model::{ContainerPort, Ipv4Cidr, Labels, ObjectKey, Pod, PodPhase};
    use crate::policy::{
        NamespaceScope, Operator, Peer, Peers, Policy, PolicyProtocol, PortMatch, PortSpec, Ports,
        Requirement, Rule, Selector,
    };

    pub const NODE: &str = "n1";

    pub fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    pub fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("cidr")
    }

    pub fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A running pod `ns/name` with IP 10.0.0.`last` on `node`.
    pub fn pod(ns: &str, name: &str, kv: &[(&str, &str)], last: u8, node: &str) -> Pod {
        Pod {
            key: ObjectKey::namespaced(ns, name),
            labels: labels(kv),
            ip: Some(ip(last)),
            phase: PodPhase::Running,
            node_name: Some(node.to_string()),
            container_ports: Vec::new(),
            host_network: false,
        }
    }

    pub fn with_port(mut pod: Pod, name: &str, port: u16, protocol: PolicyProtocol) -> Pod {
        pod.container_ports.push(ContainerPort { name: Some(name.to_string()), port, protocol });
        pod
    }

    pub fn sel(kv: &[(&str, &str)]) -> Selector {
        Selector { match_labels: labels(kv), match_expressions: Vec::new() }
    }

    pub fn policy(
        ns: &str,
        name: &str,
        selector: Selector,
        ingress: Option<Vec<Rule>>,
        egress: Option<Vec<Rule>>,
    ) -> Policy {
        Policy { key: ObjectKey::namespaced(ns, name), pod_selector: selector, ingress, egress }
    }

    pub fn rule(peers: Option<Vec<Peer>>, ports: Option<Vec<PortMatch>>) -> Rule {
        Rule {
            peers: peers.map_or(Peers::All, Peers::Only),
            ports: ports.map_or(Ports::All, Ports::Only),
        }
    }

    pub fn pods_in(ns: &str, kv: &[(&str, &str)]) -> Peer {
        Peer::Pods { namespaces: NamespaceScope::Own(ns.to_string()), pods: sel(kv) }
    }

    pub fn pods_where(ns_kv: &[(&str, &str)], kv: &[(&str, &str)]) -> Peer {
        Peer::Pods { namespaces: NamespaceScope::Matching(sel(ns_kv)), pods: sel(kv) }
    }

    pub fn block(c: &str, except: &[&str]) -> Peer {
        Peer::IpBlock { cidr: cidr(c), except: except.iter().map(|e| cidr(e)).collect() }
    }

    pub fn port(protocol: PolicyProtocol, first: u16, last: u16) -> PortMatch {
        PortMatch { protocol, port: PortSpec::Range { first, last } }
    }

    pub fn tcp(p: u16) -> PortMatch {
        port(PolicyProtocol::Tcp, p, p)
    }

    pub fn named(name: &str) -> PortMatch {
        PortMatch { protocol: PolicyProtocol::Tcp, port: PortSpec::Named(name.to_string()) }
    }

    #[derive(Clone, Debug, Default)]
    pub struct TestWorld {
        pub pods: Vec<Pod>,
        pub namespaces: BTreeMap<String, Labels>,
        pub policies: Vec<Policy>,
    }

    impl TestWorld {
        pub fn new(pods: Vec<Pod>, policies: Vec<Policy>) -> Self {
            let mut namespaces: BTreeMap<String, Labels> = BTreeMap::new();
            for p in &pods {
                let ns = p.key.namespace.clone().unwrap_or_default();
                namespaces.insert(ns.clone(), labels(&[("name", &ns)]));
            }
            Self { pods, namespaces, policies }
        }

        pub fn ns(mut self, name: &str, kv: &[(&str, &str)]) -> Self {
            self.namespaces.insert(name.to_string(), labels(kv));
            self
        }

        pub fn compute(&self) -> PolicyMaps {
            compute(&Input {
                pods: self.pods.iter().collect(),
                namespaces: &self.namespaces,
                policies: self.policies.iter().collect(),
                node_name: NODE,
            })
        }

        pub fn reference(&self) -> crate::policy::reference::World {
            crate::policy::reference::World {
                pods: self.pods.clone(),
                namespaces: self.namespaces.clone(),
                policies: self.policies.clone(),
            }
        }
    }

    // Random small worlds: 3 namespaces (all known), up to 8 pods on two nodes with unique
    // IPs 10.0.0.1.., up to 4 policies over a small vocabulary of labels, ipBlocks and ports.

    pub fn label_set() -> impl Strategy<Value = Labels> {
        (
            prop::option::of(prop::sample::select(vec!["x", "y"])),
            prop::option::of(prop::sample::select(vec!["1", "2"])),
        )
            .prop_map(|(app, tier)| {
                let mut l = Labels::new();
                if let Some(a) = app {
                    l.insert("app".into(), a.into());
                }
                if let Some(t) = tier {
                    l.insert("tier".into(), t.into());
                }
                l
            })
    }

    fn selector() -> impl Strategy<Value = Selector> {
        let req = prop_oneof![
            Just(None),
            Just(Some(Requirement {
                key: "app".into(),
                op: Operator::In,
                values: vec!["x".into()]
            })),
            Just(Some(Requirement {
                key: "tier".into(),
                op: Operator::NotIn,
                values: vec!["1".into()]
            })),
            Just(Some(Requirement { key: "app".into(), op: Operator::Exists, values: vec![] })),
            Just(Some(Requirement {
                key: "tier".into(),
                op: Operator::DoesNotExist,
                values: vec![]
            })),
            Just(Some(Requirement {
                key: "team".into(),
                op: Operator::In,
                values: vec!["a".into(), "b".into()]
            })),
        ];
        (label_set(), req).prop_map(|(match_labels, req)| Selector {
            match_labels,
            match_expressions: req.into_iter().collect(),
        })
    }

    fn ns_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from)
    }

    fn peer() -> impl Strategy<Value = Peer> {
        let cidrs = vec!["10.0.0.0/29", "10.0.0.0/30", "0.0.0.0/0", "10.0.0.4/30", "10.0.0.0/24"];
        let excepts = vec!["10.0.0.2/31", "10.0.0.0/30", "10.0.0.5/32", "10.0.0.0/28"];
        prop_oneof![
            (ns_name(), selector())
                .prop_map(|(ns, pods)| Peer::Pods { namespaces: NamespaceScope::Own(ns), pods }),
            (selector(), selector())
                .prop_map(|(n, pods)| Peer::Pods { namespaces: NamespaceScope::Matching(n), pods }),
            (prop::sample::select(cidrs), prop::sample::subsequence(excepts, 0..=2)).prop_map(
                |(c, e)| Peer::IpBlock {
                    cidr: cidr(c),
                    except: e.iter().map(|x| cidr(x)).collect()
                }
            ),
        ]
    }

    fn port_match() -> impl Strategy<Value = PortMatch> {
        let proto = prop::sample::select(PolicyProtocol::ALL.to_vec());
        let spec = prop_oneof![
            Just(PortSpec::Any),
            prop::sample::select(vec![
                (80u16, 80u16),
                (79, 81),
                (0, 65535),
                (8000, 8080),
                (53, 53)
            ])
            .prop_map(|(first, last)| PortSpec::Range { first, last }),
            prop::sample::select(vec!["http", "dns"]).prop_map(|n| PortSpec::Named(n.into())),
        ];
        (proto, spec).prop_map(|(protocol, port)| PortMatch { protocol, port })
    }

    fn rule_strategy() -> impl Strategy<Value = Rule> {
        let peers = prop_oneof![
            1 => Just(Peers::All),
            3 => prop::collection::vec(peer(), 0..3).prop_map(Peers::Only),
        ];
        let ports = prop_oneof![
            1 => Just(Ports::All),
            3 => prop::collection::vec(port_match(), 0..3).prop_map(Ports::Only),
        ];
        (peers, ports).prop_map(|(peers, ports)| Rule { peers, ports })
    }

    fn policy_strategy()
    -> impl Strategy<Value = (String, Selector, Option<Vec<Rule>>, Option<Vec<Rule>>)> {
        let rules = || prop::option::of(prop::collection::vec(rule_strategy(), 0..3));
        (ns_name(), selector(), rules(), rules())
    }

    fn pod_strategy()
    -> impl Strategy<Value = (String, Labels, PodPhase, bool, bool, Option<u16>, Option<PolicyProtocol>)>
    {
        (
            ns_name(),
            label_set(),
            prop::sample::select(vec![
                PodPhase::Running,
                PodPhase::Running,
                PodPhase::Pending,
                PodPhase::Failed,
            ]),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.7),
            prop::option::of(prop::sample::select(vec![80u16, 8080])),
            // "dns" on port 53, in any protocol (SCTP included).
            prop::option::of(prop::sample::select(PolicyProtocol::ALL.to_vec())),
        )
    }

    pub fn world() -> impl Strategy<Value = TestWorld> {
        (
            prop::collection::vec(pod_strategy(), 0..8),
            prop::collection::vec(policy_strategy(), 0..4),
        )
            .prop_map(|(pods, policies)| {
                let pods = (1u8..)
                    .zip(pods)
                    .map(|(i, (ns, labels, phase, host_network, local, http, dns))| {
                        let mut p =
                            pod(&ns, &format!("p{i}"), &[], i, if local { NODE } else { "n2" });
                        p.labels = labels;
                        p.phase = phase;
                        p.host_network = host_network;
                        if let Some(h) = http {
                            p = with_port(p, "http", h, PolicyProtocol::Tcp);
                        }
                        if let Some(proto) = dns {
                            p = with_port(p, "dns", 53, proto);
                        }
                        p
                    })
                    .collect();
                let policies = (0..)
                    .zip(policies)
                    .map(|(i, (ns, s, ingress, egress))| {
                        policy(&ns, &format!("np{i}"), s, ingress, egress)
                    })
                    .collect();
                TestWorld::new(pods, policies)
                    .ns("a", &[("team", "a")])
                    .ns("b", &[("team", "b"), ("app", "x")])
                    .ns("c", &[])
            })
    }

    /// Addresses worth asking about in a [`world`]: every pod IP and a few others.
    pub fn addresses(w: &TestWorld) -> Vec<Ipv4Addr> {
        let mut a: Vec<Ipv4Addr> = w.pods.iter().filter_map(|p| p.ip).collect();
        a.extend([ip(2), ip(5), ip(100), Ipv4Addr::new(192, 168, 0, 1)]);
        a.sort();
        a.dedup();
        a
    }

    /// (proto, port) pairs worth asking about.
    pub fn flows() -> Vec<(u8, u16)> {
        let mut f = vec![(nodeplane_common::policy::IPPROTO_ICMP, 0)];
        for proto in PolicyProtocol::ALL {
            for port in [0u16, 53, 79, 80, 81, 8080, 65535] {
                f.push((proto.ipproto(), port));
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use nodeplane_common::maps::{IPPROTO_TCP, IPPROTO_UDP};
    use nodeplane_common::policy::IPPROTO_ICMP;
    use proptest::prelude::*;

    use super::fixtures::*;
    use super::*;
    use crate::model::PodPhase;
    use crate::policy::{PolicyProtocol, reference};

    const IN: Direction = Direction::Ingress;
    const EG: Direction = Direction::Egress;

    fn allows(m: &PolicyMaps, src: u8, dst: u8, proto: u8, port: u16, dir: Direction) -> bool {
        m.verdict(ip(src), ip(dst), proto, port, dir).allowed()
    }

    /// Entries of `set`, as (identity, proto, port, prefix length).
    fn entries(m: &PolicyMaps, set: u32) -> Vec<(u32, u8, u16, u32)> {
        m.rules
            .keys()
            .filter(|(k, _)| k.set == set.to_be_bytes())
            .map(|(k, len)| {
                (u32::from_be_bytes(k.identity), k.proto, u16::from_be_bytes(k.port), *len)
            })
            .collect()
    }

    /// Every number in the maps has a name, keys are canonical, sets are referenced.
    fn assert_consistent(m: &PolicyMaps) {
        for (c, id) in &m.ipcache {
            assert!(m.names.identities.contains_key(id), "{c} -> unnamed identity {id}");
            assert!(*id == IDENTITY_UNSELECTED || *id >= IDENTITY_FIRST_DYNAMIC, "{c} -> {id}");
        }
        assert!(m.ipcache.contains_key(&cidr("0.0.0.0/0")));
        for (addr, ep) in &m.endpoints {
            assert_eq!(m.ipcache.get(&lpm::ipv4_prefix(*addr, 32)), Some(&ep.identity));
            for set in [ep.ingress_set, ep.egress_set] {
                assert!(set == SET_NONE || m.names.sets.contains_key(&set), "{addr}: set {set}");
            }
        }
        let used: BTreeSet<u32> =
            m.endpoints.values().flat_map(|e| [e.ingress_set, e.egress_set]).collect();
        for set in m.names.sets.keys() {
            assert!(used.contains(set), "set {set} named but unused");
        }
        for ((k, len), v) in &m.rules {
            assert_eq!(mask_policy_key(k, *len), *k, "canonical key");
            assert!((PolicyKey::PREFIX_ANY_PROTO..=PolicyKey::PREFIX_FULL).contains(len));
            let set = u32::from_be_bytes(k.set);
            assert!(m.names.sets.contains_key(&set), "entry of unnamed set {set}");
            let id = u32::from_be_bytes(k.identity);
            assert!(id == IDENTITY_ANY || m.names.identities.contains_key(&id), "identity {id}");
            assert!(m.names.rules.get(&v.rule).is_some_and(|r| !r.is_empty()), "rule {}", v.rule);
        }
    }

    #[test]
    fn default_deny_ingress() {
        let w = TestWorld::new(
            vec![
                pod("prod", "db", &[("app", "db")], 1, NODE),
                pod("prod", "web", &[("app", "web")], 2, NODE),
            ],
            vec![policy("prod", "deny", sel(&[("app", "db")]), Some(vec![]), None)],
        );
        let m = w.compute();
        assert_consistent(&m);
        let db = m.endpoints[&ip(1)];
        assert_ne!(db.ingress_set, SET_NONE);
        assert_eq!(db.egress_set, SET_NONE);
        assert!(entries(&m, db.ingress_set).is_empty());
        assert_eq!(
            m.names.sets[&db.ingress_set].policies,
            vec![ObjectKey::namespaced("prod", "deny")]
        );
        assert_eq!(
            m.verdict(ip(2), ip(1), IPPROTO_TCP, 80, IN),
            Verdict::Deny { set: db.ingress_set }
        );
        assert_eq!(m.verdict(ip(1), ip(2), IPPROTO_TCP, 80, EG), Verdict::NotIsolated);
        assert_eq!(m.verdict(ip(1), ip(2), IPPROTO_TCP, 80, IN), Verdict::NotIsolated);
        assert_eq!(m.verdict(ip(9), ip(2), IPPROTO_TCP, 80, IN), Verdict::NotIsolated);
        assert_eq!(m.verdict(ip(2), ip(9), IPPROTO_TCP, 80, IN), Verdict::NoEndpoint);
    }

    #[test]
    fn only_local_pods_get_endpoints() {
        let mut gone = pod("prod", "old", &[], 3, NODE);
        gone.phase = PodPhase::Succeeded;
        let mut host = pod("prod", "host", &[], 4, NODE);
        host.host_network = true;
        let mut no_ip = pod("prod", "new", &[], 5, NODE);
        no_ip.ip = None;
        let w = TestWorld::new(
            vec![
                pod("prod", "here", &[], 1, NODE),
                pod("prod", "there", &[], 2, "n2"),
                gone,
                host,
                no_ip,
            ],
            vec![],
        );
        let m = w.compute();
        assert_consistent(&m);
        assert_eq!(m.endpoints.keys().copied().collect::<Vec<_>>(), vec![ip(1)]);
        let pods: Vec<Ipv4Cidr> =
            m.ipcache.keys().filter(|c| c.prefix_len() == 32).copied().collect();
        assert_eq!(pods, vec![cidr("10.0.0.1/32"), cidr("10.0.0.2/32")]);
        // No policy: every pod has the empty signature.
        assert!(m.ipcache.values().all(|id| *id == IDENTITY_UNSELECTED));
        assert_eq!(m.names.identities[&IDENTITY_UNSELECTED].pods, 2);
    }

    #[test]
    fn allow_from_namespace() {
        let w = TestWorld::new(
            vec![
                pod("prod", "db", &[("app", "db")], 1, NODE),
                pod("team-a", "client", &[], 2, NODE),
                pod("team-b", "client", &[], 3, "n2"),
            ],
            vec![policy(
                "prod",
                "from-a",
                sel(&[("app", "db")]),
                Some(vec![rule(
                    Some(vec![pods_where(&[("team", "a")], &[])]),
                    Some(vec![tcp(5432)]),
                )]),
                None,
            )],
        )
        .ns("team-a", &[("team", "a")])
        .ns("team-b", &[("team", "b")]);
        let m = w.compute();
        assert_consistent(&m);
        assert!(allows(&m, 2, 1, IPPROTO_TCP, 5432, IN));
        assert!(!allows(&m, 2, 1, IPPROTO_TCP, 5433, IN));
        assert!(!allows(&m, 2, 1, IPPROTO_UDP, 5432, IN));
        assert!(!allows(&m, 3, 1, IPPROTO_TCP, 5432, IN));
        assert!(!allows(&m, 100, 1, IPPROTO_TCP, 5432, IN));
        let db = m.endpoints[&ip(1)];
        let client = m.identity_of(ip(2));
        assert_eq!(entries(&m, db.ingress_set), vec![(client, IPPROTO_TCP, 5432, 88)]);
        let Verdict::Allow { rule } = m.verdict(ip(2), ip(1), IPPROTO_TCP, 5432, IN) else {
            panic!("allowed");
        };
        assert_eq!(
            m.names.rules[&rule],
            vec![RuleRef { policy: ObjectKey::namespaced("prod", "from-a"), dir: IN, rule: 0 }]
        );
        assert!(m.names.identities[&client].to_string().contains("team-a/client"));
    }

    #[test]
    fn namespace_and_pod_selector_and_versus_or() {
        let pods = vec![
            pod("prod", "db", &[("app", "db")], 1, NODE),
            pod("team-a", "web", &[("app", "web")], 2, NODE),
            pod("team-a", "batch", &[("app", "batch")], 3, NODE),
            pod("team-b", "web", &[("app", "web")], 4, NODE),
        ];
        let and = vec![rule(Some(vec![pods_where(&[("team", "a")], &[("app", "web")])]), None)];
        let or = vec![rule(
            Some(vec![pods_where(&[("team", "a")], &[]), pods_where(&[], &[("app", "web")])]),
            None,
        )];
        for (peers, want) in [(and, [true, false, false]), (or, [true, true, true])] {
            let w = TestWorld::new(
                pods.clone(),
                vec![policy("prod", "p", sel(&[("app", "db")]), Some(peers), None)],
            )
            .ns("team-a", &[("team", "a")]);
            let m = w.compute();
            assert_consistent(&m);
            let got = [2, 3, 4].map(|src| allows(&m, src, 1, IPPROTO_TCP, 80, IN));
            assert_eq!(got, want);
        }
    }

    #[test]
    fn ip_block_with_except_over_pod_ips() {
        // The except starts where the cidr does: the signature of 10.0.0.0/24 must not be
        // taken at 10.0.0.0 (which is in the except).
        let w = TestWorld::new(
            vec![pod("prod", "db", &[("app", "db")], 20, NODE), pod("prod", "other", &[], 5, "n2")],
            vec![policy(
                "prod",
                "blocks",
                sel(&[("app", "db")]),
                Some(vec![rule(Some(vec![block("10.0.0.0/24", &["10.0.0.0/28"])]), None)]),
                None,
            )],
        );
        let m = w.compute();
        assert_consistent(&m);
        for c in ["0.0.0.0/0", "10.0.0.0/24", "10.0.0.0/28", "10.0.0.5/32", "10.0.0.20/32"] {
            assert!(m.ipcache.contains_key(&cidr(c)), "{c}");
        }
        assert_eq!(m.ipcache[&cidr("10.0.0.0/28")], IDENTITY_UNSELECTED);
        assert_eq!(m.ipcache[&cidr("0.0.0.0/0")], IDENTITY_UNSELECTED);
        assert_ne!(m.ipcache[&cidr("10.0.0.0/24")], IDENTITY_UNSELECTED);
        assert!(allows(&m, 100, 20, IPPROTO_TCP, 1, IN));
        assert!(allows(&m, 16, 20, IPPROTO_ICMP, 0, IN));
        assert!(allows(&m, 20, 20, IPPROTO_TCP, 1, IN), "the pod itself is in the block");
        assert!(!allows(&m, 5, 20, IPPROTO_TCP, 1, IN), "pod in the except");
        assert!(!allows(&m, 3, 20, IPPROTO_TCP, 1, IN), "address in the except");
        assert!(!m.verdict(Ipv4Addr::new(10, 0, 1, 1), ip(20), IPPROTO_TCP, 1, IN).allowed());
        // The pod at .5 is in the except, so it shares the except's (empty) signature.
        assert_eq!(m.identity_of(ip(5)), IDENTITY_UNSELECTED);
        assert_eq!(m.identity_of(ip(20)), m.ipcache[&cidr("10.0.0.0/24")]);
    }

    #[test]
    fn port_ranges_become_prefix_blocks() {
        let ports = vec![
            port(PolicyProtocol::Tcp, 0, 65535),
            port(PolicyProtocol::Udp, 32000, 32768),
            port(PolicyProtocol::Sctp, 9, 9),
        ];
        let w = TestWorld::new(
            vec![pod("prod", "db", &[], 1, NODE)],
            vec![policy("prod", "p", sel(&[]), Some(vec![rule(None, Some(ports))]), None)],
        );
        let m = w.compute();
        assert_consistent(&m);
        let set = m.endpoints[&ip(1)].ingress_set;
        let udp = IPPROTO_UDP;
        let sctp = nodeplane_common::policy::IPPROTO_SCTP;
        assert_eq!(
            entries(&m, set),
            vec![
                (IDENTITY_ANY, IPPROTO_TCP, 0, 72),
                (IDENTITY_ANY, udp, 32000, 80),
                (IDENTITY_ANY, udp, 32256, 79),
                (IDENTITY_ANY, udp, 32768, 88),
                (IDENTITY_ANY, sctp, 9, 88),
            ]
        );
        for (proto, port, want) in [
            (IPPROTO_TCP, 0, true),
            (IPPROTO_TCP, 65535, true),
            (udp, 31999, false),
            (udp, 32000, true),
            (udp, 32767, true),
            (udp, 32768, true),
            (udp, 32769, false),
            (sctp, 9, true),
            (sctp, 10, false),
            (IPPROTO_ICMP, 0, false),
        ] {
            assert_eq!(allows(&m, 100, 1, proto, port, IN), want, "{proto}/{port}");
        }
    }

    #[test]
    fn ingress_named_ports_resolve_per_local_pod() {
        let web1 = with_port(
            pod("prod", "web1", &[("app", "web")], 1, NODE),
            "http",
            80,
            PolicyProtocol::Tcp,
        );
        let web2 = with_port(
            pod("prod", "web2", &[("app", "web")], 2, NODE),
            "http",
            8080,
            PolicyProtocol::Tcp,
        );
        let web3 = with_port(
            pod("prod", "web3", &[("app", "web")], 3, NODE),
            "http",
            80,
            PolicyProtocol::Udp,
        );
        let w = TestWorld::new(
            vec![web1, web2, web3, pod("prod", "client", &[], 9, "n2")],
            vec![policy(
                "prod",
                "http",
                sel(&[("app", "web")]),
                Some(vec![rule(None, Some(vec![named("http")]))]),
                None,
            )],
        );
        let m = w.compute();
        assert_consistent(&m);
        assert!(allows(&m, 9, 1, IPPROTO_TCP, 80, IN));
        assert!(!allows(&m, 9, 1, IPPROTO_TCP, 8080, IN));
        assert!(allows(&m, 9, 2, IPPROTO_TCP, 8080, IN));
        assert!(!allows(&m, 9, 2, IPPROTO_TCP, 80, IN));
        // web3 names a UDP port "http": no TCP entry, but still isolated.
        assert!(!allows(&m, 9, 3, IPPROTO_TCP, 80, IN));
        assert!(!allows(&m, 9, 3, IPPROTO_UDP, 80, IN));
        let set3 = m.endpoints[&ip(3)].ingress_set;
        assert_ne!(set3, SET_NONE);
        assert!(entries(&m, set3).is_empty());
        assert_ne!(m.endpoints[&ip(1)].ingress_set, m.endpoints[&ip(2)].ingress_set);
    }

    #[test]
    fn egress_named_ports_resolve_per_peer_identity() {
        let web1 = with_port(
            pod("prod", "web1", &[("app", "web")], 1, "n2"),
            "http",
            80,
            PolicyProtocol::Tcp,
        );
        let web2 = with_port(
            pod("prod", "web2", &[("app", "web")], 2, "n2"),
            "http",
            8080,
            PolicyProtocol::Tcp,
        );
        let other = with_port(pod("prod", "other", &[], 3, "n2"), "http", 81, PolicyProtocol::Tcp);
        let client = pod("prod", "client", &[("app", "client")], 9, NODE);
        let all = pod("prod", "all", &[("app", "all")], 10, NODE);
        let w = TestWorld::new(
            vec![web1, web2, other, client, all],
            vec![
                policy(
                    "prod",
                    "to-web",
                    sel(&[("app", "client")]),
                    None,
                    Some(vec![rule(
                        Some(vec![pods_in("prod", &[("app", "web")])]),
                        Some(vec![named("http")]),
                    )]),
                ),
                policy(
                    "prod",
                    "to-any",
                    sel(&[("app", "all")]),
                    None,
                    Some(vec![rule(None, Some(vec![named("http")]))]),
                ),
            ],
        );
        let m = w.compute();
        assert_consistent(&m);
        assert_ne!(m.identity_of(ip(1)), m.identity_of(ip(2)), "different resolutions");
        assert!(allows(&m, 9, 1, IPPROTO_TCP, 80, EG));
        assert!(!allows(&m, 9, 1, IPPROTO_TCP, 8080, EG));
        assert!(allows(&m, 9, 2, IPPROTO_TCP, 8080, EG));
        assert!(!allows(&m, 9, 2, IPPROTO_TCP, 80, EG));
        assert!(!allows(&m, 9, 3, IPPROTO_TCP, 81, EG), "not selected");
        assert!(!allows(&m, 9, 100, IPPROTO_TCP, 80, EG));
        // Without peers: every pod resolving the name, with its own port; never a non-pod.
        assert!(allows(&m, 10, 1, IPPROTO_TCP, 80, EG));
        assert!(allows(&m, 10, 2, IPPROTO_TCP, 8080, EG));
        assert!(allows(&m, 10, 3, IPPROTO_TCP, 81, EG));
        assert!(!allows(&m, 10, 3, IPPROTO_TCP, 80, EG));
        assert!(!allows(&m, 10, 100, IPPROTO_TCP, 80, EG));
        let set = m.endpoints[&ip(10)].egress_set;
        assert!(entries(&m, set).iter().all(|e| e.0 != IDENTITY_ANY));
    }

    #[test]
    fn icmp_only_by_rules_without_ports() {
        let w = TestWorld::new(
            vec![
                pod("prod", "a", &[("app", "a")], 1, NODE),
                pod("prod", "b", &[("app", "b")], 2, NODE),
            ],
            vec![
                policy(
                    "prod",
                    "ports",
                    sel(&[("app", "a")]),
                    Some(vec![rule(None, Some(vec![tcp(80)]))]),
                    None,
                ),
                policy("prod", "all", sel(&[("app", "b")]), Some(vec![rule(None, None)]), None),
            ],
        );
        let m = w.compute();
        assert!(!allows(&m, 100, 1, IPPROTO_ICMP, 0, IN));
        assert!(allows(&m, 100, 2, IPPROTO_ICMP, 0, IN));
    }

    #[test]
    fn rule_ids_name_every_allowing_rule() {
        // Rule 0 allows everything from anyone, rule 1 TCP 80 from `web`: the 88 entry is
        // the longest match, and its id names both rules.
        let w = TestWorld::new(
            vec![
                pod("prod", "db", &[("app", "db")], 1, NODE),
                pod("prod", "web", &[("app", "web")], 2, NODE),
            ],
            vec![policy(
                "prod",
                "p",
                sel(&[("app", "db")]),
                Some(vec![
                    rule(None, Some(vec![port(PolicyProtocol::Tcp, 0, 65535)])),
                    rule(Some(vec![pods_in("prod", &[("app", "web")])]), Some(vec![tcp(80)])),
                ]),
                None,
            )],
        );
        let m = w.compute();
        assert_consistent(&m);
        let Verdict::Allow { rule } = m.verdict(ip(2), ip(1), IPPROTO_TCP, 80, IN) else {
            panic!("allowed")
        };
        let key = ObjectKey::namespaced("prod", "p");
        assert_eq!(
            m.names.rules[&rule],
            vec![
                RuleRef { policy: key.clone(), dir: IN, rule: 0 },
                RuleRef { policy: key.clone(), dir: IN, rule: 1 }
            ]
        );
        let Verdict::Allow { rule } = m.verdict(ip(2), ip(1), IPPROTO_TCP, 81, IN) else {
            panic!("allowed")
        };
        assert_eq!(m.names.rules[&rule], vec![RuleRef { policy: key, dir: IN, rule: 0 }]);
    }

    fn sample_world() -> TestWorld {
        let mut pods = Vec::new();
        for i in 1..=20u8 {
            let app = ["web", "db", "cache"][usize::from(i) % 3];
            let ns = ["a", "b"][usize::from(i) % 2];
            let node = if i % 2 == 0 { NODE } else { "n2" };
            let p = pod(ns, &format!("p{i}"), &[("app", app)], i, node);
            pods.push(with_port(p, "http", 8000 + u16::from(i % 3), PolicyProtocol::Tcp));
        }
        let policies = vec![
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
                    Some(vec![block("10.0.0.0/29", &["10.0.0.4/31"])]),
                    Some(vec![named("http"), tcp(53)]),
                )]),
            ),
            policy("a", "deny", sel(&[]), Some(vec![]), Some(vec![])),
        ];
        TestWorld::new(pods, policies)
    }

    #[test]
    fn identities_do_not_depend_on_input_order() {
        let w = sample_world();
        let m = w.compute();
        assert_consistent(&m);
        let mut r = w.clone();
        r.pods.reverse();
        r.policies.reverse();
        r.pods.rotate_left(7);
        assert_eq!(r.compute(), m);
    }

    #[test]
    fn an_unrelated_pod_keeps_every_id() {
        let w = sample_world();
        let m = w.compute();
        let mut more = w.clone();
        more.pods.push(pod("elsewhere", "new", &[("app", "new")], 200, NODE));
        more.namespaces.insert("elsewhere".into(), Labels::new());
        let m2 = more.compute();
        for (c, id) in &m.ipcache {
            assert_eq!(m2.ipcache.get(c), Some(id), "{c}");
        }
        for (a, ep) in &m.endpoints {
            assert_eq!(m2.endpoints.get(a), Some(ep), "{a}");
        }
        // No peer selects the new pod (wrong labels), so every set keeps its entries.
        assert_eq!(m2.rules, m.rules);
    }

    #[test]
    fn one_ip_two_pods_prefers_the_running_one() {
        let mut pending = pod("prod", "a-pending", &[("app", "old")], 1, NODE);
        pending.phase = PodPhase::Pending;
        let running = pod("prod", "b-running", &[("app", "new")], 1, NODE);
        let mut failed = pod("prod", "c-failed", &[("app", "new")], 1, NODE);
        failed.phase = PodPhase::Failed;
        let policies = vec![policy("prod", "p", sel(&[("app", "new")]), Some(vec![]), None)];
        let mut w = TestWorld::new(vec![pending, running, failed], policies);
        let m = w.compute();
        assert_ne!(m.endpoints[&ip(1)].ingress_set, SET_NONE, "the Running pod's policy");
        w.pods.reverse();
        assert_eq!(w.compute(), m);
    }

    #[test]
    fn an_unknown_namespace_matches_no_namespace_selector() {
        let mut w = TestWorld::new(
            vec![pod("prod", "db", &[("app", "db")], 1, NODE), pod("ghost", "x", &[], 2, NODE)],
            vec![policy(
                "prod",
                "p",
                sel(&[("app", "db")]),
                Some(vec![rule(Some(vec![pods_where(&[], &[])]), None)]),
                None,
            )],
        );
        w.namespaces.remove("ghost");
        let m = w.compute();
        assert!(!allows(&m, 2, 1, IPPROTO_TCP, 80, IN), "not even the empty selector matches");
    }

    /// A world of `pods` pods and `policies` policies with a mix of every peer and port kind;
    /// with `unique`, every pod has a label of its own (no two pods share a label set).
    fn big_world(pods: usize, policies: usize, unique: bool) -> TestWorld {
        let ns = |i: usize| format!("ns{}", i % 20);
        let mut out = Vec::with_capacity(pods);
        for i in 0..pods {
            let app = format!("app{}", i % 50);
            let tier = ["web", "db", "cache", "batch"][i % 4];
            let addr = Ipv4Addr::from(0x0a00_0000 + i as u32 + 1);
            let mut p = pod(
                &ns(i),
                &format!("p{i}"),
                &[("app", &app), ("tier", tier)],
                1,
                if i % 20 == 0 { NODE } else { "n2" },
            );
            p.ip = Some(addr);
            if unique {
                p.labels.insert("pod-name".into(), format!("p{i}"));
            }
            out.push(with_port(p, "http", 8000 + (i % 3) as u16, PolicyProtocol::Tcp));
        }
        let mut pol = Vec::with_capacity(policies);
        for j in 0..policies {
            let app = format!("app{}", j % 50);
            let peers = match j % 4 {
                0 => vec![pods_in(&ns(j), &[("tier", "web")])],
                1 => vec![pods_where(&[("name", &ns(j + 1))], &[("app", &app)])],
                2 => vec![block(
                    &format!("10.0.{}.0/24", j % 40),
                    &[&format!("10.0.{}.128/25", j % 40)],
                )],
                _ => vec![pods_where(&[], &[("tier", "db")]), block("192.168.0.0/16", &[])],
            };
            let ports = match j % 3 {
                0 => {
                    Some(vec![tcp(80), port(PolicyProtocol::Tcp, 1000 + j as u16, 2000 + j as u16)])
                }
                1 => Some(vec![named("http")]),
                _ => None,
            };
            let rules = vec![rule(Some(peers), ports)];
            let (ingress, egress) =
                if j % 5 == 0 { (None, Some(rules)) } else { (Some(rules), None) };
            pol.push(policy(&ns(j), &format!("np{j}"), sel(&[("app", &app)]), ingress, egress));
        }
        TestWorld::new(out, pol)
    }

    #[test]
    fn a_larger_world_is_consistent_and_agrees_with_the_reference() {
        let w = big_world(2000, 200, false);
        let m = w.compute();
        assert_consistent(&m);
        assert!(m.endpoints.len() == 100 && !m.rules.is_empty());
        let rw = w.reference();
        let addrs: Vec<Ipv4Addr> = w.pods.iter().filter_map(|p| p.ip).collect();
        let locals: Vec<Ipv4Addr> = m.endpoints.keys().copied().collect();
        // A deterministic sample of flows to and from local pods.
        let mut n = 0usize;
        for (i, local) in locals.iter().enumerate() {
            for k in 0..8 {
                let peer = addrs[(i * 131 + k * 977) % addrs.len()];
                let (proto, port) = [
                    (IPPROTO_TCP, 80),
                    (IPPROTO_TCP, 8001),
                    (IPPROTO_TCP, 1500),
                    (IPPROTO_UDP, 80),
                ][k % 4];
                for dir in Direction::ALL {
                    let (src, dst) = if dir == IN { (peer, *local) } else { (*local, peer) };
                    let want =
                        reference::verdict(&rw, &rw.addr_of(src), &rw.addr_of(dst), proto, port);
                    let want = if dir == IN { want.ingress } else { want.egress }.allowed();
                    assert_eq!(
                        m.verdict(src, dst, proto, port, dir).allowed(),
                        want,
                        "{src} -> {dst} {proto}/{port} {dir}"
                    );
                    n += 1;
                }
            }
        }
        assert!(n > 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The computed maps, looked up as the datapath does, decide every flow of a random
        /// small world as the reference semantics do.
        #[test]
        fn maps_agree_with_the_reference(w in world()) {
            let m = w.compute();
            assert_consistent(&m);
            let rw = w.reference();
            let addrs = addresses(&w);
            for src in &addrs {
                for dst in &addrs {
                    for (proto, port) in flows() {
                        let want = reference::verdict(&rw, &rw.addr_of(*src), &rw.addr_of(*dst), proto, port);
                        for (dir, want) in [(IN, &want.ingress), (EG, &want.egress)] {
                            let got = m.verdict(*src, *dst, proto, port, dir);
                            let local = if dir == IN { dst } else { src };
                            if m.endpoints.contains_key(local) {
                                prop_assert_eq!(
                                    got.allowed(), want.allowed(),
                                    "{} -> {} {}/{} {}: got {:?}, reference {:?}\n{:#?}",
                                    src, dst, proto, port, dir, got, want, m
                                );
                            } else {
                                prop_assert_eq!(got, Verdict::NoEndpoint);
                            }
                        }
                    }
                }
            }
        }

        /// Input order never changes the output.
        #[test]
        fn order_does_not_matter(w in world()) {
            let m = w.compute();
            let mut r = w.clone();
            r.pods.reverse();
            r.policies.reverse();
            prop_assert_eq!(r.compute(), m);
        }
    }
}
