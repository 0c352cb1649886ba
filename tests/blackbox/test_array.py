"""RAID arrays end to end: `emulator array create/status/fail`, `serve --array`
with real clients, degraded reads, a failure too many, and media errors repaired
from redundancy; RAID-6 through two failures, two rebuilds and a scrub."""

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


@pytest.mark.parametrize(
    "level,disks,usable", [("raid5", 4, 3 * DISK), ("raid6", 5, 3 * DISK), ("raid1", 2, DISK)]
)
def test_create_and_status(tmp_path, level, disks, usable):
    array = create_array(tmp_path, level=level, disks=disks, spares=1)
    report = status(array)
    assert report["state"] == "optimal"
    assert report["data_bytes"] == usable
    assert [m["state"] for m in report["members"]] == ["active"] * disks
    assert report["spares"] == ["spare0.img"]
    assert report["volumes"] == [{"name": "vol0", "offset": 0, "size": usable, "id": 1, "owner": 0}]
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
    with pytest.raises(nbd.Error) as write_error:
        h.pwrite(b"x" * 4096, 0)
    assert errno_name(write_error.value.errno) == "EIO", "README: a FAILED array's I/O returns EIO"
    h.shutdown()
    server.stop_clean()
    assert snapshot(*survivors) == before

    again = emulator("array", "fail", str(array), "--disk", "0")
    assert again.returncode == 2
    assert "FAILED" in error_line(again)


def test_raid6_survives_two_failures_rebuilds_both_and_scrub_repairs_two_blocks_in_a_row(
    tmp_path, serve, rng, need_tools
):
    need_tools("nbdcopy")
    array = create_array(tmp_path, level="raid6", disks=5, spares=2)
    source = tmp_path / "source.bin"
    source.write_bytes(rng.randbytes(3 * DISK))
    server = serve_array(serve, array)
    assert run(["nbdcopy", str(source), server.uri("vol0")]).returncode == 0
    server.stop_clean()

    for disk in (1, 3):
        failed = emulator("array", "fail", str(array), "--disk", str(disk))
        assert failed.returncode == 0, failed.describe()
    assert status(array)["state"] == "degraded"
    server = serve_array(serve, array)
    out = tmp_path / "out.bin"
    assert run(["nbdcopy", server.uri("vol0"), str(out)]).returncode == 0
    assert out.read_bytes() == source.read_bytes(), "read with two disks failed differs"
    h = nbd_connect(server.uri("vol0"))
    patch = rng.randbytes(300_000)
    h.pwrite(patch, 654_321)
    h.flush()
    h.shutdown()
    server.stop_clean()
    expected = bytearray(source.read_bytes())
    expected[654_321:654_321 + len(patch)] = patch

    # Both disks replaced and rebuilt, one after the other, by two controllers.
    for disk, spare in ((1, "spare0.img"), (3, "spare1.img")):
        replaced = emulator("array", "replace", str(array), "--disk", str(disk))
        assert replaced.returncode == 0, replaced.describe()
        rebuilt = emulator("array", "rebuild", str(array), "--controllers", "2", "--wait", "--json", timeout=120)
        assert rebuilt.returncode == 0, rebuilt.describe()
        assert json.loads(rebuilt.stdout)["unrecoverable"] == []
        assert status(array)["members"][disk] == {"file": spare, "state": "active"}
    assert status(array)["state"] == "optimal"
    for member in status(array)["members"]:
        assert emulator("image", "verify", str(array / member["file"])).returncode == 0

    # Two bad blocks in one row (member block 5 of disks 0 and 2): RAID-6 repairs both.
    corrupt_block(array / "disk0.img", 5, rng)
    corrupt_block(array / "disk2.img", 5, rng)
    found = emulator("array", "scrub", str(array), "--repair", "--wait", "--json", timeout=120)
    assert found.returncode == 0, found.describe()
    report = json.loads(found.stdout)
    assert (report["checksum_errors"], report["repaired"], report["unrecoverable"]) == (2, 2, [])
    clean = emulator("array", "scrub", str(array), "--wait", "--json", timeout=120)
    assert clean.returncode == 0, clean.describe()
    assert json.loads(clean.stdout)["checksum_errors"] == 0

    server = serve_array(serve, array)
    assert run(["nbdcopy", server.uri("vol0"), str(out)]).returncode == 0
    assert out.read_bytes() == bytes(expected)
    server.stop_clean()

    # A third failure is one too many.
    for disk in (0, 2):
        assert emulator("array", "fail", str(array), "--disk", str(disk)).returncode == 0
    assert status(array)["state"] == "degraded"
    assert emulator("array", "fail", str(array), "--disk", "4").returncode == 0
    assert status(array)["state"] == "failed"


