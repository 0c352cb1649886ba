//! How a driver executes a task (FIG. 4, blocks 406–412): it reads the task
//! from persistent data (where the agent recorded it, with its own identity),
//! carries it out on the array, records how it ended (with failure information
//! when it failed), and notifies the agent that persistent data names as its
//! issuer. A rebuild or scrub runs as the task coordination object's work,
//! split across [`CONTROLLERS`] controller processes, and records its progress
//! as it goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Driver;
use crate::controller::{self, Adjust, StartOptions, TaskKind, DEFAULT_LEASE_MS};
use crate::domain::ProcessName;
use crate::link::ToAgentFromDriver;
use crate::persist::{Progress, TaskRecord, TaskState};
use crate::task::{Task, CONTROLLERS};

/// How often a long task's progress is recorded and announced.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Executes task `id`, recorded in persistent data by the agent that sent it.
pub(super) async fn execute(driver: Arc<Driver>, id: String) {
    let Some(record) = read_task(&driver, &id).await else {
        tracing::warn!(task = %id, "asked to execute a task persistent data does not hold");
        return;
    };
    if record.state.is_final() {
        // Asked again (the agent reconnected): tell it how it ended.
        notify_issuer(&driver, &id).await;
        return;
    }
    tracing::info!(task = %id, kind = %record.kind, agent = ?record.agent, "executing");
    let outcome = match Task::parse(&record.kind, &record.args) {
        Ok(task) => {
            store(&driver, &id, TaskState::Running, None, None, None).await;
            run(&driver, &id, task).await
        }
        Err(problem) => Err(problem),
    };
    match &outcome {
        Ok(result) => store(&driver, &id, TaskState::Complete, None, None, Some(result)).await,
        Err(failure) => {
            tracing::warn!(task = %id, %failure, "task failed");
            store(&driver, &id, TaskState::Failed, None, Some(failure), None).await
        }
    }
    // The task's effect, as everyone else sees it (FIG. 3), then its end to
    // the agent that issued it (FIG. 4).
    driver.refresh().await;
    notify_issuer(&driver, &id).await;
}

async fn read_task(driver: &Arc<Driver>, id: &str) -> Option<TaskRecord> {
    let (driver, id) = (Arc::clone(driver), id.to_string());
    tokio::task::spawn_blocking(move || {
        driver
            .persist
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .task(&id)
    })
    .await
    .ok()?
    .map_err(|err| tracing::warn!(%err, "cannot read a task"))
    .ok()?
}

async fn store(
    driver: &Arc<Driver>,
    id: &str,
    state: TaskState,
    progress: Option<Progress>,
    failure: Option<&str>,
    result: Option<&Value>,
) {
    let (driver, id) = (Arc::clone(driver), id.to_string());
    let (failure, result) = (failure.map(str::to_string), result.cloned());
    let stored = tokio::task::spawn_blocking(move || {
        driver
            .persist
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .update_task(
                &id,
                state,
                progress.as_ref(),
                failure.as_deref(),
                result.as_ref(),
            )
    })
    .await;
    if let Ok(Err(err)) = stored {
        tracing::warn!(%err, "cannot record a task's state");
    }
}

/// FIG. 4, block 412: the invoking agent, as persistent data names it, is
/// told that the task moved on.
async fn notify_issuer(driver: &Arc<Driver>, id: &str) {
    let issuer = read_task(driver, id)
        .await
        .and_then(|record| record.agent)
        .and_then(|agent| ProcessName::parse(&agent).ok());
    match issuer {
        Some(agent) => {
            if !driver
                .notify(&agent, ToAgentFromDriver::TaskChanged { id: id.into() })
                .await
            {
                tracing::info!(task = %id, %agent, "the issuing agent is not connected; persistent data keeps the task's end");
            }
        }
        None => tracing::warn!(task = %id, "no issuing agent recorded"),
    }
}

/// Carries out `task`; its result, or its failure information.
async fn run(driver: &Arc<Driver>, id: &str, task: Task) -> Result<Value, String> {
    if task == Task::Report {
        return match Arc::clone(driver).collect_and_store().await {
            Ok(_) => Ok(
                json!({ "revision": driver.revision.load(std::sync::atomic::Ordering::Acquire) }),
            ),
            Err(err) => Err(err.to_string()),
        };
    }
    if task.is_long() {
        return run_long(driver, id, task).await;
    }
    let driver = Arc::clone(driver);
    tokio::task::spawn_blocking(move || run_short(&driver, task))
        .await
        .map_err(|err| format!("the task panicked: {err}"))?
}

