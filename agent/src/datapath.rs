//! The kernel side as the agent sees it: load the embedded eBPF object, attach the tc
//! program to pod interfaces, write the service maps ([`MapWriter`]) and the policy maps
//! ([`PolicyWriter`]), and read counters and map sizes.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::Key,
    },
    programs::{SchedClassifier, TcAttachType},
};
use nodeplane_common::{
    maps::{BackendV4, Counter, CtKeyV4, CtValueV4, ServiceKeyV4, ServiceValue, SlotKey, names},
    policy::{
        EndpointV4, FragKeyV4, FragValueV4, IpcacheKeyV4, PolicyConfig, PolicyCounterKey,
        PolicyCtKey, PolicyCtValue, PolicyKey, PolicyValue,
    },
    reason::Reason,
};

use crate::{
    model::Ipv4Cidr,
    policy::{PolicyOp, PolicyWriteError, PolicyWriter},
    sync::{MapWriter, Op, WriteError},
};

/// The eBPF object built by `build.rs` from `dataplane-ebpf/`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeplane"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("map {name}: duplicating its descriptor: {source}")]
    Dup { name: &'static str, source: std::io::Error },
    #[error("attaching to {iface}: {source}")]
    Attach { iface: String, source: aya::programs::ProgramError },
    #[error("listing network interfaces: {0}")]
    Interfaces(std::io::Error),
}

/// A loaded datapath. Dropping it detaches every program and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    attached: BTreeSet<String>,
}

/// Typed handles on the maps, taken out of the object at load.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKeyV4, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, BackendV4>,
    pub ct: HashMap<MapData, CtKeyV4, CtValueV4>,
    pub counters: PerCpuArray<MapData, Counter>,
    /// Peer prefix -> identity.
    pub ipcache: LpmTrie<MapData, IpcacheKeyV4, u32>,
    /// Local pod IP -> its policy sets.
    pub endpoints: HashMap<MapData, [u8; 4], EndpointV4>,
    /// `(set, identity, proto, port)` prefixes -> the allowing rule.
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    /// The full-length policy entries (`POLICY_EXACT_V4`); `PolicyWriter` routes them here.
    pub policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    /// One element: revision and flags.
    pub policy_config: Array<MapData, PolicyConfig>,
    /// The datapath's policy conntrack (an LRU; read here for `inspect` and tests).
    pub policy_ct: HashMap<MapData, PolicyCtKey, PolicyCtValue>,
    /// Allowed first fragments (an LRU written by the datapath).
    pub frags: HashMap<MapData, FragKeyV4, FragValueV4>,
    /// New-flow verdict counters, per CPU.
    pub policy_counters: PerCpuHashMap<MapData, PolicyCounterKey, Counter>,
    /// Per CPU: `[flow events written, flow events lost]`.
    pub flow_event_counters: PerCpuArray<MapData, u64>,
    /// The `FLOW_EVENTS` ring buffer until the flow-log reader takes it.
    flow_events: Option<RingBuf<MapData>>,
}

/// Policy verdict counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// New-flow verdicts: allows by rule id, denies by policy set (see `PolicyCounterKey`).
    pub verdicts: BTreeMap<PolicyCounterKey, Counter>,
    /// Flow events written to the ring buffer.
    pub events_written: u64,
    /// Flow events lost because the ring buffer was full.
    pub events_lost: u64,
}

