//! Machine-wide slot registry: which lab owns which N (and so which names and ranges).
//!
//! A slot is the file `SLOT_DIR/N`, created with O_EXCL. Its first line is the owner: a
//! PID (the lab lives as long as that process) or `cli` (a lab from `nodeplane-lab up`,
//! which lives until `down`). The second line is the lab's state directory.
//!
//! Claims and reaping happen under an flock on `SLOT_DIR/.lock`. Without it, a process
//! reaping a stale slot could tear down the netns that another process has just created
//! after claiming the same, freshly freed, number. Holding the lock also makes an empty
//! or unreadable slot file unambiguous: its writer died between create and write.
use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    naming::{MAX_SLOT, MIN_SLOT},
    process,
};

/// Slots are machine-wide because netns names are, whatever a lab's state root is.
pub const SLOT_DIR: &str = "/run/nodeplane-lab/slots";

const LOCK_FILE: &str = ".lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("all slots {MIN_SLOT}..={MAX_SLOT} are taken (see `nodeplane-lab status`)")]
    Exhausted,
    #[error("timed out after {0:?} waiting for the slot lock in {SLOT_DIR}")]
    LockTimeout(Duration),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SlotError {
    let path = path.to_path_buf();
    move |source| SlotError::Io { action, path, source }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Pid(u32),
    Cli,
}

impl Owner {
    /// The current process.
    pub fn me() -> Self {
        Owner::Pid(std::process::id())
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "cli" => Some(Owner::Cli),
            pid => pid.parse().ok().map(Owner::Pid),
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Owner::Cli => true,
            Owner::Pid(pid) => process::alive(*pid),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Pid(pid) => write!(f, "{pid}"),
            Owner::Cli => f.write_str("cli"),
        }
    }
}

/// One slot file as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    pub slot: u8,
    /// `None` if the file is empty or garbled.
    pub owner: Option<Owner>,
    pub state_dir: Option<PathBuf>,
}

impl SlotRecord {
    /// Its owner is gone (or unknown), so whatever the slot holds is left over.
    pub fn is_stale(&self) -> bool {
        self.owner.as_ref().is_none_or(|o| !o.is_alive())
    }
}

