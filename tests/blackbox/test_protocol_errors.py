"""Transmission-phase errors through libnbd with client-side checks off
(set_strict_mode(0)), so invalid requests reach the server. Every error is
followed by a successful request on the same handle: errors must not cost the
connection."""

from __future__ import annotations

import errno

import nbd
import pytest

from bbhelpers import (
    BLOCK,
    MiB,
    corrupt_block,
    emulator,
    errno_of,
    extents,
    nbd_connect,
    sidecar,
    snapshot,
)

SIZE = 64 * MiB
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


@pytest.fixture
def h(server):
    handle = nbd_connect(server.uri(), strict=False, meta=["base:allocation"])
    yield handle
    handle.shutdown()


def expect_errno(expected, call, *args):
    with pytest.raises(nbd.Error) as excinfo:
        call(*args)
    assert errno_of(excinfo.value) == expected, (
        f"expected {errno.errorcode[expected]}, got {excinfo.value!r}"
    )


def still_works(h, rng):
    """A write and read-back on the same handle succeed."""
    offset = rng.randrange(0, SIZE - 8192)
    data = rng.randbytes(rng.randrange(1, 8192))
    h.pwrite(data, offset)
    assert h.pread(len(data), offset) == data


def test_read_past_end_is_einval(h, rng):
    for offset, length in [(SIZE - 100, 4096), (SIZE, 1), (SIZE + 4096, 4096), (2**63, 512),
                           (2**64 - 100, 4096)]:
        expect_errno(errno.EINVAL, h.pread, length, offset)
        still_works(h, rng)
    assert h.pread(4096, SIZE - 4096) == bytes(4096)


def test_write_past_end_is_enospc_and_writes_nothing(h, rng):
    expect_errno(errno.ENOSPC, h.pwrite, rng.randbytes(4096), SIZE - 100)
    assert h.pread(100, SIZE - 100) == bytes(100), "a refused write changed data"
    expect_errno(errno.ENOSPC, h.pwrite, b"x", SIZE)
    expect_errno(errno.ENOSPC, h.pwrite, b"x" * 512, 2**64 - 100)
    still_works(h, rng)


def test_trim_zero_cache_status_past_end(h, rng):
    expect_errno(errno.EINVAL, h.trim, 8192, SIZE - 4096)
    still_works(h, rng)
    expect_errno(errno.ENOSPC, h.zero, 8192, SIZE - 4096)
    still_works(h, rng)
    expect_errno(errno.EINVAL, h.cache, 8192, SIZE - 4096)
    still_works(h, rng)
    with pytest.raises(nbd.Error) as excinfo:
        extents(h, 8192, SIZE - 4096)
    assert errno_of(excinfo.value) == errno.EINVAL
    still_works(h, rng)


def test_read_only_export_refuses_writes(serve, image, transport, rng):
    server = serve(image, transport, read_only=True)
    h = nbd_connect(server.uri(), strict=False)
    assert h.is_read_only()
    before = h.pread(65536, 0)
    expect_errno(errno.EPERM, h.pwrite, rng.randbytes(4096), 0)
    assert h.pread(4096, 0) == before[:4096]
    expect_errno(errno.EPERM, h.pwrite, rng.randbytes(4096), 0, nbd.CMD_FLAG_FUA)
    expect_errno(errno.EPERM, h.trim, 65536, 0)
    expect_errno(errno.EPERM, h.zero, 65536, 0)
    expect_errno(errno.EPERM, h.zero, 65536, 0, nbd.CMD_FLAG_NO_HOLE)
    # Even out of range, a write to a read-only export is EPERM or a range error.
    with pytest.raises(nbd.Error) as excinfo:
        h.pwrite(b"x", SIZE)
    assert errno_of(excinfo.value) in (errno.EPERM, errno.ENOSPC)
    # Reads, flush and cache still work on the same handle.
    assert h.pread(65536, 0) == before
    h.flush()
    h.cache(4096, 0)
    h.shutdown()


def test_read_only_export_data_is_readable(serve, tmp_path, rng, transport):
    from bbhelpers import create_image

    img = create_image(tmp_path / "ro.img", 4 * MiB)
    data = rng.randbytes(1 * MiB)
    rw = serve(img, transport)
    h = nbd_connect(rw.uri())
    h.pwrite(data, 12345)
    h.flush()
    h.shutdown()
    rw.stop_clean()
    files = snapshot(img, sidecar(img))
    ro = serve(img, transport, read_only=True)
    h = nbd_connect(ro.uri(), strict=False)
    assert h.pread(len(data), 12345) == data
    expect_errno(errno.EPERM, h.pwrite, b"y" * 10, 12345)
    h.shutdown()
    ro.stop_clean()
    assert snapshot(img, sidecar(img)) == files, "read-only serving changed the files"


