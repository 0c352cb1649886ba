//! [`DiskImage`]: a raw image file plus its checksum sidecar, both memory-mapped
//! shared. This module owns the rules that keep data and checksums in step: every
//! write updates the CRC of each block it touches under that block's lock (in
//! this process and, through [`crate::blocklocks`], in every process that has
//! the image open), every read checks it, and a mismatch is a [`MediaError`],
//! never silently returned data.
//!
//! A writer killed half-way through a block leaves new bytes under the old CRC.
//! So every block write first records, in the sidecar's pending table, the new
//! CRC and whether the bytes it overwrites were trusted (a host write) or not
//! (a repair), and clears that record after storing the new CRC. A block that
//! fails its CRC under its cross-process lock (no live writer holds it) with a
//! write recorded was left by a dead writer: it is kept as it was left (each
//! byte old or new, as after any interrupted write) when the write was a host
//! write or had completed, and stays a media error when a repair was cut short.
//!
//! Bulk work (scrub, rebuild) reads and writes whole blocks through the image
//! file instead, with `pread`/`pwrite` ([`DiskImage::read_blocks`],
//! [`DiskImage::write_blocks`]): on Linux a file's pages and every `MAP_SHARED`
//! mapping of it are the same page cache, so other processes see the same bytes,
//! under the same block locks and CRC rules, without this process mapping each
//! page in (or, for a new sparse disk, the kernel zeroing each page before it is
//! overwritten).
//!
//! How a write reaches the files depends on the file system they are on
//! ([`Stores`]). In memory (tmpfs), bytes and CRCs are stored straight into the
//! shared mappings. On a file system that writes pages back to a disk (ext4,
//! XFS, btrfs …) they are written with `pwrite`, and the mappings serve reads
//! only: Linux writes a page dirtied through a mapping back as its whole folio,
//! and a file's page cache is often made of large folios (up to 2 MiB, after
//! large sequential writes or read-ahead), so a 4 KiB store would cost the next
//! flush up to megabytes of writes (measured on ext4, kernel 6.18: 1 MiB
//! written back per 4 KiB block stored). `pwrite` marks only the blocks it
//! writes dirty. The sidecar's pending words are the exception: they are
//! stored through the mapping in every case (they must be seen by other
//! processes at once, they are zero at rest, and no flush waits for them).
//!
//! Durability ([`DiskImage::flush`], [`DiskImage::flush_range`]): the image
//! file and the range of CRC entries in the sidecar are synced with
//! `fdatasync` of the file or of the range. On Linux that covers pages dirtied
//! through a shared mapping as well as by `pwrite`: shared writable file
//! mappings are write-protected whenever their pages are clean, so the first
//! store to a page faults and marks it dirty in the page cache, where `fsync`
//! finds it (and `msync(MS_SYNC)` is itself an `fsync` of the range). So a
//! flush in any process makes durable what every process wrote, which is what
//! NBD's `CAN_MULTI_CONN` promises. A flush costs what was written since the
//! last one: the kernel writes back only dirty pages, and a flush of an image
//! that no process has written since a flush completed is skipped altogether
//! (counted in the cross-process lock table, see [`crate::blocklocks`]). Where
//! it is known to be safe (ext4), the CRC entries are written back first and
//! then ride on the device-cache flush of the image's `fdatasync`, so that a
//! FLUSH costs one cache flush of the device, not two ([`CrcSync`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use serde::Serialize;

use crate::blocklocks::CrossLocks;
use crate::fault::CrashPoint;
use crate::intent::{self, Kind, Regions};
use crate::mapping::{start_writeback, write_back, SharedMapping};
use crate::sidecar::{
    SidecarHeader, BLOCK_SIZE, CRC_UNKNOWN, HEADER_LEN, PENDING, PENDING_LEN, TRUSTED,
};
use crate::{ImageError, MediaError};

/// Bytes per checksummed block, as a `usize` for slicing.
pub const BLOCK_BYTES: usize = BLOCK_SIZE as usize;
/// A process whose flushes come at most this many host writes apart starts
/// each write's write-back at once ([`Stores::File`]): measured on ext4 over
/// NBD, +6% at one write per FLUSH and +10–40% for 1 MiB writes with a FLUSH
/// every 4, against nothing to gain (and two system calls per write to pay)
/// when flushes are rare.
const EAGER_WRITEBACK_WRITES: u64 = 4;
/// How many zero bytes one `pwrite` of [`DiskImage::write_zeroes`] takes from.
const ZERO_BUFFER_BYTES: usize = 64 * 1024;
/// Number of lock stripes; block `b` is guarded by stripe
/// `(b / STRIPE_BLOCKS) % LOCK_STRIPES`.
const LOCK_STRIPES: usize = 4096;
/// Consecutive blocks that share a lock stripe (64 KiB): a large request takes
/// one lock per 16 blocks, not one per block.
const STRIPE_BLOCKS: u64 = 16;
/// How many blocks one `pread`/`pwrite` of [`DiskImage::read_blocks`] /
/// [`DiskImage::write_blocks`] covers (and locks at once): 256 KiB.
pub const BULK_BLOCKS: usize = 64;
/// Writes at least this long store their whole blocks with streaming stores
/// ([`SharedMapping::write_from_streaming`]): a large write's bytes are not
/// read back soon, and ordinary stores would first read every destination line.
const STREAMING_WRITE_BYTES: usize = 256 * 1024;
/// How many blocks one zeroing step locks at once.
const ZERO_BATCH_BLOCKS: u64 = 256;

/// The lock stripe of `block`.
fn stripe_of(block: u64) -> usize {
    ((block / STRIPE_BLOCKS) % LOCK_STRIPES as u64) as usize
}

/// The stripes of blocks `[first, first+count)`, sorted (the lock order), each once.
fn sorted_stripes(first: u64, count: u64) -> impl Iterator<Item = usize> {
    let end = first + count;
    let mut stripes: Vec<usize> = (first / STRIPE_BLOCKS..end.div_ceil(STRIPE_BLOCKS))
        .take(LOCK_STRIPES)
        .map(|group| stripe_of(group * STRIPE_BLOCKS))
        .collect();
    stripes.sort_unstable();
    stripes.into_iter()
}

/// The CRC32 of a block of zeros (what a freshly created or trimmed block holds).
pub fn zero_block_crc() -> u32 {
    static ZERO: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
    crc32fast::hash(&ZERO)
}

/// The sidecar path for an image: the image path with `.crc` appended.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".crc");
    PathBuf::from(name)
}

/// Checks that `size` is usable as an image size.
pub fn validate_size(size: u64) -> Result<(), ImageError> {
    if size == 0 {
        return Err(ImageError::InvalidSize {
            size,
            reason: "size must be greater than zero",
        });
    }
    if !size.is_multiple_of(u64::from(BLOCK_SIZE)) {
        return Err(ImageError::InvalidSize {
            size,
            reason: "size must be a multiple of 4 KiB",
        });
    }
    Ok(())
}

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only; the files are opened and mapped read-only.
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

/// How a writer puts bytes and CRCs into an image's files (see the module
/// docs): chosen when the image is opened, from the file system it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    /// Stores into the shared mappings: for file systems in memory (tmpfs,
    /// ramfs, hugetlbfs), which never write pages back.
    Mapping,
    /// `pwrite` of the image and of the sidecar's CRC entries: for file
    /// systems that write pages back to a disk.
    File,
}

impl Stores {
    /// The way to store into `file`, from the file system it is on; `File`
    /// when that cannot be told.
    pub fn for_file(file: &File) -> Self {
        use nix::sys::statfs::{fstatfs, FsType, HUGETLBFS_MAGIC, TMPFS_MAGIC};
        // Not in nix's list; linux/magic.h.
        const RAMFS_MAGIC: u32 = 0x8584_58f6;
        match fstatfs(file) {
            Ok(stat) => {
                let kind = stat.filesystem_type();
                if kind == TMPFS_MAGIC
                    || kind == HUGETLBFS_MAGIC
                    || kind == FsType(RAMFS_MAGIC as _)
                {
                    Self::Mapping
                } else {
                    Self::File
                }
            }
            Err(_) => Self::File,
        }
    }
}

/// How a flush makes the sidecar's CRC entries durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrcSync {
    /// With an `fdatasync` of their own (of the entries' range).
    Own,
    /// Written back and waited for, then covered by the device-cache flush of
    /// the image's `fdatasync` that follows: one flush of the device's write
    /// cache per FLUSH instead of two (which at queue depth 1 is most of a
    /// FLUSH's time). Only where that is known to hold: on ext4, which
    /// overwrites file blocks in place and issues a cache flush on every
    /// `fdatasync` of a regular file (through its journal commit or
    /// explicitly, see `ext4_sync_file`), with both files on one device, the
    /// entries in blocks already allocated and written (so that writing them
    /// back needs no metadata; checked when the image is opened), and data
    /// not journalled. Copy-on-write file systems (btrfs, XFS with reflinks)
    /// must commit metadata for an overwrite, so they use [`CrcSync::Own`].
    WithImage,
}

impl CrcSync {
    /// Which way fits the image open as `data_file` with its sidecar
    /// `crc_file` (open for writing, `entries_end` the end of the entries).
    fn for_files(data_file: &File, crc_file: &File, entries_end: u64) -> Self {
        use nix::sys::statfs::{fstatfs, EXT4_SUPER_MAGIC};
        use nix::unistd::{lseek, Whence};
        let ext4 = |file: &File| {
            fstatfs(file).is_ok_and(|stat| stat.filesystem_type() == EXT4_SUPER_MAGIC)
        };
        let (Ok(data_meta), Ok(crc_meta)) = (data_file.metadata(), crc_file.metadata()) else {
            return Self::Own;
        };
        let eligible = ext4(crc_file)
            && data_meta.dev() == crc_meta.dev()
            && !journals_data(crc_meta.dev())
            // Written back once, so that no block of the entries is still
            // delayed or unwritten; then no hole may lie among them.
            && crc_file.sync_data().is_ok()
            && lseek(crc_file.as_raw_fd(), HEADER_LEN as i64, Whence::SeekHole)
                .is_ok_and(|hole| hole as u64 >= entries_end);
        if eligible {
            Self::WithImage
        } else {
            Self::Own
        }
    }
}

/// Whether the file system on device `dev` is mounted with `data=journal`
/// (its file data then goes through the journal, not written in place).
fn journals_data(dev: u64) -> bool {
    let wanted = format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    mounts.lines().any(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2);
        let super_options = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split(' ').nth(2));
        device == Some(wanted.as_str())
            && super_options.is_some_and(|options| options.split(',').any(|o| o == "data=journal"))
    })
}

/// What [`DiskImage::start_flush`] started and [`DiskImage::finish_flush`]
/// completes.
#[derive(Debug)]
#[must_use = "a flush is complete only once finish_flush has run"]
pub struct FlushStarted {
    /// The image's write count when the flush started.
    writes: u64,
}

