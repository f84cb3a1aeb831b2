//! Where the datapath lives on bpffs, so it outlives the agent.
//!
//! ```text
//! <dir>/                      0700, e.g. /sys/fs/bpf/nodeplane
//!   maps/<NAME>-<kind>-<max>  0600  every map of the object; <kind> fingerprints the layout
//!   progs/<program>           0600  the programs the links run (what `inspect trace` runs)
//!   links/<iface>@<ifindex>-<ingress|egress>  0600  one tcx link per pod interface and hook
//! ```
//!
//! (bpffs refuses names with a dot, so `-` separates; a `.` in an interface name is
//! written `_`: the ifindex identifies the interface, the name is for people.)
//!
//! * A map's pin name carries its layout: `<kind>` is a hash of the map type, key and value
//!   sizes, flags and [`LAYOUT_REVISION`]; `<max>` its capacity. A build whose map has the
//!   same name adopts the pinned map with its contents; a build whose layout differs gets a
//!   new map beside the old one (a *new versioned name*), and the old pin is removed only
//!   after every link runs the new programs ([`crate::datapath::Datapath::finish_upgrade`]).
//! * The datapath's own state ([`STATE_MAPS`]: conntrack, fragments) is copied into a new
//!   map whose kind is unchanged (a new capacity). A map whose kind changed starts empty:
//!   the agent refills its own maps from the cluster before the new programs run, and
//!   conntrack written in another layout has no converter yet (a layout change to
//!   `CtValueV4` must add one here).
//! * Links are pinned, so the programs stay attached while no agent runs (kill -9, OOM,
//!   upgrade). A restarted agent replaces the program of each pinned link in place
//!   (`bpf_link_update`): the hook is never empty.
use std::{
    collections::BTreeMap,
    fs, io,
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

/// Default pin directory of a node.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/nodeplane";

/// Part of every map's kind: bump it when a key or value changes meaning without changing
/// its size, so every map gets a new versioned pin.
pub const LAYOUT_REVISION: u32 = 1;

/// Maps the datapath writes whose entries are copied into a resized map of the same kind.
/// (Counters are not: their index layout follows `Reason::COUNT`.)
pub const STATE_MAPS: [&str; 3] = [
    nodeplane_common::maps::names::CT_V4,
    nodeplane_common::maps::names::POLICY_CT_V4,
    nodeplane_common::maps::names::FRAGS_V4,
];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted when nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{0} is not on a bpf filesystem and not under {BPFFS_MOUNT}")]
    NotBpffs(PathBuf),
    #[error("parsing the embedded eBPF object: {0}")]
    Object(String),
    #[error(
        "nothing is pinned under {0}: the agent is not installed on this node, or runs with \
         another --bpffs-dir"
    )]
    NotInstalled(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io { what, path: path.to_path_buf(), source }
}

/// Where a link attaches on an interface: a tc hook, or XDP (external interfaces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Ingress,
    Egress,
    Xdp,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
            Hook::Xdp => "xdp",
        }
    }
}

/// A pinned link, as named in `links/`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinkPin {
    pub iface: String,
    pub ifindex: u32,
    pub hook: Hook,
    pub path: PathBuf,
}

/// What [`PinDir::find_map`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A pin of the layout asked for.
    Pin(PathBuf),
    /// Only a pin of another layout: the agent and the reader are different builds.
    OtherLayout(PathBuf),
    Missing,
}

/// A pinned map, as named in `maps/`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapPin {
    pub map: String,
    pub kind: String,
    pub max_entries: u32,
    pub path: PathBuf,
}

/// What a map looks like to the kernel; decides whether a pinned map can be adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub max_entries: u32,
}

impl Layout {
    /// Eight hex digits of FNV-1a over everything but the capacity.
    pub fn kind(&self) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for word in [LAYOUT_REVISION, self.map_type, self.key_size, self.value_size, self.flags] {
            for b in word.to_le_bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
        }
        format!("{h:08x}")
    }

    pub fn pin_name(&self, map: &str) -> String {
        format!("{map}-{}-{}", self.kind(), self.max_entries)
    }
}

