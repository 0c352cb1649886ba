"""Arrays used by several processes at once, while hosts keep reading and
writing: a disk failed under a running server, a rebuild by two controller
processes while a host writes, two servers writing the same stripes, and a
process killed in the middle of a stripe write (the stripe is resynced before
anyone trusts it)."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import time

import nbd
import pytest

from bbhelpers import corrupt_block, emulator, emulator_bin, errno_name, nbd_connect, wait_until
from test_array import DISK, MIB, create_array, serve_array, status

CHUNK = 64 * 1024


def member_chunks(array, disks: int, stripe: int) -> list[bytes]:
    """The raw bytes of `stripe`'s chunk on every member (what is on the media)."""
    chunks = []
    for disk in range(disks):
        with open(array / f"disk{disk}.img", "rb") as f:
            f.seek(stripe * CHUNK)
            chunks.append(f.read(CHUNK))
    return chunks


def xor(chunks: list[bytes]) -> bytes:
    acc = 0
    for chunk in chunks:
        acc ^= int.from_bytes(chunk, "little")
    return acc.to_bytes(CHUNK, "little")


def raid5_consistent(array, disks: int, stripe: int) -> bool:
    return xor(member_chunks(array, disks, stripe)) == bytes(CHUNK)



def crash_rule(array, disk_file: str, fault_id: str = "f1"):
    """A crash rule in the array's fault book (`controllers::faults`): the
    process making the first host write to `disk_file` dies there (SIGABRT),
    before storing it. It fires once: the rule leaves the book as it does."""
    rule = {"id": fault_id, "file": disk_file, "effect": "crash", "nth": 1, "stall_ms": 0,
            "ops": {"read": True, "write": True, "flush": True},
            "writers": {"host": True, "rebuild": False, "repair": False},
            "start": 0, "end": 2**64 - 1, "rate": 1.0, "seed": 0}
    (Path(array) / "faults.json").write_text(json.dumps([rule]))

def test_a_disk_failed_under_a_running_server_is_out_of_use_at_once(tmp_path, serve, rng):
    array = create_array(tmp_path)
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    # Array offset 64 KiB is data chunk 1 of stripe 0, which lives on disk 1 at 0.
    before = rng.randbytes(CHUNK)
    h.pwrite(before, CHUNK, nbd.CMD_FLAG_FUA)
    assert member_chunks(array, 4, 0)[1] == before, "an active member is written"

    failed = emulator("array", "fail", str(array), "--disk", "1")
    assert failed.returncode == 0, failed.describe()
    after = rng.randbytes(CHUNK)
    h.pwrite(after, CHUNK, nbd.CMD_FLAG_FUA)
    assert member_chunks(array, 4, 0)[1] == before, "the failed member is no longer written"
    assert h.pread(CHUNK, CHUNK) == after, "its data is reconstructed from the others"
    others = member_chunks(array, 4, 0)
    others[1] = after
    assert xor(others) == bytes(CHUNK), "parity was computed for the new data"
    h.shutdown()


