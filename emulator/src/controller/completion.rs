//! The initiator's completion actions, once every partition is COMPLETE: the
//! task's report (what every partition found, who completed it), saved as
//! `DIR/<task>-report.json`, and for a rebuild, the rebuilt disk made active.

use std::path::Path;

use controllers::array::Array;
use controllers::coordination::{PartitionState, TaskFile};
use controllers::findings::Findings;
use serde::{Deserialize, Serialize};

use super::files::{partition_findings_path, report_path};
use super::{ControllerError, TaskKind};

/// What a finished task reports (also `DIR/<task>-report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskReport {
    /// The task.
    pub operation: TaskKind,
    /// Whether a scrub repaired.
    pub repair: bool,
    /// Member offsets covered per disk.
    pub bytes_per_disk: u64,
    /// For a rebuild: the rebuilt disk.
    pub rebuilt_disk: Option<u32>,
    /// What the whole task found (unrecoverable array offsets sorted).
    #[serde(flatten)]
    pub findings: Findings,
    /// Which controller completed which partition.
    pub partitions: Vec<PartitionReport>,
}

impl TaskReport {
    /// Whether the task left nothing wrong behind: nothing unrecoverable, and
    /// for a scrub without repair, nothing found.
    pub fn is_clean(&self) -> bool {
        self.findings.unrecoverable.is_empty()
            && (self.operation == TaskKind::Rebuild || self.repair || self.findings.is_clean())
    }
}

/// One partition in a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionReport {
    /// Index.
    pub index: u32,
    /// First member byte.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// The controller that completed it.
    pub completed_by: Option<u8>,
}

/// The initiator's completion actions.
pub(super) fn complete_task(
    dir: &Path,
    kind: TaskKind,
    task: &TaskFile,
) -> Result<(), ControllerError> {
    let spec = task.spec();
    let partitions = task.partitions();
    let mut findings = Findings::default();
    for partition in &partitions {
        debug_assert_eq!(partition.state, PartitionState::Complete);
        // The counts are the coordination object's; the rest is in the file
        // the completing claim wrote (none: nothing more is known).
        let saved: Findings = std::fs::read(partition_findings_path(
            dir,
            kind,
            partition.index,
            partition.generation,
        ))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
        findings.add(&Findings {
            rows_checked: partition.findings.checked,
            checksum_errors: partition.findings.errors,
            repaired: partition.findings.repaired,
            ..saved
        });
    }
    findings.unrecoverable.sort_unstable();
    let report = TaskReport {
        operation: kind,
        repair: spec.repair,
        bytes_per_disk: spec.data_set_bytes,
        rebuilt_disk: spec.target_disk,
        findings,
        partitions: partitions
            .iter()
            .map(|p| PartitionReport {
                index: p.index,
                start: p.start,
                length: p.length,
                completed_by: p.owner,
            })
            .collect(),
    };
    if kind == TaskKind::Rebuild {
        let target = spec.target_disk.ok_or_else(|| {
            ControllerError::Refused("the rebuild's coordination file names no disk".into())
        })?;
        Array::open(dir)?.finish_rebuild_onto(target as usize, &spec.data_set)?;
    }
    let path = report_path(dir, kind);
    let text = serde_json::to_string_pretty(&report).map_err(|source| ControllerError::Json {
        path: path.clone(),
        source,
    })? + "\n";
    std::fs::write(&path, text).map_err(ControllerError::io(path, "write"))
}
