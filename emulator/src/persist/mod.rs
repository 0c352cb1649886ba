//! A cluster's persistent data (seed 002): its configuration (how many storage
//! devices, the array, the volumes) and state (each device available,
//! unavailable or rebuilding), the identity of the agent that issued each task,
//! and task failure information. One SQLite database per cluster
//! (`RUN/sN/cM/persist.db`), shared by the cluster's driver and agents, each of
//! which opens it itself: WAL mode, a busy timeout, every write in a
//! `BEGIN IMMEDIATE` transaction, so it survives a crash of any of them. The
//! schema is `migrations/*.sql`, applied in order (`PRAGMA user_version`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use controllers::raid::{ArrayState, Level};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

/// The migrations, in order; `PRAGMA user_version` is how many were applied.
const MIGRATIONS: &[&str] = &[include_str!("migrations/001_initial.sql")];

/// How long a writer waits for another's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why persistent data could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The database.
    #[error("persistent data {path}: {source}", path = path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored document that is not what it should be.
    #[error("persistent data {path}: {what}: {source}", path = path.display())]
    Document {
        /// The database file.
        path: PathBuf,
        /// Which document.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A database written by a newer build.
    #[error("persistent data {path} has schema version {found}; this build knows up to {known}", path = path.display())]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: usize,
    },
}

/// A storage device's role in the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRole {
    /// An array member.
    Member,
    /// A hot spare.
    Spare,
}

/// A storage device's state, as seed 002's claims name it (and rebuilding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// In service (or a spare ready for service).
    Available,
    /// Failed.
    Unavailable,
    /// Being rebuilt.
    Rebuilding,
}

/// One storage device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Its index: array members first (their member index), then spares.
    pub index: usize,
    /// Its image file.
    pub file: String,
    /// Member or spare.
    pub role: DeviceRole,
    /// Available, unavailable or rebuilding.
    pub state: DeviceState,
}

/// The array, in brief.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArraySummary {
    /// RAID level.
    pub level: Level,
    /// Optimal, degraded or failed.
    pub state: ArrayState,
    /// Member disks.
    pub members: usize,
    /// Hot spares.
    pub spares: usize,
    /// Bytes per disk.
    pub disk_bytes: u64,
    /// Chunk bytes.
    pub chunk_bytes: u64,
    /// Usable bytes.
    pub data_bytes: u64,
}

/// A volume and how to attach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name (the NBD export name).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Its URI: its home controller's address, which a partner that took
    /// the volume over serves too (address takeover).
    pub uri: String,
    /// The controller that owns it while both run (`s0/c0`).
    #[serde(default)]
    pub home: Option<String>,
    /// The controller serving it now (None: nobody).
    #[serde(default)]
    pub owner: Option<String>,
    /// Its path: `optimized` (the home controller serves it), `failed-over`
    /// (the partner does), `transitioning` (its controller is gone, nobody
    /// took over yet), `offline`.
    #[serde(default)]
    pub path: Option<String>,
}

/// A rebuild or scrub under way, as its coordination object tells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// `rebuild` or `scrub`.
    pub kind: String,
    /// `run`, `pause` or `cancel`.
    pub control: String,
    /// Percent done, 0–100.
    pub percent: f64,
    /// MiB/s (moving average).
    pub mib_per_s: f64,
    /// Seconds left, when known.
    pub eta_s: Option<f64>,
    /// Rate limit, MiB/s.
    pub rate_limit_mib_s: Option<f64>,
}

/// A cluster's configuration and state: what its driver collects and stores,
/// and what its agents read back and send to their servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster, `sN/cM`.
    pub cluster: String,
    /// The driver's process id.
    pub driver_pid: u32,
    /// Where the driver serves NBD.
    pub nbd_address: String,
    /// The storage devices (configuration: how many; state: each one's).
    pub devices: Vec<Device>,
    /// The array.
    pub array: ArraySummary,
    /// The volumes.
    pub volumes: Vec<VolumeInfo>,
    /// Rebuilds and scrubs under way.
    pub operations: Vec<Operation>,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Accepted, not started.
    Queued,
    /// Being carried out.
    Running,
    /// Done.
    Complete,
    /// Ended with failure information.
    Failed,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "running" => Self::Running,
            "complete" => Self::Complete,
            "failed" => Self::Failed,
            _ => Self::Queued,
        }
    }

    /// Whether the task has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Complete | Self::Failed)
    }
}

