//! `xdp_netdev` with BPF_PROG_TEST_RUN, as if the frames arrived on a real interface of a
//! scratch netns whose routes and static neighbours make every `bpf_fib_lookup`
//! deterministic:
//!
//! ```text
//! ext0 (ingress, 192.0.2.1 = node IP)      ext1 (another device, 203.0.113.1)
//!   198.51.100.0/24 via 192.0.2.254  (clients; neighbour permanent)
//!   10.244.1.0/24   via 192.0.2.2    (another node's pods; neighbour permanent)
//!   10.244.3.0/24   via 192.0.2.3    (no neighbour entry)
//!                                      10.244.2.0/24 via 203.0.113.2 (neighbour permanent)
//! ```
//!
//! Checks: what XDP must leave to tc (not IPv4, options, fragments, ICMP, no neighbour),
//! `loadBalancerSourceRanges`, NodePort DNAT + SNAT + XDP_TX with MACs from the neighbour
//! and the reply's way back, DNAT-only for `externalTrafficPolicy: Local` or a backend
//! behind another device, frontends without backends. Checksums are verified from scratch.
//! Needs root (run with `cargo xtask test`).
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::Key;
use nodeplane_agent::{
    datapath::Datapath,
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    csum,
    maps::{
        BackendV4, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_EXTERNAL, CtKeyV4, IPPROTO_TCP, IPPROTO_UDP,
        SVC_F_DROP_EMPTY, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES, ServiceKeyV4,
        ServiceValue, SlotKey,
    },
    nat::{NAT_DIR_IN, NAT_DIR_OUT, NAT_F_NODEPORT, NatConfig, SourceRangeV4},
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    ns_run::{Run, Scratch, counted, xdp_once},
    packet::{ETH_HLEN, Frame, TCP_ACK, TCP_SYN, View},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 51, 100, 7), 50000);
/// A client outside the source ranges of the restricted frontend.
const STRANGER: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 51, 100, 200), 50000);
/// A client whose packets arrive on ext0 but whose route leaves through ext1.
const ASYM: (Ipv4Addr, u16) = (Ipv4Addr::new(203, 0, 113, 50), 50000);
/// Backends: on another node reached through ext0, behind ext1, with no neighbour yet.
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const BEHIND_EXT1: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const NO_NEIGH: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 5);
const PORT_MIN: u16 = 61_000;
const PORTS: u16 = 4;

const EXT0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0e, 0x00];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0xfe];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x02];

/// NodePort frontends on `NODE_IP`: (port, proto, flags, backend).
const TCP_REMOTE: u16 = 30080;
const UDP_REMOTE: u16 = 30053;
const TCP_EXT1: u16 = 30081;
const TCP_LOCAL_EXT1: u16 = 30082;
const TCP_LOCAL_EXT0: u16 = 30083;
const TCP_NO_NEIGH: u16 = 30084;
const TCP_EMPTY: u16 = 30085;
const TCP_EMPTY_DROP: u16 = 30086;
const TCP_RANGES: u16 = 30087;
const UDP_EXT1: u16 = 30054;
const TCP_HOST_BACKEND: u16 = 30088;
const TARGET: u16 = 8080;

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

struct Fx {
    dp: Datapath,
    ns: Scratch,
    ext0: u32,
}

fn write(dp: &mut Datapath, op: Op) {
    dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
}

fn frontend(
    dp: &mut Datapath,
    id: u32,
    port: u16,
    proto: u8,
    flags: u32,
    backend: Option<Ipv4Addr>,
) {
    if let Some(addr) = backend {
        let b = BackendV4::new(addr.octets(), TARGET, proto);
        write(dp, Op::PutBackend { id, backend: b });
        write(dp, Op::PutSlot { key: SlotKey { service_id: id, slot: 0 }, backend_id: id });
    }
    let value = ServiceValue {
        service_id: id,
        backend_count: u32::from(backend.is_some()),
        flags: SVC_F_EXTERNAL | flags,
        ..Default::default()
    };
    write(dp, Op::PutService { key: ServiceKeyV4::new(NODE_IP.octets(), port, proto), value });
}

