//! The transmission phase of one connection: decode requests, validate them at
//! the boundary, run them against the export's device, and send replies.
//!
//! Shape: plain OS threads over a blocking socket, the way nbdkit serves a
//! connection, so that a request wakes the thread that handles it straight out
//! of `recv` (no event loop in between; the socket's `Read` polls for up to
//! 50 µs before it sleeps, see `server::RECV_POLL`):
//!
//! - The **request thread** (the caller of [`transmit`]) reads requests into a
//!   buffer and runs small ones in place: reads up to [`INLINE_READ_BYTES`],
//!   writes up to [`INLINE_WRITE_BYTES`], and the rest except FLUSH. Their
//!   replies go into a batch that is sent once the buffer holds no further
//!   complete request (or the batch is large), so a burst of small requests
//!   costs one `recv` and one `send` and no thread hand-off.
//! - **Workers** (up to [`OFFLOAD_SLOTS`] per connection, started on first
//!   need) run large reads and writes, FLUSH and the flush of FUA writes, so
//!   that receiving the next write payload overlaps copying the previous one
//!   into the image, and several large requests use every core. Large writes
//!   may run on the request thread instead, received whole or stored piece
//!   by piece as they arrive (see [`LargeWrites::choose`]). Their replies
//!   may complete out of order. A FLUSH with nothing else in flight and no
//!   further request received runs in place instead: the client is waiting
//!   for it, and handing it to a worker would only add a wake-up to its wait.
//! - Replies are sent without blocking by whichever thread made them; what the
//!   socket does not take at once is queued for the **reply thread**, which is
//!   the only one ever to block on writing. So writing never stops reading: a
//!   client may pipeline requests without reading replies, up to
//!   [`MAX_QUEUED_REPLY_BYTES`] of unread replies; past that the request thread
//!   stops reading requests until the client catches up.
//!
//! Large buffers (write payloads, read replies) are reused within a connection.
//! Shutdown is the caller's to signal: it sets `stopping` and then makes reads
//! of the socket see end-of-file once what the client already sent is read
//! (`shutdown(SHUT_RD)`). Requests read after that are answered `ESHUTDOWN`,
//! and a request cut off part-way is never answered (a large write stored in
//! pieces has stored the whole blocks that arrived; every other request cut
//! off has changed nothing).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, Scope, ScopedJoinHandle};

use super::export::{BlockDevice, DeviceError};
use super::handshake::Negotiated;
use super::proto::{self, cflag, chunk, cmd, errno, state, Request};
use super::MAX_PAYLOAD_BYTES;

/// Unread replies a connection may hold before it stops reading requests.
pub const MAX_QUEUED_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// Request buffer: large enough to take a burst of queued requests (or a good
/// part of a large write payload) per `recv`.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// The reply batch is sent once it reaches this size even if more requests are
/// waiting.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Initial capacity of the reply batch.
const BATCH_START_BYTES: usize = 64 * 1024;
/// Reads up to this length are built straight into the batch; longer ones go
/// to a worker and get a buffer of their own.
const INLINE_READ_BYTES: u32 = 64 * 1024;
/// Writes up to this length run in place, straight from the request buffer;
/// longer ones run as [`LargeWrites`] says.
const INLINE_WRITE_BYTES: u32 = 64 * 1024;
/// Offloaded requests running or waiting at once per connection (and the most
/// workers it starts); the request thread waits for a slot, which bounds
/// threads and memory per client.
const OFFLOAD_SLOTS: usize = 8;
/// Bytes of offloaded requests (payloads, replies to be built) at once per
/// connection; a single larger request still runs, alone.
const OFFLOAD_BYTES: usize = 32 * 1024 * 1024;
/// Large buffers kept for reuse per connection, and the largest kept.
const POOL_BUFFERS: usize = OFFLOAD_SLOTS;
const POOL_BUFFER_MAX_BYTES: usize = 2 * 1024 * 1024 + 4096;
/// Buffers smaller than this are not worth keeping.
const POOL_BUFFER_MIN_BYTES: usize = 64 * 1024;
/// At most this many already-sent requests are answered `ESHUTDOWN` on shutdown.
const MAX_REFUSED_ON_SHUTDOWN: usize = 65_536;
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

