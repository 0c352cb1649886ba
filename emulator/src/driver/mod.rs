//! A cluster's driver process (its controller, seed 002): it owns the
//! cluster's view of the server system's disks (the array both clusters
//! share), serves the volumes over NBD, executes the tasks its agents bring,
//! and notices every change of configuration and state: it stores it in the
//! cluster's persistent data and broadcasts it to the active agents (FIG. 3).
//!
//! - Start-up (FIG. 2A): collect the configuration and state, store them, then
//!   listen for agents and NBD clients.
//! - Changes: every [`WATCH_INTERVAL`] the driver collects again (the array's
//!   metadata, re-read when its live generation moves, and any rebuild or scrub
//!   under way); a new revision in persistent data is broadcast as `Changed`.
//! - Tasks (FIG. 4): an agent records a task with its own identity and sends
//!   `Execute`; the driver runs it ([`tasks`]), stores its end (with failure
//!   information) and notifies the agent that persistent data names.

mod controller;
mod paths;
mod tasks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controllers::array::Array;
use controllers::ownership::{Ownership, OwnershipError};
use controllers::raid::MemberState;
use controllers::volume::Volumes;
use futures_util::SinkExt;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::domain::{ClusterName, Domain, ProcessName, Role};
use crate::link::{self, Link, ToAgentFromDriver, ToDriver, HEARTBEAT, PROTOCOL_VERSION};
use crate::nbd::server;
use crate::persist::{
    ArraySummary, ClusterState, Device, DeviceRole, DeviceState, Operation, Persist, PersistError,
    VolumeInfo,
};
use crate::rundir::RunDir;

/// How often the driver looks for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// Messages queued for one agent before the driver stops waiting for it.
const AGENT_QUEUE: usize = 64;

/// Why a driver could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The array.
    #[error(transparent)]
    Array(#[from] controllers::array::ArrayError),
    /// Persistent data.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The NBD listener.
    #[error("NBD listener: {0}")]
    Nbd(#[from] server::BindError),
    /// The ownership file.
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// A socket or file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let what = what.into();
    move |source| DriverError::Io { what, source }
}

/// The running driver, shared by its tasks.
struct Driver {
    cluster: ClusterName,
    disks: PathBuf,
    /// Volume ownership between this system's two controllers.
    ownership: Arc<Ownership>,
    array: Mutex<Array>,
    persist: Mutex<Persist>,
    /// The agents connected now, by name, each with the number of its link
    /// (an agent that reconnects before its old link is noticed gone must not
    /// be dropped when the old one is).
    agents: tokio::sync::Mutex<HashMap<ProcessName, (u64, mpsc::Sender<ToAgentFromDriver>)>>,
    /// Numbers the agents' links.
    links: AtomicU64,
    /// The revision of the configuration and state last stored.
    revision: AtomicU64,
    /// The moving-average rate of each rebuild or scrub under way.
    rates: Mutex<HashMap<String, Rate>>,
    /// Tasks this driver is executing now (an `Execute` repeated, or a queued
    /// task caught up on, never runs one twice).
    executing: Mutex<std::collections::HashSet<String>>,
    /// When this run of the driver started (tasks created before are
    /// `tasks::resume`'s).
    started_ms: u64,
}

/// A moving average of a task's rate, sampled at each collection: what ETAs
/// are computed from (an average since the start would lag every change of
/// pace, a single sample would jump).
pub(crate) struct Rate {
    at: std::time::Instant,
    bytes: u64,
    mib_per_s: f64,
}

impl Rate {
    /// How much each sample weighs.
    const WEIGHT: f64 = 0.3;

    /// Starts at `bytes` done, with `mib_per_s` as the first estimate.
    pub(crate) fn new(bytes: u64, mib_per_s: f64) -> Self {
        Self {
            at: std::time::Instant::now(),
            bytes,
            mib_per_s: mib_per_s.max(0.0),
        }
    }

    /// Takes a sample (`bytes` done now); the average, MiB/s.
    pub(crate) fn sample(&mut self, bytes: u64) -> f64 {
        self.sample_at(bytes, std::time::Instant::now())
    }

    fn sample_at(&mut self, bytes: u64, at: std::time::Instant) -> f64 {
        let seconds = at.saturating_duration_since(self.at).as_secs_f64();
        if seconds >= 0.05 {
            let now = bytes.saturating_sub(self.bytes) as f64 / 1048576.0 / seconds;
            self.mib_per_s = Self::WEIGHT * now + (1.0 - Self::WEIGHT) * self.mib_per_s;
            self.at = at;
            self.bytes = bytes;
        }
        self.mib_per_s
    }
}

/// Runs the driver of `cluster` until SIGTERM or SIGINT.
pub fn run(run: &RunDir, domain: &Domain, cluster: ClusterName) -> Result<(), DriverError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("start the runtime"))?;
    runtime.block_on(serve(run.clone(), domain.clone(), cluster))
}

