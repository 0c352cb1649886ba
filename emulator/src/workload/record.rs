//! The record file: its lines (JSON, one object per line), the writer `run`
//! appends them with, and the parser `verify` reads them back with. The format
//! is specified in the [module doc](super).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::WorkloadError;

/// The `record` field of the header line.
pub const RECORD_KIND: &str = "emulator-workload";
/// The format version this build writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`RECORD_KIND`].
    pub record: String,
    /// Always [`RECORD_VERSION`].
    pub version: u32,
    /// Seed of the content and of the workload's choices.
    pub seed: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Export size in bytes when the run started.
    pub size: u64,
    /// The URIs the run was given, in order.
    pub uris: Vec<String>,
}

/// Every line after the header. Each kind has a key of its own, which names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    /// A write is about to be sent (the line is flushed to the file first).
    Sent {
        /// Sequence number, 1, 2, 3 … in submission order.
        sent: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Sent with FUA.
        fua: bool,
    },
    /// Write `acked` was acknowledged.
    Acked {
        /// Its sequence number.
        acked: u64,
    },
    /// Write `failed` failed (an error reply, or the connection was lost).
    Failed {
        /// Its sequence number.
        failed: u64,
        /// Why.
        error: String,
    },
    /// A FLUSH is about to be sent; it covers the first `acked_before` `acked`
    /// lines of the record.
    FlushSent {
        /// Flush id, 1, 2, 3 …
        flush_sent: u64,
        /// Count of `acked` lines before this one.
        acked_before: u64,
    },
    /// FLUSH `flush_acked` was acknowledged.
    FlushAcked {
        /// Its id.
        flush_acked: u64,
    },
    /// FLUSH `flush_failed` failed.
    FlushFailed {
        /// Its id.
        flush_failed: u64,
        /// Why.
        error: String,
    },
    /// A connection was made (the first, or a reconnect).
    Connected {
        /// The URI.
        connected: String,
        /// Export size it reported.
        size: u64,
    },
    /// The connection was lost.
    Lost {
        /// Why.
        lost: String,
    },
    /// The server may have lost power since the last connection was made
    /// (written before the `connected` line of the new one): what was
    /// acknowledged before it and not durable may be gone, and no later
    /// FLUSH covers it.
    PowerCut {
        /// Count of `acked` lines before this one.
        power_cut_after: u64,
    },
}

/// Appends lines to a record file.
#[derive(Debug)]
pub struct RecordWriter {
    path: PathBuf,
    out: BufWriter<File>,
    acked_lines: u64,
}

impl RecordWriter {
    /// Creates `path` (it must not exist) and writes the header.
    pub fn create(path: &Path, header: &Header) -> Result<Self, WorkloadError> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| WorkloadError::RecordIo {
                path: path.to_owned(),
                source,
            })?;
        let mut writer = Self {
            path: path.to_owned(),
            out: BufWriter::with_capacity(256 * 1024, file),
            acked_lines: 0,
        };
        writer.put(header)?;
        writer.flush()?;
        Ok(writer)
    }

    /// Count of `acked` lines written so far.
    pub fn acked_lines(&self) -> u64 {
        self.acked_lines
    }

    /// Appends one line (buffered).
    pub fn line(&mut self, line: &Line) -> Result<(), WorkloadError> {
        if matches!(line, Line::Acked { .. }) {
            self.acked_lines += 1;
        }
        self.put(line)
    }

    fn put<T: Serialize>(&mut self, value: &T) -> Result<(), WorkloadError> {
        let io = |source| WorkloadError::RecordIo {
            path: self.path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.out, value).map_err(|err| io(err.into()))?;
        self.out.write_all(b"\n").map_err(io)
    }

    /// Hands buffered lines to the file (no fsync: they survive the death of
    /// this process, which is what the record is for).
    pub fn flush(&mut self) -> Result<(), WorkloadError> {
        self.out.flush().map_err(|source| WorkloadError::RecordIo {
            path: self.path.clone(),
            source,
        })
    }
}

/// How a write became durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Acknowledged with FUA.
    Fua,
    /// Acknowledged before FLUSH `id` was sent, which was acknowledged.
    Flush(u64),
}

/// One write as the record tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteEntry {
    /// Sequence number.
    pub seq: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Sent with FUA.
    pub fua: bool,
    /// Acknowledged.
    pub acked: bool,
    /// Failed, and why.
    pub failed: Option<String>,
    /// Durable, and how (the first way it became so).
    pub durable: Option<Durability>,
}

/// A parsed record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The header.
    pub header: Header,
    /// Every write, index `seq - 1`.
    pub writes: Vec<WriteEntry>,
    /// Lines read (header included, torn line not).
    pub lines: u64,
    /// The file ended in a line cut short (the writer was killed), which was
    /// ignored.
    pub torn_last_line: bool,
    /// FLUSHes sent / acknowledged.
    pub flushes_sent: u64,
    /// FLUSHes acknowledged.
    pub flushes_acked: u64,
}

