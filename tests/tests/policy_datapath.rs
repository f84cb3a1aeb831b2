//! BPF_PROG_TEST_RUN tests of NetworkPolicy enforcement: the real `from_pod` (egress) and
//! `to_pod` (ingress) programs on crafted frames, with the policy maps written through the
//! agent's own `PolicyWriter`. Each test asserts the tc action, the (hook, reason) counter, and the
//! side effects (policy conntrack, `POLICY_COUNTERS`, `FLOW_EVENTS`). Needs root (run with
//! `cargo xtask test`).
use std::net::Ipv4Addr;

use aya::maps::{MapData, RingBuf};
use nodeplane_agent::{
    datapath::Datapath,
    model::Ipv4Cidr,
    policy::{PolicyOp, PolicyWriter},
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    csum,
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CtKeyV4, IPPROTO_TCP, IPPROTO_UDP, SVC_F_VIP_MARKER,
        ServiceKeyV4, ServiceValue, SlotKey, names,
    },
    policy::{
        DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ANY, EP_F_EGRESS_LPM, EP_F_INGRESS_ANY,
        EP_F_INGRESS_LPM, EndpointV4, FlowEvent, IDENTITY_ANY, IDENTITY_UNSELECTED, IPPROTO_ICMP,
        IPPROTO_SCTP, PCT_F_EGRESS, PCT_F_HOST, PCT_F_INGRESS, POLICY_CFG_F_EVENTS,
        POLICY_CFG_F_LOG_ALLOWED, PolicyConfig, PolicyCounterKey, PolicyCtKey, PolicyKey,
        PolicyValue, SET_NONE, VERDICT_ALLOW, VERDICT_DENY,
    },
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    packet::{ETH_HLEN, Frame, TCP_ACK, TCP_SYN, View},
    run::{TC_ACT_OK, TC_ACT_SHOT, run_once_from},
};

/// Local pod "client".
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Local pod "server".
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
/// A pod on another node.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
/// An address in no ipcache entry but 0.0.0.0/0.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The only backend of VIP:80, on another node.
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 9);

const ID_A: u32 = 300;
const ID_B: u32 = 301;
const ID_PEER: u32 = 302;
const ID_WORLD: u32 = 303;
const ID_BACKEND: u32 = 304;

const SET_B_IN: u32 = 1000;
const SET_B_OUT: u32 = 1001;
const SET_A_IN: u32 = 1002;
const SET_A_OUT: u32 = 1003;

/// Rule ids the entries name.
const RULE_1: u32 = 11;
const RULE_2: u32 = 12;

/// The ifindex a forwarded packet arrived on (any non-zero value: the test skb is built on
/// loopback, only the `__sk_buff` field matters).
const FORWARDED: u32 = 7;

fn policy(dp: &mut Datapath, op: PolicyOp) {
    dp.maps().apply_policy(&op).unwrap_or_else(|e| panic!("writing policy fixture: {e}"));
}

fn service_op(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing service fixture: {e}"));
}

fn cidr(addr: Ipv4Addr, len: u8) -> Ipv4Cidr {
    Ipv4Cidr::new(addr, len).unwrap_or_else(|| panic!("bad fixture cidr {addr}/{len}"))
}

/// An endpoint whose sets may have `IDENTITY_ANY` and shorter-prefix entries (every
/// `EP_F_*` lookup flag set).
fn endpoint(dp: &mut Datapath, addr: Ipv4Addr, ingress_set: u32, egress_set: u32, identity: u32) {
    let flags = EP_F_INGRESS_ANY | EP_F_EGRESS_ANY | EP_F_INGRESS_LPM | EP_F_EGRESS_LPM;
    let value = EndpointV4 { ingress_set, egress_set, identity, flags };
    policy(dp, PolicyOp::PutEndpoint { addr, value });
}

/// A `POLICY_V4` entry on the first `prefix_len` bits of `(set, identity, proto, port)`.
fn allow(
    dp: &mut Datapath,
    set: u32,
    identity: u32,
    proto: u8,
    port: u16,
    prefix_len: u32,
    rule: u32,
) {
    let key = PolicyKey::new(set, identity, proto, port);
    policy(dp, PolicyOp::PutRule { key, prefix_len, value: PolicyValue { rule, _reserved: 0 } });
}

fn config(dp: &mut Datapath, revision: u32, flags: u32) {
    policy(dp, PolicyOp::SetConfig(PolicyConfig { revision, flags }));
}

/// A datapath with the ipcache of the fixture pods and 0.0.0.0/0, revision 1, and no
/// endpoint: every test says which pods are isolated.
fn fixture() -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    for (addr, identity) in [(A, ID_A), (B, ID_B), (PEER, ID_PEER), (BACKEND, ID_BACKEND)] {
        policy(&mut dp, PolicyOp::PutIpcache { cidr: cidr(addr, 32), identity });
    }
    policy(
        &mut dp,
        PolicyOp::PutIpcache { cidr: cidr(Ipv4Addr::UNSPECIFIED, 0), identity: ID_WORLD },
    );
    config(&mut dp, 1, POLICY_CFG_F_EVENTS);
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

