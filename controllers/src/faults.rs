//! Disk faults as data: an array's fault book and the fault layer that
//! applies it.
//!
//! - **The book** is `faults.json` next to the disks: a list of [`DiskRule`]s,
//!   each naming a disk by its file (so a fault follows the disk, not the
//!   slot). Changing it ([`FaultBook::change`]) rewrites the file under a
//!   lock and then moves a generation counter in `faults.live`, which every
//!   process with the array open maps.
//! - **The layer** ([`FaultyMember`]) wraps a member image. On each I/O it
//!   compares the mapped generation with the one it loaded (one atomic load:
//!   nothing more is paid while no fault stands), reloads the book when it
//!   moved, and applies the rules for its disk: the disk does not answer
//!   ([`Effect::Absent`]), errors, latency, bit flips in what is read, writes
//!   acknowledged and dropped, writes torn, the host file system under the
//!   image full ([`Effect::FsFull`]: a write into a block the image file has
//!   not allocated fails with ENOSPC). The RAID engine holds members only
//!   as [`crate::member::Member`]s; [`crate::array::Array::open`] wraps every
//!   member in this layer.
//!
//! A rule names its disk by file, or every disk file of the array with
//! [`ANY_FILE`] (`*`: members, spares, disks added later; never the
//! degraded-write journal, whose [`FaultLayer::crash_point`] wants its name).
//!
//! Random choices (which I/O a rule with a rate below 1 hits, which bits flip)
//! come from the rule's seed and a count of the I/Os the rule has seen in this
//! process: the same I/O sequence gets the same faults.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use disk_images::{DiskImage, FlushStarted, ImageError, MediaError};
use serde::{Deserialize, Serialize};

use crate::member::Member;
use crate::volatile::UndoLog;
use disk_images::intent::Kind;

/// The rules, next to the disks.
pub const BOOK_FILE: &str = "faults.json";
/// The generation counter every process maps.
pub const GENERATION_FILE: &str = "faults.live";

/// Bytes in a sector, the unit of LBA ranges.
pub const SECTOR: u64 = 512;

/// The `file` of a rule for every disk file of the array.
pub const ANY_FILE: &str = "*";

/// What a rule does to the I/Os it hits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "kebab-case")]
pub enum Effect {
    /// The disk does not answer: every I/O fails with `errno`, and the engine
    /// treats the member as failed at once.
    Absent {
        /// ENXIO (pulled) or EIO (dead).
        errno: i32,
    },
    /// The I/O fails with `errno`. A read error is a medium error (the block
    /// cannot be read): a redundant array reconstructs the block and writes it
    /// back.
    Error {
        /// The error number.
        errno: i32,
    },
    /// The I/O takes `ms` longer.
    Delay {
        /// Added latency.
        ms: u64,
    },
    /// A read returns `bits` flipped bits, after the checksum was checked.
    Corrupt {
        /// Bits flipped per hit read.
        bits: u32,
    },
    /// A write is acknowledged and not stored.
    LostWrites,
    /// Of a write of several blocks, only the first half is stored; it is
    /// acknowledged whole.
    TornWrites,
    /// The process making the `nth` matching write (counted in that process)
    /// dies there, before storing it: after `stall_ms` (it hangs first,
    /// holding whatever locks it holds), SIGABRT. The rule is taken out of the
    /// book first, so it fires once: the process that recovers is not hit.
    Crash {
        /// Which matching write, from 1.
        nth: u64,
        /// How long it hangs before it dies, ms.
        stall_ms: u64,
    },
    /// The host file system under the image is full: a write (host write,
    /// rebuild write, repair) whose bytes touch a block the image file has
    /// not allocated (a hole, found with SEEK_DATA/SEEK_HOLE) fails with
    /// ENOSPC and stores nothing; one that only overwrites allocated blocks
    /// is stored. Reads, flushes and marking blocks unreadable (checksums
    /// only) are untouched.
    FsFull,
    /// The disk keeps what was written since its last flush in a volatile
    /// cache, which a power cut loses: each block's bytes and CRC are saved
    /// in the disk's undo log before its first write since the last flush
    /// (`crate::volatile`), for the power-loss fault to put back. Writes
    /// and flushes go on as before, a little slower.
    VolatileCache,
}

