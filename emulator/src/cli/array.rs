//! `emulator array …`: create, status, fail, replace, volumes, and the long
//! tasks (rebuild, scrub) with their operator commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use controllers::array::{self, Array};
use controllers::coordination::Control;
use controllers::raid::Level;

use super::units::{human, parse_size};
use crate::controller::{self, Adjust, StartOptions, TaskKind, DEFAULT_LEASE_MS};

#[derive(Debug, Subcommand)]
pub(super) enum ArrayCommand {
    /// Create an array: member images, hot spares and array.json in DIR.
    Create {
        /// Directory for the array (created if missing; must hold no array).
        dir: PathBuf,
        /// RAID level.
        #[arg(long, value_enum)]
        level: LevelArg,
        /// Member disks (raid1: at least 2; raid5: at least 3; raid6: at least 4).
        #[arg(long)]
        disks: usize,
        /// Hot spares.
        #[arg(long, default_value_t = 0)]
        spares: usize,
        /// Size of each disk, e.g. 256MiB (a multiple of the chunk size).
        #[arg(long, value_parser = parse_size)]
        disk_size: u64,
        /// Chunk (stripe unit) size, a power of two from 4KiB to 16MiB.
        #[arg(long, value_parser = parse_size, default_value = "64KiB")]
        chunk: u64,
        /// Equal volumes vol0, vol1, … to carve from the whole array (0: none yet;
        /// see volume-create).
        #[arg(long, default_value_t = 1)]
        volumes: usize,
    },
    /// Carve a new volume from the array's free space (running servers offer it
    /// to their next client).
    VolumeCreate {
        /// Array directory.
        dir: PathBuf,
        /// Volume (export) name: 1-64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// Size, e.g. 64MiB (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// The controller (0 or 1) that owns it in a running domain (`emulator
        /// up`); `emulator serve` serves every volume whatever its owner.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
        owner: u8,
    },
    /// Delete a volume (its data stays on the disks until overwritten; running
    /// servers refuse its I/O from then on).
    VolumeDelete {
        /// Array directory.
        dir: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
    },
    /// Show the array's state, members, spares and volumes.
    Status {
        /// Array directory.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mark a member disk failed (persistently; a running server stops using it
    /// before its next I/O).
    Fail {
        /// Array directory.
        dir: PathBuf,
        /// Member index.
        #[arg(long)]
        disk: usize,
    },
    /// Replace a failed disk with a hot spare (or a new empty image) to rebuild.
    Replace {
        /// Array directory.
        dir: PathBuf,
        /// Member index of the failed disk.
        #[arg(long)]
        disk: usize,
    },
    /// Rebuild the replaced disk from the others, split across controllers.
    Rebuild {
        /// Array directory.
        dir: PathBuf,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Verify every block's checksum and every stripe's redundancy.
    Scrub {
        /// Array directory.
        dir: PathBuf,
        /// Rewrite what redundancy can fix.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Pause a running rebuild or scrub (controllers keep their partitions).
    Pause(AdjustArgs),
    /// Resume a paused rebuild or scrub.
    Resume(AdjustArgs),
    /// Cancel a rebuild or scrub (a disk being rebuilt stays `rebuilding`).
    Cancel(AdjustArgs),
    /// Change the rate limit of a running rebuild or scrub.
    SetRate {
        #[command(flatten)]
        which: AdjustArgs,
        /// New total rate limit in MiB/s, or 0 for none.
        #[arg(long)]
        rate: f64,
    },
}

#[derive(Debug, Args)]
pub(super) struct AdjustArgs {
    /// Array directory.
    dir: PathBuf,
    /// Which task (default: the only one in progress).
    #[arg(long, value_enum)]
    task: Option<TaskKind>,
    /// Print the task's progress as JSON.
    #[arg(long)]
    json: bool,
    /// How long a cancel waits for a controller that stopped answering.
    #[arg(long, default_value_t = DEFAULT_LEASE_MS, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    lease_ms: u64,
}

#[derive(Debug, Args)]
pub(super) struct TaskArgs {
    /// Controller processes to split the work across (1-4).
    #[arg(long, default_value_t = 1)]
    controllers: u8,
    /// Total rate limit in MiB/s (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Wait for the task to finish, showing progress, and print its report.
    #[arg(long)]
    wait: bool,
    /// Print the report as JSON (with --wait).
    #[arg(long, requires = "wait")]
    json: bool,
    /// A partition whose controller stops renewing its lease for this long is
    /// taken over by another controller.
    #[arg(long, default_value_t = DEFAULT_LEASE_MS, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    lease_ms: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum LevelArg {
    Raid1,
    Raid5,
    Raid6,
}

pub(super) fn run(command: ArrayCommand) -> anyhow::Result<ExitCode> {
    match command {
        ArrayCommand::Create {
            dir,
            level,
            disks,
            spares,
            disk_size,
            chunk,
            volumes,
        } => {
            let level = match level {
                LevelArg::Raid1 => Level::Raid1,
                LevelArg::Raid5 => Level::Raid5,
                LevelArg::Raid6 => Level::Raid6,
            };
            let mut array = Array::create(
                &dir,
                array::geometry(level, disks, chunk, disk_size),
                spares,
                volumes,
            )?;
            let status = array.status()?;
            println!(
                "created {:?} array in {} with {} disks and {} spares: {} bytes usable, volumes: {}",
                status.geometry.level,
                dir.display(),
                disks,
                spares,
                status.data_bytes,
                if status.volumes.is_empty() {
                    "none yet".to_string()
                } else {
                    status
                        .volumes
                        .iter()
                        .map(|v| format!("{} ({} bytes)", v.name, v.size))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        ArrayCommand::VolumeCreate {
            dir,
            name,
            size,
            owner,
        } => {
            let volume = Array::open(&dir)?.create_volume(&name, size, owner)?;
            println!(
                "volume {} created: {} bytes at array offset {} (servers started from now on export it)",
                volume.name, volume.size, volume.offset
            );
            Ok(ExitCode::SUCCESS)
        }
        ArrayCommand::VolumeDelete { dir, name } => {
            Array::open(&dir)?.delete_volume(&name)?;
            println!("volume {name} deleted from {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        ArrayCommand::Status { dir, json } => {
            let status = Array::open(&dir)?.status()?;
            let tasks = controller::in_progress(&dir);
            if json {
                let mut value = serde_json::to_value(&status)?;
                value["tasks"] = serde_json::to_value(&tasks)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let geometry = status.geometry;
                println!("array:   {}", status.dir.display());
                println!("state:   {:?}", status.state);
                println!(
                    "level:   {:?}, {} disks of {} bytes, chunk {} bytes",
                    geometry.level, geometry.disks, geometry.disk_bytes, geometry.chunk_bytes
                );
                println!(
                    "usable:  {} bytes ({})",
                    status.data_bytes,
                    human(status.data_bytes)
                );
                for (index, member) in status.members.iter().enumerate() {
                    println!("disk {index}:  {:<12} {:?}", member.file, member.state);
                }
                for spare in &status.spares {
                    println!("spare:   {spare}");
                }
                for volume in &status.volumes {
                    println!(
                        "volume:  {} ({} bytes at {})",
                        volume.name, volume.size, volume.offset
                    );
                }
                for task in &tasks {
                    let eta = task
                        .eta_s
                        .map(|s| format!(", eta {s:.0} s"))
                        .unwrap_or_default();
                    let limit = task
                        .rate_limit_mib_s
                        .map(|r| format!(", limit {r} MiB/s"))
                        .unwrap_or_default();
                    println!(
                        "task:    {:?} ({:?}) {:.1}% ({} of {} bytes per disk, {:.1} MiB/s{eta}{limit}); partitions: {} ready, {} in progress {:?}, {} complete",
                        task.operation,
                        task.control,
                        task.percent,
                        task.bytes_done,
                        task.bytes_total,
                        task.mib_per_s,
                        task.partitions_ready,
                        task.in_progress.len(),
                        task.in_progress,
                        task.partitions_complete
                    );
                }
                if !status.processes.is_empty() {
                    println!("open by: pids {:?}", status.processes);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ArrayCommand::Replace { dir, disk } => {
            let mut array = Array::open(&dir)?;
            let file = array.replace(disk)?;
            println!(
                "disk {disk} of {} replaced by {file}; run `emulator array rebuild {}`",
                dir.display(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ArrayCommand::Rebuild { dir, task } => run_task(&dir, TaskKind::Rebuild, false, &task),
        ArrayCommand::Scrub { dir, repair, task } => run_task(&dir, TaskKind::Scrub, repair, &task),
        ArrayCommand::Pause(which) => adjust_task(&which, Adjust::Pause),
        ArrayCommand::Resume(which) => adjust_task(&which, Adjust::Resume),
        ArrayCommand::Cancel(which) => adjust_task(&which, Adjust::Cancel),
        ArrayCommand::SetRate { which, rate } => {
            adjust_task(&which, Adjust::Rate((rate != 0.0).then_some(rate)))
        }
        ArrayCommand::Fail { dir, disk } => {
            let mut array = Array::open(&dir)?;
            array.fail(disk)?;
            println!(
                "disk {disk} of {} marked failed; array is {:?}",
                dir.display(),
                array.status()?.state
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn adjust_task(which: &AdjustArgs, adjust: Adjust) -> anyhow::Result<ExitCode> {
    let progress = controller::adjust(&which.dir, which.task, adjust, which.lease_ms)?;
    if which.json {
        println!("{}", serde_json::to_string_pretty(&progress)?);
    } else {
        let what = match adjust {
            Adjust::Pause => "paused".to_string(),
            Adjust::Resume => "resumed".to_string(),
            Adjust::Cancel => "cancelled".to_string(),
            Adjust::Rate(Some(rate)) => format!("limited to {rate} MiB/s"),
            Adjust::Rate(None) => "no longer rate limited".to_string(),
        };
        println!(
            "{:?} of {} {what} at {:.1}%",
            progress.operation,
            which.dir.display(),
            progress.percent
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_task(dir: &Path, kind: TaskKind, repair: bool, args: &TaskArgs) -> anyhow::Result<ExitCode> {
    let options = StartOptions {
        controllers: args.controllers,
        rate_mib_s: args.rate,
        lease_ms: args.lease_ms,
        wait: args.wait,
    };
    let started = controller::start(dir, kind, repair, &options)?;
    if !args.wait {
        println!(
            "{} started on {} controller(s) (pids {}); `emulator array status {}` shows progress",
            kind.name(),
            options.controllers,
            started
                .pids()
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let report = follow(started, kind)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let found = &report.findings;
        match kind {
            TaskKind::Rebuild => println!(
                "rebuild of disk {} done: {} bytes, {} unrecoverable blocks",
                report.rebuilt_disk.unwrap_or_default(),
                report.bytes_per_disk,
                found.unrecoverable.len()
            ),
            TaskKind::Scrub => println!(
                "scrub done: {} rows checked, {} checksum errors, {} parity mismatches, {} repaired, {} unrecoverable",
                found.rows_checked,
                found.checksum_errors,
                found.parity_mismatches,
                found.repaired,
                found.unrecoverable.len()
            ),
        }
        for offset in &found.unrecoverable {
            println!("unrecoverable: array byte offset {offset}");
        }
        for partition in &report.partitions {
            println!(
                "partition {} ({} bytes at {}): controller {}",
                partition.index,
                partition.length,
                partition.start,
                partition
                    .completed_by
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into())
            );
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Follows a started task to its end: a progress bar on a terminal, otherwise
/// a line on stderr every 2 s (stdout carries the report, maybe JSON).
fn follow(started: controller::Started, kind: TaskKind) -> anyhow::Result<controller::TaskReport> {
    let total = started.total_bytes();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(kind.name());
    let plain = bar.is_hidden();
    let begun = Instant::now();
    let mut last_line = Instant::now();
    let report = started.wait(|done, control| {
        bar.set_position(done);
        bar.set_message(match control {
            Control::Run => kind.name().to_string(),
            Control::Pause => format!("{} (paused)", kind.name()),
            Control::Cancel => format!("{} (cancelling)", kind.name()),
        });
        if plain && last_line.elapsed() >= Duration::from_secs(2) {
            let seconds = begun.elapsed().as_secs_f64();
            eprintln!(
                "{}{}: {:.1}% ({} of {} bytes per disk, {:.1} MiB/s)",
                kind.name(),
                if control == Control::Pause {
                    " (paused)"
                } else {
                    ""
                },
                100.0 * done as f64 / total.max(1) as f64,
                done,
                total,
                done as f64 / seconds / 1048576.0
            );
            last_line = Instant::now();
        }
    });
    bar.finish_and_clear();
    Ok(report?)
}