/// Where replies go: the write side of a connection, shared by its threads.
pub trait ReplyWriter: Sync {
    /// Writes a prefix of `buf` without blocking; `Ok(0)` when nothing fits now.
    fn write_now(&self, buf: &[u8]) -> io::Result<usize>;
    /// Writes a prefix of `buf`, waiting until at least one byte fits.
    fn write_blocking(&self, buf: &[u8]) -> io::Result<usize>;
    /// Every reply is written: ends the write direction.
    fn finish(&self) -> io::Result<()>;
}

/// Discards replies (the fuzz target's client does not read them).
impl ReplyWriter for io::Sink {
    fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn write_blocking(&self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn finish(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Locks `mutex`; a thread that panicked while holding it leaves nothing half
/// done that the others could trip over (every update is a few field writes).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Large buffers of one connection kept for reuse: a fresh 1 MiB allocation
/// costs a page fault per page on first touch. A buffer keeps its length, so a
/// write payload reusing it is not zero-filled again.
#[derive(Debug, Default)]
struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        lock(&self.spare).pop().unwrap_or_default()
    }

    fn give(&self, buffer: Vec<u8>) {
        if (POOL_BUFFER_MIN_BYTES..=POOL_BUFFER_MAX_BYTES).contains(&buffer.capacity()) {
            let mut spare = lock(&self.spare);
            if spare.len() < POOL_BUFFERS {
                spare.push(buffer);
            }
        }
    }
}

/// Replies on their way to the client. Any thread sends (without blocking);
/// what does not fit in the socket at once is queued for the reply thread
/// ([`Outbox::run_writer`]), which writes it in order, blocking as needed.
struct Outbox<'a, W> {
    writer: &'a W,
    pool: &'a BufferPool,
    state: Mutex<OutboxState>,
    /// Wakes the reply thread: replies queued, or closing.
    queued: Condvar,
    /// Wakes the request thread waiting for unread replies to drain.
    drained: Condvar,
}

#[derive(Debug, Default)]
struct OutboxState {
    /// Replies waiting, each with how much of it is already written.
    queue: VecDeque<(Vec<u8>, usize)>,
    /// Bytes queued or being written by the reply thread.
    unwritten: usize,
    /// The reply thread owns the write side: it has replies to write or is
    /// writing one. Other threads queue behind it.
    flushing: bool,
    writer_idle: bool,
    reader_waiting: bool,
    closed: bool,
    /// Writing failed: the client is gone; later replies are dropped.
    failed: Option<io::ErrorKind>,
}

fn write_failed(kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, "writing replies failed")
}

impl<'a, W: ReplyWriter> Outbox<'a, W> {
    fn new(writer: &'a W, pool: &'a BufferPool) -> Self {
        Self {
            writer,
            pool,
            state: Mutex::default(),
            queued: Condvar::new(),
            drained: Condvar::new(),
        }
    }