fn nat_config(node_ip: Ipv4Addr) -> NatConfig {
    NatConfig {
        node_ip: node_ip.octets(),
        port_min: PORT_MIN,
        port_max: PORT_MIN + PORTS - 1,
        pods_addr: [10, 244, 0, 0],
        pods_len: 16,
        ..Default::default()
    }
}

impl Fx {
    fn new() -> Self {
        let ns = Scratch::new("xdp");
        let (m0, m1) = (mac(EXT0_MAC), mac([0x02, 0, 0, 0, 0x0e, 0x10]));
        for cmd in [
            format!("link add ext0 address {m0} type veth peer name ext0p"),
            format!("link add ext1 address {m1} type veth peer name ext1p"),
            "link set ext0 up".into(),
            "link set ext0p up".into(),
            "link set ext1 up".into(),
            "link set ext1p up".into(),
            format!("addr add {NODE_IP}/24 dev ext0"),
            "addr add 203.0.113.1/24 dev ext1".into(),
            "route add 198.51.100.0/24 via 192.0.2.254 dev ext0".into(),
            "route add 10.244.1.0/24 via 192.0.2.2 dev ext0".into(),
            "route add 10.244.3.0/24 via 192.0.2.3 dev ext0".into(),
            "route add 10.244.2.0/24 via 203.0.113.2 dev ext1".into(),
            format!("neigh replace 192.0.2.254 lladdr {} dev ext0 nud permanent", mac(ROUTER_MAC)),
            format!("neigh replace 192.0.2.2 lladdr {} dev ext0 nud permanent", mac(NODE2_MAC)),
            "neigh replace 203.0.113.2 lladdr 02:00:00:00:01:02 dev ext1 nud permanent".into(),
            format!("neigh replace {} lladdr 02:00:00:00:01:32 dev ext1 nud permanent", ASYM.0),
        ] {
            ns.ip(&cmd);
        }
        ns.sysctls(&[("net.ipv4.ip_forward", "1")]);
        let ext0 = ns.ifindex("ext0");

        let mut dp =
            Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
        dp.maps()
            .nat_config
            .set(0, nat_config(NODE_IP), 0)
            .unwrap_or_else(|e| panic!("NAT_CONFIG: {e}"));
        frontend(&mut dp, 1, TCP_REMOTE, IPPROTO_TCP, 0, Some(REMOTE));
        frontend(&mut dp, 2, UDP_REMOTE, IPPROTO_UDP, 0, Some(REMOTE));
        frontend(&mut dp, 3, TCP_EXT1, IPPROTO_TCP, 0, Some(BEHIND_EXT1));
        frontend(&mut dp, 4, TCP_LOCAL_EXT1, IPPROTO_TCP, SVC_F_ETP_LOCAL, Some(BEHIND_EXT1));
        frontend(&mut dp, 5, TCP_LOCAL_EXT0, IPPROTO_TCP, SVC_F_ETP_LOCAL, Some(REMOTE));
        frontend(&mut dp, 6, TCP_NO_NEIGH, IPPROTO_TCP, 0, Some(NO_NEIGH));
        frontend(&mut dp, 7, TCP_EMPTY, IPPROTO_TCP, 0, None);
        frontend(&mut dp, 8, TCP_EMPTY_DROP, IPPROTO_TCP, SVC_F_DROP_EMPTY, None);
        frontend(&mut dp, 9, TCP_RANGES, IPPROTO_TCP, SVC_F_SOURCE_RANGES, Some(BEHIND_EXT1));
        frontend(&mut dp, 10, UDP_EXT1, IPPROTO_UDP, 0, Some(BEHIND_EXT1));
        // A hostNetwork endpoint: the node itself.
        frontend(&mut dp, 11, TCP_HOST_BACKEND, IPPROTO_TCP, 0, Some(NODE_IP));
        // 198.51.100.0/25 may reach frontend 9; 198.51.100.200 may not.
        let key = Key::new(SourceRangeV4::prefix_len(25), SourceRangeV4::new(9, [198, 51, 100, 0]));
        let ranges = &mut dp.maps().source_ranges;
        ranges.insert(&key, 1, 0).unwrap_or_else(|e| panic!("SOURCE_RANGES_V4: {e}"));
        Self { dp, ns, ext0 }
    }

