"""FLUSH and FUA as a disk file system sees them: after an acknowledged FLUSH the
image and its checksums have no dirty or writeback pages left in the page cache
(so they are on the device), after an acknowledged FUA write its own range has
none (and other writes may still be dirty), and a FLUSH through one server
process covers what another process wrote to the same image.

The page cache is read with Linux's cachestat(2) (kernel 6.5 or later), which
reports dirty and writeback pages per file range. Every test first checks that
the probe does see unsynced writes (a write without FLUSH leaves dirty pages), so
a FLUSH that synced nothing would fail it. The images live in a directory on the
repository's own file system (under run/): on tmpfs nothing is ever written
back, and there is nothing to measure."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import nbd
import pytest

from bbhelpers import MiB, create_image, emulator, nbd_connect, sidecar

SIZE = 64 * MiB
BLOCK = 4096
SIDECAR_HEADER = 64
SYS_CACHESTAT = 451  # the same number on every architecture (generic syscall table)
REPO = Path(__file__).resolve().parents[2]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def unsynced_pages(path: Path, offset: int = 0, length: int = 0) -> int:
    """Dirty plus writeback pages of `path` in [offset, offset+length) (0: to
    the end of the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _Cachestat()
        rng = _Range(offset, length)
        if _libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                pytest.skip("this kernel has no cachestat(2) (Linux 6.5 or later)")
            raise OSError(err, os.strerror(err), str(path))
        return stat.nr_dirty + stat.nr_writeback
    finally:
        os.close(fd)


def crc_entries(image: Path, offset: int, length: int) -> tuple[Path, int, int]:
    """The sidecar and the byte range of its CRC entries for image bytes
    [offset, offset+length)."""
    first = offset // BLOCK
    last = (offset + length - 1) // BLOCK
    return sidecar(image), SIDECAR_HEADER + 4 * first, 4 * (last - first + 1)


def all_crc_entries(image: Path) -> tuple[Path, int, int]:
    return crc_entries(image, 0, image.stat().st_size)


@pytest.fixture
def disk_dir():
    """A scratch directory on the repository's file system, which writes back."""
    base = REPO / "run"
    base.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="blackbox-flush-", dir=base))
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    if kind in ("tmpfs", "ramfs"):
        shutil.rmtree(path)
        pytest.skip(f"{base} is on {kind}: nothing is written back there")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_spread(h, rng, count: int, lo: int, hi: int, flags: int = 0) -> list:
    """`count` random writes of 1-64 KiB inside [lo, hi)."""
    writes = []
    for _ in range(count):
        length = rng.randrange(1, 64 * 1024)
        offset = rng.randrange(lo, hi - length)
        data = rng.randbytes(length)
        h.pwrite(data, offset, flags)
        writes.append((offset, data))
    return writes


def as_left(writes: list, index: int) -> bytes:
    """The bytes of write `index`'s range once every write was made: its own,
    but where a later write overlapped it (random ranges may)."""
    offset, data = writes[index]
    left = bytearray(data)
    for later_offset, later in writes[index + 1:]:
        lo, hi = max(offset, later_offset), min(offset + len(data), later_offset + len(later))
        if lo < hi:
            left[lo - offset:hi - offset] = later[lo - later_offset:hi - later_offset]
    return bytes(left)


def test_an_acknowledged_flush_leaves_nothing_unsynced(serve, disk_dir, transport, rng):
    image = create_image(disk_dir / "disk.img", SIZE)
    server = serve(image, transport)
    h = nbd_connect(server.uri())
    write_spread(h, rng, 50, 0, SIZE)
    h.zero(3 * MiB, 5 * MiB)
    h.trim(1 * MiB, 9 * MiB)
    assert unsynced_pages(image) > 0, "the probe must see writes that were not flushed"
    h.flush()
    assert unsynced_pages(image) == 0, "image pages left unsynced after an acknowledged FLUSH"
    assert unsynced_pages(*all_crc_entries(image)) == 0, "checksums left unsynced after FLUSH"
    h.shutdown()


def test_an_acknowledged_fua_write_syncs_its_own_range(serve, disk_dir, transport, rng):
    image = create_image(disk_dir / "disk.img", SIZE)
    server = serve(image, transport)
    h = nbd_connect(server.uri())
    # Far apart, so that they share neither image pages nor checksum pages
    # (a page of CRCs covers 4 MiB of image).
    plain = (1 * MiB + 123, rng.randbytes(200_000))
    fua = (40 * MiB + 4567, rng.randbytes(300_000))
    h.pwrite(plain[1], plain[0])
    h.pwrite(fua[1], fua[0], nbd.CMD_FLAG_FUA)
    assert unsynced_pages(image, fua[0], len(fua[1])) == 0, "the FUA write's range is unsynced"
    assert unsynced_pages(*crc_entries(image, fua[0], len(fua[1]))) == 0, "its checksums are unsynced"
    # FUA syncs its range only: the plain write is still in the page cache
    # (which also shows the probe sees unsynced data).
    assert unsynced_pages(image, plain[0], len(plain[1])) > 0, "a FUA write synced other ranges too"
    h.flush()
    assert unsynced_pages(image) == 0
    assert unsynced_pages(*all_crc_entries(image)) == 0
    assert h.pread(len(fua[1]), fua[0]) == fua[1]
    h.shutdown()


