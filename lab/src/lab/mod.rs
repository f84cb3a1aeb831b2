//! A running lab: a slot, the node netns, one netns and server per pod, and the manifests
//! the agent reads. See the crate docs for the picture.
//!
//! * this file: configuration, errors, and the lab's lifecycle (up, open, apply, delete);
//! * `pods`: pod netns and servers, and waiting until the servers answer;
//! * `access`: reaching into pods and the node (sockets, commands, the agent);
//! * `nodes`: the nodes of a lab, and the external client and internet of an underlay;
//! * `teardown`: tearing down one lab, remains of dead ones, or all of them.
mod access;
mod nodes;
mod pods;
mod teardown;

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

pub use nodes::LabNode;
use serde::{Deserialize, Serialize};
use teardown::destroy_remains;
pub use teardown::down_all;

use crate::{
    control_plane::{ControlPlane, ControlPlaneError, Kind, Object, ObjectKey, ParseError, parse},
    files, naming,
    netns::{self, NetnsError},
    server::Protocol,
    slot::{Owner, SlotError, Slots},
    topology::{Topology, TopologyError},
    underlay,
};

/// Where labs keep their state unless told otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/nodeplane-lab";
/// Environment variable naming the `nodeplane-lab` binary, for [`LabConfig::from_env`].
pub const LAB_BIN_ENV: &str = "NODEPLANE_LAB_BIN";
/// The file in [`Lab::manifests_dir`] that holds the derived cluster state.
pub const CLUSTER_MANIFEST: &str = "cluster.yaml";

/// How long `up`/`apply` wait for new pod servers to answer.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long to wait for a SIGKILLed child before leaving it to the OS.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{} is not a lab state file: {source}", path.display())]
    State { path: PathBuf, source: serde_json::Error },
    #[error("rendering the cluster manifests: {0}")]
    Render(#[from] serde_yaml::Error),
    #[error("pod {0} is not in the lab")]
    UnknownPod(ObjectKey),
    #[error("service {0} is not in the lab or has no ClusterIP")]
    UnknownService(ObjectKey),
    #[error("empty command")]
    EmptyCommand,
    #[error("starting {what}: {source}")]
    Spawn { what: String, source: io::Error },
    #[error("server of pod {pod} exited ({status}); see {}", log.display())]
    ServerExited { pod: ObjectKey, status: ExitStatus, log: PathBuf },
    #[error("server of pod {pod} not answering on {protocol} port {port} after {waited:?}; see {}", log.display())]
    ServerNotReady { pod: ObjectKey, protocol: Protocol, port: u16, waited: Duration, log: PathBuf },
    #[error("{LAB_BIN_ENV} is not set (the path of the nodeplane-lab binary)")]
    NoLabBin,
    #[error("no current lab in {} (start one with `nodeplane-lab up`)", .0.display())]
    NoCurrentLab(PathBuf),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("the lab has no node {index} (it has {nodes})")]
    UnknownNode { index: u8, nodes: u8 },
    #[error("a single-node lab has no underlay (no external client, no internet)")]
    NoUnderlay,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LabError {
    let path = path.to_path_buf();
    move |source| LabError::Io { action, path, source }
}

/// How to run a lab.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// The `nodeplane-lab` binary, run as each pod's server.
    pub lab_bin: PathBuf,
    /// Parent of the labs' state directories (`lab-{N}`).
    pub state_root: PathBuf,
    /// A persistent lab (the CLI's) survives its `Lab` value and its process, until `down`.
    pub persistent: bool,
}

impl LabConfig {
    pub fn new(lab_bin: impl Into<PathBuf>) -> Self {
        LabConfig {
            lab_bin: lab_bin.into(),
            state_root: DEFAULT_STATE_ROOT.into(),
            persistent: false,
        }
    }

    /// Takes the binary from `NODEPLANE_LAB_BIN`.
    pub fn from_env() -> Result<Self, LabError> {
        std::env::var_os(LAB_BIN_ENV).map(LabConfig::new).ok_or(LabError::NoLabBin)
    }
}

/// What `state.json` holds: enough to reopen a lab from another process.
#[derive(Serialize, Deserialize)]
struct SavedState {
    slot: u8,
    control_plane: ControlPlane,
}

/// The state directory of slot `slot` under `state_root`.
pub fn state_dir(state_root: &Path, slot: u8) -> PathBuf {
    state_root.join(format!("lab-{slot}"))
}

/// Reads manifest files into `(name, text)` pairs for [`Lab::up`] and [`Lab::apply`].
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<(String, String)>, LabError> {
    paths
        .iter()
        .map(|p| {
            Ok((p.display().to_string(), fs::read_to_string(p).map_err(io_err("reading", p))?))
        })
        .collect()
}

fn parse_sources(docs: &[(impl AsRef<str>, impl AsRef<str>)]) -> Result<Vec<Object>, LabError> {
    let mut objects = Vec::new();
    for (name, text) in docs {
        objects.extend(parse(name.as_ref(), text.as_ref())?);
    }
    Ok(objects)
}