    /// Runs `xdp_netdev` on `frame` arriving on ext0; asserts the action and that exactly
    /// `reason` was counted once under XDP. Returns the frame as it left.
    fn expect(&self, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
        let prog = self.dp.xdp_program();
        let (out, moved): (Run, _) =
            counted(&self.dp, || self.ns.run(|| xdp_once(prog, frame, self.ext0)));
        assert_eq!(moved, [((Hook::Xdp, reason), 1)], "counters, expecting {}", reason.name());
        assert_eq!(out.action, action, "XDP action, expecting {}", reason.name());
        out.frame
    }

    fn untouched(&self, frame: &[u8], reason: Reason) {
        assert_eq!(self.expect(frame, XDP_PASS, reason), frame, "left untouched for tc");
    }

    fn ct(
        &mut self,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        proto: u8,
        dir: u8,
    ) -> Option<nodeplane_common::maps::CtValueV4> {
        self.dp.maps().ct.get(&key(src, dst, proto, dir), 0).ok()
    }

    fn nat(
        &mut self,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        proto: u8,
        dir: u8,
    ) -> Option<nodeplane_common::nat::NatValueV4> {
        self.dp.maps().nat.get(&key(src, dst, proto, dir), 0).ok()
    }

    fn ct_len(&mut self) -> usize {
        self.dp.maps().ct.keys().count()
    }
}

fn key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr: src.0.octets(),
        daddr: dst.0.octets(),
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

fn macs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    (frame[0..6].try_into().unwrap(), frame[6..12].try_into().unwrap())
}

fn to_node(proto: u8, src: (Ipv4Addr, u16), port: u16, flags: u8) -> Frame {
    if proto == IPPROTO_TCP {
        Frame::tcp(src, (NODE_IP, port), flags)
    } else {
        Frame::udp(src, (NODE_IP, port))
    }
}

#[test]
fn what_xdp_does_not_translate_is_passed_untouched() {
    let mut fx = Fx::new();
    let mut arp = Frame::tcp(CLIENT, (NODE_IP, TCP_REMOTE), TCP_SYN).build();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    fx.untouched(&arp, Reason::PassNotService);
    // Two NOPs, then two bytes that a parser ignoring the IHL would read as the
    // destination port: the NodePort frontend's.
    let mut options = Frame::udp(CLIENT, (NODE_IP, UDP_REMOTE));
    let [hi, lo] = UDP_REMOTE.to_be_bytes();
    options.ip_options = vec![1, 1, hi, lo];
    fx.untouched(&options.build(), Reason::PassNotService);
    for frag_off in [0x2000, 0x0010] {
        let mut frag = Frame::tcp(CLIENT, (NODE_IP, TCP_REMOTE), TCP_SYN);
        frag.frag_off = frag_off;
        fx.untouched(&frag.build(), Reason::PassNotService);
    }
    fx.untouched(&Frame::icmp_echo(CLIENT.0, NODE_IP, 7, 1).build(), Reason::PassNotService);
    // Not a frontend, not a reply of an SNATed flow.
    fx.untouched(&Frame::tcp(CLIENT, (NODE_IP, 22), TCP_SYN).build(), Reason::PassNotService);
    assert_eq!(fx.ct_len(), 0, "no conntrack entry for what XDP passed");
}

#[test]
fn source_ranges_drop_clients_outside_them() {
    let mut fx = Fx::new();
    let denied = Frame::tcp(STRANGER, (NODE_IP, TCP_RANGES), TCP_SYN).build();
    assert_eq!(fx.expect(&denied, XDP_DROP, Reason::DropSourceRange), denied);
    assert!(fx.ct(STRANGER, (NODE_IP, TCP_RANGES), IPPROTO_TCP, CT_DIR_ORIGINAL).is_none());
    // Inside the range: not dropped (its backend is behind ext1: DNAT, then the stack).
    let allowed = Frame::tcp(CLIENT, (NODE_IP, TCP_RANGES), TCP_SYN).build();
    let out = View::parse_checked(&fx.expect(&allowed, XDP_PASS, Reason::NatNew));
    assert_eq!((out.src, out.dst), (CLIENT, (BEHIND_EXT1, TARGET)));
}

