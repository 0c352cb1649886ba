//! How a driver executes a task (FIG. 4, blocks 406–412): it reads the task
//! from persistent data (where the agent recorded it, with its own identity),
//! carries it out on the array, records how it ended (with failure information
//! when it failed), and notifies the agent that persistent data names as its
//! issuer. A rebuild or scrub is begun on the task coordination object, which
//! both drivers of the system work on (see `super::controller`), and records
//! its progress as it goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Driver;
use controllers::coordination::{Control, TaskFile};

use crate::controller::{self, Adjust, TaskKind, DEFAULT_LEASE_MS};
use crate::domain::ProcessName;
use crate::link::ToAgentFromDriver;
use crate::persist::{Progress, TaskRecord, TaskState};
use crate::task::{Task, CONTROLLERS};

/// How often a long task's progress is recorded and announced.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// How often a long task's coordination object is looked at.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(50);
/// Tasks that ended this recently are told again to an agent that connects.
const CATCH_UP_MS: u64 = 10 * 60 * 1000;

/// Executes task `id`, recorded in persistent data by the agent that sent it,
/// unless this driver is executing it already.
pub(super) async fn execute(driver: Arc<Driver>, id: String) {
    let first = driver
        .executing
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(id.clone());
    if !first {
        tracing::debug!(task = %id, "already executing");
        return;
    }
    execute_once(&driver, &id).await;
    driver
        .executing
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(&id);
}

