//! Named network namespaces and the wiring inside them, through `ip` (iproute2).
//!
//! Shelling out to `ip` keeps the lab readable as the commands a person would type, and
//! `ip -n NS -batch -` keeps it to a few processes per pod. Code that must run *inside* a
//! namespace (sysctls, sockets) uses [`run_in`], which moves one fresh thread there.
use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{self, Write},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
};

use crate::{naming::POD_GATEWAY, process};

/// Where `ip netns add` puts the namespace handles.
pub const RUN_NETNS: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
    #[error("entering netns {netns}: {source}")]
    Enter { netns: String, source: io::Error },
    #[error("setting {key}={value} in netns {netns}: {source}")]
    Sysctl { netns: String, key: String, value: String, source: io::Error },
    #[error("listing {}: {source}", dir.display())]
    List { dir: PathBuf, source: io::Error },
    #[error("killing pid {pid} in netns {netns}: {source}")]
    Kill { netns: String, pid: u32, source: io::Error },
}

/// Runs `ip ARGS...`, feeding `stdin` if given; returns stdout.
fn run_ip(args: &[&str], stdin: Option<&str>) -> Result<String, NetnsError> {
    let command = format!("ip {}", args.join(" "));
    let spawn_err = |source| NetnsError::Spawn { command: command.clone(), source };
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetnsError::Failed { command, status: out.status, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n NETNS -batch -` with one command per line; the first failure stops it.
fn batch(netns: &str, lines: &[String]) -> Result<(), NetnsError> {
    run_ip(&["-n", netns, "-batch", "-"], Some(&(lines.join("\n") + "\n"))).map(drop)
}

pub fn exists(name: &str) -> bool {
    Path::new(RUN_NETNS).join(name).exists()
}

/// Names of all named netns starting with `prefix`, sorted.
pub fn list(prefix: &str) -> Result<Vec<String>, NetnsError> {
    let entries = match fs::read_dir(RUN_NETNS) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NetnsError::List { dir: RUN_NETNS.into(), source }),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Creates a namespace with `lo` up. An existing one of that name is an error: it
/// would belong to someone else.
pub fn add(name: &str) -> Result<(), NetnsError> {
    run_ip(&["netns", "add", name], None)?;
    run_ip(&["-n", name, "link", "set", "lo", "up"], None).map(drop)
}

/// Deletes a namespace; one that is already gone is fine.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    if !exists(name) {
        return Ok(());
    }
    run_ip(&["netns", "delete", name], None).map(drop)
}

/// PIDs of processes whose network namespace is `name`.
pub fn pids(name: &str) -> Result<Vec<u32>, NetnsError> {
    let out = run_ip(&["netns", "pids", name], None)?;
    Ok(out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// SIGKILLs every process in the namespace except this one (a caller that itself runs
/// inside a lab netns must not kill itself while tearing down).
pub fn kill_all(name: &str) -> Result<(), NetnsError> {
    if !exists(name) {
        return Ok(());
    }
    let me = std::process::id();
    for pid in pids(name)?.into_iter().filter(|&p| p != me) {
        process::signal(pid, libc::SIGKILL).map_err(|source| NetnsError::Kill {
            netns: name.into(),
            pid,
            source,
        })?;
    }
    Ok(())
}

/// Kills the processes in, then deletes, every netns starting with `prefix`. Pods go
/// before the node so no veth peer outlives its namespace for long.
pub fn remove_all(prefix: &str) -> Result<(), NetnsError> {
    let mut names = list(prefix)?;
    names.sort_by_key(|n| n.ends_with("-node"));
    let mut first_error = None;
    for name in &names {
        if let Err(e) = kill_all(name).and_then(|()| delete(name)) {
            tracing::warn!(netns = %name, error = %e, "netns teardown");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs `f` on a fresh thread whose network namespace is `netns`, and returns its result.
///
/// Sockets created in `f` stay in that namespace for their whole life, even after the
/// thread ends, so a caller can connect "from a pod" and keep using the stream.
pub fn run_in<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
    let enter_err = |source| NetnsError::Enter { netns: netns.to_string(), source };
    let handle = File::open(Path::new(RUN_NETNS).join(netns)).map_err(enter_err)?;
    thread::scope(|s| {
        let worker = s.spawn(move || {
            enter(&handle)?;
            Ok(f())
        });
        match worker.join() {
            Ok(result) => result.map_err(enter_err),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn enter(handle: &File) -> io::Result<()> {
    // SAFETY: setns(2) only reads the descriptor, which `handle` keeps open across the
    // call. It changes the network namespace of the calling thread alone; that thread is
    // private to `run_in` and ends when `f` returns.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets sysctls (`net.ipv4.ip_forward` style keys) inside `netns`. `/proc/sys/net` shows
/// the namespace of the thread that opens it, so a thread moved there is enough.
pub fn sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<(), NetnsError> {
    let result = run_in(netns, || {
        for &(key, value) in settings {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            fs::write(path, value).map_err(|source| (key, value, source))?;
        }
        Ok(())
    })?;
    result.map_err(|(key, value, source)| NetnsError::Sysctl {
        netns: netns.into(),
        key: key.into(),
        value: value.into(),
        source,
    })
}

/// The node: routes between pods, and owns the pods' gateway address.
///
/// The gateway and node IPs sit on `lo`: the node then answers ARP for them on every
/// veth (arp_ignore=0), and traffic to unknown destinations fails fast with "network
/// unreachable" because the node has no default route. Nothing can leave the lab.
pub fn create_node(netns: &str, node_ip: Ipv4Addr) -> Result<(), NetnsError> {
    add(netns)?;
    sysctls(
        netns,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ],
    )?;
    batch(
        netns,
        &[format!("addr add {node_ip}/32 dev lo"), format!("addr add {POD_GATEWAY}/32 dev lo")],
    )
}

/// What wiring one pod needs.
#[derive(Clone, Debug)]
pub struct PodLink<'a> {
    pub node_netns: &'a str,
    pub pod_netns: &'a str,
    pub host_veth: &'a str,
    pub ip: Ipv4Addr,
}

/// Creates the pod's netns and its veth pair the way a CNI plugin (Calico's, roughly)
/// would: `/32` on the pod's `eth0`, a link-scoped gateway, a `/32` route on the node.
pub fn create_pod(link: &PodLink<'_>) -> Result<(), NetnsError> {
    let PodLink { node_netns, pod_netns, host_veth, ip } = *link;
    add(pod_netns)?;
    let veth =
        ["link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod_netns];
    run_ip(&[&["-n", node_netns][..], &veth].concat(), None)?;
    batch(
        pod_netns,
        &[
            format!("addr add {ip}/32 dev eth0"),
            "link set eth0 up".into(),
            format!("route add {POD_GATEWAY} dev eth0 scope link"),
            format!("route add default via {POD_GATEWAY} dev eth0"),
        ],
    )?;
    // proxy_delay=0: proxy ARP replies are otherwise delayed by up to 0.8 s.
    sysctls(
        node_netns,
        &[
            (format!("net.ipv4.conf.{host_veth}.proxy_arp").as_str(), "1"),
            (format!("net.ipv4.neigh.{host_veth}.proxy_delay").as_str(), "0"),
        ],
    )?;
    batch(
        node_netns,
        &[format!("link set {host_veth} up"), format!("route add {ip}/32 dev {host_veth}")],
    )
}

/// A `Command` for `ip netns exec NETNS PROGRAM ARGS...`.
/// `program args` in `netns`, entered with setns(2) between fork and exec. Unlike
/// [`exec_command`] (`ip netns exec`, which gives the process a mount namespace of its
/// own with a fresh /sys), the process keeps the caller's mounts: the agent must pin its
/// datapath on the host's bpffs (/sys/fs/bpf), as a DaemonSet's hostPath mount does.
pub fn enter_command(
    netns: &str,
    program: impl AsRef<OsStr>,
    args: &[impl AsRef<OsStr>],
) -> Result<Command, NetnsError> {
    use std::os::unix::process::CommandExt as _;
    let enter_err = |source| NetnsError::Enter { netns: netns.to_string(), source };
    let handle = File::open(Path::new(RUN_NETNS).join(netns)).map_err(enter_err)?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
    // which is async-signal-safe; `handle` stays open in the closure until exec.
    unsafe {
        cmd.pre_exec(move || enter(&handle));
    }
    Ok(cmd)
}

pub fn exec_command(
    netns: &str,
    program: impl AsRef<OsStr>,
    args: &[impl AsRef<OsStr>],
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program).args(args);
    cmd
}
