//! Faults a user injects into a running domain (`emulator fault …`, the API,
//! scenarios): what they are ([`FaultSpec`]), and carrying them out.
//!
//! - **Disk faults** are data: a rule in the system's fault book
//!   (`controllers::faults`, next to the disks), which every process that has
//!   the array open applies through the fault layer its RAID engine reads and
//!   writes the member disks through. A disk fault stays until it is cleared.
//!   Bit rot (`disk-corrupt` with `at_rest`) is the exception: it flips
//!   stored bits once, as it is injected, and leaves nothing standing.
//! - **Host faults** (`host-fs-full`) are a rule of the same fault book for
//!   every disk file of a system (`host.rs`): the host file system under the
//!   disks is full, so writes into blocks the image files have not allocated
//!   fail with ENOSPC. It stays until it is cleared.
//! - **A death in a journal write** (`journal-crash`) is a crash rule of the
//!   same book for the degraded-write journal (`journal.rs`): the process
//!   making the nth journal write dies there. It fires once.
//! - **A power loss** (`power-loss`) of a system (`power.rs`): a
//!   volatile-cache rule in the same book has the fault layer keep undo
//!   logs of what the disks' caches hold, then the supervisor kills every
//!   process of the system, rolls a seeded share of the unflushed blocks
//!   back and starts the processes again. It happens once.
//! - **Link faults** are data too: a rule in the run's link book
//!   (`RUN/links.json`, `crate::link::book`), applied by the processes at
//!   the link's ends (an agent's link to its server, the hosts' links to a
//!   controller's NBD address). A link fault stays until it is cleared.
//! - **Process faults** are signals to the process the supervisor started
//!   (kill: SIGKILL, hang: SIGSTOP, resume: SIGCONT) or a restart through the
//!   supervisor. They happen once.
//!
//! Every injection and clearing is appended, with its time, to the run's fault
//! log (`RUN/faults.jsonl`), which `emulator fault list`, the console and the
//! scenario report show.

mod disk;
mod host;
mod journal;
mod link;
pub mod power;

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::domain::ProcessName;
use crate::persist::now_ms;
use crate::rundir::RunDir;

pub use disk::{DiskFault, Op, Writer};
pub use host::HostFault;
pub use journal::JournalFault;
pub use link::{LinkFault, LinkName};
pub use power::PowerFault;

