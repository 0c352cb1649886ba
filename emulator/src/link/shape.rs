//! The fault layer of a message link: a connection whose bytes pass through
//! a pump that applies the link's [`LinkState`] from the link book
//! (`super::book`), the way `tc netem` sits under a network interface.
//!
//! [`connect`] waits while the link is cut (no attempt is made, so none is
//! counted against a retry budget), connects, and hands back one end of an
//! in-process duplex pipe; a task pumps bytes between the other end and the
//! socket, each direction through a delay line (a chunk read at `t` is
//! written at `t + delay`, in order, without holding back the next read).
//! A cut standing or arriving closes both: the peer sees the socket closed,
//! the user of the link sees end-of-file. The cost when no fault stands is a
//! copy of each (small, control-plane) message through the pipe.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::book::LinkState;
use super::MAX_FRAME_BYTES;

/// The stream a shaped link is used through.
pub type Shaped = DuplexStream;

/// The in-process pipe holds a whole frame either way, so neither side
/// waits on the other while writing one.
const PIPE_BYTES: usize = 2 * MAX_FRAME_BYTES;
const CHUNK_BYTES: usize = 64 * 1024;

/// Waits until `state` is not cut (at once when it is not).
pub async fn wait_open(state: &mut watch::Receiver<LinkState>) {
    if state.borrow().cut {
        tracing::info!("link cut: waiting for the cut to be cleared");
    }
    // An error means the watcher is gone: no more changes, use the link.
    let _ = state.wait_for(|now| !now.cut).await;
}

/// Connects to `socket` through the fault layer of the link `state`
/// follows: waits while it is cut, then connects.
pub async fn connect(
    socket: &Path,
    mut state: watch::Receiver<LinkState>,
) -> std::io::Result<Shaped> {
    wait_open(&mut state).await;
    let stream = UnixStream::connect(socket).await?;
    Ok(shape(stream, state))
}

/// Puts `stream` under the link state `state` follows.
pub fn shape<S>(stream: S, state: watch::Receiver<LinkState>) -> Shaped
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (user, inner) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(pump(stream, inner, state));
    user
}

async fn pump<S>(stream: S, inner: DuplexStream, mut state: watch::Receiver<LinkState>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (socket_in, socket_out) = tokio::io::split(stream);
    let (user_in, user_out) = tokio::io::split(inner);
    let outgoing = direction(user_in, socket_out, state.clone());
    let incoming = direction(socket_in, user_out, state.clone());
    let cut = async {
        if state.wait_for(|now| now.cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(outgoing, incoming) } => {}
        _ = cut => tracing::warn!("link cut: connection closed"),
    }
    // Dropping both ends closes the socket and the pipe.
}

/// One direction: chunks read from `from` are stamped with when they are due
/// and written to `to` then. End-of-file (or an error) is passed on as a
/// shutdown of `to`, also in its turn.
async fn direction<R, W>(mut from: R, mut to: W, state: watch::Receiver<LinkState>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (line, mut due) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let read = async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            let read = from.read(&mut buffer).await;
            let delay = Duration::from_millis(state.borrow().delay_ms);
            let chunk = match read {
                Ok(0) | Err(_) => None,
                Ok(count) => Some(buffer[..count].to_vec()),
            };
            let end = chunk.is_none();
            if line.send((Instant::now() + delay, chunk)).is_err() || end {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            let written = match chunk {
                Some(bytes) => to.write_all(&bytes).await,
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            };
            if written.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_pair(state: watch::Receiver<LinkState>) -> (Shaped, DuplexStream) {
        let (near, far) = tokio::io::duplex(4096);
        (shape(near, state), far)
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_a_delay_holds_each_chunk_back() {
        let (set, state) = watch::channel(LinkState::default());
        let (mut user, mut far) = echo_pair(state).await;
        user.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        set.send_replace(LinkState {
            cut: false,
            delay_ms: 150,
        });
        let started = std::time::Instant::now();
        far.write_all(b"pong").await.expect("write");
        user.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"pong");
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_cut_closes_both_ends_and_connect_waits_while_it_stands() {
        let (set, state) = watch::channel(LinkState::default());
        let (mut user, mut far) = echo_pair(state.clone()).await;
        set.send_replace(LinkState {
            cut: true,
            delay_ms: 0,
        });
        let mut buffer = [0u8; 8];
        let bound = Duration::from_secs(5);
        let user_end = tokio::time::timeout(bound, user.read(&mut buffer))
            .await
            .expect("closed within the bound");
        assert!(matches!(user_end, Ok(0) | Err(_)), "{user_end:?}");
        let far_end = tokio::time::timeout(bound, far.read(&mut buffer))
            .await
            .expect("closed within the bound");
        assert!(matches!(far_end, Ok(0) | Err(_)), "{far_end:?}");
        // While cut, connect does not even try; cleared, it goes on.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let attempt = tokio::spawn(async move { connect(&path, state).await });
        let early = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(early.is_err(), "no connection while the cut stands");
        set.send_replace(LinkState::default());
        let (_accepted, _) = tokio::time::timeout(bound, listener.accept())
            .await
            .expect("connected after the clear")
            .expect("accept");
        attempt.await.expect("join").expect("connect");
    }
}
