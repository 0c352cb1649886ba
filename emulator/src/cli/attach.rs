//! `emulator attach`: a volume on a Linux host's `/dev/nbdN`, kept attached
//! across controller failover (see [`crate::attach`]).

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::attach::{self, AttachOptions};
use crate::workload::client::NbdUri;

/// Arguments of `emulator attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Where the volume is served (nbd://HOST:PORT/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH); after a lost connection the same URI
    /// is tried first (the surviving controller takes over the address), then
    /// the others in turn.
    #[arg(required = true)]
    uris: Vec<String>,
    /// The device (the nbd module loaded: `modprobe nbd`).
    #[arg(long, default_value = "/dev/nbd0")]
    device: String,
    /// Logical block size of the device.
    #[arg(long, default_value_t = 4096, value_parser = block_size)]
    block_size: u64,
    /// Seconds before a request without a reply is given up on its connection
    /// and sent again on the next one (what a request in flight when a
    /// controller dies waits at most).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Seconds the kernel holds requests while no connection is alive, and
    /// this command tries to reconnect, before I/O fails with EIO.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    dead_conn_timeout: u64,
}

fn block_size(text: &str) -> Result<u64, String> {
    match text {
        "512" | "1024" | "2048" | "4096" => Ok(text.parse().expect("listed")),
        _ => Err("one of 512, 1024, 2048, 4096".into()),
    }
}

pub(super) fn run(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let uris = args
        .uris
        .iter()
        .map(|uri| {
            uri.parse::<NbdUri>()
                .with_context(|| format!("bad URI {uri:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let device = args.device.clone();
    attach::run(
        AttachOptions {
            device: args.device,
            uris,
            block_size: args.block_size,
            timeout_s: args.timeout,
            dead_conn_timeout_s: args.dead_conn_timeout,
        },
        |uri, size| {
            println!("attached {device} to {uri} ({size} bytes); SIGTERM or Ctrl-C detaches");
        },
    )?;
    println!("detached {device}");
    Ok(ExitCode::SUCCESS)
}
