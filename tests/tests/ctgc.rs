//! Conntrack hygiene on real maps: the flush after a backend leaves a UDP frontend, the
//! expiry pass, and a TCP flow to a draining backend, with flows made by the real `from_pod`
//! program (BPF_PROG_TEST_RUN) and maps written through the agent's own writers. Needs root
//! (run with `cargo xtask test`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use nodeplane_agent::{
    ctgc::{Deleted, GcMaps, Pass, run_pass},
    datapath::Datapath,
    desired::{Desired, Frontend},
    occupancy::monotonic_ns,
    source::ObjectKey,
    sync::{MapWriter, Op, Syncer},
};
use nodeplane_common::{
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKeyV4, CtValueV4, IPPROTO_TCP, IPPROTO_UDP,
        SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey,
    },
    policy::{PolicyCtKey, PolicyCtValue},
    reason::Reason,
};
use nodeplane_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN, View},
    run::{TC_ACT_OK, run_once},
};

/// Two ClusterIPs whose UDP frontends share the same three backends (as two Services
/// selecting the same DNS pods do), and a TCP frontend on the first.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12), Ipv4Addr::new(10, 244, 0, 13)];
const DNS: u16 = 53;
const DNS_TARGET: u16 = 5353;
const HTTP: u16 = 80;
const HTTP_TARGET: u16 = 8080;
const HOUR: u64 = 3_600_000_000_000;

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

/// Frontend `vip:port/proto` with id `id` on the backends with these ids (each already
/// written), and surplus slots up to `old_count` deleted, in the agent's order.
fn frontend(dp: &mut Datapath, vip: Ipv4Addr, port: u16, proto: u8, id: u32, ids: &[u32]) {
    for (slot, bid) in ids.iter().enumerate() {
        let key = SlotKey { service_id: id, slot: slot as u32 };
        write(dp, Op::PutSlot { key, backend_id: *bid });
    }
    let value =
        ServiceValue { service_id: id, backend_count: ids.len() as u32, ..Default::default() };
    write(dp, Op::PutService { key: ServiceKeyV4::new(vip.octets(), port, proto), value });
}

fn udp_backend(i: usize) -> (u32, BackendV4) {
    (11 + i as u32, BackendV4::new(BACKENDS[i].octets(), DNS_TARGET, IPPROTO_UDP))
}

fn tcp_backend(i: usize) -> (u32, BackendV4) {
    (1 + i as u32, BackendV4::new(BACKENDS[i].octets(), HTTP_TARGET, IPPROTO_TCP))
}

fn fixture() -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    for vip in [VIP, VIP2] {
        write(
            &mut dp,
            Op::PutService { key: ServiceKeyV4::vip_marker(vip.octets()), value: marker },
        );
    }
    for i in 0..3 {
        let ((uid, ub), (tid, tb)) = (udp_backend(i), tcp_backend(i));
        write(&mut dp, Op::PutBackend { id: uid, backend: ub });
        write(&mut dp, Op::PutBackend { id: tid, backend: tb });
    }
    frontend(&mut dp, VIP, HTTP, IPPROTO_TCP, 1, &[1, 2, 3]);
    frontend(&mut dp, VIP, DNS, IPPROTO_UDP, 2, &[11, 12, 13]);
    frontend(&mut dp, VIP2, DNS, IPPROTO_UDP, 4, &[11, 12, 13]);
    dp
}

/// Every `CT_V4` entry.
fn ct(dp: &mut Datapath) -> BTreeMap<CtKeyV4, CtValueV4> {
    dp.maps().ct.iter().map(|e| e.expect("reading CT_V4")).collect()
}

/// The backend the first packet of `frame` was sent to.
fn send(dp: &Datapath, frame: &[u8]) -> (Ipv4Addr, u16) {
    let out = run_once(dp, frame);
    assert_eq!(out.action, TC_ACT_OK);
    View::parse_checked(&out.frame).dst
}

