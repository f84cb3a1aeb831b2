//! The kernel side as the agent sees it: load the embedded eBPF object (on its own, or
//! adopting what is pinned on bpffs, [`crate::pin`]), attach the tc programs to pod
//! interfaces, write the service maps ([`MapWriter`]) and the policy maps
//! ([`PolicyWriter`]), and read counters and map sizes.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use nodeplane_common::{
    maps::{
        AffinityKeyV4, AffinityValueV4, BackendV4, Counter, CtKeyV4, CtValueV4, ServiceKeyV4,
        ServiceValue, SlotKey, names,
    },
    nat::{NatConfig, NatValueV4, NoMasqV4, SourceRangeV4},
    policy::{
        EndpointV4, FragKeyV4, FragValueV4, IpcacheKeyV4, PolicyConfig, PolicyCounterKey,
        PolicyCtKey, PolicyCtValue, PolicyKey, PolicyValue,
    },
    // `CounterHook`: the program a counter belongs to (`pin::Hook` is the attach point).
    reason::{Hook as CounterHook, Reason, counter_index},
};
use tracing::{info, warn};

use crate::{
    config::XdpMode,
    model::Ipv4Cidr,
    pin::{self, Hook as LinkHook, Layout, MapPin, PinDir, PinError},
    policy::{PolicyOp, PolicyWriteError, PolicyWriter},
    sync::{MapWriter, Op, WriteError, WriteFailure},
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
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {what} at {path}: {source}")]
    PinObject { what: &'static str, path: PathBuf, source: aya::pin::PinError },
    #[error("copying {map} from {from}: {source}")]
    Migrate { map: String, from: PathBuf, source: std::io::Error },
}

/// A loaded datapath. Unpinned ([`Datapath::load`]), dropping it detaches every program and
/// frees the maps; pinned ([`Datapath::open_pinned`]), everything stays in the kernel.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    /// Interfaces the programs are attached to, by name and index (a pod interface deleted
    /// and re-created under the same name is a new interface).
    attached: BTreeSet<(String, u32)>,
    /// External interfaces the netdev programs are attached to, by name and index.
    attached_netdev: BTreeSet<(String, u32)>,
    /// Those running `xdp_netdev` too.
    attached_xdp: BTreeSet<(String, u32)>,
    pins: Option<Pinned>,
}

/// What a pinned datapath found on bpffs, and what it retires once its programs run.
struct Pinned {
    dir: PinDir,
    /// The directory's lock, held for the life of the datapath.
    _lock: std::fs::File,
    layouts: BTreeMap<String, Layout>,
    /// Maps whose pin existed: their contents are the last agent's.
    adopted: BTreeSet<String>,
    /// Pins of other layouts (or of maps this build lacks), removed by `finish_upgrade`.
    stale: Vec<MapPin>,
    /// `(map, old pin)`: state copied at load into a resized map, copied again (what was
    /// added meanwhile) by `finish_upgrade`.
    migrations: Vec<(String, PathBuf)>,
    /// Link pins this process attached or took over.
    links: BTreeSet<PathBuf>,
    finished: bool,
}

/// What [`Datapath::finish_upgrade`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retired {
    /// Map pins of older layouts removed.
    pub maps: usize,
    /// Link pins nobody attached this time (interfaces gone or no longer matching).
    pub links: usize,
    /// Entries copied into resized state maps after the switch.
    pub copied: usize,
}

