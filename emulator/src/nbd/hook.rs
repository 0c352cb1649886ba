//! The link-fault hook of one NBD address: what the link book
//! (`crate::link::book`) says of the hosts' links to it (`s0/c0/nbd`),
//! applied where connections are accepted, enter transmission and write
//! replies.
//!
//! - **Cut**: every connection open on the address is shut down (both
//!   directions: the client sees it die) and, while the cut stands, every
//!   new one is closed right after accept ([`NbdHook::refuses`]) or, if it
//!   was in its handshake, as it enters transmission ([`NbdHook::attach`]).
//! - **Delay**: every reply reaches the client `ms` later. A connection's
//!   [`Tap`] holds one word, the delay in force; a reply written while it is
//!   0 goes to the socket as before (that load is all the hook costs a
//!   reply while no fault stands). Otherwise the reply is copied into the
//!   connection's delay line, a thread that writes each chunk when it is
//!   due, in order; the connection's threads never wait for it. Once a
//!   connection's replies went through its line they keep doing so (with no
//!   delay once cleared), so replies never overtake each other.
//!
//! The server holds the hook of its address (`ServerConfig::link`); the
//! driver makes one per controller address and has each follow the link
//! book ([`NbdHook::follow`]), so a fault follows the address also when the
//! partner serves it after a takeover.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{send, shutdown, MsgFlags, Shutdown};
use tokio::sync::watch;

use crate::link::book::LinkState;

/// Set in a tap's word once its replies go through the delay line.
const ENGAGED: u64 = 1 << 63;

/// The hook of one NBD address.
#[derive(Debug)]
pub struct NbdHook {
    link: String,
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// The connections in transmission, by a number of this hook's.
    taps: Mutex<HashMap<u64, Arc<Tap>>>,
    next: AtomicU64,
}

impl NbdHook {
    /// The hook of the link named `link` (`s0/c0/nbd`), no fault standing.
    pub fn new(link: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            link: link.into(),
            cut: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            taps: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// The link's name.
    pub fn link(&self) -> &str {
        &self.link
    }

    /// Whether a connection just accepted is to be closed (a cut stands).
    pub fn refuses(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Applies `state`: a cut shuts every open connection down; a delay is
    /// put in every open connection's tap, and in those to come.
    pub fn apply(&self, state: LinkState) {
        let taps = self.taps.lock().unwrap_or_else(PoisonError::into_inner);
        self.cut.store(state.cut, Ordering::Release);
        let delay = state.delay_ms.min(ENGAGED - 1);
        self.delay_ms.store(delay, Ordering::Release);
        for tap in taps.values() {
            let _ = tap
                .word
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                    Some((word & ENGAGED) | delay)
                });
            if state.cut {
                tap.cut();
            }
        }
        if state.cut && !taps.is_empty() {
            tracing::warn!(link = %self.link, connections = taps.len(), "link cut: open NBD connections shut down");
        }
    }