impl Record {
    /// Reads and parses the record at `path`.
    pub fn read(path: &Path) -> Result<Self, WorkloadError> {
        let file = File::open(path).map_err(|source| WorkloadError::RecordIo {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(BufReader::new(file), path)
    }

    /// Parses a record (`path` only names it in errors).
    pub fn parse(mut input: impl BufRead, path: &Path) -> Result<Self, WorkloadError> {
        let bad = |line: u64, reason: String| WorkloadError::BadRecord {
            path: path.to_owned(),
            line,
            reason,
        };
        let mut text = String::new();
        let mut number = 0u64;
        let mut header: Option<Header> = None;
        let mut writes: Vec<WriteEntry> = Vec::new();
        // Sequence numbers of acknowledged writes, in record order, and how many
        // of them each FLUSH sent covers.
        let mut acked_order: Vec<u64> = Vec::new();
        let mut flush_covers: Vec<u64> = Vec::new();
        let mut flushes_acked = 0;
        // Acks before this index are durable through a FLUSH already: each
        // FLUSH covers a prefix of `acked_order`, so only the new part is walked.
        let mut flushed_prefix = 0usize;
        let mut torn_last_line = false;
        loop {
            text.clear();
            let read = input
                .read_line(&mut text)
                .map_err(|err| bad(number + 1, format!("cannot read: {err}")))?;
            if read == 0 {
                break;
            }
            number += 1;
            let complete = text.ends_with('\n');
            let body = text.trim_end_matches('\n');
            if header.is_none() {
                let parsed: Header = serde_json::from_str(body)
                    .map_err(|err| bad(number, format!("not a workload record header: {err}")))?;
                if parsed.record != RECORD_KIND || parsed.version != RECORD_VERSION {
                    return Err(bad(
                        number,
                        format!(
                            "record {:?} version {} (this build reads {RECORD_KIND:?} version {RECORD_VERSION})",
                            parsed.record, parsed.version
                        ),
                    ));
                }
                if parsed.block_size < 16 || !parsed.block_size.is_multiple_of(8) {
                    return Err(bad(number, format!("bad block_size {}", parsed.block_size)));
                }
                header = Some(parsed);
                continue;
            }
            let line: Line = match serde_json::from_str(body) {
                Ok(line) => line,
                Err(_) if !complete => {
                    torn_last_line = true;
                    number -= 1;
                    break;
                }
                Err(err) => return Err(bad(number, format!("not a record line: {err}"))),
            };
            fn write(writes: &mut [WriteEntry], seq: u64) -> Result<&mut WriteEntry, String> {
                seq.checked_sub(1)
                    .and_then(|index| writes.get_mut(index as usize))
                    .ok_or_else(|| format!("write {seq} was never sent"))
            }
            match line {
                Line::Sent {
                    sent,
                    offset,
                    len,
                    fua,
                } => {
                    let block_size = header
                        .as_ref()
                        .map_or(1, |header| u64::from(header.block_size));
                    if offset % block_size != 0 || len % block_size != 0 || len == 0 {
                        return Err(bad(
                            number,
                            format!("write {sent} at {offset}+{len} is not whole blocks of {block_size}"),
                        ));
                    }
                    if sent != writes.len() as u64 + 1 {
                        return Err(bad(
                            number,
                            format!("write {sent} sent after write {}", writes.len()),
                        ));
                    }
                    writes.push(WriteEntry {
                        seq: sent,
                        offset,
                        len,
                        fua,
                        acked: false,
                        failed: None,
                        durable: None,
                    });
                }
                Line::Acked { acked } => {
                    let entry = write(&mut writes, acked).map_err(|why| bad(number, why))?;
                    entry.acked = true;
                    if entry.fua && entry.durable.is_none() {
                        entry.durable = Some(Durability::Fua);
                    }
                    acked_order.push(acked);
                }
                Line::Failed { failed, error } => {
                    write(&mut writes, failed)
                        .map_err(|why| bad(number, why))?
                        .failed = Some(error);
                }
                Line::FlushSent {
                    flush_sent,
                    acked_before,
                } => {
                    if flush_sent != flush_covers.len() as u64 + 1 {
                        return Err(bad(number, format!("flush {flush_sent} out of order")));
                    }
                    if acked_before > acked_order.len() as u64 {
                        return Err(bad(
                            number,
                            format!(
                                "flush {flush_sent} claims {acked_before} acks before it, the record has {}",
                                acked_order.len()
                            ),
                        ));
                    }
                    flush_covers.push(acked_before);
                }
                Line::FlushAcked { flush_acked } => {
                    let covers = flush_acked
                        .checked_sub(1)
                        .and_then(|index| flush_covers.get(index as usize))
                        .ok_or_else(|| {
                            bad(number, format!("flush {flush_acked} was never sent"))
                        })?;
                    flushes_acked += 1;
                    let covers = *covers as usize;
                    for seq in acked_order.get(flushed_prefix..covers).unwrap_or_default() {
                        let entry = &mut writes[(*seq - 1) as usize];
                        if entry.durable.is_none() {
                            entry.durable = Some(Durability::Flush(flush_acked));
                        }
                    }
                    flushed_prefix = flushed_prefix.max(covers);
                }
                Line::PowerCut { power_cut_after } => {
                    if power_cut_after > acked_order.len() as u64 {
                        return Err(bad(
                            number,
                            format!(
                                "a power cut after {power_cut_after} acks, the record has {}",
                                acked_order.len()
                            ),
                        ));
                    }
                    // What was not durable then never will be: a FLUSH sent
                    // after the cut covers only the acks after it.
                    flushed_prefix = flushed_prefix.max(power_cut_after as usize);
                }
                Line::FlushFailed { .. } | Line::Connected { .. } | Line::Lost { .. } => {}
            }
        }
        let header = header.ok_or_else(|| bad(1, "empty record".into()))?;
        Ok(Self {
            header,
            writes,
            lines: number,
            torn_last_line,
            flushes_sent: flush_covers.len() as u64,
            flushes_acked,
        })
    }
}
