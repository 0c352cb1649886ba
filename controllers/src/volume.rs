//! Volumes as the processes that serve them see them: the volumes of one array
//! ([`Volumes`]), re-read from `array.json` whenever the array's live
//! generation moves (another process created or deleted a volume, or changed a
//! member), and one volume ([`Volume`]): where its bytes lie in the array's data
//! space, and whether it still exists. This is where each volume's ownership by
//! a controller will sit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::array::{read_metadata, ArrayError, VolumeRecord};
use crate::raid::RaidEngine;

/// Why a volume's I/O cannot be mapped onto the array.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume was deleted (its space may already belong to a new volume).
    #[error("volume {0} was deleted")]
    Deleted(String),
    /// The range is outside the volume.
    #[error("range {offset}+{length} is outside volume {name} ({size} bytes)")]
    OutOfRange {
        /// The volume.
        name: String,
        /// Start of the access.
        offset: u64,
        /// Its length.
        length: u64,
        /// The volume's size.
        size: u64,
    },
    /// The array's metadata could not be read.
    #[error(transparent)]
    Array(#[from] ArrayError),
}

/// The volumes of one array as this process knows them.
#[derive(Debug)]
pub struct Volumes {
    dir: PathBuf,
    engine: Arc<RaidEngine>,
    known: Mutex<(u64, Vec<VolumeRecord>)>,
}

impl Volumes {
    /// The volumes of the array in `dir` served through `engine`, read from
    /// `array.json` on first use.
    pub fn new(dir: &Path, engine: Arc<RaidEngine>) -> Arc<Self> {
        Arc::new(Self {
            dir: dir.to_path_buf(),
            engine,
            // No generation is u64::MAX: the first `current` reads the file.
            known: Mutex::new((u64::MAX, Vec::new())),
        })
    }

    /// The array directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The engine the volumes' I/O goes through.
    pub fn engine(&self) -> &Arc<RaidEngine> {
        &self.engine
    }

    /// The live generation now (one atomic load).
    fn generation(&self) -> u64 {
        self.engine.live().map_or(0, |live| live.generation())
    }

    /// The array's volumes now, and the generation they were read at.
    pub fn current(&self) -> Result<(u64, Vec<VolumeRecord>), ArrayError> {
        let generation = self.generation();
        let mut known = self.known.lock();
        if known.0 != generation {
            // Generation first: a change racing with this read bumps it again.
            *known = (generation, read_metadata(&self.dir)?.volumes);
        }
        Ok(known.clone())
    }

    /// Volume `record` of this array.
    pub fn volume(self: &Arc<Self>, record: VolumeRecord) -> Volume {
        let checked_at = self.known.lock().0;
        Volume {
            volumes: Arc::clone(self),
            record,
            checked_at: AtomicU64::new(checked_at),
            deleted: AtomicBool::new(false),
        }
    }
}

/// A volume of a RAID array: `size` bytes starting at `offset` in the array's
/// data space. Before each mapping it checks, with one atomic load, that the
/// array's configuration has not changed since it last looked; if it has, that
/// the volume still exists as it was. A deleted volume fails every later
/// mapping; an operation already under way when it is deleted finishes.
#[derive(Debug)]
pub struct Volume {
    volumes: Arc<Volumes>,
    record: VolumeRecord,
    checked_at: AtomicU64,
    deleted: AtomicBool,
}

impl Volume {
    /// The volume as recorded in `array.json`.
    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    /// The engine its I/O goes through.
    pub fn engine(&self) -> &RaidEngine {
        &self.volumes.engine
    }

    /// Fails once the volume has been deleted (or changed) in `array.json`.
    fn check_exists(&self) -> Result<(), VolumeError> {
        let gone = || VolumeError::Deleted(self.record.name.clone());
        if self.deleted.load(Ordering::Acquire) {
            return Err(gone());
        }
        if self.checked_at.load(Ordering::Acquire) == self.volumes.generation() {
            return Ok(());
        }
        let (generation, volumes) = self.volumes.current()?;
        if volumes.contains(&self.record) {
            self.checked_at.store(generation, Ordering::Release);
            Ok(())
        } else {
            if !self.deleted.swap(true, Ordering::AcqRel) {
                tracing::warn!(volume = %self.record.name, "volume deleted while served; refusing its I/O");
            }
            Err(gone())
        }
    }

    /// The array offset of volume bytes `[offset, offset+len)`, if the volume
    /// still exists and the range lies inside it.
    pub fn map(&self, offset: u64, len: u64) -> Result<u64, VolumeError> {
        self.check_exists()?;
        match offset.checked_add(len) {
            Some(end) if end <= self.record.size => Ok(self.record.offset + offset),
            _ => Err(VolumeError::OutOfRange {
                name: self.record.name.clone(),
                offset,
                length: len,
                size: self.record.size,
            }),
        }
    }
}