def test_fast_zero_on_an_array_volume_fails_at_once_and_leaves_the_data(tmp_path, serve, rng):
    # An array writes real zeros to every member: no faster than a write, so
    # NBD's FAST_ZERO must be refused (ENOTSUP) and the data left alone.
    array = create_array(tmp_path)
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    data = rng.randbytes(MIB)
    h.pwrite(data, 0)
    with pytest.raises(nbd.Error) as refused:
        h.zero(MIB, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert errno_name(refused.value.errno) == "ENOTSUP"
    assert h.pread(MIB, 0) == data
    h.zero(MIB, 0)  # without FAST_ZERO it zeroes
    assert h.pread(MIB, 0) == bytes(MIB)
    h.shutdown()
    server.stop_clean()


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
        (["array", "create", str(tmp_path / "a6"), "--level", "raid6", "--disks", "3", "--disk-size", "8MiB"], "disks"),
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


def filled_array_with_a_replaced_disk(tmp_path, serve, rng, disk):
    """A RAID-5 array full of random data whose `disk` was failed and replaced by
    the spare; returns the array and the data file."""
    array = create_array(tmp_path, spares=1)
    source = tmp_path / "source.bin"
    source.write_bytes(rng.randbytes(3 * DISK))
    server = serve_array(serve, array)
    assert run(["nbdcopy", str(source), server.uri("vol0")]).returncode == 0
    server.stop_clean()
    assert emulator("array", "fail", str(array), "--disk", str(disk)).returncode == 0
    replaced = emulator("array", "replace", str(array), "--disk", str(disk))
    assert replaced.returncode == 0, replaced.describe()
    assert status(array)["members"][disk] == {"file": "spare0.img", "state": "rebuilding"}
    return array, source


def test_rebuild_with_two_controller_processes_restores_the_disk(tmp_path, serve, rng, need_tools):
    need_tools("nbdcopy")
    array, source = filled_array_with_a_replaced_disk(tmp_path, serve, rng, 2)

    result = emulator("array", "rebuild", str(array), "--controllers", "2", "--wait", "--json", timeout=120)
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)
    assert report["rebuilt_disk"] == 2 and report["unrecoverable"] == []
    assert {p["completed_by"] for p in report["partitions"]} <= {0, 1}
    assert all(p["completed_by"] is not None for p in report["partitions"])
    after = status(array)
    assert after["state"] == "optimal"
    assert after["members"][2] == {"file": "spare0.img", "state": "active"}
    for member in after["members"]:
        assert emulator("image", "verify", str(array / member["file"])).returncode == 0

    server = serve_array(serve, array)
    out = tmp_path / "out.bin"
    assert run(["nbdcopy", server.uri("vol0"), str(out)]).returncode == 0
    assert out.read_bytes() == source.read_bytes()


def test_scrub_finds_and_repairs_flipped_bytes(tmp_path, serve, rng):
    array = create_array(tmp_path)
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    data = rng.randbytes(2 * MIB)
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    h.shutdown()
    server.stop_clean()
    corrupt_block(array / "disk1.img", 7, rng)
    corrupt_block(array / "disk3.img", 300, rng)

    found = emulator("array", "scrub", str(array), "--controllers", "2", "--wait", "--json", timeout=120)
    assert found.returncode == 1, "a scrub without --repair that finds errors exits 1\n" + found.describe()
    report = json.loads(found.stdout)
    assert (report["checksum_errors"], report["repaired"], report["unrecoverable"]) == (2, 0, [])
    repaired = emulator("array", "scrub", str(array), "--repair", "--wait", "--json", timeout=120)
    assert repaired.returncode == 0, repaired.describe()
    assert json.loads(repaired.stdout)["repaired"] == 2
    clean = emulator("array", "scrub", str(array), "--wait", "--json", timeout=120)
    assert clean.returncode == 0, clean.describe()
    assert json.loads(clean.stdout)["checksum_errors"] == 0
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    assert h.pread(len(data), 0) == data
    h.shutdown()