    /// Applies the states `state` publishes, until its sender is gone.
    pub async fn follow(self: Arc<Self>, mut state: watch::Receiver<LinkState>) {
        loop {
            let now = *state.borrow_and_update();
            self.apply(now);
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// A connection entering transmission on `socket` (a handle of its
    /// own): its tap, registered until the [`Attached`] is dropped; None
    /// while a cut stands (the connection is to be closed).
    pub fn attach(self: &Arc<Self>, socket: OwnedFd) -> Option<Attached> {
        let mut taps = self.taps.lock().unwrap_or_else(PoisonError::into_inner);
        if self.cut.load(Ordering::Acquire) {
            return None;
        }
        let tap = Arc::new(Tap {
            word: AtomicU64::new(self.delay_ms.load(Ordering::Acquire)),
            socket,
            line: OnceLock::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        taps.insert(id, Arc::clone(&tap));
        Some(Attached {
            hook: Arc::clone(self),
            id,
            tap,
        })
    }
}

/// A connection's registration with its address's hook.
#[derive(Debug)]
pub struct Attached {
    hook: Arc<NbdHook>,
    id: u64,
    tap: Arc<Tap>,
}

impl Attached {
    /// The connection's tap.
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.hook
            .taps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// One connection's view of its hook: the delay in force, and its delay line.
#[derive(Debug)]
pub struct Tap {
    /// The delay (ms) | [`ENGAGED`].
    word: AtomicU64,
    socket: OwnedFd,
    line: OnceLock<Result<Line, io::ErrorKind>>,
}

/// A chunk of replies and when it is due (None: end the write direction).
type Due = (Instant, Option<Vec<u8>>);

/// The thread that writes a connection's delayed replies.
#[derive(Debug)]
struct Line {
    sender: mpsc::Sender<Due>,
}

impl Tap {
    /// Where a reply goes: None, to the socket as usual (no delay stands or
    /// ever stood on this connection); otherwise it went into the delay
    /// line, all of it (or the line failed: the client is gone).
    #[inline]
    pub fn divert(&self, buf: &[u8]) -> Option<io::Result<usize>> {
        let word = self.word.load(Ordering::Relaxed);
        if word == 0 {
            return None;
        }
        Some(self.delay(word, buf))
    }

    /// Ends the write direction after every delayed reply (None: the
    /// socket's own shutdown does it).
    pub fn finish(&self) -> Option<io::Result<()>> {
        if self.word.load(Ordering::Acquire) & ENGAGED == 0 {
            return None;
        }
        Some(self.push(Instant::now(), None))
    }

    #[cold]
    fn delay(&self, word: u64, buf: &[u8]) -> io::Result<usize> {
        if word & ENGAGED == 0 {
            self.word.fetch_or(ENGAGED, Ordering::AcqRel);
        }
        let due = Instant::now() + Duration::from_millis(word & !ENGAGED);
        self.push(due, Some(buf.to_vec()))?;
        Ok(buf.len())
    }

    fn push(&self, due: Instant, chunk: Option<Vec<u8>>) -> io::Result<()> {
        let line = self
            .line
            .get_or_init(|| Line::start(&self.socket).map_err(|err| err.kind()));
        match line {
            Ok(line) => line
                .sender
                .send((due, chunk))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the delay line ended")),
            Err(kind) => Err(io::Error::new(*kind, "cannot start the delay line")),
        }
    }

    fn cut(&self) {
        let _ = shutdown(self.socket.as_raw_fd(), Shutdown::Both);
    }
}

impl Line {
    fn start(socket: &OwnedFd) -> io::Result<Self> {
        let socket = socket.try_clone()?;
        let (sender, chunks) = mpsc::channel::<Due>();
        std::thread::Builder::new()
            .name("nbd-delay".into())
            .spawn(move || {
                for (due, chunk) in chunks {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let Some(mut bytes) = chunk.as_deref() else {
                        let _ = shutdown(socket.as_raw_fd(), Shutdown::Write);
                        return;
                    };
                    while !bytes.is_empty() {
                        match send(socket.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
                            Ok(count) => bytes = &bytes[count..],
                            Err(nix::errno::Errno::EINTR) => {}
                            // The client is gone: later pushes fail.
                            Err(_) => return,
                        }
                    }
                }
            })?;
        Ok(Self { sender })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn connection(hook: &Arc<NbdHook>) -> (Option<Attached>, UnixStream, UnixStream) {
        let (server, client) = UnixStream::pair().expect("pair");
        let fd = server.as_fd().try_clone_to_owned().expect("dup");
        (hook.attach(fd), server, client)
    }

    #[test]
    fn with_no_fault_replies_go_to_the_socket_and_a_cut_shuts_connections_and_refuses_new_ones() {
        let hook = NbdHook::new("s0/c0/nbd");
        let (attached, _server, mut client) = connection(&hook);
        let attached = attached.expect("attached");
        assert!(attached.tap().divert(b"reply").is_none());
        assert!(attached.tap().finish().is_none());
        assert!(!hook.refuses());
        hook.apply(LinkState {
            cut: true,
            delay_ms: 0,
        });
        let mut buffer = [0u8; 4];
        assert_eq!(client.read(&mut buffer).expect("read"), 0, "shut down");
        assert!(hook.refuses());
        assert!(connection(&hook).0.is_none(), "refused while cut");
        hook.apply(LinkState::default());
        assert!(connection(&hook).0.is_some(), "accepted once cleared");
    }

    #[test]
    fn a_delay_holds_replies_back_in_order_and_stays_in_the_line_after_it_is_cleared() {
        let hook = NbdHook::new("s0/c0/nbd");
        let (attached, _server, mut client) = connection(&hook);
        let tap = Arc::clone(attached.as_ref().expect("attached").tap());
        hook.apply(LinkState {
            cut: false,
            delay_ms: 100,
        });
        let started = Instant::now();
        assert_eq!(tap.divert(b"one,").expect("diverted").expect("ok"), 4);
        hook.apply(LinkState::default());
        // Cleared: still through the line (behind "one,"), with no delay.
        assert_eq!(tap.divert(b"two").expect("diverted").expect("ok"), 3);
        tap.finish().expect("engaged").expect("ok");
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"one,two");
        assert!(started.elapsed() >= Duration::from_millis(100));
        // A connection attached later never saw a delay: direct.
        let (later, _s, _c) = connection(&hook);
        assert!(later.expect("attached").tap().divert(b"x").is_none());
    }
}
