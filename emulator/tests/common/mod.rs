//! Helpers for black-box tests of the `emulator` binary's NBD server: start the
//! real binary on a Unix socket, and speak raw protocol bytes to it over blocking
//! std sockets (every read has a timeout, so a hung server fails instead of hangs).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Every blocking read or write on a test socket gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the server may take to exit after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Size of the test image.
pub const IMAGE_SIZE: u64 = 16 * 1024 * 1024;
/// Export name the server is started with.
pub const EXPORT: &str = "wire-test";

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const C_FIXED_NEWSTYLE: u32 = 1;
pub const C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 0x1;
pub const FLAG_NO_HOLE: u16 = 0x2;
pub const FLAG_DF: u16 = 0x4;
pub const FLAG_REQ_ONE: u16 = 0x8;
pub const FLAG_FAST_ZERO: u16 = 0x10;

pub const CHUNK_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// Transmission flags of a writable export: HAS_FLAGS, SEND_FLUSH, SEND_FUA,
/// SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_CACHE, SEND_FAST_ZERO.
pub const TFLAGS_RW: u16 = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800;
/// Transmission flags of a read-only export: HAS_FLAGS, READ_ONLY, SEND_FLUSH,
/// SEND_FUA, CAN_MULTI_CONN, SEND_CACHE.
pub const TFLAGS_RO: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0100 | 0x0400;
/// Added once structured replies are negotiated.
pub const TFLAG_SEND_DF: u16 = 0x0080;

/// The largest READ/WRITE payload the server advertises.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// How the server is started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub read_only: bool,
    /// `EMULATOR_NBD_LARGE_WRITES` for the server: `workers`, `in-place` or
    /// `pieces` (unset: the server chooses by transport and CPU count).
    pub large_writes: Option<&'static str>,
}

/// A running `emulator serve` process on a private Unix socket. Dropping it sends
/// SIGTERM and waits (bounded), then kills.
#[derive(Debug)]
pub struct Server {
    dir: TempDir,
    socket: PathBuf,
    image: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_emulator")
}

impl Server {
    /// Starts a server on a fresh 16 MiB image and waits until it accepts.
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts a server with `options` and waits until it accepts.
    pub fn start_with(options: Options) -> Self {
        let mut server = Self::spawn(options);
        server.wait_ready(Duration::from_millis(50));
        server
    }

    /// Starts a server with `options` without waiting for it to listen.
    pub fn spawn(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("create temp dir");
        let image = dir.path().join("disk.img");
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("server.log");
        let created = Command::new(binary())
            .args(["image", "create"])
            .arg(&image)
            .args(["--size", "16MiB"])
            .output()
            .expect("run emulator image create");
        assert!(
            created.status.success(),
            "image create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .arg("--image")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .args(["--export", EXPORT])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create server log"));
        if options.read_only {
            command.arg("--read-only");
        }
        if let Some(mode) = options.large_writes {
            command.env("EMULATOR_NBD_LARGE_WRITES", mode);
        }
        let child = command.spawn().expect("spawn emulator serve");
        Self {
            dir,
            socket,
            image,
            log,
            child: Some(child),
        }
    }

    /// Polls connect until the server accepts, backing off up to `max_backoff`
    /// between attempts (zero: poll as fast as possible).
    pub fn wait_ready(&mut self, max_backoff: Duration) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut backoff = Duration::from_millis(1).min(max_backoff);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .expect("child present")
                .try_wait()
                .expect("poll server")
            {
                panic!(
                    "server exited with {status} before listening; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "server did not listen on {} within {START_TIMEOUT:?}; log:\n{}",
                self.socket.display(),
                self.log_text()
            );
            // Polling back-off, not synchronisation: readiness is the connect above.
            if backoff.is_zero() {
                std::thread::yield_now();
            } else {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }

    /// The image file served.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The temp dir (kept alive as long as the server).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new connection, with read and write timeouts.
    pub fn connect(&self) -> Conn {
        let stream = UnixStream::connect(&self.socket).expect("connect to server");
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .expect("set write timeout");
        Conn::new(stream)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child present").id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = self.child.as_ref().expect("child present").id();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
    }

    /// Waits (bounded) for the server to exit; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("poll server") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status (panics if the server does not exit in time).
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "server did not exit within {EXIT_TIMEOUT:?} of SIGTERM; log:\n{}",
                self.log_text()
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        if self.wait_exit(EXIT_TIMEOUT).is_none() {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log_text());
        }
    }
}

