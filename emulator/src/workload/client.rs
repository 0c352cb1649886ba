//! A minimal asynchronous NBD client (tokio): fixed-newstyle handshake with
//! `NBD_OPT_GO`, simple replies only, and READ, WRITE (with or without FUA),
//! FLUSH and DISC with many requests in flight, matched by cookie.
//!
//! One reader task per connection demultiplexes replies to the waiting
//! requests. Any I/O error, end of file or protocol violation on the
//! connection fails every request in flight, and every later one, with
//! [`RequestError::ConnectionLost`]: the connection is never used again.
//!
//! Wire constants come from [`crate::nbd::proto`]; nothing is redefined here.
//! A request future must be polled to completion once it has started sending
//! (dropping it half-way through writing a payload would leave a torn request
//! on the socket); the workload always does.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::nbd::proto::{self, cflag, cmd, errno, option, reply, tflag, Request};

/// The NBD port when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// Longest option reply accepted during the handshake.
const MAX_OPTION_REPLY_BYTES: u32 = 1 << 20;

/// Where an export is: an `nbd://` or `nbd+unix://` URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// TCP host and port, or a Unix socket path.
    pub address: Address,
    /// Export name (may be empty: the default export).
    pub export: String,
}

/// A server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `host:port`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { .. } => write!(f, "nbd://{}/{}", self.address, self.export),
            Address::Unix(path) => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl std::str::FromStr for NbdUri {
    type Err = ClientError;

    /// Parses `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`
    /// (percent-escapes in the export name and socket path are decoded).
    fn from_str(uri: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            if path.contains('?') {
                return Err(bad("nbd:// takes no query"));
            }
            let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| bad("unclosed '[' in the host"))?;
                let port = match after {
                    "" => None,
                    _ => Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("junk after ']'"))?,
                    ),
                };
                (host, port)
            } else {
                match authority.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let port = match port {
                None => DEFAULT_PORT,
                Some(port) => port
                    .parse::<u16>()
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| bad("the port is not a number in 1..=65535"))?,
            };
            let export = percent_decode(path).ok_or_else(|| bad("bad %-escape"))?;
            return Ok(NbdUri {
                address: Address::Tcp {
                    host: host.to_owned(),
                    port,
                },
                export,
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (before_query, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
            let path = before_query.strip_prefix('/').ok_or_else(|| {
                bad("nbd+unix:// takes no host (use nbd+unix:///EXPORT?socket=PATH)")
            })?;
            let mut socket = None;
            for pair in query.split('&') {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if key == "socket" {
                    socket = Some(percent_decode(value).ok_or_else(|| bad("bad %-escape"))?);
                }
            }
            let socket = socket
                .filter(|socket| !socket.is_empty())
                .ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
            let export = percent_decode(path).ok_or_else(|| bad("bad %-escape"))?;
            return Ok(NbdUri {
                address: Address::Unix(PathBuf::from(socket)),
                export,
            });
        }
        Err(bad(
            "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
        ))
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI does not parse.
    #[error("bad NBD URI {uri:?}: {reason}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting the socket failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// Where.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The socket failed or closed during the handshake.
    #[error("handshake with {address}: {source}")]
    HandshakeIo {
        /// Where.
        address: String,
        /// The OS error (`UnexpectedEof` when the server closed).
        source: std::io::Error,
    },
    /// The server said something the protocol does not allow.
    #[error("handshake with {address}: {what}")]
    Protocol {
        /// Where.
        address: String,
        /// What it said.
        what: String,
    },
    /// The server answered `NBD_OPT_GO` with an error reply.
    #[error("server {address} refused export {export:?}: {reply_type}: {message}")]
    Refused {
        /// Where.
        address: String,
        /// The export asked for.
        export: String,
        /// The reply type's name, e.g. `NBD_REP_ERR_UNKNOWN`.
        reply_type: String,
        /// The server's message text.
        message: String,
    },
}

/// Why one request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The connection died (or was already dead) before the reply arrived.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server replied with an error.
    #[error("server replied {}", errno_name(*.0))]
    Server(u32),
    /// The export does not offer what the request needs (FLUSH, FUA, writes).
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
}

