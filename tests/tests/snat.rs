//! SNAT on the real `to_netdev` / `from_netdev` with BPF_PROG_TEST_RUN: pods' masquerade,
//! NodePort flows marked `MARK_SNAT`, and the eBPF port allocator's edge cases
//! (per-destination uniqueness, exhaustion, ports of live flows never handed out twice, an
//! evicted IN entry, sockets of the node). Checksums are verified from scratch
//! (`View::parse_checked`). Every run happens in a scratch netns whose `lo` carries the
//! node IP, so the allocator's socket lookups see only this test's sockets. Needs root
//! (run with `cargo xtask test`).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, TcpListener, UdpSocket},
};

use aya::maps::lpm_trie::Key;
use nodeplane_agent::{
    datapath::Datapath,
    sync::{MapWriter, Op},
};
use nodeplane_common::{
    maps::{
        BackendV4, IPPROTO_TCP, IPPROTO_UDP, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES,
        ServiceKeyV4, ServiceValue, SlotKey, names,
    },
    nat::{
        MARK_SNAT, NAT_CFG_MASQUERADE, NAT_DIR_IN, NAT_DIR_OUT, NAT_F_NODEPORT, NatConfig,
        NatKeyV4, NatValueV4, SourceRangeV4,
    },
    reason::{Hook, Reason},
};
use nodeplane_tests::{
    ns_run::{Run, Scratch, counted, tc_once},
    packet::{Frame, TCP_ACK, TCP_SYN, View},
    run::{TC_ACT_OK, TC_ACT_SHOT},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A pod of the masqueraded range (10.244.0.0/16).
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Destinations outside the cluster.
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PEER2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// A destination listed in `NO_MASQ_V4` (172.16.0.0/12).
const NO_MASQ_DST: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 1);
/// A client outside the cluster (a NodePort flow's source).
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// A backend on another node (inside `NO_MASQ_V4`'s 10.244.0.0/16: never masqueraded).
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const PORT_MIN: u16 = 61_000;

/// A loaded datapath with a NAT configuration, and the netns its runs happen in.
struct Fx {
    dp: Datapath,
    ns: Scratch,
}

fn masquerade(node_ip: Ipv4Addr, ports: u16) -> NatConfig {
    NatConfig {
        node_ip: node_ip.octets(),
        port_min: PORT_MIN,
        port_max: PORT_MIN + ports - 1,
        flags: NAT_CFG_MASQUERADE,
        pods_addr: [10, 244, 0, 0],
        pods_len: 16,
        ..Default::default()
    }
}

impl Fx {
    fn new(cfg: NatConfig) -> Self {
        let mut dp =
            Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
        let maps = dp.maps();
        maps.nat_config.set(0, cfg, 0).unwrap_or_else(|e| panic!("NAT_CONFIG: {e}"));
        for (addr, len) in [([172, 16, 0, 0], 12), ([10, 244, 0, 0], 16)] {
            let key = Key::new(len, addr);
            maps.no_masq.insert(&key, 1, 0).unwrap_or_else(|e| panic!("NO_MASQ_V4: {e}"));
        }
        let ns = Scratch::new("snat");
        ns.ip(&format!("addr add {NODE_IP}/32 dev lo"));
        Self { dp, ns }
    }

    /// Runs `program` on `frame` with `mark` inside the netns; asserts the action and that
    /// exactly `reason` was counted once under `hook`. Returns the frame as it left.
    fn expect(
        &self,
        program: &str,
        frame: &[u8],
        mark: u32,
        action: u32,
        reason: Reason,
    ) -> Vec<u8> {
        self.expect_run(program, frame, mark, action, reason).frame
    }

