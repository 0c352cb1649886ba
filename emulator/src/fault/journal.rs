//! A death in a write of the degraded-write journal (`journal-crash`): a
//! crash rule of the system's fault book (`controllers::faults`) for the file
//! `array.journal`, which the journal's crash points follow
//! (`controllers::journal`): the process making the `nth` journal write (an
//! entry saved before a degraded row is written, or one cleared after) dies
//! there with SIGABRT, after hanging `stall_ms`. Such writes happen only
//! while an array is degraded. It fires once; cleared before, it never does.

use serde::{Deserialize, Serialize};

use controllers::faults::{DiskRule, FaultBook};
use controllers::journal::JOURNAL_FILE;

use super::{disk, FaultError, FaultRecord};
use crate::rundir::RunDir;

/// Which system's journal, which write, and in which process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct JournalFault {
    /// Server system (default `s0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Which journal write the process dies at, from 1 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth: Option<u64>,
    /// How long the dying process hangs first, ms (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
    /// Only in this process, e.g. `s0/c0/driver` (default: whichever makes
    /// the nth journal write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

/// Adds the crash rule for the journal to the system's fault book; what it
/// did and that it stands (until it fires or is cleared).
pub(super) fn inject(
    run: &RunDir,
    id: &str,
    fault: &JournalFault,
) -> Result<(String, bool), FaultError> {
    let (system, dir) = disk::system_dir(run, fault.system.as_deref())?;
    let (effect, dies) = disk::crash(fault.nth, fault.stall_ms)?;
    let mut said = format!(
        "{system}'s degraded-write journal ({JOURNAL_FILE}): the process making journal write \
         number {} {dies}",
        fault.nth.unwrap_or(1)
    );
    let rule = DiskRule {
        pid: disk::only_in(run, fault.process.as_deref(), &mut said)?,
        ..DiskRule::everywhere(id, JOURNAL_FILE, effect)
    };
    FaultBook::open(&dir)?.change(|rules| rules.push(rule))?;
    said.push_str(" (journal writes happen only while the array is degraded)");
    Ok((said, true))
}

/// Removes the rule, if it has not fired.
pub(super) fn clear(
    run: &RunDir,
    fault: &FaultRecord,
    spec: &JournalFault,
) -> Result<(), FaultError> {
    disk::clear_rule(run, spec.system.as_deref(), &fault.id)
}
