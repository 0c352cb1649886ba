//! `workload run`: keeps `queue_depth` requests in flight for a while —
//! random non-overlapping writes, a FLUSH every so many writes, read-backs of
//! blocks with no write in flight — records it all, and reconnects (round
//! robin over the URIs) when the connection dies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::client::{Client, NbdUri, RequestError};
use super::content::{fill_block, Prng};
use super::record::{Header, Line, RecordWriter, RECORD_KIND, RECORD_VERSION};
use super::verify::{identify, Found};
use super::WorkloadError;
use crate::nbd::proto::tflag;

/// First pause between connection attempts; it doubles up to the maximum.
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// Longest pause between connection attempts.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Tries at finding a range that overlaps nothing in flight before waiting
/// for a completion instead.
const PICK_ATTEMPTS: u32 = 8;
/// Recent writes read-backs choose from.
const RECENT_WRITES: usize = 1024;
/// Mismatches described in the summary (all are counted).
const MISMATCH_DETAILS: usize = 32;
/// Final FLUSH attempts (each after a reconnect if the connection died).
const FINAL_FLUSH_ATTEMPTS: u32 = 3;
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Export URIs; the first is used first, the others after failures.
    pub uris: Vec<String>,
    /// Seed of the content and of every choice.
    pub seed: u64,
    /// How long to keep requests going.
    pub duration: Duration,
    /// Requests in flight.
    pub queue_depth: usize,
    /// Every K-th write has FUA (0: none).
    pub fua_every: u64,
    /// A FLUSH after every K writes (0: only the final one).
    pub flush_every: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Longest write or read, in blocks.
    pub max_blocks: u32,
    /// How long to keep trying to connect after the connection dies.
    pub reconnect_timeout: Duration,
    /// How long a request may wait for its reply before the connection is
    /// given up as dead.
    pub request_timeout: Duration,
    /// The record file to create.
    pub record: PathBuf,
    /// Power cuts of the volume's system: a count its caller moves before
    /// and after each (odd while one may be under way; a fixed odd count:
    /// one may come at any time). After a reconnect that finds it moved, or
    /// odd, read-backs no longer expect the writes that were not durable
    /// (acknowledged, without FUA, and not covered by an acknowledged
    /// FLUSH): a power cut may have lost them. None: every acknowledged
    /// write must read back (a killed process loses none).
    pub power_cuts: Option<Arc<AtomicU64>>,
}

/// A read-back that did not find the last acknowledged write.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// Block index.
    pub block: u64,
    /// Byte offset.
    pub offset: u64,
    /// The last acknowledged write of the block.
    pub expected_seq: u64,
    /// What was there.
    pub found: Found,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Seed.
    pub seed: u64,
    /// The record file.
    pub record: PathBuf,
    /// Export size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Writes sent.
    pub writes_sent: u64,
    /// Writes acknowledged.
    pub writes_acked: u64,
    /// Writes failed.
    pub writes_failed: u64,
    /// Writes sent with FUA.
    pub fua_writes: u64,
    /// FLUSHes sent (the final one included).
    pub flushes_sent: u64,
    /// FLUSHes acknowledged.
    pub flushes_acked: u64,
    /// FLUSHes failed.
    pub flushes_failed: u64,
    /// Read-backs completed.
    pub reads: u64,
    /// Read-backs failed.
    pub reads_failed: u64,
    /// Blocks compared with their last acknowledged write.
    pub blocks_checked: u64,
    /// Blocks that did not hold it.
    pub mismatches: u64,
    /// The first few of them.
    pub mismatch_details: Vec<Mismatch>,
    /// Reconnects after a lost connection.
    pub reconnects: u64,
    /// Each reconnect's stall: first failed request to first request completed
    /// on the new connection.
    pub stalls_ms: Vec<f64>,
    /// The longest stall.
    pub stall_ms_max: f64,
    /// When each reconnect's first request completed, Unix time in ms (what
    /// `make bench-failover` measures a kill against).
    pub resumed_unix_ms: Vec<u64>,
    /// Wall time of the run.
    pub elapsed_ms: f64,
    /// Completed writes and reads per second.
    pub iops: f64,
    /// Bytes written (acknowledged) and read, per second, in MiB.
    pub mib_per_s: f64,
    /// Why the run stopped early (no connection within the timeout).
    pub gave_up: Option<String>,
    /// The final FLUSH was acknowledged: every acknowledged write is durable.
    pub final_flush_acked: bool,
}

