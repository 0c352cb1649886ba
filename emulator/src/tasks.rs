//! Long array tasks (rebuild, scrub) split across controller processes through
//! the task coordination object (`controllers::coordination`).
//!
//! `emulator array rebuild|scrub` writes the coordination file
//! (`DIR/task-rebuild.coord` or `DIR/task-scrub.coord`) and starts one
//! `emulator controller` process per controller. Each claims READY partitions
//! (or ones whose owner stopped renewing its lease), works through them in 1 MiB
//! steps, renewing its lease and recording progress after each, and marks them
//! COMPLETE. Controller 0 is the initiator: when every partition is COMPLETE it
//! runs the completion actions (a rebuilt disk becomes active; a scrub's findings
//! are written to `DIR/scrub-report.json`) and removes the coordination file.
//! Running the command again while a coordination file exists resumes that task.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use controllers::array::Array;
use controllers::coordination::{Control, Findings, Operation, PartitionState, TaskFile, TaskSpec};
use controllers::raid::MemberState;
use controllers::work::{rebuild_range, scrub_range, ScrubFindings, WorkError};
use serde::{Deserialize, Serialize};

/// Default lease: a partition whose owner has not renewed for this long goes to
/// another controller.
pub const DEFAULT_LEASE_MS: u64 = 5_000;
/// Most controllers a task may be split across.
/// (Each has the array open, and at most `controllers::live::SLOTS` = 8 processes may:
/// this leaves room for servers and the CLI.)
pub const MAX_CONTROLLERS: u8 = 4;

/// The tasks the CLI starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Rebuild the member being rebuilt.
    Rebuild,
    /// Scrub the array.
    Scrub,
}

impl TaskKind {
    fn operation(self) -> Operation {
        match self {
            Self::Rebuild => Operation::Rebuild,
            Self::Scrub => Operation::Scrub,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rebuild => "rebuild",
            Self::Scrub => "scrub",
        }
    }
}

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
fn partition_detail_path(dir: &Path, kind: TaskKind, partition: u32, generation: u32) -> PathBuf {
    dir.join(format!(
        "task-{}.part{partition}.g{generation}.json",
        kind.name()
    ))
}

/// What a partition's work found before some point of it. Its owner saves
/// one (with the point) whenever it finds something new, before it records
/// that progress, so a controller that resumes the partition after its owner
/// died starts from what was found before the resume point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Found {
    errors: u64,
    repaired: u64,
    parity_mismatches: u64,
    unrecoverable: Vec<u64>,
}

impl Found {
    /// `self` followed by what a range found.
    fn plus(&self, found: &ScrubFindings) -> Self {
        Self {
            errors: self.errors + found.checksum_errors,
            repaired: self.repaired + found.repaired,
            parity_mismatches: self.parity_mismatches + found.parity_mismatches,
            unrecoverable: self
                .unrecoverable
                .iter()
                .chain(&found.unrecoverable)
                .copied()
                .collect(),
        }
    }
}

/// The points (bytes into the partition) and what was found before each, as
/// one claim saved them.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FoundSoFar {
    points: Vec<(u64, Found)>,
}

fn found_prefix(kind: TaskKind, partition: u32) -> String {
    format!("task-{}.part{partition}.g", kind.name())
}

/// Claim `generation`'s saved findings of `partition`.
fn found_path(dir: &Path, kind: TaskKind, partition: u32, generation: u32) -> PathBuf {
    dir.join(format!(
        "{}{generation}.found.json",
        found_prefix(kind, partition)
    ))
}

/// What was found in `partition` before byte `resume_from` of it, by the
/// claims before this one: the latest point saved at or before it.
fn found_before(dir: &Path, kind: TaskKind, partition: u32, resume_from: u64) -> Found {
    if resume_from == 0 {
        return Found::default();
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
fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = file.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, file)
}

/// The file whose `flock` says controllers of task `kind` are running.
fn running_path(dir: &Path, kind: TaskKind) -> PathBuf {
    dir.join(format!("task-{}.running", kind.name()))
}

