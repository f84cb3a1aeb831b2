//! Tearing labs down: this one, the remains of dead ones, or every lab on the machine.
//! Everything here is idempotent: a second run finds nothing to do.
use std::{fs, io, path::Path, time::Duration};

use super::{Lab, LabError, current_path, current_slot, io_err, pods::reap};
use crate::{files, naming, netns, process, slot::Slots, topology};

/// How long processes in the node netns (the agent) get between SIGTERM and SIGKILL.
const NODE_GRACE: Duration = Duration::from_secs(3);

impl Lab {
    /// Stops the node's processes gracefully, kills everything else, deletes the netns,
    /// the state directory and the slot. Idempotent.
    pub(super) fn teardown(&self) -> Result<(), LabError> {
        let mut inner = self.lock();
        if inner.torn_down {
            return Ok(());
        }
        inner.torn_down = true;
        stop_node_processes(self.slot);
        let result = destroy_remains(self.slot, Some(&self.state_dir));
        for (_, child) in std::mem::take(&mut inner.servers) {
            reap(child);
        }
        if current_slot(&self.cfg.state_root).ok().flatten() == Some(self.slot) {
            let current = current_path(&self.cfg.state_root);
            files::remove_file_if_exists(&current).map_err(io_err("removing", &current))?;
        }
        // A slot whose netns could not be removed stays claimed, so nobody reuses its names.
        result?;
        Ok(Slots::system().release(self.slot)?)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.cfg.persistent {
            return;
        }
        if let Err(e) = self.teardown() {
            tracing::warn!(slot = self.slot, error = %e, "lab teardown");
        }
    }
}

/// SIGTERM to everything in the node netns (the agent wants to clean up), SIGKILL after
/// [`NODE_GRACE`]. Every node of a multi-node lab, under one grace period.
fn stop_node_processes(slot: u8) {
    let me = std::process::id();
    let mut pids = Vec::new();
    for index in 0..topology::MAX_NODES {
        let node = topology::node_netns(slot, index);
        if !netns::exists(&node) {
            continue;
        }
        match netns::pids(&node) {
            Ok(found) => pids.extend(found.into_iter().filter(|&p| p != me)),
            Err(e) => tracing::warn!(netns = %node, error = %e, "listing node processes"),
        }
    }
    process::terminate(&pids, NODE_GRACE);
}

/// Kills and deletes every netns of `slot`, removes its agent's pins and its state
/// directory: the cleanup
/// for labs whose owner died, which has only names and paths to go on.
pub(super) fn destroy_remains(slot: u8, state_dir: Option<&Path>) -> Result<(), LabError> {
    netns::remove_all(&naming::netns_prefix(slot))?;
    // The agent's pins: with the interfaces gone its links are defunct; this frees the
    // programs and maps (what `nodeplane-agent uninstall` does).
    let pins = naming::bpffs_dir(slot);
    files::remove_dir_if_exists(&pins).map_err(io_err("removing", &pins))?;
    if let Some(dir) = state_dir {
        files::remove_dir_if_exists(dir).map_err(io_err("removing", dir))?;
    }
    Ok(())
}

/// Removes every lab on the machine: all slots (live or not), any `np{N}-` netns without
/// a slot, and every `lab-*` directory under `state_root`. Returns the slots it found.
pub fn down_all(state_root: &Path) -> Result<Vec<u8>, LabError> {
    let slots = Slots::system();
    let _lock = slots.lock()?;
    let mut found = Vec::new();
    for record in slots.list()? {
        stop_node_processes(record.slot);
        destroy_remains(record.slot, record.state_dir.as_deref())?;
        slots.release(record.slot)?;
        found.push(record.slot);
    }
    for name in netns::list("np")? {
        if naming::slot_of_netns(&name).is_some() {
            netns::kill_all(&name)?;
            netns::delete(&name)?;
        }
    }
    remove_lab_dirs(state_root)?;
    let current = current_path(state_root);
    files::remove_file_if_exists(&current).map_err(io_err("removing", &current))?;
    Ok(found)
}

fn remove_lab_dirs(state_root: &Path) -> Result<(), LabError> {
    let entries = match fs::read_dir(state_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", state_root)(e)),
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("lab-") {
            let path = entry.path();
            files::remove_dir_if_exists(&path).map_err(io_err("removing", &path))?;
        }
    }
    Ok(())
}