    /// Sends `reply` (one or more whole replies). On return `reply` is empty:
    /// written, or queued and replaced by a spare buffer.
    fn send(&self, reply: &mut Vec<u8>) -> io::Result<()> {
        if reply.is_empty() {
            return Ok(());
        }
        let mut state = lock(&self.state);
        if let Some(kind) = state.failed {
            reply.clear();
            return Err(write_failed(kind));
        }
        let mut written = 0;
        if !state.flushing {
            // Nobody else is writing: write in place, under the lock so that
            // replies never interleave; the socket never makes us wait here.
            while written < reply.len() {
                match self.writer.write_now(&reply[written..]) {
                    Ok(0) => break,
                    Ok(count) => written += count,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        self.fail(&mut state, err.kind());
                        reply.clear();
                        return Err(err);
                    }
                }
            }
            if written == reply.len() {
                reply.clear();
                return Ok(());
            }
            state.flushing = true;
            if state.writer_idle {
                self.queued.notify_one();
            }
        }
        let mut spare = self.pool.take();
        spare.clear();
        state.unwritten += reply.len() - written;
        state
            .queue
            .push_back((std::mem::replace(reply, spare), written));
        Ok(())
    }

    /// Waits while the client has [`MAX_QUEUED_REPLY_BYTES`] or more of
    /// replies left to read.
    fn wait_for_room(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        while state.unwritten >= MAX_QUEUED_REPLY_BYTES && state.failed.is_none() {
            state.reader_waiting = true;
            state = wait(&self.drained, state);
        }
        state.reader_waiting = false;
        match state.failed {
            Some(kind) => Err(write_failed(kind)),
            None => Ok(()),
        }
    }

    fn fail(&self, state: &mut OutboxState, kind: io::ErrorKind) {
        state.failed = Some(kind);
        state.queue.clear();
        state.unwritten = 0;
        self.drained.notify_all();
    }

    /// The reply thread: writes queued replies in order until closed and empty.
    fn run_writer(&self) {
        let mut state = lock(&self.state);
        loop {
            if let Some((reply, written)) = state.queue.pop_front() {
                drop(state);
                let result = write_all(self.writer, &reply[written..]);
                let count = reply.len() - written;
                self.pool.give(reply);
                state = lock(&self.state);
                match result {
                    Ok(()) => state.unwritten -= count,
                    Err(err) => self.fail(&mut state, err.kind()),
                }
                if state.reader_waiting && state.unwritten < MAX_QUEUED_REPLY_BYTES {
                    self.drained.notify_one();
                }
                continue;
            }
            state.flushing = false;
            if state.closed {
                return;
            }
            state.writer_idle = true;
            state = wait(&self.queued, state);
            state.writer_idle = false;
        }
    }

    /// The connection is unusable: drops queued replies and every later one.
    fn abandon(&self) {
        let mut state = lock(&self.state);
        if state.failed.is_none() {
            self.fail(&mut state, io::ErrorKind::BrokenPipe);
        }
    }

    /// No more replies will be sent: the reply thread writes what is queued and
    /// ends.
    fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        self.queued.notify_one();
    }

    /// Whether every reply was written.
    fn result(&self) -> io::Result<()> {
        match lock(&self.state).failed {
            Some(kind) => Err(write_failed(kind)),
            None => Ok(()),
        }
    }
}