    /// [`Fx::expect`], returning the whole run (with the skb's mark after it).
    fn expect_run(
        &self,
        program: &str,
        frame: &[u8],
        mark: u32,
        action: u32,
        reason: Reason,
    ) -> Run {
        let hook = if program == names::PROG_TO_NETDEV { Hook::ToNetdev } else { Hook::FromNetdev };
        let prog = self.dp.program_named(program);
        let (out, moved): (Run, _) =
            counted(&self.dp, || self.ns.run(|| tc_once(prog, frame, mark)));
        assert_eq!(moved, [((hook, reason), 1)], "counters, expecting {}", reason.name());
        assert_eq!(out.action, action, "tc action, expecting {}", reason.name());
        out
    }

    /// `to_netdev` on a frame expected to be SNATed to the node IP: the port it got.
    fn snat(&self, frame: &[u8], mark: u32, reason: Reason) -> u16 {
        let sent = View::parse_checked(frame);
        let out = View::parse_checked(&self.expect(
            names::PROG_TO_NETDEV,
            frame,
            mark,
            TC_ACT_OK,
            reason,
        ));
        assert_eq!(out.src.0, NODE_IP, "source is the node IP");
        assert_eq!(out.dst, sent.dst, "destination untouched");
        assert_eq!(out.payload, sent.payload);
        out.src.1
    }

    /// `to_netdev` on a frame expected to be dropped as `reason`, untouched.
    fn dropped(&self, frame: &[u8], mark: u32, reason: Reason) {
        let out = self.expect(names::PROG_TO_NETDEV, frame, mark, TC_ACT_SHOT, reason);
        assert_eq!(out, frame, "dropped untranslated");
    }

    /// `to_netdev` on a frame expected to pass untranslated.
    fn untouched(&self, frame: &[u8], mark: u32) {
        let out =
            self.expect(names::PROG_TO_NETDEV, frame, mark, TC_ACT_OK, Reason::PassNotService);
        assert_eq!(out, frame, "untouched");
    }

    fn nat(
        &mut self,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        proto: u8,
        dir: u8,
    ) -> Option<NatValueV4> {
        self.dp.maps().nat.get(&nat_key(src, dst, proto, dir), 0).ok()
    }

    fn nat_len(&mut self) -> usize {
        self.dp.maps().nat.keys().count()
    }
}

