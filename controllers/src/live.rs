//! The live state every process that opens an array shares: `DIR/array.live`,
//! mapped `MAP_SHARED` by each of them (the serving controllers, the controller
//! processes running rebuild or scrub partitions, the admin CLI).
//!
//! It holds three things:
//!
//! - **Process slots.** Each process that opens the array registers in one of
//!   [`SLOTS`] slots with its identity (pid and start time, so a reused pid is not
//!   mistaken for the old process).
//! - **Cross-process stripe locks.** Lock `i` guards every stripe `s` with
//!   `s % LOCKS == i`, the same mapping as the engine's in-process locks. Its word
//!   has one byte per slot: `0x80` while that slot holds the lock exclusively, or
//!   the number of that slot's shared holders (at most 127). An exclusive holder
//!   also records which stripe it is writing.
//! - **The configuration generation**, bumped whenever `array.json` changes (a
//!   disk failed, replaced, rebuilt), so every process re-reads it before its
//!   next I/O.
//!
//! **Write intent and crash recovery.** Every member write happens under its
//! stripe's exclusive lock, and the lock records the stripe. So when a process
//! dies (kill -9) the locks it held exclusively name exactly the stripes whose
//! writes it may have left half done: data written but not parity, or one mirror
//! but not the other. That is the write-intent record (md's write-intent bitmap,
//! precise to the stripe). The process that finds a dead holder (one waiting for
//! the lock, or the next to open the array) *recovers* its slot: it resyncs each
//! such stripe (recomputes parity from data, or copies one mirror to the others)
//! before clearing the lock, so nobody reads or reconstructs from a torn stripe.
//!
//! What this protects against: the crash of any process at any instant. The
//! file lives in the page cache like the images; after a power loss the stripes
//! to resync come from the members' own write-intent bitmaps instead (see
//! `RaidEngine::shared`).
//!
//! ## File format (little-endian), 20 KiB
//!
//! | offset | size | field        | meaning                                              |
//! |-------:|-----:|--------------|------------------------------------------------------|
//! | 0      | 8    | magic        | ASCII `EMULIVE1`                                     |
//! | 8      | 4    | version      | `1`                                                  |
//! | 12     | 4    | disks        | member count of the array                            |
//! | 16     | 4    | locks        | lock count, `1024`                                   |
//! | 24     | 8    | generation   | atomic: configuration generation                     |
//! | 32     | 8    | recovery     | atomic: identity of the process recovering a slot, 0 none |
//! | 40     | 8    | announced    | atomic: the `changes` count of the `array.json` last announced (by a generation bump) |
//! | 64     | 64   | slots        | 8 atomic words: identity of the process in the slot, 0 free |
//! | 4096   | 16 K | lock table   | per lock: 8-byte lock word, 8-byte stripe + 1 being written (0 none) |
//!
//! An identity is `pid | (start_time & 0x7fff_ffff) << 32`, the start time being
//! field 22 of `/proc/<pid>/stat`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use disk_images::mapping::SharedMapping;
use disk_images::process::{alive, my_identity, Backoff};

/// Process slots.
pub const SLOTS: usize = 8;
/// Cross-process stripe locks.
pub const LOCKS: usize = 1024;
/// The live-state file in an array directory.
pub const LIVE_FILE: &str = "array.live";

const MAGIC: [u8; 8] = *b"EMULIVE1";
const VERSION: u32 = 1;
const GENERATION: usize = 24;
const RECOVERY: usize = 32;
const ANNOUNCED: usize = 40;
const SLOT_TABLE: usize = 64;
const LOCK_TABLE: usize = 4096;
const LOCK_ENTRY: usize = 16;
const FILE_BYTES: usize = LOCK_TABLE + LOCKS * LOCK_ENTRY;
/// Exclusive-holder bit of a slot's byte in a lock word.
const EXCLUSIVE: u64 = 0x80;
/// Most shared holders one slot may count on one lock.
const MAX_SHARED: u64 = 0x7f;

/// Errors opening the live state.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The file is not a live-state file for this array.
    #[error(
        "{path} is not a valid live-state file ({problem}); if no process has the \
         array open, remove it and run `emulator array scrub --repair` to be safe",
        path = path.display()
    )]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Every slot is taken by a live process.
    #[error("{SLOTS} processes already have the array open; no slot is free")]
    NoSlot,
    /// The OS refused.
    #[error("{operation} {path}: {source}", path = path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How a recovering process resyncs a stripe a dead process held exclusively.
