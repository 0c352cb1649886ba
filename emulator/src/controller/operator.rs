//! What an operator does with a task: start it (or resume it) with controller
//! processes, follow it to its end, see it in progress, pause, resume, cancel
//! or re-pace it.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use controllers::array::Array;
use controllers::coordination::{Control, PartitionState, TaskFile, TaskSpec};
use controllers::raid::MemberState;
use serde::Serialize;

use super::completion::TaskReport;
use super::files::{
    now_ms, open_running_lock, remove_partition_findings, remove_task, report_path, running_path,
    task_path,
};
use super::{ControllerError, TaskKind, MAX_CONTROLLERS};

/// Creates the coordination object for `kind` on the array in `dir`, or returns
/// the existing one (a task interrupted earlier is resumed, not restarted).
pub fn prepare(dir: &Path, kind: TaskKind, repair: bool) -> Result<TaskFile, ControllerError> {
    prepare_initiated(dir, kind, repair, 0)
}

/// [`prepare`], naming controller `initiator` as the one that runs the
/// completion actions.
fn prepare_initiated(
    dir: &Path,
    kind: TaskKind,
    repair: bool,
    initiator: u8,
) -> Result<TaskFile, ControllerError> {
    let path = task_path(dir, kind);
    let array = Array::open(dir)?;
    let geometry = array.metadata().geometry;
    if path.exists() {
        let task = TaskFile::open(&path)?;
        let spec = task.spec();
        if kind == TaskKind::Scrub {
            if spec.repair != repair {
                return Err(ControllerError::Refused(format!(
                    "a scrub with repair={} is already in progress in {}; let it finish",
                    spec.repair,
                    dir.display()
                )));
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
        std::fs::remove_file(&path).map_err(ControllerError::io(&path, "remove"))?;
    }
    let target_disk = match kind {
        TaskKind::Rebuild => Some(array.rebuilding().ok_or_else(|| {
            ControllerError::Refused(
                "no disk is being rebuilt: fail a disk and `emulator array replace` it first"
                    .into(),
            )
        })? as u32),
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
    remove_partition_findings(dir, kind);
    let partition_bytes = (geometry.disk_bytes / 16)
        .clamp(1 << 20, 256 << 20)
        .next_multiple_of(1 << 20);
    let spec = TaskSpec {
        operation: kind.operation(),
        data_set,
        target_disk,
        data_set_bytes: geometry.disk_bytes,
        partition_bytes,
        initiator,
        repair,
    };
    let _ = std::fs::remove_file(report_path(dir, kind));
    Ok(TaskFile::create(&path, &spec, now_ms())?)
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
fn find_task(dir: &Path, kind: Option<TaskKind>) -> Result<(TaskKind, TaskFile), ControllerError> {
    match task_kinds(dir, kind).as_slice() {
        [] => Err(ControllerError::Refused(format!(
            "no rebuild or scrub is in progress in {}",
            dir.display()
        ))),
        [kind] => {
            let path = task_path(dir, *kind);
            if !path.exists() {
                return Err(ControllerError::Refused(format!(
                    "no {} is in progress in {}",
                    kind.name(),
                    dir.display()
                )));
            }
            Ok((*kind, TaskFile::open(&path)?))
        }
        _ => Err(ControllerError::Refused(format!(
            "both a rebuild and a scrub are in progress in {}: say which with --task",
            dir.display()
        ))),
    }
}

fn check_rate(rate_mib_s: Option<f64>) -> Result<(), ControllerError> {
    match rate_mib_s {
        Some(rate) if !(rate > 0.0 && rate.is_finite()) => Err(ControllerError::Refused(
            "--rate must be a positive number of MiB/s".into(),
        )),
        _ => Ok(()),
    }
}

/// Pauses, resumes, cancels or re-paces a running task; returns its progress
/// afterwards (for a cancel: just before it was removed).
pub fn adjust(
    dir: &Path,
    kind: Option<TaskKind>,
    adjust: Adjust,
    lease_ms: u64,
) -> Result<TaskProgress, ControllerError> {
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
            remove_task(dir, *kind)?;
            return Ok(TaskProgress::unreadable(*kind));
        }
        (Err(err), _) => return Err(err),
    };
    match adjust {
        Adjust::Pause => task.set_control(Control::Pause),
        Adjust::Resume => {
            if task.control() == Control::Cancel {
                return Err(ControllerError::Refused(format!(
                    "the {} is being cancelled; it cannot be resumed",
                    kind.name()
                )));
            }
            task.set_control(Control::Run)
        }
        Adjust::Rate(rate) => {
            check_rate(rate)?;
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
            remove_task(dir, kind)?;
            return Ok(progress);
        }
    }
    Ok(TaskProgress::of(kind, &task))
}

/// Starts (or finds under way) a task whose controllers are already running
/// and watch the array for coordination objects: a server system's drivers.
/// Controller `initiator` (the driver that received the task) runs the
/// completion actions. No process is started; the coordination object is
/// returned, to follow.
pub fn begin(
    dir: &Path,
    kind: TaskKind,
    repair: bool,
    rate_mib_s: Option<f64>,
    controllers: u8,
    initiator: u8,
) -> Result<TaskFile, ControllerError> {
    check_rate(rate_mib_s)?;
    // Begins at the same time take turns (as `start`), so one task is made.
    let turn = std::fs::File::open(dir).map_err(ControllerError::io(dir, "open"))?;
    turn.lock().map_err(ControllerError::io(dir, "lock"))?;
    let fresh = !task_path(dir, kind).exists();
    let task = prepare_initiated(dir, kind, repair, initiator)?;
    if fresh {
        task.set_controllers(u64::from(controllers));
        task.set_rate_kib_s(rate_mib_s.map(|r| (r * 1024.0).ceil() as u64));
        task.set_control(Control::Run);
    }
    Ok(task)
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
    /// The caller will follow the task ([`Started::wait`]): a task of this kind
    /// already running is followed instead of refused.
    pub wait: bool,
}

/// A task started (or found running) by [`start`].
#[derive(Debug)]
pub struct Started {
    dir: PathBuf,
    kind: TaskKind,
    task: TaskFile,
    /// The controller processes this start made (none when it found the task
    /// running).
    children: Vec<Child>,
    /// When the task was found running: the lock its controllers hold.
    running: Option<std::fs::File>,
}

/// Starts (or resumes) a task with one `emulator controller` process per
/// controller, each logging to `DIR/controller-N.log`; with `options.wait`, a
/// task of this kind already running is returned to be followed.
pub fn start(
    dir: &Path,
    kind: TaskKind,
    repair: bool,
    options: &StartOptions,
) -> Result<Started, ControllerError> {
    if options.controllers == 0 || options.controllers > MAX_CONTROLLERS {
        return Err(ControllerError::Refused(format!(
            "--controllers must be between 1 and {MAX_CONTROLLERS}"
        )));
    }
    check_rate(options.rate_mib_s)?;
    // Held exclusively while the controllers are started, then by each of
    // them (shared) for as long as it runs: a second start while they run
    // must not start more, reset the rate or a pause, or cut their logs. The
    // file is only made once the task is valid (bad input changes nothing).
    let busy = |options: &StartOptions| -> Result<(), ControllerError> {
        if options.wait {
            tracing::info!("the {} is already running; waiting for it", kind.name());
            return Ok(());
        }
        Err(ControllerError::Refused(format!(
            "a {} is already running in {}: `emulator array status` shows it, `--wait` waits for it",
            kind.name(),
            dir.display()
        )))
    };
    // Starts at the same time take turns until one holds the running lock
    // (an exclusive `flock` of the array directory itself: no file to make),
    // so that the others see the task whole and running.
    let turn = std::fs::File::open(dir).map_err(ControllerError::io(dir, "open"))?;
    turn.lock().map_err(ControllerError::io(dir, "lock"))?;
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
                return Err(ControllerError::io(running_path(dir, kind), "lock")(err))
            }
        }
    };
    drop(turn);
    let mut children = Vec::new();
    if !attached {
        let exe = std::env::current_exe().map_err(ControllerError::io(
            "/proc/self/exe",
            "find the emulator binary",
        ))?;
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
        .map_err(|errno| {
            ControllerError::io(running_path(dir, kind), "pass the task lock on")(errno.into())
        })?;
        for id in 0..options.controllers {
            let log = dir.join(format!("controller-{id}.log"));
            let log_file =
                std::fs::File::create(&log).map_err(ControllerError::io(&log, "create"))?;
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
            children.push(
                command
                    .spawn()
                    .map_err(ControllerError::io(&exe, "start a controller process"))?,
            );
        }
    }
    Ok(Started {
        dir: dir.to_path_buf(),
        kind,
        task,
        children,
        // Closing this copy leaves the lock with the controllers (never unlock:
        // that would release it for them too).
        running: attached.then_some(running),
    })
}