async fn serve(run: RunDir, domain: Domain, cluster: ClusterName) -> Result<(), DriverError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let started_ms = crate::persist::now_ms();
    let disks = run.disks(cluster.system);
    let array = Array::open(&disks)?;
    let engine = Arc::clone(array.engine());
    let volumes = Volumes::new(&disks, Arc::clone(&engine));
    std::fs::create_dir_all(run.cluster(cluster)).map_err(io("create the cluster directory"))?;
    let persist = Persist::open(&run.persist(cluster))?;
    // Join as controller cM of the system and take this controller's volumes
    // (their address is bound by the first step, unless the partner holds
    // them since a failover and has to hand them back first).
    let ownership = Arc::new(Ownership::open(&disks)?);
    ownership.join(cluster.cluster as u8)?;
    let stop_heartbeat = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heartbeat = {
        let (ownership, stop) = (Arc::clone(&ownership), Arc::clone(&stop_heartbeat));
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || paths::heartbeat(ownership, cluster, stop))
            .map_err(io("start the heartbeat thread"))?
    };
    // The hosts' links to each controller address of this system, as the
    // link book has them (this driver may serve either address).
    let hooks = paths::link_hooks(&run, cluster);
    let mut paths = paths::Paths::new(
        cluster,
        Arc::clone(&ownership),
        Arc::clone(&volumes),
        format!("127.0.0.1:{}", domain.nbd_port(cluster)),
        hooks,
    );
    paths.step().await;
    if let Some(problem) = paths.own_bind_error() {
        // At start-up that is another program on the port: say so and stop.
        return Err(DriverError::Io {
            what: "serve NBD".into(),
            source: std::io::Error::other(problem.to_string()),
        });
    }
    let driver = Arc::new(Driver {
        cluster,
        disks,
        ownership: Arc::clone(&ownership),
        array: Mutex::new(array),
        persist: Mutex::new(persist),
        agents: tokio::sync::Mutex::new(HashMap::new()),
        links: AtomicU64::new(0),
        revision: AtomicU64::new(0),
        rates: Mutex::new(HashMap::new()),
        executing: Mutex::new(std::collections::HashSet::new()),
        started_ms,
    });
    // FIG. 2A: collect and store before anyone asks.
    let revision = Arc::clone(&driver)
        .collect_and_store()
        .await?
        .unwrap_or_default();
    tracing::info!(cluster = %cluster, revision, nbd = %driver.nbd_address(), "configuration and state stored");
    let socket = run.driver_socket(cluster);
    let _ = std::fs::remove_file(&socket);
    let agents =
        UnixListener::bind(&socket).map_err(io(format!("listen on {}", socket.display())))?;
    let (stop_nbd, mut nbd_stopped) = tokio::sync::oneshot::channel::<()>();
    let nbd_task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(paths::TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => paths.step().await,
                _ = &mut nbd_stopped => break,
            }
        }
        paths.stop_all().await;
    });
    let accept = tokio::spawn(accept_agents(Arc::clone(&driver), agents));
    let watch = tokio::spawn(watch(Arc::clone(&driver)));
    // Seed 004: this driver is controller cM of its system.
    let stop_controller = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let notices = {
        let (own, peers) = (run.clone(), run.clone());
        let system = cluster.system;
        controller::Notices::bind(
            move |kind| own.notice_socket(cluster, kind.name()),
            move |id, kind| {
                peers.notice_socket(
                    ClusterName {
                        system,
                        cluster: usize::from(id),
                    },
                    kind.name(),
                )
            },
        )
        .map_err(io("bind the notice sockets"))?
    };
    let controller = {
        let (disks, stop) = (driver.disks.clone(), Arc::clone(&stop_controller));
        let auto_rebuild = domain.systems[cluster.system].auto_rebuild;
        let notices = Arc::new(notices);
        std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || {
                controller::run(
                    disks,
                    engine,
                    cluster.cluster as u8,
                    auto_rebuild,
                    notices,
                    stop,
                )
            })
            .map_err(io("start the controller thread"))?
    };
    // Tasks this driver was executing when it last stopped.
    tokio::spawn(tasks::resume(Arc::clone(&driver), started_ms));
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
    accept.abort();
    watch.abort();
    stop_controller.store(true, std::sync::atomic::Ordering::Release);
    let _ = tokio::task::spawn_blocking(move || controller.join()).await;
    let _ = stop_nbd.send(());
    let _ = nbd_task.await;
    // A clean stop: the partner may take this controller's volumes at once.
    stop_heartbeat.store(true, std::sync::atomic::Ordering::Release);
    let _ = heartbeat.join();
    ownership.leave(cluster.cluster as u8)?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

