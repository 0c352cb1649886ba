//! Disk faults: a [`DiskFault`] as users write it, turned into a rule of the
//! system's fault book (`controllers::faults`), which the fault layer of every
//! process that has the array open applies.

use serde::{Deserialize, Serialize};

use controllers::array::{read_metadata, Array};
use controllers::faults::{DiskRule, Effect, FaultBook, OpSet, Writers};
use controllers::raid::{ArrayState, MemberState};

use super::{FaultError, FaultRecord, FaultSpec};
use crate::rundir::RunDir;

/// Who writes: the writes a disk-lost-writes, disk-torn-writes or disk-crash
/// applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Writer {
    /// Host writes (and the parity they change).
    Host,
    /// A rebuild's writes to the disk it rebuilds.
    Rebuild,
    /// Repairs: a scrub's, a read's (a block that failed its checksum,
    /// rewritten), a resync's after a process died.
    Repair,
}

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
    /// Whose writes (disk-lost-writes, disk-torn-writes, disk-crash; default:
    /// all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writers: Vec<Writer>,
    /// Only in this process, e.g. `s0/c1/driver` (a controller with a bad
    /// path to the disk, or the one that dies at a disk-crash; default: every
    /// process that has the array open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Which matching write the process dies at, from 1 (disk-crash; default
    /// 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth: Option<u64>,
    /// How long the dying process hangs first, ms (disk-crash; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
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
    let (fault, kind) = disk_of(spec);
    check_fields(kind, fault)?;
    let (system, dir) = system_dir(run, fault.system.as_deref())?;
    let metadata = read_metadata(&dir)?;
    // Slots as the console numbers them: members, then hot spares.
    let slots = metadata.members.len() + metadata.spares.len();
    let members = metadata.members.len();
    let file = if let Some(member) = metadata.members.get(fault.disk) {
        member.file.clone()
    } else if let Some(spare) = metadata.spares.get(fault.disk - members) {
        spare.clone()
    } else {
        return Err(FaultError::Invalid(format!(
            "{system} has disks 0..{} ({members} members, then {} spare(s)), not disk {}",
            slots - 1,
            metadata.spares.len(),
            fault.disk
        )));
    };
    let is_member = fault.disk < members;
    let disk_bytes = metadata.geometry.disk_bytes;
    let (start, end) = controllers::faults::range(fault.lba.unwrap_or(0), fault.sectors);
    if start >= disk_bytes {
        return Err(FaultError::Invalid(format!(
            "lba {} is beyond the end of the disk ({} sectors)",
            fault.lba.unwrap_or(0),
            disk_bytes / controllers::faults::SECTOR
        )));
    }
    let rate = fault.rate.unwrap_or(1.0);
    if !(rate > 0.0 && rate <= 1.0) {
        return Err(FaultError::Invalid(format!(
            "rate {rate}: the chance that an I/O is hit, 0 < rate <= 1"
        )));
    }
    let seed = fault.seed.unwrap_or(seed);
    let what = format!("disk {} ({file}) of {system}", fault.disk);
    let range = if fault.lba.is_none() && fault.sectors.is_none() {
        String::new()
    } else {
        format!(
            " on LBA {}..{}",
            start / controllers::faults::SECTOR,
            end.min(disk_bytes) / controllers::faults::SECTOR
        )
    };
    let chance = if rate < 1.0 {
        format!(" (rate {rate}, seed {seed})")
    } else {
        String::new()
    };
    if kind == "disk-corrupt" && fault.at_rest {
        let bits = fault.bits.unwrap_or(1);
        let flipped = rot(&dir.join(&file), start, end.min(disk_bytes), bits, seed)?;
        return Ok((
            format!("{what}: {bits} stored bit(s) flipped{range} (seed {seed}), at {flipped}"),
            false,
        ));
    }
    let ops = match fault.ops.as_slice() {
        [] => OpSet::ALL,
        ops => OpSet {
            read: ops.contains(&Op::Read),
            write: ops.contains(&Op::Write),
            flush: ops.contains(&Op::Flush),
        },
    };
    let op_names = || {
        let mut names = Vec::new();
        for (on, name) in [
            (ops.read, "reads"),
            (ops.write, "writes"),
            (ops.flush, "flushes"),
        ] {
            if on {
                names.push(name);
            }
        }
        names.join(", ")
    };
    let writers = match fault.writers.as_slice() {
        [] => Writers::ALL,
        writers => Writers {
            host: writers.contains(&Writer::Host),
            rebuild: writers.contains(&Writer::Rebuild),
            repair: writers.contains(&Writer::Repair),
        },
    };
    let writer_names = || {
        if writers == Writers::ALL {
            return "writes".to_string();
        }
        let mut names = Vec::new();
        for (on, name) in [
            (writers.host, "host writes"),
            (writers.rebuild, "rebuild writes"),
            (writers.repair, "repairs"),
        ] {
            if on {
                names.push(name);
            }
        }
        names.join(", ")
    };
    let (effect, mut said) = match kind {
        "disk-fail" => (
            Effect::Absent {
                errno: nix::errno::Errno::EIO as i32,
            },
            format!("{what} stopped answering (EIO)"),
        ),
        "disk-pull" => (
            Effect::Absent {
                errno: nix::errno::Errno::ENXIO as i32,
            },
            format!("{what} pulled out (ENXIO)"),
        ),
        "disk-error" => {
            let name = fault.errno.as_deref().unwrap_or("EIO");
            (
                Effect::Error {
                    errno: errno(name)?,
                },
                format!("{what}: {}{range} fail with {name}{chance}", op_names()),
            )
        }
        "disk-delay" => {
            let ms = fault.ms.ok_or_else(|| {
                FaultError::Invalid("disk-delay needs `ms`, the latency to add".into())
            })?;
            (
                Effect::Delay { ms },
                format!("{what}: {}{range} take {ms} ms longer{chance}", op_names()),
            )
        }
        "disk-corrupt" => {
            let bits = fault.bits.unwrap_or(1);
            (
                Effect::Corrupt { bits },
                format!("{what}: reads{range} return {bits} flipped bit(s){chance}"),
            )
        }
        "disk-lost-writes" => (
            Effect::LostWrites,
            format!(
                "{what}: {}{range} acknowledged and not stored{chance}",
                writer_names()
            ),
        ),
        "disk-torn-writes" => (
            Effect::TornWrites,
            format!(
                "{what}: {} of several blocks{range} store only their first half{chance}",
                writer_names()
            ),
        ),
        _ => {
            let (effect, dies) = crash(fault.nth, fault.stall_ms)?;
            (
                effect,
                format!(
                    "{what}: the process making {} number {}{range} {dies}",
                    writer_names(),
                    fault.nth.unwrap_or(1)
                ),
            )
        }
    };
    let pid = only_in(run, fault.process.as_deref(), &mut said)?;
    let rule = DiskRule {
        id: id.to_string(),
        file: file.clone(),
        effect,
        ops,
        writers,
        pid,
        start,
        end,
        rate,
        seed,
    };
    FaultBook::open(&dir)?.change(|rules| rules.push(rule))?;
    if matches!(effect, Effect::Absent { .. }) && is_member {
        said.push_str(&fail_if_survivable(&dir, fault.disk)?);
    }
    Ok((said, true))
}

