//! The lab's shape: the single node it always was, or several nodes on an underlay with an
//! external client and an "internet" beside them. Every name and address derives from the
//! slot, the topology and a node's index (see the table in [`crate::naming`]).
//!
//! ```text
//!                       np{N}-underlay: bridge br0 192.168.N.1/24 (the router), ip_forward
//!          ┌──────────────┬──────────┴───┬──────────────────┐         inet 198.18.N.1/24
//!   eth0 .10          eth0 .11       eth0 .12          eth0 .200               │
//!   np{N}-node        np{N}-node1    np{N}-node2       np{N}-external    eth0 198.18.N.2/24
//!   lab-node          lab-node1      lab-node2         (node IPs only)   np{N}-internet
//!   pods 10.244.N.0/26  .64/26         .128/26                            (default via .1)
//! ```
//!
//! * Each node routes the other nodes' pod CIDRs via their node IPs (direct routing, as
//!   flannel's host-gw or Calico's BGP mesh would), and everything else via the router.
//! * The external client has only the underlay's /24: it reaches node IPs, never a pod
//!   CIDR or the service CIDR (it has no route to them).
//! * The internet is a routed hop away. Until the datapath masquerades egress, the router
//!   also routes each node's pod CIDR to its node ("egress return routes"), so a pod's
//!   packets to the internet get answers; [`crate::Lab::set_egress_return_routes`] removes
//!   them, which is what a SNAT test will do.
use std::{net::Ipv4Addr, ops::RangeInclusive, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::naming::{self, LAST_HOST, NODE_NAME};

/// Most nodes an underlay lab can have: the slot's pod /24 is cut into this many blocks.
pub const MAX_NODES: u8 = 4;
/// Size of one node's pod block on an underlay (a /26).
const NODE_BLOCK: u8 = 64;
const NODE_BLOCK_PREFIX: u8 = 26;
/// Host numbers on the underlay /24.
const ROUTER_HOST: u8 = 1;
const FIRST_NODE_HOST: u8 = 10;
const EXTERNAL_HOST: u8 = 200;

/// The bridge in the underlay netns every node, and the external client, is plugged into.
pub const BRIDGE: &str = "br0";
/// The router's end of the internet's veth.
pub const INTERNET_LINK: &str = "inet";
/// The router's end of the external client's veth.
pub const EXTERNAL_LINK: &str = "ext";

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("a lab has 1 to {MAX_NODES} nodes, not {0}")]
    Nodes(u8),
}

/// How many nodes a lab has and how they are joined. Serialized in the lab's state, so a
/// reopened lab knows its shape; state without it is [`Topology::Single`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Topology {
    /// One node whose address sits on its `lo` inside the pod /24, pods from `.2`, nothing
    /// else: the lab as it has always been.
    #[default]
    Single,
    /// `nodes` nodes on an underlay, each with a /26 of the slot's pod /24, plus the
    /// external client and the internet.
    Underlay { nodes: u8 },
}

impl Topology {
    /// One node is [`Topology::Single`]; more are an underlay.
    pub fn with_nodes(nodes: u8) -> Result<Topology, TopologyError> {
        let topology = if nodes == 1 { Topology::Single } else { Topology::Underlay { nodes } };
        topology.check()?;
        Ok(topology)
    }

    pub fn check(self) -> Result<(), TopologyError> {
        match self {
            Topology::Underlay { nodes } if nodes == 0 || nodes > MAX_NODES => {
                Err(TopologyError::Nodes(nodes))
            }
            _ => Ok(()),
        }
    }

    pub fn nodes(self) -> u8 {
        match self {
            Topology::Single => 1,
            Topology::Underlay { nodes } => nodes,
        }
    }

    pub fn has_underlay(self) -> bool {
        matches!(self, Topology::Underlay { .. })
    }

    /// Node indices, `0..nodes`.
    pub fn indices(self) -> std::ops::Range<u8> {
        0..self.nodes()
    }

