//! Reject instead of blackhole, on the real `from_pod` with BPF_PROG_TEST_RUN: a packet to a
//! frontend with no usable endpoints comes back as the answer (TCP RST|ACK, ICMP port
//! unreachable) with `TC_ACT_REDIRECT`, every field and checksum checked from scratch here
//! (not with the datapath's own builder). Needs root (run with `cargo xtask test`).
use std::net::Ipv4Addr;

use nodeplane_agent::{
    datapath::Datapath,
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    csum,
    maps::{
        BackendV4, IPPROTO_TCP, IPPROTO_UDP, SVC_F_DROP_EMPTY, SVC_F_VIP_MARKER, ServiceKeyV4,
        ServiceValue, SlotKey, names,
    },
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    packet::{ETH_HLEN, Frame, TCP_ACK, TCP_FIN, TCP_SYN, View},
    run::{Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, run_once_from, run_once_on},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 2), 40000);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
/// 80/TCP and 53/UDP have a backend; 81/TCP and 54/UDP have none.
const TCP_LIVE: u16 = 80;
const UDP_LIVE: u16 = 53;
const TCP_EMPTY: u16 = 81;
const UDP_EMPTY: u16 = 54;
const TCP_RST: u8 = 0x04;
/// The sequence number `Frame` gives every TCP segment.
const FRAME_SEQ: u32 = 1000;
/// Ethernet addresses `Frame` uses: destination, then source.
const FRAME_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const FRAME_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

fn service(dp: &mut Datapath, id: u32, port: u16, proto: u8, backend: Option<(u32, BackendV4)>) {
    if let Some((bid, b)) = backend {
        write(dp, Op::PutBackend { id: bid, backend: b });
        write(dp, Op::PutSlot { key: SlotKey { service_id: id, slot: 0 }, backend_id: bid });
    }
    let value = ServiceValue {
        service_id: id,
        backend_count: u32::from(backend.is_some()),
        ..Default::default()
    };
    write(dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), port, proto), value });
}

fn fixture() -> Datapath {
    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::vip_marker(VIP.octets()), value: marker });
    let tcp = BackendV4::new(BACKEND.octets(), 8080, IPPROTO_TCP);
    let udp = BackendV4::new(BACKEND.octets(), 5353, IPPROTO_UDP);
    service(&mut dp, 1, TCP_LIVE, IPPROTO_TCP, Some((1, tcp)));
    service(&mut dp, 2, UDP_LIVE, IPPROTO_UDP, Some((2, udp)));
    service(&mut dp, 3, TCP_EMPTY, IPPROTO_TCP, None);
    service(&mut dp, 4, UDP_EMPTY, IPPROTO_UDP, None);
    dp
}

/// Runs `frame` through `from_pod`; asserts the action and that exactly `reason` was counted,
/// once, under `from_pod`.
fn expect(dp: &Datapath, frame: &[u8], action: u32, reason: Reason) -> Outcome {
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
    out
}