fn write_all<W: ReplyWriter>(writer: &W, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match writer.write_blocking(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => buf = &buf[count..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Work handed from the request thread to the workers.
type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

/// The workers' queue, bounded by [`OFFLOAD_SLOTS`] and [`OFFLOAD_BYTES`].
struct Jobs<'a> {
    state: Mutex<JobsState<'a>>,
    /// Wakes an idle worker: a job is queued, or closing.
    ready: Condvar,
    /// Wakes the request thread waiting for a slot.
    freed: Condvar,
}

struct JobsState<'a> {
    queue: VecDeque<(Job<'a>, usize)>,
    /// Jobs queued or running, and their bytes.
    in_flight: usize,
    in_flight_bytes: usize,
    idle_workers: usize,
    submitter_waiting: bool,
    closed: bool,
}

impl<'a> Jobs<'a> {
    fn new() -> Self {
        Self {
            state: Mutex::new(JobsState {
                queue: VecDeque::new(),
                in_flight: 0,
                in_flight_bytes: 0,
                idle_workers: 0,
                submitter_waiting: false,
                closed: false,
            }),
            ready: Condvar::new(),
            freed: Condvar::new(),
        }
    }

    /// Whether no job is queued or running.
    fn is_idle(&self) -> bool {
        lock(&self.state).in_flight == 0
    }

    /// Queues `job` once there is room for it; `true` if no idle worker is
    /// left to take it.
    fn submit(&self, bytes: usize, job: Job<'a>) -> bool {
        let mut state = lock(&self.state);
        while state.in_flight > 0
            && (state.in_flight >= OFFLOAD_SLOTS || state.in_flight_bytes + bytes > OFFLOAD_BYTES)
        {
            state.submitter_waiting = true;
            state = wait(&self.freed, state);
        }
        state.submitter_waiting = false;
        state.in_flight += 1;
        state.in_flight_bytes += bytes;
        state.queue.push_back((job, bytes));
        if state.idle_workers > 0 {
            self.ready.notify_one();
        }
        state.queue.len() > state.idle_workers
    }

    /// A worker: runs jobs until closed and empty (or, with `until_idle`, until
    /// the queue is empty).
    fn work(&self, until_idle: bool) {
        let mut state = lock(&self.state);
        loop {
            if let Some((job, bytes)) = state.queue.pop_front() {
                drop(state);
                let done = JobDone { jobs: self, bytes };
                job();
                drop(done);
                state = lock(&self.state);
                continue;
            }
            if state.closed || until_idle {
                return;
            }
            state.idle_workers += 1;
            state = wait(&self.ready, state);
            state.idle_workers -= 1;
        }
    }

    /// No more jobs: workers finish the queue and end.
    fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }
}

/// Frees a job's slot when it ends, even by panicking (the request thread
/// would otherwise wait for the slot forever).
struct JobDone<'j, 'a> {
    jobs: &'j Jobs<'a>,
    bytes: usize,
}

impl Drop for JobDone<'_, '_> {
    fn drop(&mut self) {
        let mut state = lock(&self.jobs.state);
        state.in_flight -= 1;
        state.in_flight_bytes -= self.bytes;
        if state.submitter_waiting {
            self.jobs.freed.notify_one();
        }
    }
}

/// The request stream: a buffer over the client's side of the socket.
struct Requests<R> {
    source: R,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last request was a large write whose payload was received into a
    /// buffer of its own: the next receive into an empty buffer takes just
    /// a request header, so that if another large write follows, its payload
    /// goes straight from the socket into its own buffer too instead of the
    /// first part of it into this buffer and then copied (the server's user
    /// time per MiB of 1 MiB writes over TCP went from ~50 to ~41 µs, of
    /// ~290 µs in all). It takes as many receives as before: one for the
    /// header, one for the payload.
    header_only: bool,
}

fn end_of_file() -> io::Error {
    io::ErrorKind::UnexpectedEof.into()
}

impl<R: Read> Requests<R> {
    fn new(source: R) -> Self {
        Self {
            source,
            buffer: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            header_only: false,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..self.end]
    }

    fn consume(&mut self, count: usize) {
        self.start += count;
        debug_assert!(self.start <= self.end);
    }

    /// Receives more after what is buffered; `Ok(false)` at end-of-file.
    fn fill(&mut self) -> io::Result<bool> {
        self.fill_upto(self.buffer.len())
    }

    /// Like [`Self::fill`], receiving no further than `limit` bytes into the
    /// buffer.
    fn fill_upto(&mut self, limit: usize) -> io::Result<bool> {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        debug_assert!(
            self.end < limit.min(self.buffer.len()),
            "fill() on a full buffer"
        );
        loop {
            match self.source.read(&mut self.buffer[self.end..limit]) {
                Ok(0) => return Ok(false),
                Ok(count) => {
                    self.end += count;
                    return Ok(true);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Receives until `count` bytes (at most the buffer's size) are buffered.
    fn buffer_at_least(&mut self, count: usize) -> io::Result<&[u8]> {
        while self.end - self.start < count {
            if !self.fill()? {
                return Err(end_of_file());
            }
        }
        Ok(&self.buffer[self.start..self.start + count])
    }

    /// The next request header; `None` if the client closed between requests.
    fn header(&mut self) -> Result<Option<Request>, TransmissionError> {
        let limit = match std::mem::take(&mut self.header_only) {
            true => proto::REQUEST_LEN,
            false => self.buffer.len(),
        };
        while self.end - self.start < proto::REQUEST_LEN {
            if !self.fill_upto(limit.max(self.end - self.start + 1))? {
                if self.start == self.end {
                    return Ok(None);
                }
                return Err(end_of_file().into());
            }
        }
        let header = self.buffered().first_chunk().ok_or_else(end_of_file)?;
        let request = Request::decode(header).map_err(TransmissionError::BadMagic)?;
        self.consume(proto::REQUEST_LEN);
        Ok(Some(request))
    }

    /// Reads a `length`-byte payload into `payload` (reused: only bytes past its
    /// old length are zero-filled first). What is buffered is copied; the rest
    /// goes straight from the socket into the payload.
    fn payload(&mut self, length: usize, mut payload: Vec<u8>) -> io::Result<Vec<u8>> {
        payload.resize(length, 0);
        let from_buffer = (self.end - self.start).min(length);
        payload[..from_buffer].copy_from_slice(&self.buffered()[..from_buffer]);
        self.consume(from_buffer);
        self.source.read_exact(&mut payload[from_buffer..])?;
        self.header_only = self.start == self.end;
        Ok(payload)
    }

    /// Stores a write's payload of `length` bytes at `offset` on `device` as
    /// it arrives: each piece received into the request buffer is stored
    /// (except a last partial `alignment` unit of the image, which waits for
    /// the rest of it) before more is received. Once the device fails, the
    /// rest of the payload is read and dropped. The outer result is the
    /// socket's, the inner one the device's.
    ///
    /// A payload cut off part-way has had its first pieces stored: as with a
    /// disk that loses power during a write, a write never acknowledged may
    /// have happened in part.
    fn store_in_pieces(
        &mut self,
        device: &dyn BlockDevice,
        offset: u64,
        length: u64,
        alignment: u64,
    ) -> io::Result<Result<(), DeviceError>> {
        let mut done = 0;
        while done < length {
            let left = length - done;
            let have = ((self.end - self.start) as u64).min(left);
            let take = if have == left {
                have
            } else {
                let at = offset + done;
                ((at + have) & !(alignment - 1)).saturating_sub(at)
            };
            if take == 0 {
                if !self.fill()? {
                    return Err(end_of_file());
                }
                continue;
            }
            let piece = &self.buffer[self.start..self.start + take as usize];
            let stored = device.write_piece_at(offset + done, piece, done == 0);
            self.consume(take as usize);
            done += take;
            if let Err(err) = stored {
                // `length` is a request's, so the rest fits in a u32.
                self.skip((length - done) as u32)?;
                return Ok(Err(err));
            }
        }
        Ok(Ok(()))
    }

    /// Reads and drops `length` bytes of payload.
    fn skip(&mut self, length: u32) -> io::Result<()> {
        let mut left = length as usize;
        loop {
            let count = (self.end - self.start).min(left);
            self.consume(count);
            left -= count;
            if left == 0 {
                return Ok(());
            }
            if !self.fill()? {
                return Err(end_of_file());
            }
        }
    }
}

/// Runs the transmission phase until DISC, end-of-file, shutdown or a fatal
/// error, reading requests from `reader` and writing replies to `writer`.
/// Every request read is answered before this returns (unless the socket
/// itself fails). `stopping` set means the server is shutting down; see the
/// module docs.
///
/// `large_writes`: where writes longer than [`INLINE_WRITE_BYTES`] run.
pub fn transmit<R: Read, W: ReplyWriter>(
    reader: R,
    writer: &W,
    session: &Negotiated,
    stopping: &AtomicBool,
    large_writes: LargeWrites,
) -> Result<Ending, TransmissionError> {
    let span = tracing::Span::current();
    let pool = BufferPool::default();
    let outbox = Outbox::new(writer, &pool);
    // Declared last: its jobs borrow the rest.
    let jobs = Jobs::new();
    thread::scope(|scope| {
        let reply_thread = spawn(scope, "nbd-replies", &span, || outbox.run_writer())?;
        let mut connection = Connection {
            session,
            outbox: &outbox,
            pool: &pool,
            jobs: &jobs,
            scope,
            span: &span,
            workers: Vec::new(),
            batch: Vec::with_capacity(BATCH_START_BYTES),
            stopping,
            large_writes,
        };
        let outcome = connection.serve(&mut Requests::new(reader));
        if outcome.is_err() {
            // The stream cannot be trusted (or is gone): drop the replies and
            // cut a write the reply thread may be blocked in.
            outbox.abandon();
            let _ = writer.finish();
        }
        // Finish what was accepted: replies of requests run here, then the
        // offloaded requests, then every queued reply.
        let sent = outbox.send(&mut connection.batch);
        jobs.close();
        let mut panicked = None;
        for worker in connection.workers {
            panicked = panicked.or(worker.join().err());
        }
        outbox.close();
        panicked = panicked.or(reply_thread.join().err());
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
        let ending = outcome?;
        sent?;
        outbox.result()?;
        writer.finish()?;
        Ok(ending)
    })
}

/// The fewest CPUs this process may run on for large writes over TCP to go
/// to workers.
const OFFLOAD_WRITES_MIN_CPUS: usize = 3;

/// Where writes longer than [`INLINE_WRITE_BYTES`] run on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeWrites {
    /// The payload is received into a buffer of its own, then a worker stores
    /// it while the request thread receives the next.
    Workers,
    /// The payload is received into a buffer of its own, then stored on the
    /// request thread.
    InPlace,
    /// Stored on the request thread a piece at a time as it arrives, straight
    /// from the request buffer, when the device takes pieces
    /// ([`BlockDevice::piece_alignment`]; else as [`Self::Workers`]).
    Pieces,
}

impl LargeWrites {
    /// The name [`LARGE_WRITES_VAR`] takes and the log shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Workers => "workers",
            Self::InPlace => "in-place",
            Self::Pieces => "pieces",
        }
    }

    /// Where large writes run on a connection (`tcp`: over TCP, else a Unix
    /// socket). Measured on the 2-core reference machine, 1 MiB writes at QD8,
    /// interleaved runs:
    ///
    /// - Over a Unix socket the client can have no more in flight than its
    ///   own send buffer (~200 KiB by default), and it stalls whenever the
    ///   server stops receiving. Pieces keep the server receiving: each piece
    ///   is what one `recv` brought (at most the 256 KiB request buffer), stored
    ///   while the client refills the socket, from a buffer still in cache,
    ///   with no hand-off between threads. tmpfs: pieces 4,160-4,660 MiB/s,
    ///   workers 2,030-3,440, nbdkit 2,700-2,970; ext4: pieces 2,710-3,610,
    ///   workers 1,850-2,790, nbdkit 2,430-2,590.
    /// - Over TCP the socket's receive buffer (megabytes) takes the next
    ///   payloads while one is stored, and a whole payload comes in one
    ///   `recv` (`MSG_WAITALL`) where pieces would cost one per segment burst
    ///   (tmpfs: in place 4,180-4,350 MiB/s, pieces 3,340-4,170). With two
    ///   cores or fewer, one of them busy with the client, a worker only takes
    ///   turns with the request thread, each hand-off costs a wake-up and
    ///   moves the payload to another core's cache: in place (ext4: in place
    ///   3,850-3,970 MiB/s, handed off 3,350-3,460, nbdkit 3,200-3,930; tmpfs
    ///   4,810-5,490 against 3,450-5,300). With more cores, workers.
    ///
    /// [`LARGE_WRITES_VAR`] set to `workers`, `in-place` or `pieces`
    /// overrides the choice, so that tests run every path on any machine (and
    /// for measuring them).
    pub fn choose(tcp: bool) -> Self {
        static CHOSEN: OnceLock<Option<LargeWrites>> = OnceLock::new();
        let chosen = CHOSEN.get_or_init(|| {
            let value = std::env::var(LARGE_WRITES_VAR).ok()?;
            let all = [Self::Workers, Self::InPlace, Self::Pieces];
            let found = all.into_iter().find(|mode| mode.name() == value);
            if found.is_none() {
                tracing::warn!(
                    value,
                    "{LARGE_WRITES_VAR} takes 'workers', 'in-place' or 'pieces'; choosing by transport and CPU count"
                );
            }
            found
        });
        let mode = chosen.unwrap_or_else(|| {
            let few_cpus = thread::available_parallelism()
                .map_or(true, |cpus| cpus.get() < OFFLOAD_WRITES_MIN_CPUS);
            match (tcp, few_cpus) {
                (false, _) => Self::Pieces,
                (true, true) => Self::InPlace,
                (true, false) => Self::Workers,
            }
        });
        tracing::debug!(large_writes = mode.name(), tcp, "large NBD writes");
        mode
    }
}

/// Environment variable that chooses where large writes run (see
/// [`LargeWrites::choose`]).
pub const LARGE_WRITES_VAR: &str = "EMULATOR_NBD_LARGE_WRITES";

fn spawn<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    name: &str,
    span: &tracing::Span,
    body: impl FnOnce() + Send + 'scope,
) -> io::Result<ScopedJoinHandle<'scope, ()>> {
    let span = span.clone();
    thread::Builder::new()
        .name(name.into())
        .spawn_scoped(scope, move || {
            let _entered = span.enter();
            body();
        })
}

/// The request thread's view of one connection.
/// `'a` is what jobs may borrow; `'env` the borrow of the job queue itself.
struct Connection<'scope, 'env, 'a, W> {
    session: &'a Negotiated,
    outbox: &'a Outbox<'a, W>,
    pool: &'a BufferPool,
    jobs: &'env Jobs<'a>,
    scope: &'scope Scope<'scope, 'env>,
    span: &'a tracing::Span,
    workers: Vec<ScopedJoinHandle<'scope, ()>>,
    /// Replies of requests run in place, not yet sent.
    batch: Vec<u8>,
    stopping: &'a AtomicBool,
    large_writes: LargeWrites,
}