/// A NodePort flow to a backend on another node, both ways, for `proto`; the UDP one
/// without checksums when `zero_csum`.
fn nodeport_round_trip(fx: &mut Fx, proto: u8, port: u16, zero_csum: bool) {
    let backend = (REMOTE, TARGET);
    let mut syn = to_node(proto, CLIENT, port, TCP_SYN);
    syn.udp_zero_csum = zero_csum;
    let out = fx.expect(&syn.build(), XDP_TX, Reason::SnatNew);
    assert_eq!(macs(&out), (NODE2_MAC, EXT0_MAC), "MACs: to the next hop, from ext0");
    let view = View::parse_checked(&out);
    assert_eq!(view.dst, backend, "DNAT to the backend");
    let (src, nat_port) = view.src;
    assert_eq!(src, NODE_IP, "SNAT to the node IP");
    assert!((PORT_MIN..PORT_MIN + PORTS).contains(&nat_port), "port {nat_port} from the range");
    assert_eq!(view.l4_csum == 0, zero_csum, "UDP checksum 0 stays 0, others are not 0");
    assert_eq!(view.payload, b"ping");

    let orig = fx.ct(CLIENT, (NODE_IP, port), proto, CT_DIR_ORIGINAL).expect("ORIGINAL entry");
    assert_eq!((orig.nat_addr, orig.nat_port), (REMOTE.octets(), TARGET.to_be_bytes()));
    assert_eq!(orig.flags, CT_F_EXTERNAL);
    let reply = fx.ct(backend, CLIENT, proto, CT_DIR_REPLY).expect("REPLY entry");
    assert_eq!((reply.nat_addr, reply.nat_port), (NODE_IP.octets(), port.to_be_bytes()));
    let nat = (NODE_IP, nat_port);
    let out_e = fx.nat(CLIENT, backend, proto, NAT_DIR_OUT).expect("NAT OUT entry");
    assert_eq!((out_e.addr, out_e.port), (NODE_IP.octets(), nat_port.to_be_bytes()));
    assert_eq!(out_e.flags, NAT_F_NODEPORT);
    let in_e = fx.nat(backend, nat, proto, NAT_DIR_IN).expect("NAT IN entry");
    assert_eq!((in_e.addr, in_e.port), (CLIENT.0.octets(), CLIENT.1.to_be_bytes()));
    assert_eq!(in_e.flags, NAT_F_NODEPORT);

    // The next packet: the same backend and port.
    let mut ack = to_node(proto, CLIENT, port, TCP_ACK);
    ack.udp_zero_csum = zero_csum;
    let again = View::parse_checked(&fx.expect(&ack.build(), XDP_TX, Reason::Snat));
    assert_eq!((again.src, again.dst), (nat, backend), "established: same translation");

    // The backend's reply to node_ip:nat_port goes straight back to the client.
    let mut back = if proto == IPPROTO_TCP {
        Frame::tcp(backend, nat, TCP_SYN | TCP_ACK)
    } else {
        Frame::udp(backend, nat)
    };
    back.udp_zero_csum = zero_csum;
    let out = fx.expect(&back.build(), XDP_TX, Reason::RevSnat);
    assert_eq!(macs(&out), (ROUTER_MAC, EXT0_MAC), "MACs: to the clients' router, from ext0");
    let view = View::parse_checked(&out);
    assert_eq!((view.src, view.dst), ((NODE_IP, port), CLIENT), "from the frontend to the client");
    assert_eq!(view.l4_csum == 0, zero_csum);
}

#[test]
fn a_nodeport_flow_to_another_node_is_translated_and_sent_back_out_both_ways() {
    let mut fx = Fx::new();
    nodeport_round_trip(&mut fx, IPPROTO_TCP, TCP_REMOTE, false);
    nodeport_round_trip(&mut fx, IPPROTO_UDP, UDP_REMOTE, false);
}

#[test]
fn udp_without_checksum_keeps_none_both_ways() {
    let mut fx = Fx::new();
    nodeport_round_trip(&mut fx, IPPROTO_UDP, UDP_REMOTE, true);
}

