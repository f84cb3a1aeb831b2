//! `inspect trace`: a crafted packet through the real programs, explained.
//!
//! ```text
//! --from POD|IP, --to IP:PORT ──▶ frame (TCP SYN or UDP, source port 61000-65535)
//!   source a pod of this node?  ── yes ──▶ from_pod (BPF_PROG_TEST_RUN on progs/from_pod) ── drop ──▶ dropped
//!                                                 │ pass: the frame as rewritten (DNAT)
//!   (translated) destination a pod of this node? ── yes ──▶ to_pod (progs/to_pod) ── drop ──▶ dropped
//!                                                 │ no                       └ pass ──▶ delivered
//!                                                 └──▶ forwarded (the node's routing decides)
//! ```
//!
//! The kernel decides; the maps explain. For every hop the tc action is the program's, and
//! its reason is read from the `COUNTERS` slot the run incremented (the thread is pinned to
//! one CPU and that CPU's counters compared before and after; when other traffic on that
//! CPU makes it ambiguous, the reason is inferred from the maps instead and marked so).
//! The explanation is looked up in userspace the way the datapath looks: the frontend in
//! `SERVICES_V4`, the chosen backend from the rewritten frame, each policy verdict with
//! [`PolicyLookup::verdict`] on `ENDPOINTS_V4`, `IPCACHE_V4` and the policy maps, named
//! through the names snapshot. When the explanation predicts another action than the
//! kernel took, the report says so (`agrees: false`).
//!
//! Side effects, as with a real first packet: conntrack entries (`CT_V4`, `POLICY_CT_V4`),
//! which the trace deletes afterwards unless `--keep-conntrack`; the `COUNTERS` and
//! `POLICY_COUNTERS` increments (one packet per hop), which stay; and for a policy drop a
//! flow event, which the flow log writes like any drop (source port 61000-65535, above
//! Linux's default ephemeral range, unless `--sport`).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use nodeplane_common::{
    maps::{CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKeyV4, IPPROTO_TCP, ServiceKeyV4, SlotKey, names},
    policy::PolicyCtKey,
    reason::{COUNTER_SLOTS, REASON_SLOTS, Reason},
};
use serde::Serialize;

use super::{
    names::NameIndex,
    packet::{Frame, TCP_SYN, Tuple},
    pinned::{InspectError, PinnedMaps, PinnedPrograms, Pins},
    proto_name,
    table::Table,
    testrun::{self, TC_ACT_REDIRECT, TC_ACT_SHOT},
};
use crate::policy::compute::{Direction, PolicyLookup, Verdict};

/// Source ports a trace picks from: above Linux's default ephemeral range (32768-60999),
/// so no real socket of a pod uses them.
pub const SPORT_RANGE: std::ops::RangeInclusive<u16> = 61000..=65535;

/// What to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRequest {
    /// `namespace/name` or an IPv4 address.
    pub from: String,
    pub to: SocketAddrV4,
    pub proto: u8,
    pub sport: Option<u16>,
    pub keep_conntrack: bool,
}

