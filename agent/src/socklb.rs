//! Socket-level load balancing for host-network clients: the agent's half of
//! `dataplane-ebpf/src/sock.rs`.
//!
//! Processes of the node itself (kubelet, host-network pods) never cross a pod veth, so the
//! tc programs never see their traffic. Four cgroup `sock_addr` programs (`connect4`,
//! `sendmsg4`, `recvmsg4`, `getpeername4`) translate their sockets instead, attached to the
//! cgroup v2 root (`--cgroup-root`, default the cgroup2 mount), so every process is covered.
//!
//! * **Scope**: a cgroup spans network namespaces; the agent writes its own namespace's
//!   cookie (`SO_NETNS_COOKIE`) into `SOCK_CONFIG` and the programs translate only sockets
//!   of that namespace (the host's on a real node; pods keep the per-packet path). 0: off.
//! * **Pins**: one link per hook, `links/cgroup@<cgroup id>-<hook>` (the cgroup id is the
//!   cgroup directory's inode number, as an ifindex names an interface in `pin.rs`'s
//!   scheme), so translation continues while no agent runs and `nodeplane-agent
//!   uninstall` (which removes every pin) detaches them.
//! * **Restart**: a new link for this build's program is attached next to the pinned one,
//!   pinned under a temporary name and renamed over the old pin (`rename(2)` drops the
//!   last reference to the old link, which detaches it). Both run for that instant; the
//!   second sees an address the first already translated (a backend, not a frontend) and
//!   leaves it: host clients are never without translation. (aya 0.14 has no
//!   `bpf_link_update` for cgroup links.)
use std::{
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError},
    },
};
use nodeplane_common::sock::{SockConfig, names};
use tracing::info;

use crate::{datapath::Datapath, pin::PinDir};

/// The programs, and the hook name in their link pins.
pub const HOOKS: [(&str, &str); 4] = [
    (names::PROG_SOCK_CONNECT4, "connect4"),
    (names::PROG_SOCK_SENDMSG4, "sendmsg4"),
    (names::PROG_SOCK_RECVMSG4, "recvmsg4"),
    (names::PROG_SOCK_GETPEERNAME4, "getpeername4"),
];

/// The `<iface>` part of a cgroup link pin's name.
const PIN_PREFIX: &str = "cgroup@";

#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    #[error("no cgroup2 filesystem is mounted (give --cgroup-root)")]
    NoCgroup2,
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(io::Error),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {}: {source}", names::SOCK_CONFIG)]
    Config { source: MapError },
    #[error("the link of {name}: {source}")]
    Link { name: &'static str, source: LinkError },
    #[error("pinning the link at {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SockLbError + 'a {
    move |source| SockLbError::Io { what, path: path.to_path_buf(), source }
}

/// What [`enable`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enabled {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// Pinned links of an earlier agent replaced (same cgroup) or removed (another one).
    pub replaced: usize,
}

/// The cgroup2 mount points in `/proc/self/mountinfo` text, in order.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent maj:min root mountpoint options [optional...] - fstype source opts`
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(unescape_mountinfo))?
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    PathBuf::from(out)
}

/// The default `--cgroup-root`: `/sys/fs/cgroup` if it is the cgroup2 mount (pure v2),
/// else the first cgroup2 mount (`/sys/fs/cgroup/unified` in a hybrid layout).
pub fn default_cgroup_root() -> Result<PathBuf, SockLbError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
    let mounts = cgroup2_mounts(&text);
    let pure = mounts.iter().find(|m| m.as_path() == Path::new("/sys/fs/cgroup"));
    pure.or(mounts.first()).cloned().ok_or(SockLbError::NoCgroup2)
}

