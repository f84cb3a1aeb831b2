//! NetworkPolicy enforcement. `from_pod` checks the sending pod's egress, `to_pod` the
//! receiving pod's ingress, both on the packet as it is after DNAT and before reverse NAT
//! (so a service flow is judged by its backend and target port, never by the VIP).
//!
//! Per packet, in this order (the first row that applies decides):
//!
//! | # | case                                                            | verdict |
//! |---|-----------------------------------------------------------------|---------|
//! | 1 | `to_pod` and the packet was generated on this node (`ingress_ifindex == 0`: kubelet probes, host-network pods) | allow, entry recorded with `PCT_F_INGRESS \| PCT_F_HOST` ([`host`]): the pod's replies pass as replies, also after a revision change |
//! | 2 | `POLICY_CT_V4[fwd]` alive with my role bit, at the current revision | allow (established; no policy lookup) |
//! | 3 | `POLICY_CT_V4[rev]` alive with the reply role bit, at the current revision | allow (reply) |
//! | 4 | as 2 or 3 but verified at an older revision                     | the check is made again (my set; for a reply, my *other* set on the original tuple): allow -> entry re-stamped, deny -> role bit cleared, drop |
//! | 5 | no local endpoint (`ENDPOINTS_V4` miss; checked before rows 2 to 4, which it makes moot) | allow, nothing recorded |
//! | 6 | endpoint not isolated in this direction (`SET_NONE`)            | allow, entry recorded (so replies are known if a policy appears later) |
//! | 7 | `(set, peer identity, proto, dport)`: `POLICY_EXACT_V4` (hash), then the `POLICY_V4` trie (only if the endpoint's `EP_F_*_LPM` says the set has shorter entries); then the same with `IDENTITY_ANY` (only if `EP_F_*_ANY`) | hit: allow + entry; miss: drop (`policy-denied`) |
//!
//! `fwd` is the packet's tuple, `rev` the same swapped. My role bit: `PCT_F_EGRESS` in
//! `from_pod` (I am the original source), `PCT_F_INGRESS` in `to_pod`; the reply role bit
//! is the other one. An entry's `revision` stamps every bit it holds, so whenever one check
//! re-stamps an entry, the bits it did not verify are cleared (their side simply checks
//! again on its next packet).
//!
//! Revision semantics (documented decision): established flows are verified again against
//! the current policy on their next packet after the agent bumps `PolicyConfig::revision`,
//! and dropped if it now denies them (as Cilium and Calico do).
//!
//! Fragments: a first fragment allowed by rows 2, 3, 4, 6 or 7 records its ports in
//! `FRAGS_V4` under this hook's direction (also when the direction is not isolated: a
//! policy may appear before the rest of the datagram); a later fragment to or from a pod
//! isolated in that direction passes only on a hit of that same direction ([`fragment`]),
//! otherwise it is dropped (`policy-fragment`).
//!
//! Visibility: every dropped packet emits a `FlowEvent` (rows 4 and 7, and later fragments);
//! a flow allowed by row 7 emits one when `POLICY_CFG_F_LOG_ALLOWED` is set. Events that do
//! not fit in the ring are counted as lost in `FLOW_EVENT_COUNTERS[1]`. `POLICY_COUNTERS`
//! counts the verdicts of row 7 only (new flows in an isolated direction): allows under
//! the entry's rule id, denies under the endpoint's set.
use aya_ebpf::bindings::BPF_NOEXIST;
use nodeplane_common::{
    ct::TcpState,
    maps::{Counter, IPPROTO_TCP, IPPROTO_UDP},
    policy::{
        DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ANY, EP_F_EGRESS_LPM, EP_F_INGRESS_ANY,
        EP_F_INGRESS_LPM, EndpointV4, FlowEvent, FragKeyV4, FragValueV4, IDENTITY_ANY,
        IDENTITY_UNSELECTED, PCT_F_EGRESS, PCT_F_HOST, PCT_F_INGRESS, POLICY_CFG_F_EVENTS,
        POLICY_CFG_F_LOG_ALLOWED, PolicyConfig, PolicyCounterKey, PolicyCtKey, PolicyCtValue,
        PolicyKey, PolicyValue, SET_NONE, VERDICT_ALLOW, VERDICT_DENY,
    },
    reason::Reason,
};

