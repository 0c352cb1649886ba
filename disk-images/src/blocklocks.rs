//! Block locks shared by every process that has one image open.
//!
//! Inside a process, [`crate::DiskImage`] guards each block with a striped
//! `RwLock`. Two processes serving the same image (the reason it is mapped
//! `MAP_SHARED`) also need to exclude each other: a writer updates a block's
//! data and then its CRC, and without a lock between processes a reader in the
//! other process can see the pair half-way (a spurious media error), and two
//! writers can interleave so that data and CRC never match again.
//!
//! [`CrossLocks`] is that lock: one 8-byte word per stripe (the same stripes as
//! the in-process locks) in a small file in `/dev/shm` (in a directory of this
//! user, see below) named after the image's device and inode, so every process that opens the image, by whatever path,
//! maps the same table. A word is `0` when free, or the holder's
//! [identity](crate::process); it is taken by compare-and-swap. Within a process
//! only one thread at a time may hold or wait for a stripe's word (the image
//! makes sure of that: every `DiskImage` of one file in a process shares one
//! set of in-process locks and one `CrossLocks`), so the identity is enough.
//!
//! A holder that dies (kill -9) leaves its words set; a waiter finds the holder
//! gone (checked every [`LIVENESS_CHECK`](crate::process::LIVENESS_CHECK)) and
//! takes the word over. Whatever that process was writing was never
//! acknowledged; a block it left half-written is settled by the image's
//! pending-write record (see [`crate::DiskImage`]), which does not depend on
//! this table surviving.
//!
//! Life cycle of the table file: every process holds a shared `flock` on it
//! while it has the image open. The first opener (the one that can get the
//! `flock` exclusively) zeroes it; the last to close removes it, and a first
//! opener also removes other images' tables that nobody holds (left by a
//! process killed with the image open). An opener that raced with a removal
//! notices that the path no longer names the file it locked and starts again;
//! a remover checks, holding the lock, that the path still names the file it
//! locked (a new table may have been made there since it opened the path).
//!
//! ## Where the tables live, and why nobody else can take them over
//!
//! The tables are in a directory of this process's effective user,
//! `BASE/emulator-<euid>/`, named `emulator-blocklocks-<dev>-<ino>`. `BASE`
//! is `/dev/shm` (a tmpfs: the words are only ever memory), or the directory
//! named by the environment variable [`LOCK_DIR_ENV`] (`EMULATOR_LOCK_DIR`),
//! the explicit opt-in for machines without `/dev/shm`; on a disk file system
//! the kernel writes the table's pages back from time to time, which costs
//! some speed, never correctness. Every process that serves one image must
//! use the same `BASE` and run as the same user, or they do not exclude each
//! other. Without a usable directory an image does not open: nothing falls
//! back to working without the locks ([`LockTableError::NoShm`]).
//!
//! A table is a lock everyone who opens the image obeys, so a table planted by
//! someone else (another local user, or a stray process) must never be used:
//! they could hold every stripe, or watch and disturb our writes. Hence:
//! - the per-user directory is made with mode 0700 and, made or found, must be
//!   a real directory (not a symlink) owned by our euid that neither group nor
//!   other may write; `BASE` must be a directory that others cannot write to
//!   unless it is sticky (`/dev/shm` is mode 1777), so nobody else can rename
//!   our directory away and put another in its place. Inside it, only we (and
//!   root) can make names;
//! - a table is created with `O_CREAT | O_EXCL` and mode 0600, and an existing
//!   one is opened with `O_NOFOLLOW` (a symlink is refused, never followed);
//!   the opened file is then checked with `fstat`: a regular file, owned by
//!   our euid, no group or other permission bits; once locked shared, it must
//!   be the table's size (its first opener sized it while it held the lock
//!   exclusively; a first opener resets a table of ours whatever its size,
//!   as it zeroes it anyway). A table that fails
//!   is an error naming the path and the problem ([`LockTableError::Unsafe`]),
//!   never used;
//! - removal (the last closer's, and the sweep of abandoned tables) only ever
//!   removes a regular file of ours whose `flock` it holds, after checking with
//!   `lstat` that the name still names that file: never a symlink, never
//!   another user's file.
//!
//! A per-user directory (rather than checked names straight in `/dev/shm`)
//! means another user cannot even make a name where our tables go, so they
//! cannot make an image unopenable by planting a file at its table's path;
//! the checks on each table still run, against anything root or we left there.
//! A process that cannot read its own identity (no `/proc`) cannot take the
//! locks either, and its images do not open.
//!
//! ## File format (native endianness: the file lives in memory and never
//! leaves the machine)
//!
//! | offset    | size     | field  | meaning                                     |
//! |----------:|---------:|--------|---------------------------------------------|
//! | 0         | 8 × *s*  | words  | per stripe: holder identity, `0` when free  |
//! | 8·*s*     | 8        | writes | count of writes to the image (data and CRCs stored), by every process |
//! | 8·*s* + 8 | 8        | synced | the `writes` count that the last completed flush started from |
//! | 8·*s* + 16 | 8       | host intent | write-intent bits of host writes made durable in the sidecar (see [`crate::intent`]) |
//! | 8·*s* + 24 | 8       | repair intent | the same for repairs and rebuild writes |
//!
//! (*s* is the number of stripes, 4096.) The two counters let a flush in any
//! process skip an image that nobody has written since a flush completed: a
//! writer counts its write after the bytes and CRCs are stored and before it
//! is acknowledged, and a flush reads `writes` before it syncs and raises
//! `synced` to that value once the sync is done. A new table starts with
//! `writes` 1 and `synced` 0, so the first flush after it syncs: what the
//! processes before it wrote may still be in the page cache. The intent words
//! start at 0 too: a writer into a region whose bit is not there syncs the
//! sidecar's record of it once, then sets the bit here for everyone.
//!
//! A first opener may keep the table exclusively while it settles what the
//! processes before it left ([`CrossLocks::open_holding`]); others wait in
//! their open until it shares it.

