//! The disks' volatile write caches, for the power-loss fault: what a disk
//! would lose if the power went now.
//!
//! A real disk acknowledges a write when it is in its cache and makes it
//! durable at a flush (or a FUA write, for its range); a power cut loses any
//! part of what was written since, block by block. The emulator's disks keep
//! everything in the host's page cache, which a killed process leaves intact,
//! so the loss is staged: while an [`crate::faults::Effect::VolatileCache`]
//! rule stands, the fault layer saves each block's bytes and stored CRC in
//! the disk's undo log (`disk2.img.undo`, next to it) before the first write
//! to it since that process's last flush, and notes each completed flush.
//! After every process of the system is killed, [`roll_back`] puts a seeded
//! choice of the blocks written since their last flush back as they were
//! (`disk_images::powercut`).
//!
//! The log is shared by every process with the disk open (records are
//! appended with one `write` each, `O_APPEND`). A flush record says which
//! range it made durable and where the log ended when the flush began
//! (`upto`): saves before that are of writes the flush covers. Whatever the
//! interleaving, the rule only ever takes a write for durable when it may
//! not be (a flush that began while the write was in flight, another
//! process's flush): the new bytes are kept then, which is one of the things
//! a disk may do with a write it never promised. It never puts back a block
//! a completed flush covered. Record layout (little-endian):
//!
//! | record | bytes | fields |
//! |--------|------:|--------|
//! | save   | 24 + 4096 | `b'S'`, kind (0 host, 1 repair), 6 zero bytes, block u64, CRC u32, 4 zero bytes, the block |
//! | flush  | 32    | `b'F'`, 7 zero bytes, offset u64, length u64, `upto` u64 |

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use disk_images::intent::Kind;
use disk_images::powercut::{self, Before};
use disk_images::{DiskImage, ImageError, BLOCK_BYTES};

/// What an image's undo log is called: the image's name and this.
pub const SUFFIX: &str = ".undo";

const SAVE: u8 = b'S';
const FLUSH: u8 = b'F';
const SAVE_HEADER: usize = 24;
const SAVE_LEN: usize = SAVE_HEADER + BLOCK_BYTES;
const FLUSH_LEN: usize = 32;

/// The undo log of `image`.
pub fn log_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(SUFFIX);
    PathBuf::from(name)
}

fn io(path: &Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        path,
        operation,
        source,
    }
}

/// One process's handle on a disk's undo log.
#[derive(Debug)]
pub struct UndoLog {
    path: PathBuf,
    file: File,
    /// Blocks this process saved since its last flush of them.
    saved: parking_lot::Mutex<HashSet<u64>>,
}

impl UndoLog {
    /// Opens (creating) the undo log of `image`.
    pub fn open(image: &Path) -> Result<Self, ImageError> {
        let path = log_path(image);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io(&path, "open the undo log"))?;
        Ok(Self {
            path,
            file,
            saved: parking_lot::Mutex::new(HashSet::new()),
        })
    }

    /// Before a write by `kind` to `[offset, offset+len)` of `image`: saves
    /// the blocks it touches as they are stored now, those this process has
    /// not saved since its last flush.
    pub fn save(
        &self,
        image: &DiskImage,
        kind: Kind,
        offset: u64,
        len: u64,
    ) -> Result<(), ImageError> {
        if len == 0 {
            return Ok(());
        }
        let block = BLOCK_BYTES as u64;
        let first = offset / block;
        let end = offset.saturating_add(len).div_ceil(block);
        let fresh: Vec<u64> = {
            let mut saved = self.saved.lock();
            (first..end).filter(|b| saved.insert(*b)).collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let mut records = vec![0u8; fresh.len() * SAVE_LEN];
        let mut crc = [0u32; 1];
        for (record, &b) in records.chunks_exact_mut(SAVE_LEN).zip(&fresh) {
            let (head, bytes) = record.split_at_mut(SAVE_HEADER);
            image.read_stored(b * block, bytes, &mut crc)?;
            head[0] = SAVE;
            head[1] = match kind {
                Kind::Host => 0,
                Kind::Repair => 1,
            };
            head[8..16].copy_from_slice(&b.to_le_bytes());
            head[16..20].copy_from_slice(&crc[0].to_le_bytes());
        }
        (&self.file)
            .write_all(&records)
            .map_err(io(&self.path, "append to the undo log"))
    }

    /// Where the log ends now: a flush that begins now covers the writes
    /// saved before it.
    pub fn mark(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// A flush of `[offset, offset+len)` (the whole disk: `0, u64::MAX`)
    /// that began when the log ended at `upto` completed.
    pub fn flushed(&self, offset: u64, len: u64, upto: u64) -> Result<(), ImageError> {
        {
            let mut saved = self.saved.lock();
            if offset == 0 && len == u64::MAX {
                saved.clear();
            } else {
                let block = BLOCK_BYTES as u64;
                let (first, end) = (offset / block, offset.saturating_add(len).div_ceil(block));
                saved.retain(|b| *b < first || *b >= end);
            }
        }
        let mut record = [0u8; FLUSH_LEN];
        record[0] = FLUSH;
        record[8..16].copy_from_slice(&offset.to_le_bytes());
        record[16..24].copy_from_slice(&len.to_le_bytes());
        record[24..32].copy_from_slice(&upto.to_le_bytes());
        (&self.file)
            .write_all(&record)
            .map_err(io(&self.path, "append to the undo log"))
    }
}

/// What a power cut did to one disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolledBack {
    /// Blocks written since their last flush.
    pub unflushed: u64,
    /// Of which put back as they were at that flush.
    pub lost: u64,
}