/// Who writes: which writes a rule on writes applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writers {
    /// Host writes (and the parity they change): `Member::write_at`.
    pub host: bool,
    /// Rebuild writes, in bulk: `Member::write_blocks`, `mark_unreadable`.
    pub rebuild: bool,
    /// Repairs: scrub repairs, read repairs and resyncs (`Member::rewrite_at`).
    pub repair: bool,
}

impl Writers {
    /// Every writer.
    pub const ALL: Self = Self {
        host: true,
        rebuild: true,
        repair: true,
    };
}

impl Default for Writers {
    fn default() -> Self {
        Self::ALL
    }
}

/// The operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpSet {
    /// Reads.
    pub read: bool,
    /// Writes.
    pub write: bool,
    /// Flushes.
    pub flush: bool,
}

impl OpSet {
    /// Every operation.
    pub const ALL: Self = Self {
        read: true,
        write: true,
        flush: true,
    };
}

/// One standing disk fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRule {
    /// The fault's id (`f3`), for clearing it.
    pub id: String,
    /// The disk: its file in the array's directory (`disk2.img`), or
    /// [`ANY_FILE`] (`*`) for every disk file of the array (members, spares,
    /// disks added later; not `array.journal`).
    pub file: String,
    /// What it does.
    #[serde(flatten)]
    pub effect: Effect,
    /// Which operations.
    pub ops: OpSet,
    /// Which writers' writes (lost, torn, crash).
    #[serde(default)]
    pub writers: Writers,
    /// Only in this process (a controller whose path to the disk is bad);
    /// None: in every process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// First byte of the range on the disk.
    pub start: u64,
    /// End of the range (exclusive; `u64::MAX`: the end of the disk).
    pub end: u64,
    /// The chance that one I/O on the range is hit (1: all).
    pub rate: f64,
    /// Seed of the random choices.
    pub seed: u64,
}

impl DiskRule {
    /// A rule `id` with `effect` on `file`: every operation and writer, the
    /// whole disk, every process, every I/O (seed 0). Narrow it with struct
    /// update syntax.
    pub fn everywhere(id: &str, file: &str, effect: Effect) -> Self {
        Self {
            id: id.to_string(),
            file: file.to_string(),
            effect,
            ops: OpSet::ALL,
            writers: Writers::ALL,
            pid: None,
            start: 0,
            end: u64::MAX,
            rate: 1.0,
            seed: 0,
        }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.end && offset.saturating_add(len.max(1)) > self.start
    }
}

impl crate::book::Rules for DiskRule {
    const FILES: crate::book::Files = crate::book::Files {
        book: BOOK_FILE,
        generation: GENERATION_FILE,
        magic: *b"EMUFAULT",
        what: "fault book",
    };
}

/// The fault book of the array in a directory.
pub type FaultBook = crate::book::Book<DiskRule>;

/// Why the fault book could not be read or changed.
pub type FaultBookError = crate::book::BookError;

/// One process's view of an array's fault book: the rules as of the
/// generation it last loaded.
#[derive(Debug)]
pub struct FaultLayer {
    book: FaultBook,
    /// The generation `rules` was loaded at (`u64::MAX`: never).
    loaded: AtomicU64,
    /// Whether the rules loaded are none (the common case, read without a
    /// lock).
    none: std::sync::atomic::AtomicBool,
    rules: parking_lot::RwLock<Arc<Vec<LoadedRule>>>,
}

/// A rule with this process's count of the I/Os it has seen.
#[derive(Debug)]
struct LoadedRule {
    rule: DiskRule,
    seen: AtomicU64,
}