/// `frame` (a `Frame::tcp` build) with its ACK field set to `ack` and the TCP checksum redone.
fn with_ack(mut frame: Vec<u8>, ack: u32) -> Vec<u8> {
    let l4 = ETH_HLEN + 20;
    frame[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    frame[l4 + 16..l4 + 18].fill(0);
    let (s, d) = (CLIENT.0.octets(), VIP.octets());
    let c = csum::l4_ipv4(s, d, IPPROTO_TCP, &frame[l4..]);
    frame[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    frame
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Checks the Ethernet and IPv4 headers of an answer to a `Frame` sent by `CLIENT`: MACs
/// swapped, IPv4 without options from the VIP to the client, `proto`, total length equal to
/// the frame's, a valid header checksum. Returns the IPv4 payload.
fn answer_ip(frame: &[u8], proto: u8) -> &[u8] {
    assert_eq!(&frame[0..6], FRAME_SRC_MAC, "destination MAC: the client's");
    assert_eq!(&frame[6..12], FRAME_DST_MAC, "source MAC: the one the client sent to");
    assert_eq!(&frame[12..14], [0x08, 0x00], "EtherType IPv4");
    let ip = &frame[ETH_HLEN..];
    assert_eq!(ip[0], 0x45, "IPv4, no options: {frame:02x?}");
    assert_eq!(usize::from(u16_at(ip, 2)), ip.len(), "IPv4 total length = frame: {frame:02x?}");
    assert_eq!(u16_at(ip, 6) & 0x3fff, 0, "not a fragment");
    assert!(ip[8] > 1, "a TTL that reaches the pod");
    assert_eq!(ip[9], proto, "protocol");
    assert_eq!(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), VIP, "from the VIP");
    assert_eq!(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), CLIENT.0, "to the client");
    assert_eq!(csum::ipv4_header(&ip[..20]), 0, "IPv4 header checksum: {frame:02x?}");
    &ip[20..]
}

/// The answer to a TCP segment: a RST|ACK from the VIP:port to the client with `seq`/`ack`.
fn assert_rst(frame: &[u8], vport: u16, seq: u32, ack: u32) {
    assert_eq!(frame.len(), ETH_HLEN + 20 + 20, "Ethernet + IPv4 + TCP, no data: {frame:02x?}");
    let tcp = answer_ip(frame, IPPROTO_TCP);
    assert_eq!(csum::l4_ipv4(VIP.octets(), CLIENT.0.octets(), IPPROTO_TCP, tcp), 0, "TCP csum");
    assert_eq!((u16_at(tcp, 0), u16_at(tcp, 2)), (vport, CLIENT.1), "ports swapped");
    assert_eq!(tcp[12] >> 4, 5, "data offset: no options");
    assert_eq!(tcp[13], TCP_RST | TCP_ACK, "flags RST|ACK");
    assert_eq!((u32_at(tcp, 4), u32_at(tcp, 8)), (seq, ack), "seq, ack");
}

#[test]
fn a_syn_to_a_service_without_endpoints_comes_back_as_a_rst() {
    let dp = fixture();
    // A bare SYN (no data): ack = ISN + 1, seq 0 (the SYN has no ACK).
    let syn = Frame { payload: vec![], ..Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_SYN) }.build();
    let out = expect(&dp, &syn, TC_ACT_REDIRECT, Reason::RejectTcp);
    assert_rst(&out.frame, TCP_EMPTY, 0, FRAME_SEQ + 1);

    // A SYN carrying 4 bytes (TCP Fast Open style): they are acknowledged too.
    let syn = Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_SYN).build();
    let out = expect(&dp, &syn, TC_ACT_REDIRECT, Reason::RejectTcp);
    assert_rst(&out.frame, TCP_EMPTY, 0, FRAME_SEQ + 1 + 4);
}

#[test]
fn any_later_segment_is_reset_too_with_the_rfc_793_numbers() {
    let dp = fixture();
    // Data with an ACK (a flow whose last backend left): seq = its ACK field.
    let data = with_ack(Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_ACK).build(), 0xdead_beef);
    let out = expect(&dp, &data, TC_ACT_REDIRECT, Reason::RejectTcp);
    assert_rst(&out.frame, TCP_EMPTY, 0xdead_beef, FRAME_SEQ + 4);
    // A FIN occupies one sequence number.
    let fin = Frame { payload: vec![], ..Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_FIN | TCP_ACK) };
    let out = expect(&dp, &with_ack(fin.build(), 7), TC_ACT_REDIRECT, Reason::RejectTcp);
    assert_rst(&out.frame, TCP_EMPTY, 7, FRAME_SEQ + 1);
    // A large segment is cut down to the 54-byte answer.
    let big = Frame { payload: vec![0xab; 1400], ..Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_ACK) };
    let out = expect(&dp, &with_ack(big.build(), 1), TC_ACT_REDIRECT, Reason::RejectTcp);
    assert_rst(&out.frame, TCP_EMPTY, 1, FRAME_SEQ + 1400);
}

/// `internalTrafficPolicy: Local` with no endpoint on this node (other nodes have some):
/// kube-proxy drops, so the datapath does too, for TCP and UDP alike.
#[test]
fn a_local_frontend_without_local_endpoints_drops_instead_of_rejecting() {
    let mut dp = fixture();
    for (port, proto) in [(TCP_EMPTY, IPPROTO_TCP), (UDP_EMPTY, IPPROTO_UDP)] {
        let value = ServiceValue {
            service_id: port.into(),
            backend_count: 0,
            flags: SVC_F_DROP_EMPTY,
            ..Default::default()
        };
        write(&mut dp, Op::PutService { key: ServiceKeyV4::new(VIP.octets(), port, proto), value });
    }
    let syn = Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_SYN).build();
    expect(&dp, &syn, TC_ACT_SHOT, Reason::DropNoBackends);
    let udp = Frame { payload: b"q".to_vec(), ..Frame::udp(CLIENT, (VIP, UDP_EMPTY)) }.build();
    expect(&dp, &udp, TC_ACT_SHOT, Reason::DropNoBackends);
}

