//! `inspect services`: every frontend of `SERVICES_V4` with its backends (from
//! `BACKEND_SLOTS` and `BACKENDS_V4`), the share of slots each backend holds, and the live
//! flows conntrack holds for each (the datapath keeps no per-Service packet counters: the
//! `COUNTERS` map counts per hook and reason).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use nodeplane_common::maps::{
    BackendV4, CT_DIR_ORIGINAL, CtKeyV4, CtValueV4, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue,
    SlotKey,
};
use serde::Serialize;

use super::{names::NameIndex, proto_name, table::Table};

/// What the service maps hold, read whole.
#[derive(Clone, Debug, Default)]
pub struct ServiceTables {
    pub services: BTreeMap<ServiceKeyV4, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, BackendV4>,
    pub ct: BTreeMap<CtKeyV4, CtValueV4>,
    /// `CLOCK_MONOTONIC` now, to tell live conntrack entries from expired ones.
    pub now_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendReport {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// `ClusterIP` (the only kind this datapath serves yet).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `namespace/name` from the names snapshot, if any.
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub service_id: u32,
    /// Slots in use (`backend_count`); 0: packets to it are answered with a TCP RST or an
    /// ICMP port unreachable (`reject-tcp`, `reject-udp`; a TCP RST is dropped: `no-backends`).
    pub slots: u32,
    pub backends: Vec<BackendReport>,
    /// Live flows (ORIGINAL conntrack entries) of this frontend.
    pub flows: u64,
    /// Inconsistencies found (a slot without a backend entry, ...): empty normally.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendReport {
    pub backend_id: u32,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub pod: Option<String>,
    /// Slots of the frontend pointing at it.
    pub slots: u32,
    /// Share of new flows it gets: `slots / backend_count` (0 for a draining backend).
    pub weight: f64,
    /// Live flows of this frontend on it.
    pub flows: u64,
    /// Not in the slots, but live flows still use it (an endpoint being removed).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicesReport {
    pub frontends: Vec<FrontendReport>,
}

/// The report, sorted by Service name (unnamed last), then VIP, port and protocol.
pub fn report(t: &ServiceTables, names: &NameIndex) -> ServicesReport {
    // (service id, backend id) -> live ORIGINAL entries.
    let mut flows: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for (k, v) in &t.ct {
        if k.dir == CT_DIR_ORIGINAL && v.expires_ns > t.now_ns {
            *flows.entry((v.service_id, v.backend_id)).or_default() += 1;
        }
    }
    let mut frontends = Vec::new();
    for (key, value) in &t.services {
        if key.is_vip_marker() || value.flags & SVC_F_VIP_MARKER != 0 {
            continue;
        }
        let name = names.service(key);
        let mut problems = Vec::new();
        let mut per_backend: BTreeMap<u32, u32> = BTreeMap::new();
        for slot in 0..value.backend_count {
            match t.slots.get(&SlotKey { service_id: value.service_id, slot }) {
                Some(id) => *per_backend.entry(*id).or_default() += 1,
                None => problems.push(format!("slot {slot} has no BACKEND_SLOTS entry")),
            }
        }
        let draining: BTreeSet<u32> = flows
            .range((value.service_id, 0)..=(value.service_id, u32::MAX))
            .map(|((_, b), _)| *b)
            .filter(|b| !per_backend.contains_key(b))
            .collect();
        let mut backends = Vec::new();
        for (id, slots) in
            per_backend.iter().map(|(id, n)| (*id, *n)).chain(draining.iter().map(|id| (*id, 0)))
        {
            let Some(b) = t.backends.get(&id) else {
                problems.push(format!("backend {id} has no BACKENDS_V4 entry"));
                continue;
            };
            let ip = Ipv4Addr::from(b.addr);
            backends.push(BackendReport {
                backend_id: id,
                ip,
                port: b.port(),
                pod: names.pod_at(ip).map(|p| p.pod.clone()),
                slots,
                weight: if value.backend_count == 0 {
                    0.0
                } else {
                    f64::from(slots) / f64::from(value.backend_count)
                },
                flows: flows.get(&(value.service_id, id)).copied().unwrap_or(0),
                draining: slots == 0,
            });
        }
        backends.sort_by_key(|b| (b.draining, b.ip, b.port));
        frontends.push(FrontendReport {
            vip: key.addr.into(),
            port: key.port(),
            protocol: proto_name(key.proto),
            kind: "ClusterIP",
            service: name.map(|n| n.service.clone()),
            port_name: name.map(|n| n.port_name.clone()),
            service_id: value.service_id,
            slots: value.backend_count,
            flows: backends.iter().map(|b| b.flows).sum(),
            backends,
            problems,
        });
    }
    frontends.sort_by(|a, b| {
        (a.service.is_none(), &a.service, a.vip, a.port, &a.protocol).cmp(&(
            b.service.is_none(),
            &b.service,
            b.vip,
            b.port,
            &b.protocol,
        ))
    });
    ServicesReport { frontends }
}

/// One line per backend; the frontend's columns only on its first line.
pub fn table(r: &ServicesReport) -> String {
    let mut t = Table::new(&[
        "SERVICE", "PORT", "FRONTEND", "TYPE", "ID", "BACKEND", "POD", "SLOTS", "WEIGHT", "FLOWS",
    ]);
    for f in &r.frontends {
        let frontend = vec![
            f.service.clone().unwrap_or_else(|| "-".into()),
            f.port_name.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "-".into()),
            format!("{}/{}", SocketAddrV4::new(f.vip, f.port), f.protocol),
            f.kind.to_string(),
            f.service_id.to_string(),
        ];
        if f.backends.is_empty() {
            let mut row = frontend.clone();
            row.extend(["(no backends: rejected)".into(), String::new(), "0".into(), "-".into()]);
            row.push(f.flows.to_string());
            t.row(row);
        }
        for (i, b) in f.backends.iter().enumerate() {
            let mut row = if i == 0 { frontend.clone() } else { vec![String::new(); 5] };
            row.push(SocketAddrV4::new(b.ip, b.port).to_string());
            row.push(b.pod.clone().unwrap_or_else(|| "-".into()));
            row.push(b.slots.to_string());
            row.push(if b.draining {
                "draining".into()
            } else {
                format!("{:.1}%", b.weight * 100.0)
            });
            row.push(b.flows.to_string());
            t.row(row);
        }
        for p in &f.problems {
            t.row(vec![
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                format!("! {p}"),
            ]);
        }
    }
    let mut out = t.render();
    if r.frontends.is_empty() {
        out.push_str("(no frontends: no Service is programmed)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use nodeplane_common::maps::{CT_DIR_REPLY, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;
    use crate::inspect::names::{NamesSnapshot, PodName, ServiceName};

    fn tables() -> ServiceTables {
        let vip = [10, 96, 0, 10];
        let mut t = ServiceTables { now_ns: 1_000, ..Default::default() };
        t.services.insert(
            ServiceKeyV4::vip_marker(vip),
            ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() },
        );
        t.services.insert(
            ServiceKeyV4::new(vip, 80, IPPROTO_TCP),
            ServiceValue { service_id: 1, backend_count: 3, ..Default::default() },
        );
        t.services.insert(
            ServiceKeyV4::new(vip, 53, IPPROTO_UDP),
            ServiceValue { service_id: 2, backend_count: 0, ..Default::default() },
        );
        for (slot, backend) in [(0, 10), (1, 11), (2, 10)] {
            t.slots.insert(SlotKey { service_id: 1, slot }, backend);
        }
        t.backends.insert(10, BackendV4::new([10, 244, 0, 2], 8080, IPPROTO_TCP));
        t.backends.insert(11, BackendV4::new([10, 244, 0, 3], 8080, IPPROTO_TCP));
        t.backends.insert(12, BackendV4::new([10, 244, 0, 4], 8080, IPPROTO_TCP));
        let flow = |sport: u16, backend_id: u32, dir: u8, expires_ns: u64| {
            let key = CtKeyV4 {
                saddr: [10, 244, 0, 9],
                daddr: vip,
                sport: sport.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: IPPROTO_TCP,
                dir,
                _pad: [0; 2],
            };
            (key, CtValueV4 { service_id: 1, backend_id, expires_ns, ..Default::default() })
        };
        t.ct.extend([
            flow(1, 10, CT_DIR_ORIGINAL, 2_000),
            flow(2, 10, CT_DIR_ORIGINAL, 2_000),
            flow(2, 10, CT_DIR_REPLY, 2_000),
            flow(3, 11, CT_DIR_ORIGINAL, 500),   // expired
            flow(4, 12, CT_DIR_ORIGINAL, 2_000), // a draining backend
        ]);
        t
    }

    fn names() -> NameIndex {
        NameIndex::new(Some(NamesSnapshot {
            version: super::super::names::NAMES_VERSION,
            services: vec![ServiceName {
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                proto: IPPROTO_TCP,
                service: "demo/web".into(),
                port_name: "http".into(),
            }],
            pods: vec![PodName {
                pod: "demo/web-0".into(),
                ip: Ipv4Addr::new(10, 244, 0, 2),
                node: None,
                host_network: false,
            }],
            ..Default::default()
        }))
    }

    #[test]
    fn frontends_with_weights_flows_and_draining_backends() {
        let r = report(&tables(), &names());
        assert_eq!(r.frontends.len(), 2, "the VIP marker is not a frontend");
        let web = &r.frontends[0];
        assert_eq!(
            (web.service.as_deref(), web.port_name.as_deref()),
            (Some("demo/web"), Some("http"))
        );
        assert_eq!((web.slots, web.flows), (3, 3));
        let got: Vec<_> = web
            .backends
            .iter()
            .map(|b| (b.backend_id, b.slots, b.flows, b.draining, b.pod.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 2, 2, false, Some("demo/web-0")),
                (11, 1, 0, false, None),
                (12, 0, 1, true, None)
            ]
        );
        assert!((web.backends[0].weight - 2.0 / 3.0).abs() < 1e-9);
        let dns = &r.frontends[1];
        assert_eq!((dns.service.as_deref(), dns.slots, dns.backends.len()), (None, 0, 0));

        let text = table(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{text}");
        assert!(
            lines[1].contains("demo/web")
                && lines[1].contains("10.96.0.10:80/TCP")
                && lines[1].contains("66.7%"),
            "{text}"
        );
        assert!(lines[3].contains("draining"), "{text}");
        assert!(
            lines[4].contains("10.96.0.10:53/UDP") && lines[4].contains("no backends"),
            "{text}"
        );
        // Columns line up: every backend address starts at the same offset.
        let col = lines[1].find("10.244.0.2:8080").unwrap();
        assert_eq!(lines[2].find("10.244.0.3:8080"), Some(col), "{text}");

        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["frontends"][0]["type"], "ClusterIP");
        assert_eq!(json["frontends"][0]["backends"][0]["ip"], "10.244.0.2");
        assert_eq!(json["frontends"][1]["service"], serde_json::Value::Null);
    }

    #[test]
    fn a_missing_slot_is_reported() {
        let mut t = tables();
        t.slots.remove(&SlotKey { service_id: 1, slot: 1 });
        let r = report(&t, &NameIndex::default());
        let web = r.frontends.iter().find(|f| f.port == 80).unwrap();
        assert_eq!(web.problems, vec!["slot 1 has no BACKEND_SLOTS entry".to_string()]);
        assert!(table(&r).contains("! slot 1"));
    }
}
