"""Transmission requests libnbd will not send, over a raw socket: unknown commands
and flags, bad magic, reply formats (structured errors for READ), cookies."""

from __future__ import annotations

import errno
import struct

import pytest

from bbhelpers import (
    BLOCK,
    CHUNK_ERROR,
    CHUNK_ERROR_OFFSET,
    CHUNK_NONE,
    CHUNK_OFFSET_DATA,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    FLAG_DF,
    MiB,
    RawNBD,
    corrupt_block,
    nbd_connect,
)

SIZE = 64 * MiB


@pytest.fixture(params=[False, True], ids=["simple", "structured"])
def conn(request, server):
    c = RawNBD(server.raw_address())
    size, _ = c.connect_go(structured=request.param)
    assert size == SIZE
    yield c
    c.close()


def roundtrip_ok(c, rng):
    offset = rng.randrange(0, SIZE - 5000)
    data = rng.randbytes(rng.randrange(1, 5000))
    c.send_request(CMD_WRITE, offset, len(data), payload=data)
    assert c.reply()[0] == 0
    c.send_request(CMD_READ, offset, len(data))
    err, _, got = c.reply(len(data))
    assert err == 0 and got == data


@pytest.mark.parametrize("command", [8, 9, 100, 0xFFFF])
def test_unknown_command_is_einval(conn, rng, command):
    cookie = conn.send_request(command, 0, 512)
    err, got, _ = conn.reply()
    assert got == cookie
    assert err == errno.EINVAL
    roundtrip_ok(conn, rng)


@pytest.mark.parametrize("flags", [0x8000, 0x0020, 0x0100])
def test_unknown_flag_is_einval(conn, rng, flags):
    cookie = conn.send_request(CMD_READ, 0, 512, flags=flags)
    err, got, _ = conn.reply()
    assert (err, got) == (errno.EINVAL, cookie)
    roundtrip_ok(conn, rng)


def test_flush_with_range_is_einval(conn, rng):
    conn.send_request(CMD_FLUSH, 0, 4096)
    assert conn.reply()[0] == errno.EINVAL
    conn.send_request(CMD_FLUSH, 0, 0)
    assert conn.reply()[0] == 0
    roundtrip_ok(conn, rng)


def test_df_needs_structured_replies(server, rng):
    with RawNBD(server.raw_address()) as c:
        _, flags = c.connect_go(structured=False)
        assert not flags & 0x80, "SEND_DF advertised without structured replies"
        c.send_request(CMD_READ, 0, 512, flags=FLAG_DF)
        assert c.reply()[0] == errno.EINVAL
        roundtrip_ok(c, rng)
    with RawNBD(server.raw_address()) as c:
        _, flags = c.connect_go(structured=True)
        assert flags & 0x80
        c.send_request(CMD_READ, 0, 512, flags=FLAG_DF)
        err, _, data = c.reply(512)
        assert err == 0 and data == bytes(512)


def test_cookies_are_echoed_for_pipelined_requests(conn, rng):
    cookies = [0, 1, 2**64 - 1, 0x0123456789ABCDEF, 42]
    data = rng.randbytes(1000)
    conn.send_request(CMD_WRITE, 5000, len(data), payload=data, cookie=cookies[0])
    assert conn.reply() == (0, cookies[0], b"")
    lengths = {}
    for ck in cookies[1:]:
        conn.send_request(CMD_READ, 5000, len(data), cookie=ck)
        lengths[ck] = len(data)
    seen = []
    for _ in cookies[1:]:
        err, ck, got = conn.reply_any(lengths)
        assert err == 0 and got == data
        seen.append(ck)
    assert sorted(seen) == sorted(cookies[1:])


def test_structured_read_errors_use_error_chunks(server):
    with RawNBD(server.raw_address()) as c:
        c.connect_go(structured=True)
        cookie = c.send_request(CMD_READ, SIZE - 10, 100)
        got, chunks, err = c.structured_reply()
        assert got == cookie and err == errno.EINVAL
        assert len(chunks) == 1 and chunks[0][0] in (CHUNK_ERROR, CHUNK_ERROR_OFFSET)
        payload = chunks[0][1]
        (msg_len,) = struct.unpack(">H", payload[4:6])
        tail = 8 if chunks[0][0] == CHUNK_ERROR_OFFSET else 0
        assert len(payload) == 6 + msg_len + tail
        # Zero-length read: a single NONE or empty reply, not data.
        cookie = c.send_request(CMD_READ, 0, 0)
        got, chunks, err = c.structured_reply()
        assert got == cookie and err == 0
        assert all(t in (CHUNK_NONE, CHUNK_OFFSET_DATA) for t, _ in chunks)