    /// The index of the node called `name`, if the lab has it.
    pub fn node_index(self, name: &str) -> Option<u8> {
        self.indices().find(|&i| node_name(i) == name)
    }

    /// The node's address: on a single node, `10.244.N.1` on its `lo`; on an underlay, its
    /// `eth0` address `192.168.N.(10 + index)`.
    pub fn node_ip(self, slot: u8, index: u8) -> Ipv4Addr {
        match self {
            Topology::Single => naming::node_ip(slot),
            Topology::Underlay { .. } => underlay_ip(slot, FIRST_NODE_HOST + index),
        }
    }

    /// The node's pod CIDR: the slot's /24 on a single node, the index-th /26 of it on an
    /// underlay.
    pub fn pod_cidr(self, slot: u8, index: u8) -> String {
        match self {
            Topology::Single => naming::pod_cidr(slot),
            Topology::Underlay { .. } => {
                format!("10.244.{slot}.{}/{NODE_BLOCK_PREFIX}", index * NODE_BLOCK)
            }
        }
    }

    /// Host numbers (last octet) the node's pods get, in order: `.2` to `.254` on a single
    /// node, the block's `.2` to `.62` on an underlay (`.0`, `.1` and the last address of
    /// each block stay free).
    pub fn pod_hosts(self, index: u8) -> RangeInclusive<u8> {
        match self {
            Topology::Single => naming::FIRST_POD_HOST..=LAST_HOST,
            Topology::Underlay { .. } => {
                let base = index * NODE_BLOCK;
                base + naming::FIRST_POD_HOST..=base + (NODE_BLOCK - 2)
            }
        }
    }

    /// The node's agent's `--bpffs-dir`: the slot's own directory on a single node, a
    /// directory per node below it on an underlay (so removing the slot's directory, as
    /// teardown and the reaping of dead labs do, frees every node's pins).
    pub fn bpffs_dir(self, slot: u8, index: u8) -> PathBuf {
        match self {
            Topology::Single => naming::bpffs_dir(slot),
            Topology::Underlay { .. } => naming::bpffs_dir(slot).join(node_name(index)),
        }
    }

    /// The node's agent's `--state-dir`, relative to the lab's state directory.
    pub fn agent_state_dir(self, index: u8) -> String {
        match self {
            Topology::Single => "agent".into(),
            Topology::Underlay { .. } => format!("agent-{}", node_name(index)),
        }
    }
}

/// The name of node `index`: `lab-node` for the first (the single node's name, so pods
/// without a `spec.nodeName` land there), `lab-node1`, `lab-node2`... after it.
pub fn node_name(index: u8) -> String {
    match index {
        0 => NODE_NAME.into(),
        i => format!("{NODE_NAME}{i}"),
    }
}

/// The netns of node `index`: `np{N}-node` for the first (the single node's), then
/// `np{N}-node1`... No dash after `node`, so no pod netns (`np{N}-{ns}-{name}`) can clash.
pub fn node_netns(slot: u8, index: u8) -> String {
    match index {
        0 => naming::node_netns(slot),
        i => format!("{}{i}", naming::node_netns(slot)),
    }
}

/// Whether `name` is a node netns of slot `slot` (any index up to [`MAX_NODES`]).
pub fn is_node_netns(slot: u8, name: &str) -> bool {
    (0..MAX_NODES).any(|i| node_netns(slot, i) == name)
}

/// The netns holding the underlay's bridge and the router.
pub fn underlay_netns(slot: u8) -> String {
    format!("np{slot}-underlay")
}

/// The external client: on the underlay, with a route to the node IPs only.
pub fn external_netns(slot: u8) -> String {
    format!("np{slot}-external")
}

/// The internet: one routed hop behind the router, outside every range of the lab.
pub fn internet_netns(slot: u8) -> String {
    format!("np{slot}-internet")
}

/// The underlay's /24: `192.168.N.0/24`, apart from pods (10.244/16) and services (10.96/16).
pub fn underlay_cidr(slot: u8) -> String {
    format!("192.168.{slot}.0/24")
}