/// Waits for `request` for at most `timeout`; past it, gives the connection up
/// (which fails every other request in flight on it too).
pub(super) async fn bounded<T>(
    client: &Client,
    timeout: Duration,
    request: impl std::future::Future<Output = Result<T, RequestError>>,
) -> Result<T, RequestError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(result) => result,
        Err(_) => {
            let why = format!("no reply within {} ms", timeout.as_millis());
            client.abandon(why.clone());
            Err(RequestError::ConnectionLost(why))
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The block's last write was acknowledged: it must hold it.
    Exact(u64),
    /// Its last write failed: it may or may not have landed.
    Uncertain,
}

#[derive(Debug)]
enum Op {
    Write {
        seq: u64,
        first: u64,
        count: u64,
        fua: bool,
    },
    Read {
        first: u64,
        count: u64,
        expected: Vec<Option<u64>>,
    },
    Flush {
        id: u64,
    },
}

impl Op {
    fn blocks(&self) -> std::ops::Range<u64> {
        match self {
            Op::Write { first, count, .. } | Op::Read { first, count, .. } => {
                *first..*first + *count
            }
            Op::Flush { .. } => 0..0,
        }
    }
}

#[derive(Debug)]
struct Completion {
    op: Op,
    generation: u64,
    result: Result<(), RequestError>,
    mismatches: Vec<Mismatch>,
}

/// The count of [`RunConfig::power_cuts`] now (0 without one).
fn config_power(cuts: &Option<Arc<AtomicU64>>) -> u64 {
    cuts.as_ref().map_or(0, |cuts| cuts.load(Ordering::SeqCst))
}

struct Runner {
    /// Ends the run early when set ([`run_until`]).
    stop: Arc<AtomicBool>,
    config: RunConfig,
    uris: Vec<NbdUri>,
    uri_index: usize,
    client: Client,
    /// Counts connections; completions of an older one do not end a stall.
    generation: u64,
    record: RecordWriter,
    prng: Prng,
    block_size: u64,
    size: u64,
    volume_blocks: u64,
    in_flight_blocks: HashSet<u64>,
    expected: HashMap<u64, Expect>,
    /// Blocks whose last acknowledged write is not durable yet.
    not_durable: HashSet<u64>,
    /// Those a FLUSH in flight covers, by its id.
    flush_covers: HashMap<u64, HashSet<u64>>,
    /// [`RunConfig::power_cuts`] when the current connection was made.
    power_seen: u64,
    recent_writes: VecDeque<(u64, u64)>,
    tasks: JoinSet<Completion>,
    next_seq: u64,
    next_flush_id: u64,
    /// The id of the final FLUSH, once sent.
    final_flush_id: Option<u64>,
    writes_since_flush: u64,
    /// The connection died and no new one was made yet.
    connection_lost: bool,
    /// When the current stall began (first failure), until a request completes
    /// on the new connection.
    stall_started: Option<Instant>,
    summary: RunSummary,
    bytes_written: u64,
    bytes_read: u64,
}

/// Runs the workload. `Err` only when nothing could start (bad arguments, no
/// connection, no record file); later trouble is in the summary.
pub async fn run(config: RunConfig) -> Result<RunSummary, WorkloadError> {
    run_until(config, Arc::new(AtomicBool::new(false))).await
}

