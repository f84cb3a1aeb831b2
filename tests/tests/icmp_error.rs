//! ICMP errors about service flows, on the real programs with BPF_PROG_TEST_RUN: a flow is
//! created by running the client's packet through `from_pod`, then an ICMP error quoting the
//! DNATed packet (as a router, the node or the backend would send it) runs through `to_pod`.
//! Every checksum is verified from scratch here. Needs root (run with `cargo xtask test`).
use std::net::Ipv4Addr;

use nodeplane_agent::{
    datapath::Datapath,
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    csum,
    maps::{
        BackendV4, IPPROTO_TCP, IPPROTO_UDP, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey,
        names,
    },
    policy::IPPROTO_ICMP,
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    packet::{ETH_HLEN, Frame, TCP_SYN},
    run::{Outcome, TC_ACT_OK, run_once_from, run_once_on},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 2), 40000);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
/// A router on the path to the backend.
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// A pod that is no backend of anything.
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 50);
const TCP_PORT: u16 = 80;
const TCP_TARGET: u16 = 8080;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;
/// `ingress_ifindex` of a forwarded packet (not generated on this node).
const UPLINK: u32 = 7;
const MTU: u16 = 1400;

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

fn service(dp: &mut Datapath, id: u32, port: u16, proto: u8, backend: BackendV4) {
    write(dp, Op::PutBackend { id, backend });
    write(dp, Op::PutSlot { key: SlotKey { service_id: id, slot: 0 }, backend_id: id });
    let value = ServiceValue { service_id: id, backend_count: 1, ..Default::default() };
    write(dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), port, proto), value });
}

/// One ClusterIP: 80/TCP -> BACKEND:8080 and 53/UDP -> BACKEND:5353.
fn fixture() -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::vip_marker(VIP.octets()), value: marker });
    service(&mut dp, 1, TCP_PORT, IPPROTO_TCP, BackendV4::new(BACKEND.octets(), TCP_TARGET, 6));
    service(&mut dp, 2, UDP_PORT, IPPROTO_UDP, BackendV4::new(BACKEND.octets(), UDP_TARGET, 17));
    dp
}

/// Runs `frame` through `program` (`ingress_ifindex` as in `run_once_from`; `None`: from
/// this node); asserts action OK and that exactly `reason` was counted once under `hook`.
fn expect(
    dp: &Datapath,
    program: &str,
    hook: Hook,
    frame: &[u8],
    ingress: Option<u32>,
    reason: Reason,
) -> Outcome {
    let before = dp.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    let out = match ingress {
        Some(ifindex) => run_once_from(dp, program, frame, ifindex),
        None => run_once_on(dp, program, frame),
    };
    let after = dp.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    let moved: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|((_, _, now), (_, _, was))| now.packets != was.packets)
        .map(|((h, r, now), (_, _, was))| ((*h, *r), now.packets - was.packets))
        .collect();
    assert_eq!(out.action, TC_ACT_OK, "tc action, expecting {}", reason.name());
    assert_eq!(moved, [((hook, reason), 1)], "counters, expecting {}", reason.name());
    out
}

/// The client's packet through `from_pod`: returns (the IPv4 packet as the client sent it,
/// the IPv4 packet as DNATed), without Ethernet.
fn open_flow(dp: &Datapath, sent: &Frame) -> (Vec<u8>, Vec<u8>) {
    let frame = sent.build();
    let out = expect(dp, names::PROG_FROM_POD, Hook::FromPod, &frame, Some(2), Reason::NatNew);
    assert_eq!(&out.frame[ETH_HLEN + 16..ETH_HLEN + 20], BACKEND.octets(), "DNATed");
    (frame[ETH_HLEN..].to_vec(), out.frame[ETH_HLEN..].to_vec())
}

/// An ICMP error `src -> dst` of `icmp_type`/`code` (rest of header: the next-hop MTU)
/// quoting `quote`, with a correct ICMP checksum.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut msg = vec![icmp_type, code, 0, 0, 0, 0];
    msg.extend_from_slice(&MTU.to_be_bytes());
    msg.extend_from_slice(quote);
    let c = csum::ipv4_header(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Frame { payload: msg, ..Frame::other(src, dst, IPPROTO_ICMP) }.build()
}

fn addr(b: &[u8], o: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3])
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

/// Checks an error after `to_pod`: outer header from `src` to the client with a valid
/// checksum, the ICMP header unchanged but for a valid checksum, the quote's header valid
/// and naming `CLIENT -> VIP:vport`. Returns the quote (IPv4 header onwards).
fn assert_translated(
    frame: &[u8],
    sent: &[u8],
    src: Ipv4Addr,
    vport: u16,
    icmp_type: u8,
    code: u8,
) -> Vec<u8> {
    assert_eq!(frame.len(), sent.len(), "length unchanged");
    let ip = &frame[ETH_HLEN..];
    assert_eq!(csum::ipv4_header(&ip[..20]), 0, "outer IPv4 checksum: {frame:02x?}");
    assert_eq!((addr(ip, 12), addr(ip, 16)), (src, CLIENT.0), "outer addresses");
    assert_eq!(ip[9], IPPROTO_ICMP);
    let icmp = &ip[20..];
    assert_eq!(csum::ipv4_header(icmp), 0, "ICMP checksum (recomputed): {frame:02x?}");
    assert_eq!((icmp[0], icmp[1], u16_at(icmp, 6)), (icmp_type, code, MTU), "type, code, MTU");
    let quote = &icmp[8..];
    assert_eq!(csum::ipv4_header(&quote[..20]), 0, "quoted IPv4 checksum: {frame:02x?}");
    assert_eq!((addr(quote, 12), addr(quote, 16)), (CLIENT.0, VIP), "quoted addresses");
    assert_eq!((u16_at(quote, 20), u16_at(quote, 22)), (CLIENT.1, vport), "quoted ports");
    quote.to_vec()
}