fn underlay_ip(slot: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, slot, host)
}

/// The router's address on the underlay, every node's default gateway.
pub fn router_ip(slot: u8) -> Ipv4Addr {
    underlay_ip(slot, ROUTER_HOST)
}

pub fn external_ip(slot: u8) -> Ipv4Addr {
    underlay_ip(slot, EXTERNAL_HOST)
}

/// The link between the router and the internet: `198.18.N.0/24` (RFC 2544's benchmarking
/// range, outside every range the lab or a cluster uses).
pub fn internet_cidr(slot: u8) -> String {
    format!("198.18.{slot}.0/24")
}

/// The router's address towards the internet.
pub fn internet_router_ip(slot: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, slot, 1)
}

/// The internet host's address.
pub fn internet_ip(slot: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, slot, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_is_the_single_lab_with_its_old_names_and_ranges() {
        let t = Topology::with_nodes(1).expect("one node");
        assert_eq!(t, Topology::Single);
        assert_eq!(t.nodes(), 1);
        assert_eq!(node_name(0), NODE_NAME);
        assert_eq!(node_netns(7, 0), naming::node_netns(7));
        assert_eq!(t.node_ip(7, 0), naming::node_ip(7));
        assert_eq!(t.pod_cidr(7, 0), naming::pod_cidr(7));
        assert_eq!(t.pod_hosts(0), 2..=254);
        assert_eq!(t.bpffs_dir(7, 0), naming::bpffs_dir(7));
        assert_eq!(t.agent_state_dir(0), "agent");
        assert_eq!(t.node_index("lab-node"), Some(0));
        assert_eq!(t.node_index("lab-node1"), None);
    }

    #[test]
    fn underlay_nodes_get_disjoint_pod_blocks_inside_the_slot() {
        let t = Topology::with_nodes(MAX_NODES).expect("four nodes");
        let mut seen = std::collections::BTreeSet::new();
        for i in t.indices() {
            let hosts = t.pod_hosts(i);
            let (first, last) = (*hosts.start(), *hosts.end());
            let base = i * 64;
            assert_eq!(t.pod_cidr(3, i), format!("10.244.3.{base}/26"));
            // Inside the node's block, clear of its network and broadcast addresses.
            assert!(first > base && last < base + 63, "node {i}: {first}..={last}");
            for h in hosts {
                assert!(seen.insert(h), "host {h} handed to two nodes");
            }
            assert_eq!(t.node_index(&node_name(i)), Some(i));
        }
        assert_eq!(t.node_ip(3, 2), Ipv4Addr::new(192, 168, 3, 12));
        assert_eq!(node_netns(3, 2), "np3-node2");
        assert_eq!(t.bpffs_dir(3, 1), naming::bpffs_dir(3).join("lab-node1"));
        assert_eq!(t.agent_state_dir(1), "agent-lab-node1");
    }

    #[test]
    fn node_counts_outside_one_to_four_are_refused() {
        assert!(Topology::with_nodes(0).is_err());
        assert!(Topology::with_nodes(MAX_NODES + 1).is_err());
        assert!(Topology::Underlay { nodes: 1 }.check().is_ok());
    }

    #[test]
    fn slot_wide_netns_names_cannot_clash_with_pods_or_nodes() {
        // Pod netns names carry a dash after the slot's prefix; these do not.
        for name in [underlay_netns(4), external_netns(4), internet_netns(4), node_netns(4, 3)] {
            let rest = name.strip_prefix(&naming::netns_prefix(4)).expect("slot prefix");
            assert!(!rest.contains('-'), "{name}");
            assert_eq!(naming::slot_of_netns(&name), Some(4));
        }
        assert!(is_node_netns(4, "np4-node") && is_node_netns(4, "np4-node3"));
        assert!(!is_node_netns(4, "np4-node-web") && !is_node_netns(4, "np4-underlay"));
    }
}
