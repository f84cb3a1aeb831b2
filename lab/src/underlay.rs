//! The underlay of a multi-node lab made real: the router's netns with its bridge, one
//! netns per node plugged into it, the external client and the internet (the picture is
//! in [`crate::topology`]). Pods are wired to their node by [`netns::create_pod`], as on a
//! single node.
//!
//! Like [`netns`], this is the `ip` commands a person would type, fed to `ip -n NS -batch -`.
use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::{
    naming::POD_GATEWAY,
    netns::{self, NetnsError},
    topology::{
        BRIDGE, EXTERNAL_LINK, INTERNET_LINK, Topology, external_ip, external_netns, internet_ip,
        internet_netns, internet_router_ip, node_netns, router_ip, underlay_netns,
    },
};

/// Routers forward, and packets may come back another way than they left (a pod's reply
/// from the internet arrives on the node's `eth0`, its request left through a veth).
const FORWARDING: [(&str, &str); 3] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
];

/// Runs `ip -n NETNS -batch -` with one command per line; the first failure stops it.
fn batch(netns: &str, lines: &[String]) -> Result<(), NetnsError> {
    let command = format!("ip -n {netns} -batch -");
    let spawn_err = |source| NetnsError::Spawn { command: command.clone(), source };
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all((lines.join("\n") + "\n").as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetnsError::Failed { command, status: out.status, stderr });
    }
    Ok(())
}

/// A veth pair: `inner` in `netns`, `outer` in the underlay netns, both up; `outer` is
/// enslaved to the bridge when `bridged`.
fn plug(slot: u8, netns: &str, inner: &str, outer: &str, bridged: bool) -> Result<(), NetnsError> {
    let underlay = underlay_netns(slot);
    batch(netns, &[format!("link add {inner} type veth peer name {outer} netns {underlay}")])?;
    let mut lines = Vec::new();
    if bridged {
        lines.push(format!("link set {outer} master {BRIDGE}"));
    }
    lines.push(format!("link set {outer} up"));
    batch(&underlay, &lines)?;
    batch(netns, &[format!("link set {inner} up")])
}

/// Builds everything of an underlay lab but its pods. On error, what was made is left for
/// the caller's teardown (every netns carries the slot's prefix).
pub fn create(slot: u8, topology: Topology) -> Result<(), NetnsError> {
    let underlay = underlay_netns(slot);
    netns::add(&underlay)?;
    netns::sysctls(&underlay, &FORWARDING)?;
    batch(
        &underlay,
        &[
            // STP off (the default): a new port forwards at once.
            format!("link add {BRIDGE} type bridge"),
            format!("addr add {}/24 dev {BRIDGE}", router_ip(slot)),
            format!("link set {BRIDGE} up"),
        ],
    )?;
    for index in topology.indices() {
        create_node(slot, topology, index)?;
    }
    create_external(slot)?;
    create_internet(slot)?;
    set_egress_return_routes(slot, topology, true)
}

/// A node: `eth0` on the bridge with the node IP, the pods' gateway on `lo` (as on a
/// single node), a route to every other node's pod CIDR via that node, the rest via the
/// router. Its own pod CIDR is unreachable but for the pods' `/32` routes, so a packet to
/// a pod that does not exist fails here instead of looping through the router (Calico
/// puts a blackhole route on its blocks for the same reason).
fn create_node(slot: u8, topology: Topology, index: u8) -> Result<(), NetnsError> {
    let node = node_netns(slot, index);
    netns::add(&node)?;
    netns::sysctls(&node, &FORWARDING)?;
    let outer = format!("n{index}");
    plug(slot, &node, "eth0", &outer, true)?;
    enable_xdp_tx(slot, &underlay_netns(slot), &outer);
    full_checksums(&node, "eth0");
    let mut lines = vec![
        format!("addr add {POD_GATEWAY}/32 dev lo"),
        format!("addr add {}/24 dev eth0", topology.node_ip(slot, index)),
        format!("route add default via {}", router_ip(slot)),
        format!("route add unreachable {}", topology.pod_cidr(slot, index)),
    ];
    for other in topology.indices().filter(|&o| o != index) {
        let (cidr, via) = (topology.pod_cidr(slot, other), topology.node_ip(slot, other));
        lines.push(format!("route add {cidr} via {via} dev eth0"));
    }
    batch(&node, &lines)
}