use crate::{
    ct,
    maps::{
        ENDPOINTS_V4, FLOW_EVENT_COUNTERS, FLOW_EVENTS, FRAGS_V4, IPCACHE_V4, POLICY_CONFIG,
        POLICY_COUNTERS, POLICY_CT_V4, POLICY_EXACT_V4, POLICY_V4,
    },
    parse::{Frag, Packet},
};

/// Which program is checking, hence which pod's policy and which direction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// The sender's egress; the local pod is the source.
    FromPod,
    /// The receiver's ingress; the local pod is the destination.
    ToPod,
}

impl Hook {
    #[inline(always)]
    fn dir(self) -> u8 {
        match self {
            Self::FromPod => DIR_EGRESS,
            Self::ToPod => DIR_INGRESS,
        }
    }

    /// The conntrack bit of the check this hook makes.
    #[inline(always)]
    fn my_bit(self) -> u8 {
        match self {
            Self::FromPod => PCT_F_EGRESS,
            Self::ToPod => PCT_F_INGRESS,
        }
    }

    /// The bit of the check the original direction made at this hook's pod when the packet
    /// is a reply: at `from_pod` the reply's source was the original destination.
    #[inline(always)]
    fn reply_bit(self) -> u8 {
        match self {
            Self::FromPod => PCT_F_INGRESS,
            Self::ToPod => PCT_F_EGRESS,
        }
    }

    /// (local pod, peer) of a packet `saddr -> daddr`.
    #[inline(always)]
    fn local_and_peer(self, saddr: [u8; 4], daddr: [u8; 4]) -> ([u8; 4], [u8; 4]) {
        match self {
            Self::FromPod => (saddr, daddr),
            Self::ToPod => (daddr, saddr),
        }
    }
}

/// Which lookups the endpoint's set in direction `dir` needs (its `EP_F_*` flags).
#[inline(always)]
fn lookup_of(ep: &EndpointV4, dir: u8) -> Lookup {
    let (any, lpm) = if dir == DIR_EGRESS {
        (EP_F_EGRESS_ANY, EP_F_EGRESS_LPM)
    } else {
        (EP_F_INGRESS_ANY, EP_F_INGRESS_LPM)
    };
    Lookup { any: ep.flags & any != 0, lpm: ep.flags & lpm != 0 }
}

/// Which lookups a set needs: for `IDENTITY_ANY` (it has such entries), in the trie (it has
/// entries shorter than the full key).
#[derive(Clone, Copy)]
struct Lookup {
    any: bool,
    lpm: bool,
}

/// Which set of an endpoint applies to a check in direction `dir`.
#[inline(always)]
fn set_of(ep: &EndpointV4, dir: u8) -> u32 {
    if dir == DIR_EGRESS { ep.egress_set } else { ep.ingress_set }
}

/// The packet as policy judges it: after DNAT (a service flow's backend and target port),
/// before reverse NAT.
#[derive(Clone)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub tcp_flags: u8,
    pub ip_id: [u8; 2],
    pub first_fragment: bool,
    /// For a flow sent to a ClusterIP: the VIP and port (flow events only); zero otherwise.
    pub orig_daddr: [u8; 4],
    pub orig_dport: [u8; 2],
    /// Packet length, for the counters.
    pub len: u32,
}

impl Flow {
    /// `pkt` as it is on the wire.
    #[inline(always)]
    pub fn of(pkt: &Packet, len: u32) -> Self {
        Self {
            saddr: pkt.saddr,
            daddr: pkt.daddr,
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            tcp_flags: pkt.tcp_flags,
            ip_id: pkt.ip_id,
            first_fragment: pkt.frag == Frag::First,
            orig_daddr: [0; 4],
            orig_dport: [0; 2],
            len,
        }
    }