impl FaultLayer {
    /// The layer over the book of the array in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Self>, FaultBookError> {
        Ok(Arc::new(Self {
            book: FaultBook::open(dir)?,
            loaded: AtomicU64::new(u64::MAX),
            none: std::sync::atomic::AtomicBool::new(true),
            rules: parking_lot::RwLock::new(Arc::new(Vec::new())),
        }))
    }

    /// Wraps `image`, the array's disk `file`.
    pub fn wrap(self: &Arc<Self>, file: &str, image: Arc<DiskImage>) -> Arc<dyn Member> {
        Arc::new(FaultyMember {
            inner: image,
            file: file.to_string(),
            layer: Arc::clone(self),
            undo: parking_lot::Mutex::new(None),
            flush_mark: AtomicU64::new(0),
        })
    }

    /// A crash point in a write to `file` of the array that is not a member
    /// disk (the degraded-write journal, `array.journal`): the process making
    /// the `nth` write a crash rule for `file` matches (host writers, the
    /// range overlapping `[offset, offset+len)`) dies here, as
    /// [`Effect::Crash`] says. `what` names the write in the message.
    pub fn crash_point(&self, file: &str, what: &str, offset: u64, len: u64) {
        let Some(rules) = self.current() else {
            return;
        };
        for loaded in rules.iter() {
            let rule = &loaded.rule;
            let Effect::Crash { nth, stall_ms } = rule.effect else {
                continue;
            };
            if rule.file != file
                || rule.pid.is_some_and(|pid| pid != std::process::id())
                || !rule.writers.host
                || !rule.overlaps(offset, len)
            {
                continue;
            }
            if loaded.seen.fetch_add(1, Ordering::Relaxed) + 1 == nth {
                self.die(rule, file, what, nth, stall_ms);
            }
        }
    }

    /// A crash rule fired: out of the book (it fires once), a word on stderr,
    /// the stall, then SIGABRT.
    fn die(&self, rule: &DiskRule, file: &str, what: &str, nth: u64, stall_ms: u64) -> ! {
        let id = rule.id.clone();
        if let Err(err) = self
            .book
            .change(|rules| rules.retain(|other| other.id != id))
        {
            eprintln!(
                "fault {}: cannot take the rule out of the book: {err}",
                rule.id
            );
        }
        eprintln!(
            "fault {}: dying at {what} {nth} to {file}{}",
            rule.id,
            if stall_ms > 0 {
                format!(" after stalling {stall_ms} ms")
            } else {
                String::new()
            }
        );
        if stall_ms > 0 {
            std::thread::sleep(Duration::from_millis(stall_ms));
        }
        std::process::abort()
    }

    /// The rules now, reloaded if the book changed. A book that cannot be read
    /// keeps the rules last loaded (and says so in the log).
    fn current(&self) -> Option<Arc<Vec<LoadedRule>>> {
        let generation = self.book.generation();
        let loaded = self.loaded.load(Ordering::Acquire);
        if loaded == generation && self.none.load(Ordering::Acquire) {
            return None;
        }
        if loaded != generation {
            let mut rules = self.rules.write();
            if self.loaded.load(Ordering::Acquire) != generation {
                match self.book.rules() {
                    Ok(loaded) => {
                        tracing::info!(rules = loaded.len(), generation, "fault book loaded");
                        self.none.store(loaded.is_empty(), Ordering::Release);
                        *rules = Arc::new(
                            loaded
                                .into_iter()
                                .map(|rule| LoadedRule {
                                    rule,
                                    seen: AtomicU64::new(0),
                                })
                                .collect(),
                        );
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cannot read the fault book; keeping the rules loaded before")
                    }
                }
                self.loaded.store(generation, Ordering::Release);
            }
        }
        let rules = self.rules.read();
        (!rules.is_empty()).then(|| Arc::clone(&rules))
    }
}

/// A member disk seen through its faults.
#[derive(Debug)]
pub struct FaultyMember {
    inner: Arc<DiskImage>,
    file: String,
    layer: Arc<FaultLayer>,
    /// The undo log while an [`Effect::VolatileCache`] rule stands, with
    /// that rule's id.
    undo: parking_lot::Mutex<Option<(String, Arc<UndoLog>)>>,
    /// Where the undo log ended when the latest whole flush began.
    flush_mark: AtomicU64,
}