impl Datapath {
    /// Loads the embedded object and verifies the program.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(&mut EbpfLoader::new())
    }

    /// Loads with a caller-prepared loader (tests shrink map sizes, later versions pin).
    pub fn load_with(loader: &mut EbpfLoader<'_>) -> Result<Self, DatapathError> {
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in PROGRAMS.map(|(name, _)| name) {
            classifier_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let maps = Maps {
            services: take_map(&mut ebpf, names::SERVICES_V4)?,
            slots: take_map(&mut ebpf, names::BACKEND_SLOTS)?,
            backends: take_map(&mut ebpf, names::BACKENDS_V4)?,
            ct: take_map(&mut ebpf, names::CT_V4)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            ipcache: take_map(&mut ebpf, names::IPCACHE_V4)?,
            endpoints: take_map(&mut ebpf, names::ENDPOINTS_V4)?,
            policy: take_map(&mut ebpf, names::POLICY_V4)?,
            policy_exact: take_map(&mut ebpf, names::POLICY_EXACT_V4)?,
            policy_config: take_map(&mut ebpf, names::POLICY_CONFIG)?,
            policy_ct: take_map(&mut ebpf, names::POLICY_CT_V4)?,
            frags: take_map(&mut ebpf, names::FRAGS_V4)?,
            policy_counters: take_map(&mut ebpf, names::POLICY_COUNTERS)?,
            flow_event_counters: take_map(&mut ebpf, names::FLOW_EVENT_COUNTERS)?,
            flow_events: Some(take_map(&mut ebpf, names::FLOW_EVENTS)?),
        };
        Ok(Self { ebpf, maps, attached: BTreeSet::new() })
    }

    /// The `from_pod` program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &SchedClassifier {
        self.program_named(names::PROG_FROM_POD)
    }

    /// One of [`PROGRAMS`] by name.
    pub fn program_named(&self, name: &str) -> &SchedClassifier {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("{name} was loaded as a SchedClassifier in load_with"))
    }

    pub fn maps(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Attaches [`PROGRAMS`] to every interface whose name starts with `prefix` and that is
    /// not attached yet. Returns the newly attached names.
    pub fn attach_matching(&mut self, prefix: &str) -> Result<Vec<String>, DatapathError> {
        let names = interface_names().map_err(DatapathError::Interfaces)?;
        let mut new = Vec::new();
        for name in names.into_iter().filter(|n| n.starts_with(prefix)) {
            if self.attached.contains(&name) {
                continue;
            }
            for (prog, hook) in PROGRAMS {
                // tcx (kernel >= 6.6) needs no clsact qdisc; aya falls back to netlink below.
                classifier_mut(&mut self.ebpf, prog)?
                    .attach(&name, hook)
                    .map_err(|source| DatapathError::Attach { iface: name.clone(), source })?;
            }
            self.attached.insert(name.clone());
            new.push(name);
        }
        // Interfaces that disappeared (pod deleted) took their attachment with them.
        let live = interface_names().map_err(DatapathError::Interfaces)?;
        self.attached.retain(|n| live.contains(n));
        Ok(new)
    }

    /// Counters summed over CPUs, one per reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        self.maps.counters()
    }
}

impl Maps {
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = self
                    .counters
                    .get(&(reason as u32), 0)
                    .map_err(|source| DatapathError::Map { name: names::COUNTERS, source })?;
                let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((reason, total))
            })
            .collect()
    }

    /// `POLICY_COUNTERS` and `FLOW_EVENT_COUNTERS`, summed over CPUs.
    pub fn policy_counters(&self) -> Result<PolicyCounters, DatapathError> {
        let mut out = PolicyCounters::default();
        for entry in self.policy_counters.iter() {
            let (key, per_cpu) = entry
                .map_err(|source| DatapathError::Map { name: names::POLICY_COUNTERS, source })?;
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            out.verdicts.insert(key, total);
        }
        let sum = |index: u32| -> Result<u64, DatapathError> {
            let per_cpu = self.flow_event_counters.get(&index, 0).map_err(|source| {
                DatapathError::Map { name: names::FLOW_EVENT_COUNTERS, source }
            })?;
            Ok(per_cpu.iter().sum())
        };
        out.events_written = sum(0)?;
        out.events_lost = sum(1)?;
        Ok(out)
    }

    /// `max_entries` of every hash and LPM map, as the kernel created them (a loader may
    /// have changed the object's sizes), by map name.
    pub fn capacities(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        fn of<K: aya::Pod, V>(
            name: &'static str,
            map: &impl IterableMap<K, V>,
        ) -> Result<(&'static str, u32), DatapathError> {
            let info = map.map().info().map_err(|source| DatapathError::Map { name, source })?;
            Ok((name, info.max_entries()))
        }
        Ok(vec![
            of(names::SERVICES_V4, &self.services)?,
            of(names::BACKEND_SLOTS, &self.slots)?,
            of(names::BACKENDS_V4, &self.backends)?,
            of(names::CT_V4, &self.ct)?,
            of(names::IPCACHE_V4, &self.ipcache)?,
            of(names::ENDPOINTS_V4, &self.endpoints)?,
            of(names::POLICY_V4, &self.policy)?,
            of(names::POLICY_CT_V4, &self.policy_ct)?,
            of(names::FRAGS_V4, &self.frags)?,
        ])
    }

    /// Read-only handles on the maps the datapath itself fills (conntrack, fragments), for
    /// counting their entries off the agent's main loop ([`crate::occupancy`]).
    pub fn census_handles(&self) -> Result<CensusHandles, DatapathError> {
        Ok(CensusHandles {
            ct: BatchReader::new(names::CT_V4, &self.ct)?,
            policy_ct: BatchReader::new(names::POLICY_CT_V4, &self.policy_ct)?,
            frags: BatchReader::new(names::FRAGS_V4, &self.frags)?,
        })
    }

    /// The `FLOW_EVENTS` ring buffer (records are `FlowEvent`s), for the one flow-log
    /// reader: `None` once taken.
    pub fn take_flow_events(&mut self) -> Option<RingBuf<MapData>> {
        self.flow_events.take()
    }
}

