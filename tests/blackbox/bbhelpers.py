"""Shared helpers for the black-box suite: running the emulator binary, managing
server processes, bounded waiting, image-file inspection and a minimal raw NBD
client for requests libnbd refuses to send.

Nothing here sleeps to synchronise: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK = 4096
KiB = 1024
MiB = 1024 * 1024
SIDECAR_HEADER = 64
ZERO_BLOCK_CRC = zlib.crc32(bytes(BLOCK))

# Generous bounds: these are upper limits, not delays.
STARTUP_TIMEOUT = 15.0
EXIT_TIMEOUT = 20.0
CMD_TIMEOUT = 60.0


def emulator_bin() -> Path:
    return Path(os.environ.get("EMULATOR_BIN", REPO_ROOT / "target" / "release" / "emulator"))


def wait_until(condition, timeout: float, what: str, interval: float = 0.005):
    """Polls `condition()` until it returns a truthy value or `timeout` passes.

    The short pause between polls only bounds CPU use; correctness never depends
    on it.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


class Threads:
    """Client threads whose every failure fails the test.

    `start(target, *args)` runs `target` in a thread; anything it raises (an
    assertion, an nbd.Error, a failed connect, an error while shutting a handle
    down) is kept with its traceback. `join(timeout)` waits for all of them and
    asserts that none hung and none failed, listing every failure.
    """

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def start(self, target, *args, name: str | None = None) -> threading.Thread:
        label = name or f"{getattr(target, '__name__', 'thread')}#{len(self.threads)}"

        def run():
            try:
                target(*args)
            except BaseException:  # noqa: BLE001 - every failure is reported by join()
                with self._lock:
                    self.failures.append(f"{label}: {traceback.format_exc()}")

        thread = threading.Thread(target=run, name=label, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float, threads=None):
        deadline = time.monotonic() + timeout
        for thread in threads if threads is not None else self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in (threads if threads is not None else self.threads) if t.is_alive()]
        assert not hung, f"client threads hung after {timeout}s: {hung}; failures so far: {self.failures}"
        if threads is None:
            self.check()

    def check(self):
        assert not self.failures, "client threads failed:\n" + "\n".join(self.failures)


@dataclass
class Result:
    args: list
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(map(str, self.args))}\nexit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def run(args, timeout: float = CMD_TIMEOUT, check: bool = False, **kwargs) -> Result:
    args = [str(a) for a in args]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check:
        assert result.returncode == 0, result.describe()
    return result


def emulator(*args, timeout: float = CMD_TIMEOUT, check: bool = False) -> Result:
    return run([emulator_bin(), *args], timeout=timeout, check=check)


