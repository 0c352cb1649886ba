//! `emulator image create|info|verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use disk_images::{Access, DiskImage};

use super::units::{human, parse_size};

#[derive(Debug, Subcommand)]
pub(super) enum ImageCommand {
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

pub(super) fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
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