/// An option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// A complete reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// A simple reply (otherwise structured chunks).
    pub simple: bool,
    /// The error: the simple reply's field, or the first error chunk's value.
    pub error: u32,
    /// READ data assembled from the reply (zero-filled where holes were reported).
    pub data: Vec<u8>,
    /// The structured chunks, in arrival order.
    pub chunks: Vec<Chunk>,
}

impl Reply {
    /// The error value of a structured error chunk, checking its layout.
    pub fn chunk_error(chunk: &Chunk) -> u32 {
        assert!(
            chunk.kind == CHUNK_ERROR || chunk.kind == CHUNK_ERROR_OFFSET,
            "not an error chunk: {chunk:?}"
        );
        let p = &chunk.payload;
        assert!(p.len() >= 6, "error chunk too short: {chunk:?}");
        let error = be32(&p[0..4]);
        let message_len = usize::from(be16(&p[4..6]));
        let extra = if chunk.kind == CHUNK_ERROR_OFFSET {
            8
        } else {
            0
        };
        assert_eq!(
            p.len(),
            6 + message_len + extra,
            "error chunk length does not match its message length: {chunk:?}"
        );
        assert_ne!(error, 0, "error chunk with error 0");
        error
    }
}

pub fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes.try_into().expect("2 bytes"))
}

pub fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

pub fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("8 bytes"))
}

/// A request header.
pub fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

/// An INFO/GO payload.
pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// A LIST/SET_META_CONTEXT payload.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Deterministic non-zero test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

/// What a pending request expects back (needed to parse simple READ replies).
#[derive(Debug, Clone, Copy)]
struct Pending {
    command: u16,
    offset: u64,
    length: u32,
}

