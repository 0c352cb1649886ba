//! A death in a write of the degraded-write journal (`journal-crash`): a
//! crash rule of the system's fault book (`controllers::faults`) for the file
//! `array.journal`, which the journal's crash points follow
//! (`controllers::journal`): the process making the `nth` journal write (an
//! entry saved before a degraded row is written, or one cleared after) dies
//! there with SIGABRT, after hanging `stall_ms`. Such writes happen only
//! while an array is degraded. It fires once; cleared before, it never does.

use serde::{Deserialize, Serialize};

use controllers::faults::{DiskRule, Effect, FaultBook, OpSet, Writers};
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
    let nth = fault.nth.unwrap_or(1);
    if nth == 0 {
        return Err(FaultError::Invalid(
            "nth = 0: journal writes count from 1".into(),
        ));
    }
    let stall_ms = fault.stall_ms.unwrap_or(0);
    let mut said = format!(
        "{system}'s degraded-write journal ({JOURNAL_FILE}): the process making journal write \
         number {nth} dies there{}",
        if stall_ms > 0 {
            format!(", after hanging {stall_ms} ms")
        } else {
            String::new()
        }
    );
    let pid = match &fault.process {
        None => None,
        Some(name) => {
            let pid = disk::running_pid(run, name)?;
            said.push_str(&format!(", only in {name} (pid {pid})"));
            Some(pid)
        }
    };
    let rule = DiskRule {
        id: id.to_string(),
        file: JOURNAL_FILE.to_string(),
        effect: Effect::Crash { nth, stall_ms },
        ops: OpSet::ALL,
        writers: Writers::ALL,
        pid,
        start: 0,
        end: u64::MAX,
        rate: 1.0,
        seed: 0,
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
