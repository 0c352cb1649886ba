"""Disk faults injected into a running domain through the API (`POST
/api/v1/faults`), applied by the fault layer of both drivers, and what a
user sees of them:

- a pulled disk is failed at once and rebuilt onto the hot spare while a
  writer with requests in flight loses nothing;
- bit rot (stored bits flipped, checksums left) is found and repaired by a
  scrub, and the next scrub finds nothing;
- unreadable sectors on one disk are reconstructed from parity (the host
  reads the right bytes), lost writes are caught by the writer's read-back
  and by a scrub, and on a volume
  with no redundancy left they are caught by the write oracle, which names
  the bytes;
- a full host file system under the disks (`host-fs-full`), through real NBD
  clients: overwrites go on, a write to a block never written fails with
  ENOSPC and leaves zeros, the drivers keep serving, and once cleared the
  write goes through and a scrub finds nothing; a write spanning two chunks
  of a RAID-5 row whose second member has no room fails without changing
  the first, so the row's parity stays in step;
- a power loss of the system (`power-loss`, from the command line): every
  process of it killed and started again, every block written since its
  disk's last flush lost (`--lose 1`), and nothing durable lost, no row out
  of step;
- bad requests are refused with a message naming what was wrong, and change
  nothing; every injection and clearing is in the fault log.
"""

from __future__ import annotations

import errno
import json
import os
import re

import pytest

from bbhelpers import BLOCK, KiB, MiB, emulator, errno_of, nbd_connect, run, wait_until
from test_domain import CONFIG, Domain
from test_failover import finish, scrub_is_clean, verify_nothing_lost, volumes, writer_going


def inject(domain: Domain, pair: str = "A", **fault) -> dict:
    status, record = domain.request(pair, "POST", "/api/v1/faults", fault)
    assert status == 201, (status, record)
    return record


def faults(domain: Domain, pair: str = "A") -> dict:
    return domain.get(pair, "/api/v1/faults")


def scrub(domain: Domain, repair: bool = False) -> dict:
    status, task = domain.submit("B", "c1", "scrub", repair=repair)
    assert status == 202, task
    ended = domain.wait_task("B", task["id"], timeout=120)
    assert ended["state"] == "complete", ended
    return ended["result"]


def system(domain: Domain, pair: str = "A") -> dict:
    return domain.get(pair, "/api/v1/domain")["systems"][0]