/// The hook `program` counts under.
fn hook_of(program: &str) -> Hook {
    match program {
        names::PROG_FROM_POD => Hook::FromPod,
        names::PROG_TO_POD => Hook::ToPod,
        _ => panic!("no program {program}"),
    }
}

/// Runs `frame` through `program` as a forwarded packet; asserts the action and that
/// exactly `reason` was counted for it, once, under `program`'s hook and no other.
/// Returns the frame as it left.
fn expect(dp: &mut Datapath, program: &str, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
    expect_from(dp, program, frame, FORWARDED, action, reason)
}

fn expect_from(
    dp: &mut Datapath,
    program: &str,
    frame: &[u8],
    ingress_ifindex: u32,
    action: u32,
    reason: Reason,
) -> Vec<u8> {
    let before = counters(dp);
    let out = run_once_from(dp, program, frame, ingress_ifindex);
    let moved: Vec<_> = counters(dp)
        .into_iter()
        .zip(before)
        .map(|((k, now), (_, was))| (k, now - was))
        .filter(|(_, d)| *d > 0)
        .collect();
    assert_eq!(
        (out.action, moved),
        (action, vec![((hook_of(program), reason), 1)]),
        "{program}: tc action and counter {} for {frame:02x?}",
        reason.name()
    );
    out.frame
}

fn to_pod(dp: &mut Datapath, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
    expect(dp, names::PROG_TO_POD, frame, action, reason)
}

fn from_pod(dp: &mut Datapath, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
    expect(dp, names::PROG_FROM_POD, frame, action, reason)
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    Frame::tcp(src, dst, TCP_SYN).build()
}

/// `POLICY_COUNTERS[id, verdict, dir]` summed over CPUs (0 if absent).
fn verdicts(dp: &mut Datapath, id: u32, verdict: u8, dir: u8) -> u64 {
    let c = dp.maps().policy_counters().unwrap_or_else(|e| panic!("reading policy counters: {e}"));
    let key = PolicyCounterKey { id, verdict, dir, _pad: [0; 2] };
    c.verdicts.get(&key).map(|c| c.packets).unwrap_or(0)
}

