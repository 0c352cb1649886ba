//! The NBD server: accepts connections on a TCP or Unix socket, caps how many are
//! served at once, runs each through handshake and transmission, and shuts down
//! in order (stop accepting, let every connection answer what it has read, flush).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::export::ExportSet;
use super::handshake::{self, HandshakeError};
use super::transmission::{self, Ending};

/// Read buffer per connection: large enough to take many queued requests (or a
/// large write payload) per syscall.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// A client must finish negotiating within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, connections get this long to answer what they have read.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A TCP address, `HOST:PORT`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(address) => write!(f, "tcp://{address}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more are refused.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 128,
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket; the path is removed when the listener is dropped.
    Unix(UnixListener, UnixSocketGuard),
}

/// Removes a Unix socket file when dropped.
#[derive(Debug)]
pub struct UnixSocketGuard(PathBuf);

impl Drop for UnixSocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The OS refused.
    #[error("cannot listen on {address}: {source}")]
    Io {
        /// Address.
        address: ListenAddress,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another live server owns the Unix socket.
    #[error("{0} is in use by another server")]
    InUse(PathBuf),
    /// The path exists and is not a socket: refusing to delete it.
    #[error("{0} exists and is not a socket; not touching it")]
    NotASocket(PathBuf),
}

impl Listener {
    /// Binds the address.
    pub async fn bind(address: &ListenAddress) -> Result<Self, BindError> {
        let io = |source| BindError::Io {
            address: address.clone(),
            source,
        };
        match address {
            ListenAddress::Tcp(host_port) => {
                Ok(Self::Tcp(TcpListener::bind(host_port).await.map_err(io)?))
            }
            ListenAddress::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path).map_err(io)?;
                Ok(Self::Unix(listener, UnixSocketGuard(path.clone())))
            }
        }
    }

    /// The address actually bound (resolves port 0).
    pub fn local_address(&self) -> String {
        match self {
            Self::Tcp(listener) => listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            Self::Unix(_, guard) => guard.0.display().to_string(),
        }
    }
}

async fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_path_buf()));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(BindError::InUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| BindError::Io {
        address: ListenAddress::Unix(path.to_path_buf()),
        source,
    })
}

/// Serves `exports` on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: Listener,
    exports: ExportSet,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop_sender, stop) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = done {
                    tracing::error!(%err, "connection task failed");
                }
                continue;
            }
            accepted = accept(&listener) => accepted,
        };
        let (reader, writer, peer) = match accepted {
            Ok(parts) => parts,
            Err(err) => {
                // Typically EMFILE: keep serving the connections we have.
                tracing::warn!(%err, "accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        next_id += 1;
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, limit = config.max_connections, "connection limit reached; refusing connection");
            continue;
        };
        let exports = exports.clone();
        let stop = stop.clone();
        let id = next_id;
        let span = tracing::info_span!("conn", id, %peer);
        connections.spawn(
            async move {
                let _permit = permit;
                serve_connection(reader, writer, &exports, stop).await;
            }
            .instrument(span),
        );
    }
    tracing::info!(
        connections = connections.len(),
        "shutting down: no new connections; draining"
    );
    drop(listener);
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = connections.join_next().await {
            if let Err(err) = done {
                tracing::error!(%err, "connection task failed");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "connections did not drain in time; closing them"
        );
        connections.shutdown().await;
    }
    for export in exports.iter() {
        if let Err(err) = export.device.flush() {
            tracing::error!(export = %export.name, %err, "final flush failed");
        }
    }
    tracing::info!("stopped");
}

/// Socket buffer size asked for on every connection (the kernel caps it at
/// `net.core.wmem_max`/`rmem_max`).
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Asks for socket buffers large enough to hold a few large replies, so a 1 MiB
/// read reply goes out in one syscall instead of trickling through the default
/// ~200 KiB. Failure is harmless (the defaults stay), so it is only logged.
fn enlarge_socket_buffers(socket: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    for result in [
        setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER_BYTES),
        setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES),
    ] {
        if let Err(err) = result {
            tracing::debug!(%err, "could not enlarge socket buffer");
        }
    }
}

type BoxedRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxedWrite = Box<dyn AsyncWrite + Unpin + Send>;

async fn accept(listener: &Listener) -> std::io::Result<(BoxedRead, BoxedWrite, String)> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            stream.set_nodelay(true)?;
            enlarge_socket_buffers(&stream);
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader), Box::new(writer), peer.to_string()))
        }
        Listener::Unix(listener, _) => {
            let (stream, _) = listener.accept().await?;
            enlarge_socket_buffers(&stream);
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader), Box::new(writer), "unix".to_string()))
        }
    }
}

async fn serve_connection(
    reader: BoxedRead,
    mut writer: BoxedWrite,
    exports: &ExportSet,
    mut stop: watch::Receiver<bool>,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let negotiated = tokio::select! {
        result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&mut reader, &mut writer, exports)) => {
            match result {
                Ok(Ok(negotiated)) => negotiated,
                Ok(Err(HandshakeError::Aborted)) => {
                    tracing::debug!("client aborted the handshake");
                    return;
                }
                Ok(Err(err)) => {
                    tracing::info!(%err, "handshake ended");
                    return;
                }
                Err(_) => {
                    tracing::info!("handshake timed out");
                    return;
                }
            }
        }
        _ = stop.wait_for(|stopping| *stopping) => return,
    };
    tracing::info!(
        export = %negotiated.export.name,
        structured = negotiated.structured_replies,
        flags = format_args!("{:#x}", negotiated.transmission_flags),
        "transmission started"
    );
    match transmission::transmit(&mut reader, writer, &negotiated, stop).await {
        Ok(Ending::Disconnect) => tracing::info!("client disconnected"),
        Ok(Ending::ClientClosed) => tracing::info!("client closed the connection"),
        Ok(Ending::Shutdown) => tracing::info!("closed for shutdown"),
        Err(err) => tracing::warn!(%err, "connection dropped"),
    }
}