def test_media_error_reports_offset_inside_request(serve, image, transport, rng):
    server = serve(image, transport)
    bad = 37
    corrupt_block(image, bad, rng)
    with RawNBD(server.raw_address()) as c:
        c.connect_go(structured=True)
        for start, length, expected in [
            (0, 64 * BLOCK, bad * BLOCK),            # bad block in the middle
            (bad * BLOCK + 100, 50, bad * BLOCK + 100),  # starts inside the bad block
        ]:
            cookie = c.send_request(CMD_READ, start, length)
            got, chunks, err = c.structured_reply()
            assert got == cookie and err == errno.EIO
            kinds = [t for t, _ in chunks]
            assert kinds[-1] == CHUNK_ERROR_OFFSET, kinds
            payload = chunks[-1][1]
            (msg_len,) = struct.unpack(">H", payload[4:6])
            (offset,) = struct.unpack(">Q", payload[6 + msg_len:])
            assert offset == expected
            assert start <= offset < start + length
            # Data chunks sent before the error must lie outside the bad block.
            for t, p in chunks[:-1]:
                if t == CHUNK_OFFSET_DATA:
                    (at,) = struct.unpack(">Q", p[:8])
                    assert at + len(p) - 8 <= bad * BLOCK
        roundtrip_ok(c, rng)
    with RawNBD(server.raw_address()) as c:
        c.connect_go(structured=False)
        c.send_request(CMD_READ, bad * BLOCK, 10)
        assert c.reply(10)[0] == errno.EIO
        roundtrip_ok(c, rng)


def test_oversized_write_payload_is_skipped(server, rng):
    """The payload of a refused write is consumed so the next request parses."""
    with RawNBD(server.raw_address()) as c:
        c.connect_go(structured=False)
        big = 33 * MiB
        payload = b"\x01\x02\x03\x04" * (big // 4)
        # The payload happens to contain bytes that would parse as garbage headers.
        c.send_request(CMD_WRITE, 0, big, payload=payload)
        assert c.reply()[0] == errno.EINVAL
        roundtrip_ok(c, rng)
        c.send_request(CMD_READ, 0, 4096)
        assert c.reply(4096)[2] == bytes(4096)


def test_bad_request_magic_drops_only_that_connection(server, rng):
    with RawNBD(server.raw_address()) as c:
        c.connect_go()
        c.send_request(CMD_READ, 0, 512, magic=0x12560953)
        assert c.at_eof()
    with RawNBD(server.raw_address()) as c:
        c.connect_go()
        roundtrip_ok(c, rng)


def test_truncated_request_is_harmless(server, rng):
    for cut in (5, 27, 28 + 100):
        c = RawNBD(server.raw_address())
        c.connect_go()
        msg = struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, 4096) + rng.randbytes(4096)
        c.sock.sendall(msg[:cut])
        c.close()
    h = nbd_connect(server.uri())
    assert h.pread(4096, 0) == bytes(4096), "a truncated write changed data"
    h.shutdown()


def test_disc_answers_earlier_requests_then_closes(server, rng):
    data = rng.randbytes(8192)
    with RawNBD(server.raw_address()) as c:
        c.connect_go()
        c.send_request(CMD_WRITE, 0, len(data), payload=data)
        c.send_request(CMD_READ, 0, len(data))
        c.send_request(CMD_DISC)
        c.send_request(CMD_READ, 0, 16)  # after DISC: must be ignored
        assert c.reply()[0] == 0
        err, _, got = c.reply(len(data))
        assert err == 0 and got == data
        assert c.at_eof()


def test_block_status_requires_structured_and_context(server):
    with RawNBD(server.raw_address()) as c:
        c.connect_go(structured=False)
        c.send_request(CMD_BLOCK_STATUS, 0, 4096)
        assert c.reply()[0] == errno.EINVAL
    with RawNBD(server.raw_address()) as c:
        c.connect_go(structured=True)
        c.send_request(CMD_BLOCK_STATUS, 0, 4096)
        assert c.reply()[0] == errno.EINVAL
        c.send_request(CMD_READ, 0, 8)
        assert c.reply(8) == (0, 2, bytes(8))


def test_reply_not_held_hostage_by_a_partial_write(serve, image):
    """A READ that has fully arrived is answered even while the next WRITE's
    payload is still on its way. (Unix socket only: the wait is the cost of
    failing.)"""
    server = serve(image, "unix")
    c = RawNBD(server.raw_address(), timeout=3)
    try:
        c.connect_go()
        msg = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, 512)
        msg += struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 2, 0, 8192) + b"a" * 4096
        c.sock.sendall(msg)
        try:
            err, cookie, data = c.reply(512)
        except TimeoutError:
            pytest.fail("no reply to a complete READ within 3 s while a WRITE payload is pending")
        assert (err, cookie, data) == (0, 1, bytes(512))
        # Finishing the write completes it normally.
        c.sock.sendall(b"a" * 4096)
        assert c.reply()[:2] == (0, 2)
    finally:
        c.close()
