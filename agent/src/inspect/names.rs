//! The names snapshot: what the numbers in the maps stand for, written by the agent for
//! `inspect` (which cannot ask the agent: it also works while no agent runs).
//!
//! ```text
//! Agent::sync ──(a Service, Pod, Namespace or NetworkPolicy changed)──▶ NamesSnapshot::build
//!     ──▶ NamesPublisher (latest wins) ──thread──▶ <state dir>/names.json  (temp file + rename)
//! inspect ──▶ NamesSnapshot::read: Service per frontend, pod per IP, identity, set and rule names
//! ```
//!
//! * Written only by a sync that may have changed names: one that recomputed the service
//!   frontends (an EndpointSlice-only change does not) or the policy maps (any Pod,
//!   Namespace or NetworkPolicy change). Building the snapshot copies names only (about a
//!   millisecond at 10,000 pods); serializing and writing happen on the publisher's
//!   thread, which skips the write when the bytes did not change and keeps only the latest
//!   snapshot when syncs come faster than writes.
//! * The file is replaced with `rename(2)`, so a reader sees the old or the new one whole.
//! * It is a convenience: `inspect` falls back to numbers without it, and a stale file
//!   (an agent that stopped) only names things by their last known names, which the
//!   output marks with the snapshot's time.
use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::SystemTime,
};

use nodeplane_common::maps::ServiceKeyV4;
use serde::{Deserialize, Serialize};

use crate::{
    desired::Desired,
    index::Index,
    model::{Labels, ObjectKey},
    policy::compute::Names,
};

/// The snapshot's file in the agent's `--state-dir`.
pub const NAMES_FILE: &str = "names.json";
/// Bumped when a field changes meaning; readers refuse other versions.
pub const NAMES_VERSION: u32 = 1;

/// Everything `inspect` names, keyed as the maps key it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NamesSnapshot {
    pub version: u32,
    /// Unix seconds when the agent built it.
    pub written_at: u64,
    /// The agent's node, if it knows it: pods on it are local.
    pub node: Option<String>,
    /// One per frontend in `SERVICES_V4`.
    pub services: Vec<ServiceName>,
    /// Pods with an IP.
    pub pods: Vec<PodName>,
    /// Identity -> what it stands for.
    pub identities: BTreeMap<u32, IdentityEntry>,
    /// Policy set -> its direction and the policies isolating its pods.
    pub sets: BTreeMap<u32, SetEntry>,
    /// Rule id -> the rules allowing what entries with that id match.
    pub rules: BTreeMap<u32, Vec<RuleEntry>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceName {
    pub vip: Ipv4Addr,
    pub port: u16,
    /// The IP protocol number, as in the map key.
    pub proto: u8,
    /// `namespace/name` of the Service.
    pub service: String,
    /// The ServicePort's name (empty for a single unnamed port).
    pub port_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodName {
    /// `namespace/name`.
    pub pod: String,
    pub ip: Ipv4Addr,
    pub node: Option<String>,
    /// Shares its node's address: never the pod an address names when another pod has it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityEntry {
    /// One line, as the flow log names it (`3 pod(s), e.g. x/a; 10.0.0.0/8`).
    pub description: String,
    /// The labels of its example pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetEntry {
    /// `ingress` or `egress`.
    pub direction: String,
    pub policies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEntry {
    /// `namespace/name` of the NetworkPolicy.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// Index into the policy's `ingress` or `egress` list.
    pub index: u32,
}

impl NamesSnapshot {
    /// The names as of the agent's index, desired service state and last policy compute.
    pub fn build(
        index: &Index,
        desired: &Desired,
        policy: Option<&Names>,
        node: Option<&str>,
    ) -> Self {
        let services = desired
            .frontends
            .iter()
            .map(|(key, f)| ServiceName {
                vip: key.addr.into(),
                port: key.port(),
                proto: key.proto,
                service: f.service.to_string(),
                port_name: f.port_name.clone(),
            })
            .collect();
        let pods = index
            .pods()
            .filter_map(|p| {
                Some(PodName {
                    pod: p.key.to_string(),
                    ip: p.ip?,
                    node: p.node_name.clone(),
                    host_network: p.host_network,
                })
            })
            .collect();
        let mut snapshot = Self {
            version: NAMES_VERSION,
            written_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            node: node.map(str::to_string),
            services,
            pods,
            ..Self::default()
        };
        if let Some(names) = policy {
            snapshot.identities = names
                .identities
                .iter()
                .map(|(id, n)| {
                    let entry =
                        IdentityEntry { description: n.to_string(), labels: n.labels.clone() };
                    (*id, entry)
                })
                .collect();
            snapshot.sets = names
                .sets
                .iter()
                .map(|(id, s)| {
                    let policies = s.policies.iter().map(ObjectKey::to_string).collect();
                    (*id, SetEntry { direction: s.dir.to_string(), policies })
                })
                .collect();
            snapshot.rules = names
                .rules
                .iter()
                .map(|(id, rules)| {
                    let rules = rules
                        .iter()
                        .map(|r| RuleEntry {
                            policy: r.policy.to_string(),
                            direction: r.dir.to_string(),
                            index: r.rule,
                        })
                        .collect();
                    (*id, rules)
                })
                .collect();
        }
        snapshot
    }

    /// Reads `dir/names.json`: `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>, NamesError> {
        let path = dir.join(NAMES_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NamesError::Io { path, source }),
        };
        let snapshot: Self = serde_json::from_slice(&bytes)
            .map_err(|source| NamesError::Parse { path: path.clone(), source })?;
        if snapshot.version != NAMES_VERSION {
            return Err(NamesError::Version { path, version: snapshot.version });
        }
        Ok(Some(snapshot))
    }

    /// Writes it to `dir/names.json` atomically (a temporary file in `dir`, then
    /// `rename(2)`), creating `dir` if needed.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        write_atomic(dir, &serde_json::to_vec(self).map_err(io::Error::other)?)
    }
}