fn nat_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, dir: u8) -> NatKeyV4 {
    NatKeyV4 {
        saddr: src.0.octets(),
        daddr: dst.0.octets(),
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

fn frame(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    if proto == IPPROTO_TCP { Frame::tcp(src, dst, flags) } else { Frame::udp(src, dst) }.build()
}

fn in_range(port: u16, ports: u16) -> bool {
    (PORT_MIN..PORT_MIN + ports).contains(&port)
}

#[test]
fn masquerade_snats_a_pod_flow_keeps_its_port_and_reverses_the_reply() {
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let mut fx = Fx::new(masquerade(NODE_IP, 4));
        let (pod, peer) = ((POD, 40000), (PEER, 80));
        let port = fx.snat(&frame(proto, pod, peer, TCP_SYN), 0, Reason::SnatNew);
        assert!(in_range(port, 4), "port {port} outside 61000-61003");
        let nat = (NODE_IP, port);
        let out = fx.nat(pod, peer, proto, NAT_DIR_OUT).expect("OUT entry");
        assert_eq!((out.addr, out.port, out.flags), (NODE_IP.octets(), port.to_be_bytes(), 0));
        let inn = fx.nat(peer, nat, proto, NAT_DIR_IN).expect("IN entry");
        assert_eq!((inn.addr, inn.port, inn.flags), (POD.octets(), 40000u16.to_be_bytes(), 0));

        let again = fx.snat(&frame(proto, pod, peer, TCP_ACK), 0, Reason::Snat);
        assert_eq!(again, port, "the flow's next packet keeps its port");

        let reply = frame(proto, peer, nat, TCP_SYN | TCP_ACK);
        let out = fx.expect(names::PROG_FROM_NETDEV, &reply, 0, TC_ACT_OK, Reason::RevSnat);
        let out = View::parse_checked(&out);
        assert_eq!((out.src, out.dst), (peer, pod), "reply back to the pod");
        assert_eq!(fx.nat_len(), 2, "two entries per flow");
    }
}

#[test]
fn a_udp_packet_without_checksum_keeps_none() {
    let fx = Fx::new(masquerade(NODE_IP, 4));
    let mut f = Frame::udp((POD, 40000), (PEER, 53));
    f.udp_zero_csum = true;
    let out = fx.expect(names::PROG_TO_NETDEV, &f.build(), 0, TC_ACT_OK, Reason::SnatNew);
    let out = View::parse_checked(&out);
    assert_eq!(out.src.0, NODE_IP);
    assert_eq!(out.l4_csum, 0, "UDP checksum 0 (none) stays 0");

    let mut reply = Frame::udp((PEER, 53), out.src);
    reply.udp_zero_csum = true;
    let back = fx.expect(names::PROG_FROM_NETDEV, &reply.build(), 0, TC_ACT_OK, Reason::RevSnat);
    let back = View::parse_checked(&back);
    assert_eq!(back.dst, (POD, 40000));
    assert_eq!(back.l4_csum, 0, "the reply's checksum 0 stays 0 too");
}

#[test]
fn no_masq_destinations_other_sources_and_an_unknown_node_ip_are_left_alone() {
    let mut fx = Fx::new(masquerade(NODE_IP, 4));
    fx.untouched(&frame(IPPROTO_TCP, (POD, 40000), (NO_MASQ_DST, 80), TCP_SYN), 0);
    fx.untouched(&frame(IPPROTO_TCP, (POD, 40000), (REMOTE_BACKEND, 80), TCP_SYN), 0);
    let node_host = Ipv4Addr::new(192, 168, 5, 5);
    fx.untouched(&frame(IPPROTO_TCP, (node_host, 40000), (PEER, 80), TCP_SYN), 0);
    fx.untouched(&frame(IPPROTO_UDP, (CLIENT, 40000), (PEER, 53), 0), 0);
    // The node's own address as source is never SNATed again.
    fx.untouched(&frame(IPPROTO_TCP, (NODE_IP, 40000), (PEER, 80), TCP_SYN), MARK_SNAT);
    assert_eq!(fx.nat_len(), 0, "no NAT entry for untouched packets");

    // Masquerade off: a pod's flow leaves as it is.
    let off = NatConfig { flags: 0, ..masquerade(NODE_IP, 4) };
    let mut fx = Fx::new(off);
    fx.untouched(&frame(IPPROTO_TCP, (POD, 40000), (PEER, 80), TCP_SYN), 0);
    assert_eq!(fx.nat_len(), 0);

    // No node IP yet: masquerade does nothing, a marked NodePort packet is dropped.
    let mut fx = Fx::new(masquerade(Ipv4Addr::UNSPECIFIED, 4));
    fx.untouched(&frame(IPPROTO_TCP, (POD, 40000), (PEER, 80), TCP_SYN), 0);
    let marked = frame(IPPROTO_TCP, (CLIENT, 50000), (REMOTE_BACKEND, 8080), TCP_SYN);
    fx.dropped(&marked, MARK_SNAT, Reason::DropNoNodeIp);
    assert_eq!(fx.nat_len(), 0);
}

#[test]
fn ports_are_unique_per_destination_and_shared_across_destinations() {
    const N: u16 = 4;
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let mut fx = Fx::new(masquerade(NODE_IP, N));
        let peer = (PEER, 80);
        let ports: BTreeSet<u16> = (0..N)
            .map(|i| fx.snat(&frame(proto, (POD, 40000 + i), peer, TCP_SYN), 0, Reason::SnatNew))
            .collect();
        let all: BTreeSet<u16> = (PORT_MIN..PORT_MIN + N).collect();
        assert_eq!(ports, all, "{N} flows to one peer take the {N} ports of the range");

        let extra = frame(proto, (POD, 40000 + N), peer, TCP_SYN);
        fx.dropped(&extra, 0, Reason::DropNatExhausted);
        assert!(fx.nat((POD, 40000 + N), peer, proto, NAT_DIR_OUT).is_none());

        // Another peer port or another peer: the same ports are free again there.
        for other in [(PEER, 443), (PEER2, 80)] {
            let f = frame(proto, (POD, 40000 + N), other, TCP_SYN);
            let port = fx.snat(&f, 0, Reason::SnatNew);
            assert!(in_range(port, N), "port {port}");
        }
        assert_eq!(fx.nat_len(), 2 * (N as usize + 2));
    }
}