fn gc(dp: &mut Datapath, pass: Pass) -> (Deleted, Deleted) {
    let mut maps = GcMaps::new(dp.maps()).unwrap_or_else(|e| panic!("GC maps: {e}"));
    let report = run_pass(&mut maps, pass).unwrap_or_else(|e| panic!("{pass:?} pass: {e}"));
    (report.service, report.policy)
}

#[test]
fn a_flush_deletes_the_udp_flows_of_a_removed_backend_and_nothing_else() {
    let mut dp = fixture();
    // UDP flows through both ClusterIPs and TCP flows, spread over the three backends.
    let mut on_first = Vec::new();
    for port in 0..40u16 {
        // Distinct client ports per ClusterIP: two flows from one port to the same backend
        // would share a REPLY key.
        for (n, (vip, proto)) in
            [(VIP, IPPROTO_UDP), (VIP2, IPPROTO_UDP), (VIP, IPPROTO_TCP)].into_iter().enumerate()
        {
            let src = (CLIENT, 41000 + 100 * n as u16 + port);
            let frame = if proto == IPPROTO_UDP {
                Frame::udp(src, (vip, DNS)).build()
            } else {
                Frame::tcp(src, (vip, HTTP), TCP_SYN).build()
            };
            let to = send(&dp, &frame);
            if vip == VIP && proto == IPPROTO_UDP && to.0 == BACKENDS[0] {
                on_first.push(src);
            }
        }
    }
    assert!(!on_first.is_empty(), "40 UDP flows and none on the first backend");
    let before = ct(&mut dp);
    assert_eq!(before.len(), 2 * 3 * 40, "an ORIGINAL and a REPLY entry per flow");

    // The first backend leaves the first ClusterIP's UDP frontend only: its entry stays,
    // the second ClusterIP still uses it.
    frontend(&mut dp, VIP, DNS, IPPROTO_UDP, 2, &[12, 13]);
    write(&mut dp, Op::DelSlot { key: SlotKey { service_id: 2, slot: 2 } });
    // Without the flush the datapath keeps sending such a flow to it.
    let query = Frame::udp(on_first[0], (VIP, DNS)).build();
    assert_eq!(send(&dp, &query), (BACKENDS[0], DNS_TARGET), "the flow is still pinned");

    let (service, policy) = gc(&mut dp, Pass::Flush);
    let flushed = 2 * on_first.len() as u64;
    assert_eq!(service, Deleted { backend_removed: flushed, ..Deleted::default() });
    assert_eq!(policy, Deleted::default());
    let after = ct(&mut dp);
    let gone: BTreeSet<CtKeyV4> =
        before.keys().filter(|k| !after.contains_key(k)).copied().collect();
    let mut want = BTreeSet::new();
    for (addr, port) in &on_first {
        let original = CtKeyV4 {
            saddr: addr.octets(),
            daddr: VIP.octets(),
            sport: port.to_be_bytes(),
            dport: DNS.to_be_bytes(),
            proto: IPPROTO_UDP,
            dir: CT_DIR_ORIGINAL,
            _pad: [0; 2],
        };
        let reply = CtKeyV4 {
            saddr: BACKENDS[0].octets(),
            daddr: addr.octets(),
            sport: DNS_TARGET.to_be_bytes(),
            dport: port.to_be_bytes(),
            dir: CT_DIR_REPLY,
            ..original
        };
        want.extend([original, reply]);
    }
    assert_eq!(gone, want, "exactly both entries of every flow of the removed pair");
    assert_eq!(after.len() as u64, before.len() as u64 - flushed, "nothing else changed");

    // The next datagram of a flushed flow picks a backend that is still programmed, and the
    // old backend's answer is no longer translated.
    for src in &on_first {
        let to = send(&dp, &Frame::udp(*src, (VIP, DNS)).build());
        assert_ne!(to.0, BACKENDS[0], "a flushed flow went back to the removed backend");
    }
    let late = Frame::udp((BACKENDS[0], DNS_TARGET), on_first[0]).build();
    assert_eq!(run_once(&dp, &late).frame, late, "a late answer is not made the VIP's");
    // Nothing left to flush.
    assert_eq!(gc(&mut dp, Pass::Flush).0, Deleted::default());
}

