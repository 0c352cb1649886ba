//! The transmission phase of one connection: decode requests, validate them at
//! the boundary, run them against the export's device, and send replies.
//!
//! Shape: the connection's task reads and executes requests in order; replies go
//! through a bounded queue to a writer task that batches them into few syscalls.
//! Slow, durable operations (FLUSH, FUA) run on the blocking pool and reply when
//! done, so replies can complete out of order while later requests keep flowing.
//! The queue bound is the connection's backpressure: when the client stops reading
//! replies, we stop reading requests.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

use super::export::{BlockDevice, DeviceError};
use super::handshake::Negotiated;
use super::proto::{self, cflag, chunk, cmd, errno, state, Request};
use super::MAX_PAYLOAD_BYTES;

/// Replies queued for the writer before the reader waits.
const REPLY_QUEUE_DEPTH: usize = 256;
/// The writer coalesces queued replies into one write up to this many bytes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Most extents returned by one BLOCK_STATUS reply (the spec allows fewer than the
/// whole range).
const MAX_EXTENTS_PER_REPLY: usize = 1024;

/// How a connection's transmission phase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket between requests.
    ClientClosed,
    /// The server is shutting down.
    Shutdown,
}

/// Why a connection had to be dropped.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// The socket failed or closed mid-message.
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
    /// A request did not start with the request magic: the stream cannot be trusted.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

type ReplySender = mpsc::Sender<Vec<u8>>;

/// Runs the transmission phase until DISC, EOF, shutdown or a fatal error. Every
/// request read is answered before this returns.
pub async fn transmit<R, W>(
    reader: &mut BufReader<R>,
    writer: W,
    session: &Negotiated,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Ending, TransmissionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (replies, queue) = mpsc::channel(REPLY_QUEUE_DEPTH);
    let writer_task = tokio::spawn(write_replies(writer, queue));
    let outcome = read_requests(reader, session, &replies, &mut shutdown).await;
    // Dropping our sender lets the writer finish once every in-flight request
    // (including those on the blocking pool, which hold clones) has replied.
    drop(replies);
    let written = writer_task
        .await
        .map_err(|join| io::Error::other(join.to_string()))?;
    let ending = outcome?;
    written?;
    Ok(ending)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES);
    while let Some(first) = queue.recv().await {
        if first.len() >= WRITE_BATCH_BYTES {
            writer.write_all(&first).await?;
        } else {
            batch.clear();
            batch.extend_from_slice(&first);
            while batch.len() < WRITE_BATCH_BYTES {
                match queue.try_recv() {
                    Ok(next) if next.len() >= WRITE_BATCH_BYTES => {
                        writer.write_all(&batch).await?;
                        batch.clear();
                        writer.write_all(&next).await?;
                        break;
                    }
                    Ok(next) => batch.extend_from_slice(&next),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                writer.write_all(&batch).await?;
            }
        }
    }
    writer.flush().await?;
    writer.shutdown().await
}

/// Replies produced inline are gathered here and handed to the writer as one
/// message when the reader runs out of buffered requests, so a burst of small
/// requests costs one wake-up and one syscall rather than one per reply.
struct Outbox<'a> {
    batch: Vec<u8>,
    sender: &'a ReplySender,
}

impl Outbox<'_> {
    async fn push(&mut self, reply: Vec<u8>) -> io::Result<()> {
        self.flush().await?;
        send(self.sender, reply).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_START_BYTES));
        send(self.sender, batch).await
    }
}