    /// This flow's `POLICY_CT_V4` key.
    #[inline(always)]
    pub fn ct_key(&self) -> PolicyCtKey {
        PolicyCtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The same flow seen from the other end (a reply's original direction).
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            orig_daddr: [0; 4],
            orig_dport: [0; 2],
            ..self.clone()
        }
    }

    /// `pkt` as it will be once DNATed to `addr:port`.
    #[inline(always)]
    pub fn translated(pkt: &Packet, len: u32, addr: [u8; 4], port: [u8; 2]) -> Self {
        Self {
            daddr: addr,
            dport: port,
            orig_daddr: pkt.daddr,
            orig_dport: pkt.dport,
            ..Self::of(pkt, len)
        }
    }
}

/// What a lookup of `POLICY_V4` said.
struct Judgement {
    allowed: bool,
    /// The matching entry's rule (allow), 0 otherwise.
    rule: u32,
    /// The peer's identity (0 when not looked up: not isolated).
    identity: u32,
}

/// Rows 5 to 7 of the table for one check: local pod `local`'s policy in direction `dir`
/// on traffic with `peer`, `proto` and original destination port `dport`.
struct Check {
    local: [u8; 4],
    peer: [u8; 4],
    proto: u8,
    dport: [u8; 2],
    dir: u8,
}

/// Judges `flow` at `hook` (rows 2 to 7). `outcome` is what the packet will be counted as
/// if allowed (it goes into an allow's flow event).
#[inline(always)]
pub fn check(hook: Hook, flow: &Flow, outcome: Reason) -> Result<(), Reason> {
    let (local, peer) = hook.local_and_peer(flow.saddr, flow.daddr);
    // Row 5 first: a pod the agent has not described has no policy and nothing recorded,
    // whatever conntrack holds, so its packets skip the conntrack lookups.
    if ENDPOINTS_V4.get_ptr(local).is_none() {
        return Ok(());
    }
    let now = ct::now();
    let cfg = POLICY_CONFIG.get(0).copied().unwrap_or_default();
    let fwd_key = flow.ct_key();
    let fwd = alive(POLICY_CT_V4.get_ptr_mut(fwd_key), now);

    // Which entry (if any) vouches for the packet, the bit it vouches with, and the check
    // that must be made when it does not (or no longer) vouch.
    let (entry, bit, check) = 'found: {
        if let Some(e) = fwd {
            // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
            if unsafe { (*e).flags } & hook.my_bit() != 0 {
                let chk =
                    Check { local, peer, proto: flow.proto, dport: flow.dport, dir: hook.dir() };
                break 'found (e, hook.my_bit(), chk);
            }
        }
        if let Some((e, chk)) = reply_entry(hook, flow, local, now) {
            break 'found (e, hook.reply_bit(), chk);
        }
        return new_flow(hook, flow, fwd, &cfg, outcome, now);
    };
    // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
    let e = unsafe { &mut *entry };
    if e.revision != cfg.revision {
        // A flow from this node stays allowed into the pod whatever the policy.
        let host = if bit == PCT_F_INGRESS { e.flags & PCT_F_HOST } else { 0 };
        if host == 0 {
            let Judged { judgement: j, set } = judge(&check);
            if !j.allowed {
                e.flags &= !bit;
                // The event names the check that failed: for a reply, the original direction.
                let shown = if bit == hook.my_bit() { flow.clone() } else { flow.reversed() };
                event(&shown, check.dir, VERDICT_DENY, Reason::DropPolicy, set, 0, j.identity);
                return Err(Reason::DropPolicy);
            }
        }
        e.revision = cfg.revision;
        e.flags = bit | host;
    }
    (e.state, e.expires_ns) = ct::advance(flow.proto, e.state, flow.tcp_flags, now);
    remember_first_fragment(hook, flow);
    Ok(())
}