use std::fs::{DirBuilder, File, Metadata, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::mapping::SharedMapping;
use crate::process::{alive, my_identity, Backoff};

/// The environment variable that names another base directory for the lock
/// tables than `/dev/shm` (see the module docs).
pub const LOCK_DIR_ENV: &str = "EMULATOR_LOCK_DIR";
/// The base directory of the lock tables unless [`LOCK_DIR_ENV`] names one.
const DEFAULT_BASE: &str = "/dev/shm";
/// Name prefix of the lock tables.
const TABLE_PREFIX: &str = "emulator-blocklocks-";
/// How many times an opener starts again after its table was removed under it
/// (each time by a last closer that ran between its open and its lock).
const OPEN_ATTEMPTS: usize = 100;

/// Why an image's cross-process lock table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LockTableError {
    /// `/dev/shm` (the default base) is missing or unusable.
    #[error("cross-process block locks need /dev/shm (a tmpfs): {problem}; set {LOCK_DIR_ENV}=DIR to keep them elsewhere")]
    NoShm {
        /// What is wrong, naming the path.
        problem: String,
    },
    /// The directory named by [`LOCK_DIR_ENV`] is missing or unusable.
    #[error("cross-process block locks cannot use {LOCK_DIR_ENV}={dir}: {problem}", dir = dir.display())]
    BadLockDir {
        /// The directory named.
        dir: PathBuf,
        /// What is wrong, naming the path.
        problem: String,
    },
    /// Something at the path of our directory or of a table is not ours, or
    /// could be changed by someone else.
    #[error("{path} is not safe to use for cross-process block locks: {problem}", path = path.display())]
    Unsafe {
        /// The directory or table.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// An operating-system call on the table failed.
    #[error("lock table {path}: {operation}: {source}", path = path.display())]
    Io {
        /// The table (or its directory).
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// This process's identity (the word it publishes) cannot be read.
    #[error("cross-process block locks need this process's identity from /proc/self/stat: {0}")]
    Identity(#[source] io::Error),
}

/// The caller's effective user id.
fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The directory this process keeps its lock tables in (see the module docs),
/// made if needed and checked.
#[derive(Debug, Clone)]
pub struct LockDir {
    path: PathBuf,
    euid: u32,
}

impl LockDir {
    /// The directory under [`LOCK_DIR_ENV`]'s base if it is set (and not
    /// empty), else under `/dev/shm`.
    pub fn from_env() -> Result<Self, LockTableError> {
        let (base, chosen) = Self::base(std::env::var_os(LOCK_DIR_ENV));
        Self::prepare(&base, chosen)
    }

    /// The base directory for the value of [`LOCK_DIR_ENV`], and whether the
    /// user chose it.
    fn base(chosen: Option<std::ffi::OsString>) -> (PathBuf, bool) {
        match chosen.filter(|dir| !dir.is_empty()) {
            Some(dir) => (PathBuf::from(dir), true),
            None => (PathBuf::from(DEFAULT_BASE), false),
        }
    }

    /// This user's directory under `base`; `chosen` when the user named
    /// `base` (it changes only the error's wording).
    fn prepare(base: &Path, chosen: bool) -> Result<Self, LockTableError> {
        let euid = effective_uid();
        let fail = |problem: String| {
            if chosen {
                LockTableError::BadLockDir {
                    dir: base.to_path_buf(),
                    problem,
                }
            } else {
                LockTableError::NoShm { problem }
            }
        };
        // The base may be a symlink (the user's choice, or the system's).
        let metadata =
            std::fs::metadata(base).map_err(|err| fail(format!("{}: {err}", base.display())))?;
        if !metadata.is_dir() {
            return Err(fail(format!("{} is not a directory", base.display())));
        }
        let mode = metadata.mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(fail(format!(
                "{} has mode {:04o}: others may write to it and it is not sticky, so they \
                 could replace our directory in it",
                base.display(),
                mode & 0o7777
            )));
        }
        let path = base.join(format!("emulator-{euid}"));
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(fail(format!("cannot create {}: {err}", path.display()))),
        }
        let metadata = std::fs::symlink_metadata(&path).map_err(|source| LockTableError::Io {
            path: path.clone(),
            operation: "lstat",
            source,
        })?;
        let problem = if metadata.file_type().is_symlink() {
            Some("is a symlink, not a directory".to_string())
        } else if !metadata.is_dir() {
            Some("is not a directory".to_string())
        } else if metadata.uid() != euid {
            Some(format!("owned by uid {}, not {euid}", metadata.uid()))
        } else if metadata.mode() & 0o022 != 0 {
            Some(format!(
                "has mode {:04o}: group or other may write to it",
                metadata.mode() & 0o7777
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => Err(LockTableError::Unsafe { path, problem }),
            None => Ok(Self { path, euid }),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock table's path for the image open as `image`.
    fn table_path(&self, image: &File) -> Result<PathBuf, LockTableError> {
        let metadata = image.metadata().map_err(|source| LockTableError::Io {
            path: self.path.clone(),
            operation: "stat the image",
            source,
        })?;
        Ok(self.path.join(format!(
            "{TABLE_PREFIX}{:x}-{}",
            metadata.dev(),
            metadata.ino()
        )))
    }

    /// Why the file described by `metadata` (from `fstat` of the opened
    /// file) is not a table of ours. Its size is checked once it is locked:
    /// before that a creator may still be sizing it, and a table of ours
    /// that nobody holds is reset whatever its size.
    fn table_problem(&self, metadata: &Metadata) -> Option<String> {
        if !metadata.is_file() {
            return Some("is not a regular file".to_string());
        }
        if metadata.uid() != self.euid {
            return Some(format!(
                "owned by uid {}, not {}",
                metadata.uid(),
                self.euid
            ));
        }
        let mode = metadata.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Some(format!(
                "has mode {mode:04o}: group or other may access it (expected 0600)"
            ));
        }
        None
    }

    /// Removes the tables of other images that no process uses any more (their
    /// last user was killed before it could remove them). A table is unused
    /// when its `flock` can be taken exclusively; an opener racing with the
    /// removal notices it (see [`CrossLocks::open`]). Only regular files of
    /// ours are touched: never a symlink, never another user's file.
    fn remove_abandoned(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let named = entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(TABLE_PREFIX));
            if !named || path == keep {
                continue;
            }
            let Ok(listed) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !listed.is_file() || listed.uid() != self.euid {
                continue;
            }
            let Ok(file) = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
            else {
                continue;
            };
            let ours = file
                .metadata()
                .is_ok_and(|opened| opened.is_file() && opened.uid() == self.euid);
            if ours && file.try_lock().is_ok() {
                remove_if_still(&path, &file);
            }
        }
    }
}

/// Whether `path` (not following a symlink) names `file`.
fn names(path: &Path, file: &File) -> io::Result<bool> {
    let locked = file.metadata()?;
    let named = std::fs::symlink_metadata(path)?;
    Ok(locked.dev() == named.dev() && locked.ino() == named.ino())
}

/// Removes `path` if it still names `file`, whose `flock` the caller holds
/// exclusively. Between opening `path` and locking, its file may have been
/// removed and a new table created there by another process (which holds it):
/// that one must stay. While the caller holds the lock nobody else can remove
/// `file` (removal needs its lock), so once checked, `path` keeps naming it.
fn remove_if_still(path: &Path, file: &File) {
    if names(path, file).unwrap_or(false) {
        let _ = std::fs::remove_file(path);
    }
}

/// Bytes of the write and sync counters and the durable-intent words after
/// the stripe words.
const COUNTERS_LEN: usize = 32;

/// Writes words at `offset` of `file`, little-endian like the mapping's accessors.
fn write_words(file: &File, offset: usize, words: &[u64]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    file.write_all_at(&bytes, offset as u64)
}

/// The cross-process block locks of one image.
#[derive(Debug)]
pub struct CrossLocks {
    path: PathBuf,
    file: File,
    map: SharedMapping,
    stripes: usize,
    me: u64,
    /// Still holding the table exclusively (see [`Self::open_holding`]).
    holding: AtomicBool,
    /// Opened as the only process with the image open.
    first: bool,
}

impl CrossLocks {
    /// Opens (creating it if needed) the lock table of the image open as
    /// `image`, with `stripes` words, in [`LockDir::from_env`].
    pub fn open(image: &File, stripes: usize) -> Result<Self, LockTableError> {
        let locks = Self::open_holding(image, stripes)?;
        locks.share()?;
        Ok(locks)
    }

    /// Like [`Self::open`], except that a first opener (the only process with
    /// the image open) keeps the table locked exclusively, so that no other
    /// process opens the image until it calls [`Self::share`]: for work that
    /// must be done alone (see [`Self::is_first`]).
    pub fn open_holding(image: &File, stripes: usize) -> Result<Self, LockTableError> {
        Self::open_holding_in(&LockDir::from_env()?, image, stripes)
    }

    /// Like [`Self::open`], in `dir`.
    pub fn open_in(dir: &LockDir, image: &File, stripes: usize) -> Result<Self, LockTableError> {
        let locks = Self::open_holding_in(dir, image, stripes)?;
        locks.share()?;
        Ok(locks)
    }

    /// Like [`Self::open_holding`], in `dir`.
    pub fn open_holding_in(
        dir: &LockDir,
        image: &File,
        stripes: usize,
    ) -> Result<Self, LockTableError> {
        let me = my_identity().map_err(LockTableError::Identity)?;
        let path = dir.table_path(image)?;
        let len = (stripes * 8 + COUNTERS_LEN) as u64;
        let io = |operation: &'static str| {
            let path = path.clone();
            move |source| LockTableError::Io {
                path,
                operation,
                source,
            }
        };
        let unsafe_table = |problem: String| LockTableError::Unsafe {
            path: path.clone(),
            problem,
        };
        let mut attempts = 0;
        let mut first;
        let file = loop {
            attempts += 1;
            if attempts > OPEN_ATTEMPTS {
                return Err(io("open")(io::Error::other(format!(
                    "removed under us {OPEN_ATTEMPTS} times in a row"
                ))));
            }
            let created = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path);
            let file = match created {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    // O_NONBLOCK: whatever is there, opening it must not wait
                    // (a FIFO would); it changes nothing for a regular file.
                    let existing = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                        .open(&path);
                    match existing {
                        Ok(file) => file,
                        // Removed by its last user since our create failed.
                        Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                            return Err(unsafe_table("is a symlink".to_string()))
                        }
                        Err(err) if err.raw_os_error() == Some(libc::EISDIR) => {
                            return Err(unsafe_table("is a directory".to_string()))
                        }
                        Err(err) => return Err(io("open")(err)),
                    }
                }
                Err(err) => return Err(io("create")(err)),
            };
            let metadata = file.metadata().map_err(io("fstat"))?;
            if let Some(problem) = dir.table_problem(&metadata) {
                return Err(unsafe_table(problem));
            }
            match file.try_lock() {
                Ok(()) => {
                    // Alone with this image: whatever the table holds is left
                    // over from processes that are gone. Start from zeros.
                    file.set_len(0).map_err(io("truncate"))?;
                    file.set_len(len).map_err(io("size"))?;
                    write_words(&file, stripes * 8, &[1, 0, 0, 0]).map_err(io("write"))?;
                    dir.remove_abandoned(&path);
                    first = true;
                }
                Err(TryLockError::WouldBlock) => {
                    file.lock_shared().map_err(io("flock"))?;
                    first = false;
                }
                Err(TryLockError::Error(err)) => return Err(io("flock")(err)),
            }
            // The last user of the table may have removed it between our open
            // and our lock; then this file is orphaned and we start again.
            match names(&path, &file) {
                Ok(true) => break file,
                Ok(false) => continue,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io("lstat")(err)),
            }
        };
        // Sized by its first opener, who held it exclusively until then.
        let actual = file.metadata().map_err(io("fstat"))?.len();
        if actual != len {
            return Err(unsafe_table(format!("is {actual} bytes, expected {len}")));
        }
        let map = SharedMapping::map_writable(&file, len).map_err(io("mmap"))?;
        Ok(Self {
            path,
            file,
            map,
            stripes,
            me,
            holding: AtomicBool::new(first),
            first,
        })
    }

    /// Whether this process was the only one with the image open when it
    /// opened the table: every process that had it open before is gone.
    pub fn is_first(&self) -> bool {
        self.first
    }

    /// Whether this process still holds the table exclusively (a first opener
    /// from [`Self::open_holding`] that has not shared it yet).
    pub fn is_holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// Lets other processes open the image (a first opener's exclusive lock
    /// becomes a shared one); nothing when already shared.
    pub fn share(&self) -> Result<(), LockTableError> {
        if self.holding.swap(false, Ordering::AcqRel) {
            self.file
                .lock_shared()
                .map_err(|source| LockTableError::Io {
                    path: self.path.clone(),
                    operation: "flock",
                    source,
                })?;
        }
        Ok(())
    }

    /// The table file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes stripe `stripe`'s word, waiting for its holder (or taking it over
    /// from a holder that is gone). The caller must be the only thread of this
    /// process holding or waiting for this stripe.
    pub fn lock(&self, stripe: usize) {
        assert!(stripe < self.stripes, "stripe {stripe} out of range");
        let at = stripe * 8;
        // Made on the first miss only: an uncontended lock reads no clock.
        let mut backoff: Option<Backoff> = None;
        loop {
            let holder = match self.map.compare_exchange_u64_le(at, 0, self.me) {
                Ok(_) => return,
                Err(holder) => holder,
            };
            let backoff = backoff.get_or_insert_with(Backoff::new);
            // Our own identity here can only be left over from a process that
            // had our pid and start time: never a live holder.
            if (holder == self.me || backoff.liveness_due() && !alive(holder))
                && self
                    .map
                    .compare_exchange_u64_le(at, holder, self.me)
                    .is_ok()
            {
                return;
            }
            backoff.snooze();
        }
    }

    /// Releases stripe `stripe`'s word.
    pub fn unlock(&self, stripe: usize) {
        let at = stripe * 8;
        let released = self.map.compare_exchange_u64_le(at, self.me, 0);
        debug_assert!(
            released.is_ok(),
            "unlock of a stripe this process did not hold"
        );
    }

    /// Counts a write to the image: called after its bytes and CRCs are
    /// stored, before it is acknowledged.
    pub fn note_write(&self) {
        self.map.fetch_add_u64_le(self.stripes * 8, 1);
    }

    /// The number of writes counted so far, by every process (see the
    /// module docs): read before a flush starts.
    pub fn writes(&self) -> u64 {
        self.map.load_u64_le(self.stripes * 8)
    }

    /// The [`Self::writes`] count the last completed flush started from: every
    /// write counted up to it is durable.
    pub fn synced(&self) -> u64 {
        self.map.load_u64_le(self.stripes * 8 + 8)
    }

    /// Records that a flush that started when [`Self::writes`] was `writes`
    /// has completed.
    pub fn mark_synced(&self, writes: u64) {
        self.map.raise_u64_le(self.stripes * 8 + 8, writes);
    }

    /// Offset of the durable-intent word of `kind` (0: host, 1: repair).
    fn intent_at(&self, kind: usize) -> usize {
        debug_assert!(kind < 2);
        self.stripes * 8 + 16 + 8 * kind
    }

    /// The write-intent bits of `kind` (0: host, 1: repair) that some process
    /// has made durable in the image's sidecar since the table was made (see
    /// [`crate::intent`]): a writer into those regions need not sync them again.
    pub fn intent_durable(&self, kind: usize) -> u64 {
        self.map.load_u64_le(self.intent_at(kind))
    }

    /// Adds `bits` to [`Self::intent_durable`] of `kind`, after they are
    /// durable.
    pub fn mark_intent_durable(&self, kind: usize, bits: u64) {
        self.map.or_u64_le(self.intent_at(kind), bits);
    }

    /// Forgets every durable-intent bit: by a first opener that has cleared
    /// the record, while it holds the table alone.
    pub fn forget_intent(&self) {
        debug_assert!(self.is_holding());
        self.map.store_u64_le(self.intent_at(0), 0);
        self.map.store_u64_le(self.intent_at(1), 0);
    }

    #[cfg(test)]
    fn holder(&self, stripe: usize) -> u64 {
        self.map.load_u64_le(stripe * 8)
    }

    #[cfg(test)]
    fn set_holder(&self, stripe: usize, identity: u64) {
        self.map.store_u64_le(stripe * 8, identity);
    }
}

