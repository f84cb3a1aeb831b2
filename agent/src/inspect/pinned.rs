//! Opening what the agent pinned ([`crate::pin`]) for reading, with errors that say what
//! to do: not root, nothing pinned, a layout this build does not know, programs not pinned
//! yet.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{ProgramError, SchedClassifier},
};
use nodeplane_common::{
    maps::{BackendV4, Counter, CtKeyV4, CtValueV4, ServiceKeyV4, ServiceValue, SlotKey, names},
    policy::{
        EndpointV4, IpcacheKeyV4, PolicyConfig, PolicyCtKey, PolicyCtValue, PolicyKey, PolicyValue,
    },
};

use crate::{
    datapath::EBPF_OBJECT,
    pin::{self, Found, Layout, LinkPin, PinDir, PinError},
    policy::compute::PolicyLookup,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "inspect reads the pinned maps with bpf(2), which needs root with CAP_BPF: run it \
         with sudo on the node, or in the agent's container (kubectl exec)"
    )]
    NotRoot,
    #[error(
        "nothing is pinned under {}: the agent is not installed on this node, has not \
         started yet, or runs with another --bpffs-dir (NODEPLANE_BPFFS_DIR)",
        .0.display()
    )]
    NotInstalled(PathBuf),
    #[error(
        "{} is not on a bpf filesystem: no agent pinned anything there (is bpffs mounted \
         on /sys/fs/bpf? is --bpffs-dir right?)",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error(
        "map {map} is not pinned under {}: the agent that pinned this directory is an \
         older build, or is still starting",
        dir.display()
    )]
    MapNotPinned { map: String, dir: PathBuf },
    #[error(
        "map {map} is pinned with another layout ({}), not the {expected} this binary \
         reads: the running agent and this binary are different builds; run the agent's \
         own binary (e.g. `kubectl exec` into its pod)",
        found.display()
    )]
    LayoutMismatch { map: String, expected: String, found: PathBuf },
    #[error(
        "the programs are not pinned under {}: the agent has not finished its first sync \
         yet (or stopped before it); `trace` needs them, `services`, `conntrack`, `nat` \
         and `policy` do not",
        .0.display()
    )]
    ProgramsNotPinned(PathBuf),
    #[error("opening the pinned map {}: {source}", path.display())]
    OpenMap { path: PathBuf, source: MapError },
    #[error("opening the pinned program {}: {source}", path.display())]
    OpenProgram { path: PathBuf, source: ProgramError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("running {program} with BPF_PROG_TEST_RUN: {source}")]
    TestRun { program: &'static str, source: ProgramError },
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Names(#[from] super::names::NamesError),
    #[error("{0}")]
    Usage(String),
}

/// Policy entries as `((key, prefix length), value)`: the trie's and the exact hash's.
pub type PolicyEntries = Vec<((PolicyKey, u32), PolicyValue)>;

/// The pinned maps `inspect` reads (and `trace` cleans up after itself in).
pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKeyV4, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, BackendV4>,
    pub ct: HashMap<MapData, CtKeyV4, CtValueV4>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub ipcache: LpmTrie<MapData, IpcacheKeyV4, u32>,
    pub endpoints: HashMap<MapData, [u8; 4], EndpointV4>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    pub policy_config: Array<MapData, PolicyConfig>,
    pub policy_ct: HashMap<MapData, PolicyCtKey, PolicyCtValue>,
    /// The SNAT table.
    pub nat: HashMap<MapData, CtKeyV4, nodeplane_common::nat::NatValueV4>,
}

/// The pinned `from_pod` and `to_pod`: the programs the links run.
pub struct PinnedPrograms {
    pub from_pod: SchedClassifier,
    pub to_pod: SchedClassifier,
}

/// A node's pin directory, checked.
pub struct Pins {
    dir: PinDir,
    layouts: BTreeMap<String, Layout>,
}

