//! Hairpin on the real `from_pod` with BPF_PROG_TEST_RUN: a pod whose Service flow is DNATed
//! to itself is also SNATed to `HAIRPIN_ADDR_V4`, and its reply (`pod -> HAIRPIN_ADDR_V4`)
//! comes back as `VIP:port -> pod`; both entries carry `CT_F_HAIRPIN`; a flow from another
//! client is translated as before; NetworkPolicy does not judge a pod talking to itself.
//! Checksums are verified from scratch (`View::parse_checked`). Needs root (run with
//! `cargo xtask test`).
use std::net::Ipv4Addr;

use nodeplane_agent::{
    datapath::Datapath,
    policy::{PolicyOp, PolicyWriter},
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_HAIRPIN, CtKeyV4, HAIRPIN_ADDR_V4,
        IPPROTO_TCP, IPPROTO_UDP, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey, names,
    },
    policy::EndpointV4,
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN, View},
    run::{TC_ACT_OK, TC_ACT_SHOT, run_once_on},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service's only backend, which also calls the Service.
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Another pod calling the same Service.
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
const HAIRPIN: Ipv4Addr =
    Ipv4Addr::new(HAIRPIN_ADDR_V4[0], HAIRPIN_ADDR_V4[1], HAIRPIN_ADDR_V4[2], HAIRPIN_ADDR_V4[3]);
const CPORT: u16 = 40000;
/// 80/TCP -> 8080 and 53/UDP -> 5353 on `POD`.
const TCP_SVC: u16 = 80;
const TCP_TARGET: u16 = 8080;
const UDP_SVC: u16 = 53;
const UDP_TARGET: u16 = 5353;

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

fn fixture() -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::vip_marker(VIP.octets()), value: marker });
    for (id, port, target, proto) in
        [(1, TCP_SVC, TCP_TARGET, IPPROTO_TCP), (2, UDP_SVC, UDP_TARGET, IPPROTO_UDP)]
    {
        let backend = BackendV4::new(POD.octets(), target, proto);
        write(&mut dp, Op::PutBackend { id, backend });
        write(&mut dp, Op::PutSlot { key: SlotKey { service_id: id, slot: 0 }, backend_id: id });
        let value = ServiceValue { service_id: id, backend_count: 1, ..Default::default() };
        write(&mut dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), port, proto), value });
    }
    dp
}

/// Runs `frame` through `from_pod`; asserts the action and that exactly `reason` was
/// counted, once, under `from_pod`. Returns the frame as the program left it.
fn expect(dp: &Datapath, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
    let before = dp.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    let out = run_once_on(dp, names::PROG_FROM_POD, frame);
    let after = dp.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    let moved: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|((_, _, now), (_, _, was))| now.packets != was.packets)
        .map(|((h, r, now), (_, _, was))| ((*h, *r), now.packets - was.packets))
        .collect();
    assert_eq!(out.action, action, "tc action, expecting {}", reason.name());
    assert_eq!(moved, [((Hook::FromPod, reason), 1)], "counters, expecting {}", reason.name());
    out.frame
}

fn frame(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    if proto == IPPROTO_TCP { Frame::tcp(src, dst, flags) } else { Frame::udp(src, dst) }.build()
}

fn ct_flags(
    dp: &mut Datapath,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    proto: u8,
    dir: u8,
) -> u8 {
    let key = CtKeyV4 {
        saddr: src.0.octets(),
        daddr: dst.0.octets(),
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
        proto,
        dir,
        _pad: [0; 2],
    };
    let entry = dp.maps().ct.get(&key, 0);
    entry.unwrap_or_else(|e| panic!("conntrack entry {src:?} -> {dst:?} dir {dir}: {e}")).flags
}