impl<'scope, 'env, 'a: 'env, W: ReplyWriter> Connection<'scope, 'env, 'a, W> {
    fn serve<R: Read>(&mut self, requests: &mut Requests<R>) -> Result<Ending, TransmissionError> {
        match self.serve_requests(requests) {
            // A request only partly received when shutdown came was never
            // accepted.
            Err(TransmissionError::Io(err))
                if err.kind() == io::ErrorKind::UnexpectedEof
                    && self.stopping.load(Ordering::Acquire) =>
            {
                Ok(Ending::Shutdown)
            }
            outcome => outcome,
        }
    }

    fn serve_requests<R: Read>(
        &mut self,
        requests: &mut Requests<R>,
    ) -> Result<Ending, TransmissionError> {
        let mut refused = 0;
        loop {
            if !next_request_is_buffered(requests.buffered())
                || self.batch.len() >= WRITE_BATCH_BYTES
            {
                // The next request is not fully here yet: send what we have
                // before we wait, or a client that waits for replies would wait
                // forever.
                self.outbox.send(&mut self.batch)?;
                self.outbox.wait_for_room()?;
            }
            let Some(request) = requests.header()? else {
                return Ok(if self.stopping.load(Ordering::Acquire) {
                    Ending::Shutdown
                } else {
                    Ending::ClientClosed
                });
            };
            if request.command == cmd::DISC {
                return Ok(Ending::Disconnect);
            }
            if self.stopping.load(Ordering::Acquire) {
                // Sent before the client could know: answer, don't run.
                if request.command == cmd::WRITE {
                    requests.skip(request.length)?;
                }
                let message = "server is shutting down";
                let (session, batch) = (self.session, &mut self.batch);
                error_reply(batch, session, &request, errno::ESHUTDOWN, message, None);
                refused += 1;
                if refused == MAX_REFUSED_ON_SHUTDOWN {
                    return Ok(Ending::Shutdown);
                }
                continue;
            }
            self.execute(request, requests)?;
        }
    }

    /// Hands `job` to a worker, starting one if none is idle.
    fn offload(&mut self, bytes: usize, job: impl FnOnce() + Send + 'a) {
        if !self.jobs.submit(bytes, Box::new(job)) || self.workers.len() >= OFFLOAD_SLOTS {
            return;
        }
        let jobs = self.jobs;
        match spawn(self.scope, "nbd-worker", self.span, move || {
            jobs.work(false)
        }) {
            Ok(worker) => self.workers.push(worker),
            Err(err) => {
                tracing::warn!(%err, "cannot start a worker thread");
                if self.workers.is_empty() {
                    // Nobody else would ever run it.
                    self.jobs.work(true);
                }
            }
        }
    }

    /// Receives a large write's payload into a buffer of its own and hands
    /// the write (and the flush of a FUA write) to a worker.
    fn offload_write<R: Read>(
        &mut self,
        request: Request,
        requests: &mut Requests<R>,
    ) -> Result<(), TransmissionError> {
        let (session, outbox, pool) = (self.session, self.outbox, self.pool);
        let device = &session.export.device;
        let (offset, length) = (request.offset, u64::from(request.length));
        let fua = request.flags & cflag::FUA != 0;
        let payload = requests.payload(request.length as usize, pool.take())?;
        self.offload(payload.len(), move || {
            let mut reply = Vec::new();
            let result = device.write_at(offset, &payload);
            pool.give(payload);
            let result = result.and_then(|()| match fua {
                true => device.flush_range(offset, length),
                false => Ok(()),
            });
            match result {
                Ok(()) => ok_reply(&mut reply, &request),
                Err(err) => device_error_reply(&mut reply, session, &request, &err),
            }
            send_from_worker(outbox, &mut reply, &request);
        });
        Ok(())
    }

    fn execute<R: Read>(
        &mut self,
        request: Request,
        requests: &mut Requests<R>,
    ) -> Result<(), TransmissionError> {
        let session = self.session;
        let out = &mut self.batch;
        if request.command == cmd::WRITE && request.length > MAX_PAYLOAD_BYTES {
            // Keep the stream in step: the payload follows whether we want it or not.
            requests.skip(request.length)?;
            let message = format!(
                "write of {} bytes exceeds the maximum payload of {MAX_PAYLOAD_BYTES}",
                request.length
            );
            error_reply(out, session, &request, errno::EINVAL, &message, None);
            return Ok(());
        }
        if let Err((error, message)) = validate(session, &request) {
            if request.command == cmd::WRITE {
                requests.skip(request.length)?;
            }
            tracing::debug!(command = request.command, error, %message, "request rejected");
            error_reply(out, session, &request, error, &message, None);
            return Ok(());
        }
        let device = &session.export.device;
        let offset = request.offset;
        let length = u64::from(request.length);
        let fua = request.flags & cflag::FUA != 0;
        let (outbox, pool) = (self.outbox, self.pool);
        let result = match request.command {
            cmd::READ if request.length <= INLINE_READ_BYTES => {
                read_reply(out, session, &request);
                return Ok(());
            }
            cmd::READ => {
                // Its reply will be queued for the client: first make sure the
                // client is reading what is queued already, so that a client
                // that sends large reads and never reads the replies cannot
                // make the queue grow without bound.
                self.outbox.send(&mut self.batch)?;
                self.outbox.wait_for_room()?;
                self.offload(request.length as usize, move || {
                    let mut reply = pool.take();
                    reply.clear();
                    read_reply(&mut reply, session, &request);
                    send_from_worker(outbox, &mut reply, &request);
                    pool.give(reply);
                });
                return Ok(());
            }
            cmd::WRITE if request.length <= INLINE_WRITE_BYTES => {
                let length = request.length as usize;
                let result = device.write_at(offset, requests.buffer_at_least(length)?);
                requests.consume(length);
                result
            }
            cmd::WRITE if self.large_writes == LargeWrites::Pieces => {
                match device.piece_alignment() {
                    // A piece's unit must fit in the request buffer.
                    Some(alignment) if alignment <= READ_BUFFER_BYTES as u64 => {
                        requests.store_in_pieces(device.as_ref(), offset, length, alignment)?
                    }
                    _ => return self.offload_write(request, requests),
                }
            }
            cmd::WRITE if self.large_writes == LargeWrites::InPlace => {
                let payload = requests.payload(request.length as usize, pool.take())?;
                let result = device.write_at(offset, &payload);
                pool.give(payload);
                result
            }
            cmd::WRITE => return self.offload_write(request, requests),
            cmd::WRITE_ZEROES => {
                let no_hole = request.flags & cflag::NO_HOLE != 0;
                if request.flags & cflag::FAST_ZERO != 0 && (no_hole || !device.zeroes_fast()) {
                    // Writing explicit zeros is no faster than a WRITE: the spec asks
                    // us to fail fast and leave the data alone.
                    let message = "zeroing here is not faster than writing";
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
            cmd::FLUSH if requests.buffered().is_empty() && self.jobs.is_idle() => {
                // Nothing else to do until the client sends more: a wake-up
                // of a worker would only add to its wait.
                device.flush()
            }
            cmd::FLUSH => {
                self.offload(0, move || {
                    let mut reply = Vec::new();
                    match device.flush() {
                        Ok(()) => ok_reply(&mut reply, &request),
                        Err(err) => device_error_reply(&mut reply, session, &request, &err),
                    }
                    send_from_worker(outbox, &mut reply, &request);
                });
                return Ok(());
            }
            _ => unreachable!("validate() admits only known commands"),
        };
        match result {
            Err(err) => device_error_reply(out, session, &request, &err),
            Ok(()) if fua && length > 0 => {
                self.offload(0, move || {
                    let mut reply = Vec::new();
                    match device.flush_range(offset, length) {
                        Ok(()) => ok_reply(&mut reply, &request),
                        Err(err) => device_error_reply(&mut reply, session, &request, &err),
                    }
                    send_from_worker(outbox, &mut reply, &request);
                });
            }
            Ok(()) => ok_reply(out, &request),
        }
        Ok(())
    }
}

fn send_from_worker<W: ReplyWriter>(
    outbox: &Outbox<'_, W>,
    reply: &mut Vec<u8>,
    request: &Request,
) {
    if let Err(err) = outbox.send(reply) {
        tracing::debug!(cookie = request.cookie, %err, "reply dropped: connection lost");
    }
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
        // A zero-length request: a successful reply must hold one chunk of at
        // least one descriptor, and there is nothing to describe.
        let message = "block status of zero bytes";
        return error_reply(out, session, request, errno::EINVAL, message, None);
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
