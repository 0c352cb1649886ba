//! `workload verify`: which contents each written block may have after a
//! crash, judged from the record ([`Oracle`], pure), and the read of every
//! such block through NBD ([`verify`]).
//!
//! The rule, per block: let D be the block's last durable write (by sequence
//! number, which is submission order, which is the order of writes per block
//! because a run never has two overlapping writes in flight). The block may
//! hold D's content or that of any write of the block with a larger sequence
//! number, acknowledged or not (it may have landed). Without a durable write
//! anything goes. A block whose every byte is that of one of those writes is
//! allowed too: a write not yet durable when the server died may have been cut
//! short part-way through the block (the emulator promises each byte old or
//! new). Anything else is LOST.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::task::JoinSet;

use super::client::{Client, NbdUri};
use super::content::{block_content, stamp};
use super::record::{Durability, Record};
use super::WorkloadError;

/// Blocks per READ request of `verify`.
const VERIFY_READ_BLOCKS: u64 = 256;
/// READ requests `verify` keeps in flight.
const VERIFY_READS_IN_FLIGHT: usize = 8;
/// How long one READ of `verify` may take.
const VERIFY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Lost blocks described per range (the rest are counted).
const DETAILS_PER_RANGE: usize = 16;
/// Bytes of expected and found content shown for unknown content.
const HEX_BYTES: usize = 16;

/// One write as a block's history needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriteRef {
    /// Sequence number.
    pub seq: u64,
    /// Sent with FUA.
    pub fua: bool,
    /// Acknowledged.
    pub acked: bool,
    /// How it became durable, if it did.
    pub durable: Option<Durability>,
}

/// What the record says about one block: its last durable write and every
/// write after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockHistory {
    /// The last durable write.
    pub durable: Option<WriteRef>,
    /// Writes after it (all writes, if none is durable), in order.
    pub later: Vec<WriteRef>,
}

/// What was found in a block, as far as it can be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    /// Exactly what write `seq` of this run put there.
    Write {
        /// The write.
        seq: u64,
    },
    /// Not the content of any write of this run to this block.
    Unknown {
        /// The (seq, block) stamp in its first 16 bytes, if it has one.
        stamp: Option<(u64, u64)>,
        /// First byte (within the block) that differs from the expected content.
        first_differing_byte: usize,
        /// Expected bytes from there (hex).
        expected_hex: String,
        /// Found bytes from there (hex).
        found_hex: String,
    },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Write { seq } => write!(f, "the content of write {seq}"),
            Found::Unknown {
                stamp,
                first_differing_byte,
                expected_hex,
                found_hex,
            } => {
                write!(f, "unknown content")?;
                if let Some((seq, block)) = stamp {
                    write!(f, " (stamped write {seq} block {block})")?;
                }
                write!(
                    f,
                    ", first difference at byte {first_differing_byte}: expected {expected_hex}, found {found_hex}"
                )
            }
        }
    }
}