/// A fault to inject. In TOML and JSON the `fault` field names the kind:
/// `{ fault = "disk-error", disk = 2, ops = ["read"], lba = 0, sectors = 2048 }`,
/// `{ fault = "host-fs-full", system = "s0" }`,
/// `{ fault = "process-kill", process = "s0/c0/driver" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum FaultSpec {
    /// The disk stops answering (every I/O fails): the drivers fail it in the
    /// array. Cleared: it answers again (the array does not take it back on
    /// its own once it failed it; a replace-disk task rebuilds it).
    DiskFail(DiskFault),
    /// The disk is pulled out: like `disk-fail`, every I/O fails (ENXIO).
    /// Cleared: re-inserted.
    DiskPull(DiskFault),
    /// I/O errors (`errno`, EIO by default) for the `ops` on the LBA range.
    /// A read error is a medium error: a redundant array reconstructs the
    /// block and writes it back.
    DiskError(DiskFault),
    /// Added latency (`ms`) for the `ops` on the LBA range.
    DiskDelay(DiskFault),
    /// Silent corruption: `bits` bit flips in what a read returns, after the
    /// disk's checksum was checked; or, with `at_rest`, flipped once in the
    /// stored data (bit rot: the checksum then no longer matches).
    DiskCorrupt(DiskFault),
    /// Writes on the range are acknowledged and not stored.
    DiskLostWrites(DiskFault),
    /// Of a write of several blocks on the range, only the first half of the
    /// blocks is stored; it is acknowledged whole.
    DiskTornWrites(DiskFault),
    /// The process making the `nth` write of the `writers` (host, rebuild,
    /// repair) on the range dies there (SIGABRT) before storing it, after
    /// `stall_ms`: a controller dying in the middle of a rebuild, a scrub
    /// repair or a resync. It fires once.
    DiskCrash(DiskFault),
    /// The host file system under the system's disks is full: every write
    /// (host, rebuild, repair) touching a block an image file has not
    /// allocated fails with ENOSPC and stores nothing; overwrites of
    /// allocated blocks, reads and flushes go on. Cleared: room again.
    HostFsFull(HostFault),
    /// The process making the `nth` write of the degraded-write journal (an
    /// entry saved before a degraded row is written, or one cleared after)
    /// dies there (SIGABRT), after `stall_ms`. It fires once.
    JournalCrash(JournalFault),
    /// The system loses power: every process on its clusters dies at once
    /// (SIGKILL), its disks lose a seeded share (`lose`) of the blocks
    /// written since their last flush during the `after_ms` before the cut,
    /// and the power comes back (every process starts again). It happens
    /// once.
    PowerLoss(PowerFault),
    /// The link is cut: an agent's connection to its server is closed and it
    /// cannot register again; a controller address's NBD connections are
    /// closed and new ones refused. Cleared: the agent registers again, hosts
    /// reconnect.
    LinkCut(LinkFault),
    /// Every message of the link (an agent's, either way; NBD replies) is
    /// delivered `ms` later.
    LinkDelay(LinkFault),
    /// SIGKILL to a process of the domain.
    ProcessKill(ProcessFault),
    /// SIGSTOP: the process hangs (it is there, and silent).
    ProcessHang(ProcessFault),
    /// SIGCONT: a hung process goes on.
    ProcessResume(ProcessFault),
    /// The supervisor starts the process again (it was killed, or it is
    /// stopped first).
    ProcessRestart(ProcessFault),
}

/// Which process a process fault hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessFault {
    /// `s0/c0/driver`, `s0/c1/agent-a`, `s0/c0/server-a`, `host/server-b`.
    pub process: String,
}

/// A fault as the log records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    /// `f1`, `f2`, … in the order they were injected (disk faults keep it
    /// until cleared).
    pub id: String,
    /// What was injected.
    #[serde(flatten)]
    pub spec: FaultSpec,
    /// When, Unix ms.
    pub injected_ms: u64,
    /// What it did, in words (`SIGKILL to pid 4242`, `disk 2 (disk2.img) of
    /// s0: reads of LBA 0..2048 fail with EIO`).
    pub effect: String,
    /// Whether it stands until cleared (disk faults but bit rot, host and
    /// link faults).
    pub standing: bool,
}

/// One line of the fault log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum FaultEvent {
    /// A fault was injected.
    Injected(Box<FaultRecord>),
    /// A standing fault was cleared.
    Cleared {
        /// Its id.
        id: String,
        /// When, Unix ms.
        cleared_ms: u64,
    },
}

/// Why a fault could not be injected, listed or cleared.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The fault names something the domain does not have, or makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// The fault book of the disks, or the link book.
    #[error(transparent)]
    Book(#[from] controllers::book::BookError),
    /// The array (reading which file a disk slot holds).
    #[error(transparent)]
    Array(#[from] controllers::array::ArrayError),
    /// Signalling or restarting a process.
    #[error("{0}")]
    Process(String),
    /// The fault log.
    #[error("the fault log {path}: {source}")]
    Log {
        /// The log.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl FaultSpec {
    /// The kind, as written in files (`disk-error`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::DiskFail(_) => "disk-fail",
            Self::DiskPull(_) => "disk-pull",
            Self::DiskError(_) => "disk-error",
            Self::DiskDelay(_) => "disk-delay",
            Self::DiskCorrupt(_) => "disk-corrupt",
            Self::DiskLostWrites(_) => "disk-lost-writes",
            Self::DiskTornWrites(_) => "disk-torn-writes",
            Self::DiskCrash(_) => "disk-crash",
            Self::HostFsFull(_) => "host-fs-full",
            Self::JournalCrash(_) => "journal-crash",
            Self::PowerLoss(_) => "power-loss",
            Self::LinkCut(_) => "link-cut",
            Self::LinkDelay(_) => "link-delay",
            Self::ProcessKill(_) => "process-kill",
            Self::ProcessHang(_) => "process-hang",
            Self::ProcessResume(_) => "process-resume",
            Self::ProcessRestart(_) => "process-restart",
        }
    }

    /// Every kind, for help texts and errors.
    pub const KINDS: [&'static str; 17] = [
        "disk-fail",
        "disk-pull",
        "disk-error",
        "disk-delay",
        "disk-corrupt",
        "disk-lost-writes",
        "disk-torn-writes",
        "disk-crash",
        "host-fs-full",
        "journal-crash",
        "power-loss",
        "link-cut",
        "link-delay",
        "process-kill",
        "process-hang",
        "process-resume",
        "process-restart",
    ];
}