/// It runs with the stripe's cross-process lock still held (by the dead slot),
/// so nobody else touches that stripe meanwhile; it must not take stripe locks.
pub type Resync<'a> = &'a dyn Fn(u64);

/// Why a shared state file could not be opened ([`open_mapped`]).
#[derive(Debug)]
pub(crate) enum MappedError {
    /// The OS refused `operation`.
    Io(&'static str, std::io::Error),
    /// The file is not what it should be.
    Corrupt(String),
}

/// Opens `path`, a state file of exactly `len` bytes that starts with `magic`
/// and a little-endian u32 `version`, and maps it shared; returns the file,
/// the mapping and its first `header` bytes for further checks.
pub(crate) fn open_mapped(
    path: &Path,
    len: usize,
    magic: &[u8; 8],
    version: u32,
    header: usize,
) -> Result<(File, SharedMapping, Vec<u8>), MappedError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|err| MappedError::Io("open", err))?;
    let actual = file
        .metadata()
        .map_err(|err| MappedError::Io("stat", err))?
        .len();
    if actual != len as u64 {
        return Err(MappedError::Corrupt(format!(
            "{actual} bytes, expected {len}"
        )));
    }
    let map =
        SharedMapping::map_writable(&file, actual).map_err(|err| MappedError::Io("map", err))?;
    let mut bytes = vec![0u8; header.max(12)];
    map.read_into(0, &mut bytes);
    if bytes[0..8] != magic[..] {
        return Err(MappedError::Corrupt("bad magic".into()));
    }
    let found = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if found != version {
        return Err(MappedError::Corrupt(format!(
            "version {found}, expected {version}"
        )));
    }
    Ok((file, map, bytes))
}

/// [`open_mapped`] of a state file that starts with just `magic` and
/// `version`, created first ([`create_whole`]) if missing. Also for state
/// files of other crates (the emulator's link book).
pub(crate) fn open_or_create_mapped(
    path: &Path,
    len: usize,
    magic: &[u8; 8],
    version: u32,
) -> Result<(File, SharedMapping), MappedError> {
    if !path.exists() {
        let mut header = [0u8; 12];
        header[0..8].copy_from_slice(magic);
        header[8..12].copy_from_slice(&version.to_le_bytes());
        create_whole(path, &header, len as u64).map_err(|err| MappedError::Io("create", err))?;
    }
    let (file, map, _) = open_mapped(path, len, magic, version, 12)?;
    Ok((file, map))
}

/// Reserves the space of the first `len` bytes of `file` (`posix_fallocate`),
/// so that stores through a shared mapping of it never meet a hole.
pub(crate) fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, len as i64)
        .map_err(|errno| std::io::Error::from_raw_os_error(errno as i32))
}

/// Creates `path` holding `header` and zeros up to `len` bytes, written and
/// synced under a temporary name and then linked into place, so a concurrent
/// opener sees either no file or a whole one. If another process linked its
/// own first, that one stays (both are fresh files alike).
pub(crate) fn create_whole(path: &Path, header: &[u8], len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&temporary)?;
        file.set_len(len)?;
        // Every page backed now: a store through the mapping into a hole of a
        // full file system would be a SIGBUS; this fails with ENOSPC instead.
        allocate(&file, len)?;
        file.write_all(header)?;
        file.sync_all()?;
        match std::fs::hard_link(&temporary, path) {
            Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => Err(err),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&temporary);
    result
}

/// This process's handle on an array's live state.
#[derive(Debug)]
pub struct Live {
    path: PathBuf,
    file: File,
    map: SharedMapping,
    me: u64,
    slot: Option<usize>,
    metadata_lock: parking_lot::Mutex<()>,
}

fn byte(word: u64, slot: usize) -> u64 {
    (word >> (8 * slot)) & 0xff
}

