//! The degraded-write journal, `DIR/array.journal`: what closes the RAID-5/6 write
//! hole for the death of a process.
//!
//! On a RAID-5 with a failed (or not yet rebuilt) data member, that member's bytes
//! exist only as the XOR of the others and the parity (on a RAID-6, with one or two
//! missing, through P and Q). A write changes data and then parity; a process
//! killed between the two leaves them out of step, and the missing members' bytes
//! in that stripe, which nobody was writing, would be reconstructed wrong. So
//! before such a write touches any member, the writer saves the missing members'
//! current bytes for the range it is about to change (one after the other, in disk
//! order) in the journal entry of the stripe's lock, and clears the entry when the
//! write is done. A process that recovers the stripe after the writer died (see
//! [`crate::live`]) finds the entry and recomputes the parity from the surviving
//! data and the saved bytes: the missing members read back as they were, and the
//! interrupted write (never acknowledged) is partly applied at worst, block by
//! block.
//!
//! Only the holder of a stripe's exclusive lock writes or clears its lock's
//! entry, so entries need no locking of their own. The file is sparse: an entry
//! takes space once a degraded write used it.
//!
//! ## File format (little-endian)
//!
//! Entry `i` (lock `i`) starts at `i * (4096 + 128 KiB)`:
//!
//! | offset | size | field  | meaning                                               |
//! |-------:|-----:|--------|-------------------------------------------------------|
//! | 0      | 8    | magic  | ASCII `EMUJRNL1` while the entry is valid, else zeros |
//! | 8      | 8    | stripe | stripe being written                                  |
//! | 16     | 8    | offset | where the saved range starts within the chunk         |
//! | 24     | 8    | length | bytes saved (at most 128 KiB)                         |
//! | 32     | 4    | crc    | CRC32 of bytes 8..32 and of the saved bytes           |
//! | 4096   | len  | bytes  | the missing members' bytes before the write           |
//!
//! The saved bytes are written before the header, so an entry whose writer died
//! half-way through recording it is not valid (and then no member was written).
//!
//! ## Power loss
//!
//! A power cut loses whatever of the page cache had not reached the device, in
//! any order, so the order of the writes above is not enough for it:
//!
//! - an entry is synced (`fdatasync`) before any member is written: a member's
//!   new bytes can reach the device only after the entry that can undo them
//!   has;
//! - the writer makes the members' written ranges durable before it clears the
//!   entry ([`crate::raid`]): a clear can reach the device only after the
//!   writes it ends. After the cut, the resync of the regions the members'
//!   write-intent records name finds a valid entry for every stripe that was
//!   half-written;
//! - a clear is made durable by the next flush of a degraded array
//!   ([`Journal::sync`]): until then an entry may survive a cut its write had
//!   completed before, and applying it puts back the missing members' bytes as
//!   they were before that write, which was not flushed, so that is allowed.
//!
//! For tests of exactly that, a journal given the array's fault layer
//! ([`Journal::with_faults`]) has two crash points: between an entry's bytes
//! and its header, and before an entry is cleared (crash rules for the file
//! `array.journal`, see [`crate::faults`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::faults::FaultLayer;

/// The journal file in an array directory.
pub const JOURNAL_FILE: &str = "array.journal";
/// Most bytes one entry saves.
pub const ENTRY_DATA_BYTES: u64 = 128 * 1024;
const HEADER_BYTES: u64 = 4096;
const ENTRY_BYTES: u64 = HEADER_BYTES + ENTRY_DATA_BYTES;
const MAGIC: [u8; 8] = *b"EMUJRNL1";

/// A saved range: the missing member's bytes at `offset` within the chunk of
/// `stripe`, before an interrupted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Stripe.
    pub stripe: u64,
    /// Offset within the chunk.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// An array's degraded-write journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// The array's fault layer, for the crash points (see the module docs).
    faults: Option<Arc<FaultLayer>>,
}

fn header_crc(fields: &[u8; 24], bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(fields);
    hasher.update(bytes);
    hasher.finalize()
}