impl Pins {
    /// Checks that `dir` holds a datapath this binary can read.
    pub fn open(dir: &Path) -> Result<Self, InspectError> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(InspectError::NotRoot);
        }
        if !dir.exists() {
            return Err(InspectError::NotInstalled(dir.to_path_buf()));
        }
        if !pin::on_bpffs(dir).unwrap_or(false) {
            return Err(InspectError::NotBpffs(dir.to_path_buf()));
        }
        let pins = PinDir::new(dir);
        if !pins.installed() {
            return Err(InspectError::NotInstalled(dir.to_path_buf()));
        }
        let layouts = pin::object_layouts(EBPF_OBJECT, &[])?;
        Ok(Self { dir: pins, layouts })
    }

    pub fn dir(&self) -> &PinDir {
        &self.dir
    }

    /// The pin of map `name` in this build's layout. A pin of the same layout but another
    /// capacity (an agent started with other sizes) is accepted: the kernel knows the size.
    pub fn map_path(&self, name: &str) -> Result<PathBuf, InspectError> {
        let layout = &self.layouts.get(name).ok_or_else(|| InspectError::MapNotPinned {
            map: name.to_string(),
            dir: self.dir.root().to_path_buf(),
        })?;
        match self.dir.find_map(name, layout)? {
            Found::Pin(path) => Ok(path),
            Found::OtherLayout(found) => Err(InspectError::LayoutMismatch {
                map: name.to_string(),
                expected: layout.pin_name(name),
                found,
            }),
            Found::Missing => Err(InspectError::MapNotPinned {
                map: name.to_string(),
                dir: self.dir.root().to_path_buf(),
            }),
        }
    }

    fn map<T>(&self, name: &'static str) -> Result<T, InspectError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let path = self.map_path(name)?;
        let open = |source| InspectError::OpenMap { path: path.clone(), source };
        let data = MapData::from_pin(&path).map_err(open)?;
        let map = Map::from_map_data(data).map_err(open)?;
        T::try_from(map).map_err(open)
    }

    pub fn maps(&self) -> Result<PinnedMaps, InspectError> {
        Ok(PinnedMaps {
            services: self.map(names::SERVICES_V4)?,
            slots: self.map(names::BACKEND_SLOTS)?,
            backends: self.map(names::BACKENDS_V4)?,
            ct: self.map(names::CT_V4)?,
            counters: self.map(names::COUNTERS)?,
            ipcache: self.map(names::IPCACHE_V4)?,
            endpoints: self.map(names::ENDPOINTS_V4)?,
            policy: self.map(names::POLICY_V4)?,
            policy_exact: self.map(names::POLICY_EXACT_V4)?,
            policy_config: self.map(names::POLICY_CONFIG)?,
            policy_ct: self.map(names::POLICY_CT_V4)?,
            nat: self.map(names::NAT_V4)?,
        })
    }

    pub fn programs(&self) -> Result<PinnedPrograms, InspectError> {
        let open = |name: &str| {
            let path = self.dir.prog(name);
            if !path.exists() {
                return Err(InspectError::ProgramsNotPinned(self.dir.progs_dir()));
            }
            SchedClassifier::from_pin(&path)
                .map_err(|source| InspectError::OpenProgram { path: path.clone(), source })
        };
        Ok(PinnedPrograms {
            from_pod: open(names::PROG_FROM_POD)?,
            to_pod: open(names::PROG_TO_POD)?,
        })
    }

    pub fn links(&self) -> Result<Vec<LinkPin>, InspectError> {
        Ok(self.dir.link_pins()?)
    }
}

impl PinnedMaps {
    /// Every entry of a hash map, sorted (entries deleted during the walk are skipped).
    pub fn all<K: aya::Pod + Ord, V: aya::Pod>(
        map: &HashMap<MapData, K, V>,
        name: &'static str,
    ) -> Result<BTreeMap<K, V>, InspectError> {
        let mut out = BTreeMap::new();
        for entry in map.iter() {
            match entry {
                Ok((k, v)) => {
                    out.insert(k, v);
                }
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(InspectError::Map { map: name, source }),
            }
        }
        Ok(out)
    }

    /// The current policy revision.
    pub fn policy_revision(&self) -> Result<u32, InspectError> {
        self.policy_config
            .get(&0, 0)
            .map(|c| c.revision)
            .map_err(|source| InspectError::Map { map: names::POLICY_CONFIG, source })
    }

    /// Every policy entry `((key, prefix length), value)`: the trie's and the exact hash's.
    pub fn policy_entries(&self) -> Result<PolicyEntries, InspectError> {
        let mut out = Vec::new();
        for entry in self.policy.iter() {
            match entry {
                Ok((k, v)) => out.push(((k.data(), k.prefix_len()), v)),
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(InspectError::Map { map: names::POLICY_V4, source }),
            }
        }
        for (k, v) in Self::all(&self.policy_exact, names::POLICY_EXACT_V4)? {
            out.push(((k, PolicyKey::PREFIX_FULL), v));
        }
        out.sort();
        Ok(out)
    }

    /// Removes conntrack entries `trace` created; absent ones are not an error. Returns how
    /// many were removed.
    pub fn remove_conntrack(
        &mut self,
        ct: &[CtKeyV4],
        policy_ct: &[PolicyCtKey],
    ) -> Result<usize, InspectError> {
        let gone = |e: &MapError| {
            matches!(e, MapError::KeyNotFound)
                || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
        };
        let mut removed = 0;
        for key in ct {
            match self.ct.remove(key) {
                Ok(()) => removed += 1,
                Err(e) if gone(&e) => {}
                Err(source) => return Err(InspectError::Map { map: names::CT_V4, source }),
            }
        }
        for key in policy_ct {
            match self.policy_ct.remove(key) {
                Ok(()) => removed += 1,
                Err(e) if gone(&e) => {}
                Err(source) => return Err(InspectError::Map { map: names::POLICY_CT_V4, source }),
            }
        }
        Ok(removed)
    }
}

/// The same lookups the datapath makes, on the live maps: `inspect` explains a verdict
/// with [`PolicyLookup::verdict`], which the agent's own tests hold to the datapath's.
impl PolicyLookup for PinnedMaps {
    fn ipcache(&self, addr: Ipv4Addr) -> Option<u32> {
        self.ipcache.get(&Key::new(32, addr.octets()), 0).ok()
    }

    fn endpoint(&self, addr: Ipv4Addr) -> Option<EndpointV4> {
        self.endpoints.get(&addr.octets(), 0).ok()
    }

    fn rule(&self, key: &PolicyKey) -> Option<PolicyValue> {
        self.policy_exact
            .get(key, 0)
            .ok()
            .or_else(|| self.policy.get(&Key::new(PolicyKey::PREFIX_FULL, *key), 0).ok())
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns()`, hence of every deadline in
/// the conntrack maps.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime(2) writes one timespec into `ts`.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