fn write_atomic(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{NAMES_FILE}.{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, dir.join(NAMES_FILE)).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not a names snapshot: {source}", path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{} has version {version}, this binary reads {NAMES_VERSION}: a different build wrote it", path.display())]
    Version { path: PathBuf, version: u32 },
}

/// Lookups `inspect` makes in a snapshot (absent snapshot: every answer is `None`).
#[derive(Clone, Debug, Default)]
pub struct NameIndex {
    snapshot: Option<NamesSnapshot>,
    services: HashMap<ServiceKeyV4, usize>,
    /// IP -> index of its pod in `snapshot.pods` (pod-network pods win over host-network ones).
    pod_by_ip: HashMap<Ipv4Addr, usize>,
    pod_by_name: HashMap<String, usize>,
}

impl NameIndex {
    pub fn new(snapshot: Option<NamesSnapshot>) -> Self {
        let mut index = Self::default();
        if let Some(s) = &snapshot {
            for (i, svc) in s.services.iter().enumerate() {
                index.services.insert(ServiceKeyV4::new(svc.vip.octets(), svc.port, svc.proto), i);
            }
            for (i, pod) in s.pods.iter().enumerate() {
                index.pod_by_name.insert(pod.pod.clone(), i);
                let better = match index.pod_by_ip.get(&pod.ip) {
                    None => true,
                    Some(&j) => s.pods[j].host_network && !pod.host_network,
                };
                if better {
                    index.pod_by_ip.insert(pod.ip, i);
                }
            }
        }
        index.snapshot = snapshot;
        index
    }

    pub fn snapshot(&self) -> Option<&NamesSnapshot> {
        self.snapshot.as_ref()
    }

    pub fn service(&self, key: &ServiceKeyV4) -> Option<&ServiceName> {
        let s = self.snapshot.as_ref()?;
        self.services.get(key).map(|&i| &s.services[i])
    }

    pub fn pod_at(&self, ip: Ipv4Addr) -> Option<&PodName> {
        let s = self.snapshot.as_ref()?;
        self.pod_by_ip.get(&ip).map(|&i| &s.pods[i])
    }

    pub fn pod_named(&self, name: &str) -> Option<&PodName> {
        let s = self.snapshot.as_ref()?;
        self.pod_by_name.get(name).map(|&i| &s.pods[i])
    }

    /// Whether the snapshot says `ip` is a pod on the agent's node (`None`: it cannot say).
    pub fn is_local_pod(&self, ip: Ipv4Addr) -> Option<bool> {
        let node = self.snapshot.as_ref()?.node.as_ref()?;
        Some(self.pod_at(ip).is_some_and(|p| !p.host_network && p.node.as_ref() == Some(node)))
    }

