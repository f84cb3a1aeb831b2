//! BPF_PROG_TEST_RUN tests: the real `from_pod` and `to_pod` programs on crafted frames, with maps
//! written through the agent's own `MapWriter`. Needs root (run with `cargo xtask test`).
use std::net::Ipv4Addr;

use nodeplane_agent::{
    datapath::Datapath,
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKeyV4, IPPROTO_TCP, IPPROTO_UDP,
        SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey, names,
    },
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    packet::{Frame, TCP_ACK, TCP_FIN, TCP_SYN, View},
    run::{TC_ACT_OK, TC_ACT_SHOT, run_once, run_once_on},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 2), 40000);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12), Ipv4Addr::new(10, 244, 0, 13)];
const TCP_PORT: u16 = 80;
const TCP_TARGET: u16 = 8080;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;
/// A frontend with no endpoints.
const EMPTY_PORT: u16 = 81;

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

fn service(dp: &mut Datapath, id: u32, port: u16, proto: u8, backends: &[(u32, BackendV4)]) {
    for (bid, b) in backends {
        write(dp, Op::PutBackend { id: *bid, backend: *b });
    }
    for (slot, (bid, _)) in backends.iter().enumerate() {
        let key = SlotKey { service_id: id, slot: slot as u32 };
        write(dp, Op::PutSlot { key, backend_id: *bid });
    }
    let value =
        ServiceValue { service_id: id, backend_count: backends.len() as u32, ..Default::default() };
    write(dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), port, proto), value });
}

fn tcp_backends() -> Vec<(u32, BackendV4)> {
    BACKENDS
        .iter()
        .enumerate()
        .map(|(i, ip)| (i as u32 + 1, BackendV4::new(ip.octets(), TCP_TARGET, IPPROTO_TCP)))
        .collect()
}

fn udp_backends() -> Vec<(u32, BackendV4)> {
    BACKENDS
        .iter()
        .enumerate()
        .map(|(i, ip)| (i as u32 + 11, BackendV4::new(ip.octets(), UDP_TARGET, IPPROTO_UDP)))
        .collect()
}

/// A loaded datapath with one ClusterIP: 80/TCP and 53/UDP to three backends, 81/TCP empty.
fn fixture() -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::vip_marker(VIP.octets()), value: marker });
    service(&mut dp, 1, TCP_PORT, IPPROTO_TCP, &tcp_backends());
    service(&mut dp, 2, UDP_PORT, IPPROTO_UDP, &udp_backends());
    service(&mut dp, 3, EMPTY_PORT, IPPROTO_TCP, &[]);
    dp
}

/// Packets per (hook, reason), summed over CPUs.
type Counts = Vec<((Hook, Reason), u64)>;

/// Every `COUNTERS` slot the agent reads.
fn counters(dp: &Datapath) -> Counts {
    let all = dp.counters().unwrap_or_else(|e| panic!("reading counters: {e}"));
    all.into_iter().map(|(h, r, c)| ((h, r), c.packets)).collect()
}

fn count(dp: &Datapath, hook: Hook, reason: Reason) -> u64 {
    counters(dp).iter().find(|(k, _)| *k == (hook, reason)).map(|(_, n)| *n).unwrap_or(0)
}

/// Runs `frame` through `program`; returns its outcome and the counters that moved, with
/// how much.
fn run_counted(
    dp: &Datapath,
    program: &str,
    frame: &[u8],
) -> (nodeplane_tests::run::Outcome, Counts) {
    let before = counters(dp);
    let out = run_once_on(dp, program, frame);
    let moved = counters(dp)
        .into_iter()
        .zip(before)
        .map(|((k, now), (_, was))| (k, now - was))
        .filter(|(_, d)| *d > 0)
        .collect();
    (out, moved)
}

/// Runs `frame` through `from_pod`, asserts the action and that exactly `reason` was
/// counted for it, once, under `from_pod`.
fn expect(dp: &mut Datapath, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
    let (out, moved) = run_counted(dp, names::PROG_FROM_POD, frame);
    assert_eq!(out.action, action, "tc action for {reason:?}");
    assert_eq!(moved, [((Hook::FromPod, reason), 1)], "counters for {}", reason.name());
    out.frame
}