/// A crash effect from a fault's `nth` (default 1; counted from 1) and
/// `stall_ms` (default 0), and how it ends, in words (`dies there, after
/// hanging 10 ms`).
pub(super) fn crash(
    nth: Option<u64>,
    stall_ms: Option<u64>,
) -> Result<(Effect, String), FaultError> {
    let nth = nth.unwrap_or(1);
    if nth == 0 {
        return Err(FaultError::Invalid("nth = 0: writes count from 1".into()));
    }
    let stall_ms = stall_ms.unwrap_or(0);
    let dies = if stall_ms > 0 {
        format!("dies there, after hanging {stall_ms} ms")
    } else {
        "dies there".to_string()
    };
    Ok((Effect::Crash { nth, stall_ms }, dies))
}

/// The pid a rule limited to `process` applies in (None: every process),
/// said in `said`.
pub(super) fn only_in(
    run: &RunDir,
    process: Option<&str>,
    said: &mut String,
) -> Result<Option<u32>, FaultError> {
    let Some(name) = process else {
        return Ok(None);
    };
    let pid = running_pid(run, name)?;
    said.push_str(&format!(", only in {name} (pid {pid})"));
    Ok(Some(pid))
}

/// The pid of running process `name` of the domain.
fn running_pid(run: &RunDir, name: &str) -> Result<u32, FaultError> {
    let name = crate::domain::ProcessName::parse(name)
        .map_err(|err| FaultError::Invalid(format!("process {name:?}: {err}")))?
        .to_string();
    let processes = run.read_processes();
    match processes.iter().find(|p| p.name == name) {
        Some(record) if record.ended.is_none() => Ok(record.pid),
        Some(record) => Err(FaultError::Process(format!(
            "{name} is not running ({})",
            record.ended.as_deref().unwrap_or("ended")
        ))),
        None => Err(FaultError::Invalid(format!(
            "the domain in {} has no process {name}",
            run.root().display()
        ))),
    }
}