#[test]
fn a_port_held_by_a_live_flow_is_never_handed_out_again_even_after_an_eviction() {
    let mut fx = Fx::new(masquerade(NODE_IP, 3));
    let peer = (PEER, 80);
    let flow = |i: u16, flags: u8| frame(IPPROTO_TCP, (POD, 40000 + i), peer, flags);
    // Flows A, B and D hold the range's three ports.
    let a = fx.snat(&flow(0, TCP_SYN), 0, Reason::SnatNew);
    let b = fx.snat(&flow(1, TCP_SYN), 0, Reason::SnatNew);
    let d = fx.snat(&flow(3, TCP_SYN), 0, Reason::SnatNew);
    assert_eq!(BTreeSet::from([a, b, d]).len(), 3, "three flows, three ports: {a} {b} {d}");
    // C finds none free, again and again (the allocator probes every port each time).
    for _ in 0..8 {
        fx.dropped(&flow(2, TCP_SYN), 0, Reason::DropNatExhausted);
    }
    assert_eq!(fx.snat(&flow(0, TCP_ACK), 0, Reason::Snat), a, "A keeps its port");

    // A's IN entry goes (an LRU eviction): its port is free for C.
    let a_in = nat_key(peer, (NODE_IP, a), IPPROTO_TCP, NAT_DIR_IN);
    fx.dp.maps().nat.remove(&a_in).unwrap_or_else(|e| panic!("removing A's IN entry: {e}"));
    let c = fx.snat(&flow(2, TCP_SYN), 0, Reason::SnatNew);
    assert_eq!(c, a, "C takes the only free port, A's old one");

    // A's OUT entry still names that port, but the IN entry is C's now: A must not use it.
    // Every other port is held, so A finds none.
    fx.dropped(&flow(0, TCP_ACK), 0, Reason::DropNatExhausted);
    // D ends: A gets D's port, never C's.
    let d_in = nat_key(peer, (NODE_IP, d), IPPROTO_TCP, NAT_DIR_IN);
    fx.dp.maps().nat.remove(&d_in).unwrap_or_else(|e| panic!("removing D's IN entry: {e}"));
    let a2 = fx.snat(&flow(0, TCP_ACK), 0, Reason::SnatNew);
    assert_eq!(a2, d, "A moves to the free port");
    assert_ne!(a2, c, "A and C never share a port towards the same peer");
    let a_out = fx.nat((POD, 40000), peer, IPPROTO_TCP, NAT_DIR_OUT).expect("A's OUT entry");
    assert_eq!(a_out.port, a2.to_be_bytes(), "A's OUT entry follows");
    let c_in = fx.nat(peer, (NODE_IP, c), IPPROTO_TCP, NAT_DIR_IN).expect("C's IN entry");
    assert_eq!(c_in.port, 40002u16.to_be_bytes(), "the port's IN entry is still C's");
    // Replies reach their own flows.
    for (port, pod_port) in [(a2, 40000), (c, 40002), (b, 40001)] {
        let reply = frame(IPPROTO_TCP, peer, (NODE_IP, port), TCP_ACK);
        let out = fx.expect(names::PROG_FROM_NETDEV, &reply, 0, TC_ACT_OK, Reason::RevSnat);
        assert_eq!(View::parse_checked(&out).dst, (POD, pod_port), "reply to port {port}");
    }
}