def test_a_pulled_disk_is_failed_at_once_and_rebuilt_onto_the_spare_while_nothing_is_lost(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        uri = volumes(domain)["vol0"]["uri"]
        record = tmp_path / "writes.jsonl"
        writer = writer_going(uri, seed, record, "6s")
        pulled = inject(domain, fault="disk-pull", disk=2)
        assert pulled["id"] == "f1" and pulled["standing"], pulled
        assert "disk 2 (disk2.img) of s0 pulled out" in pulled["effect"], pulled
        assert "the array failed it: degraded" in pulled["effect"], pulled

        def rebuilt():
            now = system(domain)
            disks = now["disks"]
            return now if (now["health"] == "optimal" and disks[2]["file"] == "spare0.img"
                           and disks[2]["state"] == "available") else None

        wait_until(rebuilt, 60, "the hot spare to take disk 2's place and be rebuilt")
        summary = finish(writer)
        assert summary["mismatches"] == 0, summary
        verify_nothing_lost(uri, record)
        # The fault stands (on disk2.img, out of the array now) until cleared.
        standing = faults(domain, "B")["standing"]
        assert [f["id"] for f in standing] == ["f1"], standing
        status, cleared = domain.request("B", "DELETE", "/api/v1/faults/f1")
        assert (status, cleared) == (200, {"cleared": ["f1"]})
        log = faults(domain)["log"]
        assert [(e["event"], e["id"]) for e in log] == [("injected", "f1"), ("cleared", "f1")], log
        assert log[0]["injected_ms"] <= log[1]["cleared_ms"]
        scrub_result = scrub(domain)
        assert scrub_result["checksum_errors"] == 0 and scrub_result["parity_mismatches"] == 0, scrub_result
    finally:
        if "writer" in locals() and writer.poll() is None:
            writer.kill()
        domain.down()


def test_bit_rot_is_found_and_repaired_by_a_scrub_and_the_next_scrub_finds_nothing(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        uri = volumes(domain)["vol0"]["uri"]
        record = tmp_path / "writes.jsonl"
        finish(writer_going(uri, seed, record, "2s"))
        rot = inject(domain, fault="disk-corrupt", disk=1, at_rest=True, bits=16, lba=0, sectors=8192, seed=seed)
        assert not rot["standing"] and "16 stored bit(s) flipped" in rot["effect"], rot
        assert faults(domain)["standing"] == []
        found = scrub(domain, repair=True)
        assert found["checksum_errors"] >= 1, found
        assert found["repaired"] >= found["checksum_errors"], found
        again = scrub(domain)
        assert again["checksum_errors"] == 0 and again["parity_mismatches"] == 0, again
        verify_nothing_lost(uri, record)
    finally:
        domain.down()


def test_unreadable_sectors_are_reconstructed_and_lost_writes_are_caught_by_a_scrub(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        uri = volumes(domain)["vol0"]["uri"]
        record = tmp_path / "writes.jsonl"
        finish(writer_going(uri, seed, record, "2s"))
        unreadable = inject(domain, fault="disk-error", disk=0, ops=["read"], lba=0, sectors=16384)
        assert "reads on LBA 0..16384 fail with EIO" in unreadable["effect"], unreadable
        # The host reads every byte right: the array reconstructs from parity.
        verify_nothing_lost(uri, record)
        status, _ = domain.request("A", "DELETE", "/api/v1/faults")
        assert status == 200
        lost = inject(domain, fault="disk-lost-writes", disk=1)
        # The writer reads back what it wrote: stale blocks are caught at once.
        writer = writer_going(uri, seed + 1, tmp_path / "more.jsonl", "2s")
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 1, (out, err[-2000:])
        summary = json.loads(out)
        assert summary["mismatches"] > 0 and summary["mismatch_details"], summary
        assert "read-back mismatch" in err
        status, _ = domain.request("A", "DELETE", f"/api/v1/faults/{lost['id']}")
        assert status == 200
        # And the scrub finds the stripes whose parity no longer matches.
        found = scrub(domain)
        assert found["parity_mismatches"] >= 1, found
    finally:
        domain.down()


def test_lost_writes_on_a_volume_with_no_redundancy_left_are_named_by_the_oracle(tmp_path, seed):
    domain = Domain(tmp_path, CONFIG.replace("spares = 1", "spares = 0").replace("disks = 5", "disks = 4"))
    domain.up()
    try:
        status, task = domain.submit("A", "c0", "fail-disk", disk=3)
        assert status == 202 and domain.wait_task("A", task["id"])["state"] == "complete", task
        uri = volumes(domain)["vol0"]["uri"]
        inject(domain, fault="disk-lost-writes", disk=0, rate=0.5, seed=seed)
        record = tmp_path / "writes.jsonl"
        writer = writer_going(uri, seed, record, "3s")
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 1 and json.loads(out)["mismatches"] > 0, out
        result = emulator("workload", "verify", "--uri", uri, "--record", record, "--json", timeout=120)
        assert result.returncode == 1, result.describe()
        report = json.loads(result.stdout)
        assert report["lost_blocks"] > 0 and report["lost_ranges"], report
        first = report["lost_ranges"][0]
        assert first["length"] >= 4096 and first["blocks"], first
    finally:
        domain.down()


def test_bad_fault_requests_are_refused_naming_what_was_wrong_and_change_nothing(tmp_path):
    domain = Domain(tmp_path)
    domain.up()
    try:
        cases = [
            ({"fault": "disk-melt", "disk": 1}, 400, "disk-fail, disk-pull"),
            ({"fault": "disk-error", "disk": 9}, 400, "s0 has disks 0..4 (4 members, then 1 spare(s)), not disk 9"),
            ({"fault": "disk-delay", "disk": 1, "errno": "EIO", "ms": 5}, 400, "disk-delay takes no `errno`"),
            ({"fault": "disk-delay", "disk": 1}, 400, "needs `ms`"),
            ({"fault": "disk-error", "disk": 1, "errno": "EWHAT"}, 400, "errno \"EWHAT\""),
            ({"fault": "disk-error", "disk": 1, "rate": 2}, 400, "0 < rate <= 1"),
            ({"fault": "disk-error", "disk": 1, "colour": "red"}, 400, "colour"),
            ({"fault": "disk-error", "system": "s7", "disk": 1}, 400, "no system s7"),
            ({"fault": "process-kill", "process": "s0/c9/driver"}, 400, "s0/c9/driver"),
            ({"fault": "disk-pull", "disk": 1, "process": "s0/c0/driver"}, 400, "disk-pull takes no `process`"),
            ({"fault": "disk-crash", "disk": 1, "nth": 0}, 400, "nth = 0"),
            ({"fault": "disk-crash", "disk": 1, "writers": ["janitor"]}, 400, "janitor"),
            ({"fault": "disk-crash", "disk": 1, "rate": 0.5}, 400, "disk-crash takes no `rate`"),
            ({"fault": "host-fs-full", "disk": 1}, 400, "unknown field `disk`"),
            ({"fault": "host-fs-full", "lba": 0}, 400, "unknown field `lba`"),
            ({"fault": "host-fs-full", "system": "s7"}, 400, "no system s7"),
            ({"fault": "journal-crash", "disk": 1}, 400, "unknown field `disk`"),
            ({"fault": "journal-crash", "nth": 0}, 400, "nth = 0"),
            ({"fault": "journal-crash", "process": "s0/c7/driver"}, 400, "s0/c7/driver"),
            ({"fault": "journal-crash", "system": "s7"}, 400, "no system s7"),
            ({"fault": "power-loss", "disk": 1}, 400, "unknown field `disk`"),
            ({"fault": "power-loss", "lose": 1.5}, 400, "lose = 1.5"),
            ({"fault": "power-loss", "after_ms": 700000}, 400, "after_ms = 700000"),
            ({"fault": "power-loss", "system": "s7"}, 400, "no system s7"),
        ]
        for body, expected, words in cases:
            status, reply = domain.request("A", "POST", "/api/v1/faults", body)
            assert status == expected and words in reply["error"], (body, status, reply)
        status, reply = domain.request("A", "POST", "/api/v1/faults", {"fault": "disk-fail", "disk": 1}, token=None)
        assert status == 401, reply
        status, reply = domain.request("A", "DELETE", "/api/v1/faults/f42")
        assert status == 404 and "no standing fault f42" in reply["error"], reply
        assert faults(domain) == {"standing": [], "log": []}
        assert system(domain)["health"] == "optimal"
        info = run(["nbdinfo", "--size", volumes(domain)["vol0"]["uri"]], check=True)
        assert int(info.stdout) > 0
    finally:
        domain.down()


def test_a_power_loss_kills_the_system_loses_what_was_not_flushed_and_brings_it_back(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        uri = volumes(domain)["vol0"]["uri"]
        record = tmp_path / "writes.jsonl"
        before = {name: p["pid"] for name, p in domain.processes().items()}
        # No FUA, a FLUSH every 200 writes: blocks not yet durable when the
        # power goes. Read-backs after the reconnect allow for their loss.
        writer = writer_going(uri, seed, record, "8s", extra=["--power-loss"], fua_every=0, flush_every=200)
        result = emulator("fault", "inject", "power-loss", "--after-ms", "500", "--lose", "1",
                          "--seed", str(seed), "--run-dir", domain.run_dir, "--json", timeout=150)
        assert result.returncode == 0, result.describe()
        cut = json.loads(result.stdout)
        assert cut["fault"] == "power-loss" and cut["lose"] == 1 and not cut["standing"], cut
        effect = cut["effect"]
        assert "power cut to s0: SIGKILL to " in effect and "8 processes started again" in effect, effect
        assert f"lose 1, seed {seed})" in effect, effect
        lost, written = map(int, re.search(r"lost (\d+) of the (\d+) blocks", effect).groups())
        assert lost == written > 0, effect
        after = domain.processes()
        assert all(after[name]["pid"] != pid and not after[name]["ended"] for name, pid in before.items()), after
        assert not list((domain.run_dir / "s0" / "disks").glob("*.undo")), "the undo logs are gone"
        for pair, cluster in [("A", "c0"), ("A", "c1"), ("B", "c0"), ("B", "c1")]:
            domain.wait_registered(pair, f"s0/{cluster}/agent-{pair.lower()}", timeout=30)
        summary = finish(writer)
        assert summary["reconnects"] >= 1 and summary["mismatches"] == 0, summary
        report = verify_nothing_lost(uri, record)
        # What was acknowledged and not durable when the power went never
        # became durable: no FLUSH after the cut covers it.
        assert report["writes_durable"] < summary["writes_acked"], (report, summary)
        scrub_is_clean(domain)
        logged = [e for e in faults(domain)["log"] if e.get("fault") == "power-loss"]
        assert len(logged) == 1 and logged[0]["effect"] == effect, logged
    finally:
        domain.down()


CHUNK = 64 * KiB
FS_FULL_EFFECT = ("the host file system under s0's disks is full: writes to blocks never written before "
                  "fail with ENOSPC (overwrites still succeed)")


def drivers_running(domain: Domain):
    """Both drivers alive, as the supervisor and server B see them."""
    for name in ("s0/c0/driver", "s0/c1/driver"):
        process = domain.processes()[name]
        assert process["ended"] is None and os.path.exists(f"/proc/{process['pid']}"), process
    for cluster in system(domain, "B")["clusters"]:
        states = {p["role"]: p["state"] for p in cluster["processes"]}
        assert states["driver"] == "running", cluster["processes"]


def no_space(h, data: bytes, offset: int):
    """A write the full file system refuses: libnbd's error is ENOSPC exactly."""
    import nbd

    with pytest.raises(nbd.Error) as refused:
        h.pwrite(data, offset)
    assert errno_of(refused.value) == errno.ENOSPC, refused.value


def test_a_full_host_file_system_refuses_new_blocks_with_enospc_and_takes_overwrites(tmp_path, rng):
    domain = Domain(tmp_path)
    domain.up()
    try:
        # The disks are sparse, so a block never written has no space yet.
        for disk in sorted((domain.run_dir / "s0" / "disks").glob("*.img")):
            assert os.stat(disk).st_blocks * 512 < os.stat(disk).st_size, disk
        uri = volumes(domain)["vol0"]["uri"]
        h = nbd_connect(uri)
        # Block X: chunk 0 of the volume's first row (its data disk and the
        # row's parity disk allocated at that offset).
        x = 0
        first = rng.randbytes(BLOCK)
        h.pwrite(first, x)
        h.flush()
        fault = inject(domain, fault="host-fs-full")
        assert (fault["fault"], fault["standing"], fault["effect"]) == ("host-fs-full", True, FS_FULL_EFFECT), fault

        # An overwrite of X: every block it touches is allocated.
        second = rng.randbytes(BLOCK)
        h.pwrite(second, x)
        assert h.pread(BLOCK, x) == second
        # Never written: the same place in the row's next chunk (its data disk
        # a hole, the parity block allocated: the data write fails first, so
        # nothing changes), and a row far away (holes on every disk).
        for y in (x + CHUNK, 8 * MiB):
            no_space(h, rng.randbytes(BLOCK), y)
            assert h.pread(BLOCK, y) == bytes(BLOCK), y
        # Acknowledged data is all there; the drivers keep serving.
        assert h.pread(BLOCK, x) == second
        h.flush()
        drivers_running(domain)

        # The fault stands, with its effect, for the API and the CLI.
        standing = faults(domain, "B")["standing"]
        assert [(f["id"], f["fault"], f["effect"]) for f in standing] == [(fault["id"], "host-fs-full", FS_FULL_EFFECT)]
        listed = emulator("fault", "list", "--run-dir", domain.run_dir, check=True)
        assert f"{fault['id']} host-fs-full since" in listed.stdout and FS_FULL_EFFECT in listed.stdout, listed.stdout
        # A field host-fs-full does not take, from the CLI: refused by name.
        refused = emulator("fault", "inject", "host-fs-full", "--disk", "1", "--run-dir", domain.run_dir)
        assert refused.returncode == 2 and "unknown field `disk`" in refused.stderr, refused.describe()

        cleared = emulator("fault", "clear", fault["id"], "--run-dir", domain.run_dir, check=True)
        assert cleared.stdout.strip() == f"cleared {fault['id']}", cleared.stdout
        assert faults(domain)["standing"] == []
        for y in (x + CHUNK, 8 * MiB):
            data = rng.randbytes(BLOCK)
            h.pwrite(data, y)
            assert h.pread(BLOCK, y) == data, y
        assert h.pread(BLOCK, x) == second
        h.flush()
        h.shutdown()
        drivers_running(domain)
        found = scrub(domain)
        assert found["checksum_errors"] == 0 and found["parity_mismatches"] == 0, found
        log = faults(domain)["log"]
        assert [(e["event"], e["id"]) for e in log] == [("injected", fault["id"]), ("cleared", fault["id"])], log
    finally:
        domain.down()


def test_a_write_over_two_chunks_refused_by_the_second_leaves_the_row_consistent(tmp_path, rng):
    domain = Domain(tmp_path)
    domain.up()
    try:
        h = nbd_connect(volumes(domain)["vol0"]["uri"])
        row = 3 * CHUNK  # RAID-5 on 4 disks: 3 data chunks a row
        at = 10 * row
        h.pwrite(rng.randbytes(CHUNK), at)  # chunk 0 (and the parity) allocated
        h.flush()
        inject(domain, fault="host-fs-full")
        no_space(h, rng.randbytes(2 * CHUNK), at)  # chunk 1's disk is a hole there
        status, _ = domain.request("A", "DELETE", "/api/v1/faults")
        assert status == 200
        h.shutdown()
        found = scrub(domain)
        assert found["checksum_errors"] == 0, found
        assert found["parity_mismatches"] == 0, found
    finally:
        domain.down()


def test_the_cli_refuses_host_fs_full_with_a_disk_naming_the_field(tmp_path):
    # serde refuses the fault before anything is looked up: no domain needed.
    result = emulator("fault", "inject", "host-fs-full", "--disk", "1", "--run-dir", tmp_path / "run")
    assert result.returncode == 2, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.describe()
    assert "host-fs-full" in lines[0] and "unknown field `disk`, expected `system`" in lines[0], lines
    assert not (tmp_path / "run").exists()
