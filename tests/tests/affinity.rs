//! BPF_PROG_TEST_RUN tests of session affinity (`sessionAffinity: ClientIP`): the real
//! `from_pod` program on crafted SYNs, maps written through the agent's `MapWriter` with
//! the agent's own `sync::service_value`. Needs root (run with `cargo xtask test`).
//!
//! Each test loads its own (unpinned) datapath, so `AFFINITY_V4` starts empty.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use nodeplane_agent::{
    datapath::Datapath,
    model::SessionAffinity,
    sync::{MapWriter, Op, service_value},
};
use nodeplane_common::{
    maps::{
        AffinityKeyV4, BackendV4, IPPROTO_TCP, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue,
        SlotKey,
    },
    reason::Reason,
};
use nodeplane_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN, View},
    run::{TC_ACT_OK, run_once},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12), Ipv4Addr::new(10, 244, 0, 13)];
/// The frontend with affinity (service id 1).
const STICKY: u16 = 80;
/// A frontend of the same backends without affinity (service id 2).
const PLAIN: u16 = 81;
const TARGET: u16 = 8080;

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

/// A frontend description that differs from the default only in its affinity (what
/// `service_value` reads).
fn affinity_frontend(affinity: SessionAffinity) -> nodeplane_agent::desired::Frontend {
    nodeplane_agent::desired::Frontend {
        service: nodeplane_agent::model::ObjectKey::namespaced("d", "s"),
        port_name: String::new(),
        backends: Vec::new(),
        draining: Vec::new(),
        session_affinity: affinity,
        no_local_endpoints: false,
        external: None,
    }
}

fn backend(i: usize) -> (u32, BackendV4) {
    (i as u32 + 1, BackendV4::new(BACKENDS[i].octets(), TARGET, IPPROTO_TCP))
}

/// Points the slots of frontend `id` at `backends` (in order), then writes its entry, then
/// drops surplus slots: the agent's safe order.
fn frontend(dp: &mut Datapath, id: u32, port: u16, backends: &[usize], affinity: SessionAffinity) {
    for (slot, i) in backends.iter().enumerate() {
        let key = SlotKey { service_id: id, slot: slot as u32 };
        write(dp, Op::PutSlot { key, backend_id: backend(*i).0 });
    }
    let value = service_value(id, backends.len() as u32, &affinity_frontend(affinity));
    write(dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), port, IPPROTO_TCP), value });
    for slot in backends.len()..BACKENDS.len() {
        let key = SlotKey { service_id: id, slot: slot as u32 };
        let _ = dp.maps().apply(&Op::DelSlot { key });
    }
}

/// Three backends behind `VIP:80` (affinity with `timeout_s`) and `VIP:81` (none).
fn fixture(timeout_s: u32) -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::vip_marker(VIP.octets()), value: marker });
    for i in 0..BACKENDS.len() {
        let (id, b) = backend(i);
        write(&mut dp, Op::PutBackend { id, backend: b });
    }
    frontend(&mut dp, 1, STICKY, &[0, 1, 2], SessionAffinity::ClientIp { timeout_s });
    frontend(&mut dp, 2, PLAIN, &[0, 1, 2], SessionAffinity::None);
    dp
}

/// Client `n` (10.244.1.n).
fn client(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, n)
}

/// A new connection (SYN from a fresh source port) from `client` to `VIP:port`: the backend
/// it was sent to.
fn connect(dp: &Datapath, client: Ipv4Addr, sport: u16, port: u16) -> Ipv4Addr {
    let syn = Frame::tcp((client, sport), (VIP, port), TCP_SYN).build();
    let out = run_once(dp, &syn);
    assert_eq!(out.action, TC_ACT_OK, "SYN {client}:{sport} -> :{port}");
    let view = View::parse_checked(&out.frame);
    assert_eq!(view.dst.1, TARGET, "SYN {client}:{sport} -> :{port} was not translated");
    view.dst.0
}

fn affinity_of(dp: &mut Datapath, service_id: u32, client: Ipv4Addr) -> Option<(u32, u64)> {
    let key = AffinityKeyV4 { service_id, client: client.octets() };
    dp.maps().affinity.get(&key, 0).ok().map(|v| (v.backend_id, v.last_seen_ns))
}

