//! Starting and stopping a whole domain. `emulator up` prepares the run
//! directory (the configuration, the API token, every system's disks and
//! array) and starts the supervisor, a daemon that starts every process of
//! the domain, in the order of seed 002's FIG. 2 (in each cluster the driver
//! first, which collects and stores the configuration and state; then the
//! domain servers; then the agents, which register and report), keeps the
//! process table (`RUN/processes.json`), and notices each exit. It restarts
//! nothing by itself: `emulator restart NAME` asks it to (through
//! `RUN/supervisor.sock`), and `emulator down` (SIGTERM) makes it stop
//! everything in order: agents, then servers, then drivers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use controllers::array::{self, Array};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::client::{Client, ClientError};
use crate::domain::{ConfigError, Domain, Pair, Placement, ProcessName, Role};
use crate::persist::now_ms;
use crate::rundir::{liveness, ProcessRecord, RunDir};

/// How long `up` waits for every agent to register and report.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the supervisor waits for a driver to listen before starting the
/// processes that need it (they retry anyway).
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a domain could not be started, run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A system's disks.
    #[error("{system}'s disks in {dir}: {source}", dir = dir.display())]
    Disks {
        /// The system.
        system: String,
        /// Its disk directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: array::ArrayError,
    },
    /// Not possible as things stand; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// A file, socket or process.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A server's API.
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// The supervisor's pid file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SupervisorFile {
    pid: u32,
    /// The process's identity (pid and start time), so that another process
    /// that has its pid now (after a reboot, say) is not taken for it.
    #[serde(default)]
    identity: Option<u64>,
    /// The boot it ran in (see `disk_images::intent::this_boot`): a file left
    /// by a domain that was running when the host lost power names a process
    /// of another boot.
    #[serde(default)]
    boot: Option<u64>,
}

/// The pid of the supervisor running in `run`, if one is.
pub fn running_supervisor(run: &RunDir) -> Option<u32> {
    let bytes = std::fs::read(run.supervisor()).ok()?;
    let file: SupervisorFile = serde_json::from_slice(&bytes).ok()?;
    let this_boot = file.boot.is_none() || file.boot == disk_images::intent::this_boot();
    let same_process = file.identity.is_none_or(disk_images::process::alive);
    (this_boot && same_process && liveness(file.pid) != "gone").then_some(file.pid)
}

/// Prepares `run` for the domain described by `config_text`: checks that no
/// domain runs there, writes the configuration and a new API token, and
/// creates each system's disks (or checks that the ones there fit).
pub fn prepare(run: &RunDir, config_text: &str) -> Result<Domain, SupervisorError> {
    let domain = Domain::parse(config_text)?;
    if let Some(pid) = running_supervisor(run) {
        return Err(SupervisorError::Refused(format!(
            "a domain is already running in {} (supervisor pid {pid}): `emulator down --run-dir {}` stops it",
            run.root().display(),
            run.root().display()
        )));
    }
    for dir in [
        run.root().to_path_buf(),
        run.root().join("logs"),
        run.root().join("servers"),
    ] {
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    }
    // Leftovers of a domain that was killed rather than stopped.
    for leftover in [run.processes(), run.supervisor_socket()] {
        let _ = std::fs::remove_file(leftover);
    }
    for pair in [Pair::A, Pair::B] {
        let _ = std::fs::remove_file(run.server_address(pair));
    }
    std::fs::write(run.config(), config_text).map_err(io("write the configuration"))?;
    write_token(&run.token())?;
    for (index, system) in domain.systems.iter().enumerate() {
        let dir = run.disks(index);
        let disks = |source| SupervisorError::Disks {
            system: system.name.clone(),
            dir: dir.clone(),
            source,
        };
        let geometry = array::geometry(
            system.level,
            system.members(),
            system.chunk_bytes,
            system.disk_bytes,
        );
        if dir.join("array.json").exists() {
            // The disks of an earlier run: kept, with their data, if they fit.
            let metadata = array::read_metadata(&dir).map_err(disks)?;
            if metadata.geometry != geometry {
                return Err(SupervisorError::Refused(format!(
                    "{} holds {}'s disks from an earlier run with another shape ({:?}, {} disks of {} bytes): \
                     remove that directory or use another --run-dir",
                    dir.display(),
                    system.name,
                    metadata.geometry.level,
                    metadata.geometry.disks,
                    metadata.geometry.disk_bytes
                )));
            }
        } else {
            Array::create(&dir, geometry, system.spares, system.volumes).map_err(disks)?;
        }
        // A power loss whose injector died before the cut left the disks
        // keeping undo logs: not a standing fault, so not kept.
        crate::fault::power::disarm(&dir).map_err(|err| {
            SupervisorError::Refused(format!(
                "{}: clearing an unfinished power loss: {err}",
                dir.display()
            ))
        })?;
        // Ownership starts afresh with the domain: every volume at its home
        // controller, addresses as this configuration says.
        match std::fs::remove_file(dir.join(controllers::ownership::OWNERSHIP_FILE)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("reset the ownership file")(err))
            }
            _ => {}
        }
        for cluster in 0..2 {
            let dir = run.cluster(crate::domain::ClusterName {
                system: index,
                cluster,
            });
            std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        }
    }
    Ok(domain)
}