/// A save not covered by a flush, as found in the log.
#[derive(Debug, Clone, Copy)]
struct Save {
    at: u64,
    kind: Kind,
    crc: u32,
}

/// The power cut for `image`, whose processes are all gone: reads its undo
/// log, puts back each block written since its last flush for which
/// `lose(block)` says so, marks every such block's region for the next
/// opener (see `disk_images::powercut`), and removes the log. `None`: the
/// image has no undo log (nothing was written while the cache was kept).
/// The log is scanned record by record (it can be large: every block
/// written, once per flush), and only the blocks put back are read whole.
pub fn roll_back(
    image: &Path,
    mut lose: impl FnMut(u64) -> bool,
) -> Result<Option<RolledBack>, ImageError> {
    let path = log_path(image);
    let log = match File::open(&path) {
        Ok(log) => log,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io(&path, "open the undo log")(err)),
    };
    let len = log
        .metadata()
        .map_err(io(&path, "read the undo log"))?
        .len();
    // Per block, the saves not yet covered by a flush, oldest first.
    let mut open: BTreeMap<u64, Vec<Save>> = BTreeMap::new();
    let mut at = 0u64;
    let mut head = [0u8; FLUSH_LEN];
    let word = |head: &[u8; FLUSH_LEN], at: usize| {
        u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"))
    };
    while at < len {
        let want = (len - at).min(FLUSH_LEN as u64) as usize;
        log.read_exact_at(&mut head[..want], at)
            .map_err(io(&path, "read the undo log"))?;
        match head[0] {
            SAVE if at + SAVE_LEN as u64 <= len => {
                let kind = if head[1] == 0 {
                    Kind::Host
                } else {
                    Kind::Repair
                };
                let crc = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
                open.entry(word(&head, 8))
                    .or_default()
                    .push(Save { at, kind, crc });
                at += SAVE_LEN as u64;
            }
            FLUSH if at + FLUSH_LEN as u64 <= len => {
                let (offset, length, upto) = (word(&head, 8), word(&head, 16), word(&head, 24));
                let block = BLOCK_BYTES as u64;
                let (first, end) = (
                    offset / block,
                    offset.saturating_add(length).div_ceil(block),
                );
                for saves in open.range_mut(first..end).map(|(_, saves)| saves) {
                    saves.retain(|save| save.at >= upto);
                }
                open.retain(|_, saves| !saves.is_empty());
                at += FLUSH_LEN as u64;
            }
            // A record cut short (the writer died in its `write`): the
            // write it was to precede never began.
            _ => break,
        }
    }
    let mut lost = Vec::new();
    let mut written = Vec::new();
    for (&block, saves) in &open {
        // The oldest save not covered by a flush holds the bytes of the
        // last flush (or of a write after it, which a disk may keep too).
        let oldest = saves[0];
        written.push((block, oldest.kind));
        if lose(block) {
            let mut bytes = vec![0u8; BLOCK_BYTES];
            log.read_exact_at(&mut bytes, oldest.at + SAVE_HEADER as u64)
                .map_err(io(&path, "read the undo log"))?;
            lost.push((block, bytes, oldest.crc));
        }
    }
    let before: Vec<Before<'_>> = lost
        .iter()
        .map(|(block, bytes, crc)| Before {
            block: *block,
            bytes,
            crc: *crc,
        })
        .collect();
    powercut::stage(image, &before, &written)?;
    std::fs::remove_file(&path).map_err(io(&path, "remove the undo log"))?;
    Ok(Some(RolledBack {
        unflushed: written.len() as u64,
        lost: lost.len() as u64,
    }))
}

/// The images in `dir` that have an undo log.
pub fn images_with_logs(dir: &Path) -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some(dir.join(name.strip_suffix(SUFFIX)?))
        })
        .collect();
    images.sort();
    images
}
