//! The files a task keeps in the array directory, beside the coordination
//! object: the running lock, each partition's findings (saved as it goes, and
//! once complete), and the report a finished task leaves.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use controllers::findings::Findings;
use serde::{Deserialize, Serialize};

use super::{ControllerError, TaskKind};

/// The coordination file of `kind` in array `dir`.
pub fn task_path(dir: &Path, kind: TaskKind) -> PathBuf {
    dir.join(format!("task-{}.coord", kind.name()))
}

/// The report a finished task leaves in the array directory.
pub fn report_path(dir: &Path, kind: TaskKind) -> PathBuf {
    dir.join(format!("{}-report.json", kind.name()))
}

/// The findings file of partition `partition` as completed by the claim of
/// generation `generation`: an owner that lost its claim (and writes its file
/// before finding out) never overwrites the file of the owner that completed.
pub(super) fn partition_findings_path(
    dir: &Path,
    kind: TaskKind,
    partition: u32,
    generation: u32,
) -> PathBuf {
    dir.join(format!(
        "task-{}.part{partition}.g{generation}.json",
        kind.name()
    ))
}

/// What a partition's work found before some points of it, as one claim saved
/// them: its owner saves the findings (with the point) whenever it finds
/// something new, before it records that progress, so a controller that
/// resumes the partition after its owner died starts from what was found
/// before the resume point.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct FoundSoFar {
    pub(super) points: Vec<(u64, Findings)>,
}

fn found_prefix(kind: TaskKind, partition: u32) -> String {
    format!("task-{}.part{partition}.g", kind.name())
}

/// Claim `generation`'s saved findings of `partition`.
pub(super) fn found_path(dir: &Path, kind: TaskKind, partition: u32, generation: u32) -> PathBuf {
    dir.join(format!(
        "{}{generation}.found.json",
        found_prefix(kind, partition)
    ))
}

/// What was found in `partition` before byte `resume_from` of it, by the
/// claims before this one: the latest point saved at or before it.
pub(super) fn found_before(
    dir: &Path,
    kind: TaskKind,
    partition: u32,
    resume_from: u64,
) -> Findings {
    if resume_from == 0 {
        return Findings::default();
    }
    files_named(dir, &found_prefix(kind, partition), &[".found.json"])
        .into_iter()
        .filter_map(|path| std::fs::read(path).ok())
        .filter_map(|bytes| serde_json::from_slice::<FoundSoFar>(&bytes).ok())
        .flat_map(|saved| saved.points)
        .filter(|(point, _)| *point <= resume_from)
        .max_by_key(|(point, _)| *point)
        .map(|(_, found)| found)
        .unwrap_or_default()
}

/// Writes `file` whole or not at all (a temporary file renamed over it).
pub(super) fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = file.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, file)
}

/// The file whose `flock` says controllers of task `kind` are running.
pub(super) fn running_path(dir: &Path, kind: TaskKind) -> PathBuf {
    dir.join(format!("task-{}.running", kind.name()))
}

pub(super) fn open_running_lock(
    dir: &Path,
    kind: TaskKind,
) -> Result<std::fs::File, ControllerError> {
    let path = running_path(dir, kind);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(ControllerError::io(path, "open"))
}

/// The files in `dir` whose names start with `prefix` and end with one of
/// `suffixes` (none if `dir` cannot be read).
fn files_named(dir: &Path, prefix: &str, suffixes: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with(prefix) && suffixes.iter().any(|suffix| name.ends_with(suffix))
        })
        .map(|entry| entry.path())
        .collect()
}

/// Removes every partition findings file of task `kind`.
pub(super) fn remove_partition_findings(dir: &Path, kind: TaskKind) {
    let prefix = format!("task-{}.part", kind.name());
    for path in files_named(dir, &prefix, &[".json", ".tmp"]) {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes the coordination file of `kind` and its partitions' findings.
pub(super) fn remove_task(dir: &Path, kind: TaskKind) -> Result<(), ControllerError> {
    let path = task_path(dir, kind);
    std::fs::remove_file(&path).map_err(ControllerError::io(path, "remove"))?;
    remove_partition_findings(dir, kind);
    Ok(())
}

/// Milliseconds since the Unix epoch, the coordination object's clock.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