/// The hairpin round trip of one protocol: request DNATed + SNATed, reply restored, a later
/// request of the same flow translated the same way from conntrack.
fn round_trip(dp: &mut Datapath, proto: u8, vport: u16, target: u16) {
    let client = (POD, CPORT);
    let req = frame(proto, client, (VIP, vport), TCP_SYN);
    let out = View::parse_checked(&expect(dp, &req, TC_ACT_OK, Reason::NatNew));
    assert_eq!((out.src, out.dst), ((HAIRPIN, CPORT), (POD, target)), "DNAT and hairpin SNAT");
    assert_eq!(ct_flags(dp, client, (VIP, vport), proto, CT_DIR_ORIGINAL), CT_F_HAIRPIN);
    assert_eq!(ct_flags(dp, (POD, target), (HAIRPIN, CPORT), proto, CT_DIR_REPLY), CT_F_HAIRPIN);

    let reply = frame(proto, (POD, target), (HAIRPIN, CPORT), TCP_SYN | TCP_ACK);
    let out = View::parse_checked(&expect(dp, &reply, TC_ACT_OK, Reason::RevNat));
    assert_eq!((out.src, out.dst), ((VIP, vport), client), "reply back to VIP -> client");

    let again = frame(proto, client, (VIP, vport), TCP_ACK);
    let out = View::parse_checked(&expect(dp, &again, TC_ACT_OK, Reason::NatEstablished));
    assert_eq!((out.src, out.dst), ((HAIRPIN, CPORT), (POD, target)), "established hairpin");
}

#[test]
fn a_pod_reaching_itself_is_dnated_and_snated_and_its_reply_restored() {
    let mut dp = fixture();
    round_trip(&mut dp, IPPROTO_TCP, TCP_SVC, TCP_TARGET);
    round_trip(&mut dp, IPPROTO_UDP, UDP_SVC, UDP_TARGET);
}

#[test]
fn another_clients_flow_is_only_dnated_and_a_stray_packet_to_the_hairpin_address_passes() {
    let mut dp = fixture();
    let client = (OTHER, CPORT);
    let syn = frame(IPPROTO_TCP, client, (VIP, TCP_SVC), TCP_SYN);
    let out = View::parse_checked(&expect(&dp, &syn, TC_ACT_OK, Reason::NatNew));
    assert_eq!((out.src, out.dst), (client, (POD, TCP_TARGET)), "DNAT only");
    assert_eq!(ct_flags(&mut dp, client, (VIP, TCP_SVC), IPPROTO_TCP, CT_DIR_ORIGINAL), 0);

    let reply = frame(IPPROTO_TCP, (POD, TCP_TARGET), client, TCP_SYN | TCP_ACK);
    let out = View::parse_checked(&expect(&dp, &reply, TC_ACT_OK, Reason::RevNat));
    assert_eq!((out.src, out.dst), ((VIP, TCP_SVC), client), "source back to the VIP only");

    // No hairpin flow has this port: the packet is not a reply and is left as it is.
    let stray = frame(IPPROTO_TCP, (POD, TCP_TARGET), (HAIRPIN, CPORT + 1), TCP_ACK);
    let out = expect(&dp, &stray, TC_ACT_OK, Reason::PassNotService);
    assert_eq!(out, stray, "untouched");
}

/// Documented decision (docs/ARCHITECTURE.md, "Hairpin"): a pod talking to itself through
/// its Service is its own traffic, as over loopback, and NetworkPolicy does not judge it.
/// Other clients are judged as always.
#[test]
fn policy_does_not_judge_a_pod_talking_to_itself_but_still_judges_others() {
    let mut dp = fixture();
    // Both pods isolated in both directions with no rule: everything judged is denied.
    for addr in [POD, OTHER] {
        let value = EndpointV4 { ingress_set: 1, egress_set: 2, identity: 100, flags: 0 };
        let op = PolicyOp::PutEndpoint { addr, value };
        dp.maps().apply_policy(&op).unwrap_or_else(|e| panic!("writing policy fixture: {e}"));
    }
    round_trip(&mut dp, IPPROTO_TCP, TCP_SVC, TCP_TARGET);
    let denied = frame(IPPROTO_TCP, (OTHER, CPORT), (VIP, TCP_SVC), TCP_SYN);
    let out = expect(&dp, &denied, TC_ACT_SHOT, Reason::DropPolicy);
    assert_eq!(out, denied, "dropped untranslated");
}