/// Identifies `found`, the content of `block`: one of this run's writes (its
/// stamp names it and the whole block matches), or unknown content described
/// against what write `expected_seq` would have put there.
pub fn identify(seed: u64, block: u64, found: &[u8], expected_seq: u64) -> Found {
    let found_stamp = stamp(found);
    if let Some((seq, stamped_block)) = found_stamp {
        if stamped_block == block && block_content(seed, seq, block, found.len()) == found {
            return Found::Write { seq };
        }
    }
    let expected = block_content(seed, expected_seq, block, found.len());
    let first = expected
        .iter()
        .zip(found)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let end = (first + HEX_BYTES).min(found.len());
    Found::Unknown {
        stamp: found_stamp,
        first_differing_byte: first,
        expected_hex: hex(&expected[first..end]),
        found_hex: hex(&found[first..end]),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A block holding none of the contents it may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostBlock {
    /// Block index within the volume.
    pub block: u64,
    /// Its byte offset.
    pub offset: u64,
    /// The last durable write, whose content (or a later write's) was expected.
    pub expected: WriteRef,
    /// Writes after it that would also have been fine.
    pub later_writes: Vec<u64>,
    /// What is there.
    pub found: Found,
}

/// The verdict on one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It holds its last durable write.
    Durable,
    /// It holds a write after its last durable one (or, without one, any of
    /// its writes): allowed.
    Later {
        /// That write.
        seq: u64,
    },
    /// No durable write covers it: anything is allowed.
    NoDurableWrite,
    /// Each byte is that of its last durable write or of a later one (a later
    /// write cut short): allowed.
    Torn {
        /// The later writes whose bytes are there.
        seqs: Vec<u64>,
    },
    /// Durable data is gone.
    Lost(Box<LostBlock>),
}

/// The allowed contents of every block a record wrote.
#[derive(Debug, Clone)]
pub struct Oracle {
    seed: u64,
    block_size: u64,
    blocks: BTreeMap<u64, BlockHistory>,
}

impl Oracle {
    /// Builds every written block's history from a record.
    pub fn new(record: &Record) -> Self {
        let block_size = u64::from(record.header.block_size);
        let mut blocks: BTreeMap<u64, BlockHistory> = BTreeMap::new();
        for write in &record.writes {
            let reference = WriteRef {
                seq: write.seq,
                fua: write.fua,
                acked: write.acked,
                durable: write.durable,
            };
            let first = write.offset / block_size;
            for block in first..first + write.len / block_size {
                let history = blocks.entry(block).or_default();
                if reference.durable.is_some() {
                    history.durable = Some(reference);
                    history.later.clear();
                } else {
                    history.later.push(reference);
                }
            }
        }
        Self {
            seed: record.header.seed,
            block_size,
            blocks,
        }
    }

    /// Every block written, with its history, in block order.
    pub fn blocks(&self) -> &BTreeMap<u64, BlockHistory> {
        &self.blocks
    }

    /// The verdict on `block` holding `found` (one block of bytes).
    pub fn judge(&self, block: u64, found: &[u8]) -> Verdict {
        let Some(history) = self.blocks.get(&block) else {
            return Verdict::NoDurableWrite;
        };
        let holds = |seq| {
            stamp(found) == Some((seq, block))
                && block_content(self.seed, seq, block, found.len()) == found
        };
        if let Some(later) = history.later.iter().rev().find(|write| holds(write.seq)) {
            return match history.durable {
                Some(_) => Verdict::Later { seq: later.seq },
                None => Verdict::NoDurableWrite,
            };
        }
        let Some(durable) = history.durable else {
            return Verdict::NoDurableWrite;
        };
        if holds(durable.seq) {
            return Verdict::Durable;
        }
        if let Some(seqs) = self.torn(block, durable.seq, &history.later, found) {
            return Verdict::Torn { seqs };
        }
        Verdict::Lost(Box::new(LostBlock {
            block,
            offset: block * self.block_size,
            expected: durable,
            later_writes: history.later.iter().map(|write| write.seq).collect(),
            found: identify(self.seed, block, found, durable.seq),
        }))
    }
}

impl Oracle {
    /// The later writes whose bytes make up `found` together with the
    /// durable write's, if every byte is one of theirs.
    fn torn(&self, block: u64, durable: u64, later: &[WriteRef], found: &[u8]) -> Option<Vec<u64>> {
        if later.is_empty() {
            return None;
        }
        let durable_content = block_content(self.seed, durable, block, found.len());
        let later_contents: Vec<(u64, Vec<u8>)> = later
            .iter()
            .map(|write| {
                (
                    write.seq,
                    block_content(self.seed, write.seq, block, found.len()),
                )
            })
            .collect();
        let mut used = vec![false; later_contents.len()];
        for (index, byte) in found.iter().enumerate() {
            if durable_content[index] == *byte {
                continue;
            }
            let from_later = later_contents
                .iter()
                .position(|(_, content)| content[index] == *byte)?;
            used[from_later] = true;
        }
        Some(
            later_contents
                .iter()
                .zip(used)
                .filter(|(_, used)| *used)
                .map(|((seq, _), _)| *seq)
                .collect(),
        )
    }
}

/// Adjacent lost blocks, merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostRange {
    /// Volume byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// Blocks in the range.
    pub block_count: u64,
    /// The first few blocks' details.
    pub blocks: Vec<LostBlock>,
    /// Lost blocks of the range not detailed.
    pub more_blocks: u64,
}