#[test]
fn new_connections_of_one_client_stick_to_one_backend_while_clients_spread() {
    let mut dp = fixture(600);
    let mut chosen = BTreeSet::new();
    for n in 1..=30 {
        let first = connect(&dp, client(n), 30000, STICKY);
        for sport in 30001..30020 {
            let again = connect(&dp, client(n), sport, STICKY);
            assert_eq!(again, first, "client {n}'s connection from port {sport} moved");
        }
        let id = BACKENDS.iter().position(|b| *b == first).expect("a backend") as u32 + 1;
        let (backend_id, _) = affinity_of(&mut dp, 1, client(n)).expect("an affinity entry");
        assert_eq!(backend_id, id, "the entry names the backend used");
        chosen.insert(first);
    }
    // 30 clients all on one backend by chance: 3 * (1/3)^30.
    assert!(chosen.len() > 1, "every client got the same backend: {chosen:?}");

    // Packets of an established flow neither read nor refresh the entry.
    let before = affinity_of(&mut dp, 1, client(1)).expect("entry");
    std::thread::sleep(Duration::from_millis(5));
    let ack = Frame::tcp((client(1), 30000), (VIP, STICKY), TCP_ACK).build();
    let out = run_once(&dp, &ack);
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(affinity_of(&mut dp, 1, client(1)), Some(before), "refreshed by an ACK");
    assert_eq!(
        dp.counters()
            .expect("counters")
            .iter()
            .find(|(_, r, _)| *r == Reason::NatEstablished)
            .map(|(_, _, c)| c.packets),
        Some(1)
    );
}

#[test]
fn a_frontend_without_affinity_spreads_one_clients_connections() {
    let mut dp = fixture(600);
    let seen: BTreeSet<Ipv4Addr> =
        (0..60).map(|i| connect(&dp, client(1), 40000 + i, PLAIN)).collect();
    // One backend 60 times by chance: 3 * (1/3)^60.
    assert!(seen.len() > 1, "60 connections without affinity all went to {seen:?}");
    assert_eq!(affinity_of(&mut dp, 2, client(1)), None, "no entry without affinity");
}

#[test]
fn the_affinity_expires_timeout_seconds_after_the_last_new_connection() {
    let dp = fixture(1);
    let first = connect(&dp, client(1), 30000, STICKY);
    // New connections 0.6 s apart keep it alive past 1 s from the first one.
    for (i, sport) in (30001..30004).enumerate() {
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(connect(&dp, client(1), sport, STICKY), first, "refresh {i}: moved");
    }
    // Past the timeout the next connection picks at random: within 15 tries it lands on
    // another backend (all 15 on the same one: (1/3)^15).
    let start = Instant::now();
    let mut sport = 31000;
    let mut current = first;
    for round in 0..15 {
        std::thread::sleep(Duration::from_millis(1100));
        sport += 1;
        let got = connect(&dp, client(1), sport, STICKY);
        if got != current {
            eprintln!("moved from {current} to {got} after round {round}");
            return;
        }
        current = got;
        assert!(start.elapsed() < Duration::from_secs(30), "bounded");
    }
    panic!("the client stayed on {first} over 15 expired affinities");
}

#[test]
fn a_backend_out_of_the_slots_is_not_used_through_affinity() {
    let mut dp = fixture(600);
    // A client whose affinity is the last backend (slot 2).
    let n = (1..=200)
        .find(|n| connect(&dp, client(*n), 30000, STICKY) == BACKENDS[2])
        .expect("a client lands on backend 2 within 200 tries");

    // Backend 0 leaves: backend 2 shifts from slot 2 to slot 1, and stays the client's.
    frontend(&mut dp, 1, STICKY, &[1, 2], SessionAffinity::ClientIp { timeout_s: 600 });
    for sport in 30001..30011 {
        assert_eq!(connect(&dp, client(n), sport, STICKY), BACKENDS[2], "shifted slot lost");
    }
    // Backend 0 returns: backend 2 shifts back to slot 2.
    frontend(&mut dp, 1, STICKY, &[0, 1, 2], SessionAffinity::ClientIp { timeout_s: 600 });
    assert_eq!(connect(&dp, client(n), 30011, STICKY), BACKENDS[2], "shifted back");

    // Backend 2 leaves the slots but keeps its BACKENDS_V4 entry (draining, or another
    // Service's): new connections go elsewhere, and stick there.
    frontend(&mut dp, 1, STICKY, &[0, 1], SessionAffinity::ClientIp { timeout_s: 600 });
    assert!(dp.maps().backends.get(&backend(2).0, 0).is_ok(), "still an entry");
    let moved = connect(&dp, client(n), 30020, STICKY);
    assert_ne!(moved, BACKENDS[2], "affinity used a backend that left the slots");
    for sport in 30021..30031 {
        let got = connect(&dp, client(n), sport, STICKY);
        assert_ne!(got, BACKENDS[2], "port {sport}");
        assert_eq!(got, moved, "the new affinity holds");
    }

    // Turning affinity off on the frontend: the old entry is ignored.
    frontend(&mut dp, 1, STICKY, &[0, 1, 2], SessionAffinity::None);
    let seen: BTreeSet<Ipv4Addr> =
        (0..60).map(|i| connect(&dp, client(n), 32000 + i, STICKY)).collect();
    assert!(seen.len() > 1, "affinity off, yet every connection went to {seen:?}");
}