/// A lab: one node (or several, on an underlay: see [`Topology`]) and its pods in network
/// namespaces. Torn down on drop unless persistent.
///
/// Every method takes `&self`, so tests can flip readiness or delete objects while other
/// threads keep sending traffic. Changes are serialized by one lock, which is never held
/// while a caller's code runs (see [`Lab::in_pod`]).
pub struct Lab {
    cfg: LabConfig,
    slot: u8,
    /// The control plane's, kept here too: it never changes.
    topology: Topology,
    state_dir: PathBuf,
    inner: Mutex<Inner>,
}

/// What changes over a lab's life.
struct Inner {
    control: ControlPlane,
    /// Pod servers this process started, to reap them; others are found by netns.
    servers: BTreeMap<ObjectKey, Child>,
    torn_down: bool,
}

impl Lab {
    /// Claims a slot, builds the node and the pods in `docs` (`(source name, YAML)`),
    /// starts their servers and writes the manifests. On error nothing is left behind.
    pub fn up(
        cfg: LabConfig,
        docs: &[(impl AsRef<str>, impl AsRef<str>)],
    ) -> Result<Lab, LabError> {
        Lab::up_with(cfg, Topology::Single, docs)
    }

    /// [`Lab::up`] shaped as `topology`: on an underlay, every node, the router, the
    /// external client and the internet are built before the pods, each pod on the node
    /// its `spec.nodeName` names (the first node without one).
    pub fn up_with(
        cfg: LabConfig,
        topology: Topology,
        docs: &[(impl AsRef<str>, impl AsRef<str>)],
    ) -> Result<Lab, LabError> {
        topology.check()?;
        let objects = parse_sources(docs)?;
        let owner = if cfg.persistent { Owner::Cli } else { Owner::me() };
        let root = cfg.state_root.clone();
        let slot = Slots::system().claim(
            &owner,
            |n| state_dir(&root, n),
            |stale| destroy_remains(stale.slot, stale.state_dir.as_deref()),
        )?;
        let lab = Lab::new(cfg, slot, ControlPlane::with_topology(slot, topology));
        if let Err(e) = lab.build(objects) {
            if let Err(t) = lab.teardown() {
                tracing::warn!(slot, error = %t, "teardown after a failed up");
            }
            return Err(e);
        }
        Ok(lab)
    }

    fn new(cfg: LabConfig, slot: u8, control: ControlPlane) -> Lab {
        let topology = control.topology();
        let inner = Inner { control, servers: BTreeMap::new(), torn_down: false };
        let state_dir = state_dir(&cfg.state_root, slot);
        Lab { state_dir, cfg, slot, topology, inner: Mutex::new(inner) }
    }

    fn build(&self, objects: Vec<Object>) -> Result<(), LabError> {
        // Remains of a lab whose slot file vanished; the slot is ours now.
        destroy_remains(self.slot, Some(&self.state_dir))?;
        let manifests = self.manifests_dir();
        fs::create_dir_all(&manifests).map_err(io_err("creating", &manifests))?;
        match self.topology {
            Topology::Single => netns::create_node(&self.node_netns(), naming::node_ip(self.slot))?,
            Topology::Underlay { .. } => underlay::create(self.slot, self.topology)?,
        }
        if self.cfg.persistent {
            let current = current_path(&self.cfg.state_root);
            files::write_atomic(&current, format!("{}\n", self.slot).as_bytes())
                .map_err(io_err("writing", &current))?;
        }
        self.apply_objects(objects)
    }

    /// Reopens a lab from its `state.json`, e.g. one made by an earlier `nodeplane-lab up`.
    pub fn open(cfg: LabConfig, slot: u8) -> Result<Lab, LabError> {
        let path = state_dir(&cfg.state_root, slot).join("state.json");
        let text = fs::read(&path).map_err(io_err("reading", &path))?;
        let saved: SavedState =
            serde_json::from_slice(&text).map_err(|source| LabError::State { path, source })?;
        Ok(Lab::new(cfg, saved.slot, saved.control_plane))
    }