/// Merges lost blocks (any order) into ranges of adjacent blocks.
pub fn merge_lost(mut lost: Vec<LostBlock>, block_size: u64) -> Vec<LostRange> {
    lost.sort_by_key(|block| block.block);
    let mut ranges: Vec<LostRange> = Vec::new();
    for block in lost {
        match ranges.last_mut() {
            Some(range) if range.offset + range.length == block.offset => {
                range.length += block_size;
                range.block_count += 1;
                if range.blocks.len() < DETAILS_PER_RANGE {
                    range.blocks.push(block);
                } else {
                    range.more_blocks += 1;
                }
            }
            _ => ranges.push(LostRange {
                offset: block.offset,
                length: block_size,
                block_count: 1,
                blocks: vec![block],
                more_blocks: 0,
            }),
        }
    }
    ranges
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The URI read.
    pub uri: String,
    /// Seed of the record.
    pub seed: u64,
    /// Lines of the record read.
    pub record_lines: u64,
    /// The record's last line was cut short and ignored.
    pub torn_last_line: bool,
    /// Writes in the record.
    pub writes: u64,
    /// Of which acknowledged.
    pub writes_acked: u64,
    /// Of which durable.
    pub writes_durable: u64,
    /// Blocks read and judged (every block the record wrote).
    pub blocks_checked: u64,
    /// Blocks with a durable write.
    pub durable_blocks: u64,
    /// Blocks holding their last durable write.
    pub blocks_holding_durable: u64,
    /// Blocks holding a later, not durable write.
    pub blocks_with_later_undurable_content: u64,
    /// Blocks mixing their last durable write's bytes with a later write's (a
    /// write cut short).
    pub blocks_torn_by_undurable_writes: u64,
    /// Blocks no durable write covers (anything allowed).
    pub blocks_without_durable_write: u64,
    /// Blocks that lost durable data.
    pub lost_blocks: u64,
    /// The lost blocks, merged into ranges.
    pub lost_ranges: Vec<LostRange>,
}

