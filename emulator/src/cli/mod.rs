//! The command line: clap's definitions of every command, what each prints
//! (tables, `--json`, progress bars on a terminal) and the exit status. The
//! work itself is the library's (`controller`, `nbd`, the lower crates); this
//! is the only module that uses `anyhow`, to put an error and its causes on one
//! line.
//!
//! Exit status: 0 success; 1 a check found problems (`image verify`, `array
//! scrub`, an unrecoverable rebuild); 2 bad input or any other error (with one
//! line on stderr naming what was wrong).

mod array;
mod attach;
mod domain;
mod fault;
mod image;
mod scenario;
mod serve;
pub mod units;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::controller::{TaskKind, DEFAULT_LEASE_MS};

/// Hardware-in-the-loop emulator of dual-controller storage systems.
#[derive(Debug, Parser)]
#[command(name = "emulator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a whole domain: server systems of two clusters each, every
    /// cluster with a driver and agents A and B, and domain servers A and B
    /// with their web consoles (the embedded default, or --config).
    Up(domain::UpArgs),
    /// Stop the domain running in a run directory, in order.
    Down {
        #[command(flatten)]
        run: domain::RunDirArg,
    },
    /// Show the domain as a server sees it: systems, clusters, processes,
    /// disks, volumes, registered agents.
    Status {
        #[command(flatten)]
        server: domain::ServerArg,
        /// Print JSON (the API's /api/v1/domain).
        #[arg(long)]
        json: bool,
    },
    /// Submit, show and list tasks through a domain server.
    #[command(subcommand)]
    Task(domain::TaskCommand),
    /// Start a process of the domain again after it was killed, e.g.
    /// s0/c1/agent-a, s0/c0/driver, s0/c0/server-a.
    Restart {
        #[command(flatten)]
        run: domain::RunDirArg,
        /// The process.
        name: String,
    },
    /// Create, inspect and verify disk images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Create, inspect, fail, replace, rebuild and scrub RAID arrays (also while
    /// they are being served).
    #[command(subcommand)]
    Array(array::ArrayCommand),
    /// Serve a disk image, or the volumes of an array, over NBD.
    Serve(serve::ServeArgs),
    /// The write oracle: a recorded random workload over NBD, and the check
    /// that no durable write was lost.
    #[command(subcommand)]
    Workload(workload::WorkloadCommand),
    /// Attach a volume to this Linux host's /dev/nbdN (kernel netlink) and keep
    /// it attached across controller failover: reconnects by itself and hands
    /// the kernel the new connection. Runs until SIGTERM or Ctrl-C.
    Attach(attach::AttachArgs),
    /// Inject, list and clear faults in a running domain (disks, processes).
    #[command(subcommand)]
    Fault(fault::FaultCommand),
    /// Run, check and list scenarios (scenarios/*.toml): a domain, faults,
    /// workloads and assertions, with a pass/fail report.
    #[command(subcommand)]
    Scenario(scenario::ScenarioCommand),
    /// The processes of a running domain (started by `up`).
    #[command(flatten)]
    Process(domain::ProcessCommand),
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
        #[arg(long, default_value_t = DEFAULT_LEASE_MS, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
        lease_ms: u64,
    },
}

/// Runs a parsed command line: logging to stderr (`RUST_LOG`, default
/// `info`), the command, and its exit status.
pub fn run(cli: Cli) -> ExitCode {
    // A scenario prints its own timeline: only errors are logged unless asked.
    let default_filter = match cli.command {
        Command::Scenario(_) => "error",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let outcome = match cli.command {
        Command::Up(args) => domain::up(args),
        Command::Down { run } => domain::down(run),
        Command::Status { server, json } => domain::status(server, json),
        Command::Task(command) => domain::task(command),
        Command::Restart { run, name } => domain::restart(run, name),
        Command::Process(command) => domain::process(command),
        Command::Image(command) => image::run(command),
        Command::Array(command) => array::run(command),
        Command::Serve(args) => serve::run(args),
        Command::Workload(command) => workload::run(command),
        Command::Attach(args) => attach::run(args),
        Command::Fault(command) => fault::run(command),
        Command::Scenario(command) => scenario::run(command),
        Command::Controller {
            dir,
            task,
            id,
            lease_ms,
        } => crate::controller::run_controller(&dir, task, id, lease_ms)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    match outcome {
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
