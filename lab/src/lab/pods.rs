//! Pods made real: a netns wired to the node, a server answering on the pod's ports.
use std::{
    net::Ipv4Addr,
    process::Child,
    thread,
    time::{Duration, Instant},
};

use super::{Inner, Lab, LabError, PROBE_TIMEOUT, REAP_TIMEOUT, SERVER_READY_TIMEOUT};
use crate::{
    control_plane::{ControlPlane, ObjectKey},
    naming,
    netns::{self, PodLink},
    server::{self, ServeConfig},
    topology,
};

impl Lab {
    /// Brings the pods of `next` to life; returns the ones whose server (re)started.
    pub(super) fn start_pods(
        &self,
        inner: &mut Inner,
        next: &ControlPlane,
    ) -> Result<Vec<ObjectKey>, LabError> {
        let mut started = Vec::new();
        for (key, pod) in next.pods() {
            let cfg = ServeConfig::for_pod(pod);
            match inner.control.pod(key) {
                None => {
                    let unknown = || LabError::UnknownPod(key.clone());
                    let ip = next.pod_ip(key).ok_or_else(unknown)?;
                    let node = next.pod_node(key).ok_or_else(unknown)?;
                    self.create_pod(key, ip, node)?;
                }
                Some(old) if ServeConfig::for_pod(old) != cfg => self.stop_server(inner, key)?,
                Some(_) => continue,
            }
            if cfg.has_ports() {
                let child = self.start_server(key, &cfg)?;
                inner.servers.insert(key.clone(), child);
                started.push(key.clone());
            }
        }
        Ok(started)
    }

    pub(super) fn undo_new_pods(&self, inner: &mut Inner, next: &ControlPlane) {
        let new: Vec<ObjectKey> = next
            .pods()
            .map(|(k, _)| k.clone())
            .filter(|k| inner.control.pod(k).is_none())
            .collect();
        for key in new {
            if let Err(e) = self.remove_pod(inner, &key) {
                tracing::warn!(pod = %key, error = %e, "undoing a failed apply");
            }
        }
    }

    /// Wires the pod to node `node` (its index).
    fn create_pod(&self, key: &ObjectKey, ip: Ipv4Addr, node: u8) -> Result<(), LabError> {
        let (node_netns, pod_netns) =
            (topology::node_netns(self.slot, node), self.pod_netns(&key.namespace, &key.name));
        let host_veth = naming::host_veth(&key.namespace, &key.name);
        let link =
            PodLink { node_netns: &node_netns, pod_netns: &pod_netns, host_veth: &host_veth, ip };
        netns::create_pod(&link)?;
        if matches!(self.topology, crate::topology::Topology::Underlay { .. }) {
            // Its frames may cross the wire to another node's XDP (underlay::full_checksums).
            crate::underlay::full_checksums(&pod_netns, "eth0");
        }
        Ok(())
    }

    fn start_server(&self, key: &ObjectKey, cfg: &ServeConfig) -> Result<Child, LabError> {
        let mut args = cfg.args();
        if !self.cfg.persistent {
            args.extend(["--owner".to_string(), std::process::id().to_string()]);
        }
        let netns = self.pod_netns(&key.namespace, &key.name);
        let cmd = netns::exec_command(&netns, &self.cfg.lab_bin, &args);
        self.spawn_logged(cmd, &server_log(key), format!("server of pod {key}"))
    }

    /// Kills everything in the pod's netns: the server and whatever else runs there.
    fn stop_server(&self, inner: &mut Inner, key: &ObjectKey) -> Result<(), LabError> {
        netns::kill_all(&self.pod_netns(&key.namespace, &key.name))?;
        if let Some(child) = inner.servers.remove(key) {
            reap(child);
        }
        Ok(())
    }

    pub(super) fn remove_pod(&self, inner: &mut Inner, key: &ObjectKey) -> Result<(), LabError> {
        self.stop_server(inner, key)?;
        // The veth pair, and with it the node's route, goes with the pod's netns.
        netns::delete(&self.pod_netns(&key.namespace, &key.name))?;
        Ok(())
    }

    /// Waits, bounded by [`SERVER_READY_TIMEOUT`] in all, until every started server
    /// answers on all its ports from inside its pod.
    pub(super) fn wait_ready(
        &self,
        inner: &mut Inner,
        next: &ControlPlane,
        started: &[ObjectKey],
    ) -> Result<(), LabError> {
        let begin = Instant::now();
        for key in started {
            let cfg = next.pod(key).map(ServeConfig::for_pod).unwrap_or_default();
            let netns = self.pod_netns(&key.namespace, &key.name);
            loop {
                let silent =
                    netns::run_in(&netns, || server::first_silent_port(&cfg, PROBE_TIMEOUT))?;
                let Some((protocol, port)) = silent else { break };
                let log = self.log_path(&server_log(key));
                let exited = inner.servers.get_mut(key).and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    return Err(LabError::ServerExited { pod: key.clone(), status, log });
                }
                let waited = begin.elapsed();
                if waited >= SERVER_READY_TIMEOUT {
                    return Err(LabError::ServerNotReady {
                        pod: key.clone(),
                        protocol,
                        port,
                        waited,
                        log,
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

pub(super) fn server_log(key: &ObjectKey) -> String {
    format!("pod-{}-{}", key.namespace, key.name)
}

/// Waits (bounded) for a child that was just killed, so it does not linger as a zombie.
pub(super) fn reap(mut child: Child) {
    let deadline = Instant::now() + REAP_TIMEOUT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Ok(Some(_)) | Err(_) => return,
        }
    }
    tracing::warn!(pid = child.id(), "child did not exit after SIGKILL");
}