def test_rebuild_by_two_controllers_while_a_host_writes(tmp_path, serve, rng):
    array = create_array(tmp_path, spares=1)
    size = 3 * DISK
    model = bytearray(rng.randbytes(size))
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    for offset in range(0, size, 4 * MIB):
        h.pwrite(bytes(model[offset:offset + 4 * MIB]), offset)
    h.flush()

    # Disk 2 dies and is replaced while the server keeps running.
    assert emulator("array", "fail", str(array), "--disk", "2").returncode == 0
    assert h.pread(size, 0) == model, "degraded reads reconstruct"
    assert emulator("array", "replace", str(array), "--disk", "2").returncode == 0
    assert status(array)["members"][2]["state"] == "rebuilding"

    # 8 MiB per disk at 4 MiB/s: the host has about two seconds of writes to
    # land before, inside and after the stripes being rebuilt.
    rebuild = subprocess.Popen(
        [str(emulator_bin()), "array", "rebuild", str(array), "--controllers", "2",
         "--rate", "4", "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    writes = 0
    while rebuild.poll() is None or writes < 20:
        length = rng.choice([4096, 3 * 4096, CHUNK, 5 * CHUNK + 4096, MIB])
        offset = rng.randrange(0, size - length) // 4096 * 4096
        data = rng.randbytes(length)
        h.pwrite(data, offset)
        model[offset:offset + length] = data
        writes += 1
        probe = rng.randrange(0, size - CHUNK)
        assert h.pread(CHUNK, probe) == model[probe:probe + CHUNK], f"read at {probe} during the rebuild"
    stdout, stderr = rebuild.communicate(timeout=60)
    assert rebuild.returncode == 0, stderr
    assert json.loads(stdout)["unrecoverable"] == []
    h.flush()
    assert status(array)["state"] == "optimal"
    assert h.pread(size, 0) == model, "after the rebuild (the server now reads the new disk)"
    h.shutdown()
    server.stop_clean()

    for member in status(array)["members"]:
        assert emulator("image", "verify", str(array / member["file"])).returncode == 0
    scrub = emulator("array", "scrub", str(array), "--wait", "--json", timeout=120)
    assert scrub.returncode == 0, scrub.describe()
    assert json.loads(scrub.stdout)["parity_mismatches"] == 0
    # The rebuilt disk must now carry its share: lose another one and read all.
    assert emulator("array", "fail", str(array), "--disk", "0").returncode == 0
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    assert h.pread(size, 0) == model, "the rebuilt disk holds every write made during the rebuild"
    h.shutdown()


def test_two_servers_writing_the_same_stripes_keep_parity_consistent(tmp_path, serve, rng):
    """Read-modify-write of parity from two processes at once: without locks held
    across processes, parity updates are lost and stripes go inconsistent."""
    array = create_array(tmp_path, chunk="4KiB")
    first = serve_array(serve, array)
    second = serve_array(serve, array)
    handles = [nbd_connect(first.uri("vol0")), nbd_connect(second.uri("vol0"))]
    stripes = 16
    row = 3 * 4096
    for _ in range(300):
        for h in handles:
            # Many writes in flight on both servers, each to one 4 KiB block of
            # the first 16 stripes: every write is a parity read-modify-write.
            for _ in range(16):
                offset = rng.randrange(0, stripes * row // 4096) * 4096
                h.aio_pwrite(rng.randbytes(4096), offset)
        for h in handles:
            while h.aio_in_flight() > 0:
                h.poll(-1)
    for h in handles:
        h.flush()
        h.shutdown()
    first.stop_clean()
    second.stop_clean()
    scrub = emulator("array", "scrub", str(array), "--wait", "--json", timeout=120)
    assert scrub.returncode == 0, scrub.describe()
    assert json.loads(scrub.stdout)["parity_mismatches"] == 0


@pytest.mark.parametrize("level,disks", [("raid5", 4), ("raid1", 2)])
def test_a_stripe_left_half_written_by_a_killed_process_is_resynced(tmp_path, serve, rng, level, disks):
    array = create_array(tmp_path, level=level, disks=disks)
    # The server aborts in the middle of its first stripe write: the first member
    # is written, the rest (parity, or the other mirror) is not.
    crash_rule(array, "disk3.img" if level == "raid5" else "disk1.img")
    server = serve(None, "unix", extra=["--array", str(array)])
    server.expect_dead = True  # it aborts on purpose; asserted below
    h = nbd_connect(server.uri("vol0"))
    with pytest.raises(nbd.Error):
        h.pwrite(rng.randbytes(4096), 0)
    assert server.proc.wait(timeout=10) == -6, "SIGABRT"
    assert "fault f1: dying at host write 1" in server.log()

    chunks = member_chunks(array, disks, 0)
    torn = xor(chunks) != bytes(CHUNK) if level == "raid5" else chunks[0] != chunks[1]
    assert torn, "the crash left stripe 0 inconsistent on the media"

    # The next process to open the array recovers the dead one's slot and resyncs
    # the stripe it was writing before anything else can use it.
    result = emulator("array", "status", str(array), "--json")
    assert result.returncode == 0, result.describe()
    assert "resynced" in result.stderr, result.describe()
    chunks = member_chunks(array, disks, 0)
    if level == "raid5":
        assert xor(chunks) == bytes(CHUNK)
    else:
        assert chunks[0] == chunks[1]
    scrub = emulator("array", "scrub", str(array), "--wait", "--json", timeout=120)
    assert scrub.returncode == 0, scrub.describe()
    assert json.loads(scrub.stdout)["parity_mismatches"] == 0


def test_a_process_killed_mid_write_on_a_degraded_raid5_loses_nothing_acknowledged(
        tmp_path, serve, rng):
    """The RAID-5 write hole: on a degraded array a process dies between the data
    and the parity write of a stripe. The failed member's bytes in that stripe
    exist only as data XOR parity; the journal restores them."""
    array = create_array(tmp_path)
    server = serve(None, "unix", extra=["--array", str(array)])
    h = nbd_connect(server.uri("vol0"))
    row = rng.randbytes(3 * CHUNK)  # stripe 0: disk0, disk1, disk2 data; parity on disk3
    h.pwrite(row, 0, nbd.CMD_FLAG_FUA)
    h.shutdown()
    server.stop_clean()
    failed = emulator("array", "fail", str(array), "--disk", "1")
    assert failed.returncode == 0, failed.describe()

    crash_rule(array, "disk3.img")
    crashing = serve(None, "unix", extra=["--array", str(array)])
    crashing.expect_dead = True  # it aborts on purpose
    h = nbd_connect(crashing.uri("vol0"))
    with pytest.raises(nbd.Error):
        h.pwrite(rng.randbytes(4096), 0)  # disk0 written, parity not
    assert crashing.proc.wait(timeout=10) == -6, "SIGABRT"

    result = emulator("array", "status", str(array), "--json")
    assert result.returncode == 0, result.describe()
    assert "from the journal" in result.stderr, result.describe()
    server = serve(None, "unix", extra=["--array", str(array)])
    h = nbd_connect(server.uri("vol0"))
    assert h.pread(CHUNK, CHUNK) == row[CHUNK:2 * CHUNK], "the failed member's data survived"
    assert h.pread(CHUNK, 2 * CHUNK) == row[2 * CHUNK:]
    assert h.pread(CHUNK - 4096, 4096) == row[4096:CHUNK], "outside the interrupted write"
    h.shutdown()
    server.stop_clean()


def test_a_waiting_server_recovers_a_stripe_lock_held_by_a_killed_process(tmp_path, serve, rng):
    """A live server that needs a stripe a dead process held does not hang: it
    notices the holder is gone, resyncs the stripe and goes on."""
    array = create_array(tmp_path)
    healthy = serve_array(serve, array)
    crash_rule(array, "disk3.img")  # the first host write to it (the crashing server's) dies
    crashing = serve(None, "unix", extra=["--array", str(array)])
    crashing.expect_dead = True  # it aborts on purpose
    h = nbd_connect(crashing.uri("vol0"))
    with pytest.raises(nbd.Error):
        h.pwrite(rng.randbytes(4096), 0)
    crashing.proc.wait(timeout=10)
    assert xor(member_chunks(array, 4, 0)) != bytes(CHUNK)

    g = nbd_connect(healthy.uri("vol0"))
    started = time.monotonic()
    data = rng.randbytes(4096)
    g.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    assert time.monotonic() - started < 5
    assert g.pread(4096, 0) == data
    assert xor(member_chunks(array, 4, 0)) == bytes(CHUNK)
    g.shutdown()
    wait_until(lambda: "resynced" in healthy.log(), 5, "the healthy server logs the resync")


def task_status(array) -> dict | None:
    tasks = status(array)["tasks"]
    assert len(tasks) <= 1, tasks
    return tasks[0] if tasks else None


def controllers_running(array) -> bool:
    found = subprocess.run(["pgrep", "-f", f"controller {array} --task"], capture_output=True, text=True)
    return bool(found.stdout.strip())


def test_pause_set_rate_resume_of_a_running_rebuild(tmp_path):
    array = create_array(tmp_path, spares=1)
    fail_and_replace(array, 1)
    # 1 MiB/s in all, 0.5 MiB/s per controller: a 1 MiB step takes each about 2 s.
    started = emulator("array", "rebuild", str(array), "--controllers", "2", "--rate", "1")
    assert started.returncode == 0, started.describe()
    wait_until(lambda: (task_status(array) or {}).get("bytes_done", 0) >= MIB, 15, "the rebuild makes progress")
    assert task_status(array)["rate_limit_mib_s"] == 1.0

    paused = emulator("array", "pause", str(array), "--json")
    assert paused.returncode == 0, paused.describe()
    assert json.loads(paused.stdout)["control"] == "pause"
    first = task_status(array)["bytes_done"]
    # Each controller may finish the step it is in; then nothing moves.
    time.sleep(2.5)  # a measurement window, not synchronisation
    second = task_status(array)["bytes_done"]
    assert second - first <= 2 * MIB, (first, second)
    time.sleep(1.0)  # a measurement window
    third = task_status(array)
    assert third["bytes_done"] == second and third["control"] == "pause"
    assert third["eta_s"] is None
    assert third["bytes_done"] <= DISK - 4 * MIB, "at least 4 MiB left: 4 s at the old rate"

    assert emulator("array", "set-rate", str(array), "--rate", "0").returncode == 0
    assert task_status(array)["rate_limit_mib_s"] is None
    resumed_at = time.monotonic()
    assert emulator("array", "resume", str(array)).returncode == 0
    wait_until(lambda: task_status(array) is None, 20, "the rebuild finishes")
    assert time.monotonic() - resumed_at < 3.5, "unlimited, the rest takes well under the old rate's 4 s"
    wait_until(lambda: not controllers_running(array), 10, "the controllers exit")
    assert status(array)["state"] == "optimal"
    report = json.loads((array / "rebuild-report.json").read_text())
    assert report["rebuilt_disk"] == 1 and report["unrecoverable"] == []


def test_cancel_stops_the_controllers_and_a_new_rebuild_starts_over(tmp_path):
    array = create_array(tmp_path, spares=1)
    fail_and_replace(array, 3)
    waiting = subprocess.Popen(
        [str(emulator_bin()), "array", "rebuild", str(array), "--controllers", "2", "--rate", "1", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: (task_status(array) or {}).get("bytes_done", 0) > 0, 15, "the rebuild makes progress")
    cancelled = emulator("array", "cancel", str(array))
    assert cancelled.returncode == 0, cancelled.describe()
    assert task_status(array) is None
    assert not (array / "task-rebuild.coord").exists()
    _, stderr = waiting.communicate(timeout=20)
    assert waiting.returncode == 2 and "cancelled" in stderr, stderr
    wait_until(lambda: not controllers_running(array), 10, "the controllers exit")
    assert status(array)["members"][3]["state"] == "rebuilding", "still written, not read"
    again = emulator("array", "rebuild", str(array), "--controllers", "2", "--wait", "--json", timeout=120)
    assert again.returncode == 0, again.describe()
    assert status(array)["state"] == "optimal"
    for member in status(array)["members"]:
        assert emulator("image", "verify", str(array / member["file"])).returncode == 0


def test_task_control_and_a_corrupt_coordination_file_give_clear_errors(tmp_path):
    from bbhelpers import error_line, snapshot

    array = create_array(tmp_path)
    for verb in ["pause", "resume", "cancel"]:
        result = emulator("array", verb, str(array))
        assert result.returncode == 2 and "no rebuild or scrub is in progress" in error_line(result), result.describe()
    result = emulator("array", "pause", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "is not an array" in error_line(result), result.describe()

    coordination = array / "task-scrub.coord"
    coordination.write_bytes(b"EMUTASK1" + bytes(5000))
    before = snapshot(*sorted(array.iterdir()))
    for args in (["scrub", str(array), "--wait"], ["pause", str(array)], ["set-rate", str(array), "--rate", "5"]):
        result = emulator("array", *args)
        assert result.returncode == 2, result.describe()
        line = error_line(result)
        assert "task-scrub.coord" in line and ("checksum" in line or "version" in line), line
    assert snapshot(*sorted(array.iterdir())) == before, "nothing was changed"
    # Only a cancel removes it (nothing can use it), after which a scrub runs.
    cancelled = emulator("array", "cancel", str(array))
    assert cancelled.returncode == 0, cancelled.describe()
    assert not coordination.exists()
    scrub = emulator("array", "scrub", str(array), "--wait")
    assert scrub.returncode == 0, scrub.describe()


def test_a_corrupt_live_state_file_is_refused_and_left_alone(tmp_path):
    from bbhelpers import error_line, snapshot

    array = create_array(tmp_path)
    live = array / "array.live"
    live.write_bytes(b"\xff" * live.stat().st_size)
    before = snapshot(*sorted(array.iterdir()))
    for args in (["status", str(array)], ["fail", str(array), "--disk", "1"], ["scrub", str(array), "--wait"]):
        result = emulator("array", *args)
        assert result.returncode == 2, result.describe()
        assert "array.live" in error_line(result) and "not a valid live-state file" in error_line(result)
    assert snapshot(*sorted(array.iterdir())) == before


def fail_and_replace(array, disk):
    """Fails member `disk` and puts the next spare in its place (rebuilding)."""
    assert emulator("array", "fail", str(array), "--disk", str(disk)).returncode == 0
    replaced = emulator("array", "replace", str(array), "--disk", str(disk))
    assert replaced.returncode == 0, replaced.describe()


def filled(tmp_path, serve, rng, spares, level="raid5", disks=4):
    """An array whose volume holds random data; returns it and the data."""
    array = create_array(tmp_path, level=level, disks=disks, spares=spares)
    data = rng.randbytes(status(array)["data_bytes"])
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    for at in range(0, len(data), 4 * MIB):
        h.pwrite(data[at:at + 4 * MIB], at)
    h.flush()
    h.shutdown()
    server.stop_clean()
    return array, data


def read_volume(serve, array, length):
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    got = b"".join(h.pread(min(4 * MIB, length - at), at) for at in range(0, length, 4 * MIB))
    h.shutdown()
    server.stop_clean()
    return got


def start_slow_rebuild(array):
    """Starts a rebuild at 1 MiB/s and waits until it has done something."""
    started = emulator("array", "rebuild", str(array), "--rate", "1")
    assert started.returncode == 0, started.describe()
    wait_until(lambda: (task_status(array) or {}).get("bytes_done", 0) > 0, 15, "the rebuild makes progress")


def test_a_disk_failed_and_replaced_during_its_rebuild_is_rebuilt_from_the_start(tmp_path, serve, rng):
    array, data = filled(tmp_path, serve, rng, spares=2)
    fail_and_replace(array, 1)
    start_slow_rebuild(array)
    # The disk being rebuilt fails, and the next spare replaces it: what the
    # rebuild had done was on the other image.
    fail_and_replace(array, 1)
    wait_until(lambda: not controllers_running(array), 15, "the old rebuild's controllers stop")
    assert status(array)["members"][1] == {"file": "spare1.img", "state": "rebuilding"}
    again = emulator("array", "rebuild", str(array), "--wait", "--json", timeout=120)
    assert again.returncode == 0, again.describe()
    assert status(array)["state"] == "optimal"
    scrub = emulator("array", "scrub", str(array), "--wait", "--json", timeout=120)
    assert scrub.returncode == 0, scrub.describe()
    report = json.loads(scrub.stdout)
    assert (report["checksum_errors"], report["parity_mismatches"]) == (0, 0), report
    assert read_volume(serve, array, len(data)) == data


def test_a_rebuild_stops_when_the_array_fails_and_the_disk_never_becomes_active(tmp_path, serve, rng):
    array, data = filled(tmp_path, serve, rng, spares=1)
    fail_and_replace(array, 1)
    start_slow_rebuild(array)
    assert emulator("array", "fail", str(array), "--disk", "2").returncode == 0
    wait_until(lambda: not controllers_running(array), 15, "the rebuild's controllers stop")
    after = status(array)
    assert after["state"] == "failed", after
    assert after["members"][1]["state"] == "rebuilding"
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    with pytest.raises(nbd.Error) as refused:
        h.pread(4096, 0)
    assert errno_name(refused.value.errno) == "EIO", "README: a FAILED array's I/O returns EIO"
    h.shutdown()
    server.stop_clean()


def test_a_block_that_cannot_be_rebuilt_reads_as_an_error_not_zeros(tmp_path, serve, rng):
    array, data = filled(tmp_path, serve, rng, spares=1)
    fail_and_replace(array, 1)
    # A latent error on another member, in stripe 0: disk 2 holds data chunk 2
    # there (array offset 2 * CHUNK), disk 1 data chunk 1 (array offset CHUNK).
    corrupt_block(array / "disk2.img", 0, rng)
    rebuilt = emulator("array", "rebuild", str(array), "--wait", "--json", timeout=120)
    assert rebuilt.returncode == 1, rebuilt.describe()  # done, with data lost
    report = json.loads(rebuilt.stdout)
    assert report["unrecoverable"] == [CHUNK, 2 * CHUNK], report
    assert status(array)["state"] == "optimal"
    server = serve_array(serve, array)
    h = nbd_connect(server.uri("vol0"))
    for lost in (CHUNK, 2 * CHUNK):
        with pytest.raises(nbd.Error) as refused:
            h.pread(4096, lost)
        assert errno_name(refused.value.errno) == "EIO"
    # Everything else is intact, the rest of those chunks included.
    for at in (0, CHUNK + 4096, 2 * CHUNK + 4096, 3 * CHUNK, len(data) - MIB):
        assert h.pread(4096, at) == data[at:at + 4096], at
    h.shutdown()
    server.stop_clean()


def test_a_rate_limit_slower_than_the_lease_keeps_each_partition_with_its_controller(tmp_path):
    # 2 MiB/s for two controllers: 1 MiB/s each, so each 1 MiB step waits about
    # 1 s, five times the 200 ms lease. The waiting controller must keep
    # renewing its claim, or the other takes the partition over (and back).
    array = create_array(tmp_path)
    started = time.monotonic()
    result = emulator("array", "scrub", str(array), "--controllers", "2", "--rate", "2",
                      "--lease-ms", "200", "--wait", "--json", timeout=60)
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)
    assert report["rows_checked"] == DISK // 4096
    logs = "".join((array / f"controller-{i}.log").read_text() for i in (0, 1))
    assert "lease lost" not in logs and "took_over=true" not in logs, logs
    assert time.monotonic() - started < 30


def test_task_flags_out_of_range_are_refused(tmp_path):
    array = create_array(tmp_path)
    for args in (["--lease-ms", "0"], ["--json"]):
        result = emulator("array", "scrub", str(array), *args)
        assert result.returncode == 2, result.describe()
        assert not (array / "task-scrub.coord").exists()


def test_completion_actions_that_failed_run_again_with_the_next_command(tmp_path):
    array = create_array(tmp_path)
    report = array / "scrub-report.json"
    report.mkdir()  # the completion actions cannot write the report
    failed = emulator("array", "scrub", str(array), "--wait", timeout=60)
    assert failed.returncode == 2, failed.describe()
    report.rmdir()
    again = emulator("array", "scrub", str(array), "--wait", "--json", timeout=60)
    assert again.returncode == 0, again.describe()
    assert json.loads(again.stdout)["rows_checked"] == DISK // 4096
    assert json.loads(report.read_text())["rows_checked"] == DISK // 4096
    assert task_status(array) is None


def test_a_scrub_resumed_after_its_controller_was_killed_still_reports_what_it_found(tmp_path, rng):
    # 64 MiB members: partitions of 4 MiB, so the kill lands inside one.
    array = tmp_path / "array"
    created = emulator("array", "create", str(array), "--level", "raid1", "--disks", "2",
                       "--disk-size", "64MiB")
    assert created.returncode == 0, created.describe()
    for block in (1, 5, 9):  # in the first MiB of partition 0
        corrupt_block(array / "disk1.img", block, rng)
    started = emulator("array", "scrub", str(array), "--rate", "1", "--lease-ms", "500")
    assert started.returncode == 0, started.describe()
    wait_until(lambda: (task_status(array) or {}).get("bytes_done", 0) >= MIB, 15, "the scrub passes 1 MiB")
    found = subprocess.run(["pgrep", "-f", f"controller {array} --task scrub"], capture_output=True, text=True)
    for pid in found.stdout.split():
        subprocess.run(["kill", "-9", pid], check=True)
    wait_until(lambda: not controllers_running(array), 10, "the controller is gone")
    resumed = emulator("array", "scrub", str(array), "--wait", "--json", timeout=60)
    assert resumed.returncode == 1, resumed.describe()  # errors found, not repaired
    report = json.loads(resumed.stdout)
    assert report["checksum_errors"] == 3, report
    assert report["rows_checked"] == 64 * MIB // 4096, report


def test_starting_a_task_that_is_running_starts_nothing_and_wait_attaches_to_it(tmp_path):
    from bbhelpers import error_line

    array = create_array(tmp_path)
    started = emulator("array", "scrub", str(array), "--rate", "2")
    assert started.returncode == 0, started.describe()
    wait_until(lambda: (task_status(array) or {}).get("bytes_done", 0) > 0, 15, "the scrub makes progress")
    log = array / "controller-0.log"
    logged = log.stat().st_size
    again = emulator("array", "scrub", str(array))
    assert again.returncode == 2 and "already running" in error_line(again), again.describe()
    assert task_status(array)["rate_limit_mib_s"] == 2.0, "the running task's rate is left alone"
    assert log.stat().st_size >= logged, "its log is not cut"
    waited = emulator("array", "scrub", str(array), "--wait", "--json", timeout=60)
    assert waited.returncode == 0, waited.describe()
    assert json.loads(waited.stdout)["rows_checked"] == DISK // 4096
    found = subprocess.run(["pgrep", "-fc", f"controller {array} --task scrub"], capture_output=True, text=True)
    assert found.stdout.strip() == "0", "no second set of controllers was started"


def test_starts_at_the_same_time_start_one_task(tmp_path):
    """Four `array scrub` commands started at once: exactly one starts the
    controllers, the other three exit 2 ("already running") and change nothing."""
    array = create_array(tmp_path)
    rates = (1, 2, 3, 4)
    # Each waits on its stdin, so that all four start as close together as can be.
    starts = [
        subprocess.Popen(
            ["sh", "-c", 'read go && exec "$0" "$@"', str(emulator_bin()), "array", "scrub", str(array), "--rate", f"{rate}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rate in rates
    ]
    for p in starts:
        p.stdin.write("go\n")
    for p in starts:
        p.stdin.close()
    results = [(p.wait(timeout=60), p.stderr.read(), rate) for p, rate in zip(starts, rates)]
    for p in starts:
        p.stdout.close()
        p.stderr.close()
    started = [rate for code, _, rate in results if code == 0]
    refused = [err for code, err, _ in results if code == 2 and "already running" in err]
    assert len(started) == 1 and len(refused) == 3, results
    wait_until(lambda: task_status(array) is not None, 15, "the task is visible")
    assert task_status(array)["rate_limit_mib_s"] == float(started[0]), "the winner's rate, set once"
    found = subprocess.run(["pgrep", "-fc", f"controller {array} --task scrub"], capture_output=True, text=True)
    assert found.stdout.strip() == "1", "one controller was started"
    cancelled = emulator("array", "cancel", str(array))
    assert cancelled.returncode == 0, cancelled.describe()
    wait_until(lambda: not controllers_running(array), 15, "the controller stops")


def test_rebuild_completion_actions_that_failed_run_again_with_the_next_command(tmp_path):
    array = create_array(tmp_path, spares=1)
    fail_and_replace(array, 1)
    report = array / "rebuild-report.json"
    report.mkdir()  # the disk is made active, then the report cannot be written
    failed = emulator("array", "rebuild", str(array), "--wait", timeout=60)
    assert failed.returncode == 2, failed.describe()
    report.rmdir()
    again = emulator("array", "rebuild", str(array), "--wait", "--json", timeout=60)
    assert again.returncode == 0, again.describe()
    assert json.loads(report.read_text())["rebuilt_disk"] == 1
    assert status(array)["state"] == "optimal"
    assert task_status(array) is None


def test_cancel_with_two_tasks_running_asks_which(tmp_path):
    from bbhelpers import error_line

    array = create_array(tmp_path, spares=1)
    fail_and_replace(array, 1)
    for kind in ("rebuild", "scrub"):
        started = emulator("array", kind, str(array), "--rate", "1")
        assert started.returncode == 0, started.describe()
    ambiguous = emulator("array", "cancel", str(array))
    assert ambiguous.returncode == 2 and "--task" in error_line(ambiguous), ambiguous.describe()
    assert (array / "task-rebuild.coord").exists() and (array / "task-scrub.coord").exists()
    for kind in ("rebuild", "scrub"):
        cancelled = emulator("array", "cancel", str(array), "--task", kind)
        assert cancelled.returncode == 0, cancelled.describe()
    wait_until(lambda: not controllers_running(array), 15, "the controllers stop")
    assert status(array)["members"][1]["state"] == "rebuilding"
