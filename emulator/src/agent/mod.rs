//! An agent process (seed 002): agent A of a cluster registers with server A,
//! agent B with server B, and each carries its server's tasks to the
//! cluster's driver and the cluster's configuration and state back.
//!
//! - Registration (FIG. 2B–2C): connect to the server, register, and once
//!   registered read the configuration and state from persistent data and
//!   send them. Failed attempts are retried with backoff, up to
//!   [`REGISTER_ATTEMPTS`] times; after that the agent waits for the server to
//!   publish a new address in the run directory (it came back) and tries again.
//!   A server that goes away later is re-registered with the same way.
//! - Changes (FIG. 3): on the driver's broadcast, read the configuration and
//!   state back from persistent data and send them to the server.
//! - Tasks (FIG. 4): store the task with this agent's identity in persistent
//!   data, have the driver execute it, and when the driver says it moved on,
//!   read it (with failure information) from persistent data and send it to
//!   the server.
//!
//! The two links (driver, server) live apart: losing one never stops the
//! other, and each is re-established on its own.
//!
//! The link to the server goes through its fault layer (`link::shape`),
//! which follows the link book for this agent's link (`s0/c1/agent-a`): a
//! cut closes it and holds registration back until it is cleared (no
//! attempt counts while it stands), a delay holds every message back. The
//! link to the driver goes through one too (`s0/c1/agent-a/driver`): a cut
//! closes it and the agent connects again once it is cleared; tasks handed
//! to the agent meanwhile wait for it, queued.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::sync::mpsc;

use crate::domain::{ClusterName, Pair, ProcessName, Role};
use crate::link::book::LinkState;
use crate::link::shape::{self, Shaped};
use crate::link::{
    self, Link, LinkError, Silence, ToAgent, ToAgentFromDriver, ToDriver, ToServer, HEARTBEAT,
    PROTOCOL_VERSION,
};
use crate::persist::{now_ms, Persist, PersistError, TaskRecord, TaskState};
use crate::rundir::RunDir;

/// Registration attempts before the agent waits for its server to come back.
pub const REGISTER_ATTEMPTS: u32 = 20;
/// First and longest pause between attempts to reach a peer.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often an agent that gave up looks for its server's new address.
const COMEBACK_POLL: Duration = Duration::from_millis(250);

/// Why an agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Persistent data.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The runtime or a signal handler.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the driver side tells the server side.
#[derive(Debug)]
enum FromDriver {
    /// The configuration or state changed.
    Changed,
    /// A task this agent issued moved on.
    TaskChanged(String),
}

struct Agent {
    me: ProcessName,
    run: RunDir,
    pair: Pair,
    cluster: ClusterName,
    persist: Mutex<Persist>,
    /// The link faults standing on this agent's link to its server.
    link: tokio::sync::watch::Receiver<LinkState>,
    /// The link faults standing on this agent's link to its driver.
    driver_link: tokio::sync::watch::Receiver<LinkState>,
}

impl Agent {
    async fn with_persist<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&mut Persist) -> Result<T, PersistError> + Send + 'static,
    ) -> Result<T, PersistError> {
        let agent = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            work(
                &mut agent
                    .persist
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            )
        })
        .await
        .unwrap_or_else(|err| panic!("persistent data access panicked: {err}"))
    }
}

/// Runs agent `pair` of `cluster` until SIGTERM or SIGINT.
pub fn run(run: &RunDir, cluster: ClusterName, pair: Pair) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let me = ProcessName {
            cluster: Some(cluster),
            role: Role::Agent(pair),
        };
        let [link, driver_link]: [_; 2] =
            crate::link::book::watch(run.root(), &[me.to_string(), format!("{me}/driver")])
                .try_into()
                .expect("two links watched");
        let agent = Arc::new(Agent {
            me,
            run: run.clone(),
            pair,
            cluster,
            persist: Mutex::new(Persist::open(&run.persist(cluster))?),
            link,
            driver_link,
        });
        let (to_driver, from_server) = mpsc::channel::<ToDriver>(64);
        let (to_server, from_driver) = mpsc::channel::<FromDriver>(64);
        let driver_side = tokio::spawn(driver_side(Arc::clone(&agent), from_server, to_server));
        let server_side = tokio::spawn(server_side(Arc::clone(&agent), from_driver, to_driver));
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
        driver_side.abort();
        server_side.abort();
        Ok(())
    })
}