/// One extent reported by [`DiskImage::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// True for a hole (unallocated, reads as zeros).
    pub hole: bool,
}

/// A block whose data does not match its stored CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BadBlock {
    /// Block index.
    pub block: u64,
    /// Byte offset of the block in the image.
    pub offset: u64,
    /// CRC stored in the sidecar.
    pub expected_crc: u32,
    /// CRC of the data found.
    pub actual_crc: u32,
}

/// Result of [`DiskImage::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Image path.
    pub image: PathBuf,
    /// Blocks checked.
    pub blocks_checked: u64,
    /// Every block that failed its checksum.
    pub bad_blocks: Vec<BadBlock>,
}

/// Facts about an image, for `image info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// Image path.
    pub image: PathBuf,
    /// Sidecar path.
    pub sidecar: PathBuf,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// Bytes per checksummed block.
    pub block_size: u32,
    /// Number of blocks.
    pub block_count: u64,
    /// Bytes actually allocated on the host file system.
    pub allocated_bytes: u64,
    /// Sidecar format version.
    pub sidecar_version: u32,
}

/// A raw disk image with a CRC32-per-block sidecar, memory-mapped shared.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    data_file: File,
    /// The sidecar, for `pwrite` of CRC entries ([`Stores::File`]) and for
    /// starting their write-back.
    crc_file: File,
    /// How writes reach the files.
    stores: Stores,
    /// The image blocks this process knows are allocated on the host file
    /// system (writable images). With [`Stores::Mapping`], a store through
    /// the mapping into a hole of a full tmpfs would kill the process with
    /// SIGBUS, so the first store into a block allocates it with `fallocate`
    /// first, which fails cleanly with ENOSPC (see [`Self::ensure_allocated`]);
    /// with [`Stores::File`] `pwrite` reports ENOSPC itself, and the bitmap
    /// only serves [`Self::reserve`]. None: read-only, or no `fallocate`.
    allocated: Option<Allocated>,
    /// How a flush makes CRC entries durable.
    crc_sync: CrcSync,
    /// Host writes by this process since its last flush, and whether that
    /// flush came within [`EAGER_WRITEBACK_WRITES`] of the one before (see
    /// [`Self::maybe_start_writeback`]).
    writes_since_flush: AtomicU64,
    flushes_often: AtomicBool,
    data: SharedMapping,
    crcs: SharedMapping,
    size: u64,
    block_count: u64,
    /// The sidecar's format version.
    sidecar_version: u32,
    /// Offset of the pending table in `crcs` (None: a version-1 sidecar opened
    /// read-only, which has none).
    pending_base: Option<usize>,
    /// The image file's block locks, shared by every `DiskImage` of this
    /// process that has the same file open.
    block_locks: Arc<BlockLocks>,
    /// The image's write-intent regions (see [`crate::intent`]).
    regions: Regions,
    /// Whether writes keep the write-intent record: open for writing, on a
    /// file system whose pages outlive a process only until a power loss
    /// ([`Stores::File`]).
    keeps_intent: bool,
    /// Regions that a power loss left unsettled, host and repair bits, as this
    /// process found them when it opened the image (0 once it settled them):
    /// a block there that fails its CRC is a write cut short by the power loss.
    suspect: [AtomicU64; 2],
    /// The regions (host and repair bits together) that the record named from
    /// another boot when this process opened the image: see
    /// [`Self::power_lost`].
    power_lost: u64,
    /// Opened by [`Self::open_member`]: a record from another boot is left for
    /// the caller to finish ([`Self::power_loss_handled`]).
    defers_power_loss: bool,
}

/// The block locks of one image file, one set per process (see
/// [`BlockLocks::for_file`]): two `DiskImage`s of the same file in one process
/// (a RAID view reloaded while I/O on the old one finishes) exclude each other
/// like two threads of one, and only one thread per process ever holds or waits
/// for a stripe's cross-process word, which is what [`CrossLocks`] requires.
#[derive(Debug)]
struct BlockLocks {
    /// In-process block locks, by stripe.
    local: Box<[RwLock<()>]>,
    /// Cross-process block locks, by the same stripes: taken by every writer
    /// (after the in-process lock) and by a reader whose block failed its CRC.
    /// An image whose table cannot be opened does not open.
    shared: CrossLocks,
    /// Readers holding a stripe's in-process lock shared take its gate before
    /// its cross-process lock, so one thread of this process at a time does.
    gates: Box<[Mutex<()>]>,
    /// Taken by every open of the image in this process while it checks
    /// whether it is the first opener with work to do alone (see
    /// [`DiskImage::take_over_intent`]).
    opening: Mutex<()>,
}

impl BlockLocks {
    /// This process's block locks for the image open as `file` (by device and
    /// inode, whatever the path), made on first use and dropped with the last
    /// `DiskImage` using them.
    fn for_file(path: &Path, file: &File) -> Result<Arc<Self>, ImageError> {
        type Registry = Mutex<HashMap<(u64, u64), Weak<BlockLocks>>>;
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        let metadata = file.metadata().map_err(io_error(path, "stat image"))?;
        let key = (metadata.dev(), metadata.ino());
        let mut registry = REGISTRY.get_or_init(Registry::default).lock();
        if let Some(locks) = registry.get(&key).and_then(Weak::upgrade) {
            return Ok(locks);
        }
        registry.retain(|_, locks| locks.strong_count() > 0);
        let locks = Arc::new(Self {
            local: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            shared: CrossLocks::open_holding(file, LOCK_STRIPES).map_err(|source| {
                ImageError::LockTable {
                    image: path.to_path_buf(),
                    source: Box::new(source),
                }
            })?,
            gates: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            opening: Mutex::new(()),
        });
        registry.insert(key, Arc::downgrade(&locks));
        Ok(locks)
    }
}

/// How the caller of a block check holds the block's in-process lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Shared,
    /// Exclusively, and the cross-process lock too.
    Exclusive,
}

/// What a writer knows about the bytes it overwrites, recorded in the block's
/// pending word in case it dies half-way (see
/// [`DiskImage::settle_interrupted_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// They were good data (a host write): a mix of old and new bytes is
    /// acceptable.
    OldBytes,
    /// They may be bad (a repair): only the complete new bytes are.
    NewBytesOnly,
}

/// Whether a write's bytes come at once or in pieces as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// All of them, in one call.
    Whole,
    /// One piece of a large host write ([`DiskImage::write_piece_at`]).
    Piece { first: bool },
}

/// A stripe's cross-process lock, released on drop.
struct SharedLockGuard<'a> {
    locks: &'a CrossLocks,
    stripe: usize,
}

impl<'a> SharedLockGuard<'a> {
    fn take(locks: &'a CrossLocks, stripe: usize) -> Self {
        locks.lock(stripe);
        Self { locks, stripe }
    }
}

impl Drop for SharedLockGuard<'_> {
    fn drop(&mut self) {
        self.locks.unlock(self.stripe);
    }
}

/// A block stripe locked for writing: in this process and in every process.
/// Field order: the cross-process lock is released first.
struct WriteGuard<'a> {
    _shared: SharedLockGuard<'a>,
    _local: RwLockWriteGuard<'a, ()>,
}

fn io_error<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        operation,
        source,
    }
}