/// Row 1: a packet this node generated, delivered to a pod. Always allowed; recorded (with
/// `PCT_F_HOST`) so that the pod's replies pass its egress policy as replies, and keep
/// passing after a policy change.
#[inline(always)]
pub fn host(flow: &Flow) {
    let now = ct::now();
    let cfg = POLICY_CONFIG.get(0).copied().unwrap_or_default();
    let key = flow.ct_key();
    let bits = PCT_F_INGRESS | PCT_F_HOST;
    if let Some(e) = alive(POLICY_CT_V4.get_ptr_mut(key), now) {
        // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
        let e = unsafe { &mut *e };
        if e.revision == cfg.revision {
            e.flags |= bits;
        } else {
            e.flags = bits;
            e.revision = cfg.revision;
        }
        (e.state, e.expires_ns) = ct::advance(flow.proto, e.state, flow.tcp_flags, now);
        return;
    }
    let (state, expires_ns) = ct::advance(flow.proto, TcpState::None as u8, flow.tcp_flags, now);
    let value =
        PolicyCtValue { expires_ns, revision: cfg.revision, flags: bits, state, _pad: [0; 2] };
    // A failed insert (cannot happen with an LRU) only makes the reply a new flow.
    let _ = POLICY_CT_V4.insert(key, value, 0);
}

/// The live entry `ptr` points at, if it is alive.
#[inline(always)]
fn alive(ptr: Option<*mut PolicyCtValue>, now: u64) -> Option<*mut PolicyCtValue> {
    // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
    ptr.filter(|&e| unsafe { (*e).expires_ns } > now)
}

/// Row 3: the entry of the flow `flow` replies to, if it carries the reply role bit, with
/// the check of the original direction at this hook's pod. A reply `to_pod` delivers from a
/// local backend was already reverse-translated by `from_pod` (its source is the VIP): its
/// flow is found through the service conntrack.
#[inline(always)]
fn reply_entry(
    hook: Hook,
    flow: &Flow,
    local: [u8; 4],
    now: u64,
) -> Option<(*mut PolicyCtValue, Check)> {
    let rev_key = flow.reversed().ct_key();
    let other_dir = if hook.dir() == DIR_EGRESS { DIR_INGRESS } else { DIR_EGRESS };
    if let Some(e) = alive(POLICY_CT_V4.get_ptr_mut(rev_key), now) {
        // SAFETY: see `alive`.
        if unsafe { (*e).flags } & hook.reply_bit() != 0 {
            let (_, peer) = hook.local_and_peer(flow.saddr, flow.daddr);
            let chk = Check { local, peer, proto: flow.proto, dport: flow.sport, dir: other_dir };
            return Some((e, chk));
        }
    }
    if hook != Hook::ToPod || !(flow.proto == IPPROTO_TCP || flow.proto == IPPROTO_UDP) {
        return None;
    }
    let (backend, bport) = ct::backend_of_translated_reply(&rev_key)?;
    let key = PolicyCtKey { daddr: backend, dport: bport, ..rev_key };
    let e = alive(POLICY_CT_V4.get_ptr_mut(key), now)?;
    // SAFETY: see `alive`.
    if unsafe { (*e).flags } & hook.reply_bit() == 0 {
        return None;
    }
    Some((e, Check { local, peer: backend, proto: flow.proto, dport: bport, dir: other_dir }))
}