fn pct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> PolicyCtKey {
    PolicyCtKey {
        saddr: src.0.octets(),
        daddr: dst.0.octets(),
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

/// The flags of the policy conntrack entry of `src -> dst` (TCP), if any.
fn pct_flags(dp: &mut Datapath, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Option<u8> {
    dp.maps().policy_ct.get(&pct_key(src, dst, IPPROTO_TCP), 0).ok().map(|v| v.flags)
}

/// Every `FlowEvent` waiting in the ring buffer.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<FlowEvent>(), "flow event record size");
        // SAFETY: the record is a FlowEvent written by the datapath (size checked above);
        // read_unaligned makes no assumption about the ring's alignment.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
    }
    events
}

/// `frame` with its IPv4 identification set to `id` (header checksum recomputed).
fn with_ip_id(mut frame: Vec<u8>, id: u16) -> Vec<u8> {
    let ip = ETH_HLEN;
    frame[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
    frame[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    let c = csum::ipv4_header(&frame[ip..ip + ihl]);
    frame[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    frame
}

/// A UDP datagram's first fragment (MF, offset 0) and a later one (offset 8 bytes), both
/// with IPv4 identification `id`.
fn fragments(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), id: u16) -> (Vec<u8>, Vec<u8>) {
    let mut first = Frame::udp(src, dst);
    first.frag_off = 0x2000;
    let mut later = Frame::other(src.0, dst.0, IPPROTO_UDP);
    later.frag_off = 0x0001;
    (with_ip_id(first.build(), id), with_ip_id(later.build(), id))
}

/// An SCTP packet: the 12-byte common header (ports, verification tag, checksum) and a
/// chunk-less body. BPF_PROG_TEST_RUN needs no valid CRC32c.
fn sctp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut f = Frame::other(src.0, dst.0, IPPROTO_SCTP);
    let mut header = Vec::new();
    header.extend_from_slice(&src.1.to_be_bytes());
    header.extend_from_slice(&dst.1.to_be_bytes());
    header.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
    f.payload = header;
    f.build()
}

#[test]
fn ingress_allows_the_allowed_identity_and_exact_port_and_denies_the_rest() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);

    let ok = tcp((A, 40000), (B, 8080));
    let out = to_pod(&mut dp, &ok, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(out, ok, "an allowed packet must not be modified");
    assert_eq!(pct_flags(&mut dp, (A, 40000), (B, 8080)), Some(PCT_F_INGRESS));

    to_pod(&mut dp, &tcp((A, 40001), (B, 8081)), TC_ACT_SHOT, Reason::DropPolicy);
    to_pod(&mut dp, &tcp((PEER, 40000), (B, 8080)), TC_ACT_SHOT, Reason::DropPolicy);
    to_pod(&mut dp, &Frame::udp((A, 40000), (B, 8080)).build(), TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!(pct_flags(&mut dp, (PEER, 40000), (B, 8080)), None, "a denied flow left an entry");

    assert_eq!(verdicts(&mut dp, RULE_1, VERDICT_ALLOW, DIR_INGRESS), 1);
    assert_eq!(verdicts(&mut dp, SET_B_IN, VERDICT_DENY, DIR_INGRESS), 3);
    // The established flow is allowed from conntrack: no new verdict is counted.
    let ack = Frame::tcp((A, 40000), (B, 8080), TCP_ACK).build();
    to_pod(&mut dp, &ack, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(verdicts(&mut dp, RULE_1, VERDICT_ALLOW, DIR_INGRESS), 1);
}

/// A flow both pods' policies judge: an ingress deny is dropped by `to_pod` and counted
/// under `to_pod` (what `nodeplane_datapath_packets_total{hook="to_pod"}` exports), an
/// egress deny under `from_pod`; the other hook counts the same flow as a pass.
#[test]
fn a_policy_drop_is_counted_under_the_hook_that_dropped_it() {
    let mut dp = fixture();
    // B admits nothing; A may send to B:8080 (TCP) only.
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    endpoint(&mut dp, A, SET_NONE, SET_A_OUT, ID_A);
    allow(&mut dp, SET_A_OUT, ID_B, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);
    let (from, to) = (Hook::FromPod, Hook::ToPod);

    let ingress_denied = tcp((A, 40000), (B, 8080));
    from_pod(&mut dp, &ingress_denied, TC_ACT_OK, Reason::PassNotService);
    to_pod(&mut dp, &ingress_denied, TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!((count(&dp, from, Reason::DropPolicy), count(&dp, to, Reason::DropPolicy)), (0, 1));

    let egress_denied = tcp((A, 40001), (B, 9090));
    from_pod(&mut dp, &egress_denied, TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!((count(&dp, from, Reason::DropPolicy), count(&dp, to, Reason::DropPolicy)), (1, 1));
}

#[test]
fn a_port_range_block_matches_its_prefix_only() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    // 8000..=8063 is one aligned block of 64 ports: 16 - 6 = 10 port bits after the 72.
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8000, PolicyKey::PREFIX_ANY_PORT + 10, RULE_1);
    for port in [8000, 8031, 8063] {
        to_pod(&mut dp, &tcp((A, 40000), (B, port)), TC_ACT_OK, Reason::PassNotService);
    }
    for port in [7999, 8064, 80] {
        to_pod(&mut dp, &tcp((A, 40000), (B, port)), TC_ACT_SHOT, Reason::DropPolicy);
    }
    assert_eq!(verdicts(&mut dp, RULE_1, VERDICT_ALLOW, DIR_INGRESS), 3);
}

#[test]
fn an_any_port_entry_covers_one_protocol_and_an_any_protocol_entry_covers_all() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_UDP, 0, PolicyKey::PREFIX_ANY_PORT, RULE_1);
    allow(&mut dp, SET_B_IN, ID_PEER, 0, 0, PolicyKey::PREFIX_ANY_PROTO, RULE_2);

    for port in [53, 5353, 65535] {
        let f = Frame::udp((A, 40000), (B, port)).build();
        to_pod(&mut dp, &f, TC_ACT_OK, Reason::PassNotService);
    }
    to_pod(&mut dp, &tcp((A, 40000), (B, 53)), TC_ACT_SHOT, Reason::DropPolicy);
    to_pod(&mut dp, &Frame::other(A, B, IPPROTO_ICMP).build(), TC_ACT_SHOT, Reason::DropPolicy);

    to_pod(&mut dp, &tcp((PEER, 40000), (B, 22)), TC_ACT_OK, Reason::PassNotService);
    to_pod(&mut dp, &Frame::udp((PEER, 40000), (B, 9)).build(), TC_ACT_OK, Reason::PassNotService);
    let icmp = Frame::other(PEER, B, IPPROTO_ICMP).build();
    to_pod(&mut dp, &icmp, TC_ACT_OK, Reason::PassNotService);
    let sctp = sctp((PEER, 5000), (B, 3868));
    to_pod(&mut dp, &sctp, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(verdicts(&mut dp, RULE_1, VERDICT_ALLOW, DIR_INGRESS), 3);
    assert_eq!(verdicts(&mut dp, RULE_2, VERDICT_ALLOW, DIR_INGRESS), 4);
}

#[test]
fn identity_any_allows_every_peer_even_outside_the_ipcache() {
    let mut dp = fixture();
    // Without 0.0.0.0/0, OUTSIDE has no ipcache entry: IDENTITY_UNSELECTED.
    policy(&mut dp, PolicyOp::DelIpcache { cidr: cidr(Ipv4Addr::UNSPECIFIED, 0) });
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, IDENTITY_ANY, IPPROTO_TCP, 80, PolicyKey::PREFIX_FULL, RULE_1);
    for peer in [A, PEER, OUTSIDE] {
        to_pod(&mut dp, &tcp((peer, 40000), (B, 80)), TC_ACT_OK, Reason::PassNotService);
        to_pod(&mut dp, &tcp((peer, 40000), (B, 81)), TC_ACT_SHOT, Reason::DropPolicy);
    }
    let mut ring = dp.maps().take_flow_events().expect("flow events ring");
    let events = drain(&mut ring);
    let outside = events.iter().find(|e| e.saddr == OUTSIDE.octets()).expect("event of OUTSIDE");
    assert_eq!(outside.peer_identity, IDENTITY_UNSELECTED);

    // The agent clears EP_F_INGRESS_ANY for sets without ANY entries; the datapath then
    // skips that lookup, so an ANY entry written anyway is not consulted.
    let value =
        EndpointV4 { ingress_set: SET_B_IN, egress_set: SET_NONE, identity: ID_B, flags: 0 };
    policy(&mut dp, PolicyOp::PutEndpoint { addr: B, value });
    to_pod(&mut dp, &tcp((PEER, 40001), (B, 80)), TC_ACT_SHOT, Reason::DropPolicy);
}

#[test]
fn a_pod_not_isolated_or_unknown_passes_everything() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_NONE, SET_NONE, ID_B);
    for frame in [
        tcp((PEER, 40000), (B, 8080)),
        Frame::udp((OUTSIDE, 1), (B, 2)).build(),
        Frame::other(PEER, B, IPPROTO_ICMP).build(),
    ] {
        to_pod(&mut dp, &frame, TC_ACT_OK, Reason::PassNotService);
        from_pod(&mut dp, &frame, TC_ACT_OK, Reason::PassNotService);
    }
    // The entry is still made, so replies are known if a policy appears later.
    assert_eq!(pct_flags(&mut dp, (PEER, 40000), (B, 8080)), Some(PCT_F_INGRESS));
    // A pod with no ENDPOINTS_V4 entry: no policy and nothing recorded.
    to_pod(&mut dp, &tcp((PEER, 40000), (A, 8080)), TC_ACT_OK, Reason::PassNotService);
    assert_eq!(pct_flags(&mut dp, (PEER, 40000), (A, 8080)), None);
    let c = dp.maps().policy_counters().expect("policy counters");
    assert!(c.verdicts.is_empty(), "not isolated: no verdict counted: {:?}", c.verdicts);
    assert_eq!(c.events_written, 0);
}