/// Typed handles on the maps, taken out of the object at load.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKeyV4, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, BackendV4>,
    pub ct: HashMap<MapData, CtKeyV4, CtValueV4>,
    /// Session affinity, `(service id, client IP)` -> backend (an LRU written by the
    /// datapath; read here for tests and `inspect`).
    pub affinity: HashMap<MapData, AffinityKeyV4, AffinityValueV4>,
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
    /// SNAT table (an LRU written by the datapath; read here for tests and `inspect`).
    pub nat: HashMap<MapData, CtKeyV4, NatValueV4>,
    /// One element: node IP, port range, masquerade.
    pub nat_config: Array<MapData, NatConfig>,
    /// Destinations reached without masquerade.
    pub no_masq: LpmTrie<MapData, NoMasqV4, u8>,
    /// `loadBalancerSourceRanges` by frontend id.
    pub source_ranges: LpmTrie<MapData, SourceRangeV4, u8>,
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
        for name in PROGRAMS.iter().chain(&NETDEV_PROGRAMS).map(|(name, _)| *name) {
            classifier_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let name = names::PROG_XDP_NETDEV;
        xdp_mut(&mut ebpf)?.load().map_err(|source| DatapathError::Program { name, source })?;
        let maps = Maps {
            nat: take_map(&mut ebpf, names::NAT_V4)?,
            nat_config: take_map(&mut ebpf, names::NAT_CONFIG)?,
            no_masq: take_map(&mut ebpf, names::NO_MASQ_V4)?,
            source_ranges: take_map(&mut ebpf, names::SOURCE_RANGES_V4)?,
            services: take_map(&mut ebpf, names::SERVICES_V4)?,
            slots: take_map(&mut ebpf, names::BACKEND_SLOTS)?,
            backends: take_map(&mut ebpf, names::BACKENDS_V4)?,
            ct: take_map(&mut ebpf, names::CT_V4)?,
            affinity: take_map(&mut ebpf, names::AFFINITY_V4)?,
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
        Ok(Self {
            ebpf,
            maps,
            attached: BTreeSet::new(),
            attached_netdev: BTreeSet::new(),
            attached_xdp: BTreeSet::new(),
            pins: None,
        })
    }

    /// Loads the embedded object onto the maps pinned under `dir`, creating (and pinning)
    /// those that are not there; `overrides` change maps' `max_entries` (tests). Nothing is
    /// attached yet: the programs run only when [`Datapath::attach_matching`] attaches
    /// them or takes over pinned links; until then the programs of the last agent, if any,
    /// keep running on the same maps.
    pub fn open_pinned(dir: PinDir, overrides: &[(&str, u32)]) -> Result<Self, DatapathError> {
        dir.prepare()?;
        let lock = dir.lock()?;
        let layouts = pin::object_layouts(EBPF_OBJECT, overrides)?;
        let existing = dir.map_pins()?;
        let paths: BTreeMap<&str, PathBuf> =
            layouts.iter().map(|(name, l)| (name.as_str(), dir.map(name, l))).collect();
        let adopted: BTreeSet<String> =
            paths.iter().filter(|(_, p)| p.exists()).map(|(n, _)| n.to_string()).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, n) in overrides {
            loader.map_max_entries(name, *n);
        }
        let mut dp = Self::load_with(&mut loader)?;
        let current: BTreeSet<&PathBuf> = paths.values().collect();
        let stale: Vec<MapPin> =
            existing.into_iter().filter(|p| !current.contains(&p.path)).collect();
        let mut migrations = Vec::new();
        for old in &stale {
            let Some(layout) = layouts.get(&old.map) else { continue };
            if adopted.contains(&old.map) || !pin::STATE_MAPS.contains(&old.map.as_str()) {
                continue;
            }
            if old.kind != layout.kind() {
                warn!(map = %old.map, from = %old.path.display(),
                      "the map's layout changed and no converter exists: it starts empty");
                continue;
            }
            let copied = copy_map(&old.path, &paths[old.map.as_str()], &old.map, layout)?;
            info!(map = %old.map, from = old.max_entries, to = layout.max_entries, copied,
                  "map resized: entries copied");
            migrations.push((old.map.clone(), old.path.clone()));
        }
        dp.pins = Some(Pinned {
            dir,
            _lock: lock,
            layouts,
            adopted,
            stale,
            migrations,
            links: BTreeSet::new(),
            finished: false,
        });
        Ok(dp)
    }

    /// Whether map `name` was adopted from a pin (it holds the last agent's entries).
    /// Always false for an unpinned datapath.
    pub fn adopted(&self, name: &str) -> bool {
        self.pins.as_ref().is_some_and(|p| p.adopted.contains(name))
    }

    /// The pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref().map(|p| &p.dir)
    }

    /// Called once every pod interface runs this build's programs: pins the programs
    /// (replacing the last agent's), copies what the old programs added to resized state
    /// maps since the load, removes map pins of older layouts and link pins nothing took
    /// over. Does nothing for an unpinned datapath, or a second time.
    pub fn finish_upgrade(&mut self) -> Result<Retired, DatapathError> {
        let mut retired = Retired::default();
        let Some(pinned) = self.pins.as_mut() else { return Ok(retired) };
        if pinned.finished {
            return Ok(retired);
        }
        for name in PROGRAMS.map(|(name, _)| name) {
            let path = pinned.dir.prog(name);
            // (No dot: bpffs refuses them.)
            let tmp = pinned.dir.progs_dir().join(format!("{name}-new"));
            let _ = std::fs::remove_file(&tmp);
            let program = classifier_mut(&mut self.ebpf, name)?;
            program.pin(&tmp).map_err(|source| DatapathError::PinObject {
                what: "a program",
                path: tmp.clone(),
                source,
            })?;
            // rename(2) replaces the old pin in one step: `inspect trace` always finds one.
            std::fs::rename(&tmp, &path).map_err(|e| PinError::Io {
                what: "renaming",
                path: tmp.clone(),
                source: e,
            })?;
        }
        for (map, old) in &pinned.migrations {
            let layout = &pinned.layouts[map];
            retired.copied += copy_map(old, &pinned.dir.map(map, layout), map, layout)?;
        }
        for old in std::mem::take(&mut pinned.stale) {
            remove_pin(&old.path)?;
            info!(map = %old.map, pin = %old.path.display(), "removed the pin of an older layout");
            retired.maps += 1;
        }
        for link in pinned.dir.link_pins()? {
            if !pinned.links.contains(&link.path) {
                remove_pin(&link.path)?;
                info!(iface = %link.iface, hook = link.hook.as_str(), "detached a stale link");
                retired.links += 1;
            }
        }
        pinned.finished = true;
        Ok(retired)
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

    /// The loaded `xdp_netdev` program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&self) -> &Xdp {
        self.ebpf
            .program(names::PROG_XDP_NETDEV)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("xdp_netdev was loaded as an Xdp program in load_with"))
    }

    /// Attaches [`PROGRAMS`] to every interface whose name starts with `prefix` and that is
    /// not attached yet. Returns the newly attached names.
    ///
    /// Pinned, an interface whose link is pinned gets this build's program on that link
    /// in one step (`bpf_link_update`), and a new link is pinned. Link pins of interfaces
    /// that no longer exist are removed.
    pub fn attach_matching(&mut self, prefix: &str) -> Result<Vec<String>, DatapathError> {
        let present = interfaces().map_err(DatapathError::Interfaces)?;
        let mut new = Vec::new();
        for (name, index) in present.iter().filter(|(n, _)| n.starts_with(prefix)) {
            let key = (name.clone(), *index);
            if self.attached.contains(&key) {
                continue;
            }
            for (prog, hook) in PROGRAMS {
                self.attach_one(name, *index, prog, hook)?;
            }
            self.attached.insert(key);
            new.push(name.clone());
        }
        // Interfaces that disappeared (pod deleted) took their attachment with them.
        let live = interfaces().map_err(DatapathError::Interfaces)?;
        self.attached.retain(|(n, i)| live.get(n) == Some(i));
        if let Some(pinned) = &mut self.pins {
            let by_index: BTreeMap<u32, String> =
                live.iter().map(|(name, i)| (*i, name.replace('.', "_"))).collect();
            for link in pinned.dir.link_pins()? {
                if by_index.get(&link.ifindex) != Some(&link.iface) {
                    remove_pin(&link.path)?;
                    pinned.links.remove(&link.path);
                }
            }
        }
        Ok(new)
    }

    fn attach_one(
        &mut self,
        iface: &str,
        ifindex: u32,
        prog: &'static str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach { iface: iface.to_string(), source };
        let program = classifier_mut(&mut self.ebpf, prog)?;
        let Some(pinned) = &mut self.pins else {
            // tcx (kernel >= 6.6) needs no clsact qdisc; aya falls back to netlink below.
            program.attach(iface, hook).map_err(attach_err)?;
            return Ok(());
        };
        let path = pinned.dir.link(iface, ifindex, pin_hook(hook));
        let link_err = |source| DatapathError::Link { path: path.clone(), source };
        if path.exists() {
            let link = PinnedLink::from_pin(&path).map_err(link_err)?;
            let link = SchedClassifierLink::try_from(FdLink::from(link)).map_err(link_err)?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    // Our descriptor closes here; the pin keeps the link.
                    drop(program.take_link(id).map_err(attach_err)?);
                    pinned.links.insert(path);
                    return Ok(());
                }
                // A defunct link (its device went away): attach afresh below.
                Err(e) => {
                    warn!(%iface, error = %e, "replacing the program of a pinned link failed");
                    remove_pin(&path)?;
                }
            }
        }
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        let id = program.attach_with_options(iface, hook, options).map_err(attach_err)?;
        let link =
            FdLink::try_from(program.take_link(id).map_err(attach_err)?).map_err(link_err)?;
        link.pin(&path).map_err(|source| DatapathError::PinObject {
            what: "a link",
            path: path.clone(),
            source,
        })?;
        pinned.links.insert(path);
        Ok(())
    }

    /// Counters summed over CPUs, one per hook and reason.
    pub fn counters(&self) -> Result<Vec<(CounterHook, Reason, Counter)>, DatapathError> {
        self.maps.counters()
    }

    /// Attaches [`NETDEV_PROGRAMS`] to each of `ifaces` (the node's external interfaces)
    /// present and not attached yet, pinned like the pod interfaces' links. Returns the
    /// newly attached names; a name that does not exist is skipped (it may appear later).
    pub fn attach_netdev(&mut self, ifaces: &[String]) -> Result<Vec<String>, DatapathError> {
        let present = interfaces().map_err(DatapathError::Interfaces)?;
        self.attached_netdev.retain(|(n, i)| present.get(n) == Some(i));
        self.attached_xdp.retain(|(n, i)| present.get(n) == Some(i));
        let mut new = Vec::new();
        for name in ifaces {
            let Some(index) = present.get(name).copied() else { continue };
            let key = (name.clone(), index);
            if self.attached_netdev.contains(&key) {
                continue;
            }
            for (prog, hook) in NETDEV_PROGRAMS {
                self.attach_one(name, index, prog, hook)?;
            }
            self.attached_netdev.insert(key);
            new.push(name.clone());
        }
        Ok(new)
    }

    /// Attaches `xdp_netdev` to the external interfaces the netdev programs run on (call
    /// after [`Datapath::attach_netdev`]), in `mode`; with [`XdpMode::Off`] detaches it.
    /// Returns `(interface, the mode it runs in)` for each new attachment. `Auto` tries
    /// native (driver) mode and falls back to generic.
    pub fn attach_xdp(
        &mut self,
        mode: XdpMode,
    ) -> Result<Vec<(String, &'static str)>, DatapathError> {
        let mut new = Vec::new();
        let targets: Vec<(String, u32)> = self.attached_netdev.iter().cloned().collect();
        if mode == XdpMode::Off {
            if let Some(pinned) = &mut self.pins {
                for link in pinned.dir.link_pins()? {
                    if link.hook == LinkHook::Xdp {
                        remove_pin(&link.path)?;
                        pinned.links.remove(&link.path);
                    }
                }
            }
            self.attached_xdp.clear();
            return Ok(new);
        }
        for (iface, ifindex) in targets {
            if self.attached_xdp.contains(&(iface.clone(), ifindex)) {
                continue;
            }
            let how = self.attach_xdp_one(&iface, ifindex, mode)?;
            self.attached_xdp.insert((iface.clone(), ifindex));
            new.push((iface, how));
        }
        Ok(new)
    }

    fn attach_xdp_one(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<&'static str, DatapathError> {
        let attach_err = |source| DatapathError::Attach { iface: iface.to_string(), source };
        let program = xdp_mut(&mut self.ebpf)?;
        let path = self.pins.as_ref().map(|p| p.dir.link(iface, ifindex, LinkHook::Xdp));
        if let Some(path) = path.as_ref().filter(|p| p.exists()) {
            let link_err = |source| DatapathError::Link { path: path.clone(), source };
            let link = PinnedLink::from_pin(path).map_err(link_err)?;
            let link = XdpLink::try_from(FdLink::from(link)).map_err(link_err)?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    drop(program.take_link(id).map_err(attach_err)?);
                    if let Some(pinned) = &mut self.pins {
                        pinned.links.insert(path.clone());
                    }
                    return Ok("pinned");
                }
                Err(e) => {
                    warn!(%iface, error = %e, "replacing the program of a pinned XDP link failed");
                    remove_pin(path)?;
                }
            }
        }
        let tries: &[(aya::programs::XdpMode, &'static str)] = match mode {
            XdpMode::Native => &[(aya::programs::XdpMode::Driver, "native")],
            XdpMode::Generic => &[(aya::programs::XdpMode::Skb, "generic")],
            _ => &[
                (aya::programs::XdpMode::Driver, "native"),
                (aya::programs::XdpMode::Skb, "generic"),
            ],
        };
        let mut last = None;
        for (flags, how) in tries {
            match program.attach_to_if_index(ifindex, *flags) {
                Ok(id) => {
                    let link = program.take_link(id).map_err(attach_err)?;
                    if let Some(path) = path {
                        let link_err = |source| DatapathError::Link { path: path.clone(), source };
                        let link = FdLink::try_from(link).map_err(link_err)?;
                        link.pin(&path).map_err(|source| DatapathError::PinObject {
                            what: "a link",
                            path: path.clone(),
                            source,
                        })?;
                        if let Some(pinned) = &mut self.pins {
                            pinned.links.insert(path);
                        }
                    } else {
                        // Unpinned: the link lives as long as this process.
                        std::mem::forget(link);
                    }
                    return Ok(how);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(attach_err(last.expect("at least one mode tried")))
    }

    /// The external interfaces the netdev programs run on.
    pub fn netdev_interfaces(&self) -> impl Iterator<Item = &(String, u32)> {
        self.attached_netdev.iter()
    }
}

/// What the maps the agent writes hold, read back at start-up to adopt a pinned datapath.
#[derive(Debug, Default)]
pub struct Written {
    pub services: BTreeMap<ServiceKeyV4, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, BackendV4>,
    /// `IPCACHE_V4`, `ENDPOINTS_V4`, and the rules of `POLICY_V4` and `POLICY_EXACT_V4`.
    pub policy: crate::policy::compute::PolicyMaps,
    pub policy_config: PolicyConfig,
}

impl Maps {
    /// Reads every map the agent writes (see [`Written`]).
    pub fn read_written(&self) -> Result<Written, DatapathError> {
        fn all<K: aya::Pod + Ord, V: aya::Pod>(
            name: &'static str,
            map: &HashMap<MapData, K, V>,
        ) -> Result<BTreeMap<K, V>, DatapathError> {
            map.iter().map(|e| e.map_err(|source| DatapathError::Map { name, source })).collect()
        }
        let mut w = Written {
            services: all(names::SERVICES_V4, &self.services)?,
            slots: all(names::BACKEND_SLOTS, &self.slots)?,
            backends: all(names::BACKENDS_V4, &self.backends)?,
            ..Written::default()
        };
        for entry in self.ipcache.iter() {
            let (key, identity) =
                entry.map_err(|source| DatapathError::Map { name: names::IPCACHE_V4, source })?;
            let addr = std::net::Ipv4Addr::from(key.data());
            let prefix = u8::try_from(key.prefix_len()).ok();
            if let Some(cidr) = prefix.and_then(|l| Ipv4Cidr::new(addr, l)) {
                w.policy.ipcache.insert(cidr, identity);
            }
        }
        for entry in self.endpoints.iter() {
            let (addr, endpoint) =
                entry.map_err(|source| DatapathError::Map { name: names::ENDPOINTS_V4, source })?;
            w.policy.endpoints.insert(addr.into(), endpoint);
        }
        for entry in self.policy.iter() {
            let (key, value) =
                entry.map_err(|source| DatapathError::Map { name: names::POLICY_V4, source })?;
            w.policy.rules.insert((key.data(), key.prefix_len()), value);
        }
        for entry in self.policy_exact.iter() {
            let (key, value) = entry
                .map_err(|source| DatapathError::Map { name: names::POLICY_EXACT_V4, source })?;
            w.policy.rules.insert((key, PolicyKey::PREFIX_FULL), value);
        }
        w.policy_config = self
            .policy_config
            .get(&0, 0)
            .map_err(|source| DatapathError::Map { name: names::POLICY_CONFIG, source })?;
        Ok(w)
    }
}

impl Maps {
    /// `COUNTERS` summed over CPUs: every (hook, reason), in [`CounterHook::ALL`] then
    /// [`Reason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(CounterHook, Reason, Counter)>, DatapathError> {
        CounterHook::ALL
            .iter()
            .flat_map(|&hook| Reason::ALL.iter().map(move |&reason| (hook, reason)))
            .map(|(hook, reason)| {
                let per_cpu = self
                    .counters
                    .get(&counter_index(hook, reason), 0)
                    .map_err(|source| DatapathError::Map { name: names::COUNTERS, source })?;
                let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((hook, reason, total))
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
            of(names::AFFINITY_V4, &self.affinity)?,
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

    /// A reader on its own descriptor of `map` (`name` for messages).
    pub fn new(name: &'static str, map: &HashMap<MapData, K, V>) -> Result<Self, DatapathError> {
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
        result.map_err(|e| PolicyWriteError {
            op: op.clone(),
            reason: e.to_string(),
            failure: WriteFailure::of_map_error(&e),
        })
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
        result.map_err(|e| WriteError {
            op: op.clone(),
            reason: e.to_string(),
            failure: WriteFailure::of_map_error(&e),
        })
    }
}

/// The programs of the node's external interfaces: ingress translates what enters the
/// cluster, egress SNATs what leaves it (`dataplane-ebpf/src/netdev.rs`).
pub const NETDEV_PROGRAMS: [(&str, TcAttachType); 2] = [
    (names::PROG_FROM_NETDEV, TcAttachType::Ingress),
    (names::PROG_TO_NETDEV, TcAttachType::Egress),
];

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

fn xdp_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    let name = names::PROG_XDP_NETDEV;
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

fn pin_hook(hook: TcAttachType) -> LinkHook {
    match hook {
        TcAttachType::Egress => LinkHook::Egress,
        _ => LinkHook::Ingress,
    }
}

fn remove_pin(path: &std::path::Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PinError::Io { what: "removing", path: path.to_path_buf(), source: e }.into())
        }
        _ => Ok(()),
    }
}

/// Copies the entries of the pinned map `from` missing from the pinned map `to`.
fn copy_map(
    from: &std::path::Path,
    to: &std::path::Path,
    map: &str,
    layout: &Layout,
) -> Result<usize, DatapathError> {
    let err = |source| DatapathError::Migrate { map: map.to_string(), from: from.into(), source };
    let open = |p: &std::path::Path| {
        MapData::from_pin(p).map_err(|e| err(std::io::Error::other(e.to_string())))
    };
    let (old, new) = (open(from)?, open(to)?);
    pin::copy_entries(old.fd().as_fd(), new.fd().as_fd(), layout).map_err(err)
}

/// Interfaces of the current network namespace by name, with their indexes
/// (`if_nameindex(3)`; no sysfs needed, which matters under `ip netns exec` without a
/// remounted /sys).
pub fn interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut names = BTreeMap::new();
        let mut cur = head;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned();
            names.insert(name, (*cur).if_index);
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
        Ok(names)
    }
}

// ── socket LB (socklb.rs): what it needs of the loaded object and the pin bookkeeping ──
impl Datapath {
    /// The loaded object: `socklb` loads and attaches its cgroup programs from it and
    /// writes `SOCK_CONFIG`.
    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Records a link pin this process attached, so that [`Datapath::finish_upgrade`]
    /// never retires it.
    pub(crate) fn keep_link(&mut self, path: PathBuf) {
        if let Some(pinned) = &mut self.pins {
            pinned.links.insert(path);
        }
    }
}