/// Pauses between attempts, doubling up to [`BACKOFF_MAX`].
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(BACKOFF_FIRST)
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
    }
}

/// Keeps the link to the driver: connects (retrying), forwards `Execute`
/// requests, and passes the driver's notices to the server side.
async fn driver_side(
    agent: Arc<Agent>,
    mut requests: mpsc::Receiver<ToDriver>,
    notices: mpsc::Sender<FromDriver>,
) {
    let socket = agent.run.driver_socket(agent.cluster);
    loop {
        let mut backoff = Backoff::new();
        let link = loop {
            match connect_driver(&agent, &socket).await {
                Ok(link) => break link,
                Err(err) => {
                    tracing::debug!(%err, "driver not reachable yet");
                    backoff.wait().await;
                }
            }
        };
        tracing::info!("connected to the driver");
        // Whatever changed while we were apart.
        let _ = notices.send(FromDriver::Changed).await;
        let (mut sink, mut stream) = link.split();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut silence = Silence::new();
        let outcome: Result<(), LinkError> = async {
            loop {
                tokio::select! {
                    message = link::receive_from::<_, ToAgentFromDriver>(&mut stream) => match silence.hear(message)? {
                        ToAgentFromDriver::Changed { .. } => { let _ = notices.send(FromDriver::Changed).await; }
                        ToAgentFromDriver::TaskChanged { id } => { let _ = notices.send(FromDriver::TaskChanged(id)).await; }
                        ToAgentFromDriver::Heartbeat | ToAgentFromDriver::Welcome { .. } => {}
                    },
                    Some(request) = requests.recv() => sink.send(link::encode(&request)?).await?,
                    _ = heartbeat.tick() => {
                        silence.check()?;
                        sink.send(link::encode(&ToDriver::Heartbeat)?).await?
                    }
                }
            }
        }
        .await;
        if let Err(err) = outcome {
            tracing::warn!(%err, "lost the driver; reconnecting");
        }
    }
}

async fn connect_driver(
    agent: &Agent,
    socket: &std::path::Path,
) -> Result<Link<Shaped>, LinkError> {
    let mut link = Link::new(shape::connect(socket, agent.driver_link.clone()).await?);
    link.send(&ToDriver::Hello {
        version: PROTOCOL_VERSION,
        agent: agent.me,
    })
    .await?;
    match link.receive::<ToAgentFromDriver>().await? {
        ToAgentFromDriver::Welcome { refused: None } => Ok(link),
        ToAgentFromDriver::Welcome {
            refused: Some(reason),
        } => Err(LinkError::Io(std::io::Error::other(reason))),
        _ => Err(LinkError::Closed),
    }
}

/// Keeps this agent registered with its server: registers (retrying), reports,
/// carries tasks to the driver and their progress back.
async fn server_side(
    agent: Arc<Agent>,
    mut notices: mpsc::Receiver<FromDriver>,
    requests: mpsc::Sender<ToDriver>,
) {
    let mut published = agent.run.read_server_address(agent.pair).map(|a| a.pid);
    loop {
        let link = register(&agent, &mut published).await;
        tracing::info!(server = %agent.pair, "registered");
        let (mut sink, mut stream) = link.split();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut silence = Silence::new();
        let outcome: Result<(), LinkError> = async {
            // FIG. 2C: the configuration and state, as persistent data holds them.
            if let Some(report) = report(&agent).await {
                sink.send(link::encode(&report)?).await?;
            }
            // Tasks this agent issued that have not ended: the server learns
            // where they are.
            let open = agent
                .with_persist(|persist| persist.open_tasks())
                .await
                .unwrap_or_default();
            for task in open.into_iter().filter(|t| t.agent.as_deref() == Some(&agent.me.to_string())) {
                sink.send(link::encode(&ToServer::TaskUpdate { task: Box::new(task) })?).await?;
            }
            loop {
                tokio::select! {
                    message = link::receive_from::<_, ToAgent>(&mut stream) => match silence.hear(message)? {
                        ToAgent::RunTask { id, kind, args } => {
                            let update = accept_task(&agent, &requests, id, kind, args).await;
                            sink.send(link::encode(&update)?).await?;
                        }
                        ToAgent::Heartbeat | ToAgent::Registered { .. } | ToAgent::Refused { .. } => {}
                    },
                    Some(notice) = notices.recv() => match notice {
                        FromDriver::Changed => {
                            if let Some(report) = report(&agent).await {
                                sink.send(link::encode(&report)?).await?;
                            }
                        }
                        FromDriver::TaskChanged(id) => {
                            let task = agent.with_persist(move |persist| persist.task(&id)).await;
                            if let Ok(Some(task)) = task {
                                sink.send(link::encode(&ToServer::TaskUpdate { task: Box::new(task) })?).await?;
                            }
                        }
                    },
                    _ = heartbeat.tick() => {
                        silence.check()?;
                        sink.send(link::encode(&ToServer::Heartbeat)?).await?
                    }
                }
            }
        }
        .await;
        if let Err(err) = outcome {
            tracing::warn!(server = %agent.pair, %err, "lost the server; registering again");
        }
    }
}