#[test]
fn egress_is_denied_in_from_pod_and_the_packet_is_untouched() {
    let mut dp = fixture();
    endpoint(&mut dp, A, SET_NONE, SET_A_OUT, ID_A);
    allow(&mut dp, SET_A_OUT, ID_B, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);

    let ok = tcp((A, 40000), (B, 8080));
    assert_eq!(from_pod(&mut dp, &ok, TC_ACT_OK, Reason::PassNotService), ok);
    assert_eq!(pct_flags(&mut dp, (A, 40000), (B, 8080)), Some(PCT_F_EGRESS));
    from_pod(&mut dp, &tcp((A, 40000), (PEER, 8080)), TC_ACT_SHOT, Reason::DropPolicy);
    from_pod(&mut dp, &tcp((A, 40000), (OUTSIDE, 443)), TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!(verdicts(&mut dp, RULE_1, VERDICT_ALLOW, DIR_EGRESS), 1);
    assert_eq!(verdicts(&mut dp, SET_A_OUT, VERDICT_DENY, DIR_EGRESS), 2);
    // Egress policy is not ingress policy: A is not isolated for ingress.
    to_pod(&mut dp, &tcp((PEER, 40000), (A, 8080)), TC_ACT_OK, Reason::PassNotService);
}

/// A ClusterIP VIP:80 with one backend BACKEND:8080.
fn with_service(dp: &mut Datapath) {
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    service_op(dp, Op::PutService { key: ServiceKeyV4::vip_marker(VIP.octets()), value: marker });
    let backend = BackendV4::new(BACKEND.octets(), 8080, IPPROTO_TCP);
    service_op(dp, Op::PutBackend { id: 1, backend });
    service_op(dp, Op::PutSlot { key: SlotKey { service_id: 1, slot: 0 }, backend_id: 1 });
    let value = ServiceValue { service_id: 1, backend_count: 1, ..Default::default() };
    service_op(dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), 80, IPPROTO_TCP), value });
}