/// Rows 5 to 7 for a flow no entry vouches for. `fwd` is its entry when one is alive
/// without my role bit (the other end of a flow between two local pods made it).
#[inline(always)]
fn new_flow(
    hook: Hook,
    flow: &Flow,
    fwd: Option<*mut PolicyCtValue>,
    cfg: &PolicyConfig,
    outcome: Reason,
    now: u64,
) -> Result<(), Reason> {
    let (local, peer) = hook.local_and_peer(flow.saddr, flow.daddr);
    let dir = hook.dir();
    // SAFETY: plain-data value copied out at once.
    let Some(ep) = unsafe { ENDPOINTS_V4.get(local) }.copied() else {
        // Row 5: a pod the agent has not described yet.
        return Ok(());
    };
    let set = set_of(&ep, dir);
    let j = lookup(set, lookup_of(&ep, dir), peer, flow.proto, flow.dport);
    if !j.allowed {
        count(set, VERDICT_DENY, dir, flow.len);
        event(flow, dir, VERDICT_DENY, Reason::DropPolicy, set, 0, j.identity);
        return Err(Reason::DropPolicy);
    }
    let my = hook.my_bit();
    match fwd {
        Some(e) => {
            // SAFETY: an LRU element stays valid for the rest of this program run (RCU).
            let e = unsafe { &mut *e };
            if e.revision == cfg.revision {
                e.flags |= my;
            } else {
                e.flags = my;
                e.revision = cfg.revision;
            }
            (e.state, e.expires_ns) = ct::advance(flow.proto, e.state, flow.tcp_flags, now);
        }
        None => {
            let (state, expires_ns) =
                ct::advance(flow.proto, TcpState::None as u8, flow.tcp_flags, now);
            let value = PolicyCtValue {
                expires_ns,
                revision: cfg.revision,
                flags: my,
                state,
                _pad: [0; 2],
            };
            let key = flow.ct_key();
            // A failed insert (cannot happen with an LRU) only costs a lookup next packet.
            let _ = POLICY_CT_V4.insert(key, value, 0);
        }
    }
    if set != SET_NONE {
        count(j.rule, VERDICT_ALLOW, dir, flow.len);
        if cfg.flags & POLICY_CFG_F_LOG_ALLOWED != 0 {
            event(flow, dir, VERDICT_ALLOW, outcome, set, j.rule, j.identity);
        }
    }
    remember_first_fragment(hook, flow);
    Ok(())
}

/// The result of a re-verification: the judgement and the set it used.
struct Judged {
    judgement: Judgement,
    set: u32,
}

/// Rows 5 to 7 for an established flow being verified again.
#[inline(always)]
fn judge(check: &Check) -> Judged {
    // SAFETY: plain-data value copied out at once.
    let Some(ep) = unsafe { ENDPOINTS_V4.get(check.local) }.copied() else {
        return Judged { judgement: Judgement { allowed: true, rule: 0, identity: 0 }, set: 0 };
    };
    let set = set_of(&ep, check.dir);
    let how = lookup_of(&ep, check.dir);
    Judged { judgement: lookup(set, how, check.peer, check.proto, check.dport), set }
}

/// Rows 6 and 7: `POLICY_V4` for `set` and the identity of `peer`, then (if the set has
/// entries for any peer: `any`) for any peer.
#[inline(always)]
fn lookup(set: u32, how: Lookup, peer: [u8; 4], proto: u8, dport: [u8; 2]) -> Judgement {
    if set == SET_NONE {
        return Judgement { allowed: true, rule: 0, identity: 0 };
    }
    let identity = identity_of(peer);
    let mut key = PolicyKey {
        set: set.to_be_bytes(),
        identity: identity.to_be_bytes(),
        proto,
        port: dport,
        _pad: 0,
    };
    let mut hit = entry(&key, how.lpm);
    if hit.is_none() && how.any {
        key.identity = IDENTITY_ANY.to_be_bytes();
        hit = entry(&key, how.lpm);
    }
    match hit {
        Some(v) => Judgement { allowed: true, rule: v.rule, identity },
        None => Judgement { allowed: false, rule: 0, identity },
    }
}

/// The entry allowing `key`: the exact one (a hash lookup), else the longest shorter prefix
/// in the trie when the set has any (`lpm`). Exact entries are the longest possible match,
/// so this is what one longest-prefix match over both maps would answer.
#[inline(always)]
fn entry(key: &PolicyKey, lpm: bool) -> Option<PolicyValue> {
    // SAFETY: plain-data value copied out at once.
    if let Some(v) = unsafe { POLICY_EXACT_V4.get(key) } {
        return Some(*v);
    }
    if !lpm {
        return None;
    }
    let key = aya_ebpf::maps::lpm_trie::Key::new(PolicyKey::PREFIX_FULL, *key);
    POLICY_V4.get(&key).copied()
}

/// The identity of `addr` (longest `IPCACHE_V4` prefix), `IDENTITY_UNSELECTED` if none.
#[inline(always)]
fn identity_of(addr: [u8; 4]) -> u32 {
    let key = aya_ebpf::maps::lpm_trie::Key::new(32, addr);
    IPCACHE_V4.get(&key).copied().unwrap_or(IDENTITY_UNSELECTED)
}