/// Held while claiming or reaping; released when dropped (closing the file drops the flock).
pub struct SlotLock(#[expect(dead_code, reason = "held for its flock")] File);

/// A slot directory; [`Slots::system`] is the real one, tests use temporary ones.
#[derive(Clone, Debug)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Slots { dir: dir.into() }
    }

    pub fn system() -> Self {
        Slots::new(SLOT_DIR)
    }

    fn path(&self, slot: u8) -> PathBuf {
        self.dir.join(slot.to_string())
    }

    /// Takes the registry lock, waiting at most 30 s (`LOCK_TIMEOUT`).
    pub fn lock(&self) -> Result<SlotLock, SlotError> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(SlotLock(file)),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(SlotError::LockTimeout(LOCK_TIMEOUT));
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_err("locking", &path)(e)),
            }
        }
    }

    /// Every slot file, sorted by number.
    pub fn list(&self) -> Result<Vec<SlotRecord>, SlotError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &self.dir)(e)),
        };
        let mut records: Vec<SlotRecord> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u8>().ok())
            .map(|slot| self.read(slot))
            .collect();
        records.sort_by_key(|r| r.slot);
        Ok(records)
    }

    fn read(&self, slot: u8) -> SlotRecord {
        let text = fs::read_to_string(self.path(slot)).unwrap_or_default();
        let mut lines = text.lines();
        let owner = lines.next().and_then(Owner::parse);
        let state_dir = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
        SlotRecord { slot, owner, state_dir }
    }

    /// Reaps stale slots, then claims the lowest free one for `owner`.
    ///
    /// `reap` tears down what a stale slot left behind; its file is removed only if that
    /// succeeded, so a slot that could not be cleaned is not handed out again.
    pub fn claim<E: fmt::Display>(
        &self,
        owner: &Owner,
        state_dir: impl Fn(u8) -> PathBuf,
        mut reap: impl FnMut(&SlotRecord) -> Result<(), E>,
    ) -> Result<u8, SlotError> {
        let _lock = self.lock()?;
        for record in self.list()?.iter().filter(|r| r.is_stale()) {
            match reap(record) {
                Ok(()) => self.release(record.slot)?,
                Err(e) => {
                    tracing::warn!(slot = record.slot, error = %e, "cannot reap stale lab slot")
                }
            }
        }
        for slot in MIN_SLOT..=MAX_SLOT {
            let path = self.path(slot);
            let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating", &path)(e)),
            };
            let contents = format!("{owner}\n{}\n", state_dir(slot).display());
            file.write_all(contents.as_bytes()).map_err(io_err("writing", &path))?;
            return Ok(slot);
        }
        Err(SlotError::Exhausted)
    }

    /// Frees a slot; freeing a free slot is fine.
    pub fn release(&self, slot: u8) -> Result<(), SlotError> {
        let path = self.path(slot);
        crate::files::remove_file_if_exists(&path).map_err(io_err("removing", &path))
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, process::Command};

    use super::*;

    fn dead_pid() -> u32 {
        let mut child = Command::new("true").spawn().expect("spawn true");
        child.wait().expect("wait true");
        child.id()
    }

    fn no_reap(_: &SlotRecord) -> Result<(), Infallible> {
        panic!("nothing should be stale")
    }

    #[test]
    fn claims_distinct_slots_and_records_owner_and_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = Slots::new(dir.path());
        let state = |n: u8| PathBuf::from(format!("/state/lab-{n}"));
        let a = slots.claim(&Owner::me(), state, no_reap).expect("first");
        let b = slots.claim(&Owner::Cli, state, no_reap).expect("second");
        assert_eq!((a, b), (1, 2));
        let records = slots.list().expect("list");
        assert_eq!(records[0].owner, Some(Owner::me()));
        assert_eq!(records[1].owner, Some(Owner::Cli));
        assert_eq!(records[1].state_dir, Some(PathBuf::from("/state/lab-2")));
        slots.release(a).expect("release");
        slots.release(a).expect("release twice");
        assert_eq!(slots.claim(&Owner::me(), state, no_reap).expect("reuse"), 1);
    }

    #[test]
    fn reaps_dead_and_garbled_owners_but_not_live_or_cli_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = Slots::new(dir.path());
        fs::write(dir.path().join("1"), format!("{}\n/s/1\n", dead_pid())).expect("write");
        fs::write(dir.path().join("2"), "").expect("write"); // writer died mid-claim
        fs::write(dir.path().join("3"), "cli\n/s/3\n").expect("write");
        fs::write(dir.path().join("4"), format!("{}\n", std::process::id())).expect("write");
        let mut reaped = Vec::new();
        let slot = slots
            .claim(
                &Owner::me(),
                |n| PathBuf::from(format!("/s/{n}")),
                |r: &SlotRecord| {
                    reaped.push((r.slot, r.state_dir.clone()));
                    Ok::<_, Infallible>(())
                },
            )
            .expect("claim");
        assert_eq!(reaped, [(1, Some(PathBuf::from("/s/1"))), (2, None)]);
        assert_eq!(slot, 1);
        let left: Vec<u8> = slots.list().expect("list").iter().map(|r| r.slot).collect();
        assert_eq!(left, [1, 3, 4]);
    }

    #[test]
    fn a_slot_that_cannot_be_reaped_is_not_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = Slots::new(dir.path());
        fs::write(dir.path().join("1"), format!("{}\n", dead_pid())).expect("write");
        let slot = slots
            .claim(&Owner::me(), |n| PathBuf::from(format!("/s/{n}")), |_| Err("netns busy"))
            .expect("claim");
        assert_eq!(slot, 2);
    }
}