/// The maps the datapath fills, on duplicated descriptors: `Send + 'static`, so a census
/// runs on a blocking thread while the main loop keeps the [`Maps`].
#[derive(Debug)]
pub struct CensusHandles {
    pub ct: BatchReader<CtKeyV4, CtValueV4>,
    pub policy_ct: BatchReader<PolicyCtKey, PolicyCtValue>,
    pub frags: BatchReader<FragKeyV4, FragValueV4>,
}

/// Reads a hash map (plain or LRU) whole with `BPF_MAP_LOOKUP_BATCH` (kernel >= 5.6 for
/// both): one `bpf(2)` call per [`BatchReader::CHUNK`] entries, where aya's `iter()` makes
/// two per entry (`GET_NEXT_KEY`, then `LOOKUP_ELEM`). On 6.18, 524,288 `CT_V4` entries
/// take 0.16-0.18 s this way, 0.66 s with `keys()` and 1.4 s with `iter()` (docs/METRICS.md). Read-only: nothing
/// is deleted. Entries written during the walk may be missed or seen once (the kernel walks
/// bucket by bucket), which is fine for counting.
#[derive(Debug)]
pub struct BatchReader<K, V> {
    name: &'static str,
    fd: OwnedFd,
    max_entries: u32,
    _kv: std::marker::PhantomData<fn() -> (K, V)>,
}

/// `bpf(2)` command number of `BPF_MAP_LOOKUP_BATCH` (`include/uapi/linux/bpf.h`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (`include/uapi/linux/bpf.h`, since 5.6).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

impl<K: aya::Pod, V: aya::Pod> BatchReader<K, V> {
    /// Entries asked for per call. The kernel returns whole hash buckets and answers
    /// `ENOSPC` when one bucket alone is larger; buckets hold a handful of entries.
    pub const CHUNK: usize = 4096;

    fn new(name: &'static str, map: &HashMap<MapData, K, V>) -> Result<Self, DatapathError> {
        let data = map.map();
        let max_entries = data.info().map_err(|source| DatapathError::Map { name, source })?;
        let fd = (data.fd().as_fd().try_clone_to_owned())
            .map_err(|source| DatapathError::Dup { name, source })?;
        Ok(Self { name, fd, max_entries: max_entries.max_entries(), _kv: Default::default() })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Calls `f` with every entry; returns how many there were.
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) -> std::io::Result<usize> {
        let (ks, vs) = (size_of::<K>(), size_of::<V>());
        let mut chunk = Self::CHUNK;
        let mut keys = vec![0u8; chunk * ks];
        let mut values = vec![0u8; chunk * vs];
        // The hash map's batch token is a bucket index (u32).
        let (mut token, mut next) = (0u32, 0u32);
        let mut first = true;
        let mut total = 0;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &raw const token as u64 },
                out_batch: &raw mut next as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: `attr` is a valid `bpf_attr.batch` whose buffers hold `count` keys and
            // values of the map's sizes (checked against K and V when the map was taken);
            // the kernel writes at most that many, and `count` and `next` back.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            let err = (ret < 0).then(std::io::Error::last_os_error);
            let n = (attr.count as usize).min(chunk);
            for i in 0..n {
                // SAFETY: entry i lies within the buffers (i < chunk); K and V are Pod, so
                // any bytes are a valid value; the reads are unaligned-safe.
                let (k, v) = unsafe {
                    (
                        std::ptr::read_unaligned(keys.as_ptr().add(i * ks).cast::<K>()),
                        std::ptr::read_unaligned(values.as_ptr().add(i * vs).cast::<V>()),
                    )
                };
                f(&k, &v);
            }
            total += n;
            match err {
                None => {}
                // The walk is complete (this call may still have returned entries).
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
                // One bucket is larger than the buffer: retry the same token with more room.
                Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                    chunk *= 2;
                    keys.resize(chunk * ks, 0);
                    values.resize(chunk * vs, 0);
                    continue;
                }
                Some(e) => return Err(e),
            }
            token = next;
            first = false;
        }
    }
}

