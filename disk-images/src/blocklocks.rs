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
//! the in-process locks) in a small file in `/dev/shm` named after the image's
//! device and inode, so every process that opens the image, by whatever path,
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
//! A process that cannot read its own identity (no `/proc`) opens no table.
//!
//! ## File format (native endianness: the file lives in memory and never
//! leaves the machine)
//!
//! | offset    | size     | field  | meaning                                     |
//! |----------:|---------:|--------|---------------------------------------------|
//! | 0         | 8 × *s*  | words  | per stripe: holder identity, `0` when free  |
//! | 8·*s*     | 8        | writes | count of writes to the image (data and CRCs stored), by every process |
//! | 8·*s* + 8 | 8        | synced | the `writes` count that the last completed flush started from |
//!
//! (*s* is the number of stripes, 4096.) The two counters let a flush in any
//! process skip an image that nobody has written since a flush completed: a
//! writer counts its write after the bytes and CRCs are stored and before it
//! is acknowledged, and a flush reads `writes` before it syncs and raises
//! `synced` to that value once the sync is done. A new table starts with
//! `writes` 1 and `synced` 0, so the first flush after it syncs: what the
//! processes before it wrote may still be in the page cache.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::mapping::SharedMapping;
use crate::process::{alive, my_identity, Backoff};

/// Directory of the lock tables.
const TABLE_DIR: &str = "/dev/shm";
/// Name prefix of the lock tables.
const TABLE_PREFIX: &str = "emulator-blocklocks-";

/// The lock table's path for the image open as `image`.
fn table_path(image: &File) -> io::Result<PathBuf> {
    let metadata = image.metadata()?;
    Ok(Path::new(TABLE_DIR).join(format!(
        "{TABLE_PREFIX}{:x}-{}",
        metadata.dev(),
        metadata.ino()
    )))
}

/// Removes the tables of other images that no process uses any more (their
/// last user was killed before it could remove them). A table is unused when
/// its `flock` can be taken exclusively; an opener racing with the removal
/// notices it (see [`CrossLocks::open`]).
fn remove_abandoned(keep: &Path) {
    let Ok(entries) = std::fs::read_dir(TABLE_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(TABLE_PREFIX));
        if !ours || path == keep {
            continue;
        }
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) {
            if file.try_lock().is_ok() {
                remove_if_still(&path, &file);
            }
        }
    }
}

/// Removes `path` if it still names `file`, whose `flock` the caller holds
/// exclusively. Between opening `path` and locking, its file may have been
/// removed and a new table created there by another process (which holds it):
/// that one must stay. While the caller holds the lock nobody else can remove
/// `file` (removal needs its lock), so once checked, `path` keeps naming it.
fn remove_if_still(path: &Path, file: &File) {
    let (Ok(locked), Ok(named)) = (file.metadata(), std::fs::metadata(path)) else {
        return;
    };
    if locked.dev() == named.dev() && locked.ino() == named.ino() {
        let _ = std::fs::remove_file(path);
    }
}

/// Bytes of the write and sync counters after the stripe words.
const COUNTERS_LEN: usize = 16;

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
}

impl CrossLocks {
    /// Opens (creating it if needed) the lock table of the image open as
    /// `image`, with `stripes` words.
    pub fn open(image: &File, stripes: usize) -> io::Result<Self> {
        let me = my_identity()?;
        let path = table_path(image)?;
        let len = (stripes * 8 + COUNTERS_LEN) as u64;
        let file = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            match file.try_lock() {
                Ok(()) => {
                    // Alone with this image: whatever the table holds is left
                    // over from processes that are gone. Start from zeros.
                    file.set_len(0)?;
                    file.set_len(len)?;
                    write_words(&file, stripes * 8, &[1, 0])?;
                    file.lock_shared()?;
                    remove_abandoned(&path);
                }
                Err(TryLockError::WouldBlock) => file.lock_shared()?,
                Err(TryLockError::Error(err)) => return Err(err),
            }
            // The last user of the table may have removed it between our open
            // and our lock; then this file is orphaned and we start again.
            let ours = file.metadata()?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => break file,
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
        };
        let actual = file.metadata()?.len();
        if actual != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "lock table {} is {actual} bytes, expected {len}",
                    path.display()
                ),
            ));
        }
        let map = SharedMapping::map_writable(&file, len)?;
        Ok(Self {
            path,
            file,
            map,
            stripes,
            me,
        })
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    fn image() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::create(dir.path().join("img")).expect("create");
        (dir, file)
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
        std::fs::write(
            table_path(&img).expect("path"),
            [0xffu8; 16 * 8 + COUNTERS_LEN],
        )
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