/// Writes `(key, value)` into `CT_V4`.
fn put(dp: &mut Datapath, key: CtKeyV4, value: CtValueV4) {
    dp.maps().ct.insert(key, value, 0).unwrap_or_else(|e| panic!("CT_V4 insert: {e}"));
}

/// A TCP flow's ORIGINAL and REPLY entries, `client:cport -> VIP:80` on `backend`, with
/// deadlines `(original, reply)`.
fn tcp_flow(cport: u16, backend: usize, deadlines: (u64, u64)) -> [(CtKeyV4, CtValueV4); 2] {
    let (id, b) = tcp_backend(backend);
    let original = CtKeyV4 {
        saddr: CLIENT.octets(),
        daddr: VIP.octets(),
        sport: cport.to_be_bytes(),
        dport: HTTP.to_be_bytes(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    let value = CtValueV4 {
        nat_addr: b.addr,
        nat_port: b.port,
        state: 2,
        service_id: 1,
        backend_id: id,
        expires_ns: deadlines.0,
        ..Default::default()
    };
    let reply = CtKeyV4 {
        saddr: b.addr,
        daddr: CLIENT.octets(),
        sport: b.port,
        dport: original.sport,
        dir: CT_DIR_REPLY,
        ..original
    };
    let reply_value = CtValueV4 {
        nat_addr: VIP.octets(),
        nat_port: original.dport,
        expires_ns: deadlines.1,
        ..value
    };
    [(original, value), (reply, reply_value)]
}

#[test]
fn the_expiry_pass_deletes_what_the_datapath_ignores_and_keeps_every_live_flow() {
    let mut dp = fixture();
    let now = monotonic_ns();
    let (live, dead) = (now + HOUR, 1);
    // A real flow, established, whose REPLY entry is past its own (never refreshed) deadline.
    let src = (CLIENT, 40000);
    let backend = send(&dp, &Frame::tcp(src, (VIP, HTTP), TCP_SYN).build());
    let reply_key = CtKeyV4 {
        saddr: backend.0.octets(),
        daddr: CLIENT.octets(),
        sport: backend.1.to_be_bytes(),
        dport: src.1.to_be_bytes(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let mut reply = dp.maps().ct.get(&reply_key, 0).expect("the REPLY entry");
    reply.expires_ns = dead;
    put(&mut dp, reply_key, reply);

    let keep_both = tcp_flow(1, 0, (live, dead));
    let dead_flow = tcp_flow(2, 1, (dead, dead));
    let [_, orphan] = tcp_flow(3, 2, (dead, dead));
    let [_, young] = tcp_flow(4, 2, (dead, live));
    // The ORIGINAL moved to backend 1 (re-selected); the REPLY of backend 0 is stale.
    let [moved, _] = tcp_flow(5, 1, (live, live));
    let [_, left_behind] = tcp_flow(5, 0, (live, dead));
    // A live UDP flow of a programmed pair, and an expired one.
    let udp = |cport: u16, expires_ns| {
        let (id, b) = udp_backend(1);
        let key = CtKeyV4 {
            saddr: CLIENT.octets(),
            daddr: VIP.octets(),
            sport: cport.to_be_bytes(),
            dport: DNS.to_be_bytes(),
            proto: IPPROTO_UDP,
            dir: CT_DIR_ORIGINAL,
            _pad: [0; 2],
        };
        let value = CtValueV4 {
            nat_addr: b.addr,
            nat_port: b.port,
            service_id: 2,
            backend_id: id,
            expires_ns,
            ..Default::default()
        };
        (key, value)
    };
    let entries = [keep_both[0], keep_both[1], dead_flow[0], dead_flow[1], orphan, young, moved]
        .into_iter()
        .chain([left_behind, udp(6, live), udp(7, dead)]);
    for (k, v) in entries {
        put(&mut dp, k, v);
    }
    // Many more, over several batches: every other one expired.
    const BULK: u32 = 20_000;
    for i in 0..BULK {
        let [(mut k, v), _] = tcp_flow(0, 0, (if i % 2 == 0 { live } else { dead }, live));
        k.saddr = [10, 245, (i >> 8) as u8, i as u8];
        put(&mut dp, k, v);
    }
    // Policy conntrack: three live, four expired.
    for i in 0..7u16 {
        let key = PolicyCtKey {
            saddr: CLIENT.octets(),
            daddr: BACKENDS[0].octets(),
            sport: i.to_be_bytes(),
            dport: HTTP_TARGET.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let value =
            PolicyCtValue { expires_ns: if i < 3 { live } else { dead }, ..Default::default() };
        dp.maps().policy_ct.insert(key, value, 0).expect("POLICY_CT_V4 insert");
    }
    let before = ct(&mut dp);

    let (service, policy) = gc(&mut dp, Pass::Expiry);
    // Expired ORIGINALs: the dead flow's, the bulk's half, the expired UDP flow's.
    let expired = 1 + u64::from(BULK) / 2 + 1;
    assert_eq!(service, Deleted { expired, orphaned: 3, backend_removed: 0 });
    assert_eq!(policy, Deleted { expired: 4, ..Deleted::default() });
    let after = ct(&mut dp);
    let gone: BTreeSet<CtKeyV4> =
        before.keys().filter(|k| !after.contains_key(k)).copied().collect();
    for (what, key) in [
        ("the dead flow's ORIGINAL", dead_flow[0].0),
        ("the dead flow's REPLY", dead_flow[1].0),
        ("a REPLY without its ORIGINAL", orphan.0),
        ("the REPLY of a backend its flow left", left_behind.0),
        ("an expired UDP flow", udp(7, dead).0),
    ] {
        assert!(gone.contains(&key), "{what} was kept");
    }
    for (what, key) in [
        ("a live ORIGINAL", keep_both[0].0),
        ("the old REPLY of a live flow", keep_both[1].0),
        ("a young REPLY whose ORIGINAL is not written yet", young.0),
        ("the moved flow's ORIGINAL", moved.0),
        ("a live UDP flow", udp(6, live).0),
        ("the real flow's REPLY", reply_key),
    ] {
        assert!(after.contains_key(&key), "{what} was deleted");
    }
    assert_eq!(gone.len() as u64, expired + 3);
    assert_eq!(dp.maps().policy_ct.iter().count(), 3);

    // The real flow still works both ways: its REPLY entry is judged by its ORIGINAL.
    let ack = run_once(&dp, &Frame::tcp(src, (VIP, HTTP), TCP_ACK).build());
    assert_eq!(View::parse_checked(&ack.frame).dst, backend);
    let answer = Frame::tcp(backend, src, TCP_ACK).build();
    assert_eq!(View::parse_checked(&run_once(&dp, &answer).frame).src, (VIP, HTTP));
    // A second pass finds nothing more.
    assert_eq!(gc(&mut dp, Pass::Expiry), (Deleted::default(), Deleted::default()));
}

fn desired(backends: &[usize], draining: &[usize]) -> Desired {
    let pick = |set: &[usize]| set.iter().map(|i| tcp_backend(*i).1).collect::<Vec<_>>();
    let frontend = Frontend {
        service: ObjectKey::namespaced("demo", "web"),
        port_name: "http".into(),
        backends: pick(backends),
        draining: pick(draining),
        session_affinity: nodeplane_agent::model::SessionAffinity::None,
        no_local_endpoints: false,
        external: None,
    };
    let key = ServiceKeyV4::new(VIP.octets(), HTTP, IPPROTO_TCP);
    Desired { frontends: [(key, frontend)].into(), skipped: Vec::new() }
}

/// The TCP rule with the agent's own syncer: a backend that stops getting new flows but is
/// still listed (not ready, terminating) keeps its connections; once it is gone from the
/// slices, the next packet of its flow goes to a live backend (which resets it).
#[test]
fn a_draining_tcp_backend_keeps_its_connections_until_it_is_gone() {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let mut syncer = Syncer::new();
    syncer.apply(&desired(&[0, 1, 2], &[]), dp.maps()).expect("sync");
    let mut held = Vec::new();
    for port in 0..30u16 {
        let src = (CLIENT, 42000 + port);
        let to = send(&dp, &Frame::tcp(src, (VIP, HTTP), TCP_SYN).build());
        if to.0 == BACKENDS[0] {
            held.push(src);
        }
    }
    assert!(!held.is_empty(), "30 connections and none to the first backend");

    syncer.apply(&desired(&[1, 2], &[0]), dp.maps()).expect("sync");
    assert_eq!(gc(&mut dp, Pass::Flush).0, Deleted::default(), "TCP flows are never flushed");
    for src in &held {
        let ack = Frame::tcp(*src, (VIP, HTTP), TCP_ACK).build();
        let to = View::parse_checked(&run_once(&dp, &ack).frame).dst;
        assert_eq!(to.0, BACKENDS[0], "a connection to a draining backend moved");
    }
    for port in 0..60u16 {
        let to = send(&dp, &Frame::tcp((CLIENT, 43000 + port), (VIP, HTTP), TCP_SYN).build());
        assert_ne!(to.0, BACKENDS[0], "a new connection went to a draining backend");
    }

    syncer.apply(&desired(&[1, 2], &[]), dp.maps()).expect("sync");
    let before = dp.counters().expect("counters");
    for src in &held {
        let ack = Frame::tcp(*src, (VIP, HTTP), TCP_ACK).build();
        let to = View::parse_checked(&run_once(&dp, &ack).frame).dst;
        assert_ne!(to.0, BACKENDS[0], "sent to a backend that is gone");
    }
    let after = dp.counters().expect("counters");
    let reselected = |c: &[(_, Reason, nodeplane_common::maps::Counter)]| -> u64 {
        c.iter().filter(|(_, r, _)| *r == Reason::NatReselected).map(|(_, _, c)| c.packets).sum()
    };
    assert_eq!(reselected(&after) - reselected(&before), held.len() as u64);
}

/// `NAT_V4` in the expiry pass: closed flows give their port back 10 s after their last
/// packet, established ones keep it, and an entry whose partner is gone (evicted) goes too.
#[test]
fn the_expiry_pass_frees_the_ports_of_finished_snat_flows() {
    use nodeplane_common::{
        ct::{NSEC_PER_SEC, TcpState},
        nat::{NAT_DIR_OUT, NatValueV4},
    };
    let mut dp = fixture();
    let now = monotonic_ns();
    let node = [192, 168, 0, 10];
    let flow = |cport: u16, nat_port: u16, state: TcpState, idle_s: u64| {
        let out = CtKeyV4 {
            saddr: [10, 244, 0, 2],
            daddr: [198, 18, 0, 2],
            sport: cport.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            dir: NAT_DIR_OUT,
            _pad: [0; 2],
        };
        let value = NatValueV4 {
            addr: node,
            port: nat_port.to_be_bytes(),
            state: state as u8,
            last_seen_ns: now - idle_s * NSEC_PER_SEC,
            ..NatValueV4::default()
        };
        let back = NatValueV4 { addr: out.saddr, port: out.sport, ..value };
        [(out, value), (value.partner(&out), back)]
    };
    let live = flow(40001, 61001, TcpState::Established, 30);
    let closed = flow(40002, 61002, TcpState::Closing, 30);
    let half = flow(40003, 61003, TcpState::Established, 30);
    for (k, v) in live.iter().chain(&closed).chain(&half[..1]) {
        dp.maps().nat.insert(k, v, 0).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut maps = GcMaps::new(dp.maps()).unwrap_or_else(|e| panic!("GC maps: {e}"));
    let report = run_pass(&mut maps, Pass::Expiry).unwrap_or_else(|e| panic!("expiry: {e}"));
    assert_eq!((report.nat.expired, report.nat.orphaned), (2, 1), "{:?}", report.nat);
    let left: Vec<CtKeyV4> = dp.maps().nat.keys().map(|k| k.expect("key")).collect();
    assert_eq!(left.len(), 2, "only the live flow's two entries stay: {left:?}");
    assert!(live.iter().all(|(k, _)| left.contains(k)));
}