/// Native XDP on the node's `eth0` transmits (`XDP_TX`) through its underlay peer, which
/// must run an XDP program for the frames to leave at once ([`crate::xdp_pass`]). Best
/// effort: without it the agent's XDP still works in generic mode.
fn enable_xdp_tx(slot: u8, netns: &str, peer: &str) {
    let dir = crate::naming::bpffs_dir(slot);
    let pin = dir.join(format!("xdp-pass-{peer}"));
    let attached = std::fs::create_dir_all(&dir).and_then(|()| {
        netns::run_in(netns, || crate::xdp_pass::attach(peer, &pin))
            .map_err(std::io::Error::other)?
    });
    if let Err(e) = attached {
        eprintln!(
            "nodeplane-lab: no XDP program on {peer} in {netns} ({e}): native XDP_TX on the node's eth0 will stall"
        );
    }
}

/// Makes `iface` in `netns` send complete L4 checksums (`ethtool -K tx off`), as frames
/// on a real wire have them. A veth otherwise hands the receiver skbs whose checksum is
/// left to "the hardware" (CHECKSUM_PARTIAL); XDP, which sees only bytes, cannot tell, and
/// the receiving node's XDP rewrites of such frames (NodePort, reverse SNAT) would leave
/// bad checksums. Best effort, like [`enable_xdp_tx`].
pub fn full_checksums(netns: &str, iface: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "ethtool", "-K", iface, "tx", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!(
            "nodeplane-lab: could not turn checksum offload off for {iface} in {netns} (ethtool missing?)"
        );
    }
}

/// The external client: on the underlay's /24 and nothing else, so it reaches the node IPs
/// but has no route to a pod CIDR or the service CIDR.
fn create_external(slot: u8) -> Result<(), NetnsError> {
    let external = external_netns(slot);
    netns::add(&external)?;
    plug(slot, &external, "eth0", EXTERNAL_LINK, true)?;
    full_checksums(&external, "eth0");
    batch(&external, &[format!("addr add {}/24 dev eth0", external_ip(slot))])
}

/// The internet: a routed link to the router, a default route back through it.
fn create_internet(slot: u8) -> Result<(), NetnsError> {
    let internet = internet_netns(slot);
    netns::add(&internet)?;
    plug(slot, &internet, "eth0", INTERNET_LINK, false)?;
    full_checksums(&internet, "eth0");
    batch(
        &underlay_netns(slot),
        &[format!("addr add {}/24 dev {INTERNET_LINK}", internet_router_ip(slot))],
    )?;
    batch(
        &internet,
        &[
            format!("addr add {}/24 dev eth0", internet_ip(slot)),
            format!("route add default via {}", internet_router_ip(slot)),
        ],
    )
}

/// Adds (`on`) or removes the router's routes of each node's pod CIDR via that node. With
/// them, the internet's answers to a pod's own address find their way back; without them,
/// only masqueraded egress (source = the node IP) can be answered. Idempotent.
pub fn set_egress_return_routes(slot: u8, topology: Topology, on: bool) -> Result<(), NetnsError> {
    let lines: Vec<String> = topology
        .indices()
        .map(|i| {
            let (cidr, via) = (topology.pod_cidr(slot, i), topology.node_ip(slot, i));
            if on {
                format!("route replace {cidr} via {via} dev {BRIDGE}")
            } else {
                // `flush` of nothing succeeds, where `del` would fail.
                format!("route flush exact {cidr}")
            }
        })
        .collect();
    batch(&underlay_netns(slot), &lines)
}