def error_line(result: Result) -> str:
    """The single error line of a failed command (clap adds a usage hint after a
    blank line; anything else is counted)."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("For more information")
    ]
    assert len(lines) == 1, f"expected exactly one error line on stderr\n{result.describe()}"
    assert "error" in lines[0].lower(), result.describe()
    return lines[0]


def usage_error(result: Result) -> str:
    """Argument-parser (clap) errors: exit 2, stderr starting with "error:". clap
    follows it with a usage block, so this does not insist on a single line."""
    assert result.returncode == 2, result.describe()
    assert result.stderr.startswith("error:"), result.describe()
    return result.stderr


def create_image(path: Path, size: int) -> Path:
    emulator("image", "create", path, "--size", str(size), check=True)
    return path


def sidecar(path: Path) -> Path:
    return Path(str(path) + ".crc")


def snapshot(*paths: Path) -> dict:
    """Byte contents (or None if absent) of files, to prove nothing changed."""
    out = {}
    for p in paths:
        p = Path(p)
        out[str(p)] = p.read_bytes() if p.exists() else None
    return out


def corrupt_block(path: Path, block: int, rng, within: int = 0, length: int = 16) -> bytes:
    """Writes bytes that differ from the current ones into the raw image file
    (through the page cache, so a running server's shared mapping sees them).
    Returns the block's new contents."""
    offset = block * BLOCK + within
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        new = bytes(b ^ (rng.randrange(255) + 1) for b in old)  # every byte changes
        f.seek(offset)
        f.write(new)
        f.flush()
        f.seek(block * BLOCK)
        return f.read(BLOCK)


def stored_crc(path: Path, block: int) -> int:
    with open(sidecar(path), "rb") as f:
        f.seek(SIDECAR_HEADER + 4 * block)
        return struct.unpack("<I", f.read(4))[0]


# --------------------------------------------------------------------------
# Server processes


@dataclass
class Server:
    image: Path
    transport: str  # "unix" or "tcp"
    workdir: Path
    export: str | None = None
    read_only: bool = False
    max_connections: int | None = None
    extra: list = field(default_factory=list)
    env: dict | None = None
    proc: subprocess.Popen | None = None
    socket_path: Path | None = None
    port: int | None = None
    log_path: Path | None = None
    stderr_fd: int | None = None
    expect_dead: bool = False
    _counter = 0

    def args(self) -> list:
        args = [str(emulator_bin()), "serve"]
        if self.image is not None:  # None: the caller serves an array via `extra`
            args += ["--image", str(self.image)]
        if self.export is not None:
            args += ["--export", self.export]
        if self.read_only:
            args.append("--read-only")
        if self.max_connections is not None:
            args += ["--max-connections", str(self.max_connections)]
        if self.transport == "unix":
            if self.socket_path is None:
                Server._counter += 1
                self.socket_path = self.workdir / f"nbd{Server._counter}.sock"
            args += ["--socket", str(self.socket_path)]
        else:
            # Port 0 the first time: the server binds a port the system chose and
            # names it on stdout (no bind-release-rebind race); a restart reuses it.
            args += ["--listen", f"127.0.0.1:{self.port or 0}"]
        return args + list(self.extra)

    def start(self, wait: bool = True) -> "Server":
        Server._counter += 1
        self.log_path = self.workdir / f"server{Server._counter}.log"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        if self.env:
            env.update(self.env)
        stderr = self.stderr_fd if self.stderr_fd is not None else open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.args(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        if self.stderr_fd is None:
            stderr.close()
        self.expect_dead = False
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def connectable(self) -> bool:
        if self.transport == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = str(self.socket_path)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = ("127.0.0.1", self.port)
        s.settimeout(2)
        try:
            s.connect(target)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def listening_line(self) -> str:
        """The server's "listening on ADDRESS" line from its stdout (bounded wait).
        The pipe stays open: the server may print again."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise AssertionError(f"server printed no listening line in time\n{self.log()}")
                byte = os.read(self.proc.stdout.fileno(), 1)
                if not byte:
                    raise AssertionError(
                        f"server exited early with {self.proc.wait()}\n{self.log()}"
                    )
                line += byte
        text = line.decode()
        assert text.startswith("listening on "), text
        return text[len("listening on "):].strip()

    def learn_address(self):
        """Reads the listening line; for TCP, the port the server bound."""
        address = self.listening_line()
        if self.transport == "tcp":
            self.port = int(address.rsplit(":", 1)[1])

    def wait_ready(self):
        self.learn_address()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited early with {self.proc.returncode}\n{self.log()}"
                )
            return self.connectable()

        wait_until(ready, STARTUP_TIMEOUT, f"server on {self.address()} to accept connections")

    def address(self) -> str:
        return str(self.socket_path) if self.transport == "unix" else f"127.0.0.1:{self.port}"

    def uri(self, export: str | None = None) -> str:
        name = self.default_name() if export is None else export
        if self.transport == "unix":
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def default_name(self) -> str:
        return self.export if self.export is not None else self.image.stem

    def raw_address(self):
        if self.transport == "unix":
            return (socket.AF_UNIX, str(self.socket_path))
        return (socket.AF_INET, ("127.0.0.1", self.port))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"server did not exit within {timeout}s of being told to\n{self.log()}"
            )

    def stop(self) -> int:
        """SIGTERM and wait (bounded); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def stop_clean(self):
        rc = self.stop()
        assert rc == 0, f"server exited {rc} after SIGTERM, expected 0\n{self.log()}"

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT)
        self.expect_dead = True

    def restart(self) -> "Server":
        assert self.proc.poll() is not None
        return self.start()


# --------------------------------------------------------------------------
# libnbd helpers


def nbd_connect(uri: str, strict: bool = True, meta=(), opt_mode=False):
    import nbd

    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    for ctx in meta:
        h.add_meta_context(ctx)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


def errno_of(exc) -> int | None:
    """The errno of an nbd.Error as a number (the binding gives its name)."""
    value = getattr(exc, "errno", None)
    if isinstance(value, str):
        return getattr(errno, value, None)
    return value


def extents(h, length: int, offset: int, flags: int = 0):
    """base:allocation extents as [(offset, length, flags)]."""
    import nbd

    found = []

    def cb(metacontext, off, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        pos = off
        for i in range(0, len(entries), 2):
            found.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(length, offset, cb, flags)
    return found


def drain_aio(h, timeout: float = 30.0):
    """Runs libnbd's state machine until nothing is in flight (bounded)."""
    deadline = time.monotonic() + timeout
    while h.aio_in_flight() > 0:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{h.aio_in_flight()} commands still in flight after {timeout}s"
        h.poll(int(min(remaining, 1.0) * 1000))


# --------------------------------------------------------------------------
# A minimal raw NBD client (fixed newstyle), for what libnbd will not send.

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = 0x80000006, 0x80000009
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
TFLAG_HAS_FLAGS, TFLAG_READ_ONLY = 1, 2

CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE = 0, 1, 2
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 0x8001, 0x8002


class Closed(Exception):
    """The server closed the connection."""


class RawNBD:
    def __init__(self, address, timeout: float = 20.0):
        family, target = address
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(target)
        self.handshake_flags = None
        self.cookie = 0
        self.structured = False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise Closed(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def at_eof(self) -> bool:
        """True if the server has closed (reads EOF or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake
    def greeting(self, client_flags: int = 1) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (hex(magic), hex(opt))
        self.handshake_flags = flags
        self.sock.sendall(struct.pack(">I", client_flags))
        return flags

    def send_option(self, opt: int, data: bytes = b""):
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def option_replies(self, opt: int):
        """All replies to one option, up to and including the final one."""
        replies = []
        while True:
            got_opt, rtype, data = self.option_reply()
            assert got_opt == opt, (got_opt, opt)
            replies.append((rtype, data))
            if rtype == REP_ACK or rtype & 0x80000000:
                return replies

    @staticmethod
    def info_payload(name: str, requests=()) -> bytes:
        raw = name.encode()
        return (
            struct.pack(">I", len(raw))
            + raw
            + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests)
        )

    def go(self, name: str = "", requests=(), opt: int = OPT_GO):
        self.send_option(opt, self.info_payload(name, requests))
        return self.option_replies(opt)

    def connect_go(self, name: str = "", structured: bool = False):
        """Greeting, optional structured replies, GO. Returns (size, flags)."""
        self.greeting()
        if structured:
            self.send_option(OPT_STRUCTURED_REPLY)
            assert self.option_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        replies = self.go(name, [INFO_BLOCK_SIZE])
        assert replies[-1][0] == REP_ACK, replies
        for rtype, data in replies:
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
                self.structured = structured
                return size, flags
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    # -- transmission
    def send_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                     payload: bytes = b"", cookie: int | None = None,
                     magic: int = REQUEST_MAGIC) -> int:
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        self.sock.sendall(
            struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload
        )
        return cookie

    def reply_any(self, read_lengths: dict):
        """A reply to any outstanding request: (error, cookie, data). For simple
        replies the data length is looked up by cookie in `read_lengths`."""
        if self.structured:
            return self.reply()
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert cookie in read_lengths, f"reply for unknown cookie {cookie:#x}"
        length = read_lengths[cookie]
        return err, cookie, (self.recv_exact(length) if err == 0 and length else b"")

    def simple_reply(self, read_length: int = 0):
        """(error, cookie, data) of a simple reply; data only for a successful READ."""
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(read_length) if (err == 0 and read_length) else b""
        return err, cookie, data

    def structured_reply(self):
        """All chunks of one structured reply: (cookie, [(type, payload)], error)."""
        chunks = []
        cookie = None
        error = 0
        while True:
            magic = struct.unpack(">I", self.recv_exact(4))[0]
            if magic == SIMPLE_REPLY_MAGIC:
                err, ck = struct.unpack(">IQ", self.recv_exact(12))
                return ck, chunks, err
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, ctype, ck, length = struct.unpack(">HHQI", self.recv_exact(16))
            cookie = ck
            payload = self.recv_exact(length)
            chunks.append((ctype, payload))
            if ctype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            if flags & 1:
                return cookie, chunks, error

    def reply(self, read_length: int = 0):
        """(error, cookie, data) for either reply style."""
        if not self.structured:
            return self.simple_reply(read_length)
        cookie, chunks, error = self.structured_reply()
        data = b""
        for ctype, payload in chunks:
            if ctype == CHUNK_OFFSET_DATA:
                data += payload[8:]
        return error, cookie, data


def errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value))