#[test]
fn egress_to_a_service_is_judged_on_the_backend_and_target_port() {
    let mut dp = fixture();
    with_service(&mut dp);
    let mut ring = dp.maps().take_flow_events().expect("flow events ring");
    endpoint(&mut dp, A, SET_NONE, SET_A_OUT, ID_A);
    // Allowed: the backend's identity on the target port 8080 (not the VIP's port 80).
    allow(&mut dp, SET_A_OUT, ID_BACKEND, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);

    let syn = tcp((A, 40000), (VIP, 80));
    let out = View::parse_checked(&from_pod(&mut dp, &syn, TC_ACT_OK, Reason::NatNew));
    assert_eq!(out.dst, (BACKEND, 8080));
    assert_eq!(pct_flags(&mut dp, (A, 40000), (BACKEND, 8080)), Some(PCT_F_EGRESS));
    assert_eq!(pct_flags(&mut dp, (A, 40000), (VIP, 80)), None, "keyed by the VIP");
    let ack = Frame::tcp((A, 40000), (VIP, 80), TCP_ACK).build();
    from_pod(&mut dp, &ack, TC_ACT_OK, Reason::NatEstablished);

    // A policy that allows the VIP's port but not the target port denies the flow, and the
    // service conntrack records nothing for it.
    policy(
        &mut dp,
        PolicyOp::DelRule {
            key: PolicyKey::new(SET_A_OUT, ID_BACKEND, IPPROTO_TCP, 8080),
            prefix_len: PolicyKey::PREFIX_FULL,
        },
    );
    allow(&mut dp, SET_A_OUT, ID_BACKEND, IPPROTO_TCP, 80, PolicyKey::PREFIX_FULL, RULE_2);
    config(&mut dp, 2, POLICY_CFG_F_EVENTS);
    let syn = tcp((A, 40001), (VIP, 80));
    let out = from_pod(&mut dp, &syn, TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!(out, syn, "a denied packet was rewritten");
    let ct_key = CtKeyV4 {
        saddr: A.octets(),
        daddr: VIP.octets(),
        sport: 40001u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    assert!(dp.maps().ct.get(&ct_key, 0).is_err(), "a denied flow was recorded in conntrack");
    // The established flow is verified again at the new revision and dropped too.
    from_pod(&mut dp, &ack, TC_ACT_SHOT, Reason::DropPolicy);

    let events = drain(&mut ring);
    assert_eq!(events.len(), 2, "one event per denied packet: {events:?}");
    let e = events[0];
    assert_eq!((e.saddr, e.daddr), (A.octets(), BACKEND.octets()));
    assert_eq!((e.sport, e.dport), (40001u16.to_be_bytes(), 8080u16.to_be_bytes()));
    assert_eq!((e.orig_daddr, e.orig_dport), (VIP.octets(), 80u16.to_be_bytes()));
    assert_eq!((e.dir, e.verdict, e.reason), (DIR_EGRESS, VERDICT_DENY, Reason::DropPolicy as u8));
    assert_eq!((e.set, e.rule, e.peer_identity), (SET_A_OUT, 0, ID_BACKEND));
}

#[test]
fn a_reply_of_an_allowed_flow_passes_the_other_directions_isolation() {
    let mut dp = fixture();
    // A may receive nothing, B may send nothing; A -> B:8080 is allowed by B's ingress.
    endpoint(&mut dp, A, SET_A_IN, SET_NONE, ID_A);
    endpoint(&mut dp, B, SET_B_IN, SET_B_OUT, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);

    let syn = tcp((A, 40000), (B, 8080));
    from_pod(&mut dp, &syn, TC_ACT_OK, Reason::PassNotService);
    to_pod(&mut dp, &syn, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(pct_flags(&mut dp, (A, 40000), (B, 8080)), Some(PCT_F_EGRESS | PCT_F_INGRESS));

    let reply = Frame::tcp((B, 8080), (A, 40000), TCP_SYN | TCP_ACK).build();
    from_pod(&mut dp, &reply, TC_ACT_OK, Reason::PassNotService);
    to_pod(&mut dp, &reply, TC_ACT_OK, Reason::PassNotService);
    // The same packets in the other direction as new flows are denied both ways.
    let new = tcp((B, 8080), (A, 40001));
    from_pod(&mut dp, &new, TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!(verdicts(&mut dp, SET_B_OUT, VERDICT_DENY, DIR_EGRESS), 1);
}

#[test]
fn a_reply_from_a_service_backend_passes_the_clients_ingress_isolation() {
    let mut dp = fixture();
    with_service(&mut dp);
    // The client accepts no connection at all; its egress is open.
    endpoint(&mut dp, A, SET_A_IN, SET_NONE, ID_A);
    let syn = tcp((A, 40000), (VIP, 80));
    from_pod(&mut dp, &syn, TC_ACT_OK, Reason::NatNew);

    // A remote backend's reply reaches to_pod untranslated: judged, then reverse NATed.
    let reply = Frame::tcp((BACKEND, 8080), (A, 40000), TCP_SYN | TCP_ACK).build();
    let out = View::parse_checked(&to_pod(&mut dp, &reply, TC_ACT_OK, Reason::RevNat));
    assert_eq!(out.src, (VIP, 80));
    // A local backend's reply was already reverse NATed by from_pod: to_pod sees the VIP
    // and finds the flow through the service conntrack.
    let translated = Frame::tcp((VIP, 80), (A, 40000), TCP_ACK).build();
    to_pod(&mut dp, &translated, TC_ACT_OK, Reason::PassNotService);
    // The VIP on another client port is no reply of anything.
    let spoof = Frame::tcp((VIP, 80), (A, 40001), TCP_ACK).build();
    to_pod(&mut dp, &spoof, TC_ACT_SHOT, Reason::DropPolicy);
}

#[test]
fn a_spoofed_reply_without_a_conntrack_entry_is_denied() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_B_IN, SET_B_OUT, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);
    allow(&mut dp, SET_B_OUT, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_2);
    // Looks like B's reply to PEER's connection to PEER:8080: there was none.
    let fake = Frame::tcp((PEER, 8080), (B, 40000), TCP_SYN | TCP_ACK).build();
    to_pod(&mut dp, &fake, TC_ACT_SHOT, Reason::DropPolicy);
    // Looks like B's reply to a connection from PEER: there was none either.
    let fake = Frame::tcp((B, 8080), (PEER, 40000), TCP_SYN | TCP_ACK).build();
    from_pod(&mut dp, &fake, TC_ACT_SHOT, Reason::DropPolicy);
    // The real thing works: A -> B:8080 allowed, B's reply goes out.
    to_pod(&mut dp, &tcp((A, 40000), (B, 8080)), TC_ACT_OK, Reason::PassNotService);
    let reply = Frame::tcp((B, 8080), (A, 40000), TCP_SYN | TCP_ACK).build();
    from_pod(&mut dp, &reply, TC_ACT_OK, Reason::PassNotService);
}

#[test]
fn a_revision_bump_reverifies_established_flows_and_drops_those_now_denied() {
    let mut dp = fixture();
    let mut ring = dp.maps().take_flow_events().expect("flow events ring");
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);
    let (a, b) = ((A, 40000), (B, 8080));
    let ack = Frame::tcp(a, b, TCP_ACK).build();
    to_pod(&mut dp, &tcp(a, b), TC_ACT_OK, Reason::PassNotService);
    to_pod(&mut dp, &ack, TC_ACT_OK, Reason::PassNotService);

    // A bump with the policy unchanged: verified again, allowed, re-stamped.
    config(&mut dp, 2, POLICY_CFG_F_EVENTS);
    to_pod(&mut dp, &ack, TC_ACT_OK, Reason::PassNotService);
    let entry = dp.maps().policy_ct.get(&pct_key(a, b, IPPROTO_TCP), 0).expect("entry");
    assert_eq!((entry.revision, entry.flags), (2, PCT_F_INGRESS));

    // The rule removed: the policy map changes alone do not touch the flow...
    policy(
        &mut dp,
        PolicyOp::DelRule {
            key: PolicyKey::new(SET_B_IN, ID_A, IPPROTO_TCP, 8080),
            prefix_len: PolicyKey::PREFIX_FULL,
        },
    );
    to_pod(&mut dp, &ack, TC_ACT_OK, Reason::PassNotService);
    // ...the revision bump that follows every change does, on the next packet.
    config(&mut dp, 3, POLICY_CFG_F_EVENTS);
    // B's reply is verified against B's ingress (the check its flow passed) and dropped.
    let reply = Frame::tcp(b, a, TCP_ACK).build();
    from_pod(&mut dp, &reply, TC_ACT_SHOT, Reason::DropPolicy);
    let entry = dp.maps().policy_ct.get(&pct_key(a, b, IPPROTO_TCP), 0).expect("entry");
    assert_eq!(entry.flags & PCT_F_INGRESS, 0, "the denied check's bit must be cleared");
    // A's next packet is then a new flow into B: denied too.
    to_pod(&mut dp, &ack, TC_ACT_SHOT, Reason::DropPolicy);
    to_pod(&mut dp, &ack, TC_ACT_SHOT, Reason::DropPolicy);

    let events = drain(&mut ring);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|e| e.verdict == VERDICT_DENY && e.dir == DIR_INGRESS));
    // Every event shows the flow the failed check was about, A -> B, also for the reply.
    assert!(events.iter().all(|e| (e.saddr, e.daddr) == (A.octets(), B.octets())), "{events:?}");
    assert!(events.iter().all(|e| e.dport == 8080u16.to_be_bytes()), "{events:?}");
    assert_eq!(events[0].peer_identity, ID_A);
}