@pytest.mark.parametrize("victim", [1, 0], ids=["controller-1", "initiator"])
def test_kill9_of_one_controller_mid_partition_and_the_other_finishes(tmp_path, serve, rng, need_tools, victim):
    """Either controller killed mid-partition: the other takes its partition
    over, finishes the rebuild and, when the initiator (controller 0) was the
    one killed, runs the completion actions itself."""
    import os
    import signal
    import subprocess
    import time

    from bbhelpers import emulator_bin, wait_until

    need_tools("nbdcopy")
    array, source = filled_array_with_a_replaced_disk(tmp_path, serve, rng, 0)

    lease_ms = 1000
    # 8 MiB per disk at 4 MiB/s in all: slow enough to kill a controller mid-partition.
    rebuild = subprocess.Popen(
        [str(emulator_bin()), "array", "rebuild", str(array), "--controllers", "2", "--rate", "4",
         "--lease-ms", str(lease_ms), "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    survivor = 1 - victim
    victim_log = array / f"controller-{victim}.log"
    wait_until(lambda: victim_log.exists() and "claimed" in victim_log.read_text(), 20,
               f"controller {victim} claims a partition")
    pid = subprocess.run(["pgrep", "-f", f"controller {array} --task rebuild --id {victim}"],
                         capture_output=True, text=True).stdout.split()
    assert len(pid) == 1, pid
    killed_at = time.monotonic()
    os.kill(int(pid[0]), signal.SIGKILL)
    stdout, stderr = rebuild.communicate(timeout=60)
    elapsed = time.monotonic() - killed_at
    assert rebuild.returncode == 0, stderr
    # Bound: the lease (twice when the initiator died: its partition's, then
    # its completion's), plus the remaining work at the survivor's rate (2 MiB/s
    # for at most the whole 8 MiB disk), plus slack for a loaded machine.
    assert elapsed < 2 * lease_ms / 1000 + 8 / 2 + 10, elapsed
    report = json.loads(stdout)
    assert report["unrecoverable"] == []
    survivor_log = (array / f"controller-{survivor}.log").read_text()
    assert "took_over=true" in survivor_log, (
        f"controller {survivor} took the dead controller's partition over\n" + survivor_log)
    if victim == 0:
        assert "completing it here" in survivor_log, survivor_log
    assert status(array)["state"] == "optimal"
    for member in status(array)["members"]:
        assert emulator("image", "verify", str(array / member["file"])).returncode == 0
    server = serve_array(serve, array)
    out = tmp_path / "out.bin"
    assert run(["nbdcopy", server.uri("vol0"), str(out)]).returncode == 0
    assert out.read_bytes() == source.read_bytes()


def test_volumes_carved_from_an_array_are_separate_exports(tmp_path, serve, rng, need_tools):
    need_tools("nbdinfo")
    array = tmp_path / "array"
    created = emulator("array", "create", str(array), "--level", "raid5", "--disks", "4",
                       "--disk-size", "8MiB", "--volumes", "3")
    assert created.returncode == 0, created.describe()
    volumes = status(array)["volumes"]
    row = 3 * 64 * 1024
    assert [v["name"] for v in volumes] == ["vol0", "vol1", "vol2"]
    assert all(v["offset"] % row == 0 and v["size"] > 0 for v in volumes)
    assert all(a["offset"] + a["size"] <= b["offset"] for a, b in zip(volumes, volumes[1:]))

    assert emulator("array", "volume-delete", str(array), "--name", "vol1").returncode == 0
    made = emulator("array", "volume-create", str(array), "--name", "db", "--size", "1MiB")
    assert made.returncode == 0, made.describe()
    db = next(v for v in status(array)["volumes"] if v["name"] == "db")
    assert db["offset"] == volumes[1]["offset"], "first fit: the space vol1 left"

    server = serve_array(serve, array)
    listed = run(["nbdinfo", "--list", "--json", server.uri("vol0")])
    assert listed.returncode == 0, listed.describe()
    exports = {e["export-name"]: e["export-size"] for e in json.loads(listed.stdout)["exports"]}
    assert exports == {"vol0": volumes[0]["size"], "db": MIB, "vol2": volumes[2]["size"]}
    patterns = {}
    for name in exports:
        h = nbd_connect(server.uri(name))
        patterns[name] = rng.randbytes(MIB)
        h.pwrite(patterns[name], 0)
        h.shutdown()
    for name in exports:
        h = nbd_connect(server.uri(name))
        assert h.pread(MIB, 0) == patterns[name], f"{name} kept its own data"
        with pytest.raises(nbd.Error) as past_end:
            h.pread(4096, exports[name])  # past the end of the volume
        assert errno_name(past_end.value.errno) == "EINVAL", "README: a read past the end is EINVAL"
        h.shutdown()


def test_volumes_created_and_deleted_while_serving(tmp_path, serve, rng, need_tools):
    """A running server offers a volume created after it started to the next
    client, stops offering a deleted one, and refuses the deleted one's I/O on
    connections already open (its space may belong to a new volume by then)."""
    need_tools("nbdinfo")
    array = tmp_path / "array"
    created = emulator("array", "create", str(array), "--level", "raid5", "--disks", "4",
                       "--disk-size", "8MiB", "--volumes", "2")
    assert created.returncode == 0, created.describe()
    assert emulator("array", "volume-delete", str(array), "--name", "vol1").returncode == 0
    server = serve_array(serve, array)
    keep = nbd_connect(server.uri("vol0"))
    kept = rng.randbytes(MIB)
    keep.pwrite(kept, 0)
    with pytest.raises(nbd.Error):
        nbd_connect(server.uri("db"))

    made = emulator("array", "volume-create", str(array), "--name", "db", "--size", "1MiB")
    assert made.returncode == 0, made.describe()
    listed = run(["nbdinfo", "--list", "--json", server.uri("vol0")])
    assert listed.returncode == 0, listed.describe()
    names = sorted(e["export-name"] for e in json.loads(listed.stdout)["exports"])
    assert names == ["db", "vol0"]
    old = nbd_connect(server.uri("db"))
    assert old.get_size() == MIB
    old.pwrite(rng.randbytes(MIB), 0)

    assert emulator("array", "volume-delete", str(array), "--name", "db").returncode == 0
    with pytest.raises(nbd.Error) as refused:
        old.pread(4096, 0)
    assert errno_name(refused.value.errno) == "EIO"
    with pytest.raises(nbd.Error):
        nbd_connect(server.uri("db"))

    # A new volume in the same space: the old connection cannot write into it.
    made = emulator("array", "volume-create", str(array), "--name", "db2", "--size", "1MiB")
    assert made.returncode == 0, made.describe()
    fresh = nbd_connect(server.uri("db2"))
    pattern = rng.randbytes(MIB)
    fresh.pwrite(pattern, 0)
    with pytest.raises(nbd.Error) as refused:
        old.pwrite(b"\xee" * 4096, 0)
    assert errno_name(refused.value.errno) == "EIO", "README: a deleted volume's I/O is refused with EIO"
    assert fresh.pread(MIB, 0) == pattern

    # The same name again, same size, same place: a new volume all the same.
    # A connection that met the delete (EIO) does not poison the new volume
    # for new clients...
    assert emulator("array", "volume-delete", str(array), "--name", "db2").returncode == 0
    with pytest.raises(nbd.Error) as refused:
        fresh.pread(4096, 0)
    assert errno_name(refused.value.errno) == "EIO", "README: a deleted volume's I/O is refused with EIO"
    made = emulator("array", "volume-create", str(array), "--name", "db2", "--size", "1MiB")
    assert made.returncode == 0, made.describe()
    again = nbd_connect(server.uri("db2"))
    again.pwrite(pattern, 0)
    assert again.pread(MIB, 0) == pattern
    # ...and one that has not touched its volume since the delete does not get
    # into the new one.
    assert emulator("array", "volume-create", str(array), "--name", "db3",
                    "--size", "1MiB").returncode == 0
    untouched = nbd_connect(server.uri("db3"))
    untouched.pread(4096, 0)
    assert emulator("array", "volume-delete", str(array), "--name", "db3").returncode == 0
    assert emulator("array", "volume-create", str(array), "--name", "db3",
                    "--size", "1MiB").returncode == 0
    with pytest.raises(nbd.Error) as refused:
        untouched.pwrite(b"\xee" * 4096, 0)
    assert errno_name(refused.value.errno) == "EIO"
    assert keep.pread(MIB, 0) == kept, "vol0 and its connection were not disturbed"
    for h in (old, fresh, untouched, again, keep):
        h.shutdown()
    server.stop_clean()


def test_bad_volume_requests_change_nothing(tmp_path):
    array = create_array(tmp_path)  # one volume filling the array
    metadata = array / "array.json"
    before = metadata.read_bytes()
    for args, needle in [
        (["volume-create", str(array), "--name", "x", "--size", "1MiB"], "no free space"),
        (["volume-create", str(array), "--name", "vol0", "--size", "1MiB"], "already exists"),
        (["volume-create", str(array), "--name", "a/b", "--size", "1MiB"], "volume name"),
        (["volume-create", str(array), "--name", "x", "--size", "1000"], "multiple of 4096"),
        (["volume-delete", str(array), "--name", "nope"], "no volume named"),
    ]:
        result = emulator("array", *args)
        assert result.returncode == 2, result.describe()
        assert needle in error_line(result), result.describe()
    assert metadata.read_bytes() == before
    assert emulator("array", "volume-delete", str(array), "--name", "vol0").returncode == 0
    result = emulator("serve", "--array", str(array), "--socket", str(tmp_path / "s.sock"))
    assert result.returncode == 2 and "no volumes" in error_line(result), result.describe()