impl DiskImage {
    /// Creates a sparse image of `size` bytes at `path` and its sidecar. Without
    /// `force`, an existing image or sidecar is an error and nothing is touched.
    ///
    /// Both files are built under temporary names and renamed into place only
    /// when complete, so a failure (a size the file system refuses, a full disk)
    /// leaves nothing behind and, with `force`, leaves the old image intact. The
    /// sidecar is renamed first: an interruption between the two renames leaves a
    /// pair that `open` refuses (sizes disagree) or that fails its checksums,
    /// never one that silently mixes old data with new checksums.
    pub fn create(path: &Path, size: u64, force: bool) -> Result<Self, ImageError> {
        validate_size(size)?;
        let sidecar = sidecar_path(path);
        let refuse_existing = || -> Result<(), ImageError> {
            for existing in [path, sidecar.as_path()] {
                if !force && existing.exists() {
                    return Err(ImageError::Exists {
                        path: existing.to_path_buf(),
                    });
                }
            }
            Ok(())
        };
        refuse_existing()?;
        let temp_image = temporary_sibling(path);
        let temp_sidecar = temporary_sibling(&sidecar);
        let built = build_files(&temp_image, &temp_sidecar, size).and_then(|()| {
            refuse_existing()?;
            std::fs::rename(&temp_sidecar, &sidecar)
                .map_err(io_error(&sidecar, "create checksum file"))?;
            std::fs::rename(&temp_image, path).map_err(io_error(path, "create image"))
        });
        if let Err(err) = built {
            let _ = std::fs::remove_file(&temp_image);
            let _ = std::fs::remove_file(&temp_sidecar);
            return Err(err);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Make the renames themselves durable.
            File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error(parent, "sync directory"))?;
        }
        Self::open(path, Access::ReadWrite)
    }

    /// Opens an existing image and its sidecar, validating that they belong together.
    pub fn open(path: &Path, access: Access) -> Result<Self, ImageError> {
        Self::open_storing(path, access, None)
    }

    /// Opens a member of a group of images kept consistent with each other
    /// (an array's disks: parity, mirrors), for writing. Like [`Self::open`],
    /// except for what a power loss left (see [`crate::intent`]): this image's
    /// blocks are settled as usual, but the record of the regions that were
    /// being written stays until the caller, having made those regions
    /// consistent across the group ([`Self::power_lost`]), calls
    /// [`Self::power_loss_handled`]. A caller that dies before that finds
    /// them again when it next opens the image.
    pub fn open_member(path: &Path) -> Result<Self, ImageError> {
        Self::open_with(path, Access::ReadWrite, None, true)
    }

    /// Like [`Self::open`], storing writes as `stores` says instead of as the
    /// file system suggests (`None`): for tests of both ways on one machine.
    #[doc(hidden)]
    pub fn open_storing(
        path: &Path,
        access: Access,
        stores: Option<Stores>,
    ) -> Result<Self, ImageError> {
        Self::open_with(path, access, stores, false)
    }

    /// Like [`Self::open_member`], storing as `stores` says: for tests.
    #[doc(hidden)]
    pub fn open_member_storing(path: &Path, stores: Stores) -> Result<Self, ImageError> {
        Self::open_with(path, Access::ReadWrite, Some(stores), true)
    }

    fn open_with(
        path: &Path,
        access: Access,
        stores: Option<Stores>,
        defers_power_loss: bool,
    ) -> Result<Self, ImageError> {
        let writable = access == Access::ReadWrite;
        let open = |p: &Path| OpenOptions::new().read(true).write(writable).open(p);
        let data_file = open(path).map_err(io_error(path, "open image"))?;
        let metadata = data_file.metadata().map_err(io_error(path, "stat image"))?;
        if !metadata.is_file() {
            return Err(ImageError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let size = metadata.len();
        validate_size(size).map_err(|_| ImageError::BadImageSize {
            path: path.to_path_buf(),
            size,
        })?;

        let sidecar = sidecar_path(path);
        let crc_file = match open(&sidecar) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::SidecarMissing { path: sidecar })
            }
            Err(source) => {
                return Err(ImageError::Io {
                    path: sidecar,
                    operation: "open checksum file",
                    source,
                })
            }
        };
        let stores = stores.unwrap_or_else(|| Stores::for_file(&data_file));
        if stores == Stores::File {
            // The sidecar is read a word at a time: no read-ahead, and its
            // pages enter the cache as 4 KiB pages, which keeps a 4-byte CRC
            // `pwrite` from walking a large folio. Only advice.
            let _ = nix::fcntl::posix_fadvise(
                crc_file.as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
            );
        }
        let crc_len = crc_file
            .metadata()
            .map_err(io_error(&sidecar, "stat checksum file"))?
            .len();
        let mut header_bytes = [0u8; HEADER_LEN];
        {
            let got = crc_file
                .read_at(&mut header_bytes, 0)
                .map_err(io_error(&sidecar, "read checksum header"))?;
            if got < HEADER_LEN {
                return Err(ImageError::SidecarTruncated {
                    path: sidecar,
                    expected: HEADER_LEN as u64,
                    actual: crc_len,
                });
            }
        }
        let mut header =
            SidecarHeader::decode(&header_bytes).map_err(|problem| ImageError::SidecarInvalid {
                path: sidecar.clone(),
                problem: problem.to_string(),
            })?;
        if header.image_size != size {
            return Err(ImageError::SizeMismatch {
                image: path.to_path_buf(),
                image_size: size,
                sidecar_size: header.image_size,
            });
        }
        // A version-1 file already at the new length is an upgrade that was
        // cut short between extending the file and rewriting the header (or
        // is under way in another process): finished below when writable.
        let upgrade_cut_short = !header.has_pending() && crc_len == header.upgraded().file_len();
        if crc_len != header.file_len() && !upgrade_cut_short {
            return Err(ImageError::SidecarTruncated {
                path: sidecar,
                expected: header.file_len(),
                actual: crc_len,
            });
        }
        if writable && !header.has_pending() {
            header = upgrade_sidecar(&crc_file, &header)
                .map_err(io_error(&sidecar, "upgrade checksum file"))?;
        }
        let map = |file: &File, len: u64, what: &'static str, p: &Path| {
            if writable {
                SharedMapping::map_writable(file, len)
            } else {
                SharedMapping::map_read_only(file, len)
            }
            .map_err(io_error(p, what))
        };
        let data = map(&data_file, size, "map image", path)?;
        let crcs = map(&crc_file, header.file_len(), "map checksum file", &sidecar)?;
        let crc_sync = match stores {
            Stores::File if writable => {
                let _ = crcs.advise_random();
                let entries_end = SidecarHeader::entry_offset(header.block_count);
                CrcSync::for_files(&data_file, &crc_file, entries_end)
            }
            _ => CrcSync::Own,
        };
        let block_locks = BlockLocks::for_file(path, &data_file)?;
        let allocated = if writable {
            {
                // The sidecar is small (12 bytes a block): allocate all of it
                // now, so that its stores through the mapping (the pending
                // words, whichever way the bytes are stored) never meet a
                // hole, which on a full file system would be a SIGBUS.
                match allocate(&crc_file, 0, header.file_len()) {
                    Ok(()) => Some(Allocated::of_file(&data_file, header.block_count)),
                    Err(nix::errno::Errno::ENOSPC) => {
                        return Err(ImageError::Io {
                            path: sidecar.clone(),
                            operation: "allocate checksum file",
                            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                        })
                    }
                    // A file system without fallocate (or with huge pages'
                    // alignment rules): stores go on as before.
                    Err(_) => None,
                }
            }
        } else {
            None
        };
        let mut image = Self {
            path: path.to_path_buf(),
            data_file,
            crc_file,
            stores,
            allocated,
            crc_sync,
            writes_since_flush: AtomicU64::new(0),
            flushes_often: AtomicBool::new(false),
            data,
            crcs,
            size,
            block_count: header.block_count,
            sidecar_version: header.version,
            pending_base: header.has_pending().then(|| header.pending_base() as usize),
            block_locks,
            regions: Regions::for_blocks(header.block_count),
            keeps_intent: writable && stores == Stores::File,
            suspect: [AtomicU64::new(0), AtomicU64::new(0)],
            power_lost: 0,
            defers_power_loss,
        };
        image.take_over_intent()?;
        Ok(image)
    }

    /// The write-intent record in the sidecar header: host bits, repair bits
    /// and the boot that set them.
    fn intent_record(&self) -> (u64, u64, u64) {
        (
            self.crcs.load_u64_le(intent::HOST_OFFSET),
            self.crcs.load_u64_le(intent::REPAIR_OFFSET),
            self.crcs.load_u64_le(intent::STAMP_OFFSET),
        )
    }

    /// Reads the write-intent record when the image is opened (see
    /// [`crate::intent`]). Bits set under another boot name regions a power
    /// loss may have left half-written: this process treats a block there that
    /// fails its CRC as a write cut short. A first opener (no other process has
    /// the image open; the others wait) that writes settles them for good: it
    /// checks every block of those regions, syncs what earlier processes left
    /// in the page cache, and clears the record.
    fn take_over_intent(&mut self) -> Result<(), ImageError> {
        let (host, repair, stamp) = self.intent_record();
        let lost = host | repair != 0 && intent::this_boot() != Some(stamp);
        if lost {
            self.suspect[0].store(host, Ordering::Relaxed);
            self.suspect[1].store(repair, Ordering::Relaxed);
            self.power_lost = host | repair;
        }
        let shared = &self.block_locks.shared;
        let _opening = self.block_locks.opening.lock();
        if !shared.is_holding() {
            return Ok(());
        }
        let settled = if !self.keeps_intent || host | repair == 0 {
            Ok(())
        } else if !lost {
            self.clear_intent()
        } else {
            self.settle_power_loss(host | repair);
            if self.defers_power_loss {
                // Settled block by block, made durable; the record stays for
                // the caller (see [`Self::open_member`]).
                self.sync_files().inspect(|()| self.forget_suspects())
            } else {
                self.clear_intent()
            }
        };
        let shared_now = shared.share().map_err(|source| ImageError::LockTable {
            image: self.path.clone(),
            source: Box::new(source),
        });
        settled.and(shared_now)
    }

    /// Checks every block of the regions of `bits` after a power loss and
    /// settles those that fail their CRC (see [`Self::settle_interrupted_write`]).
    fn settle_power_loss(&self, bits: u64) {
        let (mut checked, mut kept, mut unreadable) = (0u64, 0u64, 0u64);
        let mut buf = [0u8; BLOCK_BYTES];
        for range in self.regions.blocks(bits) {
            for block in range {
                let _guard = self.lock_stripe_exclusive(stripe_of(block));
                let before = self.stored_crc(block);
                checked += 1;
                match self.read_checked_block(block, &mut buf, Held::Exclusive) {
                    Ok(crc) if crc != before => kept += 1,
                    Ok(_) => {}
                    Err(_) => unreadable += 1,
                }
            }
        }
        tracing::warn!(
            image = %self.path.display(),
            blocks_checked = checked,
            kept,
            unreadable,
            "the image was being written when the power went (the host's, an injected power-loss's, or a kernel crash): \
             blocks written since the last flush were checked; those half on the disk are \
             kept as they were left, repairs cut short read as media errors"
        );
    }

    /// Makes what every earlier process wrote durable, then clears the
    /// write-intent record: by a first opener, alone with the image.
    fn clear_intent(&self) -> Result<(), ImageError> {
        self.sync_files()?;
        for at in [
            intent::HOST_OFFSET,
            intent::REPAIR_OFFSET,
            intent::STAMP_OFFSET,
        ] {
            self.crcs.store_u64_le(at, 0);
        }
        self.block_locks.shared.forget_intent();
        self.forget_suspects();
        Ok(())
    }

    /// Settled: a block failing its CRC is no longer taken for a write the
    /// power loss cut short.
    fn forget_suspects(&self) {
        self.suspect[0].store(0, Ordering::Relaxed);
        self.suspect[1].store(0, Ordering::Relaxed);
    }

    /// `fdatasync` of the image and of the sidecar.
    fn sync_files(&self) -> Result<(), ImageError> {
        self.data_file
            .sync_data()
            .map_err(io_error(&self.path, "fdatasync image"))?;
        self.crc_file
            .sync_data()
            .map_err(io_error(&self.path, "fdatasync checksum file"))
    }

    /// The byte ranges of the regions that a power loss left marked in the
    /// write-intent record, as found when this image was opened (each block
    /// there is settled already): where a group of images (an array) must make
    /// its members consistent with each other again. Empty when the record was
    /// this boot's, or clear.
    pub fn power_lost(&self) -> Vec<std::ops::Range<u64>> {
        let block = u64::from(BLOCK_SIZE);
        self.regions
            .blocks(self.power_lost)
            .map(|blocks| blocks.start * block..blocks.end * block)
            .collect()
    }

    /// Says that the regions of [`Self::power_lost`] are consistent across the
    /// group again, once the caller's writes there are durable (this syncs the
    /// image): the record is restamped with this boot, so that the next first
    /// opener, in this boot, clears it as usual. (Bits are never cleared here:
    /// other processes may be writing.) Nothing when the record is this boot's.
    pub fn power_loss_handled(&self) -> Result<(), ImageError> {
        let (host, repair, stamp) = self.intent_record();
        let boot = intent::this_boot().unwrap_or(0);
        if !self.is_writable() || host | repair == 0 || stamp == boot {
            return Ok(());
        }
        self.sync_files()?;
        self.crcs.store_u64_le(intent::STAMP_OFFSET, boot);
        self.crcs
            .flush_range(0, HEADER_LEN)
            .map_err(io_error(&self.path, "sync write-intent record"))
    }

    /// Makes sure the write-intent record names the regions of
    /// `[offset, offset+len)` for `kind` durably, before anything there is
    /// changed (see [`crate::intent`]): one atomic load when some process
    /// already did, else the bits are set and the header synced.
    fn intend(&self, offset: u64, len: u64, kind: Kind) -> Result<(), ImageError> {
        if !self.keeps_intent || len == 0 {
            return Ok(());
        }
        let which = kind.index();
        let mask = self.regions.mask(offset, len);
        let shared = &self.block_locks.shared;
        if shared.intent_durable(which) & mask == mask {
            return Ok(());
        }
        let (host, repair, _) = self.intent_record();
        if host | repair == 0 {
            // A fresh record: stamp it with this boot. (A record left by
            // another boot keeps its stamp: its regions are still to settle.)
            let boot = intent::this_boot().unwrap_or(0);
            self.crcs.store_u64_le(intent::STAMP_OFFSET, boot);
        }
        self.crcs.or_u64_le(kind.offset(), mask);
        self.crcs
            .flush_range(0, HEADER_LEN)
            .map_err(io_error(&self.path, "sync write-intent record"))?;
        shared.mark_intent_durable(which, mask);
        Ok(())
    }

    /// Whether a power loss left block `block` possibly half-written by a host
    /// write (and not by a repair), unsettled.
    fn power_cut_host_write(&self, block: u64) -> bool {
        self.regions
            .holds(self.suspect[0].load(Ordering::Relaxed), block)
            && !self
                .regions
                .holds(self.suspect[1].load(Ordering::Relaxed), block)
    }

    /// Image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How writes reach the files (see the module docs).
    pub fn stores(&self) -> Stores {
        self.stores
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.data.is_writable()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ImageError::OutOfRange {
                offset,
                length: len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), ImageError> {
        if self.is_writable() {
            Ok(())
        } else {
            Err(ImageError::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    fn lock(&self, block: u64) -> &RwLock<()> {
        &self.block_locks.local[stripe_of(block)]
    }

    /// Makes `held` the read lock of `block`'s stripe, keeping it if it already
    /// is (consecutive blocks share a stripe), releasing the old one first.
    fn hold_shared<'a>(&'a self, held: &mut Option<(usize, RwLockReadGuard<'a, ()>)>, block: u64) {
        let stripe = stripe_of(block);
        if held.as_ref().map(|(s, _)| *s) != Some(stripe) {
            *held = None;
            *held = Some((stripe, self.block_locks.local[stripe].read()));
        }
    }

    /// Like [`Self::hold_shared`], for writing.
    fn hold_exclusive<'a>(&'a self, held: &mut Option<(usize, WriteGuard<'a>)>, block: u64) {
        let stripe = stripe_of(block);
        if held.as_ref().map(|(s, _)| *s) != Some(stripe) {
            *held = None;
            *held = Some((stripe, self.lock_stripe_exclusive(stripe)));
        }
    }

    fn lock_stripe_exclusive(&self, stripe: usize) -> WriteGuard<'_> {
        let local = self.block_locks.local[stripe].write();
        WriteGuard {
            _shared: SharedLockGuard::take(&self.block_locks.shared, stripe),
            _local: local,
        }
    }

    fn stored_crc(&self, block: u64) -> u32 {
        self.crcs
            .load_u32_le(SidecarHeader::entry_offset(block) as usize)
    }

    /// Whether `block` may be read through the mapping. On tmpfs a load from
    /// a hole of a shared mapping allocates a page, and on a full file system
    /// that is a SIGBUS: a block this process does not know to be allocated
    /// is read with `pread` instead (which reads a hole as zeros, allocating
    /// nothing).
    fn mapped_readable(&self, block: u64) -> bool {
        self.allocated
            .as_ref()
            .is_none_or(|allocated| allocated.all(block, block + 1))
    }

    /// Makes sure `[offset, offset+len)` has its space on the host file
    /// system before it is written, so that a write several images must all
    /// store (a row of an array: data and parity) fails with ENOSPC before any
    /// of them stores anything, instead of leaving one written and another
    /// not. One bitmap check once this process knows the blocks are allocated
    /// (it wrote or reserved them, or they held data when it opened the
    /// image); else one `fallocate`. A block another process punched since is
    /// not seen (see [`Allocated`]).
    pub fn reserve(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.ensure_allocated(offset, len)
    }

    /// Whether this process knows every block of `[offset, offset+len)` to be
    /// allocated on the host file system (see [`Self::reserve`]).
    pub fn is_reserved(&self, offset: u64, len: u64) -> bool {
        let block = u64::from(BLOCK_SIZE);
        self.allocated
            .as_ref()
            .is_some_and(|allocated| allocated.all(offset / block, (offset + len).div_ceil(block)))
    }

    /// Makes sure the blocks covering `[position, position + len)` are
    /// allocated on the host file system (one `fallocate` the first time this
    /// process stores into them or reserves them; ENOSPC comes back as an
    /// error, not a SIGBUS through the mapping).
    fn ensure_allocated(&self, position: u64, len: u64) -> Result<(), ImageError> {
        let Some(allocated) = &self.allocated else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let block = u64::from(BLOCK_SIZE);
        let (first, end) = (position / block, (position + len).div_ceil(block));
        if allocated.all(first, end) {
            return Ok(());
        }
        match allocate(&self.data_file, first * block, (end - first) * block) {
            Ok(()) => {
                allocated.set(first, end);
                Ok(())
            }
            // No `fallocate` here (a file system without it): `pwrite`
            // reports a lack of space itself.
            Err(nix::errno::Errno::EOPNOTSUPP) if self.stores == Stores::File => Ok(()),
            Err(err) => Err(ImageError::Io {
                path: self.path.clone(),
                operation: "allocate image space",
                source: err.into(),
            }),
        }
    }

    /// Puts `bytes` at image offset `position`, as [`Self::stores`] says;
    /// `streaming` for a large write whose bytes are not read back soon.
    fn store_bytes(&self, position: u64, bytes: &[u8], streaming: bool) -> Result<(), ImageError> {
        if self.stores == Stores::Mapping {
            self.ensure_allocated(position, bytes.len() as u64)?;
        }
        match self.stores {
            Stores::Mapping if streaming => {
                self.data.write_from_streaming(position as usize, bytes)
            }
            Stores::Mapping => self.data.write_from(position as usize, bytes),
            Stores::File => {
                self.data_file
                    .write_all_at(bytes, position)
                    .map_err(io_error(&self.path, "write image"))?;
                self.note_allocated(position, bytes.len() as u64);
            }
        }
        Ok(())
    }

    /// Notes that `[position, position+len)` was stored with `pwrite`, which
    /// allocated it (a load per block once they are known).
    fn note_allocated(&self, position: u64, len: u64) {
        if let Some(allocated) = &self.allocated {
            let block = u64::from(BLOCK_SIZE);
            let (first, end) = (position / block, (position + len).div_ceil(block));
            if !allocated.all(first, end) {
                allocated.set(first, end);
            }
        }
    }

    /// Puts `len` zero bytes at image offset `position`.
    fn store_zeros(&self, position: u64, len: u64) -> Result<(), ImageError> {
        static ZEROS: [u8; ZERO_BUFFER_BYTES] = [0; ZERO_BUFFER_BYTES];
        match self.stores {
            Stores::Mapping => {
                self.ensure_allocated(position, len)?;
                self.data.fill_zero(position as usize, len as usize)
            }
            Stores::File => {
                let mut done = 0;
                while done < len {
                    let step = (len - done).min(ZERO_BUFFER_BYTES as u64) as usize;
                    self.store_bytes(position + done, &ZEROS[..step], false)?;
                    done += step as u64;
                }
            }
        }
        Ok(())
    }

    /// Stores the CRCs of blocks `first..first + crcs.len()`.
    fn store_crcs(&self, first: u64, crcs: &[u32]) -> Result<(), ImageError> {
        match self.stores {
            Stores::Mapping => {
                for (block, &crc) in (first..).zip(crcs) {
                    self.crcs
                        .store_u32_le(SidecarHeader::entry_offset(block) as usize, crc);
                }
            }
            Stores::File => {
                let mut bytes = [0u8; 4 * BULK_BLOCKS];
                for (batch, sums) in crcs.chunks(BULK_BLOCKS).enumerate() {
                    for (entry, crc) in bytes.chunks_exact_mut(4).zip(sums) {
                        entry.copy_from_slice(&crc.to_le_bytes());
                    }
                    let block = first + (batch * BULK_BLOCKS) as u64;
                    self.crc_file
                        .write_all_at(&bytes[..4 * sums.len()], SidecarHeader::entry_offset(block))
                        .map_err(io_error(&self.path, "write checksum file"))?;
                }
            }
        }
        Ok(())
    }

    /// Counts a write in the cross-process counters that let a flush skip an
    /// image nobody wrote (see [`Self::flush`]): after its bytes and CRCs are
    /// stored, before it is acknowledged.
    fn note_write(&self) {
        self.block_locks.shared.note_write();
    }

    fn pending_offset(&self, block: u64) -> Option<usize> {
        self.pending_base
            .map(|base| base + block as usize * PENDING_LEN)
    }

    /// Records that block `block` is about to be rewritten with bytes whose CRC
    /// is `new_crc` (see the sidecar's pending words): the caller holds the
    /// block's lock for writing, then changes the bytes, then calls
    /// [`Self::end_write`]. A host write may leave the CRC out (`None`): it is
    /// then computed after the copy, from bytes in cache, not before it from
    /// bytes that are not (a repair must give it).
    fn begin_write(&self, block: u64, new_crc: Option<u32>, trust: Trust) {
        debug_assert!(new_crc.is_some() || trust == Trust::OldBytes);
        if let Some(at) = self.pending_offset(block) {
            let trusted = if trust == Trust::OldBytes { TRUSTED } else { 0 };
            let crc = match new_crc {
                Some(crc) => u64::from(crc),
                None => CRC_UNKNOWN,
            };
            self.crcs.store_u64_le(at, PENDING | trusted | crc);
        }
    }

    /// Fault injection for crash-consistency tests: with
    /// `EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE=N` in its environment, a process
    /// aborts in the middle of its N-th block write ([`Self::write_at`],
    /// [`Self::rewrite_at`]). Called for each block of a write of `bytes` at
    /// image offset `position` (whose `block`-th block is the one starting
    /// now) before any of them is stored: when due, the blocks before it and
    /// the first half of its new bytes are stored, none of the rest and no
    /// CRC, as a writer killed at the worst moment.
    fn crash_point(&self, position: u64, bytes: &[u8], block: usize) {
        static CRASH_IN_BLOCK_WRITE: CrashPoint =
            CrashPoint::new("EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE");
        if CRASH_IN_BLOCK_WRITE.due() {
            let start = block * BLOCK_BYTES;
            let half = start + (bytes.len() - start).min(BLOCK_BYTES) / 2;
            let stored = self.store_bytes(position, &bytes[..half], false);
            CRASH_IN_BLOCK_WRITE.abort(&format!("half-way through a block write ({stored:?})"));
        }
    }

    /// Clears block `block`'s pending word (a write that changed nothing).
    fn clear_pending(&self, block: u64) {
        if let Some(at) = self.pending_offset(block) {
            self.crcs.store_u64_le(at, 0);
        }
    }

    /// Stores the new CRCs of blocks `first..first + crcs.len()` and clears
    /// their pending words. If the CRCs cannot be stored, the blocks are left
    /// to [`Self::abandon_writes`].
    fn end_writes(&self, first: u64, crcs: &[u32]) -> Result<(), ImageError> {
        match self.store_crcs(first, crcs) {
            Ok(()) => {
                for block in first..first + crcs.len() as u64 {
                    self.clear_pending(block);
                }
                Ok(())
            }
            Err(err) => {
                self.abandon_writes(first, crcs.len() as u64);
                Err(err)
            }
        }
    }

    /// A write of blocks `[first, first+count)` failed part-way (the host file
    /// system refused a `pwrite`: full, or an I/O error), with their pending
    /// words set and the caller holding their locks exclusively. Each block is
    /// left as a write cut short would leave it: unchanged (its word cleared),
    /// or settled by [`Self::settle_interrupted_write`].
    fn abandon_writes(&self, first: u64, count: u64) {
        let mut bytes = [0u8; BLOCK_BYTES];
        for block in first..first + count {
            self.copy_block(block, self.mapped_readable(block), &mut bytes);
            let actual = crc32fast::hash(&bytes);
            if actual == self.stored_crc(block) {
                self.clear_pending(block);
            } else {
                self.settle_interrupted_write(block, actual);
            }
        }
    }

    /// Block `block` still fails its CRC (`actual` is its bytes' CRC) under its
    /// cross-process lock, so no live writer is changing it. If its pending word
    /// says a write was in flight, that writer died half-way, and the bytes are
    /// settled rather than reported as a media error when they can be trusted:
    /// when they are the write's new bytes, or when the write was over trusted
    /// bytes (each byte is then old or new, as after any write cut short). The
    /// new CRC is stored (on a writable image) and `true` returned. A repair
    /// cut short (its old bytes were bad) leaves a media error, for redundancy
    /// to repair again.
    ///
    /// A word whose new CRC is already the stored one was left by a writer that
    /// died after storing it, before clearing the word: that write completed,
    /// and a mismatch now is damage since, not a write cut short. (A host
    /// write's word does not record the CRC, so for one that died between
    /// those two adjacent stores, and for any writer that died after setting
    /// its word, before changing a byte, damage to the block before it is
    /// written again would be taken for a cut-short write. Both windows are a
    /// few instructions wide.)
    ///
    /// With no write recorded, a block in a region where a power loss caught
    /// host writes not yet flushed ([`Self::power_cut_host_write`]) is kept as
    /// it was left too: its pending word, like its bytes or its CRC, may never
    /// have reached the disk.
    fn settle_interrupted_write(&self, block: u64, actual: u32) -> bool {
        let at = self.pending_offset(block);
        let word = at.map_or(0, |at| self.crcs.load_u64_le(at));
        let power_cut = word & PENDING == 0;
        let accepted = if !power_cut {
            let new_crc = (word & CRC_UNKNOWN == 0).then_some(word as u32);
            let completed = new_crc == Some(self.stored_crc(block));
            new_crc == Some(actual) || (word & TRUSTED != 0 && !completed)
        } else if self.power_cut_host_write(block) {
            // No write recorded, but the power went while host writes to this
            // region were not yet flushed (see [`crate::intent`]).
            true
        } else {
            return false;
        };
        if self.is_writable() {
            let block_bytes = u64::from(BLOCK_SIZE);
            match accepted.then(|| {
                self.intend(block * block_bytes, block_bytes, Kind::Host)
                    .and_then(|()| self.store_crcs(block, &[actual]))
                    .inspect(|()| self.note_write())
            }) {
                Some(Err(err)) => {
                    // The word stays: the next reader under the lock tries again.
                    tracing::warn!(image = %self.path.display(), block, "cannot settle a write cut short: {err}");
                    return false;
                }
                _ => {
                    if let Some(at) = at.filter(|_| !power_cut) {
                        self.crcs.store_u64_le(at, 0);
                    }
                }
            }
        }
        tracing::warn!(
            image = %self.path.display(),
            block,
            accepted,
            "found a write cut short by {}: {}",
            if power_cut { "a power loss" } else { "a process that died" },
            if accepted {
                "its block is kept as it was left"
            } else {
                "the repair it was making is lost, the block reads as a media error"
            }
        );
        accepted
    }

    /// Runs `read_block` (which copies block `block` somewhere and returns the
    /// CRC of what it copied) and checks the CRC against the stored one. The
    /// caller holds the block's in-process lock as `held` says; that excludes
    /// writers in this process, not in others. So a mismatch under a shared hold
    /// is read again under the block's cross-process lock, which settles it.
    fn reread_until_valid(
        &self,
        block: u64,
        held: Held,
        mut read_block: impl FnMut() -> u32,
    ) -> Result<u32, MediaError> {
        let mut actual = read_block();
        let mut expected = self.stored_crc(block);
        // A write cut short is settled only under the block's cross-process
        // lock: no live writer is then between its pending word and its CRC.
        let settled = match held {
            _ if expected == actual => false,
            Held::Exclusive => self.settle_interrupted_write(block, actual),
            Held::Shared => {
                let stripe = stripe_of(block);
                let _gate = self.block_locks.gates[stripe].lock();
                let _shared = SharedLockGuard::take(&self.block_locks.shared, stripe);
                actual = read_block();
                expected = self.stored_crc(block);
                expected != actual && self.settle_interrupted_write(block, actual)
            }
        };
        if expected == actual || settled {
            Ok(actual)
        } else {
            Err(MediaError {
                image: self.path.clone(),
                block,
                expected_crc: expected,
                actual_crc: actual,
                injected: None,
            })
        }
    }

    /// Reads a whole block into `dst` and checks it; the caller holds the
    /// block's lock as `held` says. Returns the CRC of the bytes in `dst` (which
    /// is the stored one).
    fn read_checked_block(
        &self,
        block: u64,
        dst: &mut [u8],
        held: Held,
    ) -> Result<u32, MediaError> {
        debug_assert_eq!(dst.len(), BLOCK_BYTES);
        let mapped = self.mapped_readable(block);
        self.reread_until_valid(block, held, || {
            self.copy_block(block, mapped, dst);
            crc32fast::hash(dst)
        })
    }

    /// Copies block `block` into `dst` (one block long): through the mapping
    /// if `mapped` (see [`Self::mapped_readable`]), else with `pread`; a block
    /// that cannot be read is copied as 0xff bytes, which fail any CRC check
    /// that follows.
    fn copy_block(&self, block: u64, mapped: bool, dst: &mut [u8]) {
        let offset = block * u64::from(BLOCK_SIZE);
        if mapped {
            self.data.read_into(offset as usize, dst);
        } else if self.data_file.read_exact_at(dst, offset).is_err() {
            dst.fill(0xff);
        }
    }

    /// Reads `buf.len()` bytes at `offset`, checking the CRC of every block touched.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check_range(offset, buf.len() as u64)?;
        let mut scratch = [0u8; BLOCK_BYTES];
        let mut held = None;
        for Piece {
            block,
            within,
            step,
            done,
        } in pieces(offset, buf.len())
        {
            self.hold_shared(&mut held, block);
            if step == BLOCK_BYTES {
                self.read_checked_block(block, &mut buf[done..done + step], Held::Shared)?;
            } else {
                self.read_checked_block(block, &mut scratch, Held::Shared)?;
                buf[done..done + step].copy_from_slice(&scratch[within..within + step]);
            }
        }
        Ok(())
    }

    /// Appends `len` bytes read at `offset` to `out`, checking the CRC of every block
    /// touched. Whole blocks are copied straight into `out`'s spare capacity (no
    /// zero-fill, no second copy), which is what large reads want. On error, `out`
    /// is left as it was.
    pub fn read_append(
        &self,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        self.check_range(offset, len as u64)?;
        let start = out.len();
        out.reserve(len);
        let mut scratch = [0u8; BLOCK_BYTES];
        let mut held = None;
        for Piece {
            block,
            within,
            step,
            ..
        } in pieces(offset, len)
        {
            self.hold_shared(&mut held, block);
            let result = if step == BLOCK_BYTES {
                self.append_checked_block(block, out)
            } else {
                self.read_checked_block(block, &mut scratch, Held::Shared)
                    .map(|_| out.extend_from_slice(&scratch[within..within + step]))
            };
            if let Err(err) = result {
                out.truncate(start);
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// Like [`Self::read_checked_block`], appending the block to `out`; on error
    /// `out` is as it was.
    fn append_checked_block(&self, block: u64, out: &mut Vec<u8>) -> Result<(), MediaError> {
        let offset = (block * u64::from(BLOCK_SIZE)) as usize;
        let start = out.len();
        let mapped = self.mapped_readable(block);
        self.reread_until_valid(block, Held::Shared, || {
            out.truncate(start);
            if mapped {
                self.data.append_to(offset, BLOCK_BYTES, out);
            } else {
                out.resize(start + BLOCK_BYTES, 0);
                if self
                    .data_file
                    .read_exact_at(&mut out[start..], offset as u64)
                    .is_err()
                {
                    out[start..].fill(0xff);
                }
            }
            crc32fast::hash(&out[start..])
        })
        .map(drop)
        .inspect_err(|_| out.truncate(start))
    }

    /// Writes `data` at `offset`, keeping every touched block's CRC current. A
    /// partial-block write first checks the block's old contents: patching a
    /// corrupt block would bless the corruption with a fresh CRC.
    ///
    /// This is a host's write over good data: if this process dies half-way, a
    /// block it was changing is kept as it was left (each byte old or new), see
    /// [`Self::rewrite_at`] for repairs.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_with(offset, data, Trust::OldBytes, Part::Whole)
    }

    /// Stores one piece of a large host write whose payload is stored as it
    /// arrives, piece by piece (`first`: its first piece), as [`Self::write_at`]
    /// does, except that only the first piece counts as a host write for the
    /// write-back heuristics (which count writes between flushes), and whole
    /// blocks go in with streaming stores whatever the piece's size: the write
    /// as a whole is large (see `STREAMING_WRITE_BYTES`).
    pub fn write_piece_at(&self, offset: u64, data: &[u8], first: bool) -> Result<(), ImageError> {
        self.write_with(offset, data, Trust::OldBytes, Part::Piece { first })
    }

    /// Writes whole blocks over bytes that are not trusted (a repair, or a
    /// resync): like [`Self::write_at`], except that if this process dies
    /// half-way, a block it was changing reads as a media error unless all of
    /// its new bytes had landed, so that what is left of a bad block is never
    /// blessed with a fresh CRC.
    pub fn rewrite_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check_whole_blocks(offset, data.len() as u64)?;
        self.write_with(offset, data, Trust::NewBytesOnly, Part::Whole)
    }

    fn write_with(
        &self,
        offset: u64,
        data: &[u8],
        trust: Trust,
        part: Part,
    ) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let kind = match trust {
            Trust::OldBytes => Kind::Host,
            Trust::NewBytesOnly => Kind::Repair,
        };
        self.intend(offset, data.len() as u64, kind)?;
        let block_bytes = u64::from(BLOCK_SIZE);
        let end = offset + data.len() as u64;
        let whole_start = offset.next_multiple_of(block_bytes);
        let whole_end = end / block_bytes * block_bytes;
        let at = |position: u64| (position - offset) as usize;
        let write = || -> Result<(), ImageError> {
            if whole_end <= whole_start {
                // No whole block: one or two partial ones.
                return pieces(offset, data.len()).try_for_each(|piece| {
                    let chunk = &data[piece.done..piece.done + piece.step];
                    self.write_partial_block(offset + piece.done as u64, chunk, trust)
                });
            }
            if offset < whole_start {
                self.write_partial_block(offset, &data[..at(whole_start)], trust)?;
            }
            let whole = &data[at(whole_start)..at(whole_end)];
            match self.stores {
                Stores::Mapping => {
                    let streaming = match part {
                        Part::Whole => data.len() >= STREAMING_WRITE_BYTES,
                        Part::Piece { .. } => true,
                    };
                    self.write_blocks_mapped(whole_start, whole, trust, streaming)?;
                }
                Stores::File => {
                    for (batch, bytes) in whole.chunks(BULK_BLOCKS * BLOCK_BYTES).enumerate() {
                        let position = whole_start + (batch * BULK_BLOCKS * BLOCK_BYTES) as u64;
                        self.write_blocks_filed(position, bytes, trust)?;
                    }
                }
            }
            if whole_end < end {
                self.write_partial_block(whole_end, &data[at(whole_end)..], trust)?;
            }
            Ok(())
        };
        let result = write();
        // Counted even when it failed part-way: some blocks may have changed.
        self.note_write();
        let counted = !matches!(part, Part::Piece { first: false });
        self.maybe_start_writeback(offset, data.len() as u64, counted);
        result
    }

    /// When flushes come every few writes (a host syncing each journal commit
    /// or `fsync`), starts writing back what a write just stored, so that the
    /// flush the host is about to send finds it on its way to the device
    /// already. Otherwise pages are left to the flush or the kernel: a write
    /// that is not followed by a flush soon may be written again before it is
    /// needed on disk, and starting its write-back costs two system calls.
    /// `counted`: a host write of its own, not a later piece of one (whose
    /// write-back is started as its first piece's was).
    fn maybe_start_writeback(&self, offset: u64, len: u64, counted: bool) {
        if self.stores != Stores::File || len == 0 {
            return;
        }
        let writes = match counted {
            true => self.writes_since_flush.fetch_add(1, Ordering::Relaxed),
            false => self
                .writes_since_flush
                .load(Ordering::Relaxed)
                .saturating_sub(1),
        };
        if writes < EAGER_WRITEBACK_WRITES && self.flushes_often.load(Ordering::Relaxed) {
            let (crc_offset, crc_len) = self.crc_entries(offset, len);
            let _ = start_writeback(&self.data_file, offset, len);
            let _ = start_writeback(&self.crc_file, crc_offset, crc_len);
        }
    }

    /// Writes `chunk` at `position`, inside one block and not all of it: the
    /// block's old bytes are read (and checked) to compute its new CRC.
    fn write_partial_block(
        &self,
        position: u64,
        chunk: &[u8],
        trust: Trust,
    ) -> Result<(), ImageError> {
        let block = position / u64::from(BLOCK_SIZE);
        let within = (position % u64::from(BLOCK_SIZE)) as usize;
        let _guard = self.lock_stripe_exclusive(stripe_of(block));
        let mut scratch = [0u8; BLOCK_BYTES];
        self.read_checked_block(block, &mut scratch, Held::Exclusive)?;
        scratch[within..within + chunk.len()].copy_from_slice(chunk);
        let crc = crc32fast::hash(&scratch);
        self.begin_write(block, Some(crc), trust);
        self.crash_point(position, chunk, 0);
        if let Err(err) = self.store_bytes(position, chunk, false) {
            self.abandon_writes(block, 1);
            return Err(err);
        }
        self.end_writes(block, &[crc])
    }

    /// Writes whole blocks at `position` through the mapping ([`Stores::Mapping`]),
    /// one block after the other, each block's CRC computed right after its
    /// copy, from bytes still in cache.
    fn write_blocks_mapped(
        &self,
        position: u64,
        bytes: &[u8],
        trust: Trust,
        streaming: bool,
    ) -> Result<(), ImageError> {
        let mut held = None;
        for (i, chunk) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let block_position = position + (i * BLOCK_BYTES) as u64;
            let block = block_position / u64::from(BLOCK_SIZE);
            self.hold_exclusive(&mut held, block);
            let known = (trust == Trust::NewBytesOnly).then(|| crc32fast::hash(chunk));
            self.begin_write(block, known, trust);
            self.crash_point(block_position, chunk, 0);
            self.store_bytes(block_position, chunk, streaming)?;
            let crc = known.unwrap_or_else(|| crc32fast::hash(chunk));
            self.end_writes(block, &[crc])?;
        }
        Ok(())
    }

    /// Writes up to [`BULK_BLOCKS`] whole blocks at `position` with one
    /// `pwrite` of the bytes and one of the CRCs ([`Stores::File`]), holding
    /// all their locks.
    fn write_blocks_filed(
        &self,
        position: u64,
        bytes: &[u8],
        trust: Trust,
    ) -> Result<(), ImageError> {
        let first = position / u64::from(BLOCK_SIZE);
        let count = bytes.len() / BLOCK_BYTES;
        debug_assert!(count <= BULK_BLOCKS && bytes.len().is_multiple_of(BLOCK_BYTES));
        let _guards = self.lock_blocks(first, count as u64);
        let mut crcs = [0u32; BULK_BLOCKS];
        for (i, chunk) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let known = (trust == Trust::NewBytesOnly).then(|| crc32fast::hash(chunk));
            crcs[i] = known.unwrap_or_default();
            self.begin_write(first + i as u64, known, trust);
        }
        for i in 0..count {
            self.crash_point(position, bytes, i);
        }
        if let Err(err) = self.store_bytes(position, bytes, false) {
            self.abandon_writes(first, count as u64);
            return Err(err);
        }
        if trust == Trust::OldBytes {
            for (crc, chunk) in crcs.iter_mut().zip(bytes.chunks_exact(BLOCK_BYTES)) {
                *crc = crc32fast::hash(chunk);
            }
        }
        self.end_writes(first, &crcs[..count])
    }

    /// Checks that `[offset, offset+len)` is inside the image and made of whole blocks.
    fn check_whole_blocks(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_range(offset, len)?;
        let block = u64::from(BLOCK_SIZE);
        if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(ImageError::InvalidSize {
                size: len,
                reason: "bulk block access must be block-aligned",
            });
        }
        Ok(())
    }

    /// Bulk read of whole blocks, for scrub and rebuild: fills `buf` with the
    /// blocks at `offset` (block-aligned; `buf.len()` a multiple of 4 KiB) and
    /// `crcs` with their stored CRCs, each checked against the bytes read.
    ///
    /// The bytes come from the image file with `pread` in one call per
    /// [`BULK_BLOCKS`] blocks: the same page cache the mapping shows (a `MAP_SHARED`
    /// mapping and the file's pages are one and the same on Linux), without
    /// populating this process's page tables page by page. A block whose CRC does
    /// not match is re-read as [`Self::read_at`] does (a writer in another process
    /// may be half-way); if it still does not match, the result is a media error
    /// (and `buf`/`crcs` hold partial data).
    pub fn read_blocks(
        &self,
        offset: u64,
        buf: &mut [u8],
        crcs: &mut [u32],
    ) -> Result<(), ImageError> {
        self.check_whole_blocks(offset, buf.len() as u64)?;
        assert_eq!(crcs.len(), buf.len() / BLOCK_BYTES, "one CRC per block");
        let first_block = offset / u64::from(BLOCK_SIZE);
        for (batch, (bytes, sums)) in buf
            .chunks_mut(BULK_BLOCKS * BLOCK_BYTES)
            .zip(crcs.chunks_mut(BULK_BLOCKS))
            .enumerate()
        {
            let first = first_block + (batch * BULK_BLOCKS) as u64;
            self.read_stored_blocks(first, bytes, sums)?;
            let mismatched = bytes
                .chunks_exact(BLOCK_BYTES)
                .zip(sums.iter())
                .any(|(block_bytes, sum)| crc32fast::hash(block_bytes) != *sum);
            if mismatched {
                // Checked again one block at a time, holding only that block's
                // lock: waiting for another process's lock while holding a
                // batch of ours could close a cycle with it.
                for (i, (block_bytes, sum)) in bytes
                    .chunks_exact_mut(BLOCK_BYTES)
                    .zip(sums.iter_mut())
                    .enumerate()
                {
                    if crc32fast::hash(block_bytes) != *sum {
                        let block = first + i as u64;
                        let _guard = self.lock(block).read();
                        // The CRC these bytes were checked against: the
                        // stored one may have moved on since.
                        *sum = self.read_checked_block(block, block_bytes, Held::Shared)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whole blocks at `offset` as they are stored, bytes and stored CRCs,
    /// checked against nothing: what the power-loss fault saves before a
    /// write it may have to undo (`controllers::volatile`). The caller keeps
    /// other writers of these blocks out (the array's stripe lock); this
    /// holds only this process's block locks.
    pub fn read_stored(
        &self,
        offset: u64,
        buf: &mut [u8],
        crcs: &mut [u32],
    ) -> Result<(), ImageError> {
        self.check_whole_blocks(offset, buf.len() as u64)?;
        assert_eq!(crcs.len(), buf.len() / BLOCK_BYTES, "one CRC per block");
        self.read_stored_blocks(offset / u64::from(BLOCK_SIZE), buf, crcs)
    }

    /// The blocks from `first` (checked to be in the image) as stored, under
    /// this process's shared block locks: one `pread`, then the stored CRCs.
    fn read_stored_blocks(
        &self,
        first: u64,
        buf: &mut [u8],
        crcs: &mut [u32],
    ) -> Result<(), ImageError> {
        let _guards = self.lock_blocks_shared(first, crcs.len() as u64);
        self.data_file
            .read_exact_at(buf, first * u64::from(BLOCK_SIZE))
            .map_err(io_error(&self.path, "read image"))?;
        for (i, sum) in crcs.iter_mut().enumerate() {
            *sum = self.stored_crc(first + i as u64);
        }
        Ok(())
    }

    /// Makes the whole blocks of `[offset, offset+len)` read as media errors
    /// until they are written again, like a disk's bad-block list: for blocks of
    /// a rebuilt disk whose contents could not be reconstructed, which must
    /// never read back as valid zeros. (Their stored CRC becomes the complement
    /// of their bytes' CRC.)
    pub fn mark_unreadable(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_whole_blocks(offset, len)?;
        self.intend(offset, len, Kind::Repair)?;
        let block_size = u64::from(BLOCK_SIZE);
        let mut bytes = [0u8; BLOCK_BYTES];
        let result = (offset / block_size..(offset + len) / block_size).try_for_each(|block| {
            let _guard = self.lock_stripe_exclusive(stripe_of(block));
            self.data
                .read_into((block * block_size) as usize, &mut bytes);
            self.store_crcs(block, &[!crc32fast::hash(&bytes)])
        });
        self.note_write();
        result
    }

    /// Bulk write of whole blocks, for rebuild: writes `data` at `offset`
    /// (block-aligned; `data.len()` a multiple of 4 KiB) with `pwrite`, one call
    /// per [`BULK_BLOCKS`] blocks, and sets each block's CRC.
    ///
    /// `crcs`, when given, are the blocks' CRCs as the caller already knows them
    /// (bytes [`Self::read_blocks`] just verified on a mirror, or an XOR whose
    /// CRC follows from its terms' CRCs); otherwise they are computed. A wrong
    /// CRC here can only make a good block read as a media error, never bless a
    /// bad one; debug builds check them. Going through the file rather than the
    /// mapping spares a new (sparse) disk the page faults that would first
    /// allocate and zero every page.
    pub fn write_blocks(
        &self,
        offset: u64,
        data: &[u8],
        crcs: Option<&[u32]>,
    ) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_whole_blocks(offset, data.len() as u64)?;
        if let Some(crcs) = crcs {
            assert_eq!(crcs.len(), data.len() / BLOCK_BYTES, "one CRC per block");
        }
        self.intend(offset, data.len() as u64, Kind::Repair)?;
        let first_block = offset / u64::from(BLOCK_SIZE);
        let mut computed = [0u32; BULK_BLOCKS];
        for (batch, bytes) in data.chunks(BULK_BLOCKS * BLOCK_BYTES).enumerate() {
            let count = bytes.len() / BLOCK_BYTES;
            let sums: &[u32] = match crcs {
                Some(crcs) => &crcs[batch * BULK_BLOCKS..batch * BULK_BLOCKS + count],
                None => {
                    for (sum, block_bytes) in
                        computed.iter_mut().zip(bytes.chunks_exact(BLOCK_BYTES))
                    {
                        *sum = crc32fast::hash(block_bytes);
                    }
                    &computed[..count]
                }
            };
            debug_assert!(
                bytes
                    .chunks_exact(BLOCK_BYTES)
                    .zip(sums)
                    .all(|(b, &sum)| crc32fast::hash(b) == sum),
                "write_blocks given a wrong CRC"
            );
            let first = first_block + (batch * BULK_BLOCKS) as u64;
            let _guards = self.lock_blocks(first, count as u64);
            for (i, &sum) in sums.iter().enumerate() {
                self.begin_write(first + i as u64, Some(sum), Trust::NewBytesOnly);
            }
            let written = self
                .data_file
                .write_all_at(bytes, first * u64::from(BLOCK_SIZE))
                .map_err(io_error(&self.path, "write image"));
            if let Err(err) = written {
                self.abandon_writes(first, count as u64);
                self.note_write();
                return Err(err);
            }
            let ended = self.end_writes(first, sums);
            self.note_write();
            ended?;
        }
        Ok(())
    }

    /// Locks the blocks `[first, first+count)` for reading in this process, in
    /// stripe order.
    fn lock_blocks_shared(&self, first: u64, count: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        sorted_stripes(first, count)
            .map(|stripe| self.block_locks.local[stripe].read())
            .collect()
    }

    /// Locks the blocks `[first, first+count)` for writing, in this process and
    /// across processes, in stripe order so that two threads (of one process or
    /// of two) locking overlapping ranges cannot deadlock.
    fn lock_blocks(&self, first: u64, count: u64) -> Vec<WriteGuard<'_>> {
        sorted_stripes(first, count)
            .map(|stripe| self.lock_stripe_exclusive(stripe))
            .collect()
    }

    /// Zeroes `[offset, offset+len)`. With `punch_hole`, whole blocks are
    /// deallocated (they read back as zeros); otherwise zeros are written.
    pub fn write_zeroes(&self, offset: u64, len: u64, punch_hole: bool) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let block_size = u64::from(BLOCK_SIZE);
        let end = offset + len;
        let first_full = offset.div_ceil(block_size);
        let end_full = end / block_size;
        if first_full >= end_full {
            // No whole block inside: write zeros through the normal path.
            return self.write_at(offset, &vec![0u8; len as usize]);
        }
        let head = first_full * block_size - offset;
        if head > 0 {
            self.write_at(offset, &vec![0u8; head as usize])?;
        }
        let tail = end - end_full * block_size;
        if tail > 0 {
            self.write_at(end_full * block_size, &vec![0u8; tail as usize])?;
        }
        let result = self
            .intend(
                first_full * block_size,
                (end_full - first_full) * block_size,
                Kind::Host,
            )
            .and_then(|()| self.zero_whole_blocks(first_full, end_full, punch_hole));
        self.note_write();
        result
    }

    /// Zeroes whole blocks `[block, end_full)`, punching holes when asked and
    /// the file system can.
    fn zero_whole_blocks(
        &self,
        mut block: u64,
        end_full: u64,
        punch_hole: bool,
    ) -> Result<(), ImageError> {
        let block_size = u64::from(BLOCK_SIZE);
        let zero_crc = zero_block_crc();
        let zero_crcs = [zero_crc; ZERO_BATCH_BLOCKS as usize];
        let mut can_punch = punch_hole;
        while block < end_full {
            let count = (end_full - block).min(ZERO_BATCH_BLOCKS);
            let _guards = self.lock_blocks(block, count);
            let byte_offset = block * block_size;
            let byte_len = count * block_size;
            if can_punch {
                // One system call, which a kill does not cut short: the words
                // are set only for as long as it runs.
                for b in block..block + count {
                    self.begin_write(b, Some(zero_crc), Trust::OldBytes);
                }
                match punch_hole_in(&self.data_file, byte_offset, byte_len) {
                    Ok(()) => {
                        if let Some(allocated) = &self.allocated {
                            allocated.clear(block, block + count);
                        }
                        self.end_writes(block, &zero_crcs[..count as usize])?
                    }
                    Err(err) => {
                        // Nothing was changed: the words go, the CRCs stay.
                        for b in block..block + count {
                            self.clear_pending(b);
                        }
                        if err != nix::errno::Errno::EOPNOTSUPP {
                            return Err(ImageError::Io {
                                path: self.path.clone(),
                                operation: "punch hole",
                                source: err.into(),
                            });
                        }
                        can_punch = false;
                    }
                }
            }
            if !can_punch {
                for b in block..block + count {
                    self.begin_write(b, Some(zero_crc), Trust::OldBytes);
                }
                if let Err(err) = self.store_zeros(byte_offset, byte_len) {
                    self.abandon_writes(block, count);
                    return Err(err);
                }
                self.end_writes(block, &zero_crcs[..count as usize])?;
            }
            block += count;
        }
        Ok(())
    }

    /// Reserves the image's whole size on the host file system (`fallocate`):
    /// a disk about to be written end to end (a rebuild's new member) then
    /// cannot run out of space half-way, and is not allocated page by page while
    /// it is written (on tmpfs that allocation, serialised per file, dominated
    /// rebuilds by two controllers). Contents (zeros) and CRCs do not change.
    /// File systems without `fallocate` are left as they are.
    pub fn allocate(&self) -> Result<(), ImageError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        self.check_writable()?;
        match fallocate(
            self.data_file.as_raw_fd(),
            FallocateFlags::empty(),
            0,
            self.size as i64,
        ) {
            Ok(()) => {
                if let Some(allocated) = &self.allocated {
                    allocated.set(0, self.block_count);
                }
                Ok(())
            }
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(err) => Err(ImageError::Io {
                path: self.path.clone(),
                operation: "allocate image",
                source: err.into(),
            }),
        }
    }

    /// The byte range of the sidecar's CRC entries for image bytes
    /// `[offset, offset+len)` (`len` > 0).
    fn crc_entries(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / u64::from(BLOCK_SIZE);
        let last = (offset + len - 1) / u64::from(BLOCK_SIZE);
        (SidecarHeader::entry_offset(first), (last - first + 1) * 4)
    }

    /// Makes `[offset, offset+len)` and its checksums durable, as a FUA write
    /// needs: `fdatasync` of that range of the image and of its CRC entries,
    /// whichever process wrote them, and nothing else (other dirty pages stay
    /// in the page cache).
    pub fn flush_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_range(offset, len)?;
        if !self.is_writable() || len == 0 {
            return Ok(());
        }
        let (crc_offset, crc_len) = self.crc_entries(offset, len);
        // Both files' pages go to the device together, then each range is
        // synced (the second sync finds its pages written already).
        let _ = start_writeback(&self.data_file, offset, len);
        let _ = start_writeback(&self.crc_file, crc_offset, crc_len);
        self.sync_crc_entries_before(crc_offset, crc_len)?;
        self.data
            .flush_range(offset as usize, len as usize)
            .map_err(io_error(&self.path, "fdatasync image range"))?;
        self.sync_crc_entries_after(crc_offset, crc_len)
    }

    /// Before the image's sync: CRC entries that ride on its device-cache
    /// flush ([`CrcSync::WithImage`]) must be on the device first.
    fn sync_crc_entries_before(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        match self.crc_sync {
            CrcSync::WithImage => write_back(&self.crc_file, offset, len)
                .map_err(io_error(&self.path, "write back checksum range")),
            CrcSync::Own => Ok(()),
        }
    }

    /// After the image's sync: CRC entries synced on their own.
    fn sync_crc_entries_after(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        match self.crc_sync {
            CrcSync::WithImage => Ok(()),
            CrcSync::Own => self
                .crcs
                .flush_range(offset as usize, len as usize)
                .map_err(io_error(&self.path, "fdatasync checksum range")),
        }
    }

    /// Makes everything written so far to the image, by every process that has
    /// it open, durable with its checksums, including punched holes: what NBD's
    /// FLUSH promises. See the module docs for why `fdatasync` covers every
    /// process and every way of writing; the sidecar's pending words are not
    /// synced (they hold only writes in flight). Skipped when no process has
    /// written the image since a flush completed.
    pub fn flush(&self) -> Result<(), ImageError> {
        let started = self.start_flush();
        self.finish_flush(started)
    }

    /// The first half of [`Self::flush`]: notes what is to be made durable and
    /// starts writing it back without waiting, so that the flushes of several
    /// images (an array's members) reach the device together. `None`: nothing
    /// to do.
    pub fn start_flush(&self) -> Option<FlushStarted> {
        if !self.is_writable() {
            return None;
        }
        let writes = self.writes_since_flush.swap(0, Ordering::Relaxed);
        self.flushes_often
            .store(writes <= EAGER_WRITEBACK_WRITES, Ordering::Relaxed);
        let shared = &self.block_locks.shared;
        let writes = shared.writes();
        if shared.synced() >= writes {
            return None;
        }
        // Errors here are only lost overlap: the syncs below report them.
        let (crc_offset, crc_len) = self.crc_entries(0, self.size);
        let _ = start_writeback(&self.data_file, 0, 0);
        let _ = start_writeback(&self.crc_file, crc_offset, crc_len);
        Some(FlushStarted { writes })
    }

    /// The second half of [`Self::flush`]: waits until what
    /// [`Self::start_flush`] started is durable.
    pub fn finish_flush(&self, started: Option<FlushStarted>) -> Result<(), ImageError> {
        let Some(FlushStarted { writes }) = started else {
            return Ok(());
        };
        let (crc_offset, crc_len) = self.crc_entries(0, self.size);
        self.sync_crc_entries_before(crc_offset, crc_len)?;
        self.data_file
            .sync_data()
            .map_err(io_error(&self.path, "fdatasync image"))?;
        self.sync_crc_entries_after(crc_offset, crc_len)?;
        self.block_locks.shared.mark_synced(writes);
        Ok(())
    }

    /// Describes allocation of `[offset, offset+len)`: data extents and holes, from
    /// the host file system (`SEEK_DATA`/`SEEK_HOLE`). Extents cover the range
    /// exactly, in order.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ImageError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut extents = Vec::new();
        let mut position = offset;
        let fd = self.data_file.as_raw_fd();
        while position < end {
            let next_data =
                match nix::unistd::lseek(fd, position as i64, nix::unistd::Whence::SeekData) {
                    Ok(at) => at as u64,
                    Err(nix::errno::Errno::ENXIO) => end,
                    Err(err) => {
                        // File systems without SEEK_DATA: report the rest as data.
                        if err == nix::errno::Errno::EINVAL {
                            extents.push(Extent {
                                length: end - position,
                                hole: false,
                            });
                            break;
                        }
                        return Err(ImageError::Io {
                            path: self.path.clone(),
                            operation: "seek data",
                            source: err.into(),
                        });
                    }
                };
            if next_data > position {
                let hole_end = next_data.min(end);
                extents.push(Extent {
                    length: hole_end - position,
                    hole: true,
                });
                position = hole_end;
                continue;
            }
            let next_hole =
                match nix::unistd::lseek(fd, position as i64, nix::unistd::Whence::SeekHole) {
                    Ok(at) => at as u64,
                    Err(err) => {
                        return Err(ImageError::Io {
                            path: self.path.clone(),
                            operation: "seek hole",
                            source: err.into(),
                        })
                    }
                };
            let data_end = next_hole.min(end).max(position + 1);
            extents.push(Extent {
                length: data_end - position,
                hole: false,
            });
            position = data_end;
        }
        Ok(extents)
    }

    /// Checks every block against its CRC. `progress` is called with the number of
    /// blocks checked so far, now and then.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> VerifyReport {
        let mut bad_blocks = Vec::new();
        let mut buf = vec![0u8; BLOCK_BYTES];
        for block in 0..self.block_count {
            let _guard = self.lock(block).read();
            if let Err(err) = self.read_checked_block(block, &mut buf, Held::Shared) {
                bad_blocks.push(BadBlock {
                    block,
                    offset: block * u64::from(BLOCK_SIZE),
                    expected_crc: err.expected_crc,
                    actual_crc: err.actual_crc,
                });
            }
            if block % 4096 == 4095 {
                progress(block + 1);
            }
        }
        progress(self.block_count);
        VerifyReport {
            image: self.path.clone(),
            blocks_checked: self.block_count,
            bad_blocks,
        }
    }

    /// Facts about the image.
    pub fn info(&self) -> Result<ImageInfo, ImageError> {
        let metadata = self
            .data_file
            .metadata()
            .map_err(io_error(&self.path, "stat image"))?;
        Ok(ImageInfo {
            image: self.path.clone(),
            sidecar: sidecar_path(&self.path),
            size_bytes: self.size,
            block_size: BLOCK_SIZE,
            block_count: self.block_count,
            allocated_bytes: metadata.blocks() * 512,
            sidecar_version: self.sidecar_version,
        })
    }
}