/// The conntrack key of a TCP packet `src -> dst` in direction `dir`.
fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr: src.0.octets(),
        daddr: dst.0.octets(),
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
        proto: IPPROTO_TCP,
        dir,
        _pad: [0; 2],
    }
}

#[test]
fn first_packet_is_dnated_with_valid_checksums_and_recorded_in_conntrack() {
    let mut dp = fixture();
    let frame = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    let out = View::parse_checked(&expect(&mut dp, &frame, TC_ACT_OK, Reason::NatNew));
    assert_eq!(out.src, CLIENT, "source must not change on DNAT");
    assert!(BACKENDS.contains(&out.dst.0), "DNAT to a non-backend {:?}", out.dst);
    assert_eq!(out.dst.1, TCP_TARGET);
    assert_eq!(out.payload, b"ping");

    let orig = ct_key(CLIENT, (VIP, TCP_PORT), CT_DIR_ORIGINAL);
    let entry = dp.maps().ct.get(&orig, 0).expect("ORIGINAL conntrack entry");
    assert_eq!(entry.nat_addr, out.dst.0.octets());
    assert_eq!(entry.service_id, 1);
    let reply = ct_key(out.dst, CLIENT, CT_DIR_REPLY);
    let entry = dp.maps().ct.get(&reply, 0).expect("REPLY conntrack entry");
    assert_eq!((entry.nat_addr, entry.nat_port), (VIP.octets(), TCP_PORT.to_be_bytes()));
}

#[test]
fn later_packets_stick_to_the_backend_and_replies_are_reverse_nated() {
    let mut dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    let backend = View::parse_checked(&run_once(&dp, &syn).frame).dst;

    let reply = Frame::tcp(backend, CLIENT, TCP_SYN | TCP_ACK).build();
    let out = View::parse_checked(&expect(&mut dp, &reply, TC_ACT_OK, Reason::RevNat));
    assert_eq!(out.src, (VIP, TCP_PORT), "reply must come from the VIP");
    assert_eq!(out.dst, CLIENT);

    for _ in 0..20 {
        let ack = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_ACK).build();
        let out = View::parse_checked(&expect(&mut dp, &ack, TC_ACT_OK, Reason::NatEstablished));
        assert_eq!(out.dst, backend, "an established flow changed backend");
    }
}

/// A backend on another node, or on the host network: its reply does not come out of a
/// local pod veth, so `from_pod` never sees it; `to_pod`, on the client's veth, does.
#[test]
fn to_pod_reverse_translates_replies_from_anywhere_and_nothing_else() {
    let dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    let backend = View::parse_checked(&run_once(&dp, &syn).frame).dst;

    let reply = Frame::tcp(backend, CLIENT, TCP_SYN | TCP_ACK).build();
    let (out, moved) = run_counted(&dp, names::PROG_TO_POD, &reply);
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(moved, [((Hook::ToPod, Reason::RevNat), 1)]);
    let out = View::parse_checked(&out.frame);
    assert_eq!(out.src, (VIP, TCP_PORT), "reply must come from the VIP");
    assert_eq!(out.dst, CLIENT);

    // Already translated (a local backend's reply, done by from_pod), a request arriving at
    // a backend, unrelated traffic: all untouched.
    let done = Frame::tcp((VIP, TCP_PORT), CLIENT, TCP_ACK).build();
    let request = Frame::tcp(CLIENT, backend, TCP_ACK).build();
    let other = Frame::tcp((Ipv4Addr::new(10, 1, 2, 3), 443), CLIENT, TCP_ACK).build();
    for frame in [done, request, other] {
        let (out, moved) = run_counted(&dp, names::PROG_TO_POD, &frame);
        assert_eq!((out.action, out.frame), (TC_ACT_OK, frame));
        assert_eq!(moved, [((Hook::ToPod, Reason::PassNotService), 1)]);
    }
}

#[test]
fn new_flows_spread_over_all_backends() {
    let dp = fixture();
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..200 {
        let frame = Frame::tcp((CLIENT.0, 20000 + port), (VIP, TCP_PORT), TCP_SYN).build();
        seen.insert(View::parse_checked(&run_once(&dp, &frame).frame).dst.0);
    }
    assert_eq!(seen, BACKENDS.into_iter().collect(), "200 flows must reach all 3 backends");
}