/// Records a disk that stopped answering as failed in the array, as a
/// controller does when a disk drops off its bus, unless the array would not
/// survive it: then it is not recorded, the array is unavailable (clear
/// errors) while the disk is away, and whole again once it answers (nothing
/// could be written meanwhile).
fn fail_if_survivable(dir: &std::path::Path, disk: usize) -> Result<String, FaultError> {
    let metadata = read_metadata(dir)?;
    let mut states: Vec<MemberState> = metadata.members.iter().map(|m| m.state).collect();
    if states[disk] == MemberState::Failed {
        return Ok("; the array had failed it already".into());
    }
    states[disk] = MemberState::Failed;
    let after = controllers::raid::array_state(metadata.geometry, &states);
    if after == ArrayState::Failed {
        return Ok(
            "; the array cannot do without it: unavailable until the disk answers again".into(),
        );
    }
    Array::open(dir)?.fail(disk)?;
    Ok(format!("; the array failed it: {after:?}").to_lowercase())
}

/// Removes a standing disk fault's rule from its book.
pub(super) fn clear(run: &RunDir, fault: &FaultRecord) -> Result<(), FaultError> {
    let (spec, _) = disk_of(&fault.spec);
    clear_rule(run, spec.system.as_deref(), &fault.id)
}

/// Removes rule `id` from the fault book of `system` (None: `s0`).
pub(super) fn clear_rule(run: &RunDir, system: Option<&str>, id: &str) -> Result<(), FaultError> {
    let (_, dir) = system_dir(run, system)?;
    FaultBook::open(&dir)?.change(|rules| rules.retain(|rule| rule.id != id))?;
    Ok(())
}

fn disk_of(spec: &FaultSpec) -> (&DiskFault, &'static str) {
    match spec {
        FaultSpec::DiskFail(f)
        | FaultSpec::DiskPull(f)
        | FaultSpec::DiskError(f)
        | FaultSpec::DiskDelay(f)
        | FaultSpec::DiskCorrupt(f)
        | FaultSpec::DiskLostWrites(f)
        | FaultSpec::DiskTornWrites(f)
        | FaultSpec::DiskCrash(f) => (f, spec.kind()),
        _ => unreachable!("only disk faults come here"),
    }
}