/// The layout of every map in `object` (an ELF), with `overrides` of `max_entries` applied.
pub fn object_layouts(
    object: &[u8],
    overrides: &[(&str, u32)],
) -> Result<BTreeMap<String, Layout>, PinError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| PinError::Object(e.to_string()))?;
    let mut layouts = BTreeMap::new();
    for (name, map) in &obj.maps {
        // Data sections (.rodata, .bss) are per load, never shared.
        if name.starts_with('.') {
            continue;
        }
        let max_entries =
            overrides.iter().find(|(n, _)| n == name).map_or(map.max_entries(), |(_, n)| *n);
        layouts.insert(
            name.clone(),
            Layout {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                flags: map.map_flags(),
                max_entries,
            },
        );
    }
    Ok(layouts)
}

/// A node's pin directory.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    pub fn map(&self, name: &str, layout: &Layout) -> PathBuf {
        self.maps_dir().join(layout.pin_name(name))
    }

    pub fn link(&self, iface: &str, ifindex: u32, hook: Hook) -> PathBuf {
        let iface = iface.replace('.', "_");
        self.links_dir().join(format!("{iface}@{ifindex}-{}", hook.as_str()))
    }

    /// Makes sure the directory exists on bpffs, mode 0700: mounts bpffs on `/sys/fs/bpf`
    /// if the directory is under it and nothing is mounted there (as Cilium does).
    pub fn prepare(&self) -> Result<(), PinError> {
        if !on_bpffs(&self.root)? {
            if !self.root.starts_with(BPFFS_MOUNT) {
                return Err(PinError::NotBpffs(self.root.clone()));
            }
            mount_bpffs()?;
            tracing::info!(path = BPFFS_MOUNT, "mounted a bpf filesystem");
        }
        for dir in [self.root.clone(), self.maps_dir(), self.progs_dir(), self.links_dir()] {
            match fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) => return Err(io_err("creating", &dir)(e)),
            }
            // An existing directory keeps its mode otherwise.
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("setting the mode of", &dir))?;
        }
        Ok(())
    }

    /// Takes the directory's lock (`flock` on the directory), waiting while another agent
    /// holds it: two agents must never write the same maps (a DaemonSet rollout with
    /// surge, or a second agent started by hand). Held while the returned file is open.
    pub fn lock(&self) -> Result<fs::File, PinError> {
        let dir = fs::File::open(&self.root).map_err(io_err("opening", &self.root))?;
        if !flock(&dir, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err("locking", &self.root))? {
            tracing::warn!(dir = %self.root.display(), "another agent holds the pin directory; waiting");
            flock(&dir, libc::LOCK_EX).map_err(io_err("locking", &self.root))?;
        }
        Ok(dir)
    }

    /// Whether a running agent holds the directory's lock.
    pub fn in_use(&self) -> Result<bool, PinError> {
        let dir = match fs::File::open(&self.root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("opening", &self.root)(e)),
        };
        Ok(!flock(&dir, libc::LOCK_SH | libc::LOCK_NB).map_err(io_err("locking", &self.root))?)
    }

    /// Whether anything was ever pinned here (the `maps/` directory exists).
    pub fn installed(&self) -> bool {
        self.maps_dir().is_dir()
    }

    /// The pinned maps, sorted. Files that do not parse as a pin name are left out.
    pub fn map_pins(&self) -> Result<Vec<MapPin>, PinError> {
        let mut pins = Vec::new();
        for (file, path) in list(&self.maps_dir())? {
            let mut parts = file.rsplitn(3, '-');
            let (Some(max), Some(kind), Some(map)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(max_entries) = max.parse() else { continue };
            pins.push(MapPin { map: map.to_string(), kind: kind.to_string(), max_entries, path });
        }
        pins.sort();
        Ok(pins)
    }

    /// The pin of map `name` a reader of `layout` can use: that layout and capacity, else
    /// that layout at another capacity (an agent started with other sizes: the kernel
    /// knows the size); else a pin of another layout, or none.
    pub fn find_map(&self, name: &str, layout: &Layout) -> Result<Found, PinError> {
        if !self.installed() {
            return Err(PinError::NotInstalled(self.root.clone()));
        }
        let pins: Vec<MapPin> = self.map_pins()?.into_iter().filter(|p| p.map == name).collect();
        let kind = layout.kind();
        let exact = pins.iter().find(|p| p.kind == kind && p.max_entries == layout.max_entries);
        Ok(match exact.or_else(|| pins.iter().find(|p| p.kind == kind)) {
            Some(p) => Found::Pin(p.path.clone()),
            None => pins.into_iter().next().map_or(Found::Missing, |p| Found::OtherLayout(p.path)),
        })
    }

    /// The pinned links, sorted.
    pub fn link_pins(&self) -> Result<Vec<LinkPin>, PinError> {
        let mut pins = Vec::new();
        for (file, path) in list(&self.links_dir())? {
            let Some((rest, hook)) = file.rsplit_once('-') else { continue };
            let hook = match hook {
                "ingress" => Hook::Ingress,
                "egress" => Hook::Egress,
                "xdp" => Hook::Xdp,
                _ => continue,
            };
            let Some((iface, ifindex)) = rest.rsplit_once('@') else { continue };
            let Ok(ifindex) = ifindex.parse() else { continue };
            pins.push(LinkPin { iface: iface.to_string(), ifindex, hook, path });
        }
        pins.sort();
        Ok(pins)
    }

    /// Removes every pin and the directories: links first (each detaches its program from
    /// its interface when no process holds the link), then programs, then maps. Returns the
    /// number of pins removed. Nothing pinned: `Ok(0)`.
    pub fn remove_all(&self) -> Result<usize, PinError> {
        let mut removed = 0;
        for dir in [self.links_dir(), self.progs_dir(), self.maps_dir()] {
            for (_, path) in list(&dir)? {
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                removed += 1;
            }
            remove_dir_if_exists(&dir)?;
        }
        remove_dir_if_exists(&self.root)?;
        Ok(removed)
    }
}