fn run_short(driver: &Driver, task: Task) -> Result<Value, String> {
    let mut array = driver
        .array
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let adjust = |which, adjust| {
        controller::adjust(&driver.disks, which, adjust, DEFAULT_LEASE_MS)
            .map(|progress| json!({ "operation": progress.operation, "percent": progress.percent }))
            .map_err(|err| err.to_string())
    };
    match task {
        Task::FailDisk { disk } => array
            .fail(disk)
            .map(|()| json!({ "disk": disk }))
            .map_err(|err| err.to_string()),
        Task::ReplaceDisk { disk } => array
            .replace(disk)
            .map(|file| json!({ "disk": disk, "file": file }))
            .map_err(|err| err.to_string()),
        Task::VolumeCreate { name, size } => array
            .create_volume(&name, size)
            .map(|volume| json!({ "name": volume.name, "size": volume.size, "offset": volume.offset }))
            .map_err(|err| err.to_string()),
        Task::VolumeDelete { name } => array
            .delete_volume(&name)
            .map(|()| json!({ "name": name }))
            .map_err(|err| err.to_string()),
        Task::Pause { task } => adjust(task, Adjust::Pause),
        Task::Resume { task } => adjust(task, Adjust::Resume),
        Task::Cancel { task } => adjust(task, Adjust::Cancel),
        Task::SetRate { task, rate_mib_s } => adjust(task, Adjust::Rate(rate_mib_s)),
        Task::Report | Task::Rebuild { .. } | Task::Scrub { .. } => {
            unreachable!("report and long tasks run elsewhere")
        }
    }
}

/// A rebuild or scrub: started on the task coordination object, followed to
/// its end with its progress recorded every [`PROGRESS_INTERVAL`].
async fn run_long(driver: &Arc<Driver>, id: &str, task: Task) -> Result<Value, String> {
    let (kind, repair, rate_mib_s) = match task {
        Task::Rebuild { rate_mib_s } => (TaskKind::Rebuild, false, rate_mib_s),
        Task::Scrub { repair, rate_mib_s } => (TaskKind::Scrub, repair, rate_mib_s),
        _ => unreachable!("only rebuild and scrub are long"),
    };
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<Progress>(4);
    let follower = {
        let driver = Arc::clone(driver);
        tokio::task::spawn_blocking(move || -> Result<Value, String> {
            // One of this kind already running (started through the other
            // pair, or by a task whose agent died) is followed, not refused:
            // the task submitted again completes with it (claim 6).
            let options = StartOptions {
                controllers: CONTROLLERS,
                rate_mib_s,
                lease_ms: DEFAULT_LEASE_MS,
                wait: true,
            };
            let started = controller::start(&driver.disks, kind, repair, &options)
                .map_err(|err| err.to_string())?;
            let total = started.total_bytes().max(1);
            let begun = Instant::now();
            let mut last = Instant::now();
            let report = started
                .wait(|done, _control| {
                    if last.elapsed() < PROGRESS_INTERVAL {
                        return;
                    }
                    last = Instant::now();
                    let seconds = begun.elapsed().as_secs_f64().max(1e-3);
                    let mib_per_s = done as f64 / 1048576.0 / seconds;
                    let left = total.saturating_sub(done) as f64 / 1048576.0;
                    let _ = progress_tx.try_send(Progress {
                        percent: (100.0 * done as f64 / total as f64).clamp(0.0, 100.0),
                        mib_per_s,
                        eta_s: (mib_per_s > 0.0).then(|| (left / mib_per_s).max(0.0)),
                    });
                })
                .map_err(|err| err.to_string())?;
            serde_json::to_value(&report).map_err(|err| err.to_string())
        })
    };
    tokio::pin!(follower);
    loop {
        tokio::select! {
            outcome = &mut follower => {
                return outcome.map_err(|err| format!("the task panicked: {err}"))?;
            }
            Some(progress) = progress_rx.recv() => {
                store(driver, id, TaskState::Running, Some(progress), None, None).await;
                notify_issuer(driver, id).await;
            }
        }
    }
}