/// The LPM key of `cidr` (`IPCACHE_V4`).
fn ipcache_key(cidr: &Ipv4Cidr) -> Key<IpcacheKeyV4> {
    Key::new(u32::from(cidr.prefix_len()), cidr.addr().octets())
}

impl PolicyWriter for Maps {
    fn apply_policy(&mut self, op: &PolicyOp) -> Result<(), PolicyWriteError> {
        let result = match op {
            PolicyOp::PutIpcache { cidr, identity } => {
                self.ipcache.insert(&ipcache_key(cidr), identity, 0)
            }
            PolicyOp::DelIpcache { cidr } => self.ipcache.remove(&ipcache_key(cidr)),
            PolicyOp::PutEndpoint { addr, value } => self.endpoints.insert(addr.octets(), value, 0),
            PolicyOp::DelEndpoint { addr } => self.endpoints.remove(&addr.octets()),
            // Full-length entries go to the hash, shorter prefixes to the trie; the datapath
            // asks the hash first (an exact entry is the longest match there can be).
            PolicyOp::PutRule { key, prefix_len, value }
                if *prefix_len == PolicyKey::PREFIX_FULL =>
            {
                self.policy_exact.insert(key, value, 0)
            }
            PolicyOp::DelRule { key, prefix_len } if *prefix_len == PolicyKey::PREFIX_FULL => {
                self.policy_exact.remove(key)
            }
            PolicyOp::PutRule { key, prefix_len, value } => {
                self.policy.insert(&Key::new(*prefix_len, *key), value, 0)
            }
            PolicyOp::DelRule { key, prefix_len } => {
                self.policy.remove(&Key::new(*prefix_len, *key))
            }
            PolicyOp::SetConfig(config) => self.policy_config.set(0, config, 0),
        };
        result.map_err(|e| PolicyWriteError { op: op.clone(), reason: e.to_string() })
    }
}

impl MapWriter for Maps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        let result = match *op {
            Op::PutBackend { id, backend } => self.backends.insert(id, backend, 0),
            Op::PutSlot { key, backend_id } => self.slots.insert(key, backend_id, 0),
            Op::PutService { key, value } => self.services.insert(key, value, 0),
            Op::DelService { key } => self.services.remove(&key),
            Op::DelSlot { key } => self.slots.remove(&key),
            Op::DelBackend { id } => self.backends.remove(&id),
        };
        result.map_err(|e| WriteError { op: op.clone(), reason: e.to_string() })
    }
}

/// The programs and where they attach on a pod's host-side veth: ingress is what the pod
/// sends, egress what it receives.
pub const PROGRAMS: [(&str, TcAttachType); 2] =
    [(names::PROG_FROM_POD, TcAttachType::Ingress), (names::PROG_TO_POD, TcAttachType::Egress)];

fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// Interface names of the current network namespace (`if_nameindex(3)`; no sysfs needed,
/// which matters under `ip netns exec` without a remounted /sys).
pub fn interface_names() -> std::io::Result<BTreeSet<String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut names = BTreeSet::new();
        let mut cur = head;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            names.insert(std::ffi::CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned());
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
        Ok(names)
    }
}