impl Driver {
    /// This controller's host-facing NBD address (empty until bound once).
    fn nbd_address(&self) -> String {
        self.ownership
            .record(self.cluster.cluster as u8)
            .ok()
            .and_then(|record| record.address)
            .unwrap_or_default()
    }

    /// Collects the configuration and state, stores them, and returns the new
    /// revision when it moved (None: unchanged).
    async fn collect_and_store(self: Arc<Self>) -> Result<Option<u64>, DriverError> {
        let driver = Arc::clone(&self);
        let stored = tokio::task::spawn_blocking(move || -> Result<u64, DriverError> {
            let state = driver.collect()?;
            let revision = driver
                .persist
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .store_state(&state)?;
            Ok(revision)
        })
        .await
        .map_err(|err| io("collect the state")(std::io::Error::other(err)))??;
        let before = self.revision.swap(stored, Ordering::AcqRel);
        Ok((before != stored).then_some(stored))
    }

    /// The cluster's configuration and state now.
    fn collect(&self) -> Result<ClusterState, DriverError> {
        let status = self
            .array
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .status()?;
        let mut devices: Vec<Device> = status
            .members
            .iter()
            .enumerate()
            .map(|(index, member)| Device {
                index,
                file: member.file.clone(),
                role: DeviceRole::Member,
                state: match member.state {
                    MemberState::Active => DeviceState::Available,
                    MemberState::Failed => DeviceState::Unavailable,
                    MemberState::Rebuilding => DeviceState::Rebuilding,
                },
            })
            .collect();
        devices.extend(status.spares.iter().enumerate().map(|(i, file)| Device {
            index: status.members.len() + i,
            file: file.clone(),
            role: DeviceRole::Spare,
            state: DeviceState::Available,
        }));
        let round = |value: f64| (value * 10.0).round() / 10.0;
        let mut rates = self
            .rates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let operations: Vec<Operation> = crate::controller::in_progress(&self.disks)
            .into_iter()
            .map(|task| {
                let kind = task.operation.name().to_string();
                let rate = rates
                    .entry(kind.clone())
                    .or_insert_with(|| Rate::new(task.bytes_done, task.mib_per_s));
                let mib_per_s = rate.sample(task.bytes_done);
                let running = task.control == controllers::coordination::Control::Run;
                let left_mib = task.bytes_total.saturating_sub(task.bytes_done) as f64 / 1048576.0;
                Operation {
                    kind,
                    control: format!("{:?}", task.control).to_lowercase(),
                    percent: round(task.percent.clamp(0.0, 100.0)),
                    mib_per_s: round(mib_per_s),
                    eta_s: (running && mib_per_s > 0.0)
                        .then(|| (left_mib / mib_per_s).max(0.0).round()),
                    rate_limit_mib_s: task.rate_limit_mib_s,
                }
            })
            .collect();
        rates.retain(|kind, _| operations.iter().any(|o| &o.kind == kind));
        drop(rates);
        Ok(ClusterState {
            cluster: self.cluster.to_string(),
            driver_pid: std::process::id(),
            nbd_address: self.nbd_address(),
            devices,
            array: ArraySummary {
                level: status.geometry.level,
                state: status.state,
                members: status.members.len(),
                spares: status.spares.len(),
                disk_bytes: status.geometry.disk_bytes,
                chunk_bytes: status.geometry.chunk_bytes,
                data_bytes: status.data_bytes,
            },
            volumes: status
                .volumes
                .iter()
                .map(|volume| self.volume_info(volume))
                .collect(),
            operations,
        })
    }