#[test]
fn local_traffic_policy_or_another_device_is_dnat_only() {
    let mut fx = Fx::new();
    for port in [TCP_EXT1, TCP_LOCAL_EXT1] {
        let syn = Frame::tcp(CLIENT, (NODE_IP, port), TCP_SYN).build();
        let out = fx.expect(&syn, XDP_PASS, Reason::NatNew);
        assert_eq!(&out[..12], &syn[..12], "MACs untouched: the stack forwards it");
        let view = View::parse_checked(&out);
        assert_eq!((view.src, view.dst), (CLIENT, (BEHIND_EXT1, TARGET)), "DNAT only, port {port}");
        assert!(fx.ct(CLIENT, (NODE_IP, port), IPPROTO_TCP, CT_DIR_ORIGINAL).is_some());
        assert!(fx.nat(CLIENT, (BEHIND_EXT1, TARGET), IPPROTO_TCP, NAT_DIR_OUT).is_none());
    }
    // The node itself as the backend: no forwarding route (a local one), tc does it all.
    let syn = Frame::tcp(CLIENT, (NODE_IP, TCP_HOST_BACKEND), TCP_SYN).build();
    fx.untouched(&syn, Reason::PassNotService);
    // Local, but the backend routes back out of ext0: XDP never SNATs a Local flow, and
    // leaves it all to tc.
    let syn = Frame::tcp(CLIENT, (NODE_IP, TCP_LOCAL_EXT0), TCP_SYN).build();
    fx.untouched(&syn, Reason::PassNotService);
    assert!(fx.nat(CLIENT, (REMOTE, TARGET), IPPROTO_TCP, NAT_DIR_OUT).is_none());
}

#[test]
fn a_next_hop_without_neighbour_is_left_to_tc() {
    let mut fx = Fx::new();
    let syn = Frame::tcp(CLIENT, (NODE_IP, TCP_NO_NEIGH), TCP_SYN).build();
    fx.untouched(&syn, Reason::PassNotService);
    assert_eq!(fx.ct_len(), 0, "no conntrack entry: tc creates the flow");
    assert_eq!(fx.dp.maps().nat.keys().count(), 0, "no port claimed");
}

#[test]
fn a_frontend_without_backends_is_left_to_tc_or_dropped() {
    let mut fx = Fx::new();
    let syn = Frame::tcp(CLIENT, (NODE_IP, TCP_EMPTY), TCP_SYN).build();
    // Passed for tc to answer (and count as no-backends there): a pass here.
    fx.untouched(&syn, Reason::PassNotService);
    assert_eq!(fx.ct_len(), 0, "no conntrack entry");
    let syn = Frame::tcp(CLIENT, (NODE_IP, TCP_EMPTY_DROP), TCP_SYN).build();
    assert_eq!(fx.expect(&syn, XDP_DROP, Reason::DropNoBackends), syn);
}

/// RFC 768: a UDP checksum that computes to 0 is sent as all ones (0 means "none"). The
/// payload is chosen so that the translated datagram's checksum is exactly that case.
#[test]
fn a_udp_checksum_that_becomes_zero_is_sent_as_all_ones() {
    let fx = Fx::new();
    let (to, payload_at) = ((BEHIND_EXT1, TARGET), ETH_HLEN + 20 + 8);
    // The translated datagram with the last two payload bytes (and the checksum) zero.
    let mut after = Frame::udp(CLIENT, to);
    after.payload = vec![b'p', b'i', 0, 0];
    after.udp_zero_csum = true;
    let built = after.build();
    let partial =
        !csum::l4_ipv4(CLIENT.0.octets(), to.0.octets(), IPPROTO_UDP, &built[ETH_HLEN + 20..]);
    // Those two bytes make its ones'-complement sum 0xffff: checksum 0, sent as 0xffff.
    let word = 0xffff - partial;
    let mut before = Frame::udp(CLIENT, (NODE_IP, UDP_EXT1));
    before.payload = [&b"pi"[..], &word.to_be_bytes()].concat();
    let frame = before.build();
    let out = fx.expect(&frame, XDP_PASS, Reason::NatNew);
    assert_eq!(&out[payload_at..], &frame[payload_at..], "payload untouched");
    let view = View::parse_checked(&out);
    assert_eq!(view.dst, to, "DNAT");
    assert_eq!(view.l4_csum, 0xffff, "a computed 0 is sent as 0xffff, never as 0");
}