impl Live {
    /// Opens `dir/array.live`, creating it for a `disks`-member array if it is
    /// missing. Does not register: call [`Live::recover_dead`] then
    /// [`Live::register`].
    pub fn open(dir: &Path, disks: usize) -> Result<Self, LiveError> {
        let path = dir.join(LIVE_FILE);
        if !path.exists() {
            Self::create(&path, disks)?;
        }
        let (file, map, header) =
            open_mapped(&path, FILE_BYTES, &MAGIC, VERSION, 24).map_err(|err| match err {
                MappedError::Io(operation, source) => LiveError::Io {
                    path: path.clone(),
                    operation,
                    source,
                },
                MappedError::Corrupt(problem) => LiveError::Corrupt {
                    path: path.clone(),
                    problem,
                },
            })?;
        let corrupt = |problem: String| LiveError::Corrupt {
            path: path.clone(),
            problem,
        };
        let field = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        if field(12) as usize != disks || field(16) as usize != LOCKS {
            return Err(corrupt(format!(
                "made for {} disks and {} locks, the array has {disks} disks",
                field(12),
                field(16)
            )));
        }
        let me = my_identity().map_err(|source| LiveError::Io {
            path: path.clone(),
            operation: "read this process's identity",
            source,
        })?;
        Ok(Self {
            path,
            file,
            map,
            me,
            slot: None,
            metadata_lock: parking_lot::Mutex::new(()),
        })
    }