impl Drop for CrossLocks {
    fn drop(&mut self) {
        // The last process to close the image removes the table.
        if self.file.try_lock().is_ok() {
            remove_if_still(&self.path, &self.file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    fn image() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::create(dir.path().join("img")).expect("create");
        (dir, file)
    }

    /// A lock directory of our own under a fresh base (as with
    /// `EMULATOR_LOCK_DIR`), so tests that plant things never meet others.
    fn own_dir() -> (tempfile::TempDir, LockDir) {
        let base = tempfile::tempdir().expect("tempdir");
        let dir = LockDir::prepare(base.path(), true).expect("lock dir");
        (base, dir)
    }

    /// Creates `path` with `mode` and `len` bytes, as an attacker or a
    /// leftover would.
    fn plant(path: &Path, mode: u32, len: u64) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .expect("plant");
        // The process umask may have cleared bits of `mode`.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
        file.set_len(len).expect("size");
        file
    }

    /// The message of the error `CrossLocks::open_in` returns.
    fn refusal(dir: &LockDir, img: &File) -> String {
        match CrossLocks::open_in(dir, img, 16) {
            Ok(locks) => panic!("opened {}", locks.path().display()),
            Err(err) => err.to_string(),
        }
    }

    const LEN: u64 = 16 * 8 + COUNTERS_LEN as u64;

    #[test]
    fn a_symlink_at_the_table_path_is_refused_and_not_followed() {
        let (_base, dir) = own_dir();
        let (elsewhere, img) = image();
        let path = dir.table_path(&img).expect("path");
        // A symlink to a file the attacker wants us to write into, and one
        // to a name where they want us to create one.
        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        let message = refusal(&dir, &img);
        assert!(message.contains("is a symlink"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
        std::fs::remove_file(&path).expect("unplant");
        let missing = elsewhere.path().join("missing");
        std::os::unix::fs::symlink(&missing, &path).expect("dangling symlink");
        assert!(refusal(&dir, &img).contains("is a symlink"));
        assert!(!missing.exists(), "nothing is created through the symlink");
        assert!(
            path.symlink_metadata().is_ok(),
            "and the symlink is left alone"
        );
    }

    #[test]
    fn a_table_others_may_access_is_refused() {
        let (_base, dir) = own_dir();
        let (_elsewhere, img) = image();
        let path = dir.table_path(&img).expect("path");
        for mode in [0o644, 0o660, 0o602] {
            let _planted = plant(&path, mode, LEN);
            let message = refusal(&dir, &img);
            assert!(
                message.contains(&format!("has mode {mode:04o}")),
                "{message}"
            );
            assert!(path.exists(), "a refused table is not removed");
            std::fs::remove_file(&path).expect("unplant");
        }
    }

    #[test]
    fn a_table_that_is_not_a_regular_file_is_refused() {
        let (_base, dir) = own_dir();
        let (_elsewhere, img) = image();
        let path = dir.table_path(&img).expect("path");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let message = refusal(&dir, &img);
        assert!(message.contains("is not a regular file"), "{message}");
        std::fs::remove_file(&path).expect("unplant");
        DirBuilder::new().mode(0o700).create(&path).expect("mkdir");
        let message = refusal(&dir, &img);
        assert!(message.contains("is a directory"), "{message}");
    }

    #[test]
    fn a_table_of_another_user_is_refused() {
        // Needs root to give a file away; as another user, say so and stop.
        if effective_uid() != 0 {
            eprintln!("not root: cannot plant a file of another user; skipped");
            return;
        }
        let (_base, dir) = own_dir();
        let (_elsewhere, img) = image();
        let path = dir.table_path(&img).expect("path");
        let _planted = plant(&path, 0o600, LEN);
        std::os::unix::fs::chown(&path, Some(1001), Some(1001)).expect("chown");
        let message = refusal(&dir, &img);
        assert!(message.contains("owned by uid 1001, not 0"), "{message}");
    }

    #[test]
    fn a_table_in_use_with_the_wrong_size_is_refused() {
        let (_base, dir) = own_dir();
        let (_elsewhere, img) = image();
        let path = dir.table_path(&img).expect("path");
        let planted = plant(&path, 0o600, 5);
        planted.lock_shared().expect("hold it");
        let message = refusal(&dir, &img);
        assert!(
            message.contains(&format!("is 5 bytes, expected {LEN}")),
            "{message}"
        );
        // Unused, the same leftover is ours to reset.
        drop(planted);
        let locks = CrossLocks::open_in(&dir, &img, 16).expect("reset");
        assert_eq!(locks.file.metadata().expect("stat").len(), LEN);
    }

    #[test]
    fn the_lock_directory_must_be_ours_and_private() {
        let base = tempfile::tempdir().expect("tempdir");
        let mine = base.path().join(format!("emulator-{}", effective_uid()));
        // Made 0700 when missing.
        let dir = LockDir::prepare(base.path(), true).expect("made");
        assert_eq!(dir.path(), mine);
        let mode = std::fs::metadata(&mine).expect("stat").mode() & 0o7777;
        assert_eq!(mode & 0o077, 0, "mode {mode:04o}");
        // Writable by others: refused, not repaired behind the user's back.
        std::fs::set_permissions(&mine, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let err = LockDir::prepare(base.path(), true).expect_err("group/other-writable");
        assert!(
            err.to_string()
                .contains("has mode 0777: group or other may write to it"),
            "{err}"
        );
        // A symlink in its place (to a directory someone else controls).
        std::fs::remove_dir(&mine).expect("rmdir");
        let theirs = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(theirs.path(), &mine).expect("symlink");
        let err = LockDir::prepare(base.path(), true).expect_err("symlink");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        std::fs::remove_file(&mine).expect("unplant");
        // A plain file in its place.
        std::fs::write(&mine, b"").expect("file");
        let err = LockDir::prepare(base.path(), true).expect_err("file");
        assert!(err.to_string().contains("is not a directory"), "{err}");
        std::fs::remove_file(&mine).expect("unplant");
        if effective_uid() == 0 {
            DirBuilder::new().mode(0o700).create(&mine).expect("mkdir");
            std::os::unix::fs::chown(&mine, Some(1001), Some(1001)).expect("chown");
            let err = LockDir::prepare(base.path(), true).expect_err("another user's");
            assert!(
                err.to_string().contains("owned by uid 1001, not 0"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_base_others_may_write_must_be_sticky() {
        let base = tempfile::tempdir().expect("tempdir");
        let chmod = |mode| {
            std::fs::set_permissions(
                base.path(),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .expect("chmod")
        };
        chmod(0o777);
        let err = LockDir::prepare(base.path(), true).expect_err("not sticky");
        let message = err.to_string();
        assert!(message.contains("EMULATOR_LOCK_DIR="), "{message}");
        assert!(message.contains("has mode 0777"), "{message}");
        chmod(0o1777);
        LockDir::prepare(base.path(), true).expect("sticky, like /dev/shm");
    }

    #[test]
    fn a_missing_base_is_an_error_naming_the_way_out() {
        let missing = Path::new("/nonexistent/emulator-lock-base");
        let err = LockDir::prepare(missing, false).expect_err("no /dev/shm");
        assert_eq!(
            err.to_string(),
            "cross-process block locks need /dev/shm (a tmpfs): \
             /nonexistent/emulator-lock-base: No such file or directory (os error 2); \
             set EMULATOR_LOCK_DIR=DIR to keep them elsewhere"
        );
        let err = LockDir::prepare(missing, true).expect_err("no such directory");
        assert!(
            err.to_string().starts_with(
                "cross-process block locks cannot use EMULATOR_LOCK_DIR=/nonexistent/emulator-lock-base: "
            ),
            "{err}"
        );
    }

    #[test]
    fn the_environment_variable_chooses_the_base() {
        assert_eq!(LockDir::base(None), (PathBuf::from("/dev/shm"), false));
        assert_eq!(
            LockDir::base(Some("".into())),
            (PathBuf::from("/dev/shm"), false),
            "empty is unset"
        );
        assert_eq!(
            LockDir::base(Some("/var/tmp/locks".into())),
            (PathBuf::from("/var/tmp/locks"), true)
        );
    }

    #[test]
    fn tables_work_in_a_chosen_directory() {
        let (base, dir) = own_dir();
        let (_elsewhere, img) = image();
        let a = CrossLocks::open_in(&dir, &img, 16).expect("open a");
        let b = CrossLocks::open_in(&dir, &img, 16).expect("open b");
        assert!(a.path().starts_with(base.path()), "{}", a.path().display());
        let mode = a.file.metadata().expect("stat").mode() & 0o7777;
        assert_eq!(mode, 0o600);
        a.lock(1);
        assert_eq!(b.holder(1), a.me);
        a.unlock(1);
        let path = a.path().to_path_buf();
        drop(a);
        drop(b);
        assert!(!path.exists(), "the last user removes the table");
    }

    #[test]
    fn the_sweep_removes_only_abandoned_tables_of_ours() {
        let (_base, dir) = own_dir();
        let (elsewhere, img) = image();
        let abandoned = dir.path().join(format!("{TABLE_PREFIX}1-1"));
        drop(plant(&abandoned, 0o600, LEN));
        let target = elsewhere.path().join("target");
        std::fs::write(&target, b"keep").expect("target");
        let link = dir.path().join(format!("{TABLE_PREFIX}1-2"));
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let foreign = dir.path().join(format!("{TABLE_PREFIX}1-3"));
        drop(plant(&foreign, 0o600, LEN));
        let root = effective_uid() == 0;
        if root {
            std::os::unix::fs::chown(&foreign, Some(1001), Some(1001)).expect("chown");
        }
        let held = dir.path().join(format!("{TABLE_PREFIX}1-4"));
        let in_use = plant(&held, 0o600, LEN);
        in_use.lock_shared().expect("in use");
        // A first opener sweeps.
        let _locks = CrossLocks::open_in(&dir, &img, 16).expect("open");
        assert!(!abandoned.exists(), "an abandoned table of ours is removed");
        assert!(
            link.symlink_metadata().is_ok(),
            "a symlink is never removed"
        );
        assert_eq!(std::fs::read(&target).expect("read"), b"keep");
        assert_eq!(
            foreign.exists(),
            root,
            "another user's file is never removed"
        );
        assert!(held.exists(), "a table in use is kept");
    }

    #[test]
    fn a_sweep_that_raced_with_a_new_table_leaves_it_alone() {
        let (_dir, img) = image();
        let a = CrossLocks::open(&img, 16).expect("open a");
        let path = a.path().to_path_buf();
        // A sweeper opens the table by its path; then its last user removes it,
        // and a new user of the image makes a new one there.
        let stale = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("sweeper's open");
        drop(a);
        let b = CrossLocks::open(&img, 16).expect("open b");
        // Nobody holds the old table, so the sweeper's lock succeeds.
        assert!(stale.try_lock().is_ok());
        remove_if_still(&path, &stale);
        drop(stale);
        let c = CrossLocks::open(&img, 16).expect("open c");
        b.lock(3);
        assert_eq!(c.holder(3), b.me, "b and c use one table");
        b.unlock(3);
        drop(b);
        assert!(path.exists(), "c still uses the table");
        drop(c);
        assert!(!path.exists(), "the last user removed it");
    }

    #[test]
    fn one_table_per_image_removed_by_the_last_user() {
        let (_dir, img) = image();
        let a = CrossLocks::open(&img, 16).expect("open");
        let b = CrossLocks::open(&img, 16).expect("open");
        assert_eq!(a.path(), b.path());
        a.lock(3);
        assert_eq!(b.holder(3), a.me, "b sees a's hold");
        a.unlock(3);
        assert_eq!(b.holder(3), 0);
        let path = a.path().to_path_buf();
        drop(a);
        assert!(path.exists(), "b still uses the table");
        drop(b);
        assert!(!path.exists(), "the last user removes the table");
    }

    #[test]
    fn a_lone_opener_starts_from_a_clean_table_and_keeps_a_used_one() {
        let (_dir, img) = image();
        // Leftovers of processes that are gone, in a table nobody removed.
        let path = LockDir::from_env()
            .expect("lock dir")
            .table_path(&img)
            .expect("path");
        plant(&path, 0o600, 0)
            .write_all_at(&[0xffu8; 16 * 8 + COUNTERS_LEN], 0)
            .expect("write");
        let a = CrossLocks::open(&img, 16).expect("open");
        assert!(
            (0..16).all(|s| a.holder(s) == 0),
            "a lone opener zeroes the table"
        );
        assert!(
            a.writes() > a.synced(),
            "a new table asks the first flush to sync"
        );
        a.lock(5);
        let b = CrossLocks::open(&img, 16).expect("open");
        assert_eq!(b.holder(5), a.me, "a table in use is kept");
        a.unlock(5);
    }

    #[test]
    fn writes_and_syncs_are_counted_across_openers() {
        let (_dir, img) = image();
        let a = CrossLocks::open(&img, 16).expect("open a");
        let b = CrossLocks::open(&img, 16).expect("open b");
        let start = b.writes();
        a.mark_synced(start);
        assert_eq!(b.synced(), start, "nothing written since that flush");
        a.note_write();
        a.note_write();
        assert_eq!(b.writes(), start + 2, "b sees a's writes");
        assert!(b.synced() < b.writes(), "b must sync");
        // A flush that started earlier and completes later never lowers it.
        b.mark_synced(start + 2);
        a.mark_synced(start + 1);
        assert_eq!(a.synced(), start + 2);
    }

    #[test]
    fn a_holder_that_is_gone_is_taken_over() {
        let (_dir, img) = image();
        let locks = CrossLocks::open(&img, 16).expect("open");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        locks.set_holder(2, u64::from(pid));
        let started = Instant::now();
        locks.lock(2);
        assert_eq!(locks.holder(2), locks.me);
        assert!(started.elapsed() < Duration::from_secs(5));
        locks.unlock(2);
    }

    #[test]
    fn a_live_holder_is_waited_for() {
        let (_dir, img) = image();
        let a = CrossLocks::open(&img, 16).expect("open");
        let b = CrossLocks::open(&img, 16).expect("open");
        // A holder that is another live process (b would take its own
        // identity for a leftover).
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let other = crate::process::identity_of(sleeper.id()).expect("sleep runs");
        a.set_holder(7, other);
        let released = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                b.lock(7);
                assert!(released.load(Ordering::SeqCst), "took a held lock");
                b.unlock(7);
            });
            // Bounded wait for the waiter to be waiting: it cannot finish before
            // the release below.
            let deadline = Instant::now() + Duration::from_millis(50);
            while Instant::now() < deadline {
                assert!(!waiter.is_finished());
                std::thread::yield_now();
            }
            released.store(true, Ordering::SeqCst);
            a.set_holder(7, 0);
        });
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