/// Where an address is, seen from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Location {
    /// A pod of this node the agent polices (`ENDPOINTS_V4` entry).
    LocalPod,
    /// A pod of this node without an `ENDPOINTS_V4` entry (the agent does not know it yet).
    LocalPodUnpoliced,
    /// An address of this host: its packets reach pods without crossing `from_pod`.
    Host,
    /// Anywhere else (another node, outside the cluster, nowhere).
    Elsewhere,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Party {
    pub ip: Ipv4Addr,
    pub pod: Option<String>,
    pub location: Location,
    /// The host-side interface the routing table sends this address to, if a pod's.
    pub interface: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceHit {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub service_id: u32,
    /// Slots in use; 0: no backends, packets are dropped.
    pub slots: u32,
    /// The distinct backends of its slots.
    pub backends: Vec<SocketAddrV4>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hop {
    /// `from_pod` or `to_pod`.
    pub program: &'static str,
    pub interface: Option<String>,
    /// `__sk_buff.ingress_ifindex` of the run (0: a packet of this host).
    pub ingress_ifindex: u32,
    /// `pass` or `drop`: the tc action the kernel returned.
    pub action: &'static str,
    /// The datapath's reason (`nat-new`, `policy-denied`, ...).
    pub reason: Option<String>,
    /// `counters` (read from the slot the run incremented) or `maps` (inferred).
    pub reason_from: &'static str,
    /// The packet as the program left it.
    pub out_src: Option<SocketAddrV4>,
    pub out_dst: Option<SocketAddrV4>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyCheck {
    /// `egress` (at the source pod) or `ingress` (at the destination pod).
    pub direction: &'static str,
    pub pod: Option<String>,
    pub ip: Ipv4Addr,
    /// `allow`, `deny`, `not-isolated`, `not-policed` (no endpoint entry) or
    /// `host-allowed` (ingress of a packet from this host: always allowed).
    pub verdict: &'static str,
    pub set: Option<u32>,
    /// Deny: the isolating policies. Allow: the policies of the allowing rules.
    pub policies: Vec<String>,
    pub rule: Option<u32>,
    pub allowed_by: Vec<String>,
    pub peer: Ipv4Addr,
    pub peer_identity: u32,
    pub peer_identity_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceReport {
    pub protocol: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub source: Party,
    /// The frontend the destination is, if any.
    pub service: Option<ServiceHit>,
    /// The destination address is a ClusterIP, but not on this port and protocol.
    pub cluster_ip_without_port: bool,
    /// The backend the kernel chose (the rewritten destination).
    pub backend: Option<SocketAddrV4>,
    pub backend_pod: Option<String>,
    /// Where the packet goes after translation.
    pub destination: Party,
    pub hops: Vec<Hop>,
    pub policy: Vec<PolicyCheck>,
    /// `delivered` (to a pod of this node), `forwarded` (passed; the node's routing takes
    /// it: another node, the host, or no route) or `dropped`.
    pub verdict: &'static str,
    /// The reason of the last hop.
    pub reason: Option<String>,
    pub summary: String,
    /// The maps explain the kernel's actions (see the module docs).
    pub agrees: bool,
    pub notes: Vec<String>,
    /// Conntrack entries the trace created and deleted.
    pub conntrack_removed: usize,
}

/// The frontend, backend and policy explanations computed from the maps.
struct Explain<'a> {
    maps: &'a PinnedMaps,
    names: &'a NameIndex,
    links: Vec<crate::pin::LinkPin>,
    routes: Vec<Route>,
    host_addrs: Vec<Ipv4Addr>,
}

impl Explain<'_> {
    fn party(&self, ip: Ipv4Addr) -> Party {
        let pod = self.names.pod_at(ip).map(|p| p.pod.clone());
        let interface =
            route_iface(&self.routes, ip).filter(|i| self.links.iter().any(|l| &l.iface == i));
        let location = if self.maps.endpoint(ip).is_some() {
            Location::LocalPod
        } else if self.host_addrs.contains(&ip) {
            Location::Host
        } else if self.names.is_local_pod(ip) == Some(true) || interface.is_some() {
            Location::LocalPodUnpoliced
        } else {
            Location::Elsewhere
        };
        Party { ip, pod, location, interface }
    }

    fn service(&self, dst: SocketAddrV4, proto: u8) -> (Option<ServiceHit>, bool) {
        let key = ServiceKeyV4::new(dst.ip().octets(), dst.port(), proto);
        let Ok(value) = self.maps.services.get(&key, 0) else {
            let marker = self.maps.services.get(&ServiceKeyV4::vip_marker(dst.ip().octets()), 0);
            return (None, marker.is_ok());
        };
        let mut backends = Vec::new();
        for slot in 0..value.backend_count {
            let Ok(id) = self.maps.slots.get(&SlotKey { service_id: value.service_id, slot }, 0)
            else {
                continue;
            };
            if let Ok(b) = self.maps.backends.get(&id, 0) {
                let b = SocketAddrV4::new(b.addr.into(), b.port());
                if !backends.contains(&b) {
                    backends.push(b);
                }
            }
        }
        backends.sort();
        let name = self.names.service(&key);
        let hit = ServiceHit {
            vip: *dst.ip(),
            port: dst.port(),
            protocol: proto_name(proto),
            service: name.map(|n| n.service.clone()),
            port_name: name.map(|n| n.port_name.clone()),
            service_id: value.service_id,
            slots: value.backend_count,
            backends,
        };
        (Some(hit), false)
    }

    fn check(
        &self,
        dir: Direction,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        proto: u8,
    ) -> PolicyCheck {
        let (local, peer) = match dir {
            Direction::Ingress => (*dst.ip(), *src.ip()),
            Direction::Egress => (*src.ip(), *dst.ip()),
        };
        let peer_identity = self.maps.identity_of(peer);
        let verdict = self.maps.verdict(*src.ip(), *dst.ip(), proto, dst.port(), dir);
        let mut c = PolicyCheck {
            direction: dir.as_str(),
            pod: self.names.pod_at(local).map(|p| p.pod.clone()),
            ip: local,
            verdict: "",
            set: None,
            policies: Vec::new(),
            rule: None,
            allowed_by: Vec::new(),
            peer,
            peer_identity,
            peer_identity_name: self.names.identity(peer_identity).map(|n| n.description.clone()),
        };
        match verdict {
            Verdict::NoEndpoint => c.verdict = "not-policed",
            Verdict::NotIsolated => {
                c.verdict = "not-isolated";
                c.set = Some(0);
            }
            Verdict::Allow { rule } => {
                c.verdict = "allow";
                c.set = self.maps.endpoint(local).map(|e| match dir {
                    Direction::Ingress => e.ingress_set,
                    Direction::Egress => e.egress_set,
                });
                c.rule = Some(rule);
                for r in self.names.rules(rule) {
                    c.allowed_by.push(format!("{} {}[{}]", r.policy, r.direction, r.index));
                    if !c.policies.contains(&r.policy) {
                        c.policies.push(r.policy.clone());
                    }
                }
            }
            Verdict::Deny { set } => {
                c.verdict = "deny";
                c.set = Some(set);
                c.policies = self.names.set(set).map(|s| s.policies.clone()).unwrap_or_default();
            }
        }
        c
    }
}

/// Runs the trace. Needs the programs pinned (the agent's first sync done).
pub fn trace(
    pins: &Pins,
    maps: &mut PinnedMaps,
    progs: &PinnedPrograms,
    names: &NameIndex,
    req: &TraceRequest,
) -> Result<TraceReport, InspectError> {
    let src_ip = resolve(&req.from, names)?;
    let explain = Explain {
        maps,
        names,
        links: pins.links()?,
        routes: read_routes(Path::new("/proc/net/route")),
        host_addrs: host_addresses(),
    };
    let source = explain.party(src_ip);
    let sport = pick_sport(maps, src_ip, req)?;
    let src = SocketAddrV4::new(src_ip, sport);
    let frame = match req.proto {
        IPPROTO_TCP => Frame::tcp((src_ip, sport), (*req.to.ip(), req.to.port()), TCP_SYN),
        _ => Frame::udp((src_ip, sport), (*req.to.ip(), req.to.port())),
    }
    .build();
    let (service, cluster_ip_without_port) = explain.service(req.to, req.proto);
    let cpu = pin_to_one_cpu();
    let fallback_ifindex = explain.links.first().map_or(1, |l| l.ifindex);
    let ifindex_of =
        |party: &Party| party.interface.as_deref().and_then(if_index).unwrap_or(fallback_ifindex);

    let mut hops = Vec::new();
    let mut policy = Vec::new();
    let mut agrees = true;
    let mut current = frame.clone();
    let mut after = Tuple { src, dst: req.to, proto: req.proto };
    let source_local = matches!(source.location, Location::LocalPod | Location::LocalPodUnpoliced);
    if source_local {
        let ifindex = ifindex_of(&source);
        let (out, kernel_reason) =
            run_hop(maps, &progs.from_pod, names::PROG_FROM_POD, &current, ifindex, cpu)?;
        // A rejected packet comes back as the answer to the client: not a translation.
        let rejected = out.action == TC_ACT_REDIRECT;
        if let Some(t) = Tuple::parse(&out.frame).filter(|_| !rejected) {
            after = t;
        }
        let check = explain.check(Direction::Egress, src, after.dst, req.proto);
        let no_backends = service.as_ref().is_some_and(|s| s.slots == 0);
        let expected_ok = !(no_backends || check.verdict == "deny");
        let dropped = out.action == TC_ACT_SHOT;
        // With no backends the packet is answered (reject-tcp/udp) before policy is asked.
        if !no_backends {
            policy.push(check);
        }
        let inferred = if no_backends {
            if req.proto == IPPROTO_TCP { Reason::RejectTcp } else { Reason::RejectUdp }
        } else if dropped {
            Reason::DropPolicy
        } else if after.dst != req.to {
            Reason::NatNew
        } else {
            Reason::PassNotService
        };
        agrees &= if no_backends { rejected } else { !rejected && dropped != expected_ok };
        hops.push(hop(names::PROG_FROM_POD, &source, ifindex, &out, kernel_reason, inferred));
        current = out.frame;
    }
    let destination = explain.party(*after.dst.ip());
    let dest_local =
        matches!(destination.location, Location::LocalPod | Location::LocalPodUnpoliced);
    let passed = hops.last().is_none_or(|h| h.action == "pass");
    if passed && dest_local {
        let ifindex = match source.location {
            Location::Host => 0,
            _ => ifindex_of(&source),
        };
        let (out, kernel_reason) =
            run_hop(maps, &progs.to_pod, names::PROG_TO_POD, &current, ifindex, cpu)?;
        let mut check = explain.check(Direction::Ingress, after.src, after.dst, req.proto);
        if ifindex == 0 {
            check.verdict = "host-allowed";
        }
        let expect_ok = check.verdict != "deny";
        let dropped = out.action == TC_ACT_SHOT;
        agrees &= dropped != expect_ok;
        policy.push(check);
        let inferred = if dropped { Reason::DropPolicy } else { Reason::PassNotService };
        let mut h = hop(names::PROG_TO_POD, &destination, ifindex, &out, kernel_reason, inferred);
        h.interface = destination.interface.clone();
        hops.push(h);
    }

    let mut notes = Vec::new();
    let conntrack_removed = if req.keep_conntrack {
        0
    } else {
        let mut ct = vec![ct_key(src, req.to, req.proto, CT_DIR_ORIGINAL)];
        if after.dst != req.to {
            ct.push(ct_key(after.dst, src, req.proto, CT_DIR_REPLY));
        }
        let mut pct = vec![policy_ct_key(src, after.dst, req.proto)];
        if after.dst != req.to {
            pct.push(policy_ct_key(src, req.to, req.proto));
        }
        maps.remove_conntrack(&ct, &pct)?
    };
    if cpu.is_none() {
        notes.push("could not pin to one CPU: reasons are inferred from the maps".into());
    }
    let backend = (after.dst != req.to).then_some(after.dst);
    let verdict = match hops.last() {
        Some(h) if h.action == "drop" => "dropped",
        Some(h) if h.action == "reject" => "rejected",
        Some(h) if h.program == names::PROG_TO_POD => "delivered",
        _ if dest_local => "delivered",
        _ => "forwarded",
    };
    if !agrees {
        notes.push(
            "the kernel's action differs from what the maps explain (an entry changed \
             during the trace, or a conntrack entry of this tuple existed)"
                .into(),
        );
    }
    if !source_local {
        notes.push(match source.location {
            Location::Host => "the source is this host: from_pod does not see its packets (no service translation), to_pod allows them".into(),
            _ => "the source is not a pod of this node: from_pod does not run here (its own node translates and checks its egress)".into(),
        });
    }
    let mut report = TraceReport {
        protocol: proto_name(req.proto),
        src,
        dst: req.to,
        backend_pod: backend.and_then(|b| names.pod_at(*b.ip()).map(|p| p.pod.clone())),
        backend,
        source,
        service,
        cluster_ip_without_port,
        destination,
        reason: hops.last().and_then(|h| h.reason.clone()),
        hops,
        policy,
        verdict,
        summary: String::new(),
        agrees,
        notes,
        conntrack_removed,
    };
    report.summary = summary(&report);
    Ok(report)
}

fn hop(
    program: &'static str,
    at: &Party,
    ifindex: u32,
    out: &testrun::Outcome,
    kernel: Option<Reason>,
    inferred: Reason,
) -> Hop {
    let t = Tuple::parse(&out.frame);
    let (reason, reason_from) = match kernel {
        Some(r) => (r, "counters"),
        None => (inferred, "maps"),
    };
    Hop {
        program,
        interface: at.interface.clone(),
        ingress_ifindex: ifindex,
        action: match out.action {
            TC_ACT_SHOT => "drop",
            TC_ACT_REDIRECT => "reject",
            _ => "pass",
        },
        reason: Some(reason.name().to_string()),
        reason_from,
        out_src: t.map(|t| t.src),
        out_dst: t.map(|t| t.dst),
    }
}

/// One line saying what happened and why.
pub fn summary(r: &TraceReport) -> String {
    let svc = |s: &ServiceHit| {
        let name = s.service.clone().unwrap_or_else(|| format!("service id {}", s.service_id));
        match s.port_name.as_deref() {
            Some(p) if !p.is_empty() => format!("{name} port {p}"),
            _ => name,
        }
    };
    let pod = |p: &Option<String>, ip: Ipv4Addr| p.clone().unwrap_or_else(|| ip.to_string());
    let deny = r.policy.iter().find(|c| c.verdict == "deny");
    match (r.verdict, r.reason.as_deref()) {
        ("rejected", Some(reason)) => {
            let answer = if reason == Reason::RejectTcp.name() {
                "a TCP reset"
            } else {
                "an ICMP port unreachable"
            };
            match &r.service {
                Some(s) => format!(
                    "rejected by from_pod: no backends: {} ({}:{}/{}) has no usable endpoints; \
                     the client gets {answer} from the ClusterIP",
                    svc(s),
                    s.vip,
                    s.port,
                    s.protocol
                ),
                None => format!("rejected by from_pod: no backends; the client gets {answer}"),
            }
        }
        ("dropped", Some("no-backends")) => match &r.service {
            Some(s) => format!(
                "dropped by from_pod: no backends: {} ({}:{}/{}) has no usable endpoints",
                svc(s),
                s.vip,
                s.port,
                s.protocol
            ),
            None => "dropped by from_pod: no backends".into(),
        },
        ("dropped", _) if deny.is_some() => {
            let c = deny.expect("checked");
            let by = if c.policies.is_empty() {
                String::new()
            } else {
                format!(" (isolated by {})", c.policies.join(", "))
            };
            format!(
                "dropped by {}: policy denies it: {} of {}{by} allows no {}/{} from {}",
                if c.direction == "egress" { "from_pod" } else { "to_pod" },
                c.direction,
                pod(&c.pod, c.ip),
                r.protocol,
                r.backend.unwrap_or(r.dst).port(),
                c.peer_identity_name.clone().map_or_else(
                    || format!("{} (identity {})", c.peer, c.peer_identity),
                    |n| format!("{} (identity {}: {n})", c.peer, c.peer_identity)
                ),
            )
        }
        ("dropped", reason) => format!(
            "dropped by {}: {}",
            r.hops.last().map_or("?", |h| h.program),
            reason.unwrap_or("unknown reason")
        ),
        (verdict, _) => {
            let mut s = match (&r.service, r.backend) {
                (Some(hit), Some(b)) => format!(
                    "{verdict}: {} -> {} is {}; DNAT to backend {}",
                    r.src,
                    r.dst,
                    svc(hit),
                    r.backend_pod.clone().map_or(b.to_string(), |p| format!("{b} ({p})"))
                ),
                _ if r.cluster_ip_without_port => format!(
                    "{verdict}: {} is a ClusterIP without a {} port {}: passed untranslated",
                    r.dst.ip(),
                    r.protocol,
                    r.dst.port()
                ),
                _ if r.destination.pod.is_some() && verdict == "delivered" => format!(
                    "{verdict}: {} -> {}/{} goes to a pod directly (no Service): untranslated",
                    r.src, r.dst, r.protocol
                ),
                _ => format!(
                    "{verdict}: no Service at {}/{}: passed untranslated",
                    r.dst, r.protocol
                ),
            };
            if verdict == "forwarded" {
                s.push_str(&format!(
                    "; {} is not a pod of this node, the node's routing takes it (another node, the host, or no route)",
                    r.destination.ip
                ));
            } else if let (Some(p), None) = (&r.destination.pod, r.backend) {
                s.push_str(&format!(" to {p}"));
            }
            for c in &r.policy {
                let what = match c.verdict {
                    "allow" if !c.allowed_by.is_empty() => {
                        format!("allowed by {}", c.allowed_by.join(", "))
                    }
                    "allow" => format!("allowed (rule {})", c.rule.unwrap_or(0)),
                    other => other.to_string(),
                };
                s.push_str(&format!("; {} of {}: {what}", c.direction, pod(&c.pod, c.ip)));
            }
            s
        }
    }
}

pub fn table(r: &TraceReport) -> String {
    let mut out = format!(
        "packet:   {} {} -> {}\nsource:   {}{} ({})\n",
        r.protocol,
        r.src,
        r.dst,
        r.source.ip,
        r.source.pod.as_deref().map(|p| format!(" {p}")).unwrap_or_default(),
        location_name(r.source.location),
    );
    match &r.service {
        Some(s) => out.push_str(&format!(
            "service:  {} {}:{}/{} (id {}, {} slots, backends {})\n",
            s.service.as_deref().unwrap_or("-"),
            s.vip,
            s.port,
            s.protocol,
            s.service_id,
            s.slots,
            if s.backends.is_empty() {
                "none".to_string()
            } else {
                s.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
            }
        )),
        None if r.cluster_ip_without_port => {
            out.push_str("service:  none (the address is a ClusterIP, but not on this port)\n")
        }
        None => out.push_str("service:  none\n"),
    }
    if let Some(b) = r.backend {
        out.push_str(&format!(
            "backend:  {b}{}\n",
            r.backend_pod.as_deref().map(|p| format!(" {p}")).unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "dest:     {}{} ({})\n\n",
        r.destination.ip,
        r.destination.pod.as_deref().map(|p| format!(" {p}")).unwrap_or_default(),
        location_name(r.destination.location)
    ));
    let mut t =
        Table::new(&["HOP", "INTERFACE", "INGRESS-IFINDEX", "ACTION", "REASON", "PACKET OUT"]);
    for h in &r.hops {
        t.row(vec![
            h.program.into(),
            h.interface.clone().unwrap_or_else(|| "-".into()),
            h.ingress_ifindex.to_string(),
            h.action.into(),
            match (&h.reason, h.reason_from) {
                (Some(r), "counters") => r.clone(),
                (Some(r), _) => format!("{r} (inferred)"),
                (None, _) => "-".into(),
            },
            match (h.out_src, h.out_dst) {
                (Some(s), Some(d)) => format!("{s} -> {d}"),
                _ => "-".into(),
            },
        ]);
    }
    if r.hops.is_empty() {
        out.push_str("no program of this node sees this packet\n");
    } else {
        out.push_str(&t.render());
    }
    if !r.policy.is_empty() {
        out.push('\n');
        let mut p =
            Table::new(&["POLICY", "POD", "VERDICT", "SET", "RULE", "BY", "PEER", "PEER IDENTITY"]);
        for c in &r.policy {
            p.row(vec![
                c.direction.into(),
                c.pod.clone().unwrap_or_else(|| c.ip.to_string()),
                c.verdict.into(),
                c.set.map_or("-".into(), |s| s.to_string()),
                c.rule.map_or("-".into(), |s| s.to_string()),
                if !c.allowed_by.is_empty() {
                    c.allowed_by.join(", ")
                } else if !c.policies.is_empty() {
                    format!("isolated by {}", c.policies.join(", "))
                } else {
                    "-".into()
                },
                c.peer.to_string(),
                match &c.peer_identity_name {
                    Some(n) => format!("{} ({n})", c.peer_identity),
                    None => c.peer_identity.to_string(),
                },
            ]);
        }
        out.push_str(&p.render());
    }
    out.push_str(&format!("\nverdict:  {}\n{}\n", r.verdict.to_uppercase(), r.summary));
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if r.conntrack_removed > 0 {
        out.push_str(&format!(
            "({} conntrack entries of the trace removed)\n",
            r.conntrack_removed
        ));
    }
    out
}

fn location_name(l: Location) -> &'static str {
    match l {
        Location::LocalPod => "a pod of this node",
        Location::LocalPodUnpoliced => "a pod of this node, not yet known to the agent",
        Location::Host => "this host",
        Location::Elsewhere => "not on this node",
    }
}

/// `namespace/name` (through the names snapshot) or an IPv4 address.
pub fn resolve(from: &str, names: &NameIndex) -> Result<Ipv4Addr, InspectError> {
    if let Ok(ip) = from.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    if !from.contains('/') {
        return Err(InspectError::Usage(format!(
            "{from:?} is neither an IPv4 address nor a pod as namespace/name"
        )));
    }
    if names.snapshot().is_none() {
        return Err(InspectError::Usage(format!(
            "naming a pod ({from}) needs the agent's names snapshot (names.json in its \
             --state-dir), which is not there: give the pod's IP instead, or --state-dir"
        )));
    }
    names.pod_named(from).map(|p| p.ip).ok_or_else(|| {
        InspectError::Usage(format!("no pod {from} with an IP in the agent's names snapshot"))
    })
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr: src.ip().octets(),
        daddr: dst.ip().octets(),
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

fn policy_ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> PolicyCtKey {
    PolicyCtKey {
        saddr: src.ip().octets(),
        daddr: dst.ip().octets(),
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

/// `--sport`, or a random port of [`SPORT_RANGE`] that no conntrack entry of this source
/// and destination uses (so the trace neither follows nor deletes a real flow).
fn pick_sport(maps: &PinnedMaps, src: Ipv4Addr, req: &TraceRequest) -> Result<u16, InspectError> {
    if let Some(p) = req.sport {
        return Ok(p);
    }
    let span = u32::from(SPORT_RANGE.end() - SPORT_RANGE.start()) + 1;
    for _ in 0..64 {
        let port = SPORT_RANGE.start() + (random_u32() % span) as u16;
        let s = SocketAddrV4::new(src, port);
        let used = maps.ct.get(&ct_key(s, req.to, req.proto, CT_DIR_ORIGINAL), 0).is_ok()
            || maps.policy_ct.get(&policy_ct_key(s, req.to, req.proto), 0).is_ok();
        if !used {
            return Ok(port);
        }
    }
    Err(InspectError::Usage("no free source port found for the trace: give --sport".into()))
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        // Never on Linux >= 3.17 with 4 bytes; the clock is good enough for a port.
        return super::pinned::monotonic_ns() as u32;
    }
    u32::from_ne_bytes(b)
}

/// Runs one program and reads which `COUNTERS` slot it incremented on `cpu`.
fn run_hop(
    maps: &PinnedMaps,
    prog: &aya::programs::SchedClassifier,
    name: &'static str,
    frame: &[u8],
    ifindex: u32,
    cpu: Option<usize>,
) -> Result<(testrun::Outcome, Option<Reason>), InspectError> {
    let before = cpu.and_then(|c| counters_on(maps, c));
    let out = testrun::run_once(prog, frame, Some(ifindex))
        .map_err(|source| InspectError::TestRun { program: name, source })?;
    let after = cpu.and_then(|c| counters_on(maps, c));
    let reason = match (before, after) {
        (Some(b), Some(a)) => counted_reason(&b, &a),
        _ => None,
    };
    Ok((out, reason))
}

/// Packets per `COUNTERS` slot on one CPU.
fn counters_on(maps: &PinnedMaps, cpu: usize) -> Option<Vec<u64>> {
    (0..COUNTER_SLOTS)
        .map(|i| maps.counters.get(&i, 0).ok().and_then(|v| v.get(cpu).map(|c| c.packets)))
        .collect()
}

/// The reason whose slot grew by exactly one packet, if exactly one did.
pub fn counted_reason(before: &[u64], after: &[u64]) -> Option<Reason> {
    let grown: Vec<usize> =
        (0..before.len().min(after.len())).filter(|&i| after[i] != before[i]).collect();
    match grown.as_slice() {
        [i] if after[*i] == before[*i] + 1 => Reason::from_index(*i as u32 % REASON_SLOTS),
        _ => None,
    }
}

/// Pins this thread to the CPU it runs on, so a test run and the counters read around it
/// are on one CPU. `None` if that fails.
fn pin_to_one_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions; the cpu_set_t lives for the call.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return None;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return None;
        }
        Some(cpu as usize)
    }
}

/// A route of the main table (`/proc/net/route`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dst: Ipv4Addr,
    pub prefix_len: u32,
}