/// Writes a new random API token, readable by its owner only.
fn write_token(path: &Path) -> Result<(), SupervisorError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut random))
        .map_err(io("read /dev/urandom"))?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("create {}", path.display())))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(io(format!("write {}", path.display())))
}

/// Starts the supervisor daemon for the prepared `run` (in a process group
/// of its own, so a Ctrl-C in the terminal of `up` is up's to handle).
pub fn start_daemon(run: &RunDir) -> Result<std::process::Child, SupervisorError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(io("find the emulator binary"))?;
    let log =
        std::fs::File::create(run.supervisor_log()).map_err(io("create the supervisor's log"))?;
    let log_err = log.try_clone().map_err(io("open the supervisor's log"))?;
    std::process::Command::new(exe)
        .arg("supervise")
        .arg("--run-dir")
        .arg(run.root())
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(io("start the supervisor"))
}

/// Waits until every driver listens for its agents and every agent of every
/// configured pair is registered with its server and has reported; returns
/// each server's view of the domain.
pub fn wait_ready(
    run: &RunDir,
    domain: &Domain,
    daemon: &mut std::process::Child,
) -> Result<Vec<(Pair, serde_json::Value)>, SupervisorError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let expected: usize = domain.systems.len() * 2;
    loop {
        if let Some(status) = daemon.try_wait().map_err(io("watch the supervisor"))? {
            let log = std::fs::read_to_string(run.supervisor_log()).unwrap_or_default();
            return Err(SupervisorError::Refused(format!(
                "the supervisor exited ({status}) before the domain was up; its log ({}):\n{}",
                run.supervisor_log().display(),
                log.lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        }
        // A process that ended during start-up will not register: say which
        // and why (its log's last lines), rather than waiting out the timeout.
        if let Some(ended) = run.read_processes().into_iter().find(|p| p.ended.is_some()) {
            let log = std::fs::read_to_string(&ended.log).unwrap_or_default();
            return Err(SupervisorError::Refused(format!(
                "{} {} during start-up; the end of its log ({}):\n{}",
                ended.name,
                ended.ended.as_deref().unwrap_or("ended"),
                ended.log.display(),
                log.lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        }
        // Every driver is listening for its agents: it binds that socket
        // only once it has opened its array (after a power loss that
        // includes resyncing it), bound its NBD address and stored fresh
        // state. Until then agents may report what persistent data kept from
        // before, which says nothing of what runs now.
        let drivers_up = domain.clusters().all(|cluster| {
            std::os::unix::net::UnixStream::connect(run.driver_socket(cluster)).is_ok()
        });
        let mut views = Vec::new();
        for pair in domain.pairs().into_iter().filter(|_| drivers_up) {
            let Ok(client) = Client::new(run, pair) else {
                break;
            };
            let Ok(view) = client.get::<serde_json::Value>("/api/v1/domain") else {
                break;
            };
            let reported = view["agents"]
                .as_array()
                .map(|agents| {
                    agents
                        .iter()
                        .filter(|a| a["state"] == "registered" && !a["revision"].is_null())
                        .count()
                })
                .unwrap_or(0);
            // And every volume is served at its owner's address (an agent
            // may report before the partner driver has bound its address).
            let served = view["systems"].as_array().is_some_and(|systems| {
                systems.iter().all(|system| {
                    system["volumes"].as_array().is_some_and(|volumes| {
                        volumes.iter().all(|volume| {
                            volume["path"] == "optimized"
                                && !volume["uri"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .starts_with("nbd:///")
                        })
                    })
                })
            });
            if reported < expected || !served {
                break;
            }
            views.push((pair, view));
        }
        if views.len() == domain.pairs().len() {
            return Ok(views);
        }
        if Instant::now() >= deadline {
            return Err(SupervisorError::Refused(format!(
                "the domain did not come up within {} s (not every agent registered and reported, \
                 or not every volume served by its owner); see the logs in {}",
                READY_TIMEOUT.as_secs(),
                run.root().join("logs").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the domain running in `run`: SIGTERM to its supervisor, which stops
/// every process in order; waits for it. False if none was running.
pub fn down(run: &RunDir) -> Result<bool, SupervisorError> {
    let Some(pid) = running_supervisor(run) else {
        return Ok(false);
    };
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT * 4;
    while liveness(pid.as_raw() as u32) != "gone" {
        if Instant::now() >= deadline {
            return Err(SupervisorError::Refused(format!(
                "the supervisor (pid {pid}) did not stop within {} s; see {}",
                (STOP_TIMEOUT * 4).as_secs(),
                run.supervisor_log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// Asks the supervisor of `run` to start process `name` again; its answer.
pub fn restart(run: &RunDir, name: &ProcessName) -> Result<String, SupervisorError> {
    ask(run, &format!("restart {name}"), Duration::from_secs(30))
}

/// Asks the supervisor of `run` to cut the power of system `system` and
/// bring it back (see `crate::fault` power-loss): the system's processes
/// killed, its disks rolled back from their undo logs, each block written
/// since its last flush lost when a draw from `seed` falls below `lose`, the
/// processes started again (`after_ms`: how long the caches were kept, for
/// the record). The fault log's record of it, which the supervisor wrote, as
/// JSON.
pub fn power_cut(
    run: &RunDir,
    system: usize,
    seed: u64,
    lose: f64,
    after_ms: u64,
) -> Result<String, SupervisorError> {
    ask(
        run,
        &format!("power-cut {system} {seed} {lose} {after_ms}"),
        POWER_CUT_TIMEOUT,
    )
}

/// How long a power cut may take (killing, rolling back, starting again).
const POWER_CUT_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request line to the supervisor of `run`; its answer.
fn ask(run: &RunDir, request: &str, timeout: Duration) -> Result<String, SupervisorError> {
    use std::io::{BufRead, Write};
    let socket = run.supervisor_socket();
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).map_err(|err| {
        SupervisorError::Refused(format!(
            "no domain is running in {} ({}: {err})",
            run.root().display(),
            socket.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("set a timeout"))?;
    writeln!(stream, "{request}").map_err(io("ask the supervisor"))?;
    let mut answer = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io("read the supervisor's answer"))?;
    let answer = answer.trim();
    match answer.strip_prefix("error: ") {
        Some(problem) => Err(SupervisorError::Refused(problem.to_string())),
        None => Ok(answer.strip_prefix("ok: ").unwrap_or(answer).to_string()),
    }
}

/// Every process of the domain, in start order (FIG. 2: drivers, servers,
/// agents).
fn processes(domain: &Domain) -> Vec<ProcessName> {
    let mut names: Vec<ProcessName> = domain
        .clusters()
        .map(|cluster| ProcessName {
            cluster: Some(cluster),
            role: Role::Driver,
        })
        .collect();
    for pair in domain.pairs() {
        let cluster = match domain.server(pair) {
            Some(Placement::Cluster(cluster)) => Some(cluster),
            _ => None,
        };
        names.push(ProcessName {
            cluster,
            role: Role::Server(pair),
        });
    }
    for cluster in domain.clusters() {
        for pair in domain.pairs() {
            names.push(ProcessName {
                cluster: Some(cluster),
                role: Role::Agent(pair),
            });
        }
    }
    names
}

/// The command line that runs process `name`.
fn arguments(run: &RunDir, name: &ProcessName) -> Vec<String> {
    let run_dir = run.root().display().to_string();
    match (name.role, name.cluster) {
        (Role::Driver, Some(cluster)) => vec![
            "driver".into(),
            "--run-dir".into(),
            run_dir,
            "--cluster".into(),
            cluster.to_string(),
        ],
        (Role::Agent(pair), Some(cluster)) => vec![
            "agent".into(),
            "--run-dir".into(),
            run_dir,
            "--cluster".into(),
            cluster.to_string(),
            "--pair".into(),
            pair.to_string(),
        ],
        _ => vec![
            "server".into(),
            "--run-dir".into(),
            run_dir,
            "--name".into(),
            name.to_string(),
        ],
    }
}

/// The supervisor daemon's state.
struct Supervisor {
    run: RunDir,
    domain: Domain,
    exe: PathBuf,
    table: BTreeMap<ProcessName, ProcessRecord>,
    exits: mpsc::UnboundedSender<(ProcessName, u32, String)>,
}

impl Supervisor {
    fn write_table(&self) {
        let records: Vec<&ProcessRecord> = self.table.values().collect();
        if let Ok(bytes) = serde_json::to_vec_pretty(&records) {
            if let Err(err) = RunDir::write_atomically(&self.run.processes(), &bytes) {
                tracing::warn!(%err, "cannot write the process table");
            }
        }
    }

    fn start(&mut self, name: ProcessName) -> Result<u32, SupervisorError> {
        let log_path = self.run.log(&name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("open {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io("open a log"))?;
        let mut child = tokio::process::Command::new(&self.exe)
            .args(arguments(&self.run, &name))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!("start {name}")))?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(process = %name, pid, "started");
        self.table.insert(
            name,
            ProcessRecord {
                name: name.to_string(),
                pid,
                log: log_path,
                started_ms: now_ms(),
                ended: None,
            },
        );
        self.write_table();
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let ended = match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(err) => format!("unknown ({err})"),
            };
            let _ = exits.send((name, pid, ended));
        });
        Ok(pid)
    }

    fn running(&self, name: &ProcessName) -> Option<u32> {
        self.table
            .get(name)
            .filter(|record| record.ended.is_none() && liveness(record.pid) != "gone")
            .map(|record| record.pid)
    }

    /// Stops the processes of `role` (any pair), SIGTERM then, after
    /// [`STOP_TIMEOUT`], SIGKILL.
    async fn stop_all(
        &mut self,
        exits: &mut mpsc::UnboundedReceiver<(ProcessName, u32, String)>,
        wanted: impl Fn(&Role) -> bool,
    ) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let targets = self.running_where(|name| wanted(&name.role));
        for (_, pid) in &targets {
            let pid = Pid::from_raw(*pid as i32);
            let _ = kill(pid, Signal::SIGTERM);
            // A stopped (hung) process handles SIGTERM once continued.
            let _ = kill(pid, Signal::SIGCONT);
        }
        if self.await_ends(exits, &targets).await {
            return;
        }
        for (name, pid) in &targets {
            if self.table[name].ended.is_none() {
                tracing::warn!(process = %name, "did not stop in time; killing it");
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        // The kills are certain; their exits are reaped by the waiting tasks.
        if let Ok(Some(exit)) = tokio::time::timeout(STOP_TIMEOUT, exits.recv()).await {
            self.ended(exit);
        }
    }

    /// Starts `names` in their order (FIG. 2A before 2B: a driver stores the
    /// configuration and state before agents come to read them, so the next
    /// process starts once the driver listens, or after
    /// [`DRIVER_START_TIMEOUT`]: the others retry anyway). A driver's socket
    /// left by one that was killed is removed first, so that its presence
    /// means the new one listens.
    async fn start_in_order(&mut self, names: &[ProcessName]) -> Result<(), SupervisorError> {
        for &name in names {
            let socket = match (name.role, name.cluster) {
                (Role::Driver, Some(cluster)) => Some(self.run.driver_socket(cluster)),
                _ => None,
            };
            if let Some(socket) = &socket {
                let _ = std::fs::remove_file(socket);
            }
            self.start(name)?;
            if let Some(socket) = socket {
                let deadline = Instant::now() + DRIVER_START_TIMEOUT;
                while !socket.exists() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Ok(())
    }

    /// The processes running now that `wanted` picks, with their pids.
    fn running_where(&self, wanted: impl Fn(&ProcessName) -> bool) -> Vec<(ProcessName, u32)> {
        self.table
            .iter()
            .filter(|(name, record)| wanted(name) && record.ended.is_none())
            .map(|(name, record)| (*name, record.pid))
            .collect()
    }

    /// Notes exits until every one of `targets` ended (true), or for
    /// [`STOP_TIMEOUT`] (false).
    async fn await_ends(
        &mut self,
        exits: &mut mpsc::UnboundedReceiver<(ProcessName, u32, String)>,
        targets: &[(ProcessName, u32)],
    ) -> bool {
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while targets
            .iter()
            .any(|(name, _)| self.table[name].ended.is_none())
        {
            match tokio::time::timeout_at(deadline, exits.recv()).await {
                Ok(Some(exit)) => self.ended(exit),
                _ => return false,
            }
        }
        true
    }

    fn ended(&mut self, (name, pid, ended): (ProcessName, u32, String)) {
        tracing::info!(process = %name, pid, %ended, "ended");
        if let Some(record) = self.table.get_mut(&name) {
            if record.pid == pid {
                record.ended = Some(ended);
            }
        }
        self.write_table();
    }

    fn control(&mut self, line: &str) -> String {
        let Some(name) = line.strip_prefix("restart ") else {
            return format!("error: unknown request {line:?} (restart NAME)");
        };
        let name = match ProcessName::parse(name.trim()) {
            Ok(name) => name,
            Err(problem) => return format!("error: {problem}"),
        };
        if !processes(&self.domain).contains(&name) {
            return format!("error: {name} is not a process of this domain");
        }
        if let Some(pid) = self.running(&name) {
            return format!("error: {name} is running (pid {pid}); kill it first to restart it");
        }
        match self.start(name) {
            Ok(pid) => format!("ok: {name} started again (pid {pid})"),
            Err(err) => format!("error: {err}"),
        }
    }
}

impl Supervisor {
    /// A power cut of one system: `args` are its index, the seed, the share
    /// lost and how long the caches were kept (see [`power_cut`]). Logged
    /// in the fault log here. The answer line.
    async fn power_cut(
        &mut self,
        exits: &mut mpsc::UnboundedReceiver<(ProcessName, u32, String)>,
        args: &str,
    ) -> String {
        let parsed = match args.split_whitespace().collect::<Vec<_>>()[..] {
            [system, seed, lose, after_ms] => system
                .parse::<usize>()
                .ok()
                .zip(seed.parse::<u64>().ok())
                .zip(lose.parse::<f64>().ok())
                .zip(after_ms.parse::<u64>().ok()),
            _ => None,
        };
        let Some((((system, seed), lose), after_ms)) = parsed else {
            return format!("error: power-cut SYSTEM SEED LOSE AFTER_MS, not {args:?}");
        };
        if system >= self.domain.systems.len() {
            return format!("error: the domain has no system s{system}");
        }
        let on_system = |name: &ProcessName| name.cluster.is_some_and(|c| c.system == system);
        // The power goes: every process of the system at once.
        let targets = self.running_where(on_system);
        for (_, pid) in &targets {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !self.await_ends(exits, &targets).await {
            return format!(
                "error: the processes of s{system} did not die within {} s of SIGKILL",
                STOP_TIMEOUT.as_secs()
            );
        }
        let killed: Vec<String> = targets
            .iter()
            .map(|(name, pid)| format!("{name} (pid {pid})"))
            .collect();
        tracing::warn!(system, processes = killed.len(), "power cut");
        // The disks lose what their caches held. What went wrong with them:
        // the power comes back all the same (a system left off helps
        // nobody), and the answer says it.
        let crate::fault::power::DisksCut {
            unflushed,
            lost,
            per_disk: disks,
            problems,
        } = crate::fault::power::roll_back_disks(&self.run.disks(system), seed, lose);
        // The power comes back: every process of the system, in order.
        let names: Vec<ProcessName> = processes(&self.domain)
            .into_iter()
            .filter(on_system)
            .collect();
        if let Err(err) = self.start_in_order(&names).await {
            return format!("error: starting s{system} again after the power cut: {err}");
        }
        let started = names.len();
        let mut effect = format!(
            "power cut to s{system}: SIGKILL to {}; the disks' caches lost {lost} of the {unflushed} \
             blocks written since their last flush ({}; lose {lose}, seed {seed}); power back: {started} processes \
             started again",
            if killed.is_empty() { "no process (none was running)".to_string() } else { killed.join(", ") },
            if disks.is_empty() { "lost, of written, per disk: none".to_string() } else { format!("lost of written: {}", disks.join(", ")) },
        );
        if !problems.is_empty() {
            effect = format!("{effect}; but: {}", problems.join("; "));
        }
        // Logged here: the process that asked may have lost power with the
        // system (a server on one of its clusters).
        let spec = crate::fault::FaultSpec::PowerLoss(crate::fault::PowerFault {
            system: Some(format!("s{system}")),
            after_ms: Some(after_ms),
            lose: Some(lose),
        });
        match crate::fault::log_power_loss(&self.run, spec, effect.clone()) {
            Ok(record) if problems.is_empty() => match serde_json::to_string(&record) {
                Ok(json) => format!("ok: {json}"),
                Err(err) => format!("error: {effect} (answer: {err})"),
            },
            Ok(_) => format!("error: {effect}"),
            Err(err) => format!("error: {effect} (not logged: {err})"),
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited {code}"),
        (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        _ => "ended".into(),
    }
}

/// The supervisor daemon: starts the domain in `run`, then serves restarts
/// until SIGTERM or SIGINT, when it stops every process in order.
pub fn supervise(run: &RunDir) -> Result<(), SupervisorError> {
    let domain = Domain::load(&run.config())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("start the runtime"))?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
        let mut terminate = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
        let pid_file = serde_json::to_vec(&SupervisorFile {
            pid: std::process::id(),
            identity: disk_images::process::my_identity().ok(),
            boot: disk_images::intent::this_boot(),
        })
        .map_err(|err| io("write the pid file")(err.into()))?;
        RunDir::write_atomically(&run.supervisor(), &pid_file).map_err(io("write the pid file"))?;
        let socket = run.supervisor_socket();
        let _ = std::fs::remove_file(&socket);
        let control = UnixListener::bind(&socket).map_err(io(format!("listen on {}", socket.display())))?;
        let (exits, mut exit_events) = mpsc::unbounded_channel();
        let mut supervisor = Supervisor {
            run: run.clone(),
            domain: domain.clone(),
            exe: std::env::current_exe().map_err(io("find the emulator binary"))?,
            table: BTreeMap::new(),
            exits,
        };
        let names = processes(&domain);
        supervisor.start_in_order(&names).await?;
        tracing::info!(processes = names.len(), "domain started");
        loop {
            tokio::select! {
                _ = interrupt.recv() => { tracing::info!("SIGINT received"); break; }
                _ = terminate.recv() => { tracing::info!("SIGTERM received"); break; }
                Some(exit) = exit_events.recv() => supervisor.ended(exit),
                accepted = control.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (reader, mut writer) = stream.into_split();
                    let mut line = String::new();
                    let mut reader = BufReader::new(reader);
                    if tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await.is_ok() {
                        let answer = match line.trim().strip_prefix("power-cut ") {
                            Some(args) => supervisor.power_cut(&mut exit_events, args).await,
                            None => supervisor.control(line.trim()),
                        };
                        let _ = writer.write_all(format!("{answer}\n").as_bytes()).await;
                    }
                }
            }
        }
        // In order: agents, then servers, then drivers (which flush what
        // their NBD clients wrote).
        supervisor
            .stop_all(&mut exit_events, |role| matches!(role, Role::Agent(_)))
            .await;
        supervisor
            .stop_all(&mut exit_events, |role| matches!(role, Role::Server(_)))
            .await;
        supervisor
            .stop_all(&mut exit_events, |role| *role == Role::Driver)
            .await;
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(run.supervisor());
        tracing::info!("domain stopped");
        Ok(())
    })
}