#[test]
fn a_rst_to_a_service_without_endpoints_is_dropped_not_answered() {
    let dp = fixture();
    for flags in [TCP_RST, TCP_RST | TCP_ACK] {
        let rst = Frame::tcp(CLIENT, (VIP, TCP_EMPTY), flags).build();
        expect(&dp, &rst, TC_ACT_SHOT, Reason::DropNoBackends);
    }
}

#[test]
fn a_udp_datagram_comes_back_as_icmp_port_unreachable_quoting_it() {
    let dp = fixture();
    // Payload sizes: none (the frame grows to the answer), 4 bytes, 1000 (it shrinks).
    for len in [0usize, 4, 1000] {
        let sent =
            Frame { payload: vec![0x5a; len], ..Frame::udp(CLIENT, (VIP, UDP_EMPTY)) }.build();
        let out = expect(&dp, &sent, TC_ACT_REDIRECT, Reason::RejectUdp);
        let frame = &out.frame;
        assert_eq!(frame.len(), ETH_HLEN + 20 + 8 + 28, "payload {len}: {frame:02x?}");
        let icmp = answer_ip(frame, 1);
        assert_eq!(csum::ipv4_header(icmp), 0, "ICMP checksum (payload {len}): {frame:02x?}");
        assert_eq!((icmp[0], icmp[1]), (3, 3), "destination unreachable, port unreachable");
        assert_eq!(&icmp[4..8], [0; 4], "unused field");
        assert_eq!(
            &icmp[8..],
            &sent[ETH_HLEN..ETH_HLEN + 28],
            "quotes the original IPv4 header and the UDP header as sent"
        );
    }
    // A datagram sent without a UDP checksum is answered the same way.
    let sent = Frame { udp_zero_csum: true, ..Frame::udp(CLIENT, (VIP, UDP_EMPTY)) }.build();
    let out = expect(&dp, &sent, TC_ACT_REDIRECT, Reason::RejectUdp);
    assert_eq!(&out.frame[ETH_HLEN + 28..], &sent[ETH_HLEN..ETH_HLEN + 28]);
}

#[test]
fn services_with_backends_are_unaffected() {
    let dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_LIVE), TCP_SYN).build();
    let out = View::parse_checked(&expect(&dp, &syn, TC_ACT_OK, Reason::NatNew).frame);
    assert_eq!((out.src, out.dst), (CLIENT, (BACKEND, 8080)));
    let dgram = Frame::udp(CLIENT, (VIP, UDP_LIVE)).build();
    let out = View::parse_checked(&expect(&dp, &dgram, TC_ACT_OK, Reason::NatNew).frame);
    assert_eq!((out.src, out.dst), (CLIENT, (BACKEND, 5353)));
    // A RST of a live service's flow is translated, not dropped.
    let rst = Frame::tcp(CLIENT, (VIP, TCP_LIVE), TCP_RST | TCP_ACK).build();
    expect(&dp, &rst, TC_ACT_OK, Reason::NatEstablished);
}

/// What is not answered: IPv4 options (the answer would move the L4 header), fragments
/// (ports unknown) and protocols services do not translate keep their old verdicts.
#[test]
fn odd_packets_to_a_service_without_endpoints_keep_their_verdicts() {
    let dp = fixture();
    let opts = Frame { ip_options: vec![1, 1, 1, 1], ..Frame::tcp(CLIENT, (VIP, TCP_EMPTY), 2) };
    expect(&dp, &opts.build(), TC_ACT_SHOT, Reason::DropNoBackends);
    let frag = Frame { frag_off: 0x2000, ..Frame::udp(CLIENT, (VIP, UDP_EMPTY)) };
    expect(&dp, &frag.build(), TC_ACT_SHOT, Reason::DropFragment);
    let icmp = Frame::icmp_echo(CLIENT.0, VIP, 1, 1).build();
    expect(&dp, &icmp, TC_ACT_SHOT, Reason::DropUnsupportedProto);
}

/// The answer leaves through the interface's egress, i.e. crosses `to_pod` on its way to
/// the client: it must pass there untouched (no conntrack entry, no policy for this pod).
#[test]
fn the_answer_passes_to_pod_untouched() {
    let dp = fixture();
    let syn = Frame::tcp(CLIENT, (VIP, TCP_EMPTY), TCP_SYN).build();
    let udp = Frame::udp(CLIENT, (VIP, UDP_EMPTY)).build();
    for (sent, reason) in [(syn, Reason::RejectTcp), (udp, Reason::RejectUdp)] {
        let answer = expect(&dp, &sent, TC_ACT_REDIRECT, reason).frame;
        let out = run_once_from(&dp, names::PROG_TO_POD, &answer, 7);
        assert_eq!((out.action, &out.frame), (TC_ACT_OK, &answer), "{}", reason.name());
    }
}
