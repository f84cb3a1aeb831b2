//! `inspect conntrack` and `inspect nat`: the datapath's two conntrack maps, read whole.
//!
//! * `CT_V4`, the service conntrack: an ORIGINAL entry per service flow (client -> VIP,
//!   with the backend it is DNATed to) and a REPLY entry (backend -> client, with the VIP
//!   the source is rewritten back to).
//! * `POLICY_CT_V4`, the policy conntrack: one entry per flow a local pod's policy
//!   judged, keyed by the translated tuple, with the checks passed and their revision.
//!
//! A REPLY entry translates only while its ORIGINAL entry lives and points at the same
//! backend (docs/ARCHITECTURE.md, "Conntrack"); the datapath refreshes only the ORIGINAL
//! one. So a REPLY line shows its flow's state, expiry and idle time (the ORIGINAL
//! entry's), or `stale` when that entry is gone or expired.
//!
//! The maps hold a deadline (`bpf_ktime_get_ns()` + the state's lifetime, pushed by every
//! packet), not a creation time, so the *idle* time shown is the time since the flow's
//! last packet: the state's lifetime minus what is left. Expired entries stay in the LRU
//! maps until evicted and count for nothing; they are hidden unless `--all`.
//!
//! `nat` is `CT_V4` seen as translations, one line per flow: there is no SNAT table yet,
//! so the service DNAT (ORIGINAL) and its reverse NAT (REPLY) are every translation the
//! node makes.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use nodeplane_common::{
    ct::{TcpState, lifetime_ns},
    maps::{CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKeyV4, CtValueV4, IPPROTO_TCP},
    policy::{PCT_F_EGRESS, PCT_F_HOST, PCT_F_INGRESS, PolicyCtKey, PolicyCtValue},
};
use serde::Serialize;

use super::{names::NameIndex, proto_name, table::Table};

/// Which entries to show: an entry matches when any address (or port) it holds, the
/// translation included, is the one asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub ip: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    /// Show expired entries too.
    pub all: bool,
}

impl Filter {
    fn admits(&self, proto: u8, addrs: &[SocketAddrV4]) -> bool {
        self.proto.is_none_or(|p| p == proto)
            && self.ip.is_none_or(|ip| addrs.iter().any(|a| *a.ip() == ip))
            && self.port.is_none_or(|port| addrs.iter().any(|a| a.port() == port))
    }
}

