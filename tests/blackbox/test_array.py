"""RAID arrays end to end: `emulator array create/status/fail`, `serve --array`
with real clients, degraded reads, a second failure, and media errors repaired
from redundancy."""

from __future__ import annotations

import json

import nbd
import pytest

from bbhelpers import corrupt_block, emulator, error_line, errno_name, nbd_connect, run, snapshot

MIB = 1024 * 1024
DISK = 8 * MIB


def create_array(tmp_path, level="raid5", disks=4, spares=0, chunk="64KiB"):
    array = tmp_path / "array"
    result = emulator(
        "array", "create", str(array), "--level", level, "--disks", str(disks),
        "--spares", str(spares), "--disk-size", f"{DISK // MIB}MiB", "--chunk", chunk,
    )
    assert result.returncode == 0, result.describe()
    return array


def status(array) -> dict:
    result = emulator("array", "status", str(array), "--json")
    assert result.returncode == 0, result.describe()
    return json.loads(result.stdout)


def serve_array(serve, array, transport="unix"):
    return serve(None, transport, extra=["--array", str(array)])


@pytest.mark.parametrize("level,disks,usable", [("raid5", 4, 3 * DISK), ("raid1", 2, DISK)])
def test_create_and_status(tmp_path, level, disks, usable):
    array = create_array(tmp_path, level=level, disks=disks, spares=1)
    report = status(array)
    assert report["state"] == "optimal"
    assert report["data_bytes"] == usable
    assert [m["state"] for m in report["members"]] == ["active"] * disks
    assert report["spares"] == ["spare0.img"]
    assert report["volumes"] == [{"name": "vol0", "offset": 0, "size": usable}]
    for member in report["members"]:
        assert emulator("image", "verify", str(array / member["file"])).returncode == 0


def test_data_survives_one_failure_and_the_second_fails_the_array(tmp_path, serve, rng, need_tools):
    need_tools("nbdcopy")
    array = create_array(tmp_path)
    source = tmp_path / "source.bin"
    source.write_bytes(rng.randbytes(3 * DISK))
    server = serve_array(serve, array)
    copy_in = run(["nbdcopy", str(source), server.uri("vol0")])
    assert copy_in.returncode == 0, copy_in.describe()
    server.stop_clean()

    failed = emulator("array", "fail", str(array), "--disk", "1")
    assert failed.returncode == 0, failed.describe()
    assert status(array)["state"] == "degraded"

    server = serve_array(serve, array)
    out = tmp_path / "out.bin"
    copy_out = run(["nbdcopy", server.uri("vol0"), str(out)])
    assert copy_out.returncode == 0, copy_out.describe()
    assert out.read_bytes() == source.read_bytes(), "degraded read differs"
    # Writes while degraded keep what redundancy is left.
    h = nbd_connect(server.uri("vol0"))
    patch = rng.randbytes(200_000)
    h.pwrite(patch, 123_457)
    h.flush()
    assert h.pread(len(patch), 123_457) == patch
    h.shutdown()
    server.stop_clean()
    expected = bytearray(source.read_bytes())
    expected[123_457:123_457 + len(patch)] = patch

    # One failure too many: FAILED, I/O refused, nothing on the survivors changed.
    failed = emulator("array", "fail", str(array), "--disk", "2")
    assert failed.returncode == 0, failed.describe()
    assert status(array)["state"] == "failed"
    survivors = [array / "disk0.img", array / "disk3.img"]
    before = snapshot(*survivors)
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    with pytest.raises(nbd.Error) as read_error:
        h.pread(4096, 0)
    assert errno_name(read_error.value.errno) == "EIO"
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    server.stop_clean()
    assert snapshot(*survivors) == before

    again = emulator("array", "fail", str(array), "--disk", "0")
    assert again.returncode == 2
    assert "FAILED" in error_line(again)


def test_corrupt_member_block_is_reconstructed_and_rewritten(tmp_path, serve, rng):
    array = create_array(tmp_path)
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    data = rng.randbytes(1 * MIB)
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    member = array / "disk0.img"
    corrupt_block(member, 3, rng)
    assert emulator("image", "verify", str(member)).returncode == 1
    assert h.pread(len(data), 0) == data, "read must reconstruct, not return the corruption"
    h.shutdown()
    server.stop_clean()
    verify = emulator("image", "verify", str(member))
    assert verify.returncode == 0, "the bad block was rewritten from redundancy\n" + verify.describe()


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    not_array = tmp_path / "plain"
    not_array.mkdir()
    for args, needle in [
        (["array", "create", str(tmp_path / "a"), "--level", "raid5", "--disks", "2", "--disk-size", "8MiB"], "disks"),
        (["array", "create", str(tmp_path / "b"), "--level", "raid5", "--disks", "3", "--disk-size", "8MiB", "--chunk", "3KiB"], "chunk"),
        (["array", "status", str(not_array)], "not an array"),
        (["array", "status", str(tmp_path / "missing")], "not an array"),
    ]:
        result = emulator(*args)
        assert result.returncode == 2, result.describe()
        assert needle in error_line(result).lower() or needle in error_line(result), result.describe()
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())

    array = create_array(tmp_path)
    files = sorted(array.iterdir())
    before = snapshot(*files)
    for args, needle in [
        (["array", "fail", str(array), "--disk", "4"], "out of range"),
        (["array", "create", str(array), "--level", "raid5", "--disks", "4", "--disk-size", "8MiB"], "already"),
    ]:
        result = emulator(*args)
        assert result.returncode == 2, result.describe()
        assert needle in error_line(result), result.describe()
    assert snapshot(*files) == before

    metadata = array / "array.json"
    text = metadata.read_text()
    metadata.write_text(text.replace('"disks":4', '"disks":5'))
    result = emulator("array", "status", str(array))
    assert result.returncode == 2
    assert "checksum" in error_line(result)