/// [`run`], ending early (drain, final FLUSH, summary) once `stop` is set:
/// the scenario runner's workloads that run until its timeline ends.
pub async fn run_until(
    config: RunConfig,
    stop: Arc<AtomicBool>,
) -> Result<RunSummary, WorkloadError> {
    check_config(&config)?;
    let uris = config
        .uris
        .iter()
        .map(|uri| uri.parse::<NbdUri>())
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let (client, uri_index) = connect_any(&uris, &config, 0, started).await?;
    let size = client.size();
    let block_size = u64::from(config.block_size);
    let volume_blocks = size / block_size;
    if volume_blocks < u64::from(config.max_blocks) {
        return Err(WorkloadError::BadConfig(format!(
            "the export ({size} bytes) is smaller than --max-blocks {} blocks of {block_size}",
            config.max_blocks
        )));
    }
    let mut record = RecordWriter::create(
        &config.record,
        &Header {
            record: RECORD_KIND.into(),
            version: RECORD_VERSION,
            seed: config.seed,
            block_size: config.block_size,
            size,
            uris: config.uris.clone(),
        },
    )?;
    record.line(&Line::Connected {
        connected: config.uris[uri_index].clone(),
        size,
    })?;
    let summary = RunSummary {
        seed: config.seed,
        record: config.record.clone(),
        size,
        block_size: config.block_size,
        writes_sent: 0,
        writes_acked: 0,
        writes_failed: 0,
        fua_writes: 0,
        flushes_sent: 0,
        flushes_acked: 0,
        flushes_failed: 0,
        reads: 0,
        reads_failed: 0,
        blocks_checked: 0,
        mismatches: 0,
        mismatch_details: Vec::new(),
        reconnects: 0,
        stalls_ms: Vec::new(),
        stall_ms_max: 0.0,
        resumed_unix_ms: Vec::new(),
        elapsed_ms: 0.0,
        iops: 0.0,
        mib_per_s: 0.0,
        gave_up: None,
        final_flush_acked: false,
    };
    let power_seen = config_power(&config.power_cuts);
    let mut runner = Runner {
        stop,
        prng: Prng::new(config.seed),
        config,
        uris,
        uri_index,
        client,
        generation: 0,
        record,
        block_size,
        size,
        volume_blocks,
        in_flight_blocks: HashSet::new(),
        expected: HashMap::new(),
        not_durable: HashSet::new(),
        flush_covers: HashMap::new(),
        power_seen,
        recent_writes: VecDeque::with_capacity(RECENT_WRITES),
        tasks: JoinSet::new(),
        next_seq: 1,
        next_flush_id: 1,
        final_flush_id: None,
        writes_since_flush: 0,
        connection_lost: false,
        stall_started: None,
        summary,
        bytes_written: 0,
        bytes_read: 0,
    };
    let started = Instant::now();
    tracing::info!(
        seed = runner.config.seed,
        uri = %runner.config.uris[runner.uri_index],
        size,
        queue_depth = runner.config.queue_depth,
        "workload started"
    );
    if let Err(err) = runner.main_loop(started).await {
        runner.summary.gave_up = Some(err.to_string());
    }
    runner.finish(started).await
}

fn check_config(config: &RunConfig) -> Result<(), WorkloadError> {
    let bad = |what: String| Err(WorkloadError::BadConfig(what));
    if config.uris.is_empty() {
        return bad("give at least one --uri".into());
    }
    if config.block_size < 512 || !config.block_size.is_power_of_two() {
        return bad(format!(
            "--block-size {} must be a power of two of at least 512",
            config.block_size
        ));
    }
    if config.max_blocks == 0
        || u64::from(config.max_blocks) * u64::from(config.block_size) > 32 << 20
    {
        return bad("--max-blocks must be at least 1 and make at most 32 MiB".into());
    }
    if config.queue_depth == 0 || config.queue_depth > 1024 {
        return bad("--qd must be in 1..=1024".into());
    }
    Ok(())
}

/// Connects to the URIs round robin from `start`, with backoff, until one
/// negotiates or `timeout` has passed since `since`.
async fn connect_any(
    uris: &[NbdUri],
    config: &RunConfig,
    start: usize,
    since: Instant,
) -> Result<(Client, usize), WorkloadError> {
    let mut pause = BACKOFF_FIRST;
    let mut index = start % uris.len();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // A listener that accepts and never greets (a server stopped, or
        // hung, with its socket open) is given up like a request with no
        // reply, and the next URI tried.
        let attempt_timeout = config.request_timeout;
        let last_error =
            match tokio::time::timeout(attempt_timeout, Client::connect(&uris[index])).await {
                Ok(Ok(client)) => {
                    check_export(&client, config, &config.uris[index])?;
                    return Ok((client, index));
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no handshake within {} ms", attempt_timeout.as_millis()),
            };
        tracing::debug!(uri = %config.uris[index], attempt, error = %last_error, "connect failed");
        let waited = since.elapsed();
        if waited >= config.reconnect_timeout {
            return Err(WorkloadError::GaveUp {
                waited_ms: waited.as_millis() as u64,
                last_error,
            });
        }
        tokio::time::sleep(pause.min(config.reconnect_timeout - waited)).await;
        pause = (pause * 2).min(BACKOFF_MAX);
        index = (index + 1) % uris.len();
    }
}

fn check_export(client: &Client, config: &RunConfig, uri: &str) -> Result<(), WorkloadError> {
    let flags = client.transmission_flags();
    let lacks = |what: &str| {
        Err(WorkloadError::Export {
            uri: uri.to_owned(),
            what: what.to_owned(),
        })
    };
    if flags & tflag::READ_ONLY != 0 {
        return lacks("read-only");
    }
    if flags & tflag::SEND_FLUSH == 0 {
        return lacks("does not support FLUSH");
    }
    if config.fua_every > 0 && flags & tflag::SEND_FUA == 0 {
        return lacks("does not support FUA (drop --fua-every)");
    }
    Ok(())
}