/// The conntrack maps, read whole.
#[derive(Clone, Debug, Default)]
pub struct CtTables {
    pub ct: BTreeMap<CtKeyV4, CtValueV4>,
    pub policy_ct: BTreeMap<PolicyCtKey, PolicyCtValue>,
    /// `NAT_V4` (read for `inspect nat`; may be left empty otherwise).
    pub nat: NatTable,
    pub now_ns: u64,
    /// `POLICY_CONFIG.revision`: a policy entry of an older one is re-checked.
    pub revision: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtEntry {
    /// `original` or `reply`.
    pub direction: &'static str,
    pub protocol: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// ORIGINAL: the backend the flow goes to. REPLY: the VIP:port the source becomes.
    pub nat: SocketAddrV4,
    pub state: &'static str,
    /// Seconds until the entry expires; negative: expired that long ago.
    pub expires_in_s: f64,
    /// Seconds since the flow's last packet.
    pub idle_s: f64,
    pub service_id: u32,
    pub backend_id: u32,
    pub service: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyCtEntry {
    pub protocol: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    pub state: &'static str,
    pub expires_in_s: f64,
    pub idle_s: f64,
    /// The checks this node made and passed: `egress`, `ingress`, `host`.
    pub checks: Vec<&'static str>,
    pub revision: u32,
    /// Made at an older policy revision: re-checked on the flow's next packet.
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConntrackReport {
    pub service: Vec<CtEntry>,
    pub policy: Vec<PolicyCtEntry>,
}

/// One translated flow of `inspect nat`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NatEntry {
    pub protocol: String,
    pub client: SocketAddrV4,
    /// What the client sent to: the VIP:port.
    pub frontend: SocketAddrV4,
    /// What the datapath sends to instead.
    pub backend: Option<SocketAddrV4>,
    pub service: Option<String>,
    pub backend_pod: Option<String>,
    pub state: &'static str,
    pub expires_in_s: f64,
    pub idle_s: f64,
    /// The REPLY entry exists (replies get the VIP back as source).
    pub reverse_nat: bool,
    /// `dnat` (a flow with its ORIGINAL entry) or `reply-only` (a REPLY entry whose
    /// ORIGINAL entry is gone or expired: it no longer translates anything).
    pub kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NatReport {
    pub translations: Vec<NatEntry>,
    /// SNAT flows (`NAT_V4`): masquerade and NodePort flows sent to another node.
    pub snat: Vec<SnatEntry>,
}

/// One SNATed flow of `inspect nat`, from its OUT entry (or its IN entry alone).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnatEntry {
    pub protocol: String,
    /// The source before SNAT: a pod (masquerade) or an outside client (NodePort).
    pub client: SocketAddrV4,
    /// Where the flow goes.
    pub peer: SocketAddrV4,
    /// The source it leaves with: node IP and allocated port.
    pub translated: SocketAddrV4,
    /// `masquerade` or `nodeport`.
    pub kind: &'static str,
    /// TCP state seen in the client's direction.
    pub state: &'static str,
    pub idle_s: f64,
    /// The IN entry exists and names this client: replies come back. `false` for an entry
    /// whose port went to another flow or whose IN entry was evicted (it will reallocate).
    pub reverse_nat: bool,
}

/// The `NAT_V4` entries, as `inspect nat` reads them.
pub type NatTable = std::collections::BTreeMap<CtKeyV4, nodeplane_common::nat::NatValueV4>;

/// The SNAT lines: one per OUT entry.
pub fn snat(nat: &NatTable, filter: &Filter, now_ns: u64) -> Vec<SnatEntry> {
    use nodeplane_common::nat::{NAT_DIR_OUT, NAT_F_NODEPORT};
    let mut out = Vec::new();
    for (k, v) in nat.iter().filter(|(k, _)| k.dir == NAT_DIR_OUT) {
        let (client, peer, translated) =
            (sa(k.saddr, k.sport), sa(k.daddr, k.dport), sa(v.addr, v.port));
        if !filter.admits(k.proto, &[client, peer, translated]) {
            continue;
        }
        let reverse_nat =
            nat.get(&v.partner(k)).is_some_and(|r| (r.addr, r.port) == (k.saddr, k.sport));
        out.push(SnatEntry {
            protocol: proto_name(k.proto),
            client,
            peer,
            translated,
            kind: if v.flags & NAT_F_NODEPORT != 0 { "nodeport" } else { "masquerade" },
            state: state_name(k.proto, v.state),
            idle_s: round(now_ns.saturating_sub(v.last_seen_ns) as f64 / 1e9),
            reverse_nat,
        });
    }
    out.sort_by_key(|e| (e.client, e.peer));
    out
}

fn sa(addr: [u8; 4], port: [u8; 2]) -> SocketAddrV4 {
    SocketAddrV4::new(addr.into(), u16::from_be_bytes(port))
}

pub fn state_name(proto: u8, state: u8) -> &'static str {
    if proto != IPPROTO_TCP {
        return "-";
    }
    match TcpState::from_u8(state) {
        TcpState::None => "none",
        TcpState::SynSent => "syn-sent",
        TcpState::Established => "established",
        TcpState::Closing => "closing",
        TcpState::Closed => "closed",
    }
}

/// `(expires in, idle)` in seconds.
fn timing(proto: u8, state: u8, expires_ns: u64, now_ns: u64) -> (f64, f64) {
    let left = expires_ns as f64 / 1e9 - now_ns as f64 / 1e9;
    let lifetime = lifetime_ns(proto, TcpState::from_u8(state)) as f64 / 1e9;
    (left, (lifetime - left).max(0.0))
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn conntrack(t: &CtTables, filter: &Filter, names: &NameIndex) -> ConntrackReport {
    let mut service = Vec::new();
    for (k, v) in &t.ct {
        let (src, dst, nat) =
            (sa(k.saddr, k.sport), sa(k.daddr, k.dport), sa(v.nat_addr, v.nat_port));
        let live = v.expires_ns > t.now_ns;
        if !(filter.all || live) || !filter.admits(k.proto, &[src, dst, nat]) {
            continue;
        }
        // A REPLY entry's flow is its ORIGINAL entry's (see the module docs).
        let original = (k.dir == CT_DIR_REPLY)
            .then(|| t.ct.get(&original_of(k, v)))
            .flatten()
            .filter(|o| o.expires_ns > t.now_ns && o.nat_addr == k.saddr && o.nat_port == k.sport);
        let flow = original.unwrap_or(v);
        let (expires, idle) = timing(k.proto, flow.state, flow.expires_ns, t.now_ns);
        let state = match (k.dir, original) {
            (CT_DIR_REPLY, None) => "stale",
            _ => state_name(k.proto, flow.state),
        };
        let frontend = if k.dir == CT_DIR_ORIGINAL { dst } else { nat };
        let key = nodeplane_common::maps::ServiceKeyV4::new(
            frontend.ip().octets(),
            frontend.port(),
            k.proto,
        );
        service.push(CtEntry {
            direction: if k.dir == CT_DIR_REPLY { "reply" } else { "original" },
            protocol: proto_name(k.proto),
            src,
            dst,
            nat,
            state,
            expires_in_s: round(expires),
            idle_s: round(idle),
            service_id: v.service_id,
            backend_id: v.backend_id,
            service: names.service(&key).map(|n| n.service.clone()),
        });
    }
    // A flow's two entries together, by client: ORIGINAL's source, REPLY's destination.
    service.sort_by_key(|e| match e.direction {
        "original" => (e.src, 0),
        _ => (e.dst, 1),
    });
    let mut policy = Vec::new();
    for (k, v) in &t.policy_ct {
        let (src, dst) = (sa(k.saddr, k.sport), sa(k.daddr, k.dport));
        let live = v.expires_ns > t.now_ns;
        if !(filter.all || live) || !filter.admits(k.proto, &[src, dst]) {
            continue;
        }
        let (expires, idle) = timing(k.proto, v.state, v.expires_ns, t.now_ns);
        let checks = [(PCT_F_EGRESS, "egress"), (PCT_F_INGRESS, "ingress"), (PCT_F_HOST, "host")]
            .into_iter()
            .filter(|(f, _)| v.flags & f != 0)
            .map(|(_, n)| n)
            .collect();
        policy.push(PolicyCtEntry {
            protocol: proto_name(k.proto),
            src,
            dst,
            src_pod: names.pod_at(*src.ip()).map(|p| p.pod.clone()),
            dst_pod: names.pod_at(*dst.ip()).map(|p| p.pod.clone()),
            state: state_name(k.proto, v.state),
            expires_in_s: round(expires),
            idle_s: round(idle),
            checks,
            revision: v.revision,
            stale: v.revision != t.revision,
        });
    }
    ConntrackReport { service, policy }
}

/// One translated flow as both kinds of `nat` line see it.
struct NatFlow {
    proto: u8,
    state: u8,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
}

impl NatFlow {
    /// The line, with the names of its Service and backend pod; `timing`: (expires in,
    /// idle) in seconds.
    fn entry(
        &self,
        names: &NameIndex,
        (expires, idle): (f64, f64),
        reverse_nat: bool,
        kind: &'static str,
    ) -> NatEntry {
        let key = nodeplane_common::maps::ServiceKeyV4::new(
            self.frontend.ip().octets(),
            self.frontend.port(),
            self.proto,
        );
        NatEntry {
            protocol: proto_name(self.proto),
            client: self.client,
            frontend: self.frontend,
            backend: Some(self.backend),
            service: names.service(&key).map(|n| n.service.clone()),
            backend_pod: names.pod_at(*self.backend.ip()).map(|p| p.pod.clone()),
            state: state_name(self.proto, self.state),
            expires_in_s: round(expires),
            idle_s: round(idle),
            reverse_nat,
            kind,
        }
    }
}

pub fn nat(t: &CtTables, filter: &Filter, names: &NameIndex) -> NatReport {
    let mut translations = Vec::new();
    for (k, v) in &t.ct {
        let live = v.expires_ns > t.now_ns;
        let (expires, idle) = timing(k.proto, v.state, v.expires_ns, t.now_ns);
        let entry = if k.dir == CT_DIR_ORIGINAL {
            let (client, frontend, backend) =
                (sa(k.saddr, k.sport), sa(k.daddr, k.dport), sa(v.nat_addr, v.nat_port));
            let reply = CtKeyV4 {
                saddr: v.nat_addr,
                daddr: k.saddr,
                sport: v.nat_port,
                dport: k.sport,
                proto: k.proto,
                dir: CT_DIR_REPLY,
                _pad: [0; 2],
            };
            if !(filter.all || live) || !filter.admits(k.proto, &[client, frontend, backend]) {
                continue;
            }
            let flow = NatFlow { proto: k.proto, state: v.state, client, frontend, backend };
            flow.entry(names, (expires, idle), t.ct.contains_key(&reply), "dnat")
        } else {
            // A REPLY entry is shown on its own only when its ORIGINAL one is not live.
            let (backend, client, frontend) =
                (sa(k.saddr, k.sport), sa(k.daddr, k.dport), sa(v.nat_addr, v.nat_port));
            if t.ct.get(&original_of(k, v)).is_some_and(|o| o.expires_ns > t.now_ns || filter.all) {
                continue;
            }
            if !(filter.all || live) || !filter.admits(k.proto, &[client, frontend, backend]) {
                continue;
            }
            let flow = NatFlow { proto: k.proto, state: v.state, client, frontend, backend };
            flow.entry(names, (expires, idle), true, "reply-only")
        };
        translations.push(entry);
    }
    translations.sort_by_key(|e| (e.client, e.frontend));
    NatReport { translations, snat: snat(&t.nat, filter, t.now_ns) }
}

/// The ORIGINAL key of the flow a REPLY entry belongs to (hairpin flows included): the
/// GC's rule, so the two never disagree.
fn original_of(reply: &CtKeyV4, v: &CtValueV4) -> CtKeyV4 {
    crate::ctgc::original_of_reply(reply, v)
}

fn secs(x: f64) -> String {
    format!("{x:.1}")
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

pub fn conntrack_table(r: &ConntrackReport) -> String {
    let mut t = Table::new(&[
        "DIR",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "NAT",
        "STATE",
        "EXPIRES",
        "IDLE",
        "SERVICE",
        "SVC-ID",
        "BACKEND-ID",
    ]);
    for e in &r.service {
        t.row(vec![
            e.direction.into(),
            e.protocol.clone(),
            e.src.to_string(),
            e.dst.to_string(),
            match e.direction {
                "original" => format!("dst -> {}", e.nat),
                _ => format!("src -> {}", e.nat),
            },
            e.state.into(),
            secs(e.expires_in_s),
            secs(e.idle_s),
            opt(&e.service),
            e.service_id.to_string(),
            e.backend_id.to_string(),
        ]);
    }
    let mut p = Table::new(&[
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "FROM",
        "TO",
        "STATE",
        "EXPIRES",
        "IDLE",
        "CHECKS",
        "REVISION",
    ]);
    for e in &r.policy {
        p.row(vec![
            e.protocol.clone(),
            e.src.to_string(),
            e.dst.to_string(),
            opt(&e.src_pod),
            opt(&e.dst_pod),
            e.state.into(),
            secs(e.expires_in_s),
            secs(e.idle_s),
            if e.checks.is_empty() { "-".into() } else { e.checks.join(",") },
            if e.stale { format!("{} (stale)", e.revision) } else { e.revision.to_string() },
        ]);
    }
    format!(
        "service conntrack (CT_V4): {} entries\n{}\npolicy conntrack (POLICY_CT_V4): {} entries\n{}",
        r.service.len(),
        t.render(),
        r.policy.len(),
        p.render()
    )
}

pub fn nat_table(r: &NatReport) -> String {
    let mut t = Table::new(&[
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "POD", "STATE", "EXPIRES", "IDLE",
        "REVERSE", "KIND",
    ]);
    for e in &r.translations {
        t.row(vec![
            e.protocol.clone(),
            e.client.to_string(),
            e.frontend.to_string(),
            e.backend.map_or("-".into(), |b| b.to_string()),
            opt(&e.service),
            opt(&e.backend_pod),
            e.state.into(),
            secs(e.expires_in_s),
            secs(e.idle_s),
            if e.reverse_nat { "yes".into() } else { "no".into() },
            e.kind.into(),
        ]);
    }
    let mut s =
        Table::new(&["PROTO", "CLIENT", "PEER", "TRANSLATED", "KIND", "STATE", "IDLE", "REVERSE"]);
    for e in &r.snat {
        s.row(vec![
            e.protocol.clone(),
            e.client.to_string(),
            e.peer.to_string(),
            e.translated.to_string(),
            e.kind.into(),
            e.state.into(),
            secs(e.idle_s),
            if e.reverse_nat { "yes".into() } else { "no".into() },
        ]);
    }
    format!(
        "{} translations (service DNAT and its reverse NAT)\n{}\n{} SNAT flows (to the node IP)\n{}",
        r.translations.len(),
        t.render(),
        r.snat.len(),
        s.render()
    )
}

#[cfg(test)]
mod tests {
    use nodeplane_common::{ct::NSEC_PER_SEC, maps::IPPROTO_UDP};

    use super::*;

    const NOW: u64 = 1_000 * NSEC_PER_SEC;

    fn key(s: ([u8; 4], u16), d: ([u8; 4], u16), proto: u8, dir: u8) -> CtKeyV4 {
        CtKeyV4 {
            saddr: s.0,
            daddr: d.0,
            sport: s.1.to_be_bytes(),
            dport: d.1.to_be_bytes(),
            proto,
            dir,
            _pad: [0; 2],
        }
    }

    fn tables() -> CtTables {
        let client: ([u8; 4], u16) = ([10, 244, 0, 9], 40000);
        let vip: ([u8; 4], u16) = ([10, 96, 0, 10], 80);
        let backend: ([u8; 4], u16) = ([10, 244, 0, 2], 8080);
        let mut t = CtTables { now_ns: NOW, revision: 3, ..Default::default() };
        let est = CtValueV4 {
            nat_addr: backend.0,
            nat_port: backend.1.to_be_bytes(),
            state: TcpState::Established as u8,
            service_id: 1,
            backend_id: 10,
            // 6 h lifetime, 10 s since the last packet.
            expires_ns: NOW + nodeplane_common::ct::TCP_ESTABLISHED_TIMEOUT_NS - 10 * NSEC_PER_SEC,
            ..Default::default()
        };
        t.ct.insert(key(client, vip, IPPROTO_TCP, CT_DIR_ORIGINAL), est);
        t.ct.insert(
            key(backend, client, IPPROTO_TCP, CT_DIR_REPLY),
            CtValueV4 { nat_addr: vip.0, nat_port: vip.1.to_be_bytes(), ..est },
        );
        // An expired UDP flow, and a REPLY entry left alone.
        let udp_client = ([10, 244, 0, 7], 5000);
        t.ct.insert(
            key(udp_client, ([10, 96, 0, 10], 53), IPPROTO_UDP, CT_DIR_ORIGINAL),
            CtValueV4 {
                nat_addr: [10, 244, 0, 3],
                nat_port: 5353u16.to_be_bytes(),
                expires_ns: NOW - NSEC_PER_SEC,
                ..Default::default()
            },
        );
        t.ct.insert(
            key(([10, 244, 0, 4], 8080), ([10, 244, 0, 8], 41000), IPPROTO_TCP, CT_DIR_REPLY),
            CtValueV4 {
                nat_addr: vip.0,
                nat_port: vip.1.to_be_bytes(),
                state: 2,
                expires_ns: NOW + NSEC_PER_SEC,
                ..Default::default()
            },
        );
        t.policy_ct.insert(
            PolicyCtKey {
                saddr: client.0,
                daddr: backend.0,
                sport: client.1.to_be_bytes(),
                dport: backend.1.to_be_bytes(),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            },
            PolicyCtValue {
                expires_ns: NOW + 5 * NSEC_PER_SEC,
                revision: 2,
                flags: PCT_F_EGRESS | PCT_F_INGRESS,
                state: 2,
                _pad: [0; 2],
            },
        );
        t
    }

    #[test]
    fn live_entries_with_translation_idle_time_and_filters() {
        let t = tables();
        let names = NameIndex::default();
        let r = conntrack(&t, &Filter::default(), &names);
        assert_eq!(r.service.len(), 3, "the expired UDP entry is hidden: {:?}", r.service);
        let original = &r.service[1];
        assert_eq!((original.direction, original.state), ("original", "established"));
        assert_eq!(original.nat.to_string(), "10.244.0.2:8080");
        assert_eq!(original.idle_s, 10.0);
        let reply = &r.service[2];
        assert_eq!(
            (reply.direction, reply.state, reply.idle_s),
            ("reply", "established", 10.0),
            "the flow's state"
        );
        let lone = &r.service[0];
        assert_eq!((lone.direction, lone.state), ("reply", "stale"), "no ORIGINAL entry");
        assert_eq!(r.policy[0].checks, vec!["egress", "ingress"]);
        assert!(r.policy[0].stale, "revision 2 < 3");

        let all = conntrack(&t, &Filter { all: true, ..Default::default() }, &names);
        assert_eq!(all.service.len(), 4);
        let udp = Filter { proto: Some(IPPROTO_UDP), all: true, ..Default::default() };
        assert_eq!(conntrack(&t, &udp, &names).service.len(), 1);
        // The backend's address matches the ORIGINAL entry through its translation.
        let by_ip = Filter { ip: Some(Ipv4Addr::new(10, 244, 0, 2)), ..Default::default() };
        let r2 = conntrack(&t, &by_ip, &names);
        assert_eq!((r2.service.len(), r2.policy.len()), (2, 1));
        let by_port = Filter { port: Some(41000), ..Default::default() };
        assert_eq!(conntrack(&t, &by_port, &names).service.len(), 1);

        let text = conntrack_table(&r);
        assert!(text.starts_with("service conntrack (CT_V4): 3 entries\nDIR"), "{text}");
        assert!(text.contains("dst -> 10.244.0.2:8080") && text.contains("2 (stale)"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["service"][1]["src"], "10.244.0.9:40000");
        assert_eq!(json["policy"][0]["stale"], true);
    }

    #[test]
    fn nat_lists_one_line_per_flow_and_lone_reply_entries() {
        let t = tables();
        let r = nat(&t, &Filter::default(), &NameIndex::default());
        let kinds: Vec<_> =
            r.translations.iter().map(|e| (e.client.to_string(), e.kind, e.reverse_nat)).collect();
        assert_eq!(
            kinds,
            vec![
                ("10.244.0.8:41000".into(), "reply-only", true),
                ("10.244.0.9:40000".into(), "dnat", true)
            ]
        );
        assert_eq!(r.translations[1].frontend.to_string(), "10.96.0.10:80");
        let text = nat_table(&r);
        assert!(text.contains("0 SNAT flows") && text.contains("reply-only"), "{text}");
    }

    #[test]
    fn snat_lines_come_from_out_entries_and_check_their_reverse() {
        use nodeplane_common::nat::{NAT_DIR_OUT, NAT_F_NODEPORT, NatValueV4};
        let mut t = tables();
        let out = key(([10, 244, 0, 9], 40000), ([198, 18, 0, 2], 80), IPPROTO_TCP, NAT_DIR_OUT);
        let v = NatValueV4 {
            addr: [192, 168, 0, 10],
            port: 61000u16.to_be_bytes(),
            state: 2,
            last_seen_ns: NOW - 3 * NSEC_PER_SEC,
            ..NatValueV4::default()
        };
        let back = NatValueV4 { addr: out.saddr, port: out.sport, ..v };
        t.nat.insert(out, v);
        t.nat.insert(v.partner(&out), back);
        // A NodePort flow whose IN entry went to another client.
        let np = key(([203, 0, 113, 7], 5000), ([10, 244, 1, 5], 8080), IPPROTO_TCP, NAT_DIR_OUT);
        let w = NatValueV4 { flags: NAT_F_NODEPORT, port: 61001u16.to_be_bytes(), ..v };
        t.nat.insert(np, w);
        t.nat.insert(w.partner(&np), NatValueV4 { addr: [1, 2, 3, 4], ..back });
        let r = nat(&t, &Filter::default(), &NameIndex::default());
        let lines: Vec<_> = r
            .snat
            .iter()
            .map(|e| (e.client.to_string(), e.translated.to_string(), e.kind, e.reverse_nat))
            .collect();
        assert_eq!(
            lines,
            vec![
                ("10.244.0.9:40000".into(), "192.168.0.10:61000".into(), "masquerade", true),
                ("203.0.113.7:5000".into(), "192.168.0.10:61001".into(), "nodeport", false),
            ]
        );
        assert_eq!((r.snat[0].state, r.snat[0].idle_s), ("established", 3.0));
        assert!(nat_table(&r).contains("2 SNAT flows"));
    }
}
