//! The NBD server: accepts connections on a TCP or Unix socket, caps how many are
//! served at once, runs each through handshake and transmission, and shuts down
//! in order (stop accepting, let every connection answer what it has read, flush).
//!
//! Accepting, the handshake and shutdown run on tokio. Once a connection is
//! negotiated its socket turns blocking and the transmission phase runs on
//! threads of its own ([`transmission`]); the connection's task then only
//! waits for it to end, and on shutdown tells it to stop.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::export::{Catalog, ExportSet};
use super::handshake::{self, HandshakeError};
use super::hook::{NbdHook, Tap};
use super::transmission::{self, Ending, ReplyWriter};

/// Read buffer for the handshake (transmission has its own).
const HANDSHAKE_BUFFER_BYTES: usize = 16 * 1024;
/// A client must finish negotiating within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, connections get this long to answer what they have read.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection's request thread keeps polling its socket before it
/// blocks in `recv`. A client waiting for a reply usually sends its next
/// request within tens of microseconds; polling for it saves the sleep and the
/// wake-up (on a VM, an inter-processor interrupt and a VM exit), which is most
/// of a request's latency at queue depth 1. Bounded, so an idle connection costs
/// this much CPU once per idle period.
const RECV_POLL: Duration = Duration::from_micros(50);

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
    /// The link-fault hook of this address (a driver's; None: no link
    /// faults, `emulator serve`).
    pub link: Option<Arc<NbdHook>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 128,
            link: None,
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

/// Serves the exports of `catalog` (as they are when each client connects) on
/// `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: Listener,
    catalog: Catalog,
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
        let (stream, peer) = match accepted {
            Ok(parts) => parts,
            Err(err) => {
                // Typically EMFILE: keep serving the connections we have.
                tracing::warn!(%err, "accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        next_id += 1;
        if let Some(hook) = config.link.as_ref().filter(|hook| hook.refuses()) {
            tracing::info!(%peer, link = hook.link(), "link cut: connection closed");
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, limit = config.max_connections, "connection limit reached; refusing connection");
            continue;
        };
        let exports = catalog.current();
        let stop = stop.clone();
        let id = next_id;
        let span = tracing::info_span!("conn", id, %peer);
        let hook = config.link.clone();
        connections.spawn(
            async move {
                let _permit = permit;
                serve_connection(stream, &exports, stop, id, hook).await;
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
    for export in catalog.current().iter() {
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

/// Congestion controls that pace every flow with a timer of their own when
/// the interface has no pacing qdisc (BBR does: `sk_pacing_status` NEEDED).
const PACING_CONGESTION_CONTROLS: [&[u8]; 1] = [b"bbr"];
/// What a loopback connection switches to from a pacing congestion control,
/// in order: cubic (Linux's default) if this process may choose it, else reno
/// (always allowed).
const UNPACED_CONGESTION_CONTROLS: [&str; 2] = ["cubic", "reno"];

/// Takes a connection from this host off a pacing congestion control. Pacing
/// spreads a flow's segments out so as not to flood a bottleneck queue between
/// two hosts; over loopback there is none, and it costs a timer interrupt and a
/// softirq per burst: with BBR (the default on some cloud images, this
/// project's reference machine among them), a 1 MiB read reply leaves in
/// timer-driven bursts, and the server spent ~30% more system time per MiB
/// sent (measured with fio over TCP, 1 MiB reads at QD8). Connections from
/// other hosts keep the congestion control the host's administrator chose.
/// Failure leaves the connection as it was, so it is only logged.
fn unpaced(stream: &tokio::net::TcpStream) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    use std::os::unix::ffi::OsStrExt;
    let Ok(current) = getsockopt(stream, sockopt::TcpCongestion) else {
        return;
    };
    // The kernel pads the name with NULs to its fixed length.
    let current = current.as_bytes();
    let current = &current[..current
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(current.len())];
    if !PACING_CONGESTION_CONTROLS
        .iter()
        .any(|pacing| current.starts_with(pacing))
    {
        return;
    }
    for name in UNPACED_CONGESTION_CONTROLS {
        match setsockopt(stream, sockopt::TcpCongestion, &name.into()) {
            Ok(()) => {
                tracing::debug!(
                    from = %String::from_utf8_lossy(current),
                    to = name,
                    "loopback connection: unpaced congestion control"
                );
                return;
            }
            Err(err) => tracing::debug!(%err, name, "cannot choose congestion control"),
        }
    }
}

/// An accepted connection, before the handshake.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            stream.set_nodelay(true)?;
            enlarge_socket_buffers(&stream);
            if peer.ip().to_canonical().is_loopback() {
                unpaced(&stream);
            }
            Ok((Accepted::Tcp(stream), peer.to_string()))
        }
        Listener::Unix(listener, _) => {
            let (stream, _) = listener.accept().await?;
            enlarge_socket_buffers(&stream);
            Ok((Accepted::Unix(stream), "unix".to_string()))
        }
    }
}

impl Accepted {
    /// Runs the handshake; on success, also returns what the client sent after
    /// it that is already buffered.
    async fn negotiate(
        &mut self,
        exports: &ExportSet,
    ) -> Result<(handshake::Negotiated, Vec<u8>), HandshakeError> {
        match self {
            Self::Tcp(stream) => {
                let (reader, mut writer) = stream.split();
                negotiate_on(reader, &mut writer, exports).await
            }
            Self::Unix(stream) => {
                let (reader, mut writer) = stream.split();
                negotiate_on(reader, &mut writer, exports).await
            }
        }
    }

    /// The socket, now in blocking mode and out of tokio's hands.
    fn into_blocking(self) -> io::Result<Socket> {
        let socket = match self {
            Self::Tcp(stream) => Socket::Tcp(stream.into_std()?),
            Self::Unix(stream) => Socket::Unix(stream.into_std()?),
        };
        match &socket {
            Socket::Tcp(stream) => stream.set_nonblocking(false)?,
            Socket::Unix(stream) => stream.set_nonblocking(false)?,
        }
        Ok(socket)
    }
}

async fn negotiate_on<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: R,
    writer: &mut W,
    exports: &ExportSet,
) -> Result<(handshake::Negotiated, Vec<u8>), HandshakeError> {
    let mut reader = BufReader::with_capacity(HANDSHAKE_BUFFER_BYTES, reader);
    let negotiated = handshake::negotiate(&mut reader, writer, exports).await?;
    Ok((negotiated, reader.buffer().to_vec()))
}