    /// The lab `nodeplane-lab up` made last, if it is still there.
    pub fn open_current(cfg: LabConfig) -> Result<Lab, LabError> {
        let slot = current_slot(&cfg.state_root)?
            .ok_or_else(|| LabError::NoCurrentLab(cfg.state_root.clone()))?;
        Lab::open(cfg, slot)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // State is committed only at the end of each change, so after a panic elsewhere
        // it is still consistent and teardown must still be able to run.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds or replaces objects by (kind, namespace, name). New pods get a netns and a
    /// server; a replaced pod keeps its IP, and its server restarts only if its ports
    /// changed. Slices are derived again and the manifests rewritten if they changed.
    pub fn apply(&self, docs: &[(impl AsRef<str>, impl AsRef<str>)]) -> Result<(), LabError> {
        let objects = parse_sources(docs)?;
        self.apply_objects(objects)
    }

    fn apply_objects(&self, objects: Vec<Object>) -> Result<(), LabError> {
        let mut inner = self.lock();
        let mut next = inner.control.clone();
        next.apply(objects)?;
        let started = self.start_pods(&mut inner, &next).and_then(|started| {
            self.wait_ready(&mut inner, &next, &started)?;
            Ok(started)
        });
        if let Err(e) = started {
            self.undo_new_pods(&mut inner, &next);
            return Err(e);
        }
        inner.control = next;
        self.publish(&inner.control)
    }

    /// Writes the manifests (only if they changed) and `state.json`.
    fn publish(&self, control: &ControlPlane) -> Result<(), LabError> {
        let yaml = control.cluster()?.to_yaml()?;
        let manifest = self.manifests_dir().join(CLUSTER_MANIFEST);
        files::write_if_changed(&manifest, yaml.as_bytes())
            .map_err(io_err("writing", &manifest))?;
        let saved = SavedState { slot: self.slot, control_plane: control.clone() };
        let state = self.state_dir.join("state.json");
        let json = serde_json::to_vec_pretty(&saved)
            .map_err(|source| LabError::State { path: state.clone(), source })?;
        files::write_atomic(&state, &json).map_err(io_err("writing", &state))
    }

    /// Deletes one object; a deleted pod's netns and server go too, after the manifests
    /// no longer list it. `kind` is a [`Kind`] or a kubectl-style name (`"Service"`,
    /// `"svc"`, `"pods"`). For a Namespace, `name` is the namespace and everything in it
    /// is deleted; `namespace` is ignored.
    pub fn delete(
        &self,
        kind: impl AsRef<str>,
        namespace: &str,
        name: &str,
    ) -> Result<(), LabError> {
        let kind: Kind = kind.as_ref().parse()?;
        let key = match kind {
            Kind::Namespace => ObjectKey::new("", name),
            _ => ObjectKey::new(namespace, name),
        };
        let mut inner = self.lock();
        let mut next = inner.control.clone();
        next.delete(kind, &key)?;
        let gone: Vec<ObjectKey> = inner
            .control
            .pods()
            .map(|(k, _)| k.clone())
            .filter(|k| next.pod(k).is_none())
            .collect();
        inner.control = next;
        self.publish(&inner.control)?;
        for key in gone {
            self.remove_pod(&mut inner, &key)?;
        }
        Ok(())
    }

    /// Relabels a pod or a namespace, as `kubectl label --overwrite` would: `(key,
    /// Some(value))` sets a label, `(key, None)` removes it. For a Namespace, `name` is the
    /// namespace and `namespace` is ignored. Pods keep their netns, IP and server.
    pub fn label(
        &self,
        kind: impl AsRef<str>,
        namespace: &str,
        name: &str,
        changes: &[(&str, Option<&str>)],
    ) -> Result<(), LabError> {
        let kind: Kind = kind.as_ref().parse()?;
        let key = match kind {
            Kind::Namespace => ObjectKey::new("", name),
            _ => ObjectKey::new(namespace, name),
        };
        let mut inner = self.lock();
        let mut next = inner.control.clone();
        next.label(kind, &key, changes)?;
        inner.control = next;
        self.publish(&inner.control)
    }

    /// Flips a pod's Ready condition (through its `lab.nodeplane.io/ready` annotation).
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> Result<(), LabError> {
        let mut inner = self.lock();
        inner.control.set_pod_ready(&ObjectKey::new(namespace, name), ready)?;
        self.publish(&inner.control)
    }

    pub fn slot(&self) -> u8 {
        self.slot
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The directory to give the agent as `--manifests`.
    pub fn manifests_dir(&self) -> PathBuf {
        self.state_dir.join("manifests")
    }

    pub fn node_netns(&self) -> String {
        naming::node_netns(self.slot)
    }

    /// The netns name of a pod (whether or not the pod exists).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> String {
        naming::pod_netns(self.slot, namespace, name)
    }

    /// A snapshot of the control-plane state (inputs and addresses).
    pub fn control_plane(&self) -> ControlPlane {
        self.lock().control.clone()
    }

    pub fn pod_ip(&self, namespace: &str, name: &str) -> Result<Ipv4Addr, LabError> {
        let key = ObjectKey::new(namespace, name);
        self.lock().control.pod_ip(&key).ok_or(LabError::UnknownPod(key))
    }

    pub fn service_ip(&self, namespace: &str, name: &str) -> Result<Ipv4Addr, LabError> {
        let key = ObjectKey::new(namespace, name);
        self.lock().control.service_ip(&key).ok_or(LabError::UnknownService(key))
    }

    /// `<state_dir>/<name>.log`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.log"))
    }

    /// Tears the lab down now, persistent or not.
    pub fn down(self) -> Result<(), LabError> {
        self.teardown()
    }
}

fn current_path(state_root: &Path) -> PathBuf {
    state_root.join("current")
}

/// The slot `nodeplane-lab up` recorded last under `state_root`.
pub fn current_slot(state_root: &Path) -> Result<Option<u8>, LabError> {
    let path = current_path(state_root);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}
