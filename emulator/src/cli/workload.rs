//! `emulator workload run|verify`: the write oracle's command line (the work
//! is `crate::workload`'s).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use crate::workload::record::Record;
use crate::workload::{self, RunConfig, RunSummary, VerifyReport};

#[derive(Debug, Subcommand)]
pub(super) enum WorkloadCommand {
    /// Write, flush and read back at random through NBD for a while, recording
    /// every write and acknowledgement; reconnects (round robin over --uri) when
    /// the connection dies. Exit 1 if a read-back found other data than the last
    /// acknowledged write.
    Run {
        /// Export URI: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
        /// Repeat for the URIs to fail over to.
        #[arg(long = "uri", required = true)]
        uris: Vec<String>,
        /// Seed of the content and of every random choice.
        #[arg(long)]
        seed: u64,
        /// How long to run, e.g. 30s, 500ms, 2m.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        duration: Duration,
        /// Requests in flight.
        #[arg(long = "qd", default_value_t = 16)]
        queue_depth: usize,
        /// Every K-th write is sent with FUA (0: none).
        #[arg(long, default_value_t = 0)]
        fua_every: u64,
        /// A FLUSH after every K writes (0: only the final FLUSH).
        #[arg(long, default_value_t = 32)]
        flush_every: u64,
        /// Block size in bytes (a power of two, at least 512).
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Longest write or read-back, in blocks.
        #[arg(long, default_value_t = 16)]
        max_blocks: u32,
        /// How long to keep trying to connect (at start, and after the
        /// connection dies) before giving up.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        reconnect_timeout: Duration,
        /// How long a request may wait for its reply before the connection is
        /// taken for dead (and reconnected).
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        request_timeout: Duration,
        /// The volume's system may lose power during the run (`emulator
        /// fault inject power-loss`): after a reconnect, read-backs accept
        /// that writes not yet durable (no FUA, no acknowledged FLUSH since)
        /// hold older data. Without it every acknowledged write must read
        /// back, as after a killed process. `workload verify` checks the
        /// durable ones either way.
        #[arg(long)]
        power_loss: bool,
        /// The record file to create (JSON lines; must not exist).
        #[arg(long)]
        record: PathBuf,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Read every block a record wrote and check that no durable write was
    /// lost. Exit 1 if one was.
    Verify {
        /// Export URI.
        #[arg(long)]
        uri: String,
        /// The record of `workload run`.
        #[arg(long)]
        record: PathBuf,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `30s`, `500ms`, `2m`, `1h` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 7.0 * 86400.0 {
        return Err(format!(
            "{text:?}: a duration must be positive and at most a week"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub(super) fn run(command: WorkloadCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match command {
        WorkloadCommand::Run {
            uris,
            seed,
            duration,
            queue_depth,
            fua_every,
            flush_every,
            block_size,
            max_blocks,
            reconnect_timeout,
            request_timeout,
            power_loss,
            record,
            json,
        } => {
            let config = RunConfig {
                uris,
                seed,
                duration,
                queue_depth,
                fua_every,
                flush_every,
                block_size,
                max_blocks,
                reconnect_timeout,
                request_timeout,
                record,
                power_cuts: power_loss
                    .then(|| std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1))),
            };
            let summary = runtime.block_on(workload::run(config))?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print_run(&summary);
            }
            if summary.mismatches > 0 {
                return Ok(ExitCode::from(1));
            }
            if let Some(why) = &summary.gave_up {
                eprintln!("emulator: error: {why}");
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkloadCommand::Verify { uri, record, json } => {
            let parsed = Record::read(&record)?;
            if parsed.torn_last_line {
                tracing::warn!(
                    record = %record.display(),
                    "the record's last line is cut short (its writer was killed): ignored"
                );
            }
            let report = runtime
                .block_on(workload::verify(&parsed, &uri))
                .with_context(|| format!("verifying {} against {uri}", record.display()))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_verify(&report);
            }
            Ok(if report.lost_blocks > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn print_run(summary: &RunSummary) {
    println!("seed:            {}", summary.seed);
    println!("record:          {}", summary.record.display());
    println!(
        "writes:          {} sent, {} acked, {} failed, {} with FUA",
        summary.writes_sent, summary.writes_acked, summary.writes_failed, summary.fua_writes
    );
    println!(
        "flushes:         {} sent, {} acked, {} failed (final flush {})",
        summary.flushes_sent,
        summary.flushes_acked,
        summary.flushes_failed,
        if summary.final_flush_acked {
            "acknowledged"
        } else {
            "NOT acknowledged"
        }
    );
    println!(
        "read-backs:      {} ({} failed), {} blocks checked, {} mismatches",
        summary.reads, summary.reads_failed, summary.blocks_checked, summary.mismatches
    );
    for mismatch in &summary.mismatch_details {
        println!(
            "  MISMATCH at offset {} (block {}): expected write {}, found {}",
            mismatch.offset, mismatch.block, mismatch.expected_seq, mismatch.found
        );
    }
    let stalls: Vec<String> = summary
        .stalls_ms
        .iter()
        .map(|ms| format!("{ms:.1}"))
        .collect();
    println!(
        "reconnects:      {} (stalls ms: [{}], max {:.1})",
        summary.reconnects,
        stalls.join(", "),
        summary.stall_ms_max
    );
    println!(
        "rate:            {:.0} IOPS, {:.1} MiB/s over {:.1} s",
        summary.iops,
        summary.mib_per_s,
        summary.elapsed_ms / 1000.0
    );
}

fn print_verify(report: &VerifyReport) {
    if report.torn_last_line {
        println!("record:          last line cut short (writer killed), ignored");
    }
    println!(
        "writes:          {} in the record, {} acked, {} durable",
        report.writes, report.writes_acked, report.writes_durable
    );
    println!("blocks checked:  {}", report.blocks_checked);
    println!(
        "durable blocks:  {} ({} hold their last durable write, {} a later undurable one)",
        report.durable_blocks,
        report.blocks_holding_durable,
        report.blocks_with_later_undurable_content
    );
    if report.blocks_torn_by_undurable_writes > 0 {
        println!(
            "torn blocks:     {} (durable bytes mixed with a later write's, cut short)",
            report.blocks_torn_by_undurable_writes
        );
    }
    println!(
        "no durable write: {} blocks (anything allowed)",
        report.blocks_without_durable_write
    );
    println!("lost blocks:     {}", report.lost_blocks);
    for range in &report.lost_ranges {
        println!(
            "  LOST offset {} length {} ({} blocks)",
            range.offset, range.length, range.block_count
        );
        for block in &range.blocks {
            let how = match block.expected.durable {
                Some(workload::record::Durability::Fua) => "FUA".to_owned(),
                Some(workload::record::Durability::Flush(id)) => format!("flush {id}"),
                None => "not durable".to_owned(),
            };
            println!(
                "    block {} at {}: expected write {} (durable by {how}){}, found {}",
                block.block,
                block.offset,
                block.expected.seq,
                if block.later_writes.is_empty() {
                    String::new()
                } else {
                    format!(" or a later one {:?}", block.later_writes)
                },
                block.found
            );
        }
        if range.more_blocks > 0 {
            println!("    … and {} more blocks", range.more_blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }
}
