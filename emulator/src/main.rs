//! The `emulator` command line: image administration and the NBD server.
//!
//! Exit status: 0 success; 1 `image verify` found bad blocks; 2 bad input or any
//! other error (with one line on stderr naming what was wrong).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use controllers::array::{self, Array};
use controllers::raid::Level;
use disk_images::{Access, DiskImage};
use emulator::nbd::export::{ArrayVolumes, Catalog, Export, ExportSet};
use emulator::nbd::server::{self, ListenAddress, Listener, ServerConfig};
use emulator::tasks::{Adjust, StartOptions, TaskKind};
use emulator::units::parse_size;

/// Hardware-in-the-loop emulator of dual-controller storage systems.
#[derive(Debug, Parser)]
#[command(name = "emulator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect and verify disk images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create, inspect, fail, replace, rebuild and scrub RAID arrays (also while
    /// they are being served).
    #[command(subcommand)]
    Array(ArrayCommand),
    /// Serve a disk image, or the volumes of an array, over NBD.
    Serve(ServeArgs),
    /// One controller's share of an array task (started by `array rebuild|scrub`).
    #[command(hide = true)]
    Controller {
        /// Array directory.
        dir: PathBuf,
        /// Which task.
        #[arg(long, value_enum)]
        task: TaskKind,
        /// Controller id.
        #[arg(long)]
        id: u8,
        /// Lease length.
        #[arg(long, default_value_t = emulator::tasks::DEFAULT_LEASE_MS, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
        lease_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ArrayCommand {
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
struct AdjustArgs {
    /// Array directory.
    dir: PathBuf,
    /// Which task (default: the only one in progress).
    #[arg(long, value_enum)]
    task: Option<TaskKind>,
    /// Print the task's progress as JSON.
    #[arg(long)]
    json: bool,
    /// How long a cancel waits for a controller that stopped answering.
    #[arg(long, default_value_t = emulator::tasks::DEFAULT_LEASE_MS, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    lease_ms: u64,
}

#[derive(Debug, Args)]
struct TaskArgs {
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
    #[arg(long, default_value_t = emulator::tasks::DEFAULT_LEASE_MS, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    lease_ms: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LevelArg {
    Raid1,
    Raid5,
    Raid6,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Create a sparse raw image and its checksum file (PATH.crc).
    Create {
        /// Image file to create.
        path: PathBuf,
        /// Size, e.g. 1GiB, 256MiB, 4096 (a positive multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Overwrite an existing image and checksum file.
        #[arg(long)]
        force: bool,
    },
    /// Show an image's size, allocation and checksum file.
    Info {
        /// Image file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every block against its checksum; exit 1 if any is bad.
    Verify {
        /// Image file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["image", "array"])))]
struct ServeArgs {
    /// Image file to export.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Array directory whose volumes to export (one export per volume).
    #[arg(long, conflicts_with_all = ["export", "read_only"])]
    array: Option<PathBuf>,
    /// Export name (default: the image's file name without extension).
    #[arg(long)]
    export: Option<String>,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// TCP address to listen on.
    #[arg(long, conflicts_with = "socket", default_value = "127.0.0.1:10809")]
    listen: String,
    /// Unix socket path to listen on instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Connections served at once; further ones are refused.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("emulator: error: {}", describe(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, skipping a cause an outer message
/// already quotes (our errors often include their OS error in their own text).
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Image(command) => image_command(command),
        Command::Array(command) => array_command(command),
        Command::Controller {
            dir,
            task,
            id,
            lease_ms,
        } => {
            emulator::tasks::run_controller(&dir, task, id, lease_ms)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(args),
    }
}

fn image_command(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Create { path, size, force } => {
            let image = DiskImage::create(&path, size, force)?;
            println!(
                "created {} ({} bytes, {} blocks) with checksums in {}",
                path.display(),
                image.size(),
                image.size() / disk_images::BLOCK_BYTES as u64,
                disk_images::sidecar_path(&path).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Info { path, json } => {
            let info = DiskImage::open(&path, Access::ReadOnly)?.info()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("image:      {}", info.image.display());
                println!("checksums:  {}", info.sidecar.display());
                println!(
                    "size:       {} bytes ({})",
                    info.size_bytes,
                    human(info.size_bytes)
                );
                println!("block size: {} bytes", info.block_size);
                println!("blocks:     {}", info.block_count);
                println!(
                    "allocated:  {} bytes ({})",
                    info.allocated_bytes,
                    human(info.allocated_bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Verify { path, json } => verify(&path, json),
    }
}

fn verify(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let image = DiskImage::open(path, Access::ReadOnly)?;
    let blocks = image.size() / disk_images::BLOCK_BYTES as u64;
    let bar = indicatif::ProgressBar::new(blocks);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "verifying {bar:40} {pos}/{len} blocks {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = image.verify(|done| bar.set_position(done));
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for bad in &report.bad_blocks {
            println!(
                "bad block {} (byte offset {}): stored CRC {:#010x}, data has {:#010x}",
                bad.block, bad.offset, bad.expected_crc, bad.actual_crc
            );
        }
        println!(
            "{}: {} blocks checked, {} bad",
            path.display(),
            report.blocks_checked,
            report.bad_blocks.len()
        );
    }
    Ok(if report.bad_blocks.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn array_command(command: ArrayCommand) -> anyhow::Result<ExitCode> {
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
        ArrayCommand::VolumeCreate { dir, name, size } => {
            let volume = Array::open(&dir)?.create_volume(&name, size)?;
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
            let tasks = emulator::tasks::in_progress(&dir);
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
    let progress = emulator::tasks::adjust(&which.dir, which.task, adjust, which.lease_ms)?;
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
    let Some(report) = emulator::tasks::start(dir, kind, repair, &options)? else {
        return Ok(ExitCode::SUCCESS);
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match kind {
            TaskKind::Rebuild => println!(
                "rebuild of disk {} done: {} bytes, {} unrecoverable blocks",
                report.rebuilt_disk.unwrap_or_default(),
                report.bytes_per_disk,
                report.unrecoverable.len()
            ),
            TaskKind::Scrub => println!(
                "scrub done: {} rows checked, {} checksum errors, {} parity mismatches, {} repaired, {} unrecoverable",
                report.rows_checked,
                report.checksum_errors,
                report.parity_mismatches,
                report.repaired,
                report.unrecoverable.len()
            ),
        }
        for offset in &report.unrecoverable {
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
    let clean = report.unrecoverable.is_empty()
        && (kind == TaskKind::Rebuild
            || report.repair
            || (report.checksum_errors == 0 && report.parity_mismatches == 0));
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The exports `serve` offers: one image, or every volume of an array (as the
/// array's volumes are when each client connects).
fn exports_for(args: &ServeArgs) -> anyhow::Result<Catalog> {
    if let Some(dir) = &args.array {
        let array = Array::open(dir)?;
        if array.metadata().volumes.is_empty() {
            bail!(
                "array {} has no volumes to export; create one with `emulator array volume-create`",
                dir.display()
            );
        }
        let volumes = ArrayVolumes::new(dir, Arc::clone(array.engine()));
        return Ok(Catalog::array(volumes));
    }
    let path = args.image.as_ref().context("pass --image or --array")?;
    let access = if args.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let image = DiskImage::open(path, access)?;
    if !image.shares_locks() {
        tracing::warn!(
            image = %path.display(),
            "no cross-process block locks (is /dev/shm writable?): another process \
             serving this image at the same time could see spurious media errors"
        );
    }
    let name = match &args.export {
        Some(name) => name.clone(),
        None => path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .context("cannot derive an export name from the image path; pass --export")?,
    };
    if name.len() > emulator::nbd::proto::MAX_STRING_LEN || name.contains('\0') {
        bail!("export name must be at most 4096 bytes without NUL characters");
    }
    let export = Export {
        description: format!("{} ({} bytes)", path.display(), image.size()),
        name,
        device: Arc::new(image),
        read_only: args.read_only,
    };
    Ok(Catalog::fixed(
        ExportSet::new(vec![export]).map_err(anyhow::Error::msg)?,
    ))
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let exports = exports_for(&args)?;
    let address = match args.socket {
        Some(path) => ListenAddress::Unix(path),
        None => ListenAddress::Tcp(args.listen),
    };
    let config = ServerConfig {
        max_connections: args.max_connections as usize,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives once clients can connect must
        // already mean "shut down in order", never the default "die".
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let listener = Listener::bind(&address).await?;
        // One line on stdout for people and scripts: with port 0 it names the
        // port the system chose.
        println!("listening on {}", listener.local_address());
        std::io::Write::flush(&mut std::io::stdout())?;
        for export in exports.current().iter() {
            tracing::info!(
                export = %export.name,
                size = export.device.size(),
                read_only = export.read_only,
                address = %listener.local_address(),
                "serving"
            );
        }
        let shutdown = async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            }
        };
        server::run(listener, exports, config, shutdown).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