#[test]
fn udp_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    let mut dp = fixture();
    let frame = Frame::udp(CLIENT, (VIP, UDP_PORT)).build();
    let out = View::parse_checked(&expect(&mut dp, &frame, TC_ACT_OK, Reason::NatNew));
    assert!(BACKENDS.contains(&out.dst.0));
    assert_eq!(out.dst.1, UDP_TARGET);
    let reply = Frame::udp(out.dst, CLIENT).build();
    let back = View::parse_checked(&expect(&mut dp, &reply, TC_ACT_OK, Reason::RevNat));
    assert_eq!(back.src, (VIP, UDP_PORT));

    let mut nocsum = Frame::udp((CLIENT.0, 40001), (VIP, UDP_PORT));
    nocsum.udp_zero_csum = true;
    let out = View::parse_checked(&run_once(&dp, &nocsum.build()).frame);
    assert_eq!(out.dst.1, UDP_TARGET);
    assert_eq!(out.l4_csum, 0, "UDP without checksum must stay without checksum");
}

#[test]
fn ip_options_are_skipped_with_the_real_ihl() {
    let mut dp = fixture();
    let mut f = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN);
    // Router alert (RFC 2113), 4 bytes, plus 4 bytes of NOPs: IHL = 7.
    f.ip_options = vec![0x94, 0x04, 0x00, 0x00, 1, 1, 1, 1];
    let out = View::parse_checked(&expect(&mut dp, &f.build(), TC_ACT_OK, Reason::NatNew));
    assert_eq!(out.dst.1, TCP_TARGET, "ports were read at a fixed offset");
    assert_eq!(out.src.1, CLIENT.1);
    assert_eq!(out.ip_options, f.ip_options, "options must be untouched");
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    let mut dp = fixture();
    let cases = [
        Frame::tcp(CLIENT, (BACKENDS[0], TCP_TARGET), TCP_SYN).build(),
        Frame::udp(CLIENT, (Ipv4Addr::new(10, 96, 0, 99), UDP_PORT)).build(),
        // The VIP, but a port no frontend has: not translated.
        Frame::tcp(CLIENT, (VIP, 8443), TCP_SYN).build(),
        // A reply-looking packet of a flow conntrack never saw.
        Frame::tcp((BACKENDS[1], TCP_TARGET), CLIENT, TCP_ACK).build(),
    ];
    for frame in cases {
        let out = expect(&mut dp, &frame, TC_ACT_OK, Reason::PassNotService);
        assert_eq!(out, frame, "non-service traffic was modified");
    }
}

/// What is answered and how is tests/tests/reject.rs; a RST is never answered.
#[test]
fn a_service_without_endpoints_drops_a_rst_and_counts_no_backends() {
    let mut dp = fixture();
    let frame = Frame::tcp(CLIENT, (VIP, EMPTY_PORT), 0x04).build();
    expect(&mut dp, &frame, TC_ACT_SHOT, Reason::DropNoBackends);
}

#[test]
fn an_established_flow_whose_backend_is_gone_moves_to_a_live_one() {
    let mut dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    let first = View::parse_checked(&run_once(&dp, &syn).frame).dst;
    // Rewrite the service without that backend, in the agent's order: slots, service,
    // then the backend entry itself.
    let remaining: Vec<_> =
        tcp_backends().into_iter().filter(|(_, b)| b.addr != first.0.octets()).collect();
    let gone =
        tcp_backends().into_iter().find(|(_, b)| b.addr == first.0.octets()).map(|(id, _)| id);
    service(&mut dp, 1, TCP_PORT, IPPROTO_TCP, &remaining);
    write(&mut dp, Op::DelSlot { key: SlotKey { service_id: 1, slot: 2 } });
    write(&mut dp, Op::DelBackend { id: gone.expect("first backend is one of the fixture's") });

    let ack = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_ACK).build();
    let out = View::parse_checked(&expect(&mut dp, &ack, TC_ACT_OK, Reason::NatReselected));
    assert_ne!(out.dst, first, "sent to a removed backend");
    assert!(remaining.iter().any(|(_, b)| b.addr == out.dst.0.octets()));
    // The old backend's reply entry no longer translates.
    let stale = Frame::tcp(first, CLIENT, TCP_ACK).build();
    let out = expect(&mut dp, &stale, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(out, stale);
}

