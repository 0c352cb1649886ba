"""Durability and shutdown: what a client was told is done survives SIGKILL, and
SIGINT/SIGTERM stop the server in order (finish in-flight work, flush, exit 0).

Note: SIGKILL keeps the kernel page cache, so these tests prove the server holds
no acknowledged data in its own memory; they cannot prove fsync/msync ordering
against power loss."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import threading
import time

import nbd
import pytest

from bbhelpers import (
    CMD_READ,
    REQUEST_MAGIC,
    Closed,
    MiB,
    RawNBD,
    create_image,
    emulator,
    errno_of,
    nbd_connect,
    wait_until,
)

SIZE = 64 * MiB


def verify_clean(image):
    result = emulator("image", "verify", image)
    assert result.returncode == 0, result.describe()


@pytest.mark.parametrize("mode", ["fua", "flush"])
def test_acknowledged_writes_survive_sigkill(server, rng, mode):
    h = nbd_connect(server.uri())
    writes = []
    for _ in range(40):
        off = rng.randrange(0, SIZE - 300000)
        data = rng.randbytes(rng.randrange(1, 300000))
        writes.append((off, data))
    if mode == "fua":
        for off, data in writes:
            h.pwrite(data, off, nbd.CMD_FLAG_FUA)
    else:
        for off, data in writes:
            h.pwrite(data, off)
        h.flush()
    # Also some trims and zeroes, made durable the same way.
    h.trim(65536, 0, nbd.CMD_FLAG_FUA if mode == "fua" else 0)
    h.zero(5000, SIZE - 5000, nbd.CMD_FLAG_FUA if mode == "fua" else 0)
    if mode == "flush":
        h.flush()
    writes.append((0, bytes(65536)))
    writes.append((SIZE - 5000, bytes(5000)))
    server.kill9()
    del h
    # What is on disk right after the kill is consistent (data matches checksums).
    verify_clean(server.image)

    server.restart()  # same image, same socket path / port
    h = nbd_connect(server.uri())
    expected = bytearray(SIZE)
    for off, data in writes:
        expected[off: off + len(data)] = data
    for pos in range(0, SIZE, 8 * MiB):
        assert h.pread(8 * MiB, pos) == expected[pos: pos + 8 * MiB], f"mismatch in {pos}+8MiB"
    h.shutdown()
    server.stop_clean()
    verify_clean(server.image)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_with_idle_client_exits_zero(server, rng, sig):
    h = nbd_connect(server.uri())
    data = rng.randbytes(1 * MiB)
    h.pwrite(data, 4 * MiB)  # no flush: the server flushes on the way out
    server.signal(sig)
    assert server.wait_exit(timeout=10) == 0, server.log()
    # The idle connection was closed, not left hanging.
    with pytest.raises(nbd.Error):
        h.pread(16, 0)
    del h
    assert not server.connectable()
    if server.transport == "unix":
        assert not server.socket_path.exists(), "socket file left behind after a clean exit"
    verify_clean(server.image)
    server.restart()
    h = nbd_connect(server.uri())
    assert h.pread(len(data), 4 * MiB) == data
    h.shutdown()


def test_sigterm_during_negotiation_exits_zero(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri())  # stays in option haggling
    assert h.aio_is_negotiating()
    raw = RawNBD(server.raw_address())  # and one that never says anything
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0, server.log()
    raw.close()
    del h


def test_disc_with_outstanding_writes(server, rng):
    h = nbd_connect(server.uri())
    writes = []
    cookies = []
    for i in range(32):
        off = i * 256 * 1024 + rng.randrange(0, 4096)
        data = rng.randbytes(rng.randrange(1, 200000))
        writes.append((off, data))
        flags = nbd.CMD_FLAG_FUA if i % 4 == 0 else 0
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off, flags=flags))
    assert h.aio_in_flight() > 0
    h.shutdown()  # NBD_CMD_DISC queued behind the writes
    assert h.aio_in_flight() == 0
    assert all(h.aio_command_completed(c) for c in cookies)
    del h
    h = nbd_connect(server.uri())
    for off, data in writes:
        assert h.pread(len(data), off) == data
    h.shutdown()


def test_sigterm_under_load_keeps_every_acknowledged_write(serve, image, transport, rng):
    """A client streams writes; SIGTERM lands mid-stream. Whatever the server
    acknowledged must be in the image after it exits 0."""
    server = serve(image, transport)
    h = nbd_connect(server.uri())
    length = 32 * 1024
    slots = SIZE // length
    pending = {}
    acked = {}
    # Writes that failed, with the errno and whether SIGTERM had been sent.
    failed = []
    signalled = False
    order = list(range(slots))
    rng.shuffle(order)
    issued = 0

    def top_up():
        nonlocal issued
        while h.aio_in_flight() < 32 and issued < len(order):
            slot = order[issued]
            data = rng.randbytes(length)
            cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), slot * length)
            pending[cookie] = (slot, data)
            issued += 1

    def harvest():
        for cookie in list(pending):
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as exc:
                slot, _ = pending.pop(cookie)
                failed.append((slot, errno_of(exc), signalled, str(exc)))
                continue
            if done:
                slot, data = pending.pop(cookie)
                acked[slot] = data

    # Run until a good number of writes are acknowledged, then signal.
    top_up()
    deadline = time.monotonic() + 30
    while len(acked) < 200:
        assert time.monotonic() < deadline, f"only {len(acked)} writes acknowledged in 30s"
        h.poll(1000)
        harvest()
        top_up()
    assert not failed, f"writes failed before SIGTERM: {failed[:5]}"
    server.signal(signal.SIGTERM)
    signalled = True
    deadline = time.monotonic() + 30
    connection_ended = None
    try:
        while h.aio_in_flight() > 0:
            assert time.monotonic() < deadline, "requests neither answered nor failed after SIGTERM"
            h.poll(1000)
            harvest()
            top_up()
    except nbd.Error as exc:
        connection_ended = exc  # the server closed the connection: expected
    harvest()
    assert server.wait_exit() == 0, server.log()
    # After SIGTERM a write is answered ESHUTDOWN (read after the signal), or
    # fails because the connection closed under it (libnbd: ENOTCONN); nothing
    # else. A server failing writes with EIO cannot pass.
    unexpected = [f for f in failed if f[1] not in (errno.ESHUTDOWN, errno.ENOTCONN)]
    assert not unexpected, (
        f"writes failed after SIGTERM with errors other than ESHUTDOWN/ENOTCONN: {unexpected[:5]}"
        f" (connection ended: {connection_ended!r})"
    )
    del h
    verify_clean(image)
    with open(image, "rb") as f:
        for slot, data in acked.items():
            f.seek(slot * length)
            assert f.read(length) == data, f"acknowledged write to slot {slot} lost"


def _full_pipe():
    """A pipe whose buffer is full, so the first write to it blocks."""
    r, w = os.pipe()
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    for size in (65536, 4096, 1):
        while True:
            try:
                os.write(w, b"x" * size)
            except BlockingIOError:
                break
    fcntl.fcntl(w, fcntl.F_SETFL, flags)
    return r, w


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_ready_exits_zero(serve, tmp_path, transport, sig):
    """Regression: the socket used to accept connections before the SIGINT/SIGTERM
    handlers were installed, so a signal in that window killed the server
    (status -15/-2). Fixed in a6b6773 ("fix SIGTERM before handlers")."""
    image = create_image(tmp_path / "early.img", 4 * MiB)
    # The server's stderr is a full pipe: its first log line ("serving", written
    # after bind and before the signal handlers) blocks, holding the window open.
    r, w = _full_pipe()
    server = serve(image, transport, wait=False, stderr_fd=w)
    os.close(w)

    def drain():
        while os.read(r, 65536):
            pass

    drainer = threading.Thread(target=drain, daemon=True)
    try:
        server.learn_address()
        wait_until(server.connectable, 15, "the server to accept connections")
        server.signal(sig)
        drainer.start()  # now let the server get on with it
        rc = server.wait_exit()
        drainer.join(timeout=10)
    finally:
        server.expect_dead = True  # asserted below
        os.close(r)
    assert rc == 0, f"server ready for clients died from signal {sig!r}: exit status {rc}"


# -- known bugs ---------------------------------------------------------------------


def test_sigterm_answers_every_request_already_sent(serve, image, transport):
    server = serve(image, transport)
    # 1 GiB of replies: far more than any bounded reply queue plus socket buffers
    # hold, so however the server batches, it cannot have answered everything
    # before the signal (we read nothing until after it).
    count, length = 1000, 1 * MiB
    conn = RawNBD(server.raw_address())
    conn.connect_go()
    # All requests in one send (28 KB: fits the socket buffers).
    conn.sock.sendall(
        b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i + 1, (i * length) % SIZE, length)
            for i in range(count)
        )
    )
    server.signal(signal.SIGTERM)
    answered = 0
    errors = []
    try:
        for _ in range(count):
            err, _, data = conn.reply(length)
            if err == 0:
                assert data == bytes(length)
            elif err != errno.ESHUTDOWN:
                errors.append(err)
            answered += 1
    except Closed:
        pass
    conn.close()
    rc = server.wait_exit()
    server.expect_dead = True  # asserted here, not in the fixture
    assert rc == 0, server.log()
    assert not errors, f"unexpected errors {errors}"
    assert answered == count, (
        f"server closed the connection after answering {answered} of {count} requests "
        "it had been sent before SIGTERM"
    )


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs of its own (needs CAP_SYS_ADMIN: skipped, saying so, where
    mounting is not allowed)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_tmpfs_fails_the_write_with_enospc_and_the_server_keeps_serving(serve, small_tmpfs, rng):
    """Stores into a sparse image on tmpfs go through the mapping: a hole on a
    full tmpfs would kill the server with SIGBUS. The write must get ENOSPC,
    what was written before must read back, and a block never written reads
    as zeros."""
    image = create_image(small_tmpfs / "disk.img", 64 * MiB)
    server = serve(image)
    h = nbd_connect(server.uri())
    first = rng.randbytes(1 * MiB)
    h.pwrite(first, 0)
    h.flush()
    with pytest.raises(nbd.Error) as failed:
        for offset in range(1 * MiB, 64 * MiB, 1 * MiB):
            h.pwrite(rng.randbytes(1 * MiB), offset)
    assert errno_of(failed.value) == errno.ENOSPC, failed.value
    assert server.proc.poll() is None, "the server died"
    assert h.pread(len(first), 0) == first
    # A block never written, read on the full file system: zeros (a load from
    # a hole of the mapping would allocate a page: a SIGBUS).
    assert h.pread(4096, 63 * MiB) == bytes(4096)
    assert server.proc.poll() is None, "the server died reading a hole"
    h.shutdown()
    log = server.log()
    assert "No space left on device" in log, log[-2000:]