#[test]
fn host_originated_packets_are_always_allowed_into_a_pod() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    // Nothing allowed in at all.
    let probe = tcp((Ipv4Addr::new(10, 0, 0, 1), 50000), (B, 8080));
    expect_from(&mut dp, names::PROG_TO_POD, &probe, 0, TC_ACT_OK, Reason::PassNotService);
    let (_, later) = fragments((Ipv4Addr::new(10, 0, 0, 1), 50000), (B, 53), 0x4242);
    expect_from(&mut dp, names::PROG_TO_POD, &later, 0, TC_ACT_OK, Reason::PassFragment);
    // The same packet forwarded from an interface is judged (another source port: the
    // node's own flow is recorded and would vouch for its 5-tuple).
    let forwarded = tcp((Ipv4Addr::new(10, 0, 0, 1), 50003), (B, 8080));
    expect_from(&mut dp, names::PROG_TO_POD, &forwarded, 3, TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!(verdicts(&mut dp, SET_B_IN, VERDICT_DENY, DIR_INGRESS), 1);

    // Isolated for egress too (nothing allowed out): the pod's replies to the node pass as
    // replies, also after a policy change, because the node's packet was recorded.
    endpoint(&mut dp, B, SET_B_IN, SET_B_OUT, ID_B);
    let node = (Ipv4Addr::new(10, 0, 0, 1), 50001);
    expect_from(
        &mut dp,
        names::PROG_TO_POD,
        &tcp(node, (B, 8080)),
        0,
        TC_ACT_OK,
        Reason::PassNotService,
    );
    let reply = Frame::tcp((B, 8080), node, TCP_ACK).build();
    from_pod(&mut dp, &reply, TC_ACT_OK, Reason::PassNotService);
    config(&mut dp, 7, POLICY_CFG_F_EVENTS);
    from_pod(&mut dp, &reply, TC_ACT_OK, Reason::PassNotService);
    let flags = dp.maps().policy_ct.get(&pct_key(node, (B, 8080), IPPROTO_TCP), 0);
    assert_eq!(flags.expect("the node's flow").flags, PCT_F_INGRESS | PCT_F_HOST);
    // The same packet without the node's first: a new egress flow, denied.
    let unsolicited = Frame::tcp((B, 8080), (node.0, 50002), TCP_ACK).build();
    from_pod(&mut dp, &unsolicited, TC_ACT_SHOT, Reason::DropPolicy);
}

