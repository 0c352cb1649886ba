//! `emulator fault inject|list|clear`: faults in a running domain, by hand
//! (the work is `crate::fault`'s). A fault is built from the flags given, as
//! the JSON object a scenario file would write, and read through serde, so a
//! flag the kind does not take is refused with serde's words.

use std::process::ExitCode;

use anyhow::Context;
use clap::builder::PossibleValuesParser;
use clap::Subcommand;
use serde_json::{json, Map, Value};

use super::domain::RunDirArg;
use crate::fault::{self, FaultEvent, FaultSpec};
use crate::scenario::report::utc_timestamp;

// Parsed once per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(super) enum FaultCommand {
    /// Inject a fault: a disk, host or link fault stands until cleared (but
    /// bit rot, which flips stored bits once); a process fault happens once.
    /// Prints its id.
    Inject {
        /// What: disk-fail, disk-pull, disk-error, disk-delay, disk-corrupt,
        /// disk-lost-writes, disk-torn-writes, disk-crash, host-fs-full (the
        /// host file system under a system's disks is full: writes to blocks
        /// never written fail with ENOSPC), journal-crash (the process making
        /// the nth write of the degraded-write journal dies), power-loss (a
        /// system loses power after --after-ms: its processes die, its disks
        /// lose a share --lose of what was written since their last flush,
        /// and it starts again), link-cut, link-delay,
        /// process-kill, process-hang, process-resume, process-restart.
        #[arg(value_parser = PossibleValuesParser::new(FaultSpec::KINDS))]
        kind: String,
        /// Disk: its slot in the array (members first, then spares).
        #[arg(long)]
        disk: Option<u64>,
        /// Server system of a disk fault, host-fs-full, journal-crash or
        /// power-loss (default s0).
        #[arg(long)]
        system: Option<String>,
        /// Operations a disk-error or disk-delay applies to (default: all),
        /// e.g. read,write.
        #[arg(long, value_delimiter = ',', value_parser = ["read", "write", "flush"])]
        ops: Vec<String>,
        /// First 512-byte sector of the range (default 0).
        #[arg(long)]
        lba: Option<u64>,
        /// Sectors in the range (default: to the end of the disk).
        #[arg(long)]
        sectors: Option<u64>,
        /// The error of a disk-error (default EIO): EIO, ENOSPC, EROFS, ENXIO, …
        #[arg(long)]
        errno: Option<String>,
        /// Added latency of a disk-delay or link-delay, ms.
        #[arg(long)]
        ms: Option<u64>,
        /// Bits flipped (disk-corrupt; default 1).
        #[arg(long)]
        bits: Option<u32>,
        /// Flip the stored bits once, now (disk-corrupt): bit rot.
        #[arg(long)]
        at_rest: bool,
        /// Whose writes a disk-lost-writes, disk-torn-writes or disk-crash
        /// applies to (default: all), e.g. rebuild,repair.
        #[arg(long, value_delimiter = ',', value_parser = ["host", "rebuild", "repair"])]
        writers: Vec<String>,
        /// Which matching write the process dies at, from 1 (disk-crash;
        /// default 1).
        #[arg(long)]
        nth: Option<u64>,
        /// How long the dying process hangs first, ms (disk-crash).
        #[arg(long)]
        stall_ms: Option<u64>,
        /// power-loss: how long the disks keep what is written in volatile
        /// caches before the power goes, ms (default 1000; the command waits).
        #[arg(long)]
        after_ms: Option<u64>,
        /// power-loss: the share of the blocks written since their disk's
        /// last flush that the cut loses, 0 to 1 (default 0.5).
        #[arg(long)]
        lose: Option<f64>,
        /// The chance that one I/O on the range is hit, 0 < R ≤ 1 (default 1).
        #[arg(long)]
        rate: Option<f64>,
        /// Seed of the fault's random choices (which I/Os a rate hits, which
        /// bits flip, which blocks a power loss loses; default: a random one,
        /// printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The process of a process fault: s0/c0/driver, s0/c1/agent-a,
        /// s0/c0/server-a, host/server-b.
        #[arg(long)]
        process: Option<String>,
        /// The link of a link fault: s0/c1/agent-a (that agent's link to its
        /// server), s0/c1/agent-a/driver (that agent's link to its driver),
        /// s0/c0/nbd (the hosts' links to controller s0/c0's NBD address).
        #[arg(long)]
        link: Option<String>,
        #[command(flatten)]
        run: RunDirArg,
        /// Print the fault's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the standing faults (with --log: every fault injected and cleared,
    /// with its time).
    List {
        #[command(flatten)]
        run: RunDirArg,
        /// The whole fault log, oldest first.
        #[arg(long)]
        log: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Clear a standing fault by its id (f1, f2, …), or every one with --all.
    Clear {
        /// The fault's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every standing fault.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        run: RunDirArg,
    },
}

pub(super) fn run(command: FaultCommand) -> anyhow::Result<ExitCode> {
    match command {
        FaultCommand::Inject {
            kind,
            disk,
            system,
            ops,
            lba,
            sectors,
            errno,
            ms,
            bits,
            at_rest,
            writers,
            nth,
            stall_ms,
            after_ms,
            lose,
            rate,
            seed,
            process,
            link,
            run,
            json,
        } => {
            let mut object = Map::new();
            object.insert("fault".into(), json!(kind));
            let mut put = |key: &str, value: Option<Value>| {
                if let Some(value) = value {
                    object.insert(key.into(), value);
                }
            };
            put("disk", disk.map(|d| json!(d)));
            put("system", system.map(|s| json!(s)));
            put("ops", (!ops.is_empty()).then(|| json!(ops)));
            put("lba", lba.map(|v| json!(v)));
            put("sectors", sectors.map(|v| json!(v)));
            put("errno", errno.map(|v| json!(v)));
            put("ms", ms.map(|v| json!(v)));
            put("bits", bits.map(|v| json!(v)));
            put("at_rest", at_rest.then_some(Value::Bool(true)));
            put("writers", (!writers.is_empty()).then(|| json!(writers)));
            put("nth", nth.map(|v| json!(v)));
            put("stall_ms", stall_ms.map(|v| json!(v)));
            put("after_ms", after_ms.map(|v| json!(v)));
            put("lose", lose.map(|v| json!(v)));
            put("rate", rate.map(|v| json!(v)));
            put("process", process.map(|v| json!(v)));
            put("link", link.map(|v| json!(v)));
            let spec: FaultSpec = serde_json::from_value(Value::Object(object))
                .with_context(|| format!("a {kind} fault"))?;
            let seed = seed.unwrap_or_else(random_seed);
            let record = fault::inject(&run.get(), &spec, seed)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                // The effect names the seed where the fault drew from it.
                println!("{} {}: {}", record.id, record.spec.kind(), record.effect);
            }
            Ok(ExitCode::SUCCESS)
        }
        FaultCommand::List { run, log, json } => {
            let run = run.get();
            if log {
                let events = fault::read_log(&run)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&events)?);
                    return Ok(ExitCode::SUCCESS);
                }
                if events.is_empty() {
                    println!("no fault was injected in {}", run.root().display());
                }
                for event in events {
                    match event {
                        FaultEvent::Injected(record) => println!(
                            "{} injected {} {}: {}{}",
                            utc_timestamp(record.injected_ms),
                            record.id,
                            record.spec.kind(),
                            record.effect,
                            if record.standing { " (standing)" } else { "" }
                        ),
                        FaultEvent::Cleared { id, cleared_ms } => {
                            println!("{} cleared  {id}", utc_timestamp(cleared_ms))
                        }
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let standing = fault::active(&run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&standing)?);
                return Ok(ExitCode::SUCCESS);
            }
            if standing.is_empty() {
                println!("no standing fault (--log lists every fault injected)");
            }
            for record in standing {
                println!(
                    "{} {} since {}: {}",
                    record.id,
                    record.spec.kind(),
                    utc_timestamp(record.injected_ms),
                    record.effect
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        FaultCommand::Clear { id, all, run } => {
            let cleared = fault::clear(&run.get(), if all { None } else { id.as_deref() })?;
            if cleared.is_empty() {
                println!("no standing fault to clear");
            } else {
                println!("cleared {}", cleared.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A seed from the clock and the pid (printed, so it can be given again).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    crate::scenario::derive_seed(nanos, u64::from(std::process::id()))
}
