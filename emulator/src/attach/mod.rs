//! `emulator attach`: attaches a volume to a Linux host's `/dev/nbdN` through
//! the kernel's NBD netlink interface, and keeps it attached across a
//! controller failover.
//!
//! Why not `nbd-client -persist`: Debian's nbd-client (3.24) configures
//! netlink devices without a dead-connection timeout and leaves, so when the
//! server's connection dies every request fails with EIO and ext4 on top of it
//! aborts its journal; in its older ioctl mode the device is torn down and
//! built again, failing the requests in between too (NetworkBlockDevice/nbd
//! issues #93 and #95). The kernel itself can ride through: a device connected
//! over netlink with `NBD_ATTR_DEAD_CONN_TIMEOUT` holds new requests while no
//! connection is alive, a request timeout (`NBD_ATTR_TIMEOUT`) requeues the
//! ones that were in flight on the dead connection, and `NBD_CMD_RECONFIGURE`
//! hands it a new socket. This command does the userspace half:
//!
//! 1. connect to the first URI that answers, negotiate the export (the NBD
//!    handshake happens here, in userspace), and `NBD_CMD_CONNECT` the device
//!    with the socket;
//! 2. wait for the kernel's `NBD_CMD_LINK_DEAD` notice (multicast in the nbd
//!    family's group) for this device: it comes once the kernel has marked the
//!    connection dead (the server closed it, or a request timed out), which
//!    is when it takes a new socket;
//! 3. then connect again, to the same address first (after a failover the
//!    surviving controller serves the dead one's address) and then the other
//!    URIs in turn, check the export is the same size, and
//!    `NBD_CMD_RECONFIGURE` the device with the new socket;
//! 4. on SIGTERM or SIGINT, `NBD_CMD_DISCONNECT` the device and exit 0.

pub mod netlink;

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use netlink::{cmd, DeviceConfig, NbdNetlink};

use crate::workload::client::{self, NbdUri};

/// Why attaching failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The device name is not `/dev/nbdN`.
    #[error("{0:?} is not an NBD device (expected /dev/nbdN)")]
    Device(String),
    /// The netlink interface refused.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// No URI could be connected in time.
    #[error("could not connect to any of {uris} within {seconds} s; last error: {last}")]
    Connect {
        /// The URIs tried.
        uris: String,
        /// How long it tried.
        seconds: u64,
        /// The last error.
        last: String,
    },
    /// The local runtime or a signal handler.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What `attach` is asked to do.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// `/dev/nbdN`.
    pub device: String,
    /// Where the volume is served, tried in order.
    pub uris: Vec<NbdUri>,
    /// The device's logical block size.
    pub block_size: u64,
    /// Request timeout, seconds.
    pub timeout_s: u64,
    /// How long the kernel holds requests with no live connection, seconds;
    /// also how long a reconnection is tried.
    pub dead_conn_timeout_s: u64,
}