/// What the rules do to one I/O.
#[derive(Default)]
struct Verdict {
    error: Option<(String, i32)>,
    delay_ms: u64,
    corrupt: Option<(u32, u64)>,
    lost: Option<String>,
    torn: Option<String>,
    /// An [`Effect::FsFull`] rule hit the write.
    fs_full: bool,
    /// An [`Effect::VolatileCache`] rule stands for the write.
    cache: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write(Writer),
    Flush,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Writer {
    Host,
    Rebuild,
    Repair,
}

impl Writer {
    /// The write-intent kind of its writes.
    fn kind(self) -> Kind {
        match self {
            Writer::Host => Kind::Host,
            Writer::Rebuild | Writer::Repair => Kind::Repair,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Writer::Host => "host write",
            Writer::Rebuild => "rebuild write",
            Writer::Repair => "repair",
        }
    }
}

/// SplitMix64: the random stream of a rule (and of bit rot's places).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl FaultyMember {
    /// Whether `rule` is for this disk (by its file, or every disk with
    /// [`ANY_FILE`]), in this process.
    fn mine(&self, rule: &DiskRule) -> bool {
        (rule.file == self.file || rule.file == ANY_FILE)
            && rule.pid.is_none_or(|pid| pid == std::process::id())
    }

    /// What the standing rules do to an `op` of `len` bytes at `offset`.
    fn judge(&self, op: Op, offset: u64, len: u64) -> Option<Verdict> {
        let rules = self.layer.current()?;
        let mut verdict = Verdict::default();
        let mut any = false;
        for loaded in rules.iter().filter(|l| self.mine(&l.rule)) {
            let rule = &loaded.rule;
            let by = |writer: Writer| match writer {
                Writer::Host => rule.writers.host,
                Writer::Rebuild => rule.writers.rebuild,
                Writer::Repair => rule.writers.repair,
            };
            let applies = match rule.effect {
                Effect::Absent { .. } => true,
                Effect::Corrupt { .. } => op == Op::Read,
                Effect::LostWrites | Effect::TornWrites | Effect::Crash { .. } | Effect::FsFull => {
                    matches!(op, Op::Write(writer) if by(writer))
                }
                Effect::VolatileCache => matches!(op, Op::Write(_)),
                Effect::Error { .. } | Effect::Delay { .. } => match op {
                    Op::Read => rule.ops.read,
                    Op::Write(_) => rule.ops.write,
                    Op::Flush => rule.ops.flush,
                },
            };
            if !applies || (op != Op::Flush && !rule.overlaps(offset, len)) {
                continue;
            }
            let seen = loaded.seen.fetch_add(1, Ordering::Relaxed);
            if let (Effect::Crash { nth, stall_ms }, Op::Write(writer)) = (rule.effect, op) {
                if seen + 1 == nth {
                    self.layer
                        .die(rule, &self.file, writer.name(), nth, stall_ms);
                }
                continue;
            }
            let draw = mix(rule.seed ^ mix(seen));
            if rule.rate < 1.0 && ((draw >> 11) as f64 / (1u64 << 53) as f64) >= rule.rate {
                continue;
            }
            any = true;
            match rule.effect {
                Effect::Absent { errno } | Effect::Error { errno } => {
                    verdict.error.get_or_insert((rule.id.clone(), errno));
                }
                Effect::Delay { ms } => verdict.delay_ms += ms,
                Effect::Corrupt { bits } => {
                    verdict.corrupt.get_or_insert((bits, mix(draw)));
                }
                Effect::LostWrites => {
                    verdict.lost.get_or_insert(rule.id.clone());
                }
                Effect::TornWrites => {
                    verdict.torn.get_or_insert(rule.id.clone());
                }
                Effect::FsFull => verdict.fs_full = true,
                Effect::VolatileCache => verdict.cache = true,
                Effect::Crash { .. } => {}
            }
        }
        if verdict.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(verdict.delay_ms));
        }
        any.then_some(verdict)
    }

    fn error(&self, op: Op, offset: u64, id: &str, errno: i32) -> ImageError {
        if op == Op::Read && errno == libc_eio() {
            // An unreadable sector: what a real disk reports as a medium error.
            return ImageError::Media(MediaError {
                image: self.inner.path().to_path_buf(),
                block: offset / disk_images::BLOCK_BYTES as u64,
                expected_crc: 0,
                actual_crc: 0,
                injected: Some(id.to_string()),
            });
        }
        ImageError::Io {
            path: self.inner.path().to_path_buf(),
            operation: match op {
                Op::Read => "read (injected fault)",
                Op::Write(_) => "write (injected fault)",
                Op::Flush => "flush (injected fault)",
            },
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// The error the rules give an `op` that only errors and delays touch.
    fn check(&self, op: Op, offset: u64, len: u64) -> Result<(), ImageError> {
        match self.judge(op, offset, len) {
            Some(Verdict {
                error: Some((id, errno)),
                ..
            }) => Err(self.error(op, offset, &id, errno)),
            _ => Ok(()),
        }
    }

    /// Flips bits of `buf` as a corrupting rule chose.
    fn corrupt(buf: &mut [u8], bits: u32, mut random: u64) {
        if buf.is_empty() {
            return;
        }
        for _ in 0..bits {
            random = mix(random);
            let bit = random % (buf.len() as u64 * 8);
            buf[(bit / 8) as usize] ^= 1 << (bit % 8);
        }
    }

    /// A write through the rules: `store` writes the bytes it is given.
    fn write_with(
        &self,
        writer: Writer,
        offset: u64,
        data: &[u8],
        store: impl FnOnce(&[u8]) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let op = Op::Write(writer);
        let Some(verdict) = self.judge(op, offset, data.len() as u64) else {
            return store(data);
        };
        if let Some((id, errno)) = verdict.error {
            return Err(self.error(op, offset, &id, errno));
        }
        if verdict.lost.is_some() {
            return Ok(());
        }
        let blocks = data.len() / disk_images::BLOCK_BYTES;
        let data = if verdict.torn.is_some() && blocks >= 2 {
            &data[..blocks / 2 * disk_images::BLOCK_BYTES]
        } else {
            data
        };
        if verdict.fs_full {
            self.space_for(offset, data.len() as u64)?;
        }
        if verdict.cache {
            self.keep_in_cache(writer.kind(), offset, data.len() as u64)?;
        }
        store(data)
    }

    /// The undo log, while an [`Effect::VolatileCache`] rule for this disk
    /// stands (opened at its first use under that rule).
    fn undo_log(&self) -> Option<Arc<UndoLog>> {
        let rules = self.layer.current();
        let rule = rules.as_ref().and_then(|rules| {
            rules
                .iter()
                .find(|l| self.mine(&l.rule) && l.rule.effect == Effect::VolatileCache)
        });
        let mut undo = self.undo.lock();
        let Some(rule) = rule else {
            *undo = None;
            return None;
        };
        if let Some((id, log)) = undo.as_ref() {
            if *id == rule.rule.id {
                return Some(Arc::clone(log));
            }
        }
        match UndoLog::open(self.inner.path()) {
            Ok(log) => {
                let log = Arc::new(log);
                *undo = Some((rule.rule.id.clone(), Arc::clone(&log)));
                Some(log)
            }
            Err(err) => {
                tracing::warn!(%err, rule = %rule.rule.id, "cannot keep the disk's volatile cache; its writes count as durable");
                *undo = None;
                None
            }
        }
    }

    /// Before a write of the disk's volatile cache: the blocks as they are.
    fn keep_in_cache(&self, kind: Kind, offset: u64, len: u64) -> Result<(), ImageError> {
        match self.undo_log() {
            Some(log) => log.save(&self.inner, kind, offset, len),
            None => Ok(()),
        }
    }

    /// What a full host file system says to a write of `len` bytes at
    /// `offset`: ENOSPC if they touch a block the image file has not
    /// allocated, nothing if every block they touch is allocated.
    fn space_for(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        let block = disk_images::BLOCK_BYTES as u64;
        let start = offset / block * block;
        let end = offset
            .saturating_add(len)
            .div_ceil(block)
            .saturating_mul(block);
        // Space reserved before the rule stood (a row's writes reserve it on
        // every member first) is the writer's: `fallocate`d blocks may still
        // look like holes to SEEK_DATA.
        if end <= start || self.inner.is_reserved(start, end - start) {
            return Ok(());
        }
        let extents = self.inner.allocation(start, end - start)?;
        if extents.iter().any(|extent| extent.hole) {
            return Err(ImageError::Io {
                path: self.inner.path().to_path_buf(),
                operation: "write (injected fault: the host file system is full)",
                source: std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
            });
        }
        Ok(())
    }
}

/// EIO, without a libc dependency for one constant.
fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}