#[test]
fn a_deleted_service_is_no_longer_translated() {
    let mut dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    run_once(&dp, &syn);
    write(&mut dp, Op::DelService { key: ServiceKeyV4::new(VIP.octets(), TCP_PORT, IPPROTO_TCP) });
    let ack = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_ACK).build();
    let out = expect(&mut dp, &ack, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(out, ack);
}

/// Malformed and odd packets: each passes or drops by the rule in docs/ARCHITECTURE.md and
/// is never translated.
#[test]
fn malformed_packets_are_never_translated() {
    let dp = fixture();
    let good = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();

    // BPF_PROG_TEST_RUN itself refuses an IPv4 frame shorter than 20 header bytes, so the
    // truncated header is one whose IHL announces options that are not there.
    let mut truncated_ip = good[..14 + 20].to_vec();
    truncated_ip[14] = 0x4f; // IHL 15: 60 header bytes announced, 20 present
    truncated_ip.extend_from_slice(&[0u8; 10]);
    let mut ihl_4 = good.clone();
    ihl_4[14] = 0x44;
    let mut version_6_in_ipv4 = good.clone();
    version_6_in_ipv4[14] = 0x65;
    let truncated_tcp = good[..14 + 20 + 10].to_vec();
    let mut tcp_doff_4 = good.clone();
    tcp_doff_4[14 + 20 + 12] = 4 << 4;
    let udp_trunc = Frame::udp(CLIENT, (VIP, UDP_PORT)).build()[..14 + 20 + 4].to_vec();
    let mut first_fragment = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN);
    first_fragment.frag_off = 0x2000; // MF
    let mut later_fragment = Frame::other(CLIENT.0, VIP, IPPROTO_UDP);
    later_fragment.frag_off = 0x0010; // offset 128 bytes, no L4 header
    let mut fragment_elsewhere = Frame::udp(CLIENT, (BACKENDS[0], UDP_TARGET));
    fragment_elsewhere.frag_off = 0x2000;
    let icmp_to_vip = Frame::other(CLIENT.0, VIP, 1).build();
    let icmp_elsewhere = Frame::other(CLIENT.0, BACKENDS[0], 1).build();
    let mut arp = good[..14].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut ipv6 = good.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);

    let table: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
        ("IPv4 options cut short", truncated_ip, TC_ACT_SHOT, Reason::DropMalformedIp),
        ("IHL 4", ihl_4, TC_ACT_SHOT, Reason::DropMalformedIp),
        ("version 6 in an IPv4 frame", version_6_in_ipv4, TC_ACT_SHOT, Reason::DropMalformedIp),
        ("TCP header cut at 10 bytes", truncated_tcp, TC_ACT_SHOT, Reason::DropMalformedL4),
        ("TCP data offset 4", tcp_doff_4, TC_ACT_SHOT, Reason::DropMalformedL4),
        ("UDP header cut at 4 bytes", udp_trunc, TC_ACT_SHOT, Reason::DropMalformedL4),
        ("first fragment to a VIP", first_fragment.build(), TC_ACT_SHOT, Reason::DropFragment),
        ("later fragment to a VIP", later_fragment.build(), TC_ACT_SHOT, Reason::DropFragment),
        ("fragment to a pod", fragment_elsewhere.build(), TC_ACT_OK, Reason::PassFragment),
        ("ICMP to a VIP", icmp_to_vip, TC_ACT_SHOT, Reason::DropUnsupportedProto),
        ("ICMP to a pod", icmp_elsewhere, TC_ACT_OK, Reason::PassNotService),
        ("ARP", arp, TC_ACT_OK, Reason::PassNotIpv4),
        ("IPv6", ipv6, TC_ACT_OK, Reason::PassNotIpv4),
    ];
    for (name, frame, action, reason) in table {
        let (out, moved) = run_counted(&dp, names::PROG_FROM_POD, &frame);
        assert_eq!(out.action, action, "{name}: action");
        assert_eq!(
            moved,
            [((Hook::FromPod, reason), 1)],
            "{name}: counted under {}",
            reason.name()
        );
        assert_eq!(out.frame, frame, "{name}: the packet was modified");
    }
    assert_eq!(count(&dp, Hook::FromPod, Reason::NatNew), 0, "a malformed packet created a flow");
}