/// Injects `spec` into the domain running in `run`; what was done. A seed
/// left out of a disk fault with a rate below 1 is taken from `seed`.
pub fn inject(run: &RunDir, spec: &FaultSpec, seed: u64) -> Result<FaultRecord, FaultError> {
    if let FaultSpec::PowerLoss(power) = spec {
        // Logged by the supervisor, which carries it out.
        return power::inject(run, power, seed);
    }
    let id = format!("f{}", read_log(run)?.len() + 1);
    let (effect, standing) = match spec {
        FaultSpec::ProcessKill(p) => (signal(run, p, nix::sys::signal::Signal::SIGKILL)?, false),
        FaultSpec::ProcessHang(p) => (signal(run, p, nix::sys::signal::Signal::SIGSTOP)?, false),
        FaultSpec::ProcessResume(p) => (signal(run, p, nix::sys::signal::Signal::SIGCONT)?, false),
        FaultSpec::ProcessRestart(p) => {
            let name = process_name(&p.process)?;
            let said = crate::supervisor::restart(run, &name)
                .map_err(|err| FaultError::Process(err.to_string()))?;
            (said, false)
        }
        FaultSpec::LinkCut(_) | FaultSpec::LinkDelay(_) => link::inject(run, &id, spec)?,
        FaultSpec::HostFsFull(host) => host::inject(run, &id, host)?,
        FaultSpec::JournalCrash(journal) => journal::inject(run, &id, journal)?,
        FaultSpec::PowerLoss(_) => unreachable!("handled above"),
        disk => disk::inject(run, &id, disk, seed)?,
    };
    let record = FaultRecord {
        id,
        spec: spec.clone(),
        injected_ms: now_ms(),
        effect,
        standing,
    };
    tracing::warn!(fault = %record.id, kind = spec.kind(), effect = %record.effect, "fault injected");
    append(run, &FaultEvent::Injected(Box::new(record.clone())))?;
    Ok(record)
}

/// Logs a power loss the supervisor carried out (not the injector, which may
/// have lost power with the system): its record.
pub fn log_power_loss(
    run: &RunDir,
    spec: FaultSpec,
    effect: String,
) -> Result<FaultRecord, FaultError> {
    let record = FaultRecord {
        id: format!("f{}", read_log(run)?.len() + 1),
        spec,
        injected_ms: now_ms(),
        effect,
        standing: false,
    };
    tracing::warn!(fault = %record.id, kind = record.spec.kind(), effect = %record.effect, "fault injected");
    append(run, &FaultEvent::Injected(Box::new(record.clone())))?;
    Ok(record)
}