#[test]
fn a_reply_whose_client_is_routed_through_another_device_is_left_to_tc() {
    let fx = Fx::new();
    let backend = (REMOTE, TARGET);
    let syn = Frame::tcp(ASYM, (NODE_IP, TCP_REMOTE), TCP_SYN).build();
    let nat_port = View::parse_checked(&fx.expect(&syn, XDP_TX, Reason::SnatNew)).src.1;
    // XDP_TX can only send it back out of ext0: `from_netdev` and `to_netdev` do it.
    let reply = Frame::tcp(backend, (NODE_IP, nat_port), TCP_SYN | TCP_ACK).build();
    fx.untouched(&reply, Reason::PassNotService);
}

#[test]
fn a_nodeport_flow_is_dropped_without_a_node_ip_or_a_free_port() {
    let mut fx = Fx::new();
    // All the range's ports towards the backend taken by four clients' flows.
    for i in 0..PORTS {
        let syn = Frame::tcp((CLIENT.0, 50000 + i), (NODE_IP, TCP_REMOTE), TCP_SYN).build();
        fx.expect(&syn, XDP_TX, Reason::SnatNew);
    }
    let fifth = (CLIENT.0, 50000 + PORTS);
    let syn = Frame::tcp(fifth, (NODE_IP, TCP_REMOTE), TCP_SYN).build();
    assert_eq!(fx.expect(&syn, XDP_DROP, Reason::DropNatExhausted), syn);
    assert!(fx.ct(fifth, (NODE_IP, TCP_REMOTE), IPPROTO_TCP, CT_DIR_ORIGINAL).is_none());

    let cfg = nat_config(Ipv4Addr::UNSPECIFIED);
    fx.dp.maps().nat_config.set(0, cfg, 0).unwrap_or_else(|e| panic!("NAT_CONFIG: {e}"));
    let other = (Ipv4Addr::new(198, 51, 100, 8), 50000);
    let syn = Frame::tcp(other, (NODE_IP, TCP_REMOTE), TCP_SYN).build();
    assert_eq!(fx.expect(&syn, XDP_DROP, Reason::DropNoNodeIp), syn);
    assert!(fx.ct(other, (NODE_IP, TCP_REMOTE), IPPROTO_TCP, CT_DIR_ORIGINAL).is_none());
}

/// XDP_TX forwards the packet as a router would, so it decrements the TTL (RFC 1812
/// 5.3.1) as the kernel does on the tc path; a packet whose TTL would expire is left to
/// the stack, which answers with an ICMP time exceeded. Both directions.
#[test]
fn xdp_tx_decrements_the_ttl_and_leaves_an_expiring_packet_to_the_stack() {
    let fx = Fx::new();
    let ttl = |frame: &[u8]| frame[ETH_HLEN + 8];
    let with_ttl = |mut frame: Vec<u8>, ttl: u8| {
        frame[ETH_HLEN + 8] = ttl;
        frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
        let c = csum::ipv4_header(&frame[ETH_HLEN..ETH_HLEN + 20]);
        frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
        frame
    };
    let syn = Frame::tcp(CLIENT, (NODE_IP, TCP_REMOTE), TCP_SYN).build();
    let expiring = with_ttl(syn.clone(), 1);
    fx.untouched(&expiring, Reason::PassNotService);
    let out = fx.expect(&syn, XDP_TX, Reason::SnatNew);
    assert_eq!(ttl(&out), ttl(&syn) - 1, "forwarded: TTL decremented");
    let nat = View::parse_checked(&out).src;

    let reply = Frame::tcp((REMOTE, TARGET), nat, TCP_SYN | TCP_ACK).build();
    fx.untouched(&with_ttl(reply.clone(), 1), Reason::PassNotService);
    let out = fx.expect(&reply, XDP_TX, Reason::RevSnat);
    assert_eq!(ttl(&out), ttl(&reply) - 1, "forwarded: TTL decremented");
    View::parse_checked(&out);
}