/// One block's share of an access: the block, where in it the access starts,
/// how many bytes, and how many bytes of the access came before.
struct Piece {
    block: u64,
    within: usize,
    step: usize,
    done: usize,
}

/// Splits the access `[offset, offset+len)` at block boundaries.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let position = offset + done as u64;
        let within = (position % u64::from(BLOCK_SIZE)) as usize;
        let step = (BLOCK_BYTES - within).min(len - done);
        let piece = Piece {
            block: position / u64::from(BLOCK_SIZE),
            within,
            step,
            done,
        };
        done += step;
        Some(piece)
    })
}

/// A name next to `path` for building a file before it is renamed into place.
fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a sparse image of `size` bytes and its sidecar under the given names.
fn build_files(image: &Path, sidecar: &Path, size: u64) -> Result<(), ImageError> {
    let create = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
    };
    let data_file = create(image).map_err(io_error(image, "create image"))?;
    data_file
        .set_len(size)
        .map_err(io_error(image, "size image"))?;
    data_file
        .sync_all()
        .map_err(io_error(image, "sync image"))?;

    let header = SidecarHeader::for_image(size);
    let write_sidecar = || -> io::Result<()> {
        let file = create(sidecar)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, &file);
        out.write_all(&header.encode())?;
        let entry = zero_block_crc().to_le_bytes();
        let chunk: Vec<u8> = entry.iter().copied().cycle().take(64 * 1024).collect();
        let mut remaining = header.block_count * 4;
        while remaining > 0 {
            let step = remaining.min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..step])?;
            remaining -= step as u64;
        }
        out.flush()?;
        drop(out);
        // The pending table: zero words (no write in flight), left sparse.
        file.set_len(header.file_len())?;
        file.sync_all()
    };
    write_sidecar().map_err(io_error(sidecar, "write checksum file"))
}

