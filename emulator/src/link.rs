//! The messages between a cluster's processes and the servers: agent ↔ server
//! and agent ↔ driver. Each message is one length-delimited frame (a 4-byte
//! big-endian length, then JSON; at most [`MAX_FRAME_BYTES`]) over a Unix
//! socket or loopback TCP. The first message each way is a hello carrying
//! [`PROTOCOL_VERSION`]; a peer with another version is refused with a message
//! saying so. Both sides send a heartbeat every [`HEARTBEAT`], so a peer that
//! died or hangs (SIGSTOP) is noticed within [`PEER_TIMEOUT`] even when its
//! socket stays open.
//!
//! Link faults (cut, delay) are data: the run's link book ([`book`]), applied
//! to an agent's link to its server by [`shape`] and to hosts' NBD links by
//! `crate::nbd::hook`.

pub mod book;
pub mod shape;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::domain::ProcessName;
use crate::persist::{ClusterState, TaskRecord};

/// The version of these messages.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// How often each side sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// A peer silent for this long is taken for gone.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1000);

/// Agent → server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToServer {
    /// Registration: "this agent exists to perform tasks for you".
    Register {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// Who.
        agent: ProcessName,
        /// Its process id.
        pid: u32,
    },
    /// The cluster's configuration and state, read from persistent data.
    Report {
        /// Its revision there.
        revision: u64,
        /// The data.
        state: Box<ClusterState>,
    },
    /// Where a task the server sent is.
    TaskUpdate {
        /// The task as persistent data holds it.
        task: Box<TaskRecord>,
    },
    /// Still here.
    Heartbeat,
}

/// Server → agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToAgent {
    /// Registration accepted.
    Registered {
        /// The server.
        server: ProcessName,
    },
    /// Registration refused, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// Carry out a task on the agent's cluster.
    RunTask {
        /// Its id.
        id: String,
        /// What to do.
        kind: String,
        /// Its arguments.
        args: serde_json::Value,
    },
    /// Still here.
    Heartbeat,
}

/// Agent → driver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToDriver {
    /// The agent is active.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// Who.
        agent: ProcessName,
    },
    /// Execute the task recorded under this id in persistent data.
    Execute {
        /// The task.
        id: String,
    },
    /// Still here.
    Heartbeat,
}

/// Driver → agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToAgentFromDriver {
    /// Hello accepted (or refused, with the reason).
    Welcome {
        /// Set when refused.
        refused: Option<String>,
    },
    /// The configuration or state changed; persistent data has it, at this
    /// revision (FIG. 3's broadcast).
    Changed {
        /// The new revision.
        revision: u64,
    },
    /// A task this agent issued moved on (progress, or its end); persistent
    /// data has it.
    TaskChanged {
        /// The task.
        id: String,
    },
    /// Still here.
    Heartbeat,
}

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket.
    #[error("link: {0}")]
    Io(#[from] std::io::Error),
    /// A frame that is not a message of ours.
    #[error("link: bad message: {0}")]
    Decode(#[from] serde_json::Error),
    /// The peer said nothing for too long.
    #[error("link: peer silent for {0:?}")]
    Silent(Duration),
    /// The peer closed the link.
    #[error("link: closed by the peer")]
    Closed,
}

/// The sending half of a split [`Link`].
pub type Sender<T> = futures_util::stream::SplitSink<Framed<T, LengthDelimitedCodec>, bytes::Bytes>;
/// The receiving half of a split [`Link`].
pub type Receiver<T> = futures_util::stream::SplitStream<Framed<T, LengthDelimitedCodec>>;

/// A framed link over any byte stream.
#[derive(Debug)]
pub struct Link<T> {
    framed: Framed<T, LengthDelimitedCodec>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Link<T> {
    /// Frames `io`.
    pub fn new(io: T) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME_BYTES)
            .new_codec();
        Self {
            framed: Framed::new(io, codec),
        }
    }

    /// Sends one message.
    pub async fn send<M: Serialize>(&mut self, message: &M) -> Result<(), LinkError> {
        let bytes = serde_json::to_vec(message)?;
        self.framed.send(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Receives one message, waiting at most [`PEER_TIMEOUT`].
    pub async fn receive<M: DeserializeOwned>(&mut self) -> Result<M, LinkError> {
        match tokio::time::timeout(PEER_TIMEOUT, self.framed.next()).await {
            Err(_) => Err(LinkError::Silent(PEER_TIMEOUT)),
            Ok(None) => Err(LinkError::Closed),
            Ok(Some(frame)) => Ok(serde_json::from_slice(&frame?)?),
        }
    }

    /// Splits the link into a sending and a receiving half.
    pub fn split(self) -> (Sender<T>, Receiver<T>) {
        self.framed.split()
    }
}

/// Watches a peer's silence on a link whose loop also sends heartbeats (so no
/// single receive waits long enough to time out): every message heard resets
/// it, and every heartbeat sent first checks it.
#[derive(Debug)]
pub struct Silence {
    last: std::time::Instant,
}

impl Silence {
    /// Heard from just now.
    pub fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
        }
    }

    /// The peer was heard from (whatever it said, passed through).
    pub fn hear<M>(&mut self, message: Result<M, LinkError>) -> Result<M, LinkError> {
        self.last = std::time::Instant::now();
        message
    }

    /// An error once the peer has been silent for [`PEER_TIMEOUT`].
    pub fn check(&self) -> Result<(), LinkError> {
        let silent = self.last.elapsed();
        if silent > PEER_TIMEOUT {
            return Err(LinkError::Silent(silent));
        }
        Ok(())
    }
}

impl Default for Silence {
    fn default() -> Self {
        Self::new()
    }
}

/// Encodes a message as a frame's bytes (for a split link's sending half).
pub fn encode<M: Serialize>(message: &M) -> Result<bytes::Bytes, LinkError> {
    Ok(serde_json::to_vec(message)?.into())
}

/// Receives one message from a split link's receiving half, waiting at most
/// [`PEER_TIMEOUT`].
pub async fn receive_from<S, M>(stream: &mut S) -> Result<M, LinkError>
where
    S: futures_util::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
    M: DeserializeOwned,
{
    match tokio::time::timeout(PEER_TIMEOUT, stream.next()).await {
        Err(_) => Err(LinkError::Silent(PEER_TIMEOUT)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(frame)) => Ok(serde_json::from_slice(&frame?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_cross_a_link_and_silence_is_noticed() {
        let (a, b) = tokio::io::duplex(4096);
        let (mut a, mut b) = (Link::new(a), Link::new(b));
        a.send(&ToDriver::Execute { id: "t1".into() })
            .await
            .expect("send");
        match b.receive::<ToDriver>().await.expect("receive") {
            ToDriver::Execute { id } => assert_eq!(id, "t1"),
            other => panic!("unexpected {other:?}"),
        }
        let started = std::time::Instant::now();
        assert!(matches!(
            b.receive::<ToDriver>().await,
            Err(LinkError::Silent(_))
        ));
        assert!(started.elapsed() >= PEER_TIMEOUT);
        drop(a);
        assert!(matches!(
            b.receive::<ToDriver>().await,
            Err(LinkError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_an_error_not_an_allocation() {
        use tokio::io::AsyncWriteExt;
        let (mut raw, b) = tokio::io::duplex(64);
        let mut b = Link::new(b);
        let writer = tokio::spawn(async move {
            let _ = raw.write_all(&(u32::MAX).to_be_bytes()).await;
            raw
        });
        assert!(matches!(
            b.receive::<ToDriver>().await,
            Err(LinkError::Io(_))
        ));
        drop(writer.await);
    }
}