/// A client connection speaking raw NBD.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Reply>,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            structured: false,
            // Distinct bytes in every position catch byte-order mistakes.
            next_cookie: 0x0102_0304_0506_0000,
            pending: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    /// The raw stream.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to server");
    }

    pub fn recv(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream
            .read_exact(&mut buf)
            .unwrap_or_else(|err| panic!("read {len} bytes from server: {err}"));
        buf
    }

    pub fn recv_u16(&mut self) -> u16 {
        be16(&self.recv(2))
    }

    pub fn recv_u32(&mut self) -> u32 {
        be32(&self.recv(4))
    }

    pub fn recv_u64(&mut self) -> u64 {
        be64(&self.recv(8))
    }

    /// Asserts that the server closes the connection: the next read sees EOF (or a
    /// reset) rather than data or a timeout. Returns how long that took.
    pub fn expect_closed(&mut self) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Ok(0) => start.elapsed(),
            Ok(n) => panic!(
                "expected the server to close; got {n} bytes: {:02x?}",
                &buf[..n]
            ),
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => start.elapsed(),
            Err(err) => panic!("expected the server to close; read failed: {err}"),
        }
    }

    /// Reads and checks the greeting.
    pub fn greeting(&mut self) {
        let greeting = self.recv(18);
        assert_eq!(be64(&greeting[0..8]), NBD_MAGIC, "NBDMAGIC");
        assert_eq!(be64(&greeting[8..16]), IHAVEOPT, "IHAVEOPT");
        assert_eq!(be16(&greeting[16..18]), 0x0003, "handshake flags");
    }

    /// Greeting plus client flags.
    pub fn start_handshake(&mut self, client_flags: u32) {
        self.greeting();
        self.send(&client_flags.to_be_bytes());
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out);
    }

    pub fn recv_option_reply(&mut self) -> OptReply {
        let header = self.recv(20);
        assert_eq!(
            be64(&header[0..8]),
            OPTION_REPLY_MAGIC,
            "option reply magic in {header:02x?}"
        );
        let len = be32(&header[16..20]) as usize;
        assert!(len <= 1 << 20, "implausible option reply length {len}");
        OptReply {
            option: be32(&header[8..12]),
            kind: be32(&header[12..16]),
            data: self.recv(len),
        }
    }

    /// Reads replies to `option` until the final one (ACK or an error).
    pub fn recv_option_replies(&mut self, option: u32) -> Vec<OptReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.recv_option_reply();
            assert_eq!(reply.option, option, "reply echoes the option");
            let last = reply.kind == REP_ACK || reply.kind & 0x8000_0000 != 0;
            replies.push(reply);
            if last {
                return replies;
            }
            assert!(replies.len() < 64, "too many option replies: {replies:?}");
        }
    }

    /// Sends an option and returns all its replies.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        self.recv_option_replies(option)
    }

    /// Sends an option that must produce exactly one reply, and returns it.
    pub fn option_single(&mut self, option: u32, data: &[u8]) -> OptReply {
        let mut replies = self.option(option, data);
        assert_eq!(replies.len(), 1, "expected one reply: {replies:?}");
        replies.pop().expect("one reply")
    }

    /// Negotiates structured replies.
    pub fn structured_reply(&mut self) {
        let reply = self.option_single(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(reply.kind, REP_ACK, "STRUCTURED_REPLY: {reply:?}");
        self.structured = true;
    }

    /// GO for the test export; checks success and returns (size, flags).
    pub fn go(&mut self) -> (u64, u16) {
        let replies = self.option(OPT_GO, &info_payload(EXPORT, &[INFO_BLOCK_SIZE]));
        let last = replies.last().expect("a final reply");
        assert_eq!(last.kind, REP_ACK, "GO failed: {replies:?}");
        let export = replies
            .iter()
            .find(|r| r.kind == REP_INFO && be16(&r.data[0..2]) == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        (be64(&export.data[2..10]), be16(&export.data[10..12]))
    }

    /// Greeting, flags, optional structured replies (and base:allocation), GO.
    pub fn handshake(&mut self, structured: bool, base_allocation: bool) -> u16 {
        self.start_handshake(C_FIXED_NEWSTYLE | C_NO_ZEROES);
        if structured {
            self.structured_reply();
        }
        if base_allocation {
            let replies = self.option(
                OPT_SET_META_CONTEXT,
                &meta_payload(EXPORT, &["base:allocation"]),
            );
            assert_eq!(replies.len(), 2, "SET_META_CONTEXT: {replies:?}");
            assert_eq!(replies[1].kind, REP_ACK);
        }
        let (size, flags) = self.go();
        assert_eq!(size, IMAGE_SIZE);
        flags
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a request (with `payload` after it) without waiting; returns its cookie.
    pub fn submit(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.cookie();
        self.submit_with_cookie(cookie, flags, command, offset, length, payload);
        cookie
    }

    pub fn submit_with_cookie(
        &mut self,
        cookie: u64,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut out = request(flags, command, cookie, offset, length);
        out.extend_from_slice(payload);
        self.send(&out);
        let previous = self.pending.insert(
            cookie,
            Pending {
                command,
                offset,
                length,
            },
        );
        assert!(previous.is_none(), "cookie {cookie:#x} reused");
    }

    /// Reads messages until some request's reply is complete, and returns it.
    pub fn next_reply(&mut self) -> Reply {
        self.next_reply_or_eof()
            .expect("a reply, but the server closed the connection")
    }

    /// Like [`Conn::next_reply`], but `None` if the server closes the connection
    /// cleanly between messages (a close in the middle of one still fails).
    pub fn next_reply_or_eof(&mut self) -> Option<Reply> {
        loop {
            let mut first = [0u8; 1];
            match self.stream.read(&mut first) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return None,
                Err(err) => panic!("read reply from server: {err}"),
            }
            let mut magic = [0u8; 4];
            magic[0] = first[0];
            magic[1..].copy_from_slice(&self.recv(3));
            let magic = u32::from_be_bytes(magic);
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = self.recv_u32();
                    let cookie = self.recv_u64();
                    let pending = self
                        .pending
                        .remove(&cookie)
                        .unwrap_or_else(|| panic!("simple reply for unknown cookie {cookie:#x}"));
                    assert!(
                        !self.partial.contains_key(&cookie),
                        "simple reply after chunks for cookie {cookie:#x}"
                    );
                    let data = if error == 0 && pending.command == CMD_READ {
                        self.recv(pending.length as usize)
                    } else {
                        Vec::new()
                    };
                    return Some(Reply {
                        cookie,
                        simple: true,
                        error,
                        data,
                        chunks: Vec::new(),
                    });
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = self.recv_u16();
                    let kind = self.recv_u16();
                    let cookie = self.recv_u64();
                    let len = self.recv_u32() as usize;
                    assert!(
                        len <= MAX_PAYLOAD as usize + 64,
                        "implausible chunk length {len}"
                    );
                    let payload = self.recv(len);
                    let pending = *self
                        .pending
                        .get(&cookie)
                        .unwrap_or_else(|| panic!("chunk for unknown cookie {cookie:#x}"));
                    let reply = self.partial.entry(cookie).or_insert_with(|| Reply {
                        cookie,
                        simple: false,
                        error: 0,
                        data: if pending.command == CMD_READ {
                            vec![0u8; pending.length as usize]
                        } else {
                            Vec::new()
                        },
                        chunks: Vec::new(),
                    });
                    let chunk = Chunk {
                        flags,
                        kind,
                        payload,
                    };
                    match kind {
                        CHUNK_OFFSET_DATA => {
                            assert_eq!(pending.command, CMD_READ, "OFFSET_DATA for non-read");
                            let at = be64(&chunk.payload[0..8]);
                            let data = &chunk.payload[8..];
                            let start = (at - pending.offset) as usize;
                            reply.data[start..start + data.len()].copy_from_slice(data);
                        }
                        CHUNK_OFFSET_HOLE => {
                            assert_eq!(pending.command, CMD_READ, "OFFSET_HOLE for non-read");
                            assert_eq!(chunk.payload.len(), 12);
                        }
                        CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
                            let error = Reply::chunk_error(&chunk);
                            if reply.error == 0 {
                                reply.error = error;
                            }
                        }
                        CHUNK_NONE => assert!(chunk.payload.is_empty()),
                        _ => {}
                    }
                    reply.chunks.push(chunk);
                    if flags & CHUNK_FLAG_DONE != 0 {
                        self.pending.remove(&cookie);
                        return Some(self.partial.remove(&cookie).expect("partial reply"));
                    }
                }
                other => panic!("bad reply magic {other:#010x}"),
            }
        }
    }

    /// Sends a request and waits for its reply (no other request may be in flight).
    pub fn command(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.submit(flags, command, offset, length, payload);
        let reply = self.next_reply();
        assert_eq!(reply.cookie, cookie, "reply cookie");
        reply
    }

    /// Reads and checks the data came back successfully, in the form the session
    /// requires.
    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let reply = self.command(0, CMD_READ, offset, length, &[]);
        assert_eq!(reply.error, 0, "read {offset}+{length} failed: {reply:?}");
        assert_eq!(
            reply.simple, !self.structured,
            "READ reply form must match the negotiation: {reply:?}"
        );
        reply.data
    }

    /// Writes and checks success.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let reply = self.command(0, CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(reply.error, 0, "write {offset}+{} failed", data.len());
        assert!(reply.simple && reply.data.is_empty(), "{reply:?}");
    }

    /// Asserts a reply is an error with `errno`, in a form the session permits: a
    /// structured error chunk (with DONE) for READ under structured replies (and a
    /// simple reply never, then), else a simple reply or an error chunk.
    pub fn assert_error(&self, reply: &Reply, command: u16, errno: u32) {
        assert_eq!(reply.error, errno, "error value: {reply:?}");
        if reply.simple {
            assert!(
                !(self.structured && command == CMD_READ),
                "READ error must be an error chunk once structured replies are on: {reply:?}"
            );
        } else {
            assert!(self.structured, "chunk without structured replies");
            let last = reply.chunks.last().expect("a chunk");
            assert_eq!(last.flags & CHUNK_FLAG_DONE, CHUNK_FLAG_DONE);
            assert!(
                reply
                    .chunks
                    .iter()
                    .any(|c| c.kind == CHUNK_ERROR || c.kind == CHUNK_ERROR_OFFSET),
                "{reply:?}"
            );
            assert!(
                reply
                    .chunks
                    .iter()
                    .all(|c| c.kind != CHUNK_OFFSET_DATA && c.kind != CHUNK_OFFSET_HOLE),
                "an early error must not carry data: {reply:?}"
            );
        }
    }

    /// Sends a request expected to fail with `errno` and checks the reply.
    pub fn expect_error(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        errno: u32,
    ) {
        let reply = self.command(flags, command, offset, length, payload);
        self.assert_error(&reply, command, errno);
    }

    /// Requests sent whose replies have not been read completely.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sends NBD_CMD_DISC.
    pub fn disconnect(&mut self) {
        let cookie = self.cookie();
        self.send(&request(0, CMD_DISC, cookie, 0, 0));
    }
}