#[test]
fn later_fragments_follow_an_allowed_first_fragment_in_the_same_direction_only() {
    let mut dp = fixture();
    endpoint(&mut dp, A, SET_NONE, SET_A_OUT, ID_A);
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_A_OUT, ID_B, IPPROTO_UDP, 5353, PolicyKey::PREFIX_FULL, RULE_1);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_UDP, 5353, PolicyKey::PREFIX_FULL, RULE_2);
    let (a, b) = ((A, 40000), (B, 5353));

    // Both hooks see the first fragment, then the later one.
    let (first, later) = fragments(a, b, 0x1111);
    from_pod(&mut dp, &first, TC_ACT_OK, Reason::PassFragment);
    to_pod(&mut dp, &first, TC_ACT_OK, Reason::PassFragment);
    from_pod(&mut dp, &later, TC_ACT_OK, Reason::PassFragment);
    to_pod(&mut dp, &later, TC_ACT_OK, Reason::PassFragment);

    // A later fragment whose first fragment nobody saw.
    let (_, orphan) = fragments(a, b, 0x2222);
    from_pod(&mut dp, &orphan, TC_ACT_SHOT, Reason::DropPolicyFragment);
    to_pod(&mut dp, &orphan, TC_ACT_SHOT, Reason::DropPolicyFragment);

    // The first fragment passed egress only: its entry does not let the rest in.
    let (first, later) = fragments(a, b, 0x3333);
    from_pod(&mut dp, &first, TC_ACT_OK, Reason::PassFragment);
    from_pod(&mut dp, &later, TC_ACT_OK, Reason::PassFragment);
    to_pod(&mut dp, &later, TC_ACT_SHOT, Reason::DropPolicyFragment);

    // A first fragment policy denies records nothing.
    let (first, later) = fragments(a, (B, 5354), 0x4444);
    to_pod(&mut dp, &first, TC_ACT_SHOT, Reason::DropPolicy);
    to_pod(&mut dp, &later, TC_ACT_SHOT, Reason::DropPolicyFragment);

    // A pod not isolated for ingress takes any later fragment.
    let (_, later) = fragments((B, 5353), a, 0x5555);
    to_pod(&mut dp, &later, TC_ACT_OK, Reason::PassFragment);
}

#[test]
fn icmp_into_an_isolated_pod_needs_a_rule_without_ports() {
    let mut dp = fixture();
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);
    // A TCP any-port entry does not cover ICMP either.
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 0, PolicyKey::PREFIX_ANY_PORT, RULE_1);
    let icmp = Frame::other(A, B, IPPROTO_ICMP).build();
    to_pod(&mut dp, &icmp, TC_ACT_SHOT, Reason::DropPolicy);
    allow(&mut dp, SET_B_IN, ID_A, 0, 0, PolicyKey::PREFIX_ANY_PROTO, RULE_2);
    assert_eq!(to_pod(&mut dp, &icmp, TC_ACT_OK, Reason::PassNotService), icmp);
    assert_eq!(verdicts(&mut dp, RULE_2, VERDICT_ALLOW, DIR_INGRESS), 1);
    // From another peer, ICMP is still denied.
    let other = Frame::other(PEER, B, IPPROTO_ICMP).build();
    to_pod(&mut dp, &other, TC_ACT_SHOT, Reason::DropPolicy);
}