def test_a_flush_in_one_process_covers_writes_of_another(serve, disk_dir, rng):
    """Two `serve` processes on one image (CAN_MULTI_CONN): a FLUSH through the
    second, which wrote nothing itself, must make the first one's writes
    durable. A flush that skipped images its own process had not written would
    leave them dirty."""
    image = create_image(disk_dir / "disk.img", SIZE)
    writer = serve(image, "unix")
    flusher = serve(image, "unix")
    hw = nbd_connect(writer.uri())
    hf = nbd_connect(flusher.uri())
    hf.flush()  # the flusher's own first flush: nothing of its own after it
    writes = write_spread(hw, rng, 30, 0, SIZE)
    assert unsynced_pages(image) > 0
    hf.flush()
    assert unsynced_pages(image) == 0, "a FLUSH in another process left writes unsynced"
    assert unsynced_pages(*all_crc_entries(image)) == 0
    for index in range(len(writes) - 5, len(writes)):
        offset, data = writes[index]
        assert hf.pread(len(data), offset) == as_left(writes, index)
    hw.shutdown()
    hf.shutdown()


def test_an_array_volume_flush_syncs_every_member_written(serve, disk_dir, rng):
    array = disk_dir / "array"
    result = emulator(
        "array", "create", str(array), "--level", "raid5", "--disks", "4",
        "--disk-size", "16MiB",
    )
    assert result.returncode == 0, result.describe()
    server = serve(None, "unix", extra=["--array", str(array)])
    h = nbd_connect(server.uri("vol0"))
    members = sorted(array.glob("disk*.img"))
    assert len(members) == 4
    # One small write dirties a data member and the parity member only.
    h.pwrite(rng.randbytes(BLOCK), 5 * BLOCK)
    dirty = [m for m in members if unsynced_pages(m) > 0]
    assert 1 <= len(dirty) < len(members), f"unexpected dirty members {dirty}"
    write_spread(h, rng, 40, 0, h.get_size())
    assert all(unsynced_pages(m) > 0 for m in members), "spread writes touch every member"
    h.flush()
    for member in members:
        assert unsynced_pages(member) == 0, f"{member.name} unsynced after FLUSH"
        assert unsynced_pages(*all_crc_entries(member)) == 0, f"{member.name}'s checksums"
    h.shutdown()


def this_boot() -> int:
    """The boot stamp of the write-intent record: the kernel's boot id folded
    to 64 bits (disk_images::intent::this_boot)."""
    boot = int(Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", ""), 16)
    return ((boot >> 64) ^ (boot & (2**64 - 1))) | 1


def intent_record(image: Path) -> tuple[int, int, int]:
    """(host bits, repair bits, stamp) from the sidecar header."""
    header = sidecar(image).read_bytes()[:64]
    word = lambda at: int.from_bytes(header[at:at + 8], "little")  # noqa: E731
    return word(48), word(56), word(40)


def test_a_write_is_recorded_on_the_device_before_its_bytes_are(serve, disk_dir, transport, rng):
    """A power loss can keep a write's bytes without its checksum (or the other
    way round) unless the regions being written are on record first: the
    write-intent record in the sidecar header must be synced by the time a
    write is acknowledged, without any FLUSH."""
    image = create_image(disk_dir / "disk.img", SIZE)
    assert intent_record(image) == (0, 0, 0)
    # Drop the new sidecar's clean pages, which its creation left as one large
    # folio: the server then reads it back page by page (it advises random
    # access), and a checksum written later cannot dirty the header's page.
    assert unsynced_pages(sidecar(image)) == 0
    fd = os.open(sidecar(image), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    server = serve(image, transport)
    h = nbd_connect(server.uri())
    # 64 MiB in 64 regions of 1 MiB; far from the first 4 MiB, whose checksums
    # share the header's page.
    h.pwrite(rng.randbytes(3 * BLOCK), 40 * MiB + 5)
    assert unsynced_pages(image) > 0, "the probe must see the write itself unsynced"
    host, repair, stamp = intent_record(image)
    assert (host, repair) == (1 << 40, 0), f"record {host:#x} {repair:#x}"
    assert stamp == this_boot()
    assert unsynced_pages(sidecar(image), 0, 4096) == 0, "the record was not synced before the write"
    h.shutdown()