impl Journal {
    /// Opens `dir/array.journal`, creating it (empty) if missing.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(Self {
            path,
            file,
            faults: None,
        })
    }

    /// The same journal, with the array's fault layer's crash points.
    pub fn with_faults(self, faults: Arc<FaultLayer>) -> Self {
        Self {
            faults: Some(faults),
            ..self
        }
    }

    fn crash_point(&self, what: &str, at: u64) {
        if let Some(faults) = &self.faults {
            faults.crash_point(JOURNAL_FILE, what, at, ENTRY_BYTES);
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves `bytes` (at most [`ENTRY_DATA_BYTES`]) as lock `lock`'s entry for
    /// `stripe` at chunk offset `offset`. The caller holds the lock exclusively.
    pub fn record(&self, lock: usize, stripe: u64, offset: u64, bytes: &[u8]) -> io::Result<()> {
        assert!(
            bytes.len() as u64 <= ENTRY_DATA_BYTES,
            "journal entry too large"
        );
        let at = lock as u64 * ENTRY_BYTES;
        self.file.write_all_at(bytes, at + HEADER_BYTES)?;
        self.crash_point("journal write (bytes saved, header not)", at);
        let mut fields = [0u8; 24];
        fields[0..8].copy_from_slice(&stripe.to_le_bytes());
        fields[8..16].copy_from_slice(&offset.to_le_bytes());
        fields[16..24].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        let mut header = [0u8; 36];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..32].copy_from_slice(&fields);
        header[32..36].copy_from_slice(&header_crc(&fields, bytes).to_le_bytes());
        self.file.write_all_at(&header, at)?;
        // On the device before any member write can be (see "Power loss").
        self.sync()
    }

    /// Makes the entries recorded and cleared so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Invalidates lock `lock`'s entry (the write it protected is done).
    pub fn clear(&self, lock: usize) -> io::Result<()> {
        let at = lock as u64 * ENTRY_BYTES;
        self.crash_point("journal clear", at);
        self.file.write_all_at(&[0u8; 8], at)
    }

    /// Lock `lock`'s entry if it is valid and for `stripe`.
    pub fn saved(&self, lock: usize, stripe: u64) -> io::Result<Option<Saved>> {
        let at = lock as u64 * ENTRY_BYTES;
        let mut header = [0u8; 36];
        match self.file.read_exact_at(&mut header, at) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        if header[0..8] != MAGIC {
            return Ok(None);
        }
        let mut fields = [0u8; 24];
        fields.copy_from_slice(&header[8..32]);
        let field = |i: usize| u64::from_le_bytes(fields[i..i + 8].try_into().expect("8 bytes"));
        let (entry_stripe, offset, len) = (field(0), field(8), field(16));
        if entry_stripe != stripe || len > ENTRY_DATA_BYTES {
            return Ok(None);
        }
        let mut bytes = vec![0u8; len as usize];
        match self.file.read_exact_at(&mut bytes, at + HEADER_BYTES) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        let crc = u32::from_le_bytes(header[32..36].try_into().expect("4 bytes"));
        if crc != header_crc(&fields, &bytes) {
            return Ok(None);
        }
        Ok(Some(Saved {
            stripe,
            offset,
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_read_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        assert_eq!(journal.saved(3, 7).expect("read"), None, "empty file");
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
        journal.record(3, 7, 4096, &bytes).expect("record");
        let again = Journal::open(dir.path()).expect("reopen");
        assert_eq!(
            again.saved(3, 7).expect("read"),
            Some(Saved {
                stripe: 7,
                offset: 4096,
                bytes: bytes.clone()
            })
        );
        assert_eq!(again.saved(3, 8).expect("read"), None, "another stripe");
        assert_eq!(again.saved(2, 7).expect("read"), None, "another lock");
        again.clear(3).expect("clear");
        assert_eq!(journal.saved(3, 7).expect("read"), None, "cleared");
    }

    #[test]
    fn a_torn_entry_is_not_valid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        journal.record(0, 1, 0, &[7u8; 4096]).expect("record");
        // The next record's bytes land, its header does not: the old header no
        // longer matches the bytes.
        journal
            .file
            .write_all_at(&[9u8; 4096], HEADER_BYTES)
            .expect("write");
        assert_eq!(journal.saved(0, 1).expect("read"), None);
    }
}
