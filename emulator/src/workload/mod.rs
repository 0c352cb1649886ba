//! The write oracle: `emulator workload run` drives an NBD export with a
//! seeded random workload of writes, FLUSHes and read-backs, and records what
//! it sent and what was acknowledged; `emulator workload verify` later reads
//! every block the record wrote and says whether durable data was lost (after
//! a crash, a failover, a restart …).
//!
//! This module owns: a minimal async NBD client ([`client`]), the content a
//! write puts in a block ([`content`]), the record file ([`record`]), the
//! workload loop with its reconnects ([`run`]) and the verdicts of verify
//! ([`verify`]). It never prints: the CLI (`cli/workload.rs`) does that, and
//! maps outcomes to exit statuses. It must never send two overlapping writes
//! at once (that would make the per-block order of writes unknowable), and
//! never send a write before its `sent` line has reached the record file.
//!
//! # Content
//! Block *b* written by write *seq* of a run with seed *s* holds: bytes 0..8
//! *seq* (u64 big-endian), 8..16 *b* (the block's index in the volume), then a
//! splitmix64 stream seeded from (*s*, *seq*, *b*) ([`content::fill_block`]).
//! Sequence numbers start at 1: a zero block never looks like ours.
//!
//! # Record format (version 1)
//! JSON lines, appended as things happen. The buffered lines are handed to the
//! file before any request is sent (so a `sent` line always precedes its
//! write, even if the process is killed), on a reconnect and at the end; never
//! fsynced. A last line cut short (the writer was killed) is ignored by
//! `verify`, which says so.
//!
//! | line | meaning |
//! |------|---------|
//! | `{"record":"emulator-workload","version":1,"seed":S,"block_size":B,"size":N,"uris":[…]}` | header, always first |
//! | `{"connected":"URI","size":N}` | a connection was made (first or reconnect) |
//! | `{"sent":SEQ,"offset":O,"len":L,"fua":F}` | write SEQ (1, 2, … in submission order) of L bytes at O is about to be sent |
//! | `{"acked":SEQ}` | write SEQ was acknowledged |
//! | `{"failed":SEQ,"error":"…"}` | write SEQ failed: error reply, or connection lost (it may still have landed) |
//! | `{"flush_sent":ID,"acked_before":N}` | FLUSH ID (1, 2, …) is about to be sent; N = `acked` lines before this line |
//! | `{"flush_acked":ID}` | FLUSH ID was acknowledged |
//! | `{"flush_failed":ID,"error":"…"}` | FLUSH ID failed |
//! | `{"lost":"…"}` | the connection died |
//! | `{"power_cut_after":N}` | the server may have lost power since the last connection (before the `connected` line of the next); N = `acked` lines before this line |
//!
//! A write is **durable** when it was acknowledged with FUA, or its `acked`
//! line is among the first N of a `flush_sent` whose FLUSH was acknowledged.
//! A FLUSH is taken to cover writes acknowledged on earlier connections too
//! (the emulator advertises `CAN_MULTI_CONN`, and its FLUSH syncs the files),
//! but not across a `power_cut_after` line: what was not durable at the cut
//! may be gone, and a later FLUSH covers only the acks after it.
//!
//! # Read-backs during `run`
//! A read covers blocks with no write in flight; each block whose last write
//! was acknowledged must hold exactly that write (blocks never written, or
//! whose last write failed, are not checked). Acknowledged writes are expected
//! to survive a reconnect (the emulator keeps them in the page cache across
//! `kill -9`); a server that may drop unflushed writes on failover would make
//! read-backs after a reconnect report mismatches that `verify` would allow.
//! Told that its server may lose power (`--power-loss`, or a scenario with a
//! `power-loss` fault), `run` writes a `power_cut_after` line at the next
//! reconnect and stops expecting the writes that were not durable.

pub mod client;
pub mod content;
pub mod record;
pub mod run;
pub mod verify;

use std::path::PathBuf;

pub use client::{ClientError, NbdUri, RequestError};
pub use run::{run, run_until, RunConfig, RunSummary};
pub use verify::{verify, VerifyReport};

/// What can go wrong in a workload command.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Arguments that cannot work.
    #[error("{0}")]
    BadConfig(String),
    /// Connecting or negotiating failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The record file cannot be created, written or read.
    #[error("record {}: {source}", path.display())]
    RecordIo {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The record file does not parse.
    #[error("{} line {line}: {reason}", path.display())]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The export is not the size the record (or first connection) says.
    #[error("export {uri} is {found} bytes, expected {expected}")]
    SizeChanged {
        /// Where.
        uri: String,
        /// Size recorded.
        expected: u64,
        /// Size now.
        found: u64,
    },
    /// The export cannot take the workload (read-only, no FLUSH or FUA).
    #[error("export {uri}: {what}")]
    Export {
        /// Where.
        uri: String,
        /// What it lacks.
        what: String,
    },
    /// A read of `verify` failed.
    #[error("reading at offset {offset}: {source}")]
    Read {
        /// Byte offset.
        offset: u64,
        /// Why.
        source: RequestError,
    },
    /// No URI took a connection within the reconnect timeout.
    #[error("gave up after {waited_ms} ms without a connection: {last_error}")]
    GaveUp {
        /// How long it tried.
        waited_ms: u64,
        /// The last attempt's error.
        last_error: String,
    },
    /// The final FLUSH was not acknowledged.
    #[error("the final FLUSH was not acknowledged in {0} attempts")]
    FinalFlush(u32),
    /// A request task panicked or was cancelled.
    #[error("request task: {0}")]
    Task(String),
}