/// FIG. 4, block 404: the task is stored with this agent's identity, then
/// handed to the driver. Returns the update the server gets now.
async fn accept_task(
    agent: &Arc<Agent>,
    requests: &mpsc::Sender<ToDriver>,
    id: String,
    kind: String,
    args: serde_json::Value,
) -> ToServer {
    let mut record = TaskRecord {
        id: id.clone(),
        kind,
        args,
        agent: Some(agent.me.to_string()),
        state: TaskState::Queued,
        progress: None,
        failure: None,
        result: None,
        created_ms: now_ms(),
        updated_ms: now_ms(),
    };
    let stored = {
        let record = record.clone();
        agent
            .with_persist(move |persist| persist.record_task(&record))
            .await
    };
    let handed = match stored {
        Ok(()) => requests
            .send(ToDriver::Execute { id: id.clone() })
            .await
            .map_err(|_| "the agent's link to its driver is closed".to_string()),
        Err(err) => Err(format!("cannot store the task in persistent data: {err}")),
    };
    if let Err(failure) = handed {
        record.state = TaskState::Failed;
        record.failure = Some(failure);
    }
    ToServer::TaskUpdate {
        task: Box::new(record),
    }
}

/// The configuration and state as persistent data holds them now.
async fn report(agent: &Arc<Agent>) -> Option<ToServer> {
    match agent.with_persist(|persist| persist.state()).await {
        Ok(Some((revision, state))) => Some(ToServer::Report {
            revision,
            state: Box::new(state),
        }),
        Ok(None) => None,
        Err(err) => {
            tracing::warn!(%err, "cannot read the configuration and state");
            None
        }
    }
}

/// Registers with the server, retrying with backoff up to
/// [`REGISTER_ATTEMPTS`] times, then each time the server publishes a new
/// address (it was started again). While the link is cut no attempt is
/// made (none is counted): it waits for the cut to be cleared.
async fn register(agent: &Arc<Agent>, published: &mut Option<u32>) -> Link<Shaped> {
    let socket = agent.run.server_socket(agent.pair);
    loop {
        let mut backoff = Backoff::new();
        for attempt in 1..=REGISTER_ATTEMPTS {
            shape::wait_open(&mut agent.link.clone()).await;
            match try_register(agent, &socket).await {
                Ok(link) => {
                    *published = agent.run.read_server_address(agent.pair).map(|a| a.pid);
                    return link;
                }
                Err(err) => {
                    tracing::debug!(attempt, %err, "registration failed");
                    backoff.wait().await;
                }
            }
        }
        tracing::warn!(
            server = %agent.pair,
            attempts = REGISTER_ATTEMPTS,
            "server not reachable; waiting for it to come back"
        );
        loop {
            tokio::time::sleep(COMEBACK_POLL).await;
            let now = agent.run.read_server_address(agent.pair).map(|a| a.pid);
            if now.is_some() && now != *published {
                *published = now;
                break;
            }
        }
    }
}

async fn try_register(
    agent: &Arc<Agent>,
    socket: &std::path::Path,
) -> Result<Link<Shaped>, LinkError> {
    let mut link = Link::new(shape::connect(socket, agent.link.clone()).await?);
    link.send(&ToServer::Register {
        version: PROTOCOL_VERSION,
        agent: agent.me,
        pid: std::process::id(),
    })
    .await?;
    match link.receive::<ToAgent>().await? {
        ToAgent::Registered { .. } => Ok(link),
        ToAgent::Refused { reason } => Err(LinkError::Io(std::io::Error::other(reason))),
        _ => Err(LinkError::Closed),
    }
}