impl Member for FaultyMember {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn present(&self) -> bool {
        let Some(rules) = self.layer.current() else {
            return true;
        };
        !rules
            .iter()
            .any(|l| self.mine(&l.rule) && matches!(l.rule.effect, Effect::Absent { .. }))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let Some(verdict) = self.judge(Op::Read, offset, buf.len() as u64) else {
            return self.inner.read_at(offset, buf);
        };
        if let Some((id, errno)) = verdict.error {
            return Err(self.error(Op::Read, offset, &id, errno));
        }
        self.inner.read_at(offset, buf)?;
        if let Some((bits, random)) = verdict.corrupt {
            Self::corrupt(buf, bits, random);
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_with(Writer::Host, offset, data, |bytes| {
            self.inner.write_at(offset, bytes)
        })
    }
    fn rewrite_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_with(Writer::Repair, offset, data, |bytes| {
            self.inner.rewrite_at(offset, bytes)
        })
    }
    fn read_blocks(&self, offset: u64, buf: &mut [u8], crcs: &mut [u32]) -> Result<(), ImageError> {
        let Some(verdict) = self.judge(Op::Read, offset, buf.len() as u64) else {
            return self.inner.read_blocks(offset, buf, crcs);
        };
        if let Some((id, errno)) = verdict.error {
            return Err(self.error(Op::Read, offset, &id, errno));
        }
        self.inner.read_blocks(offset, buf, crcs)?;
        if let Some((bits, random)) = verdict.corrupt {
            Self::corrupt(buf, bits, random);
        }
        Ok(())
    }
    fn write_blocks(
        &self,
        offset: u64,
        data: &[u8],
        crcs: Option<&[u32]>,
    ) -> Result<(), ImageError> {
        self.write_with(Writer::Rebuild, offset, data, |bytes| {
            let crcs = crcs.map(|crcs| &crcs[..bytes.len() / disk_images::BLOCK_BYTES]);
            self.inner.write_blocks(offset, bytes, crcs)
        })
    }
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check(Op::Flush, offset, len)?;
        let Some(log) = self.undo_log() else {
            return self.inner.flush_range(offset, len);
        };
        let upto = log.mark();
        self.inner.flush_range(offset, len)?;
        log.flushed(offset, len, upto)
    }
    fn reserve(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        let full = self.layer.current().is_some_and(|rules| {
            rules.iter().any(|l| {
                self.mine(&l.rule)
                    && l.rule.effect == Effect::FsFull
                    && l.rule.overlaps(offset, len)
            })
        });
        if full {
            self.space_for(offset, len)?;
        }
        self.inner.reserve(offset, len)
    }
    fn mark_unreadable(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        let op = Op::Write(Writer::Rebuild);
        if let Some(verdict) = self.judge(op, offset, len) {
            if let Some((id, errno)) = verdict.error {
                return Err(self.error(op, offset, &id, errno));
            }
            if verdict.cache {
                self.keep_in_cache(Kind::Repair, offset, len)?;
            }
        }
        self.inner.mark_unreadable(offset, len)
    }
    fn start_flush(&self) -> Option<FlushStarted> {
        if let Some(log) = self.undo_log() {
            // (Two flushes at once: the later start counts for both, which
            // only takes more writes for durable, see `crate::volatile`.)
            self.flush_mark.store(log.mark(), Ordering::SeqCst);
        }
        self.inner.start_flush()
    }
    fn finish_flush(&self, started: Option<FlushStarted>) -> Result<(), ImageError> {
        self.check(Op::Flush, 0, 0)?;
        self.inner.finish_flush(started)?;
        match self.undo_log() {
            Some(log) => log.flushed(0, u64::MAX, self.flush_mark.load(Ordering::SeqCst)),
            None => Ok(()),
        }
    }
    fn power_lost(&self) -> Vec<std::ops::Range<u64>> {
        self.inner.power_lost()
    }
    fn power_loss_handled(&self) -> Result<(), ImageError> {
        self.inner.power_loss_handled()
    }
}

/// A rule's byte range from an LBA and a sector count (None: to the end).
pub fn range(lba: u64, sectors: Option<u64>) -> (u64, u64) {
    let start = lba.saturating_mul(SECTOR);
    let end = sectors.map_or(u64::MAX, |n| start.saturating_add(n.saturating_mul(SECTOR)));
    (start, end)
}