impl Runner {
    async fn main_loop(&mut self, started: Instant) -> Result<(), WorkloadError> {
        let deadline = started + self.config.duration;
        let mut next_progress = started + PROGRESS_EVERY;
        loop {
            if self.connection_lost {
                self.drain().await?;
                self.reconnect().await?;
            }
            if Instant::now() >= deadline || self.stop.load(Ordering::Relaxed) {
                break;
            }
            self.fill()?;
            if let Some(joined) = self.tasks.join_next().await {
                let completion = joined.map_err(|err| WorkloadError::Task(err.to_string()))?;
                self.complete(completion)?;
            }
            if Instant::now() >= next_progress {
                next_progress += PROGRESS_EVERY;
                tracing::info!(
                    writes_acked = self.summary.writes_acked,
                    reads = self.summary.reads,
                    mismatches = self.summary.mismatches,
                    reconnects = self.summary.reconnects,
                    "progress"
                );
            }
        }
        self.drain().await?;
        // The final FLUSH: once it is acknowledged, everything acknowledged is
        // durable.
        for _ in 0..FINAL_FLUSH_ATTEMPTS {
            if self.connection_lost {
                self.reconnect().await?;
            }
            let op = self.flush_op()?;
            if let Op::Flush { id } = op {
                self.final_flush_id = Some(id);
            }
            self.record.flush()?;
            self.spawn(op);
            self.drain().await?;
            if !self.connection_lost {
                break;
            }
        }
        if !self.summary.final_flush_acked {
            return Err(WorkloadError::FinalFlush(FINAL_FLUSH_ATTEMPTS));
        }
        Ok(())
    }

    /// Submits requests until `queue_depth` are in flight (or no range free of
    /// in-flight blocks turns up).
    fn fill(&mut self) -> Result<(), WorkloadError> {
        if self.client.is_lost() {
            self.lose("the server closed the connection".into())?;
            return Ok(());
        }
        let mut ops = Vec::new();
        let mut misses = 0;
        while self.tasks.len() + ops.len() < self.config.queue_depth && misses < PICK_ATTEMPTS {
            if self.config.flush_every > 0 && self.writes_since_flush >= self.config.flush_every {
                self.writes_since_flush = 0;
                ops.push(self.flush_op()?);
                continue;
            }
            let read_back = !self.recent_writes.is_empty() && self.prng.below(4) == 0;
            let count = 1 + self.prng.below(u64::from(self.config.max_blocks));
            let first = if read_back {
                let pick = self.prng.below(self.recent_writes.len() as u64) as usize;
                let (start, _) = self.recent_writes[pick];
                start.min(self.volume_blocks - count)
            } else {
                self.prng.below(self.volume_blocks - count + 1)
            };
            if (first..first + count).any(|block| self.in_flight_blocks.contains(&block)) {
                misses += 1;
                continue;
            }
            self.in_flight_blocks.extend(first..first + count);
            if read_back {
                let expected = (first..first + count)
                    .map(|block| match self.expected.get(&block) {
                        Some(Expect::Exact(seq)) => Some(*seq),
                        _ => None,
                    })
                    .collect();
                ops.push(Op::Read {
                    first,
                    count,
                    expected,
                });
            } else {
                let seq = self.next_seq;
                self.next_seq += 1;
                let fua = self.config.fua_every > 0 && seq.is_multiple_of(self.config.fua_every);
                self.record.line(&Line::Sent {
                    sent: seq,
                    offset: first * self.block_size,
                    len: count * self.block_size,
                    fua,
                })?;
                self.summary.writes_sent += 1;
                self.summary.fua_writes += u64::from(fua);
                self.writes_since_flush += 1;
                if self.recent_writes.len() == RECENT_WRITES {
                    self.recent_writes.pop_front();
                }
                self.recent_writes.push_back((first, count));
                ops.push(Op::Write {
                    seq,
                    first,
                    count,
                    fua,
                });
            }
        }
        // Every `sent` line reaches the file before its write is sent.
        self.record.flush()?;
        for op in ops {
            self.spawn(op);
        }
        Ok(())
    }

