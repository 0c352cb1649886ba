//! The transmission phase of one connection: decode requests, validate them at
//! the boundary, run them against the export's device, and send replies.
//!
//! Shape: one task per connection is an event loop over four things: shutdown,
//! progress writing queued replies, replies coming back from offloaded work, and
//! new requests. Small requests run in place and append their replies to a batch
//! that is queued when no further complete request is buffered, so a burst of
//! small requests costs one read and one write syscall and no thread hand-off.
//! Large reads, FLUSH and FUA run on the blocking pool (a bounded
//! number at a time per connection) and hand their replies back through a
//! channel, so replies may complete out of order and several large requests use
//! every core. Writing never stops reading: a client may pipeline requests without
//! reading replies, up to [`MAX_QUEUED_REPLY_BYTES`] of unread replies; past that
//! the connection stops reading requests until the client catches up.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};

use super::export::{BlockDevice, DeviceError};
use super::handshake::Negotiated;
use super::proto::{self, cflag, chunk, cmd, errno, state, Request};
use super::MAX_PAYLOAD_BYTES;

/// Unread replies a connection may hold before it stops reading requests.
pub const MAX_QUEUED_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// The reply batch is queued once it reaches this size even if more requests are
/// waiting.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Initial capacity of the reply batch.
const BATCH_START_BYTES: usize = 64 * 1024;
/// Reads up to this length are built straight into the batch; longer ones are
/// offloaded and get a buffer of their own.
const INLINE_READ_BYTES: u32 = 64 * 1024;
// INLINE_WRITES: writes of every size run in place (only their FUA flush is
// offloaded). The payload has just been read on this thread and is hot in its
// cache: A/B runs of 1 MiB QD8 writes on the 2-core reference machine gave
// ~15% more throughput at ~30% less CPU per request than handing the copy and
// CRC to another thread. (Reads are the other way round.) The cost: a write to a
// page of a disk-backed image that is not in the page cache stalls the loop
// while the kernel reads that page in.

/// Offloaded requests running at once per connection; the request loop waits for
/// a slot, which bounds threads and memory per client.
const OFFLOAD_SLOTS: usize = 8;
/// At most this many already-sent requests are answered `ESHUTDOWN` on shutdown.
const MAX_REFUSED_ON_SHUTDOWN: usize = 65_536;
/// On shutdown, requests arriving within this time of the previous one are still
/// answered (with ESHUTDOWN). It also lets the runtime notice data that is
/// already in the socket but not yet reported readable.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(50);
/// On shutdown, how long to wait for the rest of a request already begun.
const REST_OF_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
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

/// Replies of one connection on their way to the socket.
struct Replies {
    /// Replies of requests run in place, not yet queued.
    batch: Vec<u8>,
    /// Replies ready to write, oldest first, and how much of the first is written.
    queue: VecDeque<Vec<u8>>,
    written: usize,
    queued_bytes: usize,
    /// Where offloaded work sends its replies.
    done: mpsc::Sender<Vec<u8>>,
    slots: Arc<Semaphore>,
}

impl Replies {
    fn enqueue(&mut self, reply: Vec<u8>) {
        if !reply.is_empty() {
            self.queued_bytes += reply.len();
            self.queue.push_back(reply);
        }
    }

    fn enqueue_batch(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_START_BYTES));
            self.enqueue(batch);
        }
    }

    fn wrote(&mut self, count: usize) {
        self.written += count;
        self.queued_bytes -= count;
        if self
            .queue
            .front()
            .is_some_and(|front| self.written == front.len())
        {
            self.queue.pop_front();
            self.written = 0;
        }
    }

    async fn write_all<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        self.enqueue_batch();
        while let Some(front) = self.queue.front() {
            writer.write_all(&front[self.written..]).await?;
            let remaining = front.len() - self.written;
            self.wrote(remaining);
        }
        Ok(())
    }

    /// Runs `work` on the blocking pool, where it builds a reply that is written
    /// as soon as it is ready.
    async fn offload(
        &mut self,
        request: Request,
        work: impl FnOnce(&mut Vec<u8>) + Send + 'static,
    ) -> io::Result<()> {
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("offload slots closed"))?;
        let done = self.done.clone();
        // Not detached for long: `transmit` drains every reply (this task holds a
        // sender) before it returns.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut reply = Vec::new();
            work(&mut reply);
            if done.blocking_send(reply).is_err() {
                tracing::debug!(cookie = request.cookie, "reply dropped: connection closed");
            }
        });
        Ok(())
    }
}