/// `COUNTERS` has a slot per (hook, reason): the same drop at `to_pod` and at `from_pod`
/// is two counts, each under the program that dropped the packet.
#[test]
fn a_drop_is_counted_under_the_hook_that_dropped_it() {
    let dp = fixture();
    let mut truncated = Frame::tcp((BACKENDS[0], TCP_TARGET), CLIENT, TCP_ACK).build();
    truncated.truncate(14 + 20 + 10);
    let malformed = (Hook::ToPod, Reason::DropMalformedL4);

    let (out, moved) = run_counted(&dp, names::PROG_TO_POD, &truncated);
    assert_eq!(out.action, TC_ACT_SHOT, "to_pod drops a truncated TCP header");
    assert_eq!(moved, [(malformed, 1)], "counted once, under to_pod only");
    assert_eq!(count(&dp, Hook::FromPod, Reason::DropMalformedL4), 0);

    let (out, moved) = run_counted(&dp, names::PROG_FROM_POD, &truncated);
    assert_eq!(out.action, TC_ACT_SHOT, "from_pod drops it too");
    assert_eq!(moved, [((Hook::FromPod, Reason::DropMalformedL4), 1)]);
    assert_eq!(count(&dp, malformed.0, malformed.1), 1, "to_pod's count is its own");
}

#[test]
fn an_expired_conntrack_entry_is_not_followed() {
    let mut dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    run_once(&dp, &syn);
    let key = ct_key(CLIENT, (VIP, TCP_PORT), CT_DIR_ORIGINAL);
    let mut entry = dp.maps().ct.get(&key, 0).expect("ORIGINAL entry");
    assert!(entry.expires_ns > 1, "a fresh entry has a deadline in the future");
    // Age it out: a deadline in the past (bpf_ktime_get_ns is far beyond 1 ns after boot).
    entry.expires_ns = 1;
    dp.maps().ct.insert(key, entry, 0).expect("rewriting the entry");

    let ack = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_ACK).build();
    expect(&mut dp, &ack, TC_ACT_OK, Reason::NatNew);
    let renewed = dp.maps().ct.get(&key, 0).expect("ORIGINAL entry recreated");
    assert!(renewed.expires_ns > 1, "the flow got a new deadline");
}

/// The same client port reaching a backend through the Service, then straight to its
/// address once that flow is closing: the direct connection's SYN supersedes the service
/// flow's REPLY entry, so its replies are not turned into the VIP's (they would reach a
/// socket that never sent to the VIP and be reset). While the service flow is open (and
/// for anything but a SYN) the entry stays: a SYN XDP already DNATed looks the same.
#[test]
fn a_direct_syn_on_a_closing_service_flows_tuple_supersedes_its_reverse_nat() {
    let dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN).build();
    let backend = View::parse_checked(&run_once(&dp, &syn).frame).dst;
    let reply = Frame::tcp(backend, CLIENT, TCP_SYN | TCP_ACK).build();
    let via_vip = |dp: &Datapath| {
        let (out, _) = run_counted(dp, names::PROG_TO_POD, &reply);
        View::parse_checked(&out.frame).src == (VIP, TCP_PORT)
    };
    let direct = Frame::tcp(CLIENT, backend, TCP_SYN).build();

    // Open: a stray ACK and even a SYN on the tuple leave the flow's reverse NAT alone.
    let stray = Frame::tcp(CLIENT, backend, TCP_ACK).build();
    assert_eq!(run_once(&dp, &stray).action, TC_ACT_OK);
    assert_eq!(run_once(&dp, &direct).action, TC_ACT_OK);
    assert!(via_vip(&dp), "an open service flow keeps its reverse NAT");

    // The client closes the service flow; then the direct SYN supersedes it.
    let fin = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_FIN | TCP_ACK).build();
    assert_eq!(run_once(&dp, &fin).action, TC_ACT_OK);
    let (out, moved) = run_counted(&dp, names::PROG_FROM_POD, &direct);
    assert_eq!((out.action, &out.frame), (TC_ACT_OK, &direct), "the direct SYN passes as it is");
    assert_eq!(moved, [((Hook::FromPod, Reason::PassNotService), 1)]);
    let (out, moved) = run_counted(&dp, names::PROG_TO_POD, &reply);
    assert_eq!((out.action, out.frame), (TC_ACT_OK, reply), "the direct reply is left alone");
    assert_eq!(moved, [((Hook::ToPod, Reason::PassNotService), 1)]);
}
