//! Signals and liveness by PID, for processes the lab did not necessarily start itself
//! (what `ip netns pids` reports, or owners recorded in slot files).
use std::{
    fs, io, thread,
    time::{Duration, Instant},
};

/// Whether `pid` names a process that has not exited. Zombies count as exited: a killed
/// child whose parent has not reaped it yet will never answer again.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Sends `signal` to `pid`. A process that is already gone is not an error.
pub fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    if pid <= 0 {
        // 0 and negative PIDs address process groups; never do that by accident.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal a process group",
        ));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(err) }
}

/// SIGTERM, then up to `grace` for the processes to exit, then SIGKILL for the rest.
/// Used for processes that may want to clean up (the agent), unlike pod servers.
pub fn terminate(pids: &[u32], grace: Duration) {
    for &pid in pids {
        if let Err(e) = signal(pid, libc::SIGTERM) {
            tracing::warn!(pid, error = %e, "SIGTERM failed");
        }
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        if let Err(e) = signal(pid, libc::SIGKILL) {
            tracing::warn!(pid, error = %e, "SIGKILL failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn alive_tracks_a_child_until_it_exits() {
        assert!(alive(std::process::id()));
        let mut child = Command::new("sleep").arg("5").spawn().expect("spawn sleep");
        assert!(alive(child.id()));
        terminate(&[child.id()], Duration::from_secs(2));
        // Killed but not yet reaped is a zombie, which counts as gone.
        assert!(!alive(child.id()));
        child.wait().expect("reap");
        assert!(!alive(child.id()));
    }

    #[test]
    fn refuses_process_groups() {
        assert!(signal(0, 0).is_err());
    }
}