/// Runs the transmission phase until DISC, EOF, shutdown or a fatal error. Every
/// request read is answered before this returns (unless the socket itself fails).
pub async fn transmit<R, W>(
    reader: &mut BufReader<R>,
    mut writer: W,
    session: &Negotiated,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Ending, TransmissionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (done, mut completed) = mpsc::channel(OFFLOAD_SLOTS);
    let mut replies = Replies {
        batch: Vec::with_capacity(BATCH_START_BYTES),
        queue: VecDeque::new(),
        written: 0,
        queued_bytes: 0,
        done,
        slots: Arc::new(Semaphore::new(OFFLOAD_SLOTS)),
    };
    let outcome = serve_requests(
        reader,
        &mut writer,
        session,
        &mut replies,
        &mut completed,
        &mut shutdown,
    )
    .await;
    // Our sender goes; offloaded work holds the others until it has replied.
    let (dummy, _) = mpsc::channel(1);
    drop(std::mem::replace(&mut replies.done, dummy));
    let drained = match &outcome {
        Ok(_) => {
            async {
                // Finish what was accepted: queued replies, then offloaded ones.
                replies.write_all(&mut writer).await?;
                while let Some(reply) = completed.recv().await {
                    writer.write_all(&reply).await?;
                }
                writer.flush().await?;
                writer.shutdown().await
            }
            .await
        }
        Err(_) => {
            // The socket is unusable; still wait for offloaded work so that
            // nothing outlives the connection.
            while completed.recv().await.is_some() {}
            Ok(())
        }
    };
    let ending = outcome?;
    drained?;
    Ok(ending)
}

async fn serve_requests<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    session: &Negotiated,
    replies: &mut Replies,
    completed: &mut mpsc::Receiver<Vec<u8>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Ending, TransmissionError> {
    loop {
        if *shutdown.borrow() {
            refuse_received(reader, session, replies).await?;
            return Ok(Ending::Shutdown);
        }
        if !next_request_is_buffered(reader.buffer()) || replies.batch.len() >= WRITE_BATCH_BYTES {
            // The next request is not fully here yet: queue what we have before we
            // wait, or a client that waits for replies would wait forever.
            replies.enqueue_batch();
        }
        let may_read = replies.queued_bytes < MAX_QUEUED_REPLY_BYTES;
        let writing = !replies.queue.is_empty();
        // Every branch is cancel-safe (`write` writes nothing if cancelled,
        // `recv` and `fill_buf` take nothing), so losing a race loses nothing.
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                refuse_received(reader, session, replies).await?;
                return Ok(Ending::Shutdown);
            }
            written = write_front(writer, replies), if writing => {
                let count = written?;
                if count == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                }
                replies.wrote(count);
                continue;
            }
            Some(reply) = completed.recv(), if may_read => {
                replies.enqueue(reply);
                continue;
            }
            ready = reader.fill_buf(), if may_read => {
                if ready?.is_empty() {
                    return Ok(Ending::ClientClosed);
                }
            }
        }
        // A request that is only partly here when shutdown comes was never
        // accepted: drop it rather than wait for a client that may never finish it.
        // A request already here in full is still taken (polled first).
        let incoming = tokio::select! {
            biased;
            incoming = read_request(reader) => incoming?,
            _ = shutdown.changed() => return Ok(Ending::Shutdown),
        };
        match incoming {
            Incoming::Disconnect => return Ok(Ending::Disconnect),
            Incoming::Request(request, payload) => {
                execute(session, request, payload, replies).await?
            }
            Incoming::OversizedWrite(request) => {
                let message = format!(
                    "write of {} bytes exceeds the maximum payload of {MAX_PAYLOAD_BYTES}",
                    request.length
                );
                error_reply(
                    &mut replies.batch,
                    session,
                    &request,
                    errno::EINVAL,
                    &message,
                    None,
                );
            }
        }
    }
}

