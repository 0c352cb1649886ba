//! `emulator serve`: one image, or every volume of an array, over NBD until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use controllers::array::Array;
use disk_images::{Access, DiskImage};

use controllers::volume::Volumes;

use crate::nbd::export::{Catalog, Export, ExportSet};
use crate::nbd::server::{self, ListenAddress, Listener, ServerConfig};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["image", "array"])))]
pub(super) struct ServeArgs {
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
        let volumes = Volumes::new(dir, Arc::clone(array.engine()));
        return Ok(Catalog::array(volumes));
    }
    let path = args.image.as_ref().context("pass --image or --array")?;
    let access = if args.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let image = DiskImage::open(path, access)?;
    let name = match &args.export {
        Some(name) => name.clone(),
        None => path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .context("cannot derive an export name from the image path; pass --export")?,
    };
    if name.len() > crate::nbd::proto::MAX_STRING_LEN || name.contains('\0') {
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

pub(super) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let exports = exports_for(&args)?;
    let address = match args.socket {
        Some(path) => ListenAddress::Unix(path),
        None => ListenAddress::Tcp(args.listen),
    };
    let config = ServerConfig {
        max_connections: args.max_connections as usize,
        link: None,
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
