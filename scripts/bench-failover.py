#!/usr/bin/env python3
"""`make bench-failover`: the I/O stall a host sees when the controller that
owns its volume dies, measured with the write oracle (`emulator workload`).

A default-shaped domain runs (`emulator up --detach`, run directory on tmpfs or
BENCH_DIR). Each round starts a writer (16 requests in flight, a FLUSH every 32
writes) on the volume's URI, lets it run, then fails the owning driver:

- `kill -9`: the stall is from the kill to the first request completed on the
  survivor (the writer reconnects to the same address, which the survivor
  took over);
- `kill -STOP` (a hung controller): the same, which includes the lease (1 s)
  running out and the fencing (SIGKILL) before the takeover.

Then the record is verified (nothing acknowledged-and-flushed lost, or the
benchmark fails), the driver is restarted and the volume fails back before the
next round. Prints a table (median and max per kind) and writes it as
Markdown.

Usage: bench-failover.py EMULATOR OUT.md   (ROUNDS=10 HANG_ROUNDS=5)
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
[servers]
a = "s0/c0"
b = "s0/c1"
[ports]
nbd = 0
http = 0
[[systems]]
disks = 5
disk_size = "64MiB"
raid = "raid5"
spares = 1
volumes = 1
"""


def main() -> int:
    emulator, out = sys.argv[1], Path(sys.argv[2])
    rounds = int(os.environ.get("ROUNDS", "10"))
    hang_rounds = int(os.environ.get("HANG_ROUNDS", "5"))
    base = os.environ.get("BENCH_DIR") or "/dev/shm"
    work = Path(tempfile.mkdtemp(prefix="bench-failover-", dir=base))
    run_dir = work / "run"
    (work / "domain.toml").write_text(CONFIG)

    def em(*args, check=True, timeout=120):
        result = subprocess.run([emulator, *map(str, args)], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SystemExit(f"emulator {' '.join(map(str, args))}: exit {result.returncode}\n{result.stderr}")
        return result

    def volume():
        view = json.loads(em("status", "--run-dir", run_dir, "--json").stdout)
        return view["systems"][0]["volumes"][0]

    def wait(condition, seconds, what):
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.01)

    def driver_pid():
        processes = json.loads((run_dir / "processes.json").read_text())
        return next(p["pid"] for p in processes if p["name"] == "s0/c0/driver")

    em("up", "--config", work / "domain.toml", "--run-dir", run_dir, "--detach")
    stalls = {"kill -9": [], "kill -STOP (fenced)": []}
    try:
        plan = ["kill -9"] * rounds + ["kill -STOP (fenced)"] * hang_rounds
        for number, kind in enumerate(plan, 1):
            wait(lambda: (volume()["owner"], volume()["path"]) == ("s0/c0", "optimized"), 30, "the volume at s0/c0")
            uri = volume()["uri"]
            record = work / f"round-{number}.jsonl"
            writer = subprocess.Popen(
                [emulator, "workload", "run", "--uri", uri, "--seed", str(number), "--duration", "4s",
                 "--qd", "16", "--flush-every", "32", "--request-timeout", "10s", "--record", str(record), "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait(lambda: record.exists() and record.read_text().count('{"acked":') >= 500, 30, "the writer")
            pid = driver_pid()
            killed_ms = time.time() * 1000
            os.kill(pid, signal.SIGKILL if kind == "kill -9" else signal.SIGSTOP)
            output, errors = writer.communicate(timeout=120)
            if writer.returncode != 0:
                raise SystemExit(f"round {number}: workload exit {writer.returncode}\n{errors[-2000:]}")
            summary = json.loads(output)
            resumed = [t for t in summary["resumed_unix_ms"] if t >= killed_ms]
            if not resumed:
                raise SystemExit(f"round {number}: the writer never resumed after the kill: {summary}")
            stall = resumed[0] - killed_ms
            stalls[kind].append(stall)
            verified = em("workload", "verify", "--uri", uri, "--record", record, "--json", check=False)
            if verified.returncode != 0:
                raise SystemExit(f"round {number}: acknowledged writes lost!\n{verified.stdout}\n{verified.stderr}")
            print(f"round {number:2} {kind:20} stall {stall:7.1f} ms  ({summary['writes_acked']} writes acked, verified)",
                  flush=True)
            wait(lambda: (volume()["owner"], volume()["path"]) == ("s0/c1", "failed-over"), 30, "the takeover")
            em("restart", "--run-dir", run_dir, "s0/c0/driver")
    finally:
        em("down", "--run-dir", run_dir, check=False)
    rows = [
        "| owner failure | rounds | median stall | max stall | bar |",
        "|---|---:|---:|---:|---|",
    ]
    for kind, values in stalls.items():
        if values:
            rows.append(f"| {kind} | {len(values)} | {statistics.median(values):.0f} ms | {max(values):.0f} ms |"
                        f" {'median ≤ 1 s' if kind == 'kill -9' else ''} |")
    table = "\n".join(rows)
    print()
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