/// How far a long task is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Percent done, 0–100.
    pub percent: f64,
    /// MiB/s.
    pub mib_per_s: f64,
    /// Seconds left, when known (never negative).
    pub eta_s: Option<f64>,
}

/// A task as the cluster's persistent data holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id (given by the server that accepted it).
    pub id: String,
    /// What to do (`fail-disk`, `scrub`, …).
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// The agent that issued it to the driver.
    pub agent: Option<String>,
    /// Where it is.
    pub state: TaskState,
    /// How far it is.
    pub progress: Option<Progress>,
    /// Why it failed.
    pub failure: Option<String>,
    /// What it returned.
    pub result: Option<serde_json::Value>,
    /// When it was recorded, Unix ms.
    pub created_ms: u64,
    /// When it last changed, Unix ms.
    pub updated_ms: u64,
}

/// Why a transaction's work stopped.
enum Abort {
    /// An SQLite call failed.
    Sqlite(rusqlite::Error),
    /// Something else, said as it should be.
    With(PersistError),
}

impl From<rusqlite::Error> for Abort {
    fn from(err: rusqlite::Error) -> Self {
        Self::Sqlite(err)
    }
}

/// One cluster's persistent data, open.
#[derive(Debug)]
pub struct Persist {
    path: PathBuf,
    connection: Connection,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Persist {
    /// Opens (creating it if needed) the database at `path` and brings its
    /// schema up to date.
    pub fn open(path: &Path) -> Result<Self, PersistError> {
        let sqlite = |source| PersistError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(sqlite)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        connection
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite)?;
        let mut persist = Self {
            path: path.to_path_buf(),
            connection,
        };
        persist.migrate()?;
        Ok(persist)
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> PersistError + '_ {
        |source| PersistError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), PersistError> {
        let path = self.path.clone();
        self.immediate(|transaction| {
            let version: i64 =
                transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
            if version < 0 || version as usize > MIGRATIONS.len() {
                return Err(Abort::With(PersistError::TooNew {
                    path,
                    found: version,
                    known: MIGRATIONS.len(),
                }));
            }
            for migration in &MIGRATIONS[version as usize..] {
                transaction.execute_batch(migration)?;
            }
            transaction.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
            Ok(())
        })
    }

    /// Runs `work` in a `BEGIN IMMEDIATE` transaction, committed when it
    /// succeeds: it takes the write lock at once (waiting up to the busy
    /// timeout for another writer), so it never fails half-way on a lock
    /// upgrade.
    fn immediate<T>(
        &mut self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, Abort>,
    ) -> Result<T, PersistError> {
        let path = self.path.clone();
        let sqlite = |source| PersistError::Sqlite {
            path: path.clone(),
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite)?;
        let value = work(&transaction).map_err(|abort| match abort {
            Abort::Sqlite(source) => sqlite(source),
            Abort::With(err) => err,
        })?;
        transaction.commit().map_err(sqlite)?;
        Ok(value)
    }

    /// Stores the cluster's configuration and state; returns its revision,
    /// moved on only if it changed.
    pub fn store_state(&mut self, state: &ClusterState) -> Result<u64, PersistError> {
        let document = serde_json::to_string(state).map_err(|source| PersistError::Document {
            path: self.path.clone(),
            what: "cluster state",
            source,
        })?;
        self.immediate(|transaction| {
            let current: Option<(i64, String)> = transaction
                .query_row(
                    "SELECT revision, document FROM cluster_state WHERE id = 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let revision = match current {
                Some((revision, old)) if old == document => return Ok(revision as u64),
                Some((revision, _)) => revision + 1,
                None => 1,
            };
            transaction.execute(
                "INSERT INTO cluster_state (id, revision, document, updated_ms) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET revision = ?1, document = ?2, updated_ms = ?3",
                params![revision, document, now_ms() as i64],
            )?;
            transaction.execute("DELETE FROM devices", [])?;
            for device in &state.devices {
                let role = match device.role {
                    DeviceRole::Member => "member",
                    DeviceRole::Spare => "spare",
                };
                let status = match device.state {
                    DeviceState::Available => "available",
                    DeviceState::Unavailable => "unavailable",
                    DeviceState::Rebuilding => "rebuilding",
                };
                transaction.execute(
                    "INSERT INTO devices (idx, file, role, state) VALUES (?1, ?2, ?3, ?4)",
                    params![device.index as i64, device.file, role, status],
                )?;
            }
            Ok(revision as u64)
        })
    }