/// The device index of `/dev/nbdN`.
pub fn device_index(device: &str) -> Result<u32, AttachError> {
    device
        .strip_prefix("/dev/nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| AttachError::Device(device.to_string()))
}

/// A negotiated connection: the socket, the export's size and flags.
struct Connected {
    socket: OwnedFd,
    size: u64,
    flags: u16,
    uri: String,
}

/// Connects to `uri` and negotiates its export; the socket is left blocking,
/// as the kernel wants it.
async fn connect(uri: &NbdUri) -> Result<Connected, client::ClientError> {
    let (socket, size, flags) = client::connect_raw(uri).await?;
    Ok(Connected {
        socket,
        size,
        flags,
        uri: uri.to_string(),
    })
}

/// Tries `uris` in turn, starting at `first`, with a growing pause between
/// rounds, until one negotiates or `deadline`.
async fn connect_any(
    uris: &[NbdUri],
    first: usize,
    deadline: Instant,
    size: Option<u64>,
) -> Result<(usize, Connected), String> {
    let mut pause = Duration::from_millis(10);
    let mut last = String::from("nothing tried");
    loop {
        for step in 0..uris.len() {
            let at = (first + step) % uris.len();
            match connect(&uris[at]).await {
                Ok(connected) if size.is_some_and(|size| size != connected.size) => {
                    last = format!(
                        "{} serves {} bytes, the device has {}: not the same volume",
                        connected.uri,
                        connected.size,
                        size.unwrap_or_default()
                    );
                    tracing::warn!("{last}");
                }
                Ok(connected) => return Ok((at, connected)),
                Err(err) => {
                    tracing::debug!(uri = %uris[at], %err, "cannot connect");
                    last = err.to_string();
                }
            }
        }
        if Instant::now() + pause > deadline {
            return Err(last);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Attaches and keeps the device attached until SIGTERM or SIGINT. `ready`
/// is called once the device is connected (the CLI prints a line).
pub fn run(options: AttachOptions, ready: impl FnOnce(&str, u64)) -> Result<(), AttachError> {
    let index = device_index(&options.device)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| AttachError::Io {
            what: "start the runtime",
            source,
        })?;
    runtime.block_on(attach(options, index, ready))
}

async fn attach(
    options: AttachOptions,
    index: u32,
    ready: impl FnOnce(&str, u64),
) -> Result<(), AttachError> {
    use tokio::signal::unix::{signal, SignalKind};
    let signal_error = |source| AttachError::Io {
        what: "install a signal handler",
        source,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let netlink_error = |what: String| move |source| AttachError::Netlink { what, source };
    let mut netlink =
        NbdNetlink::open().map_err(netlink_error("open the nbd netlink family".into()))?;
    // Joined before the device is connected, so no notice can be missed.
    let notices = std::sync::Arc::new(
        netlink
            .link_dead_notices()
            .map_err(netlink_error("join the nbd multicast group".into()))?,
    );
    let patience = Duration::from_secs(options.dead_conn_timeout_s.max(1));
    let all = options
        .uris
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let (mut at, mut current) = connect_any(&options.uris, 0, Instant::now() + patience, None)
        .await
        .map_err(|last| AttachError::Connect {
            uris: all.clone(),
            seconds: patience.as_secs(),
            last,
        })?;
    let size = current.size;
    let config = DeviceConfig {
        index,
        size,
        block_size: options.block_size,
        server_flags: u64::from(current.flags),
        timeout_s: options.timeout_s,
        dead_conn_timeout_s: options.dead_conn_timeout_s,
    };
    netlink
        .command(
            cmd::CONNECT,
            &netlink::connect_attrs(&config, current.socket.as_raw_fd()),
        )
        .map_err(netlink_error(format!("connect {}", options.device)))?;
    tracing::info!(device = %options.device, uri = %current.uri, size, "attached");
    ready(&current.uri, size);
    loop {
        // Wait for a link-dead notice in short slices, so a signal is seen
        // promptly.
        let watch = {
            let notices = std::sync::Arc::clone(&notices);
            tokio::task::spawn_blocking(move || notices.wait(index, Duration::from_millis(250)))
        };
        let lost = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            lost = watch => match lost {
                Ok(Ok(lost)) => lost,
                Ok(Err(source)) => return Err(AttachError::Netlink {
                    what: "read the nbd multicast group".into(),
                    source,
                }),
                Err(_) => false,
            },
        };
        if !lost {
            continue;
        }
        let since = Instant::now();
        tracing::warn!(uri = %current.uri, "connection lost; reconnecting");
        let deadline = since + patience;
        let (next, connected) = connect_any(&options.uris, at, deadline, Some(size))
            .await
            .map_err(|last| AttachError::Connect {
                uris: all.clone(),
                seconds: patience.as_secs(),
                last,
            })?;
        // The kernel takes the new socket in place of the dead one. (Our copy
        // of the old socket is closed here: the kernel has let go of it.)
        netlink
            .command(
                cmd::RECONFIGURE,
                &netlink::reconfigure_attrs(index, connected.socket.as_raw_fd()),
            )
            .map_err(netlink_error(format!(
                "give {} a new connection (was it detached?)",
                options.device
            )))?;
        tracing::warn!(
            uri = %connected.uri,
            after_ms = since.elapsed().as_millis() as u64,
            "reconnected"
        );
        at = next;
        current = connected;
    }
    tracing::info!(device = %options.device, "detaching");
    netlink
        .command(cmd::DISCONNECT, &netlink::disconnect_attrs(index))
        .map_err(netlink_error(format!("disconnect {}", options.device)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_index("/dev/nbd0").expect("nbd0"), 0);
        assert_eq!(device_index("/dev/nbd15").expect("nbd15"), 15);
        assert!(device_index("/dev/sda").is_err());
        assert!(device_index("/dev/nbdx").is_err());
    }
}
