//! Reaching into a lab: sockets and commands in pods, long-running processes in the node.
use std::{
    ffi::OsStr,
    fs::OpenOptions,
    io,
    net::{SocketAddrV4, TcpStream},
    os::unix::process::CommandExt,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use super::{Lab, LabError, io_err};
use crate::{control_plane::ObjectKey, netns, server};

impl Lab {
    /// Starts a long-running process in the node netns (the agent, typically
    /// `<agent> run --manifests <dir> --iface-prefix lxc`), output to `log_path(log_name)`.
    /// At teardown it gets SIGTERM, then SIGKILL after a grace period. `NODE_NAME` is set to
    /// the lab node's name, `NODEPLANE_BPFFS_DIR` to the lab's own pin directory (removed
    /// at teardown), `NODEPLANE_STATE_DIR` to [`Lab::agent_state_dir`].
    /// On a multi-node lab, this is [`Lab::spawn_in`] the first node.
    pub fn spawn_in_node(
        &self,
        cmd: &[impl AsRef<OsStr>],
        log_name: &str,
    ) -> Result<Child, LabError> {
        self.spawn_in(0, cmd, log_name)
    }

    /// [`Lab::spawn_in_node`] on node `node` (an index, see [`Lab::node`]), with that
    /// node's `NODE_NAME`, pin directory and state directory.
    pub fn spawn_in(
        &self,
        node: u8,
        cmd: &[impl AsRef<OsStr>],
        log_name: &str,
    ) -> Result<Child, LabError> {
        let node = self.node(node)?;
        let (program, args) = cmd.split_first().ok_or(LabError::EmptyCommand)?;
        let what = format!("{} in {}", program.as_ref().to_string_lossy(), node.netns());
        // setns, not `ip netns exec`: the agent pins on the host's bpffs.
        let mut cmd = netns::enter_command(&node.netns(), program, args)?;
        // What a DaemonSet's downward API gives the agent: the node's name (pods carry it
        // in spec.nodeName), so it knows which pods are local.
        cmd.env("NODE_NAME", node.name());
        cmd.env("NODEPLANE_BPFFS_DIR", node.bpffs_dir());
        // `inspect`'s names snapshot: in the lab's state dir, so labs side by side never
        // overwrite each other's (and it goes at teardown).
        cmd.env("NODEPLANE_STATE_DIR", node.agent_state_dir());
        self.spawn_logged(cmd, log_name, what)
    }

    /// The lab agent's `--state-dir` (`NODEPLANE_STATE_DIR`): where it writes the names
    /// snapshot `nodeplane-agent inspect` reads. The first node's on a multi-node lab.
    pub fn agent_state_dir(&self) -> std::path::PathBuf {
        self.nodes().next().expect("a lab has a node").agent_state_dir()
    }

    /// Where the lab's agent pins the datapath. The first node's on a multi-node lab.
    pub fn bpffs_dir(&self) -> std::path::PathBuf {
        self.nodes().next().expect("a lab has a node").bpffs_dir()
    }

    pub(super) fn spawn_logged(
        &self,
        mut cmd: Command,
        log_name: &str,
        what: String,
    ) -> Result<Child, LabError> {
        let path = self.log_path(log_name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let log2 = log.try_clone().map_err(io_err("opening", &path))?;
        // A process group of its own: Ctrl-C at the terminal that ran `up` must not
        // reach the servers and agent of a persistent lab.
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        cmd.spawn().map_err(|source| LabError::Spawn { what, source })
    }

    fn require_pod(&self, namespace: &str, name: &str) -> Result<(), LabError> {
        let key = ObjectKey::new(namespace, name);
        match self.lock().control.pod(&key) {
            Some(_) => Ok(()),
            None => Err(LabError::UnknownPod(key)),
        }
    }

    /// Runs `f` on a thread inside the pod's netns; sockets made there stay there.
    /// The lab's lock is not held while `f` runs, so `f` may use the lab.
    pub fn in_pod<R: Send>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce() -> R + Send,
    ) -> Result<R, LabError> {
        self.require_pod(namespace, name)?;
        Ok(netns::run_in(&self.pod_netns(namespace, name), f)?)
    }

    /// Runs `f` on a thread inside the node's netns, e.g. to bind a listener the agent
    /// (which runs there) can reach on the node's loopback.
    pub fn in_node<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, LabError> {
        Ok(netns::run_in(&self.node_netns(), f)?)
    }

    /// A TCP connection from a pod. The stream stays in the pod's netns.
    pub fn tcp_connect(
        &self,
        ns: &str,
        pod: &str,
        addr: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.in_pod(ns, pod, || TcpStream::connect_timeout(&addr.into(), timeout))
            .map_err(io::Error::other)?
    }

    /// Connects from a pod and returns the first line the server sends: its pod name.
    pub fn tcp_ask(
        &self,
        ns: &str,
        pod: &str,
        addr: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<String> {
        self.in_pod(ns, pod, || server::tcp_ask(addr, timeout)).map_err(io::Error::other)?
    }

    /// Sends one datagram from a pod and returns the reply: the answering pod's name.
    pub fn udp_ask(
        &self,
        ns: &str,
        pod: &str,
        addr: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<String> {
        self.in_pod(ns, pod, || server::udp_ask(addr, timeout)).map_err(io::Error::other)?
    }

    /// `ip netns exec <pod netns> CMD...`, ready to be configured and run.
    pub fn pod_command(
        &self,
        ns: &str,
        pod: &str,
        cmd: &[impl AsRef<OsStr>],
    ) -> Result<Command, LabError> {
        self.require_pod(ns, pod)?;
        let (program, args) = cmd.split_first().ok_or(LabError::EmptyCommand)?;
        Ok(netns::exec_command(&self.pod_netns(ns, pod), program, args))
    }

    /// Runs a command in a pod and collects its output.
    pub fn exec(&self, ns: &str, pod: &str, cmd: &[impl AsRef<OsStr>]) -> Result<Output, LabError> {
        let mut command = self.pod_command(ns, pod, cmd)?;
        let what =
            format!("{:?} in pod {ns}/{pod}", command.get_args().skip(3).collect::<Vec<_>>());
        command.output().map_err(|source| LabError::Spawn { what, source })
    }
}
