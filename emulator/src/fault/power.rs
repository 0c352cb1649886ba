//! Power loss of a server system (`power-loss`): both its controllers and
//! every process on them lose power at once, and its disks lose what their
//! volatile write caches held: of the blocks written since their disk's
//! last flush (or FUA write, for its range), a seeded share `lose` comes
//! back as it was at that flush, block by block (a data block lost and its
//! parity kept, or the other way round: the RAID write hole). Then the power
//! comes back: every process of the system starts again, and the drivers
//! open the arrays as after a real power loss (checking and resyncing what
//! was being written).
//!
//! In steps, because the page cache that holds the emulator's disks
//! survives a killed process:
//! 1. A volatile-cache rule goes into the system's fault book
//!    (`controllers::faults::Effect::VolatileCache`): from their next I/O,
//!    the processes keep an undo log per disk (`controllers::volatile`).
//! 2. `after_ms` later (writes and flushes go on meanwhile) the supervisor,
//!    outside the system as a power switch is, kills every process of the
//!    system with SIGKILL and waits until they are gone, takes the rule out,
//!    rolls every disk back and starts the processes again (in FIG. 2's
//!    order), [`crate::supervisor::power_cut`]. The supervisor logs it in
//!    the fault log: the process that asked may have died with the system.
//!
//! What the cut does not lose: the degraded-write journal, `array.json`, the
//! fault book and persistent data are kept whole (they are synced where the
//! emulator relies on them; losing their unsynced tail is not emulated).
//! Servers on a host, other systems, and the hosts' NBD clients go on; the
//! server that takes the request may be on the system, and die with it
//! before it answers: the cut goes on.

use serde::{Deserialize, Serialize};

use std::path::Path;

use controllers::faults::{DiskRule, Effect, FaultBook, ANY_FILE};
use controllers::volatile;

use super::{disk, FaultError, FaultRecord};
use crate::rundir::RunDir;

/// How long the disks keep their caches before the power goes, by default.
pub const DEFAULT_AFTER_MS: u64 = 1000;
/// The most a power loss may wait.
pub const MAX_AFTER_MS: u64 = 600_000;
/// The share of the unflushed blocks lost, by default.
pub const DEFAULT_LOSE: f64 = 0.5;

/// Which system, when, and how much of the caches is lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PowerFault {
    /// Server system (default `s0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// How long after the injection the power goes, ms (default 1000): the
    /// writes of that time are the ones a cut can lose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// The share of the blocks written since their disk's last flush that
    /// come back as they were at that flush, 0 to 1 (default 0.5; 1: the
    /// caches are lost whole; 0: they all reached the disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lose: Option<f64>,
}

/// Arms the disks' caches, waits, and has the supervisor cut the power and
/// bring it back; the record the supervisor logged.
pub(super) fn inject(
    run: &RunDir,
    fault: &PowerFault,
    seed: u64,
) -> Result<FaultRecord, FaultError> {
    let lose = fault.lose.unwrap_or(DEFAULT_LOSE);
    if !(0.0..=1.0).contains(&lose) {
        return Err(FaultError::Invalid(format!(
            "lose = {lose}: the share of unflushed blocks lost is from 0 to 1"
        )));
    }
    let after_ms = fault.after_ms.unwrap_or(DEFAULT_AFTER_MS);
    if after_ms > MAX_AFTER_MS {
        return Err(FaultError::Invalid(format!(
            "after_ms = {after_ms}: at most {MAX_AFTER_MS} (the undo logs grow with every write until the cut)"
        )));
    }
    let (system, dir) = disk::system_dir(run, fault.system.as_deref())?;
    let index: usize = system[1..].parse().expect("system_dir checked the name");
    if crate::supervisor::running_supervisor(run).is_none() {
        return Err(FaultError::Process(format!(
            "no domain is running in {}: the power of a system is cut by its supervisor",
            run.root().display()
        )));
    }
    disarm(&dir)?;
    let id = format!("power-loss-{seed}");
    FaultBook::open(&dir)?.change(|rules| {
        rules.push(DiskRule::everywhere(&id, ANY_FILE, Effect::VolatileCache));
    })?;
    tracing::warn!(%system, after_ms, lose, seed, "the disks keep volatile caches; the power goes in {after_ms} ms");
    std::thread::sleep(std::time::Duration::from_millis(after_ms));
    match crate::supervisor::power_cut(run, index, seed, lose, after_ms) {
        Ok(said) => serde_json::from_str(&said).map_err(|err| {
            FaultError::Process(format!(
                "the power of {system} was cut, and the supervisor's answer is not a fault record ({err}): {said}"
            ))
        }),
        Err(err) => {
            let _ = disarm(&dir);
            Err(FaultError::Process(format!(
                "cutting the power of {system}: {err} (the disks' caches are off again)"
            )))
        }
    }
}

/// Takes every volatile-cache rule out of the fault book in `dir` and
/// removes the undo logs there.
pub fn disarm(dir: &Path) -> Result<(), FaultError> {
    disarm_rules(dir)?;
    for image in volatile::images_with_logs(dir) {
        let _ = std::fs::remove_file(volatile::log_path(&image));
    }
    Ok(())
}

/// Takes every volatile-cache rule out of the fault book in `dir`: the
/// disks' writes are durable when written again (a process that loads the
/// book no longer logs them).
pub fn disarm_rules(dir: &Path) -> Result<(), FaultError> {
    FaultBook::open(dir)?
        .change(|rules| rules.retain(|rule| rule.effect != Effect::VolatileCache))?;
    Ok(())
}

/// What the cut did to a system's disks.
#[derive(Debug, Default)]
pub struct DisksCut {
    /// Blocks written since their disk's last flush, on every disk.
    pub unflushed: u64,
    /// Of which put back as they were at that flush.
    pub lost: u64,
    /// `disk0.img 12 of 40` for each disk that had any.
    pub per_disk: Vec<String>,
    /// What could not be done (the caches left on, a disk not rolled back).
    pub problems: Vec<String>,
}

/// The cut, for the disks in `dir` once every process that had them open
/// is gone: the caches off, and each disk rolled back from its undo log,
/// a block lost when [`loses`] says so.
pub fn roll_back_disks(dir: &Path, seed: u64, lose: f64) -> DisksCut {
    let mut cut = DisksCut::default();
    if let Err(err) = disarm_rules(dir) {
        cut.problems
            .push(format!("the disks' caches stay on: {err}"));
    }
    for image in volatile::images_with_logs(dir) {
        let file = image
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        match volatile::roll_back(&image, |block| loses(seed, &file, block, lose)) {
            Ok(Some(rolled)) => {
                tracing::warn!(disk = %file, unflushed = rolled.unflushed, lost = rolled.lost, "disk cache lost");
                cut.unflushed += rolled.unflushed;
                cut.lost += rolled.lost;
                if rolled.unflushed > 0 {
                    cut.per_disk
                        .push(format!("{file} {} of {}", rolled.lost, rolled.unflushed));
                }
            }
            Ok(None) => {}
            Err(err) => cut.problems.push(format!("rolling {file} back: {err}")),
        }
    }
    cut
}

/// Whether the cut loses `block` of disk file `file`: a draw from `seed`,
/// the file and the block, below `lose`.
pub fn loses(seed: u64, file: &str, block: u64, lose: f64) -> bool {
    use controllers::faults::mix;
    let name = file.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let draw = mix(seed ^ mix(name ^ mix(block)));
    ((draw >> 11) as f64 / (1u64 << 53) as f64) < lose
}