/// Upgrades a version-1 sidecar (no pending table), open for writing, to the
/// current version: extends it with zero pending words, then rewrites the
/// header. Interrupted in between, the file is a version-1 header on a
/// version-2 length, which `open` refuses as the wrong length rather than
/// misreading.
fn upgrade_sidecar(file: &File, header: &SidecarHeader) -> io::Result<SidecarHeader> {
    let upgraded = header.upgraded();
    file.set_len(upgraded.file_len())?;
    file.write_all_at(&upgraded.encode(), 0)?;
    file.sync_all()?;
    Ok(upgraded)
}

/// `fallocate(KEEP_SIZE)` of a range: allocates its holes without changing
/// the file's size.
fn allocate(file: &File, offset: u64, len: u64) -> Result<(), nix::errno::Errno> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
}

/// One bit per block: allocated on the host file system, as far as this
/// process knows (it allocated it, and has not punched it since). Another
/// process punching a block this one knows is not seen: such a block is
/// stored into without a new `fallocate` (a SIGBUS only if the file system is
/// full at that moment too).
#[derive(Debug)]
struct Allocated(Vec<AtomicU64>);

impl Allocated {
    fn new(blocks: u64) -> Self {
        Self(
            (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// The blocks of `file` that hold data now (its extents, by
    /// `SEEK_DATA`/`SEEK_HOLE`; none known if the file system cannot say).
    fn of_file(file: &File, blocks: u64) -> Self {
        use nix::unistd::{lseek, Whence};
        let known = Self::new(blocks);
        let block = i64::from(BLOCK_SIZE);
        let end = blocks as i64 * block;
        let mut at = 0i64;
        while at < end {
            let Ok(data) = lseek(file.as_raw_fd(), at, Whence::SeekData) else {
                break; // ENXIO: no data after `at`
            };
            let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole).unwrap_or(end);
            // Whole blocks only: a block partly in a hole is not known.
            let first = (data + block - 1) / block;
            let last = hole.min(end) / block;
            if last > first {
                known.set(first as u64, last as u64);
            }
            at = hole.max(data + 1);
        }
        known
    }

    fn all(&self, first: u64, end: u64) -> bool {
        (first..end)
            .all(|b| self.0[(b / 64) as usize].load(Ordering::Relaxed) & (1 << (b % 64)) != 0)
    }

    fn set(&self, first: u64, end: u64) {
        for b in first..end {
            self.0[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::Relaxed);
        }
    }

    fn clear(&self, first: u64, end: u64) {
        for b in first..end {
            self.0[(b / 64) as usize].fetch_and(!(1 << (b % 64)), Ordering::Relaxed);
        }
    }
}

fn punch_hole_in(file: &File, offset: u64, len: u64) -> Result<(), nix::errno::Errno> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_opens_of_one_file_share_its_block_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.img");
        let a = DiskImage::create(&path, 1 << 20, false).expect("create");
        let b = DiskImage::open(&path, Access::ReadOnly).expect("open");
        assert!(Arc::ptr_eq(&a.block_locks, &b.block_locks));
        let other = DiskImage::create(&dir.path().join("e.img"), 1 << 20, false).expect("create");
        assert!(!Arc::ptr_eq(&a.block_locks, &other.block_locks));
        // Held by one, the stripe is held for the other.
        let guard = a.lock_stripe_exclusive(3);
        assert!(b.block_locks.local[3].try_read().is_none());
        drop(guard);
        assert!(b.block_locks.local[3].try_read().is_some());
    }