    /// The stored configuration and state and their revision (None before
    /// the driver first stored them).
    pub fn state(&self) -> Result<Option<(u64, ClusterState)>, PersistError> {
        let row: Option<(i64, String)> = self
            .connection
            .query_row(
                "SELECT revision, document FROM cluster_state WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(self.sqlite())?;
        row.map(|(revision, document)| {
            serde_json::from_str(&document)
                .map(|state| (revision as u64, state))
                .map_err(|source| PersistError::Document {
                    path: self.path.clone(),
                    what: "cluster state",
                    source,
                })
        })
        .transpose()
    }

    /// Records a task an agent is about to hand to the driver, with the
    /// agent's identity (FIG. 4, block 404). A task already recorded keeps
    /// what it has (a retry of the same id).
    pub fn record_task(&mut self, task: &TaskRecord) -> Result<(), PersistError> {
        let args = task.args.to_string();
        self.immediate(|transaction| {
            transaction.execute(
                "INSERT INTO tasks (id, kind, args, agent, state, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT (id) DO NOTHING",
                params![
                    task.id,
                    task.kind,
                    args,
                    task.agent,
                    task.state.as_str(),
                    task.created_ms as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Records where a task is: its state, progress, and when it failed, why
    /// (FIG. 4, block 410), or what it returned.
    pub fn update_task(
        &mut self,
        id: &str,
        state: TaskState,
        progress: Option<&Progress>,
        failure: Option<&str>,
        result: Option<&serde_json::Value>,
    ) -> Result<(), PersistError> {
        let progress = progress.map(|p| serde_json::to_string(p).unwrap_or_default());
        let result = result.map(|r| r.to_string());
        self.immediate(|transaction| {
            transaction.execute(
                "UPDATE tasks SET state = ?2, progress = COALESCE(?3, progress), failure = ?4,
                 result = COALESCE(?5, result), updated_ms = ?6 WHERE id = ?1",
                params![
                    id,
                    state.as_str(),
                    progress,
                    failure,
                    result,
                    now_ms() as i64
                ],
            )?;
            Ok(())
        })
    }

    /// One task.
    pub fn task(&self, id: &str) -> Result<Option<TaskRecord>, PersistError> {
        self.connection
            .query_row(
                "SELECT id, kind, args, agent, state, progress, failure, result, created_ms, updated_ms
                 FROM tasks WHERE id = ?1",
                [id],
                task_from_row,
            )
            .optional()
            .map_err(self.sqlite())
    }

    /// Tasks agent `agent` issued that have not ended, or ended since
    /// `since_ms`.
    pub fn tasks_of(&self, agent: &str, since_ms: u64) -> Result<Vec<TaskRecord>, PersistError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT id, kind, args, agent, state, progress, failure, result, created_ms, updated_ms
                 FROM tasks WHERE agent = ?1 AND (state IN ('queued', 'running') OR updated_ms >= ?2)
                 ORDER BY created_ms",
            )
            .map_err(self.sqlite())?;
        let rows = statement
            .query_map(params![agent, since_ms as i64], task_from_row)
            .map_err(self.sqlite())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sqlite())
    }

    /// Tasks not yet ended.
    pub fn open_tasks(&self) -> Result<Vec<TaskRecord>, PersistError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT id, kind, args, agent, state, progress, failure, result, created_ms, updated_ms
                 FROM tasks WHERE state IN ('queued', 'running') ORDER BY created_ms",
            )
            .map_err(self.sqlite())?;
        let rows = statement
            .query_map([], task_from_row)
            .map_err(self.sqlite())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sqlite())
    }
}