#[test]
fn ports_a_socket_of_the_node_would_receive_are_skipped() {
    // Sockets bound on node_ip:61000 inside the netns.
    let fx = Fx::new(masquerade(NODE_IP, 1));
    let (_tcp, _udp) = fx.ns.run(|| {
        let tcp = TcpListener::bind((NODE_IP, PORT_MIN)).expect("TCP listener on the node IP");
        let udp = UdpSocket::bind((NODE_IP, PORT_MIN)).expect("UDP socket on the node IP");
        (tcp, udp)
    });
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        fx.dropped(&frame(proto, (POD, 40000), (PEER, 80), TCP_SYN), 0, Reason::DropNatExhausted);
    }
    drop(fx);

    let fx = Fx::new(masquerade(NODE_IP, 2));
    let (_tcp, _udp) = fx.ns.run(|| {
        let tcp = TcpListener::bind((NODE_IP, PORT_MIN)).expect("TCP listener on the node IP");
        let udp = UdpSocket::bind((NODE_IP, PORT_MIN)).expect("UDP socket on the node IP");
        (tcp, udp)
    });
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        // Several flows, so a random start at either port is exercised.
        for i in 0..4 {
            let f =
                frame(proto, (POD, 40000 + i), (Ipv4Addr::new(198, 18, 1, i as u8), 80), TCP_SYN);
            assert_eq!(
                fx.snat(&f, 0, Reason::SnatNew),
                PORT_MIN + 1,
                "the socket's port is skipped"
            );
        }
    }
}

#[test]
fn mark_snat_snats_a_nodeport_flow_and_its_reply_comes_back() {
    let mut fx = Fx::new(masquerade(NODE_IP, 4));
    let (client, backend) = ((CLIENT, 50000), (REMOTE_BACKEND, 8080));
    // Without the mark: not a pod, not masqueraded.
    fx.untouched(&frame(IPPROTO_TCP, client, backend, TCP_SYN), 0);
    // With it (as `from_netdev` sets it after DNAT), other mark bits kept.
    let mark = MARK_SNAT | 0x4000;
    let port = fx.snat(&frame(IPPROTO_TCP, client, backend, TCP_SYN), mark, Reason::SnatNew);
    assert!(in_range(port, 4));
    let out = fx.nat(client, backend, IPPROTO_TCP, NAT_DIR_OUT).expect("OUT entry");
    assert_eq!(out.flags, NAT_F_NODEPORT, "OUT entry flagged NodePort");
    let inn = fx.nat(backend, (NODE_IP, port), IPPROTO_TCP, NAT_DIR_IN).expect("IN entry");
    assert_eq!((inn.addr, inn.port), (CLIENT.octets(), 50000u16.to_be_bytes()));
    assert_eq!(inn.flags, NAT_F_NODEPORT, "IN entry flagged NodePort");
    // Later packets of the flow (`from_netdev` marks each one) keep the port.
    assert_eq!(fx.snat(&frame(IPPROTO_TCP, client, backend, TCP_ACK), mark, Reason::Snat), port);

    let reply = frame(IPPROTO_TCP, backend, (NODE_IP, port), TCP_SYN | TCP_ACK);
    let out = fx.expect(names::PROG_FROM_NETDEV, &reply, 0, TC_ACT_OK, Reason::RevSnat);
    assert_eq!(View::parse_checked(&out).dst, client, "reply to the client");
}