def test_oversized_read_and_write_are_einval(h, rng):
    big = 33 * MiB
    expect_errno(errno.EINVAL, h.pread, big, 0)
    still_works(h, rng)
    payload = rng.randbytes(big)
    expect_errno(errno.EINVAL, h.pwrite, payload, 0)
    still_works(h, rng)
    expect_errno(errno.EINVAL, h.cache, big, 0)
    still_works(h, rng)
    # The advertised maximum itself is fine.
    exact = payload[: 32 * MiB]
    h.pwrite(exact, 0)
    assert h.pread(32 * MiB, 0) == exact
    # Zeroing and trimming carry no payload: large ranges are allowed.
    h.zero(40 * MiB, 0)
    assert h.pread(32 * MiB, 0) == bytes(32 * MiB)
    h.trim(SIZE, 0)


def test_refused_oversized_write_writes_nothing(server, rng):
    h = nbd_connect(server.uri(), strict=False)
    expect_errno(errno.EINVAL, h.pwrite, rng.randbytes(33 * MiB), 4096)
    assert h.pread(32 * MiB, 4096) == bytes(32 * MiB)
    h.shutdown()


def test_write_zeroes_flags(h, rng):
    data = rng.randbytes(1 * MiB)
    h.pwrite(data, 0)
    # FAST_ZERO with NO_HOLE: ENOTSUP, data left alone.
    expect_errno(errno.ENOTSUP, h.zero, 256 * 1024, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(len(data), 0) == data
    # FAST_ZERO alone succeeds and punches a hole.
    h.zero(256 * 1024, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(256 * 1024, 0) == bytes(256 * 1024)
    assert extents(h, 256 * 1024, 0) == [(0, 256 * 1024, HOLE_ZERO)]
    # NO_HOLE: zeros, and the range stays (or becomes) allocated.
    h.zero(256 * 1024, 256 * 1024, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(256 * 1024, 256 * 1024) == bytes(256 * 1024)
    h.zero(256 * 1024, 8 * MiB, nbd.CMD_FLAG_NO_HOLE)  # previously a hole
    assert h.pread(256 * 1024, 8 * MiB) == bytes(256 * 1024)
    for offset in (256 * 1024, 8 * MiB):
        found = extents(h, 256 * 1024, offset)
        assert all(flags & nbd.STATE_HOLE == 0 for _, _, flags in found), found
    # Plain zero, unaligned: zeros exactly in range, neighbours kept.
    h.zero(10000, 600000)
    got = h.pread(20000, 595000)
    assert got == data[595000:600000] + bytes(10000) + data[610000:615000]
    # The rest of the data is intact.
    assert h.pread(len(data) - 615000, 615000) == data[615000:]


def test_block_status(h, rng):
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert extents(h, SIZE, 0) == [(0, SIZE, HOLE_ZERO)]
    h.pwrite(rng.randbytes(64 * 1024), 1 * MiB)
    assert extents(h, 4 * MiB, 0) == [
        (0, MiB, HOLE_ZERO),
        (MiB, 64 * 1024, 0),
        (MiB + 64 * 1024, 3 * MiB - 64 * 1024, HOLE_ZERO),
    ]
    # REQ_ONE: exactly one extent, not longer than the request.
    one = extents(h, 4 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
    assert one == [(0, MiB, HOLE_ZERO)]
    one = extents(h, 1000, MiB + 10, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][0] == MiB + 10 and 0 < one[0][1] <= 1000 and one[0][2] == 0
    h.trim(64 * 1024, MiB)
    assert extents(h, 4 * MiB, 0) == [(0, 4 * MiB, HOLE_ZERO)]
    still_works(h, rng)


def test_block_status_without_context_is_einval(server, rng):
    h = nbd_connect(server.uri(), strict=False)  # no base:allocation requested
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    with pytest.raises(nbd.Error) as excinfo:
        extents(h, 4096, 0)
    assert errno_of(excinfo.value) == errno.EINVAL
    still_works(h, rng)
    h.shutdown()


def test_invalid_flags_are_einval(h, rng):
    expect_errno(errno.EINVAL, h.flush, nbd.CMD_FLAG_NO_HOLE)
    still_works(h, rng)
    expect_errno(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
    still_works(h, rng)
    expect_errno(errno.EINVAL, h.pwrite, b"abc", 0, nbd.CMD_FLAG_NO_HOLE)
    still_works(h, rng)
    expect_errno(errno.EINVAL, h.trim, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    still_works(h, rng)


def test_accepted_flags(h, rng):
    data = rng.randbytes(10000)
    h.pwrite(data, 777, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 777, nbd.CMD_FLAG_DF) == data
    assert h.pread(len(data), 777, nbd.CMD_FLAG_FUA) == data  # FUA on a read is accepted
    h.trim(4096, 65536, nbd.CMD_FLAG_FUA)
    h.zero(4096, 65536, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    h.flush(nbd.CMD_FLAG_FUA)
    h.cache(4096, 0)


def test_zero_length_requests_keep_the_connection(h, rng):
    assert h.pread(0, 0) == b""
    assert h.pread(0, SIZE) == b""
    h.pwrite(b"", 4096)
    h.trim(0, 4096)
    h.zero(0, 4096)
    h.cache(0, 0)
    still_works(h, rng)


def _media_setup(serve, image, transport, rng, read_only=False):
    """Writes known data, then corrupts one block behind the server's back."""
    rw = serve(image, transport)
    h = nbd_connect(rw.uri())
    data = rng.randbytes(1 * MiB)
    h.pwrite(data, 0)
    h.shutdown()
    if read_only:
        rw.stop_clean()
        server = serve(image, transport, read_only=True)
    else:
        server = rw
    bad = rng.randrange(1, 255)
    corrupt_block(image, bad, rng, within=rng.randrange(0, BLOCK - 16))
    return server, data, bad


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_media_error_fails_only_that_request(serve, image, transport, rng, read_only):
    server, data, bad = _media_setup(serve, image, transport, rng, read_only)
    h = nbd_connect(server.uri(), strict=False)
    bad_off = bad * BLOCK
    # Any read touching the bad block is EIO...
    for offset, length in [(bad_off, BLOCK), (bad_off - 100, 200), (bad_off + 4000, 50),
                           (0, MiB)]:
        expect_errno(errno.EIO, h.pread, length, offset)
        # ...and the same handle keeps working.
        assert h.pread(BLOCK, bad_off - BLOCK) == data[bad_off - BLOCK: bad_off]
    assert h.pread(BLOCK, bad_off + BLOCK) == data[bad_off + BLOCK: bad_off + 2 * BLOCK]
    # Another connection works and sees the same media error.
    h2 = nbd_connect(server.uri())
    assert h2.pread(bad_off, 0) == data[:bad_off]
    expect_errno(errno.EIO, h2.pread, 10, bad_off + 10)
    h2.shutdown()
    h.shutdown()
    server.stop_clean()
    report = emulator("image", "verify", image)
    assert report.returncode == 1 and f"bad block {bad} " in report.stdout, report.describe()


def test_media_error_partial_write_refused_full_write_heals(serve, image, transport, rng):
    server, data, bad = _media_setup(serve, image, transport, rng)
    h = nbd_connect(server.uri(), strict=False)
    bad_off = bad * BLOCK
    # A partial-block write would bless the corruption with a fresh CRC: refused.
    expect_errno(errno.EIO, h.pwrite, b"patch", bad_off + 100)
    expect_errno(errno.EIO, h.pread, BLOCK, bad_off)
    # A whole, aligned block replaces the bad data.
    fresh = rng.randbytes(BLOCK)
    h.pwrite(fresh, bad_off)
    assert h.pread(BLOCK, bad_off) == fresh
    assert h.pread(3 * BLOCK, bad_off - BLOCK) == (
        data[bad_off - BLOCK: bad_off] + fresh + data[bad_off + BLOCK: bad_off + 2 * BLOCK]
    )
    h.shutdown()
    server.stop_clean()
    report = emulator("image", "verify", image)
    assert report.returncode == 0, report.describe()


def test_media_error_healed_by_zeroing(serve, image, transport, rng):
    server, data, bad = _media_setup(serve, image, transport, rng)
    h = nbd_connect(server.uri(), strict=False)
    bad_off = bad * BLOCK
    h.zero(BLOCK, bad_off)
    assert h.pread(BLOCK, bad_off) == bytes(BLOCK)
    h.shutdown()
    server.stop_clean()
    report = emulator("image", "verify", image)
    assert report.returncode == 0, report.describe()