fn open_running_lock(dir: &Path, kind: TaskKind) -> anyhow::Result<std::fs::File> {
    let path = running_path(dir, kind);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))
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
fn remove_partition_details(dir: &Path, kind: TaskKind) {
    let prefix = format!("task-{}.part", kind.name());
    for path in files_named(dir, &prefix, &[".json", ".tmp"]) {
        let _ = std::fs::remove_file(path);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

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
    /// Block rows checked (scrub).
    pub rows_checked: u64,
    /// Blocks failing their checksum (scrub).
    pub checksum_errors: u64,
    /// Rows with inconsistent parity or mirrors (scrub).
    pub parity_mismatches: u64,
    /// Blocks rewritten (scrub repair).
    pub repaired: u64,
    /// Array byte offsets that could not be recovered.
    pub unrecoverable: Vec<u64>,
    /// Which controller completed which partition.
    pub partitions: Vec<PartitionReport>,
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct PartitionDetail {
    parity_mismatches: u64,
    unrecoverable: Vec<u64>,
}

/// Creates the coordination object for `kind` on the array in `dir`, or returns
/// the existing one (a task interrupted earlier is resumed, not restarted).
pub fn prepare(dir: &Path, kind: TaskKind, repair: bool) -> anyhow::Result<TaskFile> {
    let path = task_path(dir, kind);
    let array = Array::open(dir)?;
    let geometry = array.metadata().geometry;
    if path.exists() {
        let task = TaskFile::open(&path)?;
        let spec = task.spec();
        if kind == TaskKind::Scrub {
            if spec.repair != repair {
                bail!(
                    "a scrub with repair={} is already in progress in {}; let it finish",
                    spec.repair,
                    dir.display()
                );
            }
            return Ok(task);
        }
        // A rebuild resumes while its disk is still the image it fills: being
        // rebuilt, or already made active by completion actions that did not
        // get to finish (they run again).
        let member = spec
            .target_disk
            .and_then(|disk| array.metadata().members.get(disk as usize));
        if member.is_some_and(|m| m.file == spec.data_set && m.state != MemberState::Failed) {
            return Ok(task);
        }
        // A rebuild of an image that is no longer that disk (it failed and
        // was replaced since): nothing of it counts.
        tracing::warn!(
            old = %spec.data_set,
            "the rebuild in progress was for an image that is no longer in the array; starting over"
        );
        drop(task);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    let target_disk = match kind {
        TaskKind::Rebuild => Some(array.rebuilding().context(
            "no disk is being rebuilt: fail a disk and `emulator array replace` it first",
        )? as u32),
        TaskKind::Scrub => None,
    };
    // A rebuild names the image it fills; a scrub, the array.
    let data_set: String = match target_disk {
        Some(disk) => array.metadata().members[disk as usize].file.clone(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
    .chars()
    .take(64)
    .collect();
    // Findings files of an earlier task of this kind are not this one's.
    remove_partition_details(dir, kind);
    let partition_bytes = (geometry.disk_bytes / 16)
        .clamp(1 << 20, 256 << 20)
        .next_multiple_of(1 << 20);
    let spec = TaskSpec {
        operation: kind.operation(),
        data_set,
        target_disk,
        data_set_bytes: geometry.disk_bytes,
        partition_bytes,
        initiator: 0,
        repair,
    };
    let _ = std::fs::remove_file(report_path(dir, kind));
    Ok(TaskFile::create(&path, &spec, now_ms())?)
}

/// Paces one controller's work to its share of the task's rate limit, which an
/// operator may change while the task runs (read from the coordination object
/// at every step).
struct Pacer {
    last: Instant,
}

impl Pacer {
    /// Waits until `bytes` more are due at this controller's share of the rate,
    /// calling `renew` at least every `renew_every` while it waits, so that a
    /// slow rate never lets the claim's lease run out. Stops early (false) when
    /// `renew` does.
    fn step(
        &mut self,
        bytes: u64,
        task: &TaskFile,
        renew_every: Duration,
        mut renew: impl FnMut() -> bool,
    ) -> bool {
        let now = Instant::now();
        let Some(rate_kib_s) = task.rate_kib_s() else {
            self.last = now;
            return true;
        };
        let share = rate_kib_s as f64 * 1024.0 / task.controllers() as f64;
        let due = self.last + Duration::from_secs_f64(bytes as f64 / share);
        self.last = due.max(now);
        loop {
            let now = Instant::now();
            if due <= now {
                return true;
            }
            std::thread::sleep((due - now).min(renew_every));
            if !renew() {
                return false;
            }
        }
    }
}

/// How often a paused controller looks at the control word again.
const PAUSE_POLL: Duration = Duration::from_millis(50);

/// One controller's share of a task: claim, work, renew, complete, until no
/// partition is left for it. Controller 0 (the initiator) then waits for the
/// others and runs the completion actions.
pub fn run_controller(dir: &Path, kind: TaskKind, id: u8, lease_ms: u64) -> anyhow::Result<()> {
    // Started by `array rebuild|scrub`, this process inherited the lock (held
    // exclusively by that start); started some other way, it takes it shared.
    let running = open_running_lock(dir, kind)?;
    match running.try_lock_shared() {
        Ok(()) | Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(err)) => {
            return Err(err).context(format!("lock {}", running_path(dir, kind).display()))
        }
    }
    let path = task_path(dir, kind);
    let task = TaskFile::open(&path)?;
    let array = Array::open(dir)?;
    let engine = array.engine();
    let spec = task.spec().clone();
    let mut pacer = Pacer {
        last: Instant::now(),
    };
    loop {
        if task.control() == Control::Cancel {
            tracing::info!(controller = id, "task cancelled");
            return Ok(());
        }
        if let Some(target) = spec.target_disk {
            let view = engine.view()?;
            let file = view.images[target as usize]
                .path()
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
            if file.as_deref() != Some(spec.data_set.as_str()) {
                bail!(
                    "disk {target} is no longer {} (it was failed and replaced while the \
                     rebuild ran): run `emulator array rebuild` again",
                    spec.data_set
                );
            }
        }
        let Some(mut claim) = task.claim_next(id, now_ms(), lease_ms) else {
            if id != spec.initiator || task.all_complete() {
                break;
            }
            // The initiator waits for partitions others hold: they complete, or
            // their leases run out and come back to it. Looking is a read of
            // shared memory, so look often: the task's end is seen at once.
            std::thread::sleep(Duration::from_millis((lease_ms / 10).clamp(1, 10)));
            continue;
        };
        tracing::info!(
            controller = id,
            partition = claim.partition,
            resume_from = claim.resume_from,
            took_over = claim.took_over,
            "claimed"
        );
        let start = claim.start + claim.resume_from;
        let length = claim.length - claim.resume_from;
        let claim_length = claim.length;
        let mut lost = false;
        let mut last = 0;
        let resume_from = claim.resume_from;
        let mut cancelled = false;
        let base = found_before(dir, kind, claim.partition, resume_from);
        let found_file = found_path(dir, kind, claim.partition, claim.generation());
        let mut saved = FoundSoFar::default();
        let progress = |done: u64, so_far: &ScrubFindings| {
            let found = base.plus(so_far);
            if saved
                .points
                .last()
                .map_or(base != found, |(_, last)| *last != found)
            {
                saved.points.push((resume_from + done, found));
                if let Err(err) = serde_json::to_vec(&saved)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| write_atomically(&found_file, &bytes))
                {
                    tracing::warn!(%err, file = %found_file.display(), "cannot save findings so far");
                }
            }
            let mut renew = || {
                task.renew(&mut claim, resume_from + done, now_ms(), lease_ms)
                    .is_ok()
            };
            // Renewed a few times per lease while the rate limit holds us back.
            let renew_every = Duration::from_millis((lease_ms / 4).max(1));
            let paced = pacer.step(done - last, &task, renew_every, &mut renew);
            lost |= !paced;
            last = done;
            if !paced {
                return false;
            }
            loop {
                let ok = renew();
                lost |= !ok;
                match task.control() {
                    _ if !ok => return false,
                    Control::Run => return true,
                    Control::Cancel => {
                        cancelled = true;
                        return false;
                    }
                    // Paused: keep the lease, hold no lock, look again shortly.
                    Control::Pause => std::thread::sleep(PAUSE_POLL),
                }
            }
        };
        let mut findings = Findings::default();
        let mut detail = PartitionDetail::default();
        let outcome = match kind {
            TaskKind::Scrub => {
                scrub_range(engine, start, length, spec.repair, progress).map(|found| {
                    let rows_before = resume_from / disk_images::BLOCK_BYTES as u64;
                    let all = base.plus(&found);
                    findings = Findings {
                        checked: rows_before + found.rows_checked,
                        errors: all.errors,
                        repaired: all.repaired,
                        unrecoverable: all.unrecoverable.len() as u64,
                    };
                    detail = PartitionDetail {
                        parity_mismatches: all.parity_mismatches,
                        unrecoverable: all.unrecoverable,
                    };
                })
            }
            TaskKind::Rebuild => {
                let target = spec.target_disk.context("rebuild task names no disk")? as usize;
                rebuild_range(engine, target, start, length, progress).map(|unrecoverable| {
                    let all: Vec<u64> = base
                        .unrecoverable
                        .iter()
                        .copied()
                        .chain(unrecoverable)
                        .collect();
                    findings.checked = claim_length / disk_images::BLOCK_BYTES as u64;
                    findings.unrecoverable = all.len() as u64;
                    detail.unrecoverable = all;
                })
            }
        };
        match outcome {
            Ok(()) => {}
            Err(WorkError::Stopped) if lost => {
                tracing::warn!(
                    controller = id,
                    partition = claim.partition,
                    "lease lost; another controller has the partition"
                );
                continue;
            }
            Err(WorkError::Stopped) if cancelled => {
                let done = task.partition(claim.partition).progress_bytes;
                let _ = task.release(claim, done);
                tracing::info!(controller = id, "task cancelled; partition released");
                return Ok(());
            }
            Err(err) => return Err(err).context(format!("partition {}", claim.partition)),
        }
        // Make durable what this partition wrote before calling it COMPLETE: the
        // rebuilt disk, or every member a repairing scrub may have rewritten.
        let written: Vec<usize> = match (kind, spec.target_disk) {
            (TaskKind::Rebuild, Some(target)) => vec![target as usize],
            (TaskKind::Scrub, _) if spec.repair => (0..engine.geometry().disks).collect(),
            _ => Vec::new(),
        };
        let view = engine.view()?;
        for index in written {
            view.images[index].flush_range(start, length)?;
        }
        std::fs::write(
            partition_detail_path(dir, kind, claim.partition, claim.generation()),
            serde_json::to_vec(&detail)?,
        )?;
        let partition = claim.partition;
        match task.complete(claim, findings) {
            Ok(()) => tracing::info!(controller = id, partition, "completed"),
            Err(err) => tracing::warn!(controller = id, partition, %err, "could not complete"),
        }
    }
    if id == spec.initiator && task.begin_completion_leased(id, now_ms(), lease_ms) {
        if let Err(err) = complete_task(dir, kind, &task) {
            // Let the next run of the same command try again.
            task.abort_completion();
            return Err(err);
        }
        task.finish_completion();
        drop(task);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        remove_partition_details(dir, kind);
        tracing::info!(
            controller = id,
            task = kind.name(),
            "completion actions done"
        );
    }
    Ok(())
}

/// The initiator's completion actions.
fn complete_task(dir: &Path, kind: TaskKind, task: &TaskFile) -> anyhow::Result<()> {
    let spec = task.spec();
    let partitions = task.partitions();
    let mut report = TaskReport {
        operation: kind,
        repair: spec.repair,
        bytes_per_disk: spec.data_set_bytes,
        rebuilt_disk: spec.target_disk,
        rows_checked: 0,
        checksum_errors: 0,
        parity_mismatches: 0,
        repaired: 0,
        unrecoverable: Vec::new(),
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
    for partition in &partitions {
        debug_assert_eq!(partition.state, PartitionState::Complete);
        report.rows_checked += partition.findings.checked;
        report.checksum_errors += partition.findings.errors;
        report.repaired += partition.findings.repaired;
        let detail: PartitionDetail = std::fs::read(partition_detail_path(
            dir,
            kind,
            partition.index,
            partition.generation,
        ))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
        report.parity_mismatches += detail.parity_mismatches;
        report.unrecoverable.extend(detail.unrecoverable);
    }
    report.unrecoverable.sort_unstable();
    if kind == TaskKind::Rebuild {
        let target = spec.target_disk.context("rebuild task names no disk")?;
        Array::open(dir)?.finish_rebuild_onto(target as usize, &spec.data_set)?;
    }
    let text = serde_json::to_string_pretty(&report)? + "\n";
    std::fs::write(report_path(dir, kind), text)?;
    Ok(())
}

/// A task in progress, for `array status`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskProgress {
    /// The task.
    pub operation: TaskKind,
    /// Run, pause or cancel, as an operator last asked.
    pub control: Control,
    /// Member bytes done, per disk.
    pub bytes_done: u64,
    /// Member bytes in all, per disk.
    pub bytes_total: u64,
    /// Percent done.
    pub percent: f64,
    /// Average speed since the task was created, MiB/s of member bytes per disk.
    pub mib_per_s: f64,
    /// Seconds left at that speed (none while paused or before any progress).
    pub eta_s: Option<f64>,
    /// Total rate limit in MiB/s, if any.
    pub rate_limit_mib_s: Option<f64>,
    /// Partitions READY / IN PROGRESS / COMPLETE.
    pub partitions_ready: u32,
    /// Partitions being worked on, and by which controllers.
    pub in_progress: Vec<(u32, Option<u8>)>,
    /// Partitions done.
    pub partitions_complete: u32,
}

impl TaskProgress {
    /// A task whose coordination file could not be read: nothing known.
    fn unreadable(kind: TaskKind) -> Self {
        Self {
            operation: kind,
            control: Control::Cancel,
            bytes_done: 0,
            bytes_total: 0,
            percent: 0.0,
            mib_per_s: 0.0,
            eta_s: None,
            rate_limit_mib_s: None,
            partitions_ready: 0,
            in_progress: Vec::new(),
            partitions_complete: 0,
        }
    }

    fn of(kind: TaskKind, task: &TaskFile) -> Self {
        let partitions = task.partitions();
        let count = |state| partitions.iter().filter(|p| p.state == state).count() as u32;
        let bytes_done = task.bytes_done();
        let bytes_total = task.spec().data_set_bytes;
        let elapsed_s = now_ms().saturating_sub(task.created_ms()) as f64 / 1000.0;
        let mib_per_s = if elapsed_s > 0.0 {
            bytes_done as f64 / 1048576.0 / elapsed_s
        } else {
            0.0
        };
        let control = task.control();
        Self {
            operation: kind,
            control,
            bytes_done,
            bytes_total,
            percent: 100.0 * bytes_done as f64 / bytes_total.max(1) as f64,
            mib_per_s,
            eta_s: (control == Control::Run && mib_per_s > 0.0)
                .then(|| (bytes_total - bytes_done) as f64 / 1048576.0 / mib_per_s),
            rate_limit_mib_s: task.rate_kib_s().map(|r| r as f64 / 1024.0),
            partitions_ready: count(PartitionState::Ready),
            in_progress: partitions
                .iter()
                .filter(|p| p.state == PartitionState::InProgress)
                .map(|p| (p.index, p.owner))
                .collect(),
            partitions_complete: count(PartitionState::Complete),
        }
    }
}

/// The tasks in progress (or interrupted, waiting to be resumed) in `dir`.
pub fn in_progress(dir: &Path) -> Vec<TaskProgress> {
    [TaskKind::Rebuild, TaskKind::Scrub]
        .into_iter()
        .filter_map(|kind| {
            let task = TaskFile::open(&task_path(dir, kind)).ok()?;
            Some(TaskProgress::of(kind, &task))
        })
        .collect()
}

/// What an operator can do to a task in progress.
#[derive(Debug, Clone, Copy)]
pub enum Adjust {
    /// Hold every partition until resumed.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Stop and forget the task (a rebuilt disk stays `rebuilding`; running
    /// `array rebuild` again starts over).
    Cancel,
    /// Change the total rate limit (MiB/s; `None` removes it).
    Rate(Option<f64>),
}

/// `kind`, or (for `None`) every kind with a task file in `dir`.
fn task_kinds(dir: &Path, kind: Option<TaskKind>) -> Vec<TaskKind> {
    match kind {
        Some(kind) => vec![kind],
        None => [TaskKind::Rebuild, TaskKind::Scrub]
            .into_iter()
            .filter(|k| task_path(dir, *k).exists())
            .collect(),
    }
}

/// The task `kind` in `dir`, or the only one in progress when `kind` is `None`.
fn find_task(dir: &Path, kind: Option<TaskKind>) -> anyhow::Result<(TaskKind, TaskFile)> {
    match task_kinds(dir, kind).as_slice() {
        [] => bail!("no rebuild or scrub is in progress in {}", dir.display()),
        [kind] => {
            let path = task_path(dir, *kind);
            if !path.exists() {
                bail!("no {} is in progress in {}", kind.name(), dir.display());
            }
            Ok((*kind, TaskFile::open(&path)?))
        }
        _ => bail!(
            "both a rebuild and a scrub are in progress in {}: say which with --task",
            dir.display()
        ),
    }
}

/// Pauses, resumes, cancels or re-paces a running task; returns its progress
/// afterwards (for a cancel: just before it was removed).
pub fn adjust(
    dir: &Path,
    kind: Option<TaskKind>,
    adjust: Adjust,
    lease_ms: u64,
) -> anyhow::Result<TaskProgress> {
    // The array must be valid: this is an administrative change to it.
    controllers::array::read_metadata(dir)?;
    let (kind, task) = match (find_task(dir, kind), adjust) {
        (Ok(found), _) => found,
        // A coordination file that cannot be read (cut short by a kill while
        // it was created, or damaged) can still be cancelled: nothing can use
        // it, and it would block every later task of its kind.
        (Err(err), Adjust::Cancel) => {
            // Only the one task named (or the only one there), and only when
            // its file is what cannot be read.
            let kinds = task_kinds(dir, kind);
            let [kind] = kinds.as_slice() else {
                return Err(err);
            };
            let path = task_path(dir, *kind);
            if !path.exists() || TaskFile::open(&path).is_ok() {
                return Err(err);
            }
            tracing::warn!(%err, "the task's coordination file is unreadable; removing it");
            std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
            remove_partition_details(dir, *kind);
            return Ok(TaskProgress::unreadable(*kind));
        }
        (Err(err), _) => return Err(err),
    };
    match adjust {
        Adjust::Pause => task.set_control(Control::Pause),
        Adjust::Resume => {
            if task.control() == Control::Cancel {
                bail!(
                    "the {} is being cancelled; it cannot be resumed",
                    kind.name()
                );
            }
            task.set_control(Control::Run)
        }
        Adjust::Rate(rate) => {
            if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                bail!("--rate must be a positive number of MiB/s");
            }
            task.set_rate_kib_s(rate.map(|r| (r * 1024.0).ceil() as u64))
        }
        Adjust::Cancel => {
            task.set_control(Control::Cancel);
            // Controllers release their partitions at their next step; one that
            // died holds its partition until its lease runs out.
            let deadline =
                Instant::now() + Duration::from_millis(lease_ms) + Duration::from_secs(5);
            while task
                .partitions()
                .iter()
                .any(|p| p.state == PartitionState::InProgress)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let progress = TaskProgress::of(kind, &task);
            drop(task);
            std::fs::remove_file(task_path(dir, kind))
                .with_context(|| format!("remove {}", task_path(dir, kind).display()))?;
            remove_partition_details(dir, kind);
            return Ok(progress);
        }
    }
    Ok(TaskProgress::of(kind, &task))
}

/// How `array rebuild|scrub` runs a task.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Controller processes to split the task across.
    pub controllers: u8,
    /// Total rate limit in MiB/s, shared evenly by the controllers.
    pub rate_mib_s: Option<f64>,
    /// Lease length.
    pub lease_ms: u64,
    /// Wait for the task to finish, showing progress.
    pub wait: bool,
}

/// Starts (or resumes) a task with one `emulator controller` process per
/// controller; with `wait`, shows progress until it finishes and returns its
/// report.
pub fn start(
    dir: &Path,
    kind: TaskKind,
    repair: bool,
    options: &StartOptions,
) -> anyhow::Result<Option<TaskReport>> {
    if options.controllers == 0 || options.controllers > MAX_CONTROLLERS {
        bail!("--controllers must be between 1 and {MAX_CONTROLLERS}");
    }
    if options
        .rate_mib_s
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        bail!("--rate must be a positive number of MiB/s");
    }
    // Held exclusively while the controllers are started, then by each of
    // them (shared) for as long as it runs: a second start while they run
    // must not start more, reset the rate or a pause, or cut their logs. The
    // file is only made once the task is valid (bad input changes nothing).
    let busy = |options: &StartOptions| -> anyhow::Result<()> {
        if options.wait {
            tracing::info!("the {} is already running; waiting for it", kind.name());
            return Ok(());
        }
        bail!(
            "a {} is already running in {}: `emulator array status` shows it, `--wait` waits for it",
            kind.name(),
            dir.display()
        )
    };
    // Starts at the same time take turns until one holds the running lock
    // (an exclusive `flock` of the array directory itself: no file to make),
    // so that the others see the task whole and running.
    let turn = std::fs::File::open(dir).with_context(|| format!("open {}", dir.display()))?;
    turn.lock()
        .with_context(|| format!("lock {}", dir.display()))?;
    let existing = match running_path(dir, kind).exists() {
        true => Some(open_running_lock(dir, kind)?),
        false => None,
    };
    let held = existing.filter(|running| {
        let held = running.try_lock().is_err();
        let _ = running.unlock();
        held
    });
    let (task, running, attached) = if let Some(running) = held {
        busy(options)?;
        (TaskFile::open(&task_path(dir, kind))?, running, true)
    } else {
        let task = prepare(dir, kind, repair)?;
        let running = open_running_lock(dir, kind)?;
        match running.try_lock() {
            Ok(()) => (task, running, false),
            Err(std::fs::TryLockError::WouldBlock) => {
                busy(options)?;
                (task, running, true)
            }
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(err).context(format!("lock {}", running_path(dir, kind).display()))
            }
        }
    };
    drop(turn);
    let total = task.spec().data_set_bytes;
    let exe = std::env::current_exe().context("cannot find the emulator binary")?;
    let mut children = Vec::new();
    if !attached {
        task.set_controllers(u64::from(options.controllers));
        task.set_rate_kib_s(options.rate_mib_s.map(|r| (r * 1024.0).ceil() as u64));
        task.set_control(Control::Run);
        // The controllers inherit the locked file description, so the lock is
        // held without a gap from here until the last of them exits.
        use std::os::fd::AsRawFd;
        nix::fcntl::fcntl(
            running.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .context("pass the task lock to the controllers")?;
    }
    for id in (0..options.controllers).filter(|_| !attached) {
        let log = dir.join(format!("controller-{id}.log"));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut command = std::process::Command::new(&exe);
        command
            .arg("controller")
            .arg(dir)
            .args([
                "--task",
                kind.name(),
                "--id",
                &id.to_string(),
                "--lease-ms",
                &options.lease_ms.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file);
        children.push(command.spawn().context("start a controller process")?);
    }
    // Closing this copy leaves the lock with the controllers (never unlock:
    // that would release it for them too).
    let running = attached.then_some(running);
    if !options.wait {
        println!(
            "{} started on {} controller(s) (pids {}); `emulator array status {}` shows progress",
            kind.name(),
            options.controllers,
            children
                .iter()
                .map(|c| c.id().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        );
        return Ok(None);
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(kind.name());
    let plain = bar.is_hidden();
    let path = task_path(dir, kind);
    let started = Instant::now();
    let mut last_line = Instant::now();
    loop {
        let done = task.bytes_done();
        let control = task.control();
        bar.set_position(done);
        bar.set_message(match control {
            Control::Run => kind.name().to_string(),
            Control::Pause => format!("{} (paused)", kind.name()),
            Control::Cancel => format!("{} (cancelling)", kind.name()),
        });
        if plain && last_line.elapsed() >= Duration::from_secs(2) {
            // Progress goes to stderr: stdout carries the report (maybe JSON).
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "{}{}: {:.1}% ({} of {} bytes per disk, {:.1} MiB/s)",
                kind.name(),
                if control == Control::Pause {
                    " (paused)"
                } else {
                    ""
                },
                100.0 * done as f64 / total as f64,
                done,
                total,
                done as f64 / seconds / 1048576.0
            );
            last_line = Instant::now();
        }
        let mut alive = 0;
        for child in &mut children {
            if child.try_wait()?.is_none() {
                alive += 1;
            }
        }
        if let Some(running) = &running {
            // Not ours: running while someone holds the lock.
            alive = usize::from(running.try_lock().is_err());
            let _ = running.unlock();
        }
        if alive == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bar.finish_and_clear();
    for (id, child) in children.iter_mut().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            tracing::warn!(controller = id, %status, "controller process failed; see controller-{id}.log");
        }
    }
    if task.control() == Control::Cancel {
        bail!(
            "the {} was cancelled{}",
            kind.name(),
            if kind == TaskKind::Rebuild {
                "; the disk stays `rebuilding` (written, not read) until a new `array rebuild` finishes"
            } else {
                ""
            }
        );
    }
    drop(task);
    if path.exists() {
        bail!(
            "the controllers stopped before the {} finished (see {}/controller-*.log); run the same command again to resume it",
            kind.name(),
            dir.display()
        );
    }
    let report: TaskReport = serde_json::from_slice(&std::fs::read(report_path(dir, kind))?)?;
    Ok(Some(report))
}