async fn execute_once(driver: &Arc<Driver>, id: &str) {
    let (driver, id) = (Arc::clone(driver), id.to_string());
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
            .create_volume(&name, size, driver.cluster.cluster as u8)
            .map(|volume| json!({ "name": volume.name, "size": volume.size, "offset": volume.offset, "owner": driver.cluster.to_string() }))
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

/// A rebuild or scrub: begun on the task coordination object, with this
/// driver as its initiator, worked on by both drivers of the system (see
/// `super::controller`), and followed to its end with its progress recorded
/// every [`PROGRESS_INTERVAL`]. One of this kind already under way (begun
/// through the other pair, or by a task whose agent died) is followed rather
/// than begun again: the task submitted again completes with it (claim 6).
async fn run_long(driver: &Arc<Driver>, id: &str, task: Task) -> Result<Value, String> {
    let (kind, repair, rate_mib_s) = match task {
        Task::Rebuild { rate_mib_s } => (TaskKind::Rebuild, false, rate_mib_s),
        Task::Scrub { repair, rate_mib_s } => (TaskKind::Scrub, repair, rate_mib_s),
        _ => unreachable!("only rebuild and scrub are long"),
    };
    let begun = {
        let (disks, initiator) = (driver.disks.clone(), driver.cluster.cluster as u8);
        tokio::task::spawn_blocking(move || {
            controller::begin(&disks, kind, repair, rate_mib_s, CONTROLLERS, initiator)
        })
        .await
        .map_err(|err| format!("the task panicked: {err}"))?
        .map_err(|err| err.to_string())?
    };
    follow(driver, id, kind, begun).await
}

/// Follows a coordination object to its end, recording progress; the report
/// it left, or why it ended without one.
async fn follow(
    driver: &Arc<Driver>,
    id: &str,
    kind: TaskKind,
    task: TaskFile,
) -> Result<Value, String> {
    let total = task.spec().data_set_bytes.max(1);
    let mut rate = super::Rate::new(task.bytes_done(), 0.0);
    let mut last = Instant::now();
    let path = controller::task_path(&driver.disks, kind);
    loop {
        if task.completion_done() || !path.exists() {
            break;
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
        if last.elapsed() >= PROGRESS_INTERVAL {
            last = Instant::now();
            let done = task.bytes_done();
            let mib_per_s = rate.sample(done);
            let left = total.saturating_sub(done) as f64 / 1048576.0;
            let progress = Progress {
                percent: (100.0 * done as f64 / total as f64).clamp(0.0, 100.0),
                mib_per_s,
                eta_s: (mib_per_s > 0.0).then(|| (left / mib_per_s).max(0.0)),
            };
            store(driver, id, TaskState::Running, Some(progress), None, None).await;
            notify_issuer(driver, id).await;
        }
    }
    if !task.completion_done() {
        return Err(match task.control() {
            Control::Cancel => format!("the {} was cancelled", kind.name()),
            _ => format!(
                "the {}'s coordination object went away before it completed",
                kind.name()
            ),
        });
    }
    let report = controller::report_path(&driver.disks, kind);
    let bytes = std::fs::read(&report).map_err(|err| format!("{}: {err}", report.display()))?;
    serde_json::from_slice(&bytes).map_err(|err| format!("{}: {err}", report.display()))
}

/// Ends the tasks this driver was executing when it last stopped (it died, or
/// was stopped), as persistent data holds them: a rebuild or scrub still under
/// way is followed to its end (the other driver kept working on it); one that
/// completed meanwhile gets its report; anything else fails with what is
/// known. Each issuing agent is told.
pub(super) async fn resume(driver: Arc<Driver>, started_ms: u64) {
    let open = {
        let driver = Arc::clone(&driver);
        tokio::task::spawn_blocking(move || {
            driver
                .persist
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .open_tasks()
        })
        .await
    };
    let Ok(Ok(open)) = open else {
        return;
    };
    // Only what an earlier run of this driver had: an agent that connected
    // since may already have handed this run a new task.
    for record in open.into_iter().filter(|r| r.created_ms < started_ms) {
        let driver = Arc::clone(&driver);
        tokio::spawn(async move {
            tracing::info!(task = %record.id, kind = %record.kind, "resuming a task the driver was executing");
            let outcome = match Task::parse(&record.kind, &record.args) {
                Ok(task) if task.is_long() => {
                    let kind = match task {
                        Task::Rebuild { .. } => TaskKind::Rebuild,
                        _ => TaskKind::Scrub,
                    };
                    let path = controller::task_path(&driver.disks, kind);
                    let report = controller::report_path(&driver.disks, kind);
                    match TaskFile::open(&path) {
                        Ok(task) => follow(&driver, &record.id, kind, task).await,
                        Err(_) => match std::fs::metadata(&report).and_then(|m| m.modified()) {
                            Ok(modified) if modified >= std::time::UNIX_EPOCH + Duration::from_millis(record.created_ms) => {
                                std::fs::read(&report)
                                    .map_err(|err| err.to_string())
                                    .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|err| err.to_string()))
                            }
                            _ => Err(format!(
                                "the driver restarted and found no trace of the {}'s work (it was cancelled, or never began)",
                                kind.name()
                            )),
                        },
                    }
                }
                _ => Err("the driver stopped while executing the task; the cluster's state shows whether it took effect".into()),
            };
            match &outcome {
                Ok(result) => {
                    store(
                        &driver,
                        &record.id,
                        TaskState::Complete,
                        None,
                        None,
                        Some(result),
                    )
                    .await
                }
                Err(failure) => {
                    store(
                        &driver,
                        &record.id,
                        TaskState::Failed,
                        None,
                        Some(failure),
                        None,
                    )
                    .await
                }
            }
            driver.refresh().await;
            notify_issuer(&driver, &record.id).await;
        });
    }
}

/// Tells a newly connected agent about the tasks it issued that are still
/// open or ended recently (it may have missed their end while it was away).
pub(super) async fn catch_up(
    driver: Arc<Driver>,
    agent: ProcessName,
    tx: tokio::sync::mpsc::Sender<ToAgentFromDriver>,
) {
    let since = crate::persist::now_ms().saturating_sub(CATCH_UP_MS);
    let name = agent.to_string();
    let reader = Arc::clone(&driver);
    let tasks = tokio::task::spawn_blocking(move || {
        reader
            .persist
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .tasks_of(&name, since)
    })
    .await;
    if let Ok(Ok(tasks)) = tasks {
        for task in tasks {
            // Recorded by the agent but never started: its `Execute` went
            // down with the agent's last link (a hung agent's, say).
            if task.state == TaskState::Queued && task.created_ms >= driver.started_ms {
                tracing::info!(task = %task.id, %agent, "a queued task the agent handed over on a link that died: executing it");
                tokio::spawn(execute(Arc::clone(&driver), task.id.clone()));
            }
            if tx
                .send(ToAgentFromDriver::TaskChanged { id: task.id })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