/// Initial capacity of an outbox batch.
const BATCH_START_BYTES: usize = 64 * 1024;
/// Reads up to this length are built straight into the batch; longer ones get a
/// buffer of their own (no extra copy of large data).
const INLINE_READ_BYTES: u32 = 64 * 1024;

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    session: &Negotiated,
    replies: &ReplySender,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Ending, TransmissionError> {
    let mut outbox = Outbox {
        batch: Vec::with_capacity(BATCH_START_BYTES),
        sender: replies,
    };
    let ending = loop {
        if *shutdown.borrow() {
            break Ending::Shutdown;
        }
        if reader.buffer().len() < proto::REQUEST_LEN || outbox.batch.len() >= WRITE_BATCH_BYTES {
            // The next request is not fully here yet: send what we have before we
            // wait, or a client that waits for replies would wait forever.
            outbox.flush().await?;
        }
        // Wait for the next request or for shutdown. `fill_buf` is cancel-safe, so
        // losing the race to shutdown loses no bytes.
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Ending::Shutdown,
            ready = reader.fill_buf() => {
                if ready?.is_empty() {
                    break Ending::ClientClosed;
                }
            }
        }
        // A request that is only partly here when shutdown comes was never
        // accepted: drop it rather than wait for a client that may never finish it.
        let incoming = tokio::select! {
            biased;
            _ = shutdown.changed() => break Ending::Shutdown,
            incoming = read_request(reader) => incoming?,
        };
        let (request, payload) = match incoming {
            Incoming::Disconnect => break Ending::Disconnect,
            Incoming::Request(request, payload) => (request, payload),
            Incoming::OversizedWrite(request) => {
                let message = format!(
                    "write of {} bytes exceeds the maximum payload of {MAX_PAYLOAD_BYTES}",
                    request.length
                );
                error_reply(
                    &mut outbox.batch,
                    session,
                    &request,
                    errno::EINVAL,
                    &message,
                    None,
                );
                continue;
            }
        };
        execute(session, request, payload, &mut outbox).await?;
    };
    outbox.flush().await?;
    Ok(ending)
}

/// One message read from the client.
enum Incoming {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// A request, with its payload for WRITE.
    Request(Request, Option<Vec<u8>>),
    /// A WRITE whose payload exceeded the maximum and was discarded.
    OversizedWrite(Request),
}

async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> Result<Incoming, TransmissionError> {
    let mut header = [0u8; proto::REQUEST_LEN];
    reader.read_exact(&mut header).await?;
    let request = Request::decode(&header).map_err(TransmissionError::BadMagic)?;
    match request.command {
        cmd::DISC => Ok(Incoming::Disconnect),
        cmd::WRITE if request.length > MAX_PAYLOAD_BYTES => {
            // Keep the stream in step: the payload follows whether we want it or not.
            let length = u64::from(request.length);
            let skipped =
                tokio::io::copy(&mut (&mut *reader).take(length), &mut tokio::io::sink()).await?;
            if skipped < length {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            Ok(Incoming::OversizedWrite(request))
        }
        cmd::WRITE => {
            let mut data = vec![0u8; request.length as usize];
            reader.read_exact(&mut data).await?;
            Ok(Incoming::Request(request, Some(data)))
        }
        _ => Ok(Incoming::Request(request, None)),
    }
}

async fn send(replies: &ReplySender, reply: Vec<u8>) -> io::Result<()> {
    replies
        .send(reply)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "reply writer stopped"))
}

/// Appends an error reply in the form the session requires: a structured error
/// chunk when structured replies are on (mandatory for READ), a simple reply
/// otherwise.
fn error_reply(
    out: &mut Vec<u8>,
    session: &Negotiated,
    request: &Request,
    error: u32,
    message: &str,
    offset: Option<u64>,
) {
    if session.structured_replies {
        proto::encode_error_chunk(out, request.cookie, error, message, offset);
    } else {
        proto::encode_simple_reply(out, error, request.cookie);
    }
}

fn ok_reply(out: &mut Vec<u8>, request: &Request) {
    proto::encode_simple_reply(out, 0, request.cookie);
}

/// Flags each command accepts. FUA is accepted on every command (the spec says a
/// server advertising SEND_FUA must not reject it) and is a no-op on reads.
fn allowed_flags(command: u16, structured: bool) -> u16 {
    let df = if structured { cflag::DF } else { 0 };
    cflag::FUA
        | match command {
            cmd::READ => df,
            cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            _ => 0,
        }
}