/// Clears standing fault `id`, or every standing fault with `None`; the ids
/// cleared.
pub fn clear(run: &RunDir, id: Option<&str>) -> Result<Vec<String>, FaultError> {
    let standing: Vec<FaultRecord> = active(run)?;
    let chosen: Vec<&FaultRecord> = match id {
        Some(id) => {
            let found: Vec<&FaultRecord> = standing.iter().filter(|f| f.id == id).collect();
            if found.is_empty() {
                let ids: Vec<&str> = standing.iter().map(|f| f.id.as_str()).collect();
                return Err(FaultError::Invalid(format!(
                    "no standing fault {id} (standing: {})",
                    if ids.is_empty() {
                        "none".to_string()
                    } else {
                        ids.join(", ")
                    }
                )));
            }
            found
        }
        None => standing.iter().collect(),
    };
    let mut cleared = Vec::new();
    for fault in chosen {
        match fault.spec {
            FaultSpec::LinkCut(_) | FaultSpec::LinkDelay(_) => link::clear(run, fault)?,
            FaultSpec::HostFsFull(ref host) => host::clear(run, fault, host)?,
            FaultSpec::JournalCrash(ref journal) => journal::clear(run, fault, journal)?,
            FaultSpec::ProcessKill(_)
            | FaultSpec::ProcessHang(_)
            | FaultSpec::ProcessResume(_)
            | FaultSpec::ProcessRestart(_)
            | FaultSpec::PowerLoss(_) => {}
            _ => disk::clear(run, fault)?,
        }
        append(
            run,
            &FaultEvent::Cleared {
                id: fault.id.clone(),
                cleared_ms: now_ms(),
            },
        )?;
        tracing::info!(fault = %fault.id, "fault cleared");
        cleared.push(fault.id.clone());
    }
    Ok(cleared)
}

/// The standing faults now (injected, not cleared), oldest first.
pub fn active(run: &RunDir) -> Result<Vec<FaultRecord>, FaultError> {
    let mut standing: Vec<FaultRecord> = Vec::new();
    for event in read_log(run)? {
        match event {
            FaultEvent::Injected(record) if record.standing => standing.push(*record),
            FaultEvent::Injected(_) => {}
            FaultEvent::Cleared { id, .. } => standing.retain(|f| f.id != id),
        }
    }
    Ok(standing)
}

/// Every event of the run's fault log, oldest first (none: no log yet).
pub fn read_log(run: &RunDir) -> Result<Vec<FaultEvent>, FaultError> {
    let path = run.fault_log();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(FaultError::Log { path, source }),
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_str(line).map_err(|err| FaultError::Log {
                path: path.clone(),
                source: std::io::Error::other(format!("line {}: {err}", n + 1)),
            })
        })
        .collect()
}

fn append(run: &RunDir, event: &FaultEvent) -> Result<(), FaultError> {
    let path = run.fault_log();
    let line = serde_json::to_string(event).map_err(|err| FaultError::Log {
        path: path.clone(),
        source: std::io::Error::other(err),
    })?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{line}"))
        .map_err(|source| FaultError::Log { path, source })
}

fn process_name(text: &str) -> Result<ProcessName, FaultError> {
    ProcessName::parse(text).map_err(|err| FaultError::Invalid(format!("process {text:?}: {err}")))
}

/// Sends `signal` to the process the supervisor runs as `fault.process`.
fn signal(
    run: &RunDir,
    fault: &ProcessFault,
    signal: nix::sys::signal::Signal,
) -> Result<String, FaultError> {
    let name = process_name(&fault.process)?.to_string();
    let processes = run.read_processes();
    let Some(record) = processes.iter().find(|p| p.name == name) else {
        let known: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
        return Err(FaultError::Invalid(format!(
            "the domain in {} has no process {name} (it has: {})",
            run.root().display(),
            known.join(", ")
        )));
    };
    if record.ended.is_some() {
        return Err(FaultError::Process(format!(
            "{name} is not running ({})",
            record.ended.as_deref().unwrap_or("ended")
        )));
    }
    let pid = nix::unistd::Pid::from_raw(record.pid as i32);
    nix::sys::signal::kill(pid, signal)
        .map_err(|err| FaultError::Process(format!("{signal} to {name} (pid {pid}): {err}")))?;
    Ok(format!("{signal} to {name} (pid {pid})"))
}
