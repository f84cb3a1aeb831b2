//! The nodes of a lab (one, or several on an underlay) and, on an underlay, the external
//! client and the internet. Names and addresses come from [`crate::topology`].
use std::{ffi::OsStr, net::Ipv4Addr, path::PathBuf, process::Child};

use super::{Lab, LabError};
use crate::{
    control_plane::ObjectKey,
    netns,
    topology::{self, Topology},
    underlay,
};

/// One node of a lab: its names and addresses, and ways into its netns. Node 0 is the
/// node of [`Lab::node_netns`], [`Lab::in_node`] and [`Lab::spawn_in_node`].
#[derive(Clone, Copy)]
pub struct LabNode<'a> {
    lab: &'a Lab,
    index: u8,
}

impl Lab {
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// Node `index` (`0..topology().nodes()`).
    pub fn node(&self, index: u8) -> Result<LabNode<'_>, LabError> {
        let nodes = self.topology.nodes();
        if index >= nodes {
            return Err(LabError::UnknownNode { index, nodes });
        }
        Ok(LabNode { lab: self, index })
    }

    /// Every node, in index order.
    pub fn nodes(&self) -> impl Iterator<Item = LabNode<'_>> {
        self.topology.indices().map(|index| LabNode { lab: self, index })
    }

    /// The node a pod runs on.
    pub fn pod_node(&self, namespace: &str, name: &str) -> Result<LabNode<'_>, LabError> {
        let key = ObjectKey::new(namespace, name);
        let index = self.lock().control.pod_node(&key).ok_or(LabError::UnknownPod(key))?;
        self.node(index)
    }

    fn require_underlay(&self) -> Result<(), LabError> {
        if self.topology.has_underlay() { Ok(()) } else { Err(LabError::NoUnderlay) }
    }

    /// The external client's netns: on the underlay, with routes to the node IPs only.
    pub fn external_netns(&self) -> Result<String, LabError> {
        self.require_underlay()?;
        Ok(topology::external_netns(self.slot))
    }

    pub fn external_ip(&self) -> Result<Ipv4Addr, LabError> {
        self.require_underlay()?;
        Ok(topology::external_ip(self.slot))
    }

    /// The internet's netns: behind the router, outside every range of the lab.
    pub fn internet_netns(&self) -> Result<String, LabError> {
        self.require_underlay()?;
        Ok(topology::internet_netns(self.slot))
    }

    pub fn internet_ip(&self) -> Result<Ipv4Addr, LabError> {
        self.require_underlay()?;
        Ok(topology::internet_ip(self.slot))
    }

    /// Runs `f` on a thread inside the external client's netns; sockets made there stay.
    pub fn in_external<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, LabError> {
        Ok(netns::run_in(&self.external_netns()?, f)?)
    }

    /// Runs `f` on a thread inside the internet's netns; sockets made there stay.
    pub fn in_internet<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, LabError> {
        Ok(netns::run_in(&self.internet_netns()?, f)?)
    }

    /// Adds (`true`, as built) or removes the router's routes of each node's pod CIDR via
    /// its node. They stand in for SNAT: with them the internet answers a pod's own
    /// address; without them only egress masqueraded to a node IP can get an answer.
    pub fn set_egress_return_routes(&self, on: bool) -> Result<(), LabError> {
        self.require_underlay()?;
        Ok(underlay::set_egress_return_routes(self.slot, self.topology, on)?)
    }
}

impl<'a> LabNode<'a> {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The Node object's name, and the agent's `NODE_NAME` there.
    pub fn name(&self) -> String {
        topology::node_name(self.index)
    }

    pub fn netns(&self) -> String {
        topology::node_netns(self.lab.slot, self.index)
    }

    /// The node's InternalIP.
    pub fn ip(&self) -> Ipv4Addr {
        self.lab.topology.node_ip(self.lab.slot, self.index)
    }

    pub fn pod_cidr(&self) -> String {
        self.lab.topology.pod_cidr(self.lab.slot, self.index)
    }

    /// Where the agent on this node pins the datapath (removed at teardown).
    pub fn bpffs_dir(&self) -> PathBuf {
        self.lab.topology.bpffs_dir(self.lab.slot, self.index)
    }

    /// The `--state-dir` of the agent on this node (`names.json` for `inspect`).
    pub fn agent_state_dir(&self) -> PathBuf {
        self.lab.state_dir.join(self.lab.topology.agent_state_dir(self.index))
    }

    /// The conventional log name of this node's agent (`<state dir>/<name>.log`): `agent`
    /// on a single node, `agent-<node name>` on an underlay, like its state directory.
    pub fn agent_log_name(&self) -> String {
        self.lab.topology.agent_state_dir(self.index)
    }

    /// Runs `f` on a thread inside the node's netns, e.g. to bind a listener there.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, LabError> {
        Ok(netns::run_in(&self.netns(), f)?)
    }

    /// [`Lab::spawn_in`] this node.
    pub fn spawn(&self, cmd: &[impl AsRef<OsStr>], log_name: &str) -> Result<Child, LabError> {
        self.lab.spawn_in(self.index, cmd, log_name)
    }
}
