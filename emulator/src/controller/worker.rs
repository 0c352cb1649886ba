//! One controller's share of a task: claim a partition, work through it in
//! 1 MiB steps (renewing the claim's lease, saving what it found, obeying the
//! operator's pause, cancel and rate limit), make what it wrote durable, mark it
//! COMPLETE, and go on until every partition is (taking over those of a
//! controller that died). The initiator then runs the completion actions
//! ([`super::completion`]); if it died, another controller does.

use std::path::Path;
use std::time::{Duration, Instant};

use controllers::array::Array;
use controllers::coordination::{Control, TaskFile};
use controllers::findings::Findings;
use controllers::raid::RaidEngine;
use controllers::work::{rebuild_range, scrub_range, WorkError};

use super::completion::complete_task;
use super::files::{
    found_before, found_path, now_ms, open_running_lock, partition_findings_path, remove_task,
    running_path, task_path, write_atomically, FoundSoFar,
};
use super::{ControllerError, TaskKind};

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
/// How much a partition writes between the syncs that let its resume point
/// move (see `durable` in [`run_partitions`]).
const DURABLE_STEP: u64 = 16 << 20;

/// Makes `[offset, offset+len)` of the members in `written` durable.
fn sync_written(
    engine: &RaidEngine,
    written: &[usize],
    offset: u64,
    len: u64,
) -> Result<(), ControllerError> {
    let view = engine.view()?;
    for &index in written {
        view.images[index].flush_range(offset, len)?;
    }
    Ok(())
}

/// One controller's share of a task: claim, work, renew, complete, until every
/// partition is COMPLETE (taking over those of a controller that died). The
/// initiator then runs the completion actions, or, if it does not within a
/// lease, another controller.
pub fn run_controller(
    dir: &Path,
    kind: TaskKind,
    id: u8,
    lease_ms: u64,
) -> Result<(), ControllerError> {
    let array = Array::open(dir)?;
    run_partitions(dir, kind, id, lease_ms, array.engine(), None)
}

/// How the controllers of a task tell its initiator that every partition is
/// COMPLETE (seed 004, claim 10), when they have a way to: the drivers of a
/// server system do (see `crate::driver`); controller processes started by
/// `array rebuild|scrub` do not, and their initiator looks at the
/// coordination object instead.
pub trait CompletionNotice: Send + Sync {
    /// Tells controller `initiator` that every partition of its `kind` task is
    /// COMPLETE.
    fn notify(&self, initiator: u8, kind: TaskKind);
    /// Waits up to `timeout` for such a notice about a `kind` task.
    fn wait(&self, kind: TaskKind, timeout: Duration);
}

