//! A lab of several nodes on an underlay with an agent on every node, and a server that
//! answers with the address a client came from (what the far end sees: a pod IP, a node
//! IP once egress is masqueraded). For the multi-node tests and what builds on them
//! (NodePort, SNAT).
use std::{
    ffi::OsString,
    io::{self, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nodeplane_lab::{Lab, LabConfig, Topology, netns};

use crate::{bin, cluster::READY_LINE};

/// Dropping it tears the lab down (which stops every agent and removes every node's pins)
/// and then reaps the agent processes.
pub struct MultiCluster {
    lab: Option<Lab>,
    /// By node index; `None` while a test has the agent stopped.
    agents: Vec<Option<Child>>,
    argv: Vec<OsString>,
}

impl std::ops::Deref for MultiCluster {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("the lab lives until drop")
    }
}

impl Drop for MultiCluster {
    fn drop(&mut self) {
        drop(self.lab.take());
        for mut agent in self.agents.iter_mut().filter_map(Option::take) {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

impl MultiCluster {
    /// A lab of `nodes` nodes (1 to 4) on an underlay from `docs`, with an agent started on
    /// every node (`extra` flags after `run --manifests <dir> --iface-prefix lxc`).
    pub fn up(nodes: u8, docs: &[(&str, &str)], extra: &[&str]) -> MultiCluster {
        let topology = Topology::Underlay { nodes };
        let cfg = LabConfig::new(bin("NODEPLANE_LAB_BIN"));
        let lab = Lab::up_with(cfg, topology, docs).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let mut argv: Vec<OsString> = vec![
            bin("NODEPLANE_AGENT_BIN").into(),
            "run".into(),
            "--manifests".into(),
            lab.manifests_dir().into(),
            "--iface-prefix".into(),
            nodeplane_lab::HOST_VETH_PREFIX.into(),
        ];
        argv.extend(extra.iter().map(OsString::from));
        let agents = (0..nodes).map(|_| None).collect();
        let mut cluster = MultiCluster { lab: Some(lab), agents, argv };
        for node in 0..nodes {
            cluster.start_agent(node);
        }
        cluster
    }

    /// Starts the agent of node `node` (again); its log is appended to
    /// `log_path(node.agent_log_name())`.
    pub fn start_agent(&mut self, node: u8) {
        assert!(self.agents[usize::from(node)].is_none(), "the agent of node {node} runs");
        let lab = self.lab.as_ref().expect("the lab lives until drop");
        let node_ref = lab.node(node).unwrap_or_else(|e| panic!("{e:#}"));
        let child = node_ref
            .spawn(&self.argv, &node_ref.agent_log_name())
            .unwrap_or_else(|e| panic!("agent on node {node}: {e:#}"));
        self.agents[usize::from(node)] = Some(child);
    }

    /// SIGKILL to the agent of node `node`; its pinned datapath keeps running.
    pub fn kill_agent(&mut self, node: u8) {
        let mut agent = self.agents[usize::from(node)].take().expect("the agent runs");
        agent.kill().expect("SIGKILL the agent");
        agent.wait().expect("reap the agent");
    }

    pub fn agent_log(&self, node: u8) -> String {
        let name = self.node(node).map(|n| n.agent_log_name()).unwrap_or_default();
        std::fs::read_to_string(self.log_path(&name)).unwrap_or_default()
    }

    fn all_logs(&self) -> String {
        let nodes = self.topology().indices();
        nodes.map(|n| format!("--- agent of node {n}:\n{}", self.agent_log(n))).collect()
    }

    /// Waits until every agent has logged its first full sync.
    pub fn wait_ready(&self, limit: Duration) {
        let nodes = self.topology().indices();
        self.wait_until("every agent is ready", limit, || {
            nodes.clone().all(|n| self.agent_log(n).contains(READY_LINE))
        });
    }

    /// Polls `f` every 100 ms until it is true; panics with every agent's log after `limit`.
    pub fn wait_until(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting until {what}; agent logs:\n{}", self.all_logs());
    }
}

/// How often the echo's threads look at their stop flag.
const ECHO_POLL: Duration = Duration::from_millis(20);

/// Answers every TCP connection and UDP datagram on `port` with the client's address as
/// the server sees it (`"10.244.3.66\n"`), from inside a netns (a node, the internet, the
/// external client). Stops and joins its threads on drop.
pub struct PeerEcho {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PeerEcho {
    pub fn start(netns: &str, port: u16) -> PeerEcho {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let bound = netns::run_in(netns, || -> io::Result<_> {
            Ok((TcpListener::bind(any)?, UdpSocket::bind(any)?))
        });
        let (tcp, udp) = bound
            .unwrap_or_else(|e| panic!("entering {netns}: {e}"))
            .unwrap_or_else(|e| panic!("binding port {port} in {netns}: {e}"));
        // The sockets stay in `netns`; plain threads serve them from here.
        tcp.set_nonblocking(true).expect("non-blocking listener");
        udp.set_read_timeout(Some(ECHO_POLL)).expect("UDP read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_stop = stop.clone();
        let tcp_thread = thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.write_all(format!("{}\n", peer.ip()).as_bytes());
                    }
                    Err(_) => thread::sleep(ECHO_POLL),
                }
            }
        });
        let udp_stop = stop.clone();
        let udp_thread = thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{}\n", peer.ip()).as_bytes(), peer);
                }
            }
        });
        PeerEcho { stop, threads: vec![tcp_thread, udp_thread] }
    }
}

impl Drop for PeerEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
