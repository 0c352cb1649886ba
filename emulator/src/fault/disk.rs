//! Disk faults: a [`DiskFault`] as users write it, turned into a rule of the
//! system's fault book (`controllers::faults`), which the fault layer of every
//! process that has the array open applies.

use serde::{Deserialize, Serialize};

use controllers::faults::{DiskRule, Effect, FaultBook, OpSet};

use super::{FaultError, FaultRecord, FaultSpec};
use crate::rundir::RunDir;

/// An I/O operation a disk fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Reads.
    Read,
    /// Writes (host writes, rebuild writes, repairs, resyncs).
    Write,
    /// Flushes (making writes durable).
    Flush,
}

/// Which disk, where on it, how often, and the effect's parameters. Fields an
/// effect does not use are refused, naming the effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskFault {
    /// Server system (default `s0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The disk: its slot in the array (0, 1, …), as `emulator status` and the
    /// console number them. The fault follows the disk (the file in that slot
    /// when it was injected), not the slot.
    pub disk: usize,
    /// Operations it applies to (disk-error, disk-delay; default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
    /// First 512-byte sector of the range (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lba: Option<u64>,
    /// Sectors in the range (default: to the end of the disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sectors: Option<u64>,
    /// The error (disk-error): EIO (default), ENOSPC, EROFS, ENXIO, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// Added latency, ms (disk-delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    /// Bits flipped per corrupted read, or at rest (disk-corrupt; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// Flip the stored bits once, now (disk-corrupt): bit rot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_rest: bool,
    /// The chance that one I/O on the range is hit, 0 < rate ≤ 1 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Seed of the random choices (which I/Os, which bits; default: the
    /// injector's seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Adds the rule for a disk fault to the book (or, for bit rot, flips the
/// bits); what it did and whether it stands.
pub(super) fn inject(
    run: &RunDir,
    id: &str,
    spec: &FaultSpec,
    seed: u64,
) -> Result<(String, bool), FaultError> {
    let _ = (run, id, spec, seed);
    let _: Option<(DiskRule, Effect, FaultBook, OpSet)> = None;
    Err(FaultError::Invalid("disk faults are being built".into()))
}

/// Removes a standing disk fault's rule from its book.
pub(super) fn clear(run: &RunDir, fault: &FaultRecord) -> Result<(), FaultError> {
    let _ = (run, fault);
    Ok(())
}