    /// A volume as hosts see it: its home address, who serves it now, and the
    /// state of its path.
    fn volume_info(&self, volume: &controllers::array::VolumeRecord) -> VolumeInfo {
        let name = |controller: u8| {
            ClusterName {
                system: self.cluster.system,
                cluster: usize::from(controller),
            }
            .to_string()
        };
        let (address, serving, state) = match self.ownership.record(volume.owner) {
            Ok(record) => (
                record.address.unwrap_or_default(),
                record.serving,
                paths::path_state(record.health, record.serving, volume.owner),
            ),
            Err(_) => (String::new(), None, "offline"),
        };
        VolumeInfo {
            name: volume.name.clone(),
            size: volume.size,
            uri: format!("nbd://{address}/{}", volume.name),
            home: Some(name(volume.owner)),
            owner: serving.map(name),
            path: Some(state.to_string()),
        }
    }

    /// Sends `message` to every active agent (FIG. 3, block 304).
    async fn broadcast(&self, message: ToAgentFromDriver) {
        let agents = self.agents.lock().await;
        for (name, (_, agent)) in agents.iter() {
            if agent.try_send(message.clone()).is_err() {
                tracing::warn!(agent = %name, "agent not keeping up; a change notice was dropped");
            }
        }
    }

    /// Sends `message` to agent `name`, if it is connected.
    async fn notify(&self, name: &ProcessName, message: ToAgentFromDriver) -> bool {
        let agent = self.agents.lock().await.get(name).map(|(_, tx)| tx.clone());
        match agent {
            Some(agent) => agent.send(message).await.is_ok(),
            None => false,
        }
    }