fn task_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRecord> {
    let args: String = row.get(2)?;
    let state: String = row.get(4)?;
    let progress: Option<String> = row.get(5)?;
    let result: Option<String> = row.get(7)?;
    Ok(TaskRecord {
        id: row.get(0)?,
        kind: row.get(1)?,
        args: serde_json::from_str(&args).unwrap_or(serde_json::Value::Null),
        agent: row.get(3)?,
        state: TaskState::parse(&state),
        progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
        failure: row.get(6)?,
        result: result.and_then(|r| serde_json::from_str(&r).ok()),
        created_ms: row.get::<_, i64>(8)? as u64,
        updated_ms: row.get::<_, i64>(9)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(revision_marker: usize) -> ClusterState {
        ClusterState {
            cluster: "s0/c1".into(),
            driver_pid: 42,
            nbd_address: "127.0.0.1:10810".into(),
            devices: (0..revision_marker)
                .map(|index| Device {
                    index,
                    file: format!("disk{index}.img"),
                    role: DeviceRole::Member,
                    state: DeviceState::Available,
                })
                .collect(),
            array: ArraySummary {
                level: Level::Raid5,
                state: ArrayState::Optimal,
                members: revision_marker,
                spares: 0,
                disk_bytes: 1 << 20,
                chunk_bytes: 65536,
                data_bytes: 2 << 20,
            },
            volumes: Vec::new(),
            operations: Vec::new(),
        }
    }

    #[test]
    fn state_revisions_move_only_on_change_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("persist.db");
        let mut persist = Persist::open(&path).expect("open");
        assert_eq!(persist.state().expect("read"), None);
        assert_eq!(persist.store_state(&state(3)).expect("store"), 1);
        assert_eq!(persist.store_state(&state(3)).expect("same"), 1);
        assert_eq!(persist.store_state(&state(4)).expect("changed"), 2);
        drop(persist);
        // Another process's view: the same data.
        let other = Persist::open(&path).expect("reopen");
        let (revision, stored) = other.state().expect("read").expect("stored");
        assert_eq!(revision, 2);
        assert_eq!(stored, state(4));
        let devices: i64 = other
            .connection
            .query_row(
                "SELECT COUNT(*) FROM devices WHERE state = 'available'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(devices, 4);
    }

    #[test]
    fn tasks_keep_their_agent_and_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut persist = Persist::open(&dir.path().join("persist.db")).expect("open");
        let task = TaskRecord {
            id: "a-1".into(),
            kind: "fail-disk".into(),
            args: serde_json::json!({ "disk": 9 }),
            agent: Some("s0/c1/agent-a".into()),
            state: TaskState::Queued,
            progress: None,
            failure: None,
            result: None,
            created_ms: 5,
            updated_ms: 5,
        };
        persist.record_task(&task).expect("record");
        persist.record_task(&task).expect("again: nothing changes");
        persist
            .update_task(
                "a-1",
                TaskState::Failed,
                None,
                Some("disk 9 does not exist"),
                None,
            )
            .expect("fail");
        let stored = persist.task("a-1").expect("read").expect("there");
        assert_eq!(stored.agent.as_deref(), Some("s0/c1/agent-a"));
        assert_eq!(stored.state, TaskState::Failed);
        assert_eq!(stored.failure.as_deref(), Some("disk 9 does not exist"));
        assert_eq!(stored.args, serde_json::json!({ "disk": 9 }));
        assert!(persist.open_tasks().expect("open tasks").is_empty());
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("persist.db");
        drop(Persist::open(&path).expect("open"));
        let connection = Connection::open(&path).expect("raw");
        connection
            .pragma_update(None, "user_version", 99)
            .expect("set version");
        drop(connection);
        let err = Persist::open(&path).expect_err("too new");
        assert!(
            matches!(err, PersistError::TooNew { found: 99, .. }),
            "{err}"
        );
    }
}