    fn flush_op(&mut self) -> Result<Op, WorkloadError> {
        let id = self.next_flush_id;
        self.next_flush_id += 1;
        self.record.line(&Line::FlushSent {
            flush_sent: id,
            acked_before: self.record.acked_lines(),
        })?;
        self.summary.flushes_sent += 1;
        let covered = std::mem::take(&mut self.not_durable);
        self.flush_covers.insert(id, covered);
        Ok(Op::Flush { id })
    }

    fn spawn(&mut self, op: Op) {
        let client = self.client.clone();
        let generation = self.generation;
        let seed = self.config.seed;
        let block_size = self.block_size;
        let timeout = self.config.request_timeout;
        self.tasks.spawn(async move {
            let mut mismatches = Vec::new();
            let result = match &op {
                Op::Write {
                    seq,
                    first,
                    count,
                    fua,
                } => {
                    let mut data = vec![0u8; (count * block_size) as usize];
                    for (index, chunk) in data.chunks_exact_mut(block_size as usize).enumerate() {
                        fill_block(seed, *seq, first + index as u64, chunk);
                    }
                    let write = client.write(first * block_size, &data, *fua);
                    bounded(&client, timeout, write).await
                }
                Op::Read {
                    first,
                    count,
                    expected,
                } => {
                    let read = client.read(first * block_size, (count * block_size) as u32);
                    let read = bounded(&client, timeout, read).await;
                    read.map(|data| {
                        let blocks = data.chunks_exact(block_size as usize);
                        for ((index, found), expected) in blocks.enumerate().zip(expected) {
                            let block = first + index as u64;
                            let Some(expected_seq) = *expected else {
                                continue;
                            };
                            let found = identify(seed, block, found, expected_seq);
                            if found != (Found::Write { seq: expected_seq }) {
                                mismatches.push(Mismatch {
                                    block,
                                    offset: block * block_size,
                                    expected_seq,
                                    found,
                                });
                            }
                        }
                    })
                }
                Op::Flush { .. } => bounded(&client, timeout, client.flush()).await,
            };
            Completion {
                op,
                generation,
                result,
                mismatches,
            }
        });
    }