/// Reads every block `record` wrote from `uri` and judges it.
pub async fn verify(record: &Record, uri_text: &str) -> Result<VerifyReport, WorkloadError> {
    let uri: NbdUri = uri_text.parse()?;
    let client = Client::connect(&uri).await?;
    let header = &record.header;
    let block_size = u64::from(header.block_size);
    let oracle = Oracle::new(record);
    if let Some((&last, _)) = oracle.blocks().last_key_value() {
        if (last + 1) * block_size > client.size() {
            return Err(WorkloadError::SizeChanged {
                uri: uri_text.to_owned(),
                expected: header.size,
                found: client.size(),
            });
        }
    }
    // Runs of consecutive written blocks, cut into reads of at most
    // VERIFY_READ_BLOCKS.
    let mut reads: Vec<(u64, u64)> = Vec::new();
    for &block in oracle.blocks().keys() {
        match reads.last_mut() {
            Some((first, count)) if *first + *count == block && *count < VERIFY_READ_BLOCKS => {
                *count += 1;
            }
            _ => reads.push((block, 1)),
        }
    }
    let mut report = VerifyReport {
        uri: uri_text.to_owned(),
        seed: header.seed,
        record_lines: record.lines,
        torn_last_line: record.torn_last_line,
        writes: record.writes.len() as u64,
        writes_acked: record.writes.iter().filter(|w| w.acked).count() as u64,
        writes_durable: record.writes.iter().filter(|w| w.durable.is_some()).count() as u64,
        blocks_checked: 0,
        durable_blocks: 0,
        blocks_holding_durable: 0,
        blocks_with_later_undurable_content: 0,
        blocks_torn_by_undurable_writes: 0,
        blocks_without_durable_write: 0,
        lost_blocks: 0,
        lost_ranges: Vec::new(),
    };
    let mut lost = Vec::new();
    let mut in_flight = JoinSet::new();
    let mut pending = reads.into_iter();
    loop {
        while in_flight.len() < VERIFY_READS_IN_FLIGHT {
            let Some((first, count)) = pending.next() else {
                break;
            };
            let client = client.clone();
            in_flight.spawn(async move {
                let read = client.read(first * block_size, (count * block_size) as u32);
                let result = super::run::bounded(&client, VERIFY_READ_TIMEOUT, read).await;
                (first, count, result)
            });
        }
        let Some(joined) = in_flight.join_next().await else {
            break;
        };
        let (first, _count, result) = joined.map_err(|err| WorkloadError::Task(err.to_string()))?;
        let data = result.map_err(|source| WorkloadError::Read {
            offset: first * block_size,
            source,
        })?;
        for (index, found) in data.chunks_exact(block_size as usize).enumerate() {
            let block = first + index as u64;
            report.blocks_checked += 1;
            if oracle
                .blocks()
                .get(&block)
                .is_some_and(|h| h.durable.is_some())
            {
                report.durable_blocks += 1;
            }
            match oracle.judge(block, found) {
                Verdict::Durable => report.blocks_holding_durable += 1,
                Verdict::Later { .. } => report.blocks_with_later_undurable_content += 1,
                Verdict::Torn { .. } => report.blocks_torn_by_undurable_writes += 1,
                Verdict::NoDurableWrite => report.blocks_without_durable_write += 1,
                Verdict::Lost(block) => lost.push(*block),
            }
        }
    }
    client.disconnect().await;
    report.lost_blocks = lost.len() as u64;
    report.lost_ranges = merge_lost(lost, block_size);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::record::Record;
    use std::path::Path;

    const BS: usize = 512;

    fn record(lines: &[&str]) -> Record {
        let mut text = String::from(
            r#"{"record":"emulator-workload","version":1,"seed":9,"block_size":512,"size":1048576,"uris":["nbd://x/y"]}"#,
        );
        text.push('\n');
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        Record::parse(text.as_bytes(), Path::new("test")).expect("parses")
    }

    fn content(seq: u64, block: u64) -> Vec<u8> {
        block_content(9, seq, block, BS)
    }

    /// Write 1: blocks 0..4 with FUA, acked (durable). Write 2: blocks 2..4,
    /// acked, covered by flush 1 (durable). Write 3: blocks 3..5, never acked.
    fn three_writes() -> Oracle {
        Oracle::new(&record(&[
            r#"{"sent":1,"offset":0,"len":2048,"fua":true}"#,
            r#"{"acked":1}"#,
            r#"{"sent":2,"offset":1024,"len":1024,"fua":false}"#,
            r#"{"acked":2}"#,
            r#"{"flush_sent":1,"acked_before":2}"#,
            r#"{"flush_acked":1}"#,
            r#"{"sent":3,"offset":1536,"len":1024,"fua":false}"#,
        ]))
    }

    #[test]
    fn durable_write_present_is_ok() {
        let oracle = three_writes();
        assert_eq!(oracle.judge(0, &content(1, 0)), Verdict::Durable);
        assert_eq!(oracle.judge(2, &content(2, 2)), Verdict::Durable);
        assert_eq!(oracle.judge(3, &content(2, 3)), Verdict::Durable);
    }

    #[test]
    fn later_unacked_write_present_is_ok() {
        let oracle = three_writes();
        assert_eq!(oracle.judge(3, &content(3, 3)), Verdict::Later { seq: 3 });
        // Block 4 only ever got the unacknowledged write: anything goes.
        assert_eq!(oracle.judge(4, &[0u8; BS]), Verdict::NoDurableWrite);
        assert_eq!(oracle.judge(4, &content(3, 4)), Verdict::NoDurableWrite);
    }

    #[test]
    fn older_write_than_durable_is_lost() {
        let oracle = three_writes();
        let Verdict::Lost(lost) = oracle.judge(2, &content(1, 2)) else {
            panic!("older content must be lost");
        };
        assert_eq!(lost.offset, 1024);
        assert_eq!(lost.expected.seq, 2);
        assert_eq!(lost.expected.durable, Some(Durability::Flush(1)));
        assert_eq!(lost.found, Found::Write { seq: 1 });
    }

    #[test]
    fn block_cut_short_by_a_later_write_is_torn_not_lost() {
        let oracle = three_writes();
        // Block 3: durable write 2, then write 3 (never acknowledged) landed
        // only in the block's second half.
        let mut found = content(2, 3);
        found[BS / 2..].copy_from_slice(&content(3, 3)[BS / 2..]);
        assert_eq!(oracle.judge(3, &found), Verdict::Torn { seqs: vec![3] });
        // Mixed with an older write instead: lost.
        let mut found = content(2, 3);
        found[BS / 2..].copy_from_slice(&content(1, 3)[BS / 2..]);
        assert!(matches!(oracle.judge(3, &found), Verdict::Lost(_)));
        // Block 2 has no write after its durable one: half old is lost.
        let mut found = content(2, 2);
        found[BS / 2..].copy_from_slice(&content(1, 2)[BS / 2..]);
        assert!(matches!(oracle.judge(2, &found), Verdict::Lost(_)));
    }

    #[test]
    fn unacked_flush_makes_nothing_durable() {
        let oracle = Oracle::new(&record(&[
            r#"{"sent":1,"offset":0,"len":512,"fua":false}"#,
            r#"{"acked":1}"#,
            r#"{"flush_sent":1,"acked_before":1}"#,
        ]));
        assert_eq!(oracle.judge(0, &[0u8; BS]), Verdict::NoDurableWrite);
        // An ack recorded after the FLUSH was sent is not covered by it.
        let oracle = Oracle::new(&record(&[
            r#"{"sent":1,"offset":0,"len":512,"fua":false}"#,
            r#"{"flush_sent":1,"acked_before":0}"#,
            r#"{"acked":1}"#,
            r#"{"flush_acked":1}"#,
        ]));
        assert_eq!(oracle.judge(0, &[0u8; BS]), Verdict::NoDurableWrite);
    }

    #[test]
    fn a_flush_after_a_power_cut_does_not_cover_what_the_cut_may_have_lost() {
        // Write 1 durable (FUA); write 2 over it acknowledged, not durable;
        // the power goes; flush 1 after it covers only write 3.
        let oracle = Oracle::new(&record(&[
            r#"{"sent":1,"offset":0,"len":1024,"fua":true}"#,
            r#"{"acked":1}"#,
            r#"{"sent":2,"offset":0,"len":512,"fua":false}"#,
            r#"{"acked":2}"#,
            r#"{"lost":"connection reset"}"#,
            r#"{"power_cut_after":2}"#,
            r#"{"connected":"nbd://x","size":4096}"#,
            r#"{"sent":3,"offset":512,"len":512,"fua":false}"#,
            r#"{"acked":3}"#,
            r#"{"flush_sent":1,"acked_before":3}"#,
            r#"{"flush_acked":1}"#,
        ]));
        // Block 0 may hold write 1 (write 2 lost) or write 2.
        assert_eq!(oracle.judge(0, &content(1, 0)), Verdict::Durable);
        assert_eq!(oracle.judge(0, &content(2, 0)), Verdict::Later { seq: 2 });
        // Block 1: write 3 is durable, write 1 under it is lost.
        assert_eq!(oracle.judge(1, &content(3, 1)), Verdict::Durable);
        assert!(matches!(oracle.judge(1, &content(1, 1)), Verdict::Lost(_)));
        // Without the cut, the flush covers write 2 too.
        let oracle = Oracle::new(&record(&[
            r#"{"sent":1,"offset":0,"len":1024,"fua":true}"#,
            r#"{"acked":1}"#,
            r#"{"sent":2,"offset":0,"len":512,"fua":false}"#,
            r#"{"acked":2}"#,
            r#"{"flush_sent":1,"acked_before":2}"#,
            r#"{"flush_acked":1}"#,
        ]));
        assert!(matches!(oracle.judge(0, &content(1, 0)), Verdict::Lost(_)));
    }

    #[test]
    fn unknown_content_is_lost_and_ranges_merge() {
        let oracle = three_writes();
        let mut lost = Vec::new();
        for block in [0u64, 1, 3] {
            let mut found = content(1, block);
            if block == 3 {
                found = content(2, 3);
            }
            found[100] ^= 0xff;
            match oracle.judge(block, &found) {
                Verdict::Lost(block) => lost.push(*block),
                other => panic!("block {block}: {other:?}"),
            }
        }
        let Found::Unknown {
            first_differing_byte,
            stamp,
            ..
        } = &lost[0].found
        else {
            panic!("{:?}", lost[0].found);
        };
        assert_eq!(*first_differing_byte, 100);
        assert_eq!(*stamp, Some((1, 0)));
        let zeros = oracle.judge(2, &[0u8; BS]);
        let Verdict::Lost(zeros) = zeros else {
            panic!("{zeros:?}");
        };
        assert!(matches!(
            zeros.found,
            Found::Unknown {
                stamp: None,
                first_differing_byte: 7,
                ..
            }
        ));
        lost.push(*zeros);
        lost.reverse();
        let ranges = merge_lost(lost, BS as u64);
        assert_eq!(ranges.len(), 1);
        assert_eq!((ranges[0].offset, ranges[0].length), (0, 4 * BS as u64));
        let lost_only_0_and_2: Vec<LostBlock> = ranges[0]
            .blocks
            .iter()
            .filter(|b| b.block % 2 == 0)
            .cloned()
            .collect();
        let ranges = merge_lost(lost_only_0_and_2, BS as u64);
        assert_eq!(
            ranges
                .iter()
                .map(|r| (r.offset, r.length))
                .collect::<Vec<_>>(),
            [(0, 512), (1024, 512)]
        );
    }

    #[test]
    fn torn_last_line_is_ignored_and_said() {
        let text = concat!(
            r#"{"record":"emulator-workload","version":1,"seed":9,"block_size":512,"size":4096,"uris":[]}"#,
            "\n",
            r#"{"sent":1,"offset":0,"len":512,"fua":true}"#,
            "\n",
            r#"{"acked":1}"#,
            "\n",
            r#"{"sent":2,"off"#
        );
        let record = Record::parse(text.as_bytes(), Path::new("t")).expect("parses");
        assert!(record.torn_last_line);
        assert_eq!(record.writes.len(), 1);
        assert_eq!(record.lines, 3);
        assert_eq!(record.writes[0].durable, Some(Durability::Fua));
    }

    #[test]
    fn bad_line_in_the_middle_names_its_number() {
        let text = concat!(
            r#"{"record":"emulator-workload","version":1,"seed":9,"block_size":512,"size":4096,"uris":[]}"#,
            "\n",
            "garbage\n",
            r#"{"acked":1}"#,
            "\n",
        );
        let err = Record::parse(text.as_bytes(), Path::new("r.jsonl")).expect_err("refused");
        assert!(err.to_string().contains("r.jsonl line 2"), "{err}");
        let text = concat!(
            r#"{"record":"emulator-workload","version":1,"seed":9,"block_size":512,"size":4096,"uris":[]}"#,
            "\n",
            r#"{"acked":1}"#,
            "\n",
        );
        let err = Record::parse(text.as_bytes(), Path::new("r.jsonl")).expect_err("refused");
        assert!(err.to_string().contains("never sent"), "{err}");
    }
}