    /// Writes a fresh file (see [`create_whole`]).
    fn create(path: &Path, disks: usize) -> Result<(), LiveError> {
        let mut header = vec![0u8; LOCK_TABLE];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(disks as u32).to_le_bytes());
        header[16..20].copy_from_slice(&(LOCKS as u32).to_le_bytes());
        create_whole(path, &header, FILE_BYTES as u64).map_err(|source| LiveError::Io {
            path: path.to_path_buf(),
            operation: "create",
            source,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This process's slot, once registered.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// Takes a free slot.
    pub fn register(&mut self) -> Result<(), LiveError> {
        for slot in 0..SLOTS {
            if self
                .map
                .compare_exchange_u64_le(SLOT_TABLE + 8 * slot, 0, self.me)
                .is_ok()
            {
                self.slot = Some(slot);
                return Ok(());
            }
        }
        Err(LiveError::NoSlot)
    }

    /// Recovers the slot of every process that died with the array open.
    pub fn recover_dead(&self, resync: Resync<'_>) {
        for slot in 0..SLOTS {
            let identity = self.map.load_u64_le(SLOT_TABLE + 8 * slot);
            if identity != 0 && identity != self.me && !alive(identity) {
                self.recover_slot(slot, resync);
            }
        }
    }

    /// Like [`Self::recover_dead`], but also waits for a recovery another
    /// process is running: on return no dead process holds anything. Called
    /// before a configuration change, so that a stripe a dead process left
    /// half-written is resynced with the members it was written with (after a
    /// disk is failed, the parity it needs could no longer be recomputed).
    pub fn recover_all_dead(&self, resync: Resync<'_>) {
        let mut backoff = Backoff::new();
        loop {
            self.recover_dead(resync);
            let recovering = self.map.load_u64_le(RECOVERY);
            let dead_slot = (0..SLOTS).any(|slot| {
                let identity = self.map.load_u64_le(SLOT_TABLE + 8 * slot);
                identity != 0 && identity != self.me && !alive(identity)
            });
            if !dead_slot && (recovering == 0 || !alive(recovering)) {
                return;
            }
            backoff.snooze();
        }
    }

    /// Recovers dead slot `slot`: resyncs every stripe it held exclusively,
    /// drops its holds, frees the slot. One recovery runs at a time; returns
    /// without doing anything if another live process is recovering.
    fn recover_slot(&self, slot: usize, resync: Resync<'_>) {
        loop {
            let current = self.map.load_u64_le(RECOVERY);
            let taken = if current == 0 || !alive(current) {
                self.map
                    .compare_exchange_u64_le(RECOVERY, current, self.me)
                    .is_ok()
            } else {
                return;
            };
            if taken {
                break;
            }
        }
        let identity = self.map.load_u64_le(SLOT_TABLE + 8 * slot);
        if identity != 0 && !alive(identity) {
            let mut resynced = 0;
            for lock in 0..LOCKS {
                let word_at = LOCK_TABLE + LOCK_ENTRY * lock;
                let held = byte(self.map.load_u64_le(word_at), slot);
                if held == EXCLUSIVE {
                    let stripe = self.map.load_u64_le(word_at + 8);
                    if stripe != 0 {
                        resync(stripe - 1);
                        resynced += 1;
                    }
                    self.map.store_u64_le(word_at + 8, 0);
                }
                if held != 0 {
                    self.update(word_at, |word| word & !(0xff << (8 * slot)));
                }
            }
            tracing::warn!(
                slot,
                pid = identity as u32,
                resynced,
                "recovered the slot of a process that died with the array open"
            );
            self.map.store_u64_le(SLOT_TABLE + 8 * slot, 0);
        }
        self.map.store_u64_le(RECOVERY, 0);
    }

    /// Applies `change` to the word at `at` with a compare-and-swap loop.
    fn update(&self, at: usize, change: impl Fn(u64) -> u64) -> u64 {
        let mut word = self.map.load_u64_le(at);
        loop {
            match self.map.compare_exchange_u64_le(at, word, change(word)) {
                Ok(_) => return change(word),
                Err(found) => word = found,
            }
        }
    }

    /// While waiting on lock word `word`: recovers any dead holder.
    fn check_holders(&self, word: u64, resync: Resync<'_>) {
        for slot in (0..SLOTS).filter(|&s| Some(s) != self.slot && byte(word, s) != 0) {
            let identity = self.map.load_u64_le(SLOT_TABLE + 8 * slot);
            if identity == 0 || !alive(identity) {
                self.recover_slot(slot, resync);
            }
        }
    }

    fn my_slot(&self) -> usize {
        self.slot
            .expect("locks are only taken by a registered process")
    }

    /// Waits until `take(word)` gives the new value of lock `lock`'s word and
    /// swaps it in; while waiting, recovers dead holders.
    fn acquire(&self, lock: usize, resync: Resync<'_>, take: impl Fn(u64) -> Option<u64>) {
        let at = LOCK_TABLE + LOCK_ENTRY * lock;
        let mut backoff = Backoff::new();
        loop {
            let word = self.map.load_u64_le(at);
            if let Some(new) = take(word) {
                if self.map.compare_exchange_u64_le(at, word, new).is_ok() {
                    return;
                }
                continue;
            }
            backoff.snooze();
            if backoff.liveness_due() {
                self.check_holders(word, resync);
            }
        }
    }

    /// Takes lock `lock` shared (in addition to the caller's in-process lock).
    pub fn lock_shared(&self, lock: usize, resync: Resync<'_>) {
        let shift = 8 * self.my_slot();
        let exclusive_bits = 0x8080_8080_8080_8080u64;
        self.acquire(lock, resync, |word| {
            (word & exclusive_bits == 0 && (word >> shift) & 0xff < MAX_SHARED)
                .then(|| word + (1 << shift))
        });
    }

    /// Releases a shared hold of lock `lock`.
    pub fn unlock_shared(&self, lock: usize) {
        let slot = self.my_slot();
        self.update(LOCK_TABLE + LOCK_ENTRY * lock, |word| {
            word - (1 << (8 * slot))
        });
    }

    /// Takes lock `lock` exclusively to write `stripe`, or with `None` only to
    /// keep writers out (a holder that dies then leaves nothing to resync).
    pub fn lock_exclusive(&self, lock: usize, stripe: Option<u64>, resync: Resync<'_>) {
        let shift = 8 * self.my_slot();
        self.acquire(lock, resync, |word| {
            (word == 0).then_some(EXCLUSIVE << shift)
        });
        if let Some(stripe) = stripe {
            self.map
                .store_u64_le(LOCK_TABLE + LOCK_ENTRY * lock + 8, stripe + 1);
        }
    }

    /// Releases an exclusive hold of lock `lock`.
    pub fn unlock_exclusive(&self, lock: usize) {
        let at = LOCK_TABLE + LOCK_ENTRY * lock;
        self.map.store_u64_le(at + 8, 0);
        self.map.store_u64_le(at, 0);
    }

    /// The configuration generation.
    pub fn generation(&self) -> u64 {
        self.map.load_u64_le(GENERATION)
    }

    /// Announces a configuration change to every process.
    pub fn bump_generation(&self) {
        self.update(GENERATION, |g| g.wrapping_add(1));
    }

    /// Announces the configuration whose `array.json` records `changes`
    /// changes: bumps the generation, then records that it did. A process
    /// that dies between writing `array.json` and this leaves the two apart,
    /// which [`Self::announce_if_missed`] mends.
    pub fn announce(&self, changes: u64) {
        self.bump_generation();
        self.map.store_u64_le(ANNOUNCED, changes);
    }

    /// Announces `changes` if the last announcement was of another count (its
    /// writer died before announcing it).
    pub fn announce_if_missed(&self, changes: u64) {
        if self.map.load_u64_le(ANNOUNCED) != changes {
            tracing::warn!(
                changes,
                "a configuration change was not announced; announcing it"
            );
            self.announce(changes);
        }
    }

    /// Serialises configuration changes across processes (and threads): held
    /// while `array.json` is read, changed and written.
    pub fn lock_metadata(&self) -> Result<MetadataGuard<'_>, LiveError> {
        let local = self.metadata_lock.lock();
        self.file.lock().map_err(|source| LiveError::Io {
            path: self.path.clone(),
            operation: "lock",
            source,
        })?;
        Ok(MetadataGuard {
            live: self,
            _local: local,
        })
    }

    /// Processes registered now (identity words of live slots), for status.
    pub fn processes(&self) -> Vec<u32> {
        (0..SLOTS)
            .map(|slot| self.map.load_u64_le(SLOT_TABLE + 8 * slot))
            .filter(|&identity| identity != 0 && alive(identity))
            .map(|identity| identity as u32)
            .collect()
    }
}

/// Held while a configuration change is made; see [`Live::lock_metadata`].
#[derive(Debug)]
pub struct MetadataGuard<'a> {
    live: &'a Live,
    _local: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for MetadataGuard<'_> {
    fn drop(&mut self) {
        let _ = self.live.file.unlock();
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let _ = self
                .map
                .compare_exchange_u64_le(SLOT_TABLE + 8 * slot, self.me, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_of_several_slots_and_exclusive_exclusion() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Live::open(dir.path(), 3).expect("open");
        let mut b = Live::open(dir.path(), 3).expect("open");
        a.register().expect("slot");
        // Same process twice: give b a different identity so it gets its own slot.
        b.me ^= 1 << 40;
        b.register().expect("slot");
        assert_ne!(a.slot(), b.slot());
        let none: Resync<'_> = &|_| panic!("nothing to recover");
        a.lock_shared(7, none);
        b.lock_shared(7, none);
        let word = a.map.load_u64_le(LOCK_TABLE + LOCK_ENTRY * 7);
        assert_eq!(byte(word, a.slot().expect("slot")), 1);
        assert_eq!(byte(word, b.slot().expect("slot")), 1);
        a.unlock_shared(7);
        b.unlock_shared(7);
        a.lock_exclusive(7, Some(1234), none);
        assert_eq!(a.map.load_u64_le(LOCK_TABLE + LOCK_ENTRY * 7 + 8), 1235);
        a.unlock_exclusive(7);
        assert_eq!(a.map.load_u64_le(LOCK_TABLE + LOCK_ENTRY * 7), 0);
    }

    #[test]
    fn a_dead_exclusive_holder_is_recovered_by_a_waiter_with_its_stripe_resynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut dead = Live::open(dir.path(), 2).expect("open");
        // An identity no process has: pid 0x7fff_fffe does not exist.
        dead.me = 0x7fff_fffe;
        dead.register().expect("slot");
        let none: Resync<'_> = &|_| panic!("nothing to recover");
        dead.lock_exclusive(3, Some(42), none);
        let dead_slot = dead.slot().expect("slot");
        // The process "dies": its slot and lock stay as they are.
        dead.slot = None;
        drop(dead);

        let mut survivor = Live::open(dir.path(), 2).expect("open");
        survivor.register().expect("slot");
        let resynced = std::cell::RefCell::new(Vec::new());
        survivor.lock_exclusive(3, Some(99), &|stripe| resynced.borrow_mut().push(stripe));
        assert_eq!(*resynced.borrow(), vec![42]);
        assert_eq!(
            survivor.map.load_u64_le(SLOT_TABLE + 8 * dead_slot),
            0,
            "the dead slot is free again"
        );
        survivor.unlock_exclusive(3);
    }

    #[test]
    fn a_foreign_or_mismatched_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        Live::open(dir.path(), 4).expect("create");
        let err = Live::open(dir.path(), 5).expect_err("disk count differs");
        assert!(err.to_string().contains("4 disks"), "{err}");
        std::fs::write(dir.path().join(LIVE_FILE), b"garbage").expect("write");
        let err = Live::open(dir.path(), 4).expect_err("garbage");
        assert!(
            err.to_string().contains("not a valid live-state file"),
            "{err}"
        );
    }
}