/// A connection's socket in the transmission phase: blocking, shared by the
/// connection's threads.
#[derive(Debug)]
enum Socket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Socket {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(stream) => Self::Tcp(stream.try_clone()?),
            Self::Unix(stream) => Self::Unix(stream.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.shutdown(how),
            Self::Unix(stream) => stream.shutdown(how),
        }
    }

    fn send(&self, buf: &[u8], flags: MsgFlags) -> io::Result<usize> {
        // MSG_NOSIGNAL: a client gone is an error to handle, not a SIGPIPE.
        Ok(send(
            self.as_fd().as_raw_fd(),
            buf,
            flags | MsgFlags::MSG_NOSIGNAL,
        )?)
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(stream) => stream.as_fd(),
            Self::Unix(stream) => stream.as_fd(),
        }
    }
}

impl Read for &Socket {
    /// Polls without blocking for up to [`RECV_POLL`], then blocks.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        loop {
            match recv(self.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(count) => return Ok(count),
                Err(Errno::EAGAIN) if started.elapsed() < RECV_POLL => std::hint::spin_loop(),
                Err(Errno::EAGAIN | Errno::EINTR) => break,
                Err(err) => return Err(err.into()),
            }
        }
        match self {
            Socket::Tcp(stream) => (&*stream).read(buf),
            Socket::Unix(stream) => (&*stream).read(buf),
        }
    }

    /// Fills `buf` (the rest of a write's payload) with blocking receives that
    /// wait for all of it (`MSG_WAITALL`): one call per payload instead of a
    /// poll and a receive per segment that arrives (over TCP, tens per MiB).
    fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match recv(self.as_fd().as_raw_fd(), buf, MsgFlags::MSG_WAITALL) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(count) => buf = &mut buf[count..],
                Err(Errno::EINTR) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }
}

/// What a connection's requests are read from: the bytes the handshake read
/// past its end, then the socket. (`Read::chain` would do, but its
/// `read_exact` is the default loop of `read`s, which would receive a large
/// payload a segment at a time, polling between them, instead of with the
/// socket's one blocking call.)
struct Incoming<'a> {
    early: io::Cursor<Vec<u8>>,
    socket: &'a Socket,
}

impl Incoming<'_> {
    fn early_left(&self) -> bool {
        (self.early.position() as usize) < self.early.get_ref().len()
    }
}

impl Read for Incoming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.early_left() {
            return self.early.read(buf);
        }
        let mut socket = self.socket;
        socket.read(buf)
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        if self.early_left() {
            let count = self.early.read(buf)?;
            buf = &mut buf[count..];
        }
        let mut socket = self.socket;
        socket.read_exact(buf)
    }
}

/// Where a connection writes its replies: its socket, through its link
/// hook's tap when it has one (a driver's address). With no delay standing
/// the tap costs one atomic load per write.
struct Wire<'a> {
    socket: &'a Socket,
    tap: Option<&'a Tap>,
}

impl ReplyWriter for Wire<'_> {
    fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(diverted) = self.tap.and_then(|tap| tap.divert(buf)) {
            return diverted;
        }
        self.socket.write_now(buf)
    }

    fn write_blocking(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(diverted) = self.tap.and_then(|tap| tap.divert(buf)) {
            return diverted;
        }
        self.socket.write_blocking(buf)
    }

    fn finish(&self) -> io::Result<()> {
        if let Some(finished) = self.tap.and_then(|tap| tap.finish()) {
            return finished;
        }
        self.socket.finish()
    }
}