/// On shutdown, requests the client has already sent (buffered here or waiting
/// in the socket) are answered with `NBD_ESHUTDOWN`, as the spec asks, rather
/// than dropped unanswered. Only what is already here (or arrives within
/// [`SHUTDOWN_GRACE`] of the last one) counts, and a request cut off part-way
/// was never accepted.
async fn refuse_received<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    session: &Negotiated,
    replies: &mut Replies,
) -> Result<(), TransmissionError> {
    for _ in 0..MAX_REFUSED_ON_SHUTDOWN {
        match tokio::time::timeout(SHUTDOWN_GRACE, reader.fill_buf()).await {
            Ok(Ok(buffered)) if !buffered.is_empty() => {}
            _ => return Ok(()),
        }
        let incoming =
            match tokio::time::timeout(REST_OF_REQUEST_TIMEOUT, read_request(reader)).await {
                Ok(incoming) => incoming?,
                Err(_) => return Ok(()),
            };
        match incoming {
            Incoming::Disconnect => return Ok(()),
            Incoming::Request(request, _) | Incoming::OversizedWrite(request) => {
                let message = "server is shutting down";
                error_reply(
                    &mut replies.batch,
                    session,
                    &request,
                    errno::ESHUTDOWN,
                    message,
                    None,
                );
            }
        }
    }
    Ok(())
}

/// Whether `buffered` holds the whole next request (header and any payload), so
/// that it can run without waiting on the client.
fn next_request_is_buffered(buffered: &[u8]) -> bool {
    let Some(header) = buffered.first_chunk::<{ proto::REQUEST_LEN }>() else {
        return false;
    };
    match Request::decode(header) {
        Ok(request) if request.command == cmd::WRITE => {
            buffered.len() - proto::REQUEST_LEN >= request.length as usize
        }
        _ => true,
    }
}

async fn write_front<W: AsyncWrite + Unpin>(
    writer: &mut W,
    replies: &Replies,
) -> io::Result<usize> {
    match replies.queue.front() {
        Some(front) => writer.write(&front[replies.written..]).await,
        None => Ok(0),
    }
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
            // What is already buffered is copied; the rest goes straight from the
            // socket into the payload's spare capacity (no zero-fill, and no second
            // copy through the read buffer).
            let length = request.length as usize;
            let mut data = Vec::with_capacity(length);
            let buffered = reader.buffer();
            let from_buffer = buffered.len().min(length);
            data.extend_from_slice(&buffered[..from_buffer]);
            reader.consume(from_buffer);
            if data.len() < length {
                // The read buffer is empty now, so reading past it keeps order.
                reader
                    .get_mut()
                    .take((length - data.len()) as u64)
                    .read_to_end(&mut data)
                    .await?;
            }
            if data.len() < length {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            Ok(Incoming::Request(request, Some(data)))
        }
        _ => Ok(Incoming::Request(request, None)),
    }
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
    replies: &mut Replies,
) -> io::Result<()> {
    let out = &mut replies.batch;
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
            // Large reads run beside the request loop so that several of them (and
            // the next requests' socket reads) use every core.
            let session = session.clone();
            return replies
                .offload(request, move |reply| read_reply(reply, &session, &request))
                .await;
        }
        cmd::WRITE => {
            // Writes of every size run in place: see INLINE_WRITES.
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
            let session = session.clone();
            return replies
                .offload(request, move |reply| match session.export.device.flush() {
                    Ok(()) => ok_reply(reply, &request),
                    Err(err) => device_error_reply(reply, &session, &request, &err),
                })
                .await;
        }
        _ => unreachable!("validate() admits only known commands"),
    };
    match result {
        Err(err) => device_error_reply(out, session, &request, &err),
        Ok(()) if fua && length > 0 => {
            let session = session.clone();
            replies
                .offload(request, move |reply| {
                    match session.export.device.flush_range(offset, length) {
                        Ok(()) => ok_reply(reply, &request),
                        Err(err) => device_error_reply(reply, &session, &request, &err),
                    }
                })
                .await?;
        }
        Ok(()) => ok_reply(out, &request),
    }
    Ok(())
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
    out.reserve(header_len + length);
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
    if let Err(err) = device.read_append(request.offset, length, out) {
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