/// Records an allowed first fragment's ports for the later fragments of its datagram.
#[inline(always)]
fn remember_first_fragment(hook: Hook, flow: &Flow) {
    if !flow.first_fragment {
        return;
    }
    let key = FragKeyV4 {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        dir: hook.dir(),
    };
    // A failed insert (cannot happen with an LRU) drops the later fragments: fail closed.
    let _ = FRAGS_V4.insert(key, FragValueV4 { sport: flow.sport, dport: flow.dport }, 0);
}

/// A later fragment (no ports): passes unless its local pod is isolated in this hook's
/// direction and no allowed first fragment of the same datagram, direction included, was
/// seen.
#[inline(always)]
pub fn fragment(hook: Hook, frag: &Packet, len: u32) -> Result<Reason, Reason> {
    let (local, peer) = hook.local_and_peer(frag.saddr, frag.daddr);
    let dir = hook.dir();
    // SAFETY: plain-data value copied out at once.
    let Some(ep) = unsafe { ENDPOINTS_V4.get(local) }.copied() else {
        return Ok(Reason::PassFragment);
    };
    let set = set_of(&ep, dir);
    if set == SET_NONE {
        return Ok(Reason::PassFragment);
    }
    let key =
        FragKeyV4 { saddr: frag.saddr, daddr: frag.daddr, id: frag.ip_id, proto: frag.proto, dir };
    if FRAGS_V4.get_ptr(key).is_some() {
        return Ok(Reason::PassFragment);
    }
    let flow = Flow {
        saddr: frag.saddr,
        daddr: frag.daddr,
        sport: [0; 2],
        dport: [0; 2],
        proto: frag.proto,
        tcp_flags: 0,
        ip_id: frag.ip_id,
        first_fragment: false,
        orig_daddr: [0; 4],
        orig_dport: [0; 2],
        len,
    };
    event(&flow, dir, VERDICT_DENY, Reason::DropPolicyFragment, set, 0, identity_of(peer));
    Err(Reason::DropPolicyFragment)
}

/// Adds one packet to `POLICY_COUNTERS[id, verdict, dir]`, creating it on first use.
#[inline(always)]
fn count(id: u32, verdict: u8, dir: u8, bytes: u32) {
    let key = PolicyCounterKey { id, verdict, dir, _pad: [0; 2] };
    let c = match POLICY_COUNTERS.get_ptr_mut(key) {
        Some(c) => c,
        None => {
            // NOEXIST: another CPU may have created it meanwhile; then its entry is used.
            let _ = POLICY_COUNTERS.insert(key, Counter::default(), u64::from(BPF_NOEXIST));
            match POLICY_COUNTERS.get_ptr_mut(key) {
                Some(c) => c,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += u64::from(bytes);
    }
}

/// Writes one `FlowEvent`, counting it as written or lost (ring full).
#[inline(always)]
fn event(
    flow: &Flow,
    dir: u8,
    verdict: u8,
    reason: Reason,
    set: u32,
    rule: u32,
    peer_identity: u32,
) {
    // Only on verdicts that produce an event, so one more array lookup is fine here.
    let flags = POLICY_CONFIG.get(0).map_or(0, |c| c.flags);
    if flags & POLICY_CFG_F_EVENTS == 0 {
        return;
    }
    let slot = match FLOW_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            entry.write(FlowEvent {
                ts_ns: ct::now(),
                saddr: flow.saddr,
                daddr: flow.daddr,
                sport: flow.sport,
                dport: flow.dport,
                proto: flow.proto,
                dir,
                verdict,
                reason: reason as u8,
                set,
                rule,
                peer_identity,
                orig_daddr: flow.orig_daddr,
                orig_dport: flow.orig_dport,
                _pad: [0; 2],
                _reserved: 0,
            });
            entry.submit(0);
            0
        }
        None => 1,
    };
    if let Some(n) = FLOW_EVENT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot; only this CPU writes it while the program runs.
        unsafe { *n += 1 };
    }
}