impl Started {
    /// The controller processes this start made (none if it found the task
    /// running).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Member bytes per disk the task covers.
    pub fn total_bytes(&self) -> u64 {
        self.task.spec().data_set_bytes
    }

    /// Follows the task until its controllers have all exited, calling
    /// `observe` with the bytes done and the operator's control every 20 ms,
    /// and returns the report it left. An error if it was cancelled or its
    /// controllers stopped before it finished (running the start again
    /// resumes it).
    pub fn wait(
        mut self,
        mut observe: impl FnMut(u64, Control),
    ) -> Result<TaskReport, ControllerError> {
        let (dir, kind) = (self.dir.clone(), self.kind);
        loop {
            observe(self.task.bytes_done(), self.task.control());
            let mut alive = 0;
            for child in &mut self.children {
                let exited = child
                    .try_wait()
                    .map_err(ControllerError::io(&dir, "wait for a controller"))?;
                alive += usize::from(exited.is_none());
            }
            if let Some(running) = &self.running {
                // Not ours: running while someone holds the lock.
                alive = usize::from(running.try_lock().is_err());
                let _ = running.unlock();
            }
            if alive == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (id, child) in self.children.iter_mut().enumerate() {
            let status = child
                .wait()
                .map_err(ControllerError::io(&dir, "wait for a controller"))?;
            if !status.success() {
                tracing::warn!(controller = id, %status, "controller process failed; see controller-{id}.log");
            }
        }
        if self.task.control() == Control::Cancel {
            return Err(ControllerError::Refused(format!(
                "the {} was cancelled{}",
                kind.name(),
                if kind == TaskKind::Rebuild {
                    "; the disk stays `rebuilding` (written, not read) until a new `array rebuild` finishes"
                } else {
                    ""
                }
            )));
        }
        drop(self.task);
        if task_path(&dir, kind).exists() {
            return Err(ControllerError::Refused(format!(
                "the controllers stopped before the {} finished (see {}/controller-*.log); run the same command again to resume it",
                kind.name(),
                dir.display()
            )));
        }
        let path = report_path(&dir, kind);
        let bytes = std::fs::read(&path).map_err(ControllerError::io(&path, "read"))?;
        serde_json::from_slice(&bytes).map_err(|source| ControllerError::Json { path, source })
    }
}