impl ReplyWriter for Socket {
    fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        match self.send(buf, MsgFlags::MSG_DONTWAIT) {
            Err(err) if err.raw_os_error() == Some(Errno::EAGAIN as i32) => Ok(0),
            result => result,
        }
    }

    fn write_blocking(&self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf, MsgFlags::empty())
    }

    fn finish(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Cuts a socket (both directions) when dropped, unless released first: if the
/// connection's task is dropped (the drain on shutdown timed out), its threads,
/// blocked on the socket, must still end.
struct CutOnDrop(Option<Socket>);

impl CutOnDrop {
    fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        if let Some(socket) = &self.0 {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

async fn serve_connection(
    mut stream: Accepted,
    exports: &ExportSet,
    mut stop: watch::Receiver<bool>,
    id: u64,
    hook: Option<Arc<NbdHook>>,
) {
    let negotiated = tokio::select! {
        result = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.negotiate(exports)) => {
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
    let (negotiated, early_requests) = negotiated;
    tracing::info!(
        export = %negotiated.export.name,
        structured = negotiated.structured_replies,
        flags = format_args!("{:#x}", negotiated.transmission_flags),
        "transmission started"
    );
    let sockets = stream
        .into_blocking()
        .and_then(|socket| Ok((socket.try_clone()?, socket)));
    let (control, socket) = match sockets {
        Ok(sockets) => sockets,
        Err(err) => {
            tracing::warn!(%err, "cannot take over the socket; connection dropped");
            return;
        }
    };
    // Registered with the address's link hook for as long as it is served
    // (a cut shuts it down); refused while a cut stands.
    let attached = match &hook {
        None => None,
        Some(hook) => {
            let handle = match socket.as_fd().try_clone_to_owned() {
                Ok(handle) => handle,
                Err(err) => {
                    tracing::warn!(%err, "cannot take over the socket; connection dropped");
                    return;
                }
            };
            match hook.attach(handle) {
                Some(attached) => Some(attached),
                None => {
                    tracing::info!(link = hook.link(), "link cut: connection closed");
                    let _ = socket.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    };
    let tap = attached.as_ref().map(|attached| Arc::clone(attached.tap()));
    let stopping = Arc::new(AtomicBool::new(false));
    let (done, ended) = tokio::sync::oneshot::channel();
    let thread = {
        let stopping = Arc::clone(&stopping);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _entered = span.enter();
                let requests = Incoming {
                    early: io::Cursor::new(early_requests),
                    socket: &socket,
                };
                let wire = Wire {
                    socket: &socket,
                    tap: tap.as_deref(),
                };
                let tcp = matches!(socket, Socket::Tcp(_));
                let large_writes = transmission::LargeWrites::choose(tcp);
                let ending =
                    transmission::transmit(requests, &wire, &negotiated, &stopping, large_writes);
                let _ = done.send(ending);
            })
    };
    if let Err(err) = thread {
        tracing::warn!(%err, "cannot start the connection's thread; connection dropped");
        return;
    }
    let control = CutOnDrop(Some(control));
    tokio::pin!(ended);
    let finished = tokio::select! {
        ending = &mut ended => Some(ending),
        _ = stop.wait_for(|stopping| *stopping) => None,
    };
    let ending = match finished {
        Some(ending) => ending,
        None => {
            stopping.store(true, Ordering::Release);
            // What the client already sent stays readable; after it, reads see
            // end-of-file instead of waiting for more.
            if let Some(socket) = &control.0 {
                if let Err(err) = socket.shutdown(Shutdown::Read) {
                    tracing::debug!(%err, "shutdown(SHUT_RD) failed");
                }
            }
            ended.await
        }
    };
    control.release();
    match ending {
        Ok(Ok(Ending::Disconnect)) => tracing::info!("client disconnected"),
        Ok(Ok(Ending::ClientClosed)) => tracing::info!("client closed the connection"),
        Ok(Ok(Ending::Shutdown)) => tracing::info!("closed for shutdown"),
        Ok(Err(err)) => tracing::warn!(%err, "connection dropped"),
        Err(_) => tracing::error!("connection thread panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A request stream starts with what the handshake read past its end:
    /// `read` and `read_exact` take those bytes first, then the socket's;
    /// `read_exact` returns all that was asked for, however it arrives.
    #[test]
    fn incoming_reads_the_early_bytes_then_the_socket() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let socket = Socket::Unix(ours);
        let mut incoming = Incoming {
            early: io::Cursor::new(b"early".to_vec()),
            socket: &socket,
        };
        let sender = std::thread::spawn(move || {
            let mut theirs = theirs;
            for piece in [&b"-late"[..], b" bytes", b" come in pieces"] {
                theirs.write_all(piece).expect("send");
                theirs.flush().expect("flush");
                std::thread::yield_now();
            }
        });
        let mut first = [0u8; 3];
        assert_eq!(incoming.read(&mut first).expect("read"), 3);
        assert_eq!(&first, b"ear");
        let mut rest = [0u8; 28];
        incoming.read_exact(&mut rest).expect("read_exact");
        assert_eq!(&rest[..], b"ly-late bytes come in pieces");
        sender.join().expect("the sender");
    }
}
