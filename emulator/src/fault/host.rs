//! Host faults: the host file system under a system's disks is full
//! (`host-fs-full`). It is one rule of the system's fault book
//! (`controllers::faults`) for every disk file (`file = "*"`: members,
//! spares, disks added later), [`Effect::FsFull`]: the fault layer of every
//! process that has the array open fails a write touching a block the image
//! file has not allocated with ENOSPC, as a real full file system does, and
//! lets overwrites of allocated blocks through. It stands until cleared.

use serde::{Deserialize, Serialize};

use controllers::faults::{DiskRule, Effect, FaultBook, ANY_FILE};

use super::{disk, FaultError, FaultRecord};
use crate::rundir::RunDir;

/// Which system's host file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HostFault {
    /// Server system whose disks it is under (default `s0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// Adds the full file system's rule to the system's fault book; what it did
/// and that it stands.
pub(super) fn inject(
    run: &RunDir,
    id: &str,
    fault: &HostFault,
) -> Result<(String, bool), FaultError> {
    let (system, dir) = disk::system_dir(run, fault.system.as_deref())?;
    let rule = DiskRule::everywhere(id, ANY_FILE, Effect::FsFull);
    FaultBook::open(&dir)?.change(|rules| rules.push(rule))?;
    Ok((
        format!(
            "the host file system under {system}'s disks is full: writes to blocks never \
             written before fail with ENOSPC (overwrites still succeed)"
        ),
        true,
    ))
}

/// Removes the rule: the file system has room again.
pub(super) fn clear(run: &RunDir, fault: &FaultRecord, spec: &HostFault) -> Result<(), FaultError> {
    disk::clear_rule(run, spec.system.as_deref(), &fault.id)
}
