//! The run directory of a domain (`run/` by default, git-ignored): everything a
//! running domain keeps on disk, and where each process finds the others.
//!
//! ```text
//! RUN/domain.toml             the configuration the domain was started with
//! RUN/token                   the API token (mode 0600)
//! RUN/supervisor.json         the supervisor's pid
//! RUN/supervisor.sock         the supervisor's control socket (restart, down)
//! RUN/processes.json          every process: name, pid, state, log (the supervisor writes it)
//! RUN/logs/NAME.log           each process's log (s0-c1-agent-a.log)
//! RUN/sN/disks/               system sN's disks: the array both its clusters share
//! RUN/sN/cM/persist.db        cluster sN/cM's persistent data
//! RUN/sN/cM/driver.sock       where the cluster's agents reach its driver
//! RUN/sN/cM/notice-KIND.sock  where its driver, as initiator, hears a task is complete
//! RUN/servers/a.sock          where agents register with server A (b.sock: B)
//! RUN/servers/a.json          server A's pid and HTTP address, once it listens
//! RUN/faults.jsonl            every fault injected and cleared (see `fault`)
//! RUN/links.json              the link faults standing (see `link::book`)
//! RUN/links.live              its generation counter, mapped by agents and drivers
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::{ClusterName, Pair, ProcessName};

/// A process as the supervisor started it, in `RUN/processes.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Its name, `s0/c1/agent-a`.
    pub name: String,
    /// Its pid (the latest, if it was restarted).
    pub pid: u32,
    /// Its log.
    pub log: PathBuf,
    /// When it was started, Unix ms.
    pub started_ms: u64,
    /// How it ended, when the supervisor saw it end (`exited 0`, `killed by
    /// SIGKILL`).
    pub ended: Option<String>,
}

/// Whether process `pid` runs now: `running`, `stopped` (SIGSTOP: it hangs),
/// or `gone`.
pub fn liveness(pid: u32) -> &'static str {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return "gone";
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain them.
    match stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
    {
        Some('T' | 't') => "stopped",
        Some('Z' | 'X') | None => "gone",
        Some(_) => "running",
    }
}

/// The run directory of a domain.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

/// What a server publishes once it listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerAddress {
    /// The server.
    pub name: ProcessName,
    /// Its pid.
    pub pid: u32,
    /// Its console and API, `http://127.0.0.1:PORT`.
    pub http: String,
}

impl RunDir {
    /// The run's fault log: every fault injected and cleared, one JSON object
    /// a line.
    pub fn fault_log(&self) -> PathBuf {
        self.root.join("faults.jsonl")
    }

    /// The run directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The configuration the domain was started with.
    pub fn config(&self) -> PathBuf {
        self.root.join("domain.toml")
    }

    /// The API token.
    pub fn token(&self) -> PathBuf {
        self.root.join("token")
    }

    /// The supervisor's pid file.
    pub fn supervisor(&self) -> PathBuf {
        self.root.join("supervisor.json")
    }

    /// The supervisor's control socket.
    pub fn supervisor_socket(&self) -> PathBuf {
        self.root.join("supervisor.sock")
    }

    /// The process table.
    pub fn processes(&self) -> PathBuf {
        self.root.join("processes.json")
    }

    /// A process's log.
    pub fn log(&self, name: &ProcessName) -> PathBuf {
        self.root
            .join("logs")
            .join(format!("{}.log", name.to_string().replace('/', "-")))
    }

    /// The supervisor's log.
    pub fn supervisor_log(&self) -> PathBuf {
        self.root.join("logs").join("supervisor.log")
    }

    /// System `system`'s disks (its array directory).
    pub fn disks(&self, system: usize) -> PathBuf {
        self.root.join(format!("s{system}")).join("disks")
    }

    /// Cluster `cluster`'s own directory.
    pub fn cluster(&self, cluster: ClusterName) -> PathBuf {
        self.root
            .join(format!("s{}", cluster.system))
            .join(format!("c{}", cluster.cluster))
    }

    /// Cluster `cluster`'s persistent data.
    pub fn persist(&self, cluster: ClusterName) -> PathBuf {
        self.cluster(cluster).join("persist.db")
    }

    /// Where cluster `cluster`'s agents reach its driver.
    pub fn driver_socket(&self, cluster: ClusterName) -> PathBuf {
        self.cluster(cluster).join("driver.sock")
    }

    /// Where cluster `cluster`'s driver, as a controller, hears that every
    /// partition of a `kind` task it initiated is COMPLETE.
    pub fn notice_socket(&self, cluster: ClusterName, kind: &str) -> PathBuf {
        self.cluster(cluster).join(format!("notice-{kind}.sock"))
    }

    /// Where agents register with server `pair`.
    pub fn server_socket(&self, pair: Pair) -> PathBuf {
        self.root
            .join("servers")
            .join(format!("{}.sock", pair.lower()))
    }

    /// What server `pair` publishes once it listens.
    pub fn server_address(&self, pair: Pair) -> PathBuf {
        self.root
            .join("servers")
            .join(format!("{}.json", pair.lower()))
    }

    /// Reads the process table (empty if there is none yet).
    pub fn read_processes(&self) -> Vec<ProcessRecord> {
        std::fs::read(self.processes())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Reads what server `pair` published (None: not yet, or not running).
    pub fn read_server_address(&self, pair: Pair) -> Option<ServerAddress> {
        let bytes = std::fs::read(self.server_address(pair)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes `bytes` to `path` whole or not at all.
    pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, path)
    }
}