/// The tc path of a NodePort flow to a backend on another node, as with XDP off:
/// `from_netdev` DNATs and marks, `to_netdev` SNATs because of the mark, the reply gets its
/// destination back in `from_netdev` and its source (the frontend) in `to_netdev`.
#[test]
fn a_nodeport_flow_through_tc_is_dnated_marked_snated_and_its_reply_restored() {
    let mut fx = Fx::new(masquerade(NODE_IP, 4));
    const CLUSTER: u16 = 30080;
    const LOCAL: u16 = 30081;
    const RANGES: u16 = 30082;
    for (id, port, flags) in
        [(1, CLUSTER, 0), (2, LOCAL, SVC_F_ETP_LOCAL), (3, RANGES, SVC_F_SOURCE_RANGES)]
    {
        let backend = BackendV4::new(REMOTE_BACKEND.octets(), 8080, IPPROTO_TCP);
        let ops = [
            Op::PutBackend { id, backend },
            Op::PutSlot { key: SlotKey { service_id: id, slot: 0 }, backend_id: id },
            Op::PutService {
                key: ServiceKeyV4::new(NODE_IP.octets(), port, IPPROTO_TCP),
                value: ServiceValue {
                    service_id: id,
                    backend_count: 1,
                    flags: SVC_F_EXTERNAL | flags,
                    ..Default::default()
                },
            },
        ];
        for op in ops {
            fx.dp.maps().apply(&op).unwrap_or_else(|e| panic!("writing fixture: {e}"));
        }
    }
    let (client, backend) = ((CLIENT, 50000), (REMOTE_BACKEND, 8080));
    let syn = frame(IPPROTO_TCP, client, (NODE_IP, CLUSTER), TCP_SYN);
    let run = fx.expect_run(names::PROG_FROM_NETDEV, &syn, 0, TC_ACT_OK, Reason::NatNew);
    assert_eq!(View::parse_checked(&run.frame).dst, backend, "DNAT at ingress");
    assert_eq!(run.mark, MARK_SNAT, "marked for SNAT at egress");
    let port = fx.snat(&run.frame, run.mark, Reason::SnatNew);
    assert!(in_range(port, 4));

    let reply = frame(IPPROTO_TCP, backend, (NODE_IP, port), TCP_SYN | TCP_ACK);
    let back = fx.expect(names::PROG_FROM_NETDEV, &reply, 0, TC_ACT_OK, Reason::RevSnat);
    assert_eq!(View::parse_checked(&back).dst, client, "destination: the client");
    let out = fx.expect(names::PROG_TO_NETDEV, &back, 0, TC_ACT_OK, Reason::RevNat);
    let out = View::parse_checked(&out);
    assert_eq!((out.src, out.dst), ((NODE_IP, CLUSTER), client), "source: the frontend");

    // externalTrafficPolicy: Local keeps the client's address: no mark.
    let syn = frame(IPPROTO_TCP, (CLIENT, 50001), (NODE_IP, LOCAL), TCP_SYN);
    let run = fx.expect_run(names::PROG_FROM_NETDEV, &syn, 0, TC_ACT_OK, Reason::NatNew);
    assert_eq!(View::parse_checked(&run.frame).dst, backend);
    assert_eq!(run.mark & MARK_SNAT, 0, "Local: not marked");

    // loadBalancerSourceRanges: only 203.0.113.0/24 may reach frontend 3.
    let key = Key::new(SourceRangeV4::prefix_len(24), SourceRangeV4::new(3, [203, 0, 113, 0]));
    fx.dp.maps().source_ranges.insert(&key, 1, 0).unwrap_or_else(|e| panic!("ranges: {e}"));
    let allowed = frame(IPPROTO_TCP, (CLIENT, 50002), (NODE_IP, RANGES), TCP_SYN);
    fx.expect(names::PROG_FROM_NETDEV, &allowed, 0, TC_ACT_OK, Reason::NatNew);
    let denied = frame(IPPROTO_TCP, (PEER, 50002), (NODE_IP, RANGES), TCP_SYN);
    let out = fx.expect(names::PROG_FROM_NETDEV, &denied, 0, TC_ACT_SHOT, Reason::DropSourceRange);
    assert_eq!(out, denied, "dropped untranslated");
}