    fn complete(&mut self, completion: Completion) -> Result<(), WorkloadError> {
        let Completion {
            op,
            generation,
            result,
            mismatches,
        } = completion;
        for block in op.blocks() {
            self.in_flight_blocks.remove(&block);
        }
        if result.is_ok() && generation == self.generation {
            if let Some(stall_started) = self.stall_started.take() {
                let stall_ms = stall_started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(stall_ms, "first request completed on the new connection");
                self.summary.stalls_ms.push(stall_ms);
                self.summary.resumed_unix_ms.push(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |since| since.as_millis() as u64),
                );
                self.summary.stall_ms_max = self.summary.stall_ms_max.max(stall_ms);
            }
        }
        match (&op, &result) {
            (
                Op::Write {
                    seq, count, fua, ..
                },
                Ok(()),
            ) => {
                self.record.line(&Line::Acked { acked: *seq })?;
                self.summary.writes_acked += 1;
                self.bytes_written += count * self.block_size;
                for block in op.blocks() {
                    self.expected.insert(block, Expect::Exact(*seq));
                    if *fua {
                        self.not_durable.remove(&block);
                    } else {
                        self.not_durable.insert(block);
                    }
                }
            }
            (Op::Write { seq, .. }, Err(err)) => {
                self.record.line(&Line::Failed {
                    failed: *seq,
                    error: err.to_string(),
                })?;
                self.summary.writes_failed += 1;
                for block in op.blocks() {
                    self.expected.insert(block, Expect::Uncertain);
                }
            }
            (
                Op::Read {
                    count, expected, ..
                },
                Ok(()),
            ) => {
                self.summary.reads += 1;
                self.bytes_read += count * self.block_size;
                self.summary.blocks_checked += expected.iter().flatten().count() as u64;
                for mismatch in mismatches {
                    self.summary.mismatches += 1;
                    tracing::error!(
                        offset = mismatch.offset,
                        block = mismatch.block,
                        expected_seq = mismatch.expected_seq,
                        "read-back mismatch: found {}",
                        mismatch.found
                    );
                    if self.summary.mismatch_details.len() < MISMATCH_DETAILS {
                        self.summary.mismatch_details.push(mismatch);
                    }
                }
            }
            (Op::Read { .. }, Err(_)) => self.summary.reads_failed += 1,
            (Op::Flush { id }, Ok(())) => {
                self.record.line(&Line::FlushAcked { flush_acked: *id })?;
                self.summary.flushes_acked += 1;
                self.flush_covers.remove(id);
                if self.final_flush_id == Some(*id) {
                    self.summary.final_flush_acked = true;
                }
            }
            (Op::Flush { id }, Err(err)) => {
                self.record.line(&Line::FlushFailed {
                    flush_failed: *id,
                    error: err.to_string(),
                })?;
                self.summary.flushes_failed += 1;
                if let Some(covered) = self.flush_covers.remove(id) {
                    self.not_durable.extend(covered);
                }
            }
        }
        if let Err(err) = &result {
            tracing::debug!(?op, error = %err, "request failed");
            if let RequestError::ConnectionLost(why) = err {
                if generation == self.generation {
                    self.lose(why.clone())?;
                }
            }
        }
        Ok(())
    }

    /// Notes that the current connection died.
    fn lose(&mut self, why: String) -> Result<(), WorkloadError> {
        if self.connection_lost {
            return Ok(());
        }
        tracing::warn!(uri = %self.config.uris[self.uri_index], error = %why, "connection lost");
        self.connection_lost = true;
        self.stall_started.get_or_insert_with(Instant::now);
        self.record.line(&Line::Lost { lost: why })?;
        self.record.flush()
    }

    /// On a new connection: if a power cut may have come since the last
    /// one, the blocks whose last write was not durable may hold an older
    /// write now; read-backs stop expecting theirs.
    fn after_power_cut(&mut self) -> Result<(), WorkloadError> {
        let now = config_power(&self.config.power_cuts);
        let cut = self.config.power_cuts.is_some() && (now != self.power_seen || now % 2 == 1);
        self.power_seen = now;
        if !cut {
            return Ok(());
        }
        self.record.line(&Line::PowerCut {
            power_cut_after: self.record.acked_lines(),
        })?;
        let mut forgotten = 0u64;
        let covered = std::mem::take(&mut self.flush_covers);
        for block in std::mem::take(&mut self.not_durable)
            .into_iter()
            .chain(covered.into_values().flatten())
        {
            if let Some(expect) = self.expected.get_mut(&block) {
                if matches!(expect, Expect::Exact(_)) {
                    *expect = Expect::Uncertain;
                    forgotten += 1;
                }
            }
        }
        tracing::info!(
            blocks = forgotten,
            "a power cut may have come: read-backs no longer expect the writes that were not durable"
        );
        Ok(())
    }

    /// Waits for every request in flight.
    async fn drain(&mut self) -> Result<(), WorkloadError> {
        while let Some(joined) = self.tasks.join_next().await {
            let completion = joined.map_err(|err| WorkloadError::Task(err.to_string()))?;
            self.complete(completion)?;
        }
        Ok(())
    }

    /// Connects again, starting with the URI after the one that failed.
    async fn reconnect(&mut self) -> Result<(), WorkloadError> {
        let since = self.stall_started.unwrap_or_else(Instant::now);
        let (client, index) =
            connect_any(&self.uris, &self.config, self.uri_index + 1, since).await?;
        if client.size() != self.size {
            return Err(WorkloadError::SizeChanged {
                uri: self.config.uris[index].clone(),
                expected: self.size,
                found: client.size(),
            });
        }
        tracing::info!(
            from = %self.config.uris[self.uri_index],
            to = %self.config.uris[index],
            after_ms = since.elapsed().as_millis() as u64,
            "reconnected"
        );
        self.client = client;
        self.uri_index = index;
        self.generation += 1;
        self.connection_lost = false;
        self.summary.reconnects += 1;
        self.after_power_cut()?;
        self.record.line(&Line::Connected {
            connected: self.config.uris[index].clone(),
            size: self.size,
        })?;
        self.record.flush()
    }

    async fn finish(mut self, started: Instant) -> Result<RunSummary, WorkloadError> {
        // Whatever stopped the loop, wait for what is in flight (bounded: every
        // request of a dead connection fails at once).
        if let Err(err) = self.drain().await {
            self.summary.gave_up.get_or_insert(err.to_string());
        }
        if !self.connection_lost {
            self.client.disconnect().await;
        }
        self.record.flush()?;
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        self.summary.elapsed_ms = elapsed * 1000.0;
        self.summary.iops = (self.summary.writes_acked + self.summary.reads) as f64 / elapsed;
        self.summary.mib_per_s =
            (self.bytes_written + self.bytes_read) as f64 / elapsed / (1024.0 * 1024.0);
        Ok(self.summary)
    }
}