    #[test]
    fn bulk_blocks_round_trip_and_catch_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.img");
        let image = DiskImage::create(&path, 1 << 20, false).expect("create");
        let data: Vec<u8> = (0..8 * BLOCK_BYTES)
            .map(|i| (i * 31 + i / 4096) as u8)
            .collect();
        image
            .write_blocks(4 * BLOCK_BYTES as u64, &data, None)
            .expect("write");
        // The mapping sees what pwrite wrote, with fresh CRCs.
        let mut back = vec![0u8; data.len()];
        image
            .read_at(4 * BLOCK_BYTES as u64, &mut back)
            .expect("read");
        assert_eq!(back, data);
        let mut bulk = vec![0u8; data.len()];
        let mut crcs = vec![0u32; 8];
        image
            .read_blocks(4 * BLOCK_BYTES as u64, &mut bulk, &mut crcs)
            .expect("bulk read");
        assert_eq!(bulk, data);
        let expected: Vec<u32> = data.chunks(BLOCK_BYTES).map(crc32fast::hash).collect();
        assert_eq!(crcs, expected);
        // Known CRCs are stored as given.
        let other = DiskImage::create(&dir.path().join("e.img"), 1 << 20, false).expect("e");
        other.write_blocks(0, &bulk, Some(&crcs)).expect("copy");
        other
            .verify(|_| ())
            .bad_blocks
            .is_empty()
            .then_some(())
            .expect("clean");
        // A byte flipped behind the image's back is a media error.
        image
            .data
            .write_from(6 * BLOCK_BYTES + 17, &[0xff ^ data[2 * BLOCK_BYTES + 17]]);
        let err = image
            .read_blocks(4 * BLOCK_BYTES as u64, &mut bulk, &mut crcs)
            .expect_err("corrupt");
        assert!(
            matches!(err, ImageError::Media(MediaError { block: 6, .. })),
            "{err}"
        );
        // Allocating keeps contents and CRCs.
        other.allocate().expect("allocate");
        assert!(other.verify(|_| ()).bad_blocks.is_empty());
        let mut tail = vec![1u8; BLOCK_BYTES];
        other
            .read_at((1 << 20) - BLOCK_BYTES as u64, &mut tail)
            .expect("tail");
        assert!(tail.iter().all(|&b| b == 0));
        // Unaligned bulk access is refused.
        assert!(image.read_blocks(100, &mut bulk, &mut crcs).is_err());
        assert!(image.write_blocks(0, &data[..100], None).is_err());
    }
}