/// Parses `/proc/net/route` (addresses are printed as the native-endian value of the
/// network-order word). Unreadable: no routes.
pub fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
            let dst = Ipv4Addr::from(word(f.get(1)?)?);
            let mask = u32::from_be_bytes(word(f.get(7)?)?);
            Some(Route { iface: f.first()?.to_string(), dst, prefix_len: mask.count_ones() })
        })
        .collect()
}

fn read_routes(path: &Path) -> Vec<Route> {
    std::fs::read_to_string(path).map(|t| parse_routes(&t)).unwrap_or_default()
}

/// The interface of the longest route covering `ip`.
pub fn route_iface(routes: &[Route], ip: Ipv4Addr) -> Option<String> {
    routes
        .iter()
        .filter(|r| {
            let mask = u32::MAX.checked_shl(32 - r.prefix_len).unwrap_or(0);
            u32::from(ip) & mask == u32::from(r.dst) & mask
        })
        .max_by_key(|r| r.prefix_len)
        .map(|r| r.iface.clone())
}

fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; if_nametoindex(3) only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The IPv4 addresses of this host's interfaces (in this network namespace).
fn host_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs(3) returns a list freed with freeifaddrs(3) below; every node and
    // address is read only while the list lives.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = addr.cast::<libc::sockaddr_in>();
                out.push(Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr)));
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use nodeplane_common::reason::{Hook, counter_index};

    use super::*;

    #[test]
    fn routes_parse_and_the_longest_match_wins() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    lxc1\t0500F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                    eth1\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let routes = parse_routes(text);
        if cfg!(target_endian = "little") {
            assert_eq!(
                routes[1],
                Route { iface: "lxc1".into(), dst: Ipv4Addr::new(10, 244, 0, 5), prefix_len: 32 }
            );
            assert_eq!(route_iface(&routes, Ipv4Addr::new(10, 244, 0, 5)).as_deref(), Some("lxc1"));
            assert_eq!(route_iface(&routes, Ipv4Addr::new(10, 244, 0, 6)).as_deref(), Some("eth1"));
            assert_eq!(route_iface(&routes, Ipv4Addr::new(8, 8, 8, 8)).as_deref(), Some("eth0"));
        }
    }

    #[test]
    fn the_counted_reason_is_the_one_slot_that_grew_by_one() {
        let before = vec![5u64; COUNTER_SLOTS as usize];
        let mut after = before.clone();
        after[counter_index(Hook::ToPod, Reason::DropPolicy) as usize] += 1;
        assert_eq!(counted_reason(&before, &after), Some(Reason::DropPolicy));
        after[0] += 1;
        assert_eq!(counted_reason(&before, &after), None, "two slots grew: other traffic");
        let mut two = before.clone();
        two[3] += 2;
        assert_eq!(counted_reason(&before, &two), None);
        assert_eq!(counted_reason(&before, &before), None);
    }

    #[test]
    fn pods_resolve_by_name_only_with_a_snapshot() {
        let names = NameIndex::default();
        assert_eq!(resolve("10.0.0.1", &names).unwrap(), Ipv4Addr::new(10, 0, 0, 1));
        let err = resolve("x/a", &names).unwrap_err().to_string();
        assert!(err.contains("names snapshot") && err.contains("IP instead"), "{err}");
        assert!(resolve("a", &names).unwrap_err().to_string().contains("namespace/name"));
    }

    fn party(ip: [u8; 4], pod: &str, location: Location) -> Party {
        Party { ip: ip.into(), pod: Some(pod.into()), location, interface: Some("lxc0".into()) }
    }

    fn report() -> TraceReport {
        TraceReport {
            protocol: "TCP".into(),
            src: "10.244.1.5:61234".parse().unwrap(),
            dst: "10.96.1.10:8080".parse().unwrap(),
            source: party([10, 244, 1, 5], "y/b", Location::LocalPod),
            service: Some(ServiceHit {
                vip: Ipv4Addr::new(10, 96, 1, 10),
                port: 8080,
                protocol: "TCP".into(),
                service: Some("x/web".into()),
                port_name: Some("tcp-80".into()),
                service_id: 3,
                slots: 1,
                backends: vec!["10.244.1.2:80".parse().unwrap()],
            }),
            cluster_ip_without_port: false,
            backend: Some("10.244.1.2:80".parse().unwrap()),
            backend_pod: Some("x/a".into()),
            destination: party([10, 244, 1, 2], "x/a", Location::LocalPod),
            hops: vec![Hop {
                program: "from_pod",
                interface: Some("lxc0".into()),
                ingress_ifindex: 7,
                action: "pass",
                reason: Some("nat-new".into()),
                reason_from: "counters",
                out_src: Some("10.244.1.5:61234".parse().unwrap()),
                out_dst: Some("10.244.1.2:80".parse().unwrap()),
            }],
            policy: vec![PolicyCheck {
                direction: "ingress",
                pod: Some("x/a".into()),
                ip: Ipv4Addr::new(10, 244, 1, 2),
                verdict: "allow",
                set: Some(77),
                policies: vec!["x/a-from-y".into()],
                rule: Some(9),
                allowed_by: vec!["x/a-from-y ingress[0]".into()],
                peer: Ipv4Addr::new(10, 244, 1, 5),
                peer_identity: 300,
                peer_identity_name: None,
            }],
            verdict: "delivered",
            reason: Some("pass-not-service".into()),
            summary: String::new(),
            agrees: true,
            notes: vec![],
            conntrack_removed: 3,
        }
    }

    #[test]
    fn summaries_name_the_service_backend_and_rules() {
        let r = report();
        assert_eq!(
            summary(&r),
            "delivered: 10.244.1.5:61234 -> 10.96.1.10:8080 is x/web port tcp-80; DNAT to \
             backend 10.244.1.2:80 (x/a); ingress of x/a: allowed by x/a-from-y ingress[0]"
        );
        let mut denied = report();
        denied.verdict = "dropped";
        denied.reason = Some("policy-denied".into());
        denied.policy[0].verdict = "deny";
        denied.policy[0].policies = vec!["x/deny-ingress".into()];
        assert_eq!(
            summary(&denied),
            "dropped by to_pod: policy denies it: ingress of x/a (isolated by x/deny-ingress) \
             allows no TCP/80 from 10.244.1.5 (identity 300)"
        );
        let mut empty = report();
        empty.verdict = "dropped";
        empty.reason = Some("no-backends".into());
        empty.policy.clear();
        assert!(summary(&empty).starts_with("dropped by from_pod: no backends: x/web port tcp-80"));
        empty.verdict = "rejected";
        empty.reason = Some("reject-tcp".into());
        let s = summary(&empty);
        assert!(s.starts_with("rejected by from_pod: no backends: x/web port tcp-80"), "{s}");
        assert!(s.ends_with("the client gets a TCP reset from the ClusterIP"), "{s}");
        let mut nothing = report();
        nothing.verdict = "forwarded";
        nothing.service = None;
        nothing.backend = None;
        nothing.policy.clear();
        assert!(
            summary(&nothing).starts_with("forwarded: no Service at 10.96.1.10:8080/TCP"),
            "{}",
            summary(&nothing)
        );
        nothing.cluster_ip_without_port = true;
        assert!(summary(&nothing).contains("is a ClusterIP without a TCP port 8080"));
    }

    #[test]
    fn the_table_and_json_carry_the_decision_path() {
        let mut r = report();
        r.summary = summary(&r);
        let text = table(&r);
        assert!(
            text.contains(
                "service:  x/web 10.96.1.10:8080/TCP (id 3, 1 slots, backends 10.244.1.2:80)"
            ),
            "{text}"
        );
        assert!(text.contains("backend:  10.244.1.2:80 x/a"), "{text}");
        assert!(text.contains("from_pod  lxc0"), "{text}");
        assert!(text.contains("verdict:  DELIVERED"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["verdict"], "delivered");
        assert_eq!(json["service"]["service"], "x/web");
        assert_eq!(json["backend"], "10.244.1.2:80");
        assert_eq!(json["source"]["location"], "local-pod");
        assert_eq!(json["hops"][0]["reason"], "nat-new");
        assert_eq!(json["policy"][0]["allowed_by"][0], "x/a-from-y ingress[0]");
    }
}