/// The name of an NBD error value, e.g. `EIO`.
pub fn errno_name(value: u32) -> String {
    match value {
        errno::EPERM => "EPERM".into(),
        errno::EIO => "EIO".into(),
        12 => "ENOMEM".into(),
        errno::EINVAL => "EINVAL".into(),
        errno::ENOSPC => "ENOSPC".into(),
        errno::EOVERFLOW => "EOVERFLOW".into(),
        errno::ENOTSUP => "ENOTSUP".into(),
        errno::ESHUTDOWN => "ESHUTDOWN".into(),
        other => format!("error {other}"),
    }
}

/// The name of an option reply type, e.g. `NBD_REP_ERR_UNKNOWN`.
pub fn reply_type_name(value: u32) -> String {
    match value {
        reply::ACK => "NBD_REP_ACK".into(),
        reply::SERVER => "NBD_REP_SERVER".into(),
        reply::INFO => "NBD_REP_INFO".into(),
        reply::META_CONTEXT => "NBD_REP_META_CONTEXT".into(),
        reply::ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        reply::ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        reply::ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        reply::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        reply::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        reply::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        0x8000_0004 => "NBD_REP_ERR_PLATFORM".into(),
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD".into(),
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        other => format!("reply type {other:#x}"),
    }
}

/// The payload of `NBD_OPT_GO` for `export` with no information requests.
pub fn go_payload(export: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(6 + export.len());
    payload.extend_from_slice(&(export.len() as u32).to_be_bytes());
    payload.extend_from_slice(export.as_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload
}

/// An option request: `IHAVEOPT`, option, length, payload.
pub fn encode_option(option: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + payload.len());
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A decoded simple reply header: (error, cookie), or the bad magic.
pub fn decode_simple_reply(bytes: &[u8; proto::SIMPLE_REPLY_LEN]) -> Result<(u32, u64), u32> {
    let mut reader = proto::Reader::new(bytes);
    // A fixed 16-byte array cannot run short.
    let magic = reader.u32().unwrap_or_default();
    if magic != proto::SIMPLE_REPLY_MAGIC {
        return Err(magic);
    }
    Ok((
        reader.u32().unwrap_or_default(),
        reader.u64().unwrap_or_default(),
    ))
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

struct Pending {
    read_length: usize,
    reply: oneshot::Sender<Result<Vec<u8>, RequestError>>,
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    lost: Option<String>,
}

impl State {
    /// Marks the connection dead and fails everything in flight.
    fn lose(&mut self, why: String) {
        if self.lost.is_none() {
            self.lost = Some(why.clone());
        }
        for (_, pending) in self.pending.drain() {
            let _ = pending
                .reply
                .send(Err(RequestError::ConnectionLost(why.clone())));
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

/// The handshake alone: reads the greeting, negotiates `export` with
/// `NBD_OPT_GO`, and returns its size and transmission flags. Reads no byte
/// past the handshake (the server sends nothing more until asked), so the
/// stream can be handed to someone else afterwards, e.g. the kernel.
pub async fn handshake<R, W>(
    read: &mut R,
    write: &mut W,
    export: &str,
    address: &str,
) -> Result<(u64, u16), ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |source| ClientError::HandshakeIo {
        address: address.to_owned(),
        source,
    };
    let protocol = |what: String| ClientError::Protocol {
        address: address.to_owned(),
        what,
    };
    let magic = read.read_u64().await.map_err(io)?;
    let option_magic = read.read_u64().await.map_err(io)?;
    if magic != proto::NBD_MAGIC || option_magic != proto::IHAVEOPT {
        return Err(protocol(format!(
            "not a fixed-newstyle NBD server (greeting {magic:#x} {option_magic:#x})"
        )));
    }
    let handshake_flags = read.read_u16().await.map_err(io)?;
    if handshake_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server does not offer fixed newstyle".into()));
    }
    let mut client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE;
    if handshake_flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::CLIENT_FLAG_NO_ZEROES;
    }
    let mut hello = client_flags.to_be_bytes().to_vec();
    hello.extend_from_slice(&encode_option(option::GO, &go_payload(export)));
    write.write_all(&hello).await.map_err(io)?;
    write.flush().await.map_err(io)?;
    let mut export_info = None;
    loop {
        let reply_magic = read.read_u64().await.map_err(io)?;
        if reply_magic != proto::OPTION_REPLY_MAGIC {
            return Err(protocol(format!("bad option reply magic {reply_magic:#x}")));
        }
        let replied_option = read.read_u32().await.map_err(io)?;
        let reply_type = read.read_u32().await.map_err(io)?;
        let length = read.read_u32().await.map_err(io)?;
        if replied_option != option::GO {
            return Err(protocol(format!(
                "reply to option {replied_option} while negotiating NBD_OPT_GO"
            )));
        }
        if length > MAX_OPTION_REPLY_BYTES {
            return Err(protocol(format!("option reply of {length} bytes")));
        }
        let mut data = vec![0u8; length as usize];
        read.read_exact(&mut data).await.map_err(io)?;
        match reply_type {
            reply::ACK => break,
            reply::INFO => {
                let mut reader = proto::Reader::new(&data);
                if reader.u16() == Ok(proto::info::EXPORT) {
                    let size = reader.u64();
                    let flags = reader.u16();
                    match (size, flags) {
                        (Ok(size), Ok(flags)) => export_info = Some((size, flags)),
                        _ => return Err(protocol("short NBD_INFO_EXPORT".into())),
                    }
                }
            }
            error if error & 0x8000_0000 != 0 => {
                return Err(ClientError::Refused {
                    address: address.to_owned(),
                    export: export.to_owned(),
                    reply_type: reply_type_name(error),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            // Other replies (e.g. NBD_REP_SERVER) carry nothing we need.
            _ => {}
        }
    }
    export_info.ok_or_else(|| protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into()))
}

/// Connects to `uri`, negotiates its export, and returns the connected socket
/// (blocking, as the kernel's NBD driver wants one) with the export's size
/// and transmission flags: what `emulator attach` hands to `/dev/nbdN`.
pub async fn connect_raw(uri: &NbdUri) -> Result<(std::os::fd::OwnedFd, u64, u16), ClientError> {
    let address = uri.address.to_string();
    let connect_error = |source| ClientError::Connect {
        address: address.clone(),
        source,
    };
    match &uri.address {
        Address::Tcp { host, port } => {
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect_error)?;
            stream.set_nodelay(true).map_err(connect_error)?;
            let (mut read, mut write) = stream.split();
            let (size, flags) = handshake(&mut read, &mut write, &uri.export, &address).await?;
            let stream = stream.into_std().map_err(connect_error)?;
            stream.set_nonblocking(false).map_err(connect_error)?;
            Ok((stream.into(), size, flags))
        }
        Address::Unix(path) => {
            let mut stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect_error)?;
            let (mut read, mut write) = stream.split();
            let (size, flags) = handshake(&mut read, &mut write, &uri.export, &address).await?;
            let stream = stream.into_std().map_err(connect_error)?;
            stream.set_nonblocking(false).map_err(connect_error)?;
            Ok((stream.into(), size, flags))
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One negotiated NBD connection. Clones share it; the reader task stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    writer: Arc<tokio::sync::Mutex<WriteHalf>>,
    state: Arc<Mutex<State>>,
    _reader: Arc<AbortOnDrop>,
    size: u64,
    transmission_flags: u16,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("transmission_flags", &self.transmission_flags)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `uri` and negotiates its export.
    pub async fn connect(uri: &NbdUri) -> Result<Self, ClientError> {
        let address = uri.address.to_string();
        let connect_error = |source| ClientError::Connect {
            address: address.clone(),
            source,
        };
        let (read, write): (ReadHalf, WriteHalf) = match &uri.address {
            Address::Tcp { host, port } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect_error)?;
                stream.set_nodelay(true).map_err(connect_error)?;
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
            Address::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect_error)?;
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
        };
        Self::negotiate(read, write, &uri.export, &address).await
    }

    /// Negotiates `export` over an already connected stream's halves
    /// (`address` only names the peer in errors).
    pub async fn negotiate(
        read: ReadHalf,
        mut write: WriteHalf,
        export: &str,
        address: &str,
    ) -> Result<Self, ClientError> {
        let mut read = BufReader::with_capacity(256 * 1024, read);
        let (size, transmission_flags) = handshake(&mut read, &mut write, export, address).await?;
        let state = Arc::new(Mutex::new(State {
            next_cookie: 1,
            ..State::default()
        }));
        let reader = tokio::spawn(read_replies(read, Arc::clone(&state)));
        Ok(Self {
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            state,
            _reader: Arc::new(AbortOnDrop(reader)),
            size,
            transmission_flags,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags (`proto::tflag`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Whether the connection has died.
    pub fn is_lost(&self) -> bool {
        lock(&self.state).lost.is_some()
    }

    /// Gives the connection up (e.g. a reply took too long): every request in
    /// flight, and every later one, fails with [`RequestError::ConnectionLost`].
    pub fn abandon(&self, why: String) {
        lock(&self.state).lose(why);
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, RequestError> {
        self.request(cmd::READ, 0, offset, length, &[]).await
    }

    /// Writes `data` at `offset`, with FUA if `fua`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), RequestError> {
        if self.transmission_flags & tflag::READ_ONLY != 0 {
            return Err(RequestError::Unsupported("writes (read-only export)"));
        }
        let flags = if fua {
            if self.transmission_flags & tflag::SEND_FUA == 0 {
                return Err(RequestError::Unsupported("FUA"));
            }
            cflag::FUA
        } else {
            0
        };
        self.request(cmd::WRITE, flags, offset, data.len() as u32, data)
            .await
            .map(drop)
    }

    /// Flushes the export.
    pub async fn flush(&self) -> Result<(), RequestError> {
        if self.transmission_flags & tflag::SEND_FLUSH == 0 {
            return Err(RequestError::Unsupported("FLUSH"));
        }
        self.request(cmd::FLUSH, 0, 0, 0, &[]).await.map(drop)
    }

    /// Sends `NBD_CMD_DISC` (no reply) and closes the write side. Requests
    /// still in flight get their replies.
    pub async fn disconnect(&self) {
        let header = Request {
            flags: 0,
            command: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        let mut writer = self.writer.lock().await;
        let _ = writer.write_all(&header).await;
        let _ = writer.shutdown().await;
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, RequestError> {
        let (sender, receiver) = oneshot::channel();
        let cookie = {
            let mut state = lock(&self.state);
            if let Some(why) = &state.lost {
                return Err(RequestError::ConnectionLost(why.clone()));
            }
            let cookie = state.next_cookie;
            state.next_cookie += 1;
            let read_length = if command == cmd::READ {
                length as usize
            } else {
                0
            };
            state.pending.insert(
                cookie,
                Pending {
                    read_length,
                    reply: sender,
                },
            );
            cookie
        };
        let header = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        let sent = {
            let mut writer = self.writer.lock().await;
            match writer.write_all(&header).await {
                Ok(()) if payload.is_empty() => Ok(()),
                Ok(()) => writer.write_all(payload).await,
                Err(err) => Err(err),
            }
        };
        if let Err(err) = sent {
            lock(&self.state).lose(format!("sending a request: {err}"));
        }
        match receiver.await {
            Ok(result) => result,
            // The reader task ended without answering: it was aborted.
            Err(_) => Err(RequestError::ConnectionLost("client closed".into())),
        }
    }
}

/// The reader task: one reply at a time, handed to its request by cookie.
async fn read_replies(mut read: BufReader<ReadHalf>, state: Arc<Mutex<State>>) {
    let why = loop {
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        if let Err(err) = read.read_exact(&mut header).await {
            break if err.kind() == std::io::ErrorKind::UnexpectedEof {
                "the server closed the connection".to_owned()
            } else {
                format!("reading a reply: {err}")
            };
        }
        let (error, cookie) = match decode_simple_reply(&header) {
            Ok(decoded) => decoded,
            Err(magic) => break format!("bad reply magic {magic:#x}"),
        };
        let pending = lock(&state).pending.remove(&cookie);
        let Some(pending) = pending else {
            break format!("reply for unknown cookie {cookie}");
        };
        let result = if error != 0 {
            Err(RequestError::Server(error))
        } else {
            let mut data = vec![0u8; pending.read_length];
            if let Err(err) = read.read_exact(&mut data).await {
                let why = format!("reading {} bytes of READ data: {err}", data.len());
                let _ = pending
                    .reply
                    .send(Err(RequestError::ConnectionLost(why.clone())));
                break why;
            }
            Ok(data)
        };
        let _ = pending.reply.send(result);
    };
    lock(&state).lose(why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<NbdUri, ClientError> {
        uri.parse()
    }

    #[test]
    fn tcp_uris() {
        let uri = parse("nbd://127.0.0.1:2000/disk").expect("parses");
        assert_eq!(
            uri.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 2000
            }
        );
        assert_eq!(uri.export, "disk");
        let uri = parse("nbd://example.org").expect("parses");
        assert_eq!(uri.address.to_string(), "example.org:10809");
        assert_eq!(uri.export, "");
        let uri = parse("nbd://[::1]:7/a%20b/c").expect("parses");
        assert_eq!(uri.address.to_string(), "[::1]:7");
        assert_eq!(uri.export, "a b/c");
    }

    #[test]
    fn unix_uris() {
        let uri = parse("nbd+unix:///disk?socket=/tmp/x.sock").expect("parses");
        assert_eq!(uri.address, Address::Unix("/tmp/x.sock".into()));
        assert_eq!(uri.export, "disk");
        let uri = parse("nbd+unix:///?socket=%2Ftmp%2Fy").expect("parses");
        assert_eq!(uri.address, Address::Unix("/tmp/y".into()));
        assert_eq!(uri.export, "");
    }

    #[test]
    fn bad_uris() {
        for uri in [
            "http://x/y",
            "nbd://",
            "nbd://:10809/x",
            "nbd://host:0/x",
            "nbd://host:99999/x",
            "nbd://host:port/x",
            "nbd://host/x?socket=/a",
            "nbd+unix:///disk",
            "nbd+unix:///disk?socket=",
            "nbd+unix://host/disk?socket=/a",
            "nbd://host/%zz",
        ] {
            assert!(
                matches!(parse(uri), Err(ClientError::BadUri { .. })),
                "{uri} should be refused"
            );
        }
    }

    #[test]
    fn frames() {
        assert_eq!(go_payload("ab"), [0, 0, 0, 2, b'a', b'b', 0, 0]);
        let option = encode_option(option::GO, &[9]);
        assert_eq!(&option[0..8], b"IHAVEOPT");
        assert_eq!(&option[8..16], &[0, 0, 0, 7, 0, 0, 0, 1]);
        assert_eq!(option[16], 9);
        let mut reply = Vec::new();
        proto::encode_simple_reply(&mut reply, 5, 0x0102_0304_0506_0708);
        let reply: [u8; 16] = reply.try_into().expect("16 bytes");
        assert_eq!(decode_simple_reply(&reply), Ok((5, 0x0102_0304_0506_0708)));
        let mut bad = reply;
        bad[0] = 0;
        assert!(decode_simple_reply(&bad).is_err());
    }

    /// A scripted server on an in-memory pipe: greeting, GO answered with INFO
    /// and ACK, then it answers requests out of order and finally hangs up.
    #[tokio::test]
    async fn pipelined_requests_and_connection_loss() {
        let (client_side, mut server) = tokio::io::duplex(1 << 20);
        let server_task = tokio::spawn(async move {
            let mut greeting = Vec::new();
            greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
            greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(
                &(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes(),
            );
            server.write_all(&greeting).await?;
            let client_flags = server.read_u32().await?;
            assert_eq!(
                client_flags,
                proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES
            );
            let mut option_header = [0u8; 16];
            server.read_exact(&mut option_header).await?;
            let length = u32::from_be_bytes(option_header[12..16].try_into().unwrap_or_default());
            let mut payload = vec![0u8; length as usize];
            server.read_exact(&mut payload).await?;
            assert_eq!(payload, go_payload("disk"));
            let mut info = proto::info::EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&65536u64.to_be_bytes());
            info.extend_from_slice(
                &(tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA).to_be_bytes(),
            );
            let mut replies = Vec::new();
            proto::encode_option_reply(&mut replies, option::GO, reply::INFO, &info);
            proto::encode_option_reply(&mut replies, option::GO, reply::ACK, &[]);
            server.write_all(&replies).await?;
            // Two requests: a WRITE (with payload) and a READ.
            let mut requests = Vec::new();
            for _ in 0..2 {
                let mut header = [0u8; proto::REQUEST_LEN];
                server.read_exact(&mut header).await?;
                let request = Request::decode(&header).expect("request magic");
                if request.command == cmd::WRITE {
                    assert_eq!(request.flags, cflag::FUA);
                    let mut data = vec![0u8; request.length as usize];
                    server.read_exact(&mut data).await?;
                    assert_eq!(data, [7u8; 512]);
                }
                requests.push(request);
            }
            // Answer in reverse order: the READ with data, then the WRITE.
            for request in requests.iter().rev() {
                let mut out = Vec::new();
                proto::encode_simple_reply(&mut out, 0, request.cookie);
                if request.command == cmd::READ {
                    out.extend(std::iter::repeat_n(3u8, request.length as usize));
                }
                server.write_all(&out).await?;
            }
            // A third request is never answered: the server hangs up.
            let mut header = [0u8; proto::REQUEST_LEN];
            server.read_exact(&mut header).await?;
            drop(server);
            std::io::Result::Ok(())
        });
        let (read, write) = tokio::io::split(client_side);
        let client = Client::negotiate(Box::new(read), Box::new(write), "disk", "test")
            .await
            .expect("negotiates");
        assert_eq!(client.size(), 65536);
        let data = [7u8; 512];
        let (written, read) = tokio::join!(client.write(4096, &data, true), client.read(0, 1024));
        assert_eq!(written, Ok(()));
        assert_eq!(read, Ok(vec![3u8; 1024]));
        let lost = client.flush().await;
        assert!(
            matches!(lost, Err(RequestError::ConnectionLost(_))),
            "{lost:?}"
        );
        assert!(client.is_lost());
        assert!(matches!(
            client.read(0, 512).await,
            Err(RequestError::ConnectionLost(_))
        ));
        server_task.await.expect("server task").expect("server io");
    }

    #[tokio::test]
    async fn refusal_names_reply_type_and_message() {
        let (client_side, mut server) = tokio::io::duplex(1 << 16);
        let server_task = tokio::spawn(async move {
            let mut greeting = Vec::new();
            greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
            greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
            server.write_all(&greeting).await?;
            let mut hello = [0u8; 4 + 16 + 10];
            server.read_exact(&mut hello).await?;
            let mut out = Vec::new();
            proto::encode_option_reply(&mut out, option::GO, reply::ERR_UNKNOWN, b"no such export");
            server.write_all(&out).await?;
            std::io::Result::Ok(())
        });
        let (read, write) = tokio::io::split(client_side);
        let err = Client::negotiate(Box::new(read), Box::new(write), "nope", "test")
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("NBD_REP_ERR_UNKNOWN"), "{text}");
        assert!(text.contains("no such export"), "{text}");
        server_task.await.expect("server task").expect("server io");
    }
}