/// [`run_controller`] through an engine the caller already has open (a
/// driver's, whose process is one of the two controllers).
pub fn run_partitions(
    dir: &Path,
    kind: TaskKind,
    id: u8,
    lease_ms: u64,
    engine: &RaidEngine,
    notice: Option<&dyn CompletionNotice>,
) -> Result<(), ControllerError> {
    // Started by `array rebuild|scrub`, this process inherited the lock (held
    // exclusively by that start); started some other way, it takes it shared.
    let running = open_running_lock(dir, kind)?;
    match running.try_lock_shared() {
        Ok(()) | Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(err)) => {
            return Err(ControllerError::io(running_path(dir, kind), "lock")(err))
        }
    }
    let path = task_path(dir, kind);
    let task = TaskFile::open(&path)?;
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
                return Err(ControllerError::Refused(format!(
                    "disk {target} is no longer {} (it was failed and replaced while the \
                     rebuild ran): run `emulator array rebuild` again",
                    spec.data_set
                )));
            }
        }
        let Some(mut claim) = task.claim_next(id, now_ms(), lease_ms) else {
            if task.all_complete() {
                break;
            }
            // Every controller waits for the partitions others hold: they
            // complete, or their owner died and their leases run out and come
            // back to whoever is left. An initiator with a notice channel is
            // told when the last one completes (claim 10), and looks again a
            // few times per lease for expired ones; otherwise looking is a read
            // of shared memory, so look often: the task's end is seen at once.
            match notice {
                Some(notice) if id == spec.initiator => {
                    notice.wait(kind, Duration::from_millis((lease_ms / 4).max(1)));
                }
                _ => std::thread::sleep(Duration::from_millis((lease_ms / 10).clamp(1, 10))),
            }
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
        // What this partition writes: the rebuilt disk, or every member a
        // repairing scrub may rewrite.
        let written: Vec<usize> = match (kind, spec.target_disk) {
            (TaskKind::Rebuild, Some(target)) => vec![target as usize],
            (TaskKind::Scrub, _) if spec.repair => (0..engine.geometry().disks).collect(),
            _ => Vec::new(),
        };
        // The resume point recorded in the coordination object moves only
        // over what is durable: the coordination file's pages and the
        // disks' reach the device independently, and after a power loss a
        // resume point past rebuilt bytes the cut lost would leave them
        // never rebuilt (a power-loss scenario during a rebuild found it:
        // zeros in place of durable data). So the written range is synced
        // every [`DURABLE_STEP`], and only then recorded.
        let mut durable = 0u64;
        let progress = |done: u64, so_far: &Findings| {
            if done == 0 || written.is_empty() {
                durable = done;
            } else if done - durable >= DURABLE_STEP {
                match sync_written(engine, &written, start + durable, done - durable) {
                    Ok(()) => durable = done,
                    Err(err) => {
                        tracing::warn!(%err, "cannot sync what the partition wrote: its resume point stays")
                    }
                }
            }
            // Rows are counted from positions, not saved: a point is saved
            // only when something is found.
            let found = Findings {
                rows_checked: 0,
                ..base.plus(so_far)
            };
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
                task.renew(&mut claim, resume_from + durable, now_ms(), lease_ms)
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
        let outcome = match (kind, spec.target_disk) {
            (TaskKind::Scrub, _) => {
                scrub_range(engine, start, length, spec.repair, progress).map(|found| Findings {
                    // Rows before the resume point were checked by earlier claims.
                    rows_checked: resume_from / disk_images::BLOCK_BYTES as u64
                        + found.rows_checked,
                    ..base.plus(&found)
                })
            }
            (TaskKind::Rebuild, Some(target)) => {
                rebuild_range(engine, target as usize, start, length, progress).map(|found| {
                    Findings {
                        rows_checked: claim_length / disk_images::BLOCK_BYTES as u64,
                        ..base.plus(&found)
                    }
                })
            }
            (TaskKind::Rebuild, None) => {
                return Err(ControllerError::Refused(
                    "the rebuild's coordination file names no disk".into(),
                ))
            }
        };
        let found = match outcome {
            Ok(found) => found,
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
            Err(source) => {
                return Err(ControllerError::Work {
                    partition: claim.partition,
                    source,
                })
            }
        };
        // Make durable what this partition wrote before calling it COMPLETE.
        sync_written(engine, &written, start, length)?;
        let findings_file = partition_findings_path(dir, kind, claim.partition, claim.generation());
        let bytes = serde_json::to_vec(&found).map_err(|source| ControllerError::Json {
            path: findings_file.clone(),
            source,
        })?;
        std::fs::write(&findings_file, bytes)
            .map_err(ControllerError::io(findings_file, "write"))?;
        let partition = claim.partition;
        match task.complete(claim, found.counts()) {
            Ok(()) => tracing::info!(controller = id, partition, "completed"),
            Err(err) => tracing::warn!(controller = id, partition, %err, "could not complete"),
        }
        if task.all_complete() && id != spec.initiator {
            // The last partition: the initiator is told (seed 004, claim 10).
            if let Some(notice) = notice {
                notice.notify(spec.initiator, kind);
            }
        }
    }
    // The initiator runs the completion actions (seed 004). Another controller
    // does when the initiator has not within a lease: it died (before every
    // partition was complete, or during its completion, whose lease then
    // runs out). A task is never left stuck because one controller died.
    let all_complete_at = Instant::now();
    let patience = Duration::from_millis(lease_ms);
    while !task.completion_done() {
        let my_turn = id == spec.initiator || all_complete_at.elapsed() >= patience;
        if my_turn && task.begin_completion_leased(id, now_ms(), lease_ms) {
            if id != spec.initiator {
                tracing::warn!(
                    controller = id,
                    initiator = spec.initiator,
                    "the initiator did not complete the task; completing it here"
                );
            }
            if let Err(err) = complete_task(dir, kind, &task) {
                // Let another controller, or the next run of the command, try again.
                task.abort_completion();
                return Err(err);
            }
            task.finish_completion();
            drop(task);
            remove_task(dir, kind)?;
            tracing::info!(
                controller = id,
                task = kind.name(),
                "completion actions done"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis((lease_ms / 10).clamp(1, 10)));
    }
    Ok(())
}