/// flock(2); `Ok(false)` when non-blocking and held elsewhere.
fn flock(file: &fs::File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock(2) on a descriptor `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

/// `(file name, path)` of the entries of `dir`; none if it does not exist.
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, PinError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push((name.to_string(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), PinError> {
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", dir)(e)),
        _ => Ok(()),
    }
}

/// Whether `path`, or its closest existing ancestor, is on bpffs.
pub fn on_bpffs(path: &Path) -> Result<bool, PinError> {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => return Ok(false),
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("reading", probe)(io::Error::other(e)))?;
    // SAFETY: statfs(2) writes one struct statfs into `st`, which lives for the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io_err("statfs", probe)(io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs() -> Result<(), PinError> {
    let target = Path::new(BPFFS_MOUNT);
    fs::create_dir_all(target).map_err(io_err("creating", target))?;
    // SAFETY: NUL-terminated literals; mount(2) reads them only.
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(io_err("mounting bpffs on", target)(io::Error::last_os_error()));
    }
    Ok(())
}

/// `bpf(2)` commands for single elements (`include/uapi/linux/bpf.h`).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_NOEXIST: u64 = 1;

/// The element member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_call(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` element member whose pointers address buffers of
    // the map's key and value sizes (the callers size them from the map's layout).
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut ElemAttr, size_of::<ElemAttr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Copies every entry of `from` that `to` does not have yet into `to` (hash maps with the
/// same key and value sizes, `layout`). Stops quietly when `to` is full. Returns the number
/// of entries copied. The walk is `GET_NEXT_KEY`-based, so entries added or deleted
/// meanwhile may be missed; callers copy again after the switch to catch up.
pub fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    layout: &Layout,
) -> io::Result<usize> {
    let mut key = vec![0u8; layout.key_size as usize];
    let mut next = vec![0u8; layout.key_size as usize];
    let mut value = vec![0u8; layout.value_size as usize];
    let mut first = true;
    let mut copied = 0;
    loop {
        let mut attr = ElemAttr {
            map_fd: from.as_raw_fd() as u32,
            key: if first { 0 } else { key.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match elem_call(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(copied),
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        let mut attr = ElemAttr {
            map_fd: from.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match elem_call(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => {}
            // Deleted (or evicted) between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        let mut attr = ElemAttr {
            map_fd: to.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: BPF_NOEXIST,
            ..Default::default()
        };
        match elem_call(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(()) => copied += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => return Ok(copied),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout { map_type: 9, key_size: 16, value_size: 32, flags: 0, max_entries: 1024 }
    }

    #[test]
    fn kind_ignores_capacity_and_follows_everything_else() {
        let a = layout();
        assert_eq!(a.kind(), Layout { max_entries: 7, ..a }.kind());
        for b in [
            Layout { map_type: 1, ..a },
            Layout { key_size: 20, ..a },
            Layout { value_size: 40, ..a },
            Layout { flags: 1, ..a },
        ] {
            assert_ne!(a.kind(), b.kind(), "{b:?}");
        }
        assert_eq!(a.pin_name("CT_V4"), format!("CT_V4-{}-1024", a.kind()));
    }

    #[test]
    fn pin_names_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir::new(dir.path());
        fs::create_dir_all(pins.maps_dir()).unwrap();
        fs::create_dir_all(pins.links_dir()).unwrap();
        let l = layout();
        fs::write(pins.map("FLOW_EVENT_COUNTERS", &l), b"").unwrap();
        fs::write(pins.maps_dir().join("junk"), b"").unwrap();
        fs::write(pins.link("lxc.a@b", 12, Hook::Egress), b"").unwrap();
        fs::write(pins.links_dir().join("eth0@x-ingress"), b"").unwrap();
        let maps = pins.map_pins().unwrap();
        assert_eq!(maps.len(), 1);
        assert_eq!((maps[0].map.as_str(), maps[0].max_entries), ("FLOW_EVENT_COUNTERS", 1024));
        assert_eq!(maps[0].kind, l.kind());
        let found = |l: &Layout| pins.find_map("FLOW_EVENT_COUNTERS", l).unwrap();
        assert_eq!(found(&l), Found::Pin(maps[0].path.clone()));
        let resized = Layout { max_entries: 7, ..l };
        assert_eq!(found(&resized), Found::Pin(maps[0].path.clone()), "same kind, any size");
        let other = Layout { value_size: 8, ..l };
        assert_eq!(found(&other), Found::OtherLayout(maps[0].path.clone()));
        assert_eq!(pins.find_map("CT_V4", &l).unwrap(), Found::Missing);
        let links = pins.link_pins().unwrap();
        assert_eq!(links.len(), 1);
        assert_eq!(
            (links[0].iface.as_str(), links[0].ifindex, links[0].hook),
            ("lxc_a@b", 12, Hook::Egress)
        );
        assert_eq!(pins.remove_all().unwrap(), 4);
        assert!(!dir.path().exists());
        assert_eq!(pins.remove_all().unwrap(), 0, "idempotent");
    }

    #[test]
    fn the_embedded_object_has_every_map() {
        let layouts = object_layouts(crate::datapath::EBPF_OBJECT, &[("CT_V4", 64)]).unwrap();
        assert_eq!(layouts["CT_V4"].max_entries, 64);
        for name in STATE_MAPS {
            assert!(layouts.contains_key(name), "{name}");
        }
        assert!(layouts.keys().all(|n| !n.starts_with('.')));
    }
}