/// Validates a request at the boundary. `Err` carries the errno and a message.
fn validate(session: &Negotiated, request: &Request) -> Result<(), (u32, String)> {
    let export = &session.export;
    let known = matches!(
        request.command,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    );
    if !known {
        return Err((
            errno::EINVAL,
            format!("unknown command {}", request.command),
        ));
    }
    let unexpected = request.flags & !allowed_flags(request.command, session.structured_replies);
    if unexpected != 0 {
        return Err((
            errno::EINVAL,
            format!(
                "flags {unexpected:#x} are not valid for command {}",
                request.command
            ),
        ));
    }
    let writes = matches!(request.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && export.read_only {
        return Err((errno::EPERM, "export is read-only".into()));
    }
    if request.command == cmd::FLUSH {
        if request.offset != 0 || request.length != 0 {
            return Err((errno::EINVAL, "flush must have offset and length 0".into()));
        }
        return Ok(());
    }
    if matches!(request.command, cmd::READ | cmd::CACHE) && request.length > MAX_PAYLOAD_BYTES {
        return Err((
            errno::EINVAL,
            format!(
                "length {} exceeds the maximum payload of {MAX_PAYLOAD_BYTES}",
                request.length
            ),
        ));
    }
    let size = export.device.size();
    let fits = request
        .offset
        .checked_add(u64::from(request.length))
        .is_some_and(|end| end <= size);
    if !fits {
        let error = if matches!(request.command, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err((
            error,
            format!(
                "range {}+{} is beyond the end of the export ({size} bytes)",
                request.offset, request.length
            ),
        ));
    }
    if request.command == cmd::BLOCK_STATUS && session.base_allocation.is_none() {
        return Err((errno::EINVAL, "no metadata context was negotiated".into()));
    }
    Ok(())
}

fn device_error_reply(
    out: &mut Vec<u8>,
    session: &Negotiated,
    request: &Request,
    err: &DeviceError,
) {
    let offset = match err {
        // ERROR_OFFSET must point inside the request's range.
        DeviceError::Media { offset, .. } => Some((*offset).max(request.offset)),
        _ => None,
    };
    tracing::warn!(command = request.command, offset = request.offset, length = request.length, error = %err, "request failed");
    error_reply(out, session, request, err.errno(), &err.to_string(), offset);
}

async fn execute(
    session: &Negotiated,
    request: Request,
    payload: Option<Vec<u8>>,
    outbox: &mut Outbox<'_>,
) -> io::Result<()> {
    let out = &mut outbox.batch;
    if let Err((error, message)) = validate(session, &request) {
        tracing::debug!(command = request.command, error, %message, "request rejected");
        error_reply(out, session, &request, error, &message, None);
        return Ok(());
    }
    let device = &session.export.device;
    let offset = request.offset;
    let length = u64::from(request.length);
    let fua = request.flags & cflag::FUA != 0;
    let result = match request.command {
        cmd::READ if request.length <= INLINE_READ_BYTES => {
            read_reply(out, session, &request);
            return Ok(());
        }
        cmd::READ => {
            let mut own = Vec::new();
            read_reply(&mut own, session, &request);
            return outbox.push(own).await;
        }
        cmd::WRITE => {
            let data = payload.unwrap_or_default();
            device.write_at(offset, &data)
        }
        cmd::WRITE_ZEROES => {
            let no_hole = request.flags & cflag::NO_HOLE != 0;
            if request.flags & cflag::FAST_ZERO != 0 && no_hole {
                // Writing explicit zeros is no faster than a WRITE: the spec asks
                // us to fail fast and leave the data alone.
                let message = "zeroing with NO_HOLE is not faster than writing";
                error_reply(out, session, &request, errno::ENOTSUP, message, None);
                return Ok(());
            }
            device.write_zeroes(offset, length, !no_hole)
        }
        cmd::TRIM => device.write_zeroes(offset, length, true),
        cmd::CACHE => Ok(()),
        cmd::BLOCK_STATUS => {
            block_status_reply(out, session, &request);
            return Ok(());
        }
        cmd::FLUSH => {
            let device = Arc::clone(device);
            durable_reply(session, request, outbox.sender, move || device.flush());
            return Ok(());
        }
        _ => unreachable!("validate() admits only known commands"),
    };
    match result {
        Err(err) => device_error_reply(out, session, &request, &err),
        Ok(()) if fua && length > 0 => {
            let device = Arc::clone(device);
            durable_reply(session, request, outbox.sender, move || {
                device.flush_range(offset, length)
            });
        }
        Ok(()) => ok_reply(out, &request),
    }
    Ok(())
}

/// Runs `persist` on the blocking pool and replies when it is done, without
/// holding up the requests behind it.
fn durable_reply(
    session: &Negotiated,
    request: Request,
    replies: &ReplySender,
    persist: impl FnOnce() -> Result<(), DeviceError> + Send + 'static,
) {
    let replies = replies.clone();
    let session = session.clone();
    // Not detached for long: `transmit` waits for every sender (this task holds one)
    // before it returns.
    tokio::task::spawn_blocking(move || {
        let mut reply = Vec::with_capacity(64);
        match persist() {
            Ok(()) => ok_reply(&mut reply, &request),
            Err(err) => device_error_reply(&mut reply, &session, &request, &err),
        }
        let _ = replies.blocking_send(reply);
    });
}

/// Appends the reply to a READ: header and data built in place, or an error.
fn read_reply(out: &mut Vec<u8>, session: &Negotiated, request: &Request) {
    let device: &dyn BlockDevice = session.export.device.as_ref();
    let length = request.length as usize;
    let start = out.len();
    let header_len = if session.structured_replies {
        proto::CHUNK_HEADER_LEN + 8
    } else {
        proto::SIMPLE_REPLY_LEN
    };
    if session.structured_replies {
        if length == 0 {
            proto::encode_chunk_header(out, chunk::FLAG_DONE, chunk::NONE, request.cookie, 0);
            return;
        }
        proto::encode_chunk_header(
            out,
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            request.cookie,
            (8 + length) as u32,
        );
        out.extend_from_slice(&request.offset.to_be_bytes());
    } else {
        proto::encode_simple_reply(out, 0, request.cookie);
    }
    out.resize(start + header_len + length, 0);
    if let Err(err) = device.read_at(request.offset, &mut out[start + header_len..]) {
        out.truncate(start);
        device_error_reply(out, session, request, &err);
    }
}

/// Appends the reply to a BLOCK_STATUS for `base:allocation`.
fn block_status_reply(out: &mut Vec<u8>, session: &Negotiated, request: &Request) {
    let context = session.base_allocation.unwrap_or_default();
    let extents = match session
        .export
        .device
        .allocation(request.offset, u64::from(request.length))
    {
        Ok(extents) => extents,
        Err(err) => return device_error_reply(out, session, request, &err),
    };
    let limit = if request.flags & cflag::REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS_PER_REPLY
    };
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    for extent in extents {
        let flags = if extent.hole {
            state::HOLE | state::ZERO
        } else {
            0
        };
        // Extents of a u32-length request fit in u32; merge neighbours alike.
        let length = extent.length as u32;
        let full = descriptors.len() == limit;
        match descriptors.last_mut() {
            Some((last_length, last_flags)) if *last_flags == flags => *last_length += length,
            _ if full => break,
            _ => descriptors.push((length, flags)),
        }
    }
    if descriptors.is_empty() {
        // Zero-length request: describe nothing, successfully.
        return ok_reply(out, request);
    }
    proto::encode_chunk_header(
        out,
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        request.cookie,
        (4 + descriptors.len() * 8) as u32,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}
