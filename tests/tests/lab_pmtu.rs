//! Path MTU discovery through a Service, on two nodes: the first node's route to the
//! second node's pods gets a lower MTU (`mtu lock`, so forwarding honours it), a client on
//! the first node sends large datagrams (DF set: Linux's default `IP_PMTUDISC_WANT`) to the
//! Service, and the node's "fragmentation needed" about the DNATed datagram must reach the
//! client's socket quoting the Service address: the client's route to the VIP then carries
//! the lower MTU (`ip route get`). Without the rewrite the quote names the backend, the
//! client's UDP stack finds no socket for it and nothing is learnt.
//!
//! Placement (lab/examples/multinode.yaml): client and web-0 on lab-node, web-1 and web-2 on
//! lab-node1; flows to web-0 never cross the lower-MTU route, so the test tries new flows
//! (new source ports) until one lands on the second node.
//! Needs root and the binaries (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    thread,
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use nodeplane_agent::inspect::pinned::Pins;
use nodeplane_common::{
    maps::{Counter, names},
    reason::{Hook, Reason, counter_index},
};
use nodeplane_lab::{LabNode, netns};
use nodeplane_tests::multinode::MultiCluster;

const MULTINODE: &str = include_str!("../../lab/examples/multinode.yaml");
const CONVERGE: Duration = Duration::from_secs(20);
const PATH_MTU: u16 = 1300;
/// Larger than the path, smaller than the pod's own link (1500).
const DATAGRAM: usize = 1400;
/// Flows to try: each lands on a remote backend with probability 2/3.
const FLOWS: usize = 30;

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets counted under (`hook`, `reason`) in the node's pinned `COUNTERS`, over CPUs.
fn counted(node: &LabNode<'_>, hook: Hook, reason: Reason) -> u64 {
    let pins = Pins::open(&node.bpffs_dir()).unwrap_or_else(|e| panic!("the node's pins: {e}"));
    let path = pins.map_path(names::COUNTERS).unwrap_or_else(|e| panic!("COUNTERS pin: {e}"));
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("COUNTERS: {e}"));
    let counters: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(map).unwrap_or_else(|e| panic!("COUNTERS as a per-CPU array: {e}"));
    let per_cpu = counters
        .get(&counter_index(hook, reason), 0)
        .unwrap_or_else(|e| panic!("COUNTERS[{}]: {e}", reason.name()));
    per_cpu.iter().map(|c| c.packets).sum()
}

#[test]
fn frag_needed_about_a_service_flow_lowers_the_clients_path_mtu_to_the_vip() {
    let lab = MultiCluster::up(2, &[("multinode.yaml", MULTINODE)], &[]);
    lab.wait_ready(CONVERGE);
    let vip = lab.service_ip("demo", "web").unwrap_or_else(|e| panic!("{e:#}"));
    let (node0, node1) = (
        lab.node(0).unwrap_or_else(|e| panic!("{e:#}")),
        lab.node(1).unwrap_or_else(|e| panic!("{e:#}")),
    );
    let (cidr, via) = (node1.pod_cidr(), node1.ip().to_string());
    let mtu = PATH_MTU.to_string();
    ip(&[
        "-n",
        &node0.netns(),
        "route",
        "change",
        &cidr,
        "via",
        &via,
        "dev",
        "eth0",
        "mtu",
        "lock",
        &mtu,
    ]);

    let before = counted(&node0, Hook::ToPod, Reason::IcmpRevNat);
    let client = lab.pod_netns("demo", "client");
    let vip_s = vip.to_string();
    let route_to_vip = || ip(&["-n", &client, "route", "get", &vip_s]);
    assert!(!route_to_vip().contains("mtu"), "no PMTU known before: {}", route_to_vip());
    let mut learnt = None;
    for _ in 0..FLOWS {
        netns::run_in(&client, || {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(SocketAddrV4::new(vip, 53))?;
            s.send(&[0x5a; DATAGRAM]).map(drop)
        })
        .unwrap_or_else(|e| panic!("entering {client}: {e}"))
        .unwrap_or_else(|e| panic!("sending {DATAGRAM} bytes to {vip}:53: {e}"));
        thread::sleep(Duration::from_millis(100));
        let route = route_to_vip();
        if route.contains("mtu") {
            learnt = Some(route);
            break;
        }
    }
    let route = learnt.unwrap_or_else(|| {
        panic!("after {FLOWS} flows the client knows no path MTU to {vip}: {}", route_to_vip())
    });
    assert!(route.contains(&format!("mtu {PATH_MTU}")), "path MTU to the VIP: {route}");
    // The node generated the error itself: to_pod on the client's veth rewrote it.
    assert!(counted(&node0, Hook::ToPod, Reason::IcmpRevNat) > before, "icmp-rev-nat counted");
}
