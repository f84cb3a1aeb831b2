//! A lab with the agent running in its node namespace, which a test can kill, stop and
//! start again (restart, upgrade and uninstall tests).
use std::{
    ffi::OsString,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use nodeplane_lab::{Lab, LabConfig};

use crate::bin;

/// Dropping it tears the lab down (which stops the agent and removes its pins) and then
/// reaps the agent process.
pub struct Cluster {
    lab: Option<Lab>,
    agent: Option<Child>,
    argv: Vec<OsString>,
}

impl std::ops::Deref for Cluster {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("the lab lives until drop")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.lab.take());
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// The line the agent logs when its first full sync is programmed.
pub const READY_LINE: &str = "first full sync programmed; ready";

impl Cluster {
    /// The lab from `docs` (`(file name, YAML)`) with the agent started (`extra` flags
    /// after `run --manifests <dir> --iface-prefix lxc`).
    pub fn up(docs: &[(&str, &str)], extra: &[&str]) -> Cluster {
        let cfg = LabConfig::new(bin("NODEPLANE_LAB_BIN"));
        let lab = Lab::up(cfg, docs).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let mut argv: Vec<OsString> = vec![
            bin("NODEPLANE_AGENT_BIN").into(),
            "run".into(),
            "--manifests".into(),
            lab.manifests_dir().into(),
            "--iface-prefix".into(),
            nodeplane_lab::HOST_VETH_PREFIX.into(),
        ];
        argv.extend(extra.iter().map(OsString::from));
        let mut cluster = Cluster { lab: Some(lab), agent: None, argv };
        cluster.start_agent();
        cluster
    }

    /// Starts the agent (again); its log is appended to `log_path("agent")`.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent is already running");
        let child =
            self.spawn_in_node(&self.argv, "agent").unwrap_or_else(|e| panic!("agent: {e:#}"));
        self.agent = Some(child);
    }

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("the agent runs");
        agent.kill().expect("SIGKILL the agent");
        agent.wait().expect("reap the agent");
    }

    /// SIGTERM, and waits for the agent to exit (a graceful stop, as on a rollout).
    pub fn stop_agent(&mut self) {
        let mut agent = self.agent.take().expect("the agent runs");
        let pid = libc::pid_t::try_from(agent.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on a child we have not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM the agent");
        let status = agent.wait().expect("reap the agent");
        assert!(status.success(), "the agent exits cleanly on SIGTERM: {status}");
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.log_path("agent")).unwrap_or_default()
    }

    /// How many times an agent has logged that it is ready, over every start.
    pub fn ready_count(&self) -> usize {
        self.agent_log().matches(READY_LINE).count()
    }

    /// Polls `f` every 100 ms until it is true; panics with the agent's log after `limit`.
    pub fn wait_until(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting until {what}; agent log:\n{}", self.agent_log());
    }

    /// The agent's pin directory.
    pub fn pins(&self) -> PathBuf {
        self.bpffs_dir()
    }
}