    /// Collects, stores and, when something changed, broadcasts.
    async fn refresh(self: &Arc<Self>) {
        match Arc::clone(self).collect_and_store().await {
            Ok(Some(revision)) => {
                tracing::info!(revision, "configuration or state changed");
                self.broadcast(ToAgentFromDriver::Changed { revision })
                    .await;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(%err, "cannot collect the configuration and state"),
        }
    }
}

/// FIG. 3: notices changes, stores them, broadcasts them.
async fn watch(driver: Arc<Driver>) {
    let mut ticks = tokio::time::interval(WATCH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        driver.refresh().await;
    }
}

async fn accept_agents(driver: Arc<Driver>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(agent_link(Arc::clone(&driver), Link::new(stream)));
            }
            Err(err) => {
                tracing::warn!(%err, "accepting an agent failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One agent's link: its hello, then its requests, change notices and
/// heartbeats, until it goes.
async fn agent_link(driver: Arc<Driver>, mut link: Link<tokio::net::UnixStream>) {
    let agent = match link.receive::<ToDriver>().await {
        Ok(ToDriver::Hello { version, agent }) if version == PROTOCOL_VERSION => agent,
        Ok(ToDriver::Hello { version, .. }) => {
            let refused =
                format!("this driver speaks version {PROTOCOL_VERSION}, the agent {version}");
            let _ = link
                .send(&ToAgentFromDriver::Welcome {
                    refused: Some(refused),
                })
                .await;
            return;
        }
        Ok(other) => {
            tracing::warn!(?other, "an agent spoke before saying hello");
            return;
        }
        Err(err) => {
            tracing::debug!(%err, "an agent went before saying hello");
            return;
        }
    };
    let expected = matches!(agent.role, Role::Agent(_)) && agent.cluster == Some(driver.cluster);
    if !expected {
        let _ = link
            .send(&ToAgentFromDriver::Welcome {
                refused: Some(format!("{agent} is not an agent of {}", driver.cluster)),
            })
            .await;
        return;
    }
    if link
        .send(&ToAgentFromDriver::Welcome { refused: None })
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(%agent, "agent connected");
    let (tx, mut rx) = mpsc::channel(AGENT_QUEUE);
    let number = driver.links.fetch_add(1, Ordering::Relaxed);
    driver
        .agents
        .lock()
        .await
        .insert(agent, (number, tx.clone()));
    // What became of the tasks it issued while it was away.
    tokio::spawn(tasks::catch_up(Arc::clone(&driver), agent, tx));
    let (mut sink, mut stream) = link.split();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut silence = link::Silence::new();
    let outcome: Result<(), link::LinkError> = async {
        loop {
            tokio::select! {
                message = link::receive_from::<_, ToDriver>(&mut stream) => match silence.hear(message)? {
                    ToDriver::Execute { id } => {
                        tokio::spawn(tasks::execute(Arc::clone(&driver), id));
                    }
                    ToDriver::Heartbeat => {}
                    ToDriver::Hello { .. } => tracing::warn!(%agent, "a second hello ignored"),
                },
                Some(message) = rx.recv() => sink.send(link::encode(&message)?).await?,
                _ = heartbeat.tick() => {
                    silence.check()?;
                    sink.send(link::encode(&ToAgentFromDriver::Heartbeat)?).await?
                }
            }
        }
    }
    .await;
    if let Err(err) = outcome {
        tracing::info!(%agent, %err, "agent gone");
    }
    let mut agents = driver.agents.lock().await;
    if agents.get(&agent).is_some_and(|(now, _)| *now == number) {
        agents.remove(&agent);
    }
}

#[cfg(test)]
mod tests {
    use super::Rate;
    use std::time::{Duration, Instant};

    #[test]
    fn the_rate_follows_changes_of_pace_and_never_goes_negative() {
        let start = Instant::now();
        let mut rate = Rate::new(0, 0.0);
        rate.at = start;
        let mib = 1u64 << 20;
        let mut bytes = 0;
        let mut at = start;
        for _ in 0..20 {
            at += Duration::from_millis(200);
            bytes += 20 * mib; // 100 MiB/s
            rate.sample_at(bytes, at);
        }
        let steady = rate.sample_at(bytes, at);
        assert!((steady - 100.0).abs() < 1.0, "{steady}");
        for _ in 0..20 {
            at += Duration::from_millis(200);
            bytes += 2 * mib; // slowed to 10 MiB/s
            rate.sample_at(bytes, at);
        }
        let slowed = rate.sample_at(bytes, at);
        assert!((slowed - 10.0).abs() < 1.0, "{slowed}");
        // A counter that went back (a new task) never makes it negative.
        at += Duration::from_millis(200);
        assert!(rate.sample_at(0, at) >= 0.0);
    }
}
