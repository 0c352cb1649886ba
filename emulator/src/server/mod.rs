//! A domain server process (seed 002): server A or server B. It keeps the list
//! of agents registered with it across the domain and its copy of every
//! cluster's configuration and state as those agents report them, accepts
//! tasks from the console and API ([`api`]) and forwards each to the agent of
//! its pair on the target cluster, and keeps each task's status and failure
//! information as the agent reports it.
//!
//! Agents reach it on `RUN/servers/X.sock` (framed messages, see
//! [`crate::link`]); people and scripts on its HTTP address, which it
//! publishes in `RUN/servers/X.json` once it listens.

mod api;
mod registry;

use std::sync::Arc;

use futures_util::SinkExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::domain::{Domain, Pair, ProcessName, Role};
use crate::link::{self, Link, LinkError, Silence, ToAgent, ToServer, HEARTBEAT, PROTOCOL_VERSION};
use crate::rundir::{RunDir, ServerAddress};

use registry::Registry;
pub use registry::{AgentState, Event};

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket, file or the runtime.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// The running server, shared by its links and handlers.
pub(crate) struct Server {
    me: ProcessName,
    pair: Pair,
    domain: Domain,
    run: RunDir,
    token: String,
    registry: Registry,
}

/// Runs server `pair` (placed on `cluster`, or the host) until SIGTERM or
/// SIGINT.
pub fn run(run: &RunDir, domain: &Domain, name: ProcessName) -> Result<(), ServerError> {
    let Role::Server(pair) = name.role else {
        return Err(io("start")(std::io::Error::other(format!(
            "{name} is not a server"
        ))));
    };
    let token = std::fs::read_to_string(run.token())
        .map_err(io(format!("read the API token {}", run.token().display())))?
        .trim()
        .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("start the runtime"))?;
    let server = Arc::new(Server {
        me: name,
        pair,
        domain: domain.clone(),
        run: run.clone(),
        token,
        registry: Registry::new(pair),
    });
    runtime.block_on(serve(server))
}

async fn serve(server: Arc<Server>) -> Result<(), ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let socket = server.run.server_socket(server.pair);
    std::fs::create_dir_all(socket.parent().unwrap_or(server.run.root()))
        .map_err(io("create the servers directory"))?;
    let _ = std::fs::remove_file(&socket);
    let agents =
        UnixListener::bind(&socket).map_err(io(format!("listen on {}", socket.display())))?;
    let http = tokio::net::TcpListener::bind(("127.0.0.1", server.domain.http_port(server.pair)))
        .await
        .map_err(io(format!(
            "listen on 127.0.0.1:{} (another domain running? `emulator down`, or [ports] in the config)",
            server.domain.http_port(server.pair)
        )))?;
    let http_address = http.local_addr().map_err(io("read the HTTP address"))?;
    let published = ServerAddress {
        name: server.me,
        pid: std::process::id(),
        http: format!("http://{http_address}"),
    };
    let bytes = serde_json::to_vec_pretty(&published).map_err(|err| io("publish")(err.into()))?;
    RunDir::write_atomically(&server.run.server_address(server.pair), &bytes)
        .map_err(io("publish the server's address"))?;
    tracing::info!(server = %server.me, http = %published.http, "listening");
    let accept = tokio::spawn(accept_agents(Arc::clone(&server), agents));
    let router = api::router(Arc::clone(&server));
    let stop = async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    };
    axum::serve(http, router)
        .with_graceful_shutdown(stop)
        .await
        .map_err(io("serve HTTP"))?;
    accept.abort();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(server.run.server_address(server.pair));
    Ok(())
}

async fn accept_agents(server: Arc<Server>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(agent_link(Arc::clone(&server), stream));
            }
            Err(err) => {
                tracing::warn!(%err, "accepting an agent failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One agent's link: registration (FIG. 2B), then its reports and task
/// updates, and the tasks sent to it, until it goes.
async fn agent_link(server: Arc<Server>, stream: UnixStream) {
    let mut link = Link::new(stream);
    let (agent, pid) = match link.receive::<ToServer>().await {
        Ok(ToServer::Register {
            version,
            agent,
            pid,
        }) => match server.admits(version, &agent) {
            Ok(()) => (agent, pid),
            Err(reason) => {
                tracing::warn!(%agent, %reason, "registration refused");
                let _ = link.send(&ToAgent::Refused { reason }).await;
                return;
            }
        },
        Ok(other) => {
            tracing::warn!(?other, "a peer spoke before registering");
            return;
        }
        Err(err) => {
            tracing::debug!(%err, "a peer went before registering");
            return;
        }
    };
    if link
        .send(&ToAgent::Registered { server: server.me })
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<ToAgent>(64);
    let connection = server.registry.register(agent, pid, tx);
    tracing::info!(%agent, pid, "agent registered");
    let (mut sink, mut stream) = link.split();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut silence = Silence::new();
    let outcome: Result<(), LinkError> = async {
        loop {
            tokio::select! {
                message = link::receive_from::<_, ToServer>(&mut stream) => match silence.hear(message)? {
                    ToServer::Report { revision, state } => server.registry.report(&agent, revision, *state),
                    ToServer::TaskUpdate { task } => server.registry.task_update(&agent, *task),
                    ToServer::Heartbeat => server.registry.seen(&agent),
                    ToServer::Register { .. } => tracing::warn!(%agent, "a second registration ignored"),
                },
                Some(message) = rx.recv() => sink.send(link::encode(&message)?).await?,
                _ = heartbeat.tick() => {
                    silence.check()?;
                    sink.send(link::encode(&ToAgent::Heartbeat)?).await?
                }
            }
        }
    }
    .await;
    let reason = match outcome {
        Err(err) => err.to_string(),
        Ok(()) => "link closed".into(),
    };
    tracing::warn!(%agent, %reason, "agent lost");
    server.registry.lose(&agent, connection, &reason);
}

impl Server {
    /// Whether `agent` may register here: an agent of this server's pair, on a
    /// cluster of the domain, speaking our version.
    fn admits(&self, version: u32, agent: &ProcessName) -> Result<(), String> {
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "this server speaks version {PROTOCOL_VERSION}, the agent {version}"
            ));
        }
        if agent.role != Role::Agent(self.pair) {
            return Err(format!("{agent} is not an agent of pair {}", self.pair));
        }
        match agent.cluster {
            Some(cluster) if cluster.system < self.domain.systems.len() => Ok(()),
            _ => Err(format!("{agent} is not on a cluster of this domain")),
        }
    }
}