#[test]
fn sctp_is_matched_on_its_ports_and_never_sent_to_a_service() {
    let mut dp = fixture();
    with_service(&mut dp);
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_SCTP, 3868, PolicyKey::PREFIX_FULL, RULE_1);
    let ok = sctp((A, 5000), (B, 3868));
    assert_eq!(to_pod(&mut dp, &ok, TC_ACT_OK, Reason::PassNotService), ok);
    to_pod(&mut dp, &sctp((A, 5000), (B, 3869)), TC_ACT_SHOT, Reason::DropPolicy);
    // TCP on the same port is another protocol.
    to_pod(&mut dp, &tcp((A, 5000), (B, 3868)), TC_ACT_SHOT, Reason::DropPolicy);
    let entry = dp.maps().policy_ct.get(&pct_key((A, 5000), (B, 3868), IPPROTO_SCTP), 0);
    assert_eq!(entry.expect("SCTP flow entry").flags, PCT_F_INGRESS);
    // A truncated common header, and SCTP to a ClusterIP.
    let mut short = sctp((A, 5000), (B, 3868));
    short.truncate(ETH_HLEN + 20 + 8);
    to_pod(&mut dp, &short, TC_ACT_SHOT, Reason::DropMalformedL4);
    from_pod(&mut dp, &sctp((A, 5000), (VIP, 80)), TC_ACT_SHOT, Reason::DropUnsupportedProto);
}

#[test]
fn flow_events_report_every_deny_and_allowed_new_flows_only_when_asked() {
    let mut dp = fixture();
    let mut ring = dp.maps().take_flow_events().expect("flow events ring");
    assert!(dp.maps().take_flow_events().is_none(), "the ring is handed out once");
    endpoint(&mut dp, B, SET_B_IN, SET_NONE, ID_B);
    allow(&mut dp, SET_B_IN, ID_A, IPPROTO_TCP, 8080, PolicyKey::PREFIX_FULL, RULE_1);

    // Events off (nobody reads the ring): the drop is counted, nothing is written or lost.
    config(&mut dp, 1, 0);
    to_pod(&mut dp, &tcp((PEER, 39999), (B, 8080)), TC_ACT_SHOT, Reason::DropPolicy);
    assert!(drain(&mut ring).is_empty(), "no events without POLICY_CFG_F_EVENTS");

    config(&mut dp, 1, POLICY_CFG_F_EVENTS);
    to_pod(&mut dp, &tcp((PEER, 40000), (B, 8080)), TC_ACT_SHOT, Reason::DropPolicy);
    to_pod(&mut dp, &tcp((A, 40000), (B, 8080)), TC_ACT_OK, Reason::PassNotService);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "without LOG_ALLOWED only the deny: {events:?}");
    let e = events[0];
    assert!(e.ts_ns > 0);
    assert_eq!((e.saddr, e.daddr), (PEER.octets(), B.octets()));
    assert_eq!((e.sport, e.dport, e.proto), (40000u16.to_be_bytes(), 8080u16.to_be_bytes(), 6));
    assert_eq!((e.dir, e.verdict, e.reason), (DIR_INGRESS, VERDICT_DENY, Reason::DropPolicy as u8));
    assert_eq!((e.set, e.rule, e.peer_identity), (SET_B_IN, 0, ID_PEER));
    assert_eq!((e.orig_daddr, e.orig_dport), ([0; 4], [0; 2]));

    config(&mut dp, 1, POLICY_CFG_F_EVENTS | POLICY_CFG_F_LOG_ALLOWED);
    to_pod(&mut dp, &tcp((A, 40001), (B, 8080)), TC_ACT_OK, Reason::PassNotService);
    // Established packets are not logged, new flows are.
    let ack = Frame::tcp((A, 40001), (B, 8080), TCP_ACK).build();
    to_pod(&mut dp, &ack, TC_ACT_OK, Reason::PassNotService);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "one allowed new flow: {events:?}");
    let e = events[0];
    assert_eq!((e.saddr, e.sport), (A.octets(), 40001u16.to_be_bytes()));
    assert_eq!((e.dir, e.verdict), (DIR_INGRESS, VERDICT_ALLOW));
    assert_eq!(e.reason, Reason::PassNotService as u8);
    assert_eq!((e.set, e.rule, e.peer_identity), (SET_B_IN, RULE_1, ID_A));

    let c = dp.maps().policy_counters().expect("policy counters");
    assert_eq!((c.events_written, c.events_lost), (2, 0));
    assert_eq!(verdicts(&mut dp, RULE_1, VERDICT_ALLOW, DIR_INGRESS), 2);
    assert_eq!(verdicts(&mut dp, SET_B_IN, VERDICT_DENY, DIR_INGRESS), 2);
}