#[test]
fn frag_needed_from_a_router_quotes_the_packet_the_client_sent() {
    let dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN);
    let (orig, dnated) = open_flow(&dp, &syn);
    // Linux quotes up to 576 bytes: the whole SYN, its TCP checksum included.
    let err = icmp_error(ROUTER, CLIENT.0, 3, 4, &dnated);
    let out = expect(&dp, names::PROG_TO_POD, Hook::ToPod, &err, Some(UPLINK), Reason::IcmpRevNat);
    let quote = assert_translated(&out.frame, &err, ROUTER, TCP_PORT, 3, 4);
    assert_eq!(quote, orig, "the quote is byte for byte the SYN the client sent");
    assert_eq!(csum::l4_ipv4(CLIENT.0.octets(), VIP.octets(), IPPROTO_TCP, &quote[20..]), 0);
}

#[test]
fn an_error_from_the_backend_itself_comes_from_the_vip() {
    let dp = fixture();
    let dgram = Frame::udp(CLIENT, (VIP, UDP_PORT));
    let (orig, dnated) = open_flow(&dp, &dgram);
    // Port unreachable from the backend (no socket on the target port): the whole datagram.
    let err = icmp_error(BACKEND, CLIENT.0, 3, 3, &dnated);
    let out = expect(&dp, names::PROG_TO_POD, Hook::ToPod, &err, Some(UPLINK), Reason::IcmpRevNat);
    let quote = assert_translated(&out.frame, &err, VIP, UDP_PORT, 3, 3);
    assert_eq!(quote, orig, "the quote is byte for byte the datagram the client sent");
    // And frag-needed from the backend's own stack, about the TCP flow.
    let (orig, dnated) = open_flow(&dp, &Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN));
    let err = icmp_error(BACKEND, CLIENT.0, 3, 4, &dnated);
    let out = expect(&dp, names::PROG_TO_POD, Hook::ToPod, &err, Some(UPLINK), Reason::IcmpRevNat);
    assert_eq!(assert_translated(&out.frame, &err, VIP, TCP_PORT, 3, 4), orig);
}

#[test]
fn time_exceeded_and_node_generated_errors_with_an_8_byte_quote() {
    let dp = fixture();
    let (orig, dnated) = open_flow(&dp, &Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN));
    // RFC 792 minimum: the IPv4 header and 8 bytes; the TCP checksum is not quoted.
    let short = &dnated[..28];
    let err = icmp_error(ROUTER, CLIENT.0, 11, 0, short);
    let out = expect(&dp, names::PROG_TO_POD, Hook::ToPod, &err, Some(UPLINK), Reason::IcmpRevNat);
    let quote = assert_translated(&out.frame, &err, ROUTER, TCP_PORT, 11, 0);
    assert_eq!(quote, orig[..28], "header and ports as the client sent them");
    // Frag-needed generated by this node while forwarding (no ingress interface).
    let node = Ipv4Addr::new(10, 244, 0, 1);
    let err = icmp_error(node, CLIENT.0, 3, 4, short);
    let out = expect(&dp, names::PROG_TO_POD, Hook::ToPod, &err, None, Reason::IcmpRevNat);
    assert_eq!(assert_translated(&out.frame, &err, node, TCP_PORT, 3, 4), orig[..28]);
}

#[test]
fn errors_about_other_flows_and_cut_short_ones_pass_untouched() {
    let dp = fixture();
    let (_, dnated) = open_flow(&dp, &Frame::tcp(CLIENT, (VIP, TCP_PORT), TCP_SYN));
    let other = Frame::tcp(CLIENT, (OTHER, TCP_TARGET), TCP_SYN).build();
    let mut wrong_port = dnated.clone();
    wrong_port[22..24].copy_from_slice(&(TCP_TARGET + 1).to_be_bytes());
    let cases: [(&str, Vec<u8>); 8] = [
        ("a flow to a pod, no Service", icmp_error(ROUTER, CLIENT.0, 3, 4, &other[ETH_HLEN..])),
        ("the flow's tuple with another port", icmp_error(ROUTER, CLIENT.0, 3, 4, &wrong_port)),
        ("quote cut in the ports", icmp_error(ROUTER, CLIENT.0, 3, 4, &dnated[..24])),
        ("quote cut in the IPv4 header", icmp_error(ROUTER, CLIENT.0, 3, 4, &dnated[..12])),
        ("no quote at all", icmp_error(ROUTER, CLIENT.0, 3, 4, &[])),
        ("not an error (type 5, redirect)", icmp_error(ROUTER, CLIENT.0, 5, 1, &dnated)),
        ("addressed to someone else", icmp_error(ROUTER, OTHER, 3, 4, &dnated)),
        ("an ICMP header cut short", {
            Frame { payload: vec![3, 4, 0, 0], ..Frame::other(ROUTER, CLIENT.0, IPPROTO_ICMP) }
                .build()
        }),
    ];
    for (what, err) in cases {
        let out = expect(
            &dp,
            names::PROG_TO_POD,
            Hook::ToPod,
            &err,
            Some(UPLINK),
            Reason::PassNotService,
        );
        assert_eq!(out.frame, err, "{what}: untouched");
    }
    // A quoted first fragment (MF set): fragments are never translated.
    let mut frag = dnated.clone();
    frag[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
    let err = icmp_error(ROUTER, CLIENT.0, 3, 4, &frag);
    let out =
        expect(&dp, names::PROG_TO_POD, Hook::ToPod, &err, Some(UPLINK), Reason::PassNotService);
    assert_eq!(out.frame, err, "a quoted fragment: untouched");
}