/// Refuses the fields a kind does not use, naming the ones it does.
fn check_fields(kind: &str, fault: &DiskFault) -> Result<(), FaultError> {
    let allowed: &[&str] = match kind {
        "disk-fail" | "disk-pull" => &[],
        "disk-error" => &["ops", "lba", "sectors", "errno", "rate", "seed"],
        "disk-delay" => &["ops", "lba", "sectors", "ms", "rate", "seed"],
        "disk-corrupt" => &["lba", "sectors", "bits", "at_rest", "rate", "seed"],
        "disk-crash" => &["lba", "sectors", "writers", "nth", "stall_ms"],
        _ => &["lba", "sectors", "writers", "rate", "seed"],
    };
    let given = [
        ("ops", !fault.ops.is_empty()),
        ("lba", fault.lba.is_some()),
        ("sectors", fault.sectors.is_some()),
        ("errno", fault.errno.is_some()),
        ("ms", fault.ms.is_some()),
        ("bits", fault.bits.is_some()),
        ("at_rest", fault.at_rest),
        ("writers", !fault.writers.is_empty()),
        ("nth", fault.nth.is_some()),
        ("stall_ms", fault.stall_ms.is_some()),
        ("rate", fault.rate.is_some()),
        ("seed", fault.seed.is_some()),
        ("process", fault.process.is_some() && allowed.is_empty()),
    ];
    for (field, set) in given {
        if set && !allowed.contains(&field) {
            return Err(FaultError::Invalid(format!(
                "{kind} takes no `{field}` (it takes: system, disk{}{})",
                if allowed.is_empty() { "" } else { ", " },
                allowed.join(", ")
            )));
        }
    }
    if fault.sectors == Some(0) {
        return Err(FaultError::Invalid("sectors = 0: an empty range".into()));
    }
    Ok(())
}

/// The system a fault names (None: `s0`) and its disks' directory.
pub(super) fn system_dir(
    run: &RunDir,
    system: Option<&str>,
) -> Result<(String, std::path::PathBuf), FaultError> {
    let system = system.unwrap_or("s0").to_string();
    let index = system
        .strip_prefix('s')
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| FaultError::Invalid(format!("system {system:?}: systems are s0, s1, …")))?;
    let dir = run.disks(index);
    if !dir.join("array.json").exists() {
        return Err(FaultError::Invalid(format!(
            "the domain in {} has no system {system} (no {})",
            run.root().display(),
            dir.join("array.json").display()
        )));
    }
    Ok((system, dir))
}

/// An error number by name (`EIO`) or number.
fn errno(name: &str) -> Result<i32, FaultError> {
    use nix::errno::Errno;
    let known = [
        Errno::EIO,
        Errno::ENOSPC,
        Errno::EROFS,
        Errno::ENXIO,
        Errno::ENODEV,
        Errno::ETIMEDOUT,
        Errno::EBUSY,
        Errno::EPERM,
        Errno::EACCES,
        Errno::EINVAL,
        Errno::ENOMEM,
        Errno::EDQUOT,
    ];
    if let Ok(number) = name.parse::<i32>() {
        if number > 0 {
            return Ok(number);
        }
    }
    known
        .iter()
        .find(|e| format!("{e:?}").eq_ignore_ascii_case(name))
        .map(|e| *e as i32)
        .ok_or_else(|| {
            FaultError::Invalid(format!(
                "errno {name:?}: give a number or one of {}",
                known
                    .iter()
                    .map(|e| format!("{e:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Bit rot: flips `bits` bits of the image's stored data in `[start, end)`,
/// at places the seed chooses, leaving its checksums as they were; where.
fn rot(
    image: &std::path::Path,
    start: u64,
    end: u64,
    bits: u32,
    seed: u64,
) -> Result<String, FaultError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|err| FaultError::Invalid(format!("open {}: {err}", image.display())))?;
    let mut random = seed;
    let mut places = Vec::new();
    for _ in 0..bits {
        random = controllers::faults::mix(random);
        let bit = start * 8 + random % ((end - start) * 8);
        let at = bit / 8;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at)
            .and_then(|()| {
                byte[0] ^= 1 << (bit % 8);
                file.write_all_at(&byte, at)
            })
            .map_err(|err| FaultError::Invalid(format!("rot {}: {err}", image.display())))?;
        places.push(format!("byte {at} bit {}", bit % 8));
    }
    Ok(places.join(", "))
}