/// A masqueraded TCP flow starts with the pod's SYN: a SYN-ACK (the pod answering a peer
/// that reached its address directly) or a stray segment without a mapping leaves as it
/// is, where MASQUERADE in iptables would not touch it either.
#[test]
fn only_a_pods_syn_starts_a_masqueraded_tcp_flow() {
    let mut fx = Fx::new(masquerade(NODE_IP, 4));
    let (pod, peer) = ((POD, 8080), (PEER, 51000));
    fx.untouched(&frame(IPPROTO_TCP, pod, peer, TCP_SYN | TCP_ACK), 0);
    fx.untouched(&frame(IPPROTO_TCP, pod, peer, TCP_ACK), 0);
    assert_eq!(fx.nat_len(), 0, "no mapping for segments of a flow the pod did not open");
    // A NodePort flow (MARK_SNAT) is SNATed whatever its flags: its SYN came through here.
    let port =
        fx.snat(&frame(IPPROTO_TCP, (CLIENT, 40000), peer, TCP_ACK), MARK_SNAT, Reason::SnatNew);
    assert!(in_range(port, 4));
}

/// A finished flow's port is reclaimed by the allocator itself, without waiting for the
/// agent's GC: a closed flow idle past the closing timeout, or one idle past its state's
/// lifetime; a live flow's port never is.
#[test]
fn the_allocator_reclaims_the_port_of_a_finished_flow() {
    use nodeplane_common::ct::{NSEC_PER_SEC, TcpState};
    let mut fx = Fx::new(masquerade(NODE_IP, 1));
    let peer = (PEER, 80);
    let flow = |i: u16, flags: u8| frame(IPPROTO_TCP, (POD, 40000 + i), peer, flags);
    let a = fx.snat(&flow(0, TCP_SYN), 0, Reason::SnatNew);
    fx.dropped(&flow(1, TCP_SYN), 0, Reason::DropNatExhausted);
    // Age A: closed in the client's direction 11 s ago, its IN entry as idle.
    let now = nodeplane_agent::occupancy::monotonic_ns();
    let age = |fx: &mut Fx, key: NatKeyV4, state: TcpState, idle_s: u64| {
        let mut v = fx.dp.maps().nat.get(&key, 0).expect("entry");
        v.state = state as u8;
        v.last_seen_ns = now - idle_s * NSEC_PER_SEC;
        fx.dp.maps().nat.insert(key, v, 0).expect("rewrite");
    };
    let a_out = nat_key((POD, 40000), peer, IPPROTO_TCP, NAT_DIR_OUT);
    let a_in = nat_key(peer, (NODE_IP, a), IPPROTO_TCP, NAT_DIR_IN);
    age(&mut fx, a_out, TcpState::Closing, 5);
    age(&mut fx, a_in, TcpState::Established, 5);
    fx.dropped(&flow(1, TCP_SYN), 0, Reason::DropNatExhausted);
    age(&mut fx, a_out, TcpState::Closing, 11);
    age(&mut fx, a_in, TcpState::Established, 11);
    let b = fx.snat(&flow(1, TCP_SYN), 0, Reason::SnatNew);
    assert_eq!(b, a, "B reclaims A's port once A is closed and idle past 10 s");
    let b_in = fx.nat(peer, (NODE_IP, b), IPPROTO_TCP, NAT_DIR_IN).expect("B's IN entry");
    assert_eq!(b_in.port, 40001u16.to_be_bytes());
    // A UDP flow idle past its 60 s lifetime gives its port up too.
    let udp = |i: u16| frame(IPPROTO_UDP, (POD, 50000 + i), (PEER, 53), 0);
    let u = fx.snat(&udp(0), 0, Reason::SnatNew);
    fx.dropped(&udp(1), 0, Reason::DropNatExhausted);
    age(&mut fx, nat_key((PEER, 53), (NODE_IP, u), IPPROTO_UDP, NAT_DIR_IN), TcpState::None, 61);
    assert_eq!(fx.snat(&udp(1), 0, Reason::SnatNew), u);
}