/// The cookie of the calling thread's network namespace (kernel >= 5.14).
pub fn netns_cookie() -> Result<u64, SockLbError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(SockLbError::NetnsCookie)?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`, which outlives it.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(SockLbError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// The pin of `hook`'s link on the cgroup with id `cgroup_id`.
pub fn link_pin(dir: &PinDir, cgroup_id: u64, hook: &str) -> PathBuf {
    dir.links_dir().join(format!("{PIN_PREFIX}{cgroup_id}-{hook}"))
}

/// The socket LB's link pins under `dir`: `(cgroup id, hook, path)`, sorted.
pub fn link_pins(dir: &PinDir) -> Result<Vec<(u64, String, PathBuf)>, SockLbError> {
    let links = dir.links_dir();
    let entries = match fs::read_dir(&links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", &links)(e)),
    };
    let mut pins = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", &links))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, hook)) = name.strip_prefix(PIN_PREFIX).and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(id), true) = (id.parse(), HOOKS.iter().any(|(_, h)| *h == hook)) else {
            continue;
        };
        pins.push((id, hook.to_string(), entry.path()));
    }
    pins.sort();
    Ok(pins)
}

/// Loads the four programs (once), writes this namespace's cookie into `SOCK_CONFIG` and
/// attaches them to `cgroup`, replacing the links an earlier agent pinned without a gap
/// (module docs). Unpinned (tests), the links live as long as `dp`.
pub fn enable(dp: &mut Datapath, cgroup: &Path) -> Result<Enabled, SockLbError> {
    let netns_cookie = netns_cookie()?;
    let cgroup_fd = fs::File::open(cgroup).map_err(io_err("opening the cgroup", cgroup))?;
    let cgroup_id = cgroup_fd.metadata().map_err(io_err("reading", cgroup))?.ino();
    set_config(dp, netns_cookie)?;
    let pin_dir = dp.pin_dir().cloned();
    let mut replaced = 0;
    for (name, hook) in HOOKS {
        let program = program_mut(dp, name)?;
        match program.load() {
            Ok(()) | Err(ProgramError::AlreadyLoaded) => {}
            Err(source) => return Err(SockLbError::Program { name, source }),
        }
        let prog_err = |source| SockLbError::Program { name, source };
        // Links are always multi-attach (a cgroup link carries no attach flags): each
        // lab node's agent adds its own next to the others'.
        let id = program.attach(&cgroup_fd, CgroupAttachMode::Single).map_err(prog_err)?;
        let Some(dir) = &pin_dir else { continue };
        let link = program.take_link(id).map_err(prog_err)?;
        let link = FdLink::try_from(link).map_err(|source| SockLbError::Link { name, source })?;
        let path = link_pin(dir, cgroup_id, hook);
        // (No dot: bpffs refuses them. Not a pin name `link_pins` parses.)
        let tmp = dir.links_dir().join(format!("{PIN_PREFIX}{cgroup_id}-{hook}-new"));
        let _ = fs::remove_file(&tmp);
        drop(link.pin(&tmp).map_err(|source| SockLbError::Pin { path: tmp.clone(), source })?);
        replaced += usize::from(path.exists());
        fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
        dp.keep_link(path);
    }
    // Links on another cgroup (the root moved): this build's now run on `cgroup`.
    if let Some(dir) = &pin_dir {
        for (id, _, path) in link_pins(dir)? {
            if id != cgroup_id {
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                replaced += 1;
            }
        }
    }
    Ok(Enabled { cgroup: cgroup.to_path_buf(), cgroup_id, netns_cookie, replaced })
}

/// Turns the socket LB off: `SOCK_CONFIG` to 0 (pinned programs still attached stop
/// translating at once) and every socket LB link pin removed (which detaches them).
/// Returns the number of links removed.
pub fn disable(dp: &mut Datapath) -> Result<usize, SockLbError> {
    set_config(dp, 0)?;
    let Some(dir) = dp.pin_dir().cloned() else { return Ok(0) };
    let pins = link_pins(&dir)?;
    for (_, _, path) in &pins {
        fs::remove_file(path).map_err(io_err("removing", path))?;
    }
    Ok(pins.len())
}

/// What the agent does once its maps hold the cluster: [`enable`] on `cgroup_root` (the
/// cgroup2 mount's root when `None`), or [`disable`]. Logs what it did.
pub fn reconcile(
    dp: &mut Datapath,
    on: bool,
    cgroup_root: Option<&Path>,
) -> Result<(), SockLbError> {
    if !on {
        let removed = disable(dp)?;
        info!(removed, "socket LB of host-network clients off (--socket-lb=false)");
        return Ok(());
    }
    let root = match cgroup_root {
        Some(root) => root.to_path_buf(),
        None => default_cgroup_root()?,
    };
    let e = enable(dp, &root)?;
    info!(cgroup = %e.cgroup.display(), cgroup_id = e.cgroup_id, netns_cookie = e.netns_cookie,
          replaced = e.replaced, "socket LB of host-network clients attached");
    Ok(())
}

fn set_config(dp: &mut Datapath, netns_cookie: u64) -> Result<(), SockLbError> {
    let map = dp.ebpf_mut().map_mut(names::SOCK_CONFIG).ok_or(SockLbError::Config {
        source: MapError::InvalidName { name: names::SOCK_CONFIG.to_string() },
    })?;
    let mut config: Array<_, SockConfig> =
        Array::try_from(map).map_err(|source| SockLbError::Config { source })?;
    let value = SockConfig { netns_cookie, ..SockConfig::default() };
    config.set(0, value, 0).map_err(|source| SockLbError::Config { source })
}

fn program_mut<'a>(
    dp: &'a mut Datapath,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, SockLbError> {
    let program = dp
        .ebpf_mut()
        .program_mut(name)
        .ok_or(SockLbError::Program { name, source: ProgramError::UnexpectedProgramType })?;
    program.try_into().map_err(|source| SockLbError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_a_hybrid_and_a_pure_layout() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mounts(hybrid), [PathBuf::from("/sys/fs/cgroup/unified")]);
        let pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                    50 29 0:40 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mounts(pure),
            [PathBuf::from("/sys/fs/cgroup"), PathBuf::from("/mnt/my cg")]
        );
        assert!(cgroup2_mounts("garbage\n").is_empty());
    }

    #[test]
    fn link_pins_parse_back_and_ignore_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir::new(dir.path());
        fs::create_dir_all(pins.links_dir()).unwrap();
        for hook in ["connect4", "recvmsg4"] {
            fs::write(link_pin(&pins, 7, hook), b"").unwrap();
        }
        for junk in ["cgroup@7-connect4-new", "cgroup@x-connect4", "lxc1@3-ingress"] {
            fs::write(pins.links_dir().join(junk), b"").unwrap();
        }
        let found: Vec<_> = link_pins(&pins).unwrap().into_iter().map(|(i, h, _)| (i, h)).collect();
        assert_eq!(found, [(7, "connect4".to_string()), (7, "recvmsg4".to_string())]);
        // pin.rs's own parser (tc links) must not take them for interfaces.
        assert!(pins.link_pins().unwrap().iter().all(|l| !l.iface.starts_with("cgroup")));
    }
}