    pub fn identity(&self, id: u32) -> Option<&IdentityEntry> {
        self.snapshot.as_ref()?.identities.get(&id)
    }

    pub fn set(&self, id: u32) -> Option<&SetEntry> {
        self.snapshot.as_ref()?.sets.get(&id)
    }

    pub fn rules(&self, id: u32) -> &[RuleEntry] {
        self.snapshot.as_ref().and_then(|s| s.rules.get(&id)).map_or(&[], Vec::as_slice)
    }
}

/// Hands snapshots to a writer thread: [`publish`](Self::publish) never blocks on I/O, and
/// only the latest snapshot not yet written is kept.
#[derive(Clone)]
pub struct NamesPublisher {
    shared: Arc<(Mutex<Option<NamesSnapshot>>, Condvar)>,
}

impl NamesPublisher {
    /// Starts the writer thread for `dir/names.json`. It lives as long as the process.
    pub fn spawn(dir: PathBuf) -> io::Result<Self> {
        let shared: Arc<(Mutex<Option<NamesSnapshot>>, Condvar)> = Arc::default();
        let theirs = shared.clone();
        std::thread::Builder::new().name("names-writer".into()).spawn(move || {
            let mut last: Vec<u8> = Vec::new();
            loop {
                let next = {
                    let (lock, ready) = &*theirs;
                    let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if let Some(s) = slot.take() {
                            break s;
                        }
                        slot = ready.wait(slot).unwrap_or_else(|e| e.into_inner());
                    }
                };
                // The time alone changing is not a change worth a write.
                let bytes =
                    match serde_json::to_vec(&NamesSnapshot { written_at: 0, ..next.clone() }) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::warn!(error = %e, "serializing the names snapshot");
                            continue;
                        }
                    };
                if bytes == last {
                    continue;
                }
                match next.write(&dir) {
                    Ok(()) => last = bytes,
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
                                             "writing the names snapshot for `inspect`"),
                }
            }
        })?;
        Ok(Self { shared })
    }

    /// Replaces the snapshot waiting to be written.
    pub fn publish(&self, snapshot: NamesSnapshot) {
        let (lock, ready) = &*self.shared;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
        ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> NamesSnapshot {
        NamesSnapshot {
            version: NAMES_VERSION,
            written_at: 1,
            node: Some("n1".into()),
            services: vec![ServiceName {
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                proto: 6,
                service: "demo/web".into(),
                port_name: "http".into(),
            }],
            pods: vec![
                PodName {
                    pod: "demo/web-0".into(),
                    ip: Ipv4Addr::new(10, 244, 0, 2),
                    node: Some("n1".into()),
                    host_network: false,
                },
                PodName {
                    pod: "kube-system/proxy".into(),
                    ip: Ipv4Addr::new(192, 168, 0, 1),
                    node: Some("n1".into()),
                    host_network: true,
                },
                PodName {
                    pod: "demo/far".into(),
                    ip: Ipv4Addr::new(10, 244, 9, 2),
                    node: Some("n2".into()),
                    host_network: false,
                },
            ],
            identities: [(
                300,
                IdentityEntry {
                    description: "1 pod(s), e.g. demo/web-0".into(),
                    labels: Labels::new(),
                },
            )]
            .into(),
            sets: [(
                7,
                SetEntry { direction: "ingress".into(), policies: vec!["demo/deny".into()] },
            )]
            .into(),
            rules: [(
                9,
                vec![RuleEntry {
                    policy: "demo/allow".into(),
                    direction: "ingress".into(),
                    index: 0,
                }],
            )]
            .into(),
        }
    }

    #[test]
    fn written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(NamesSnapshot::read(&state).unwrap().is_none(), "no file is not an error");
        let s = sample();
        s.write(&state).unwrap();
        assert_eq!(NamesSnapshot::read(&state).unwrap(), Some(s.clone()));
        let leftovers: Vec<_> =
            fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(NAMES_FILE)], "no temporary file left");
        fs::write(state.join(NAMES_FILE), "{\"version\": 99}").unwrap();
        let err = NamesSnapshot::read(&state).unwrap_err().to_string();
        assert!(err.contains("not a names snapshot") || err.contains("version"), "{err}");
    }

    #[test]
    fn the_index_names_services_pods_and_ids() {
        let names = NameIndex::new(Some(sample()));
        let key = ServiceKeyV4::new([10, 96, 0, 10], 80, 6);
        assert_eq!(names.service(&key).unwrap().service, "demo/web");
        assert_eq!(names.pod_at(Ipv4Addr::new(10, 244, 0, 2)).unwrap().pod, "demo/web-0");
        assert_eq!(names.pod_named("demo/web-0").unwrap().ip, Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(names.is_local_pod(Ipv4Addr::new(10, 244, 0, 2)), Some(true));
        assert_eq!(names.is_local_pod(Ipv4Addr::new(10, 244, 9, 2)), Some(false));
        assert_eq!(names.is_local_pod(Ipv4Addr::new(192, 168, 0, 1)), Some(false), "host network");
        assert_eq!(names.rules(9)[0].policy, "demo/allow");
        assert!(names.rules(10).is_empty());
        assert_eq!(names.set(7).unwrap().policies, vec!["demo/deny".to_string()]);
        let none = NameIndex::new(None);
        assert!(none.service(&key).is_none() && none.is_local_pod(Ipv4Addr::LOCALHOST).is_none());
    }

    /// The agent publishes after its syncs: Service names per frontend, pods, and the
    /// names of the policy numbers, as `inspect` reads them.
    #[test]
    fn the_agent_publishes_names_after_a_sync() {
        use std::{sync::Arc, time::Duration};

        use crate::{
            agent::Agent,
            desired::NodeContext,
            health::Health,
            index::test_helpers::mk_service,
            metrics::Metrics,
            source::{Batch, Event, Kind, Object},
            sync::FakeMaps,
        };

        fn k8s<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
            serde_json::from_value(v).expect("k8s object")
        }
        let dir = tempfile::tempdir().unwrap();
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let mut agent = Agent::new(NodeContext::named("n1"), health, Arc::new(Metrics::new()));
        agent.publish_names(NamesPublisher::spawn(dir.path().to_path_buf()).unwrap());
        let ns: k8s_openapi::api::core::v1::Namespace =
            k8s(serde_json::json!({ "metadata": { "name": "a" } }));
        let pod: k8s_openapi::api::core::v1::Pod = k8s(serde_json::json!({
            "metadata": { "namespace": "a", "name": "db", "labels": { "app": "db" } },
            "spec": { "nodeName": "n1", "containers": [] },
            "status": { "phase": "Running", "podIP": "10.0.0.1" },
        }));
        let policy: k8s_openapi::api::networking::v1::NetworkPolicy = k8s(serde_json::json!({
            "metadata": { "namespace": "a", "name": "deny" },
            "spec": { "podSelector": {}, "ingress": [{ "ports": [{ "port": 80 }] }] },
        }));
        let mut events: Vec<Event> = Kind::ALL.map(|kind| Event::Reset(kind, vec![])).into();
        events.push(Event::Apply(ns.into()));
        events.push(Event::Apply(pod.into()));
        events.push(Event::Apply(policy.into()));
        events.push(Event::Apply(Object::from(mk_service(
            "a",
            "web",
            "10.96.0.10",
            &[("http", 80, "")],
        ))));
        agent.handle(Batch::now(events));
        agent.sync(&mut FakeMaps::new()).expect("sync");

        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let s = loop {
            if let Ok(Some(s)) = NamesSnapshot::read(dir.path()) {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "no names.json after the sync");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(s.node.as_deref(), Some("n1"));
        let names = NameIndex::new(Some(s.clone()));
        let web = names.service(&ServiceKeyV4::new([10, 96, 0, 10], 80, 6)).expect("the frontend");
        assert_eq!((web.service.as_str(), web.port_name.as_str()), ("a/web", "http"));
        assert_eq!(names.pod_named("a/db").map(|p| p.ip), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(names.is_local_pod(Ipv4Addr::new(10, 0, 0, 1)), Some(true));
        assert!(s.sets.values().any(|set| set.policies == ["a/deny"]), "{:?}", s.sets);
        assert!(
            s.rules.values().flatten().any(|r| r.policy == "a/deny" && r.index == 0),
            "{:?}",
            s.rules
        );
    }

    #[test]
    fn the_publisher_writes_the_latest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let publisher = NamesPublisher::spawn(dir.path().to_path_buf()).unwrap();
        let mut s = sample();
        publisher.publish(s.clone());
        s.node = Some("n2".into());
        publisher.publish(s.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Ok(Some(read)) = NamesSnapshot::read(dir.path())
                && read.node.as_deref() == Some("n2")
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the snapshot was not written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
