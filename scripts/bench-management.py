#!/usr/bin/env python3
"""Benchmark of the management plane (not a test: it prints figures and fails
only when it cannot measure):

1. time from `emulator up` to every agent registered and reported, for the
   default domain (1 server system) and for 8 server systems;
2. the round trip of a small task (`report`), API -> server -> agent -> driver
   -> agent -> server, from the POST to the server's `task-changed` event that
   says it completed, p50 / p99 over many tasks;
3. resident memory per idle cluster (its driver and two agents: Pss, which
   counts pages shared by n processes 1/n each, so the clusters' figures add
   up to what they cost together; Rss, which counts the shared executable in
   every process, beside it), with 64 server systems started (and how long
   that took).

Usage: scripts/bench-management.py EMULATOR_BIN [OUT.md]
Environment: BENCH_TASKS (default 1000), BENCH_SYSTEMS_LARGE (default 64).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SYSTEM = """
[[systems]]
disks = 5
disk_size = "16MiB"
raid = "raid5"
spares = 1
volumes = 1
"""


def config(systems: int) -> str:
    return '[servers]\na = "s0/c0"\nb = "s0/c1"\n[ports]\nnbd = 0\nhttp = 0\n' + SYSTEM * systems


def up(emulator: Path, work: Path, systems: int) -> tuple[Path, float]:
    run_dir = work / f"run-{systems}"
    conf = work / f"domain-{systems}.toml"
    conf.write_text(config(systems))
    started = time.monotonic()
    subprocess.run([emulator, "up", "--config", conf, "--run-dir", run_dir, "--detach"],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    return run_dir, time.monotonic() - started


def down(emulator: Path, run_dir: Path):
    subprocess.run([emulator, "down", "--run-dir", run_dir], check=True, stdout=subprocess.DEVNULL, timeout=300)


def memory_kib(pid: int) -> dict[str, int]:
    """Pss (resident memory with pages shared among n processes counted 1/n
    each: what the processes cost together), Rss (each one's own count, the
    shared executable's pages included in every process) and Anonymous."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            values[key] = int(rest.split()[0])
    return values


def round_trips(run_dir: Path, count: int) -> list[float]:
    server = json.loads((run_dir / "servers" / "a.json").read_text())["http"]
    host, port = server.removeprefix("http://").split(":")
    token = (run_dir / "token").read_text().strip()
    done: dict[str, float] = {}
    ready = threading.Event()
    cond = threading.Condition()

    def listen():
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", "/api/v1/events")
        response = conn.getresponse()
        ready.set()
        event = None
        while True:
            line = response.fp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "task-changed":
                task = json.loads(line.split(":", 1)[1])["task"]
                if task["state"] in ("complete", "failed"):
                    with cond:
                        done[task["id"]] = time.perf_counter()
                        cond.notify_all()

    threading.Thread(target=listen, daemon=True).start()
    ready.wait(10)
    post = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"system": "s0", "cluster": "c1", "kind": "report"})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    times = []
    for _ in range(count):
        started = time.perf_counter()
        post.request("POST", "/api/v1/tasks", body, headers)
        response = post.getresponse()
        task = json.loads(response.read())
        if response.status != 202:
            raise SystemExit(f"bench-management: task refused: {task}")
        with cond:
            if not cond.wait_for(lambda: task["id"] in done, timeout=30):
                raise SystemExit(f"bench-management: task {task['id']} did not complete within 30 s")
            times.append(done[task["id"]] - started)
    return times


def main() -> int:
    emulator = Path(sys.argv[1]).resolve()
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("run/bench-management.md")
    tasks = int(os.environ.get("BENCH_TASKS", "1000"))
    large = int(os.environ.get("BENCH_SYSTEMS_LARGE", "64"))
    work = Path(tempfile.mkdtemp(prefix="bench-management.", dir="/dev/shm"))
    rows = []
    try:
        # 1. start-up.
        for systems, bar in ((1, 1.0), (8, 3.0)):
            run_dir, took = up(emulator, work, systems)
            print(f"bench-management: up, {systems} system(s): {took:.2f} s (bar {bar} s)", flush=True)
            rows.append((f"`up` to every agent registered and reported, {systems} system(s)", f"{took:.2f} s", f"≤ {bar} s"))
            if systems == 1:
                # 2. task round trips on the default-sized domain.
                round_trips(run_dir, 20)  # warm-up
                times = sorted(round_trips(run_dir, tasks))
                p50 = statistics.median(times) * 1000
                p99 = times[int(len(times) * 0.99) - 1] * 1000
                print(f"bench-management: task round trip over {tasks}: p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
                rows.append((f"task round trip API → driver → API (`report`), p50 of {tasks}", f"{p50:.2f} ms", ""))
                rows.append((f"task round trip, p99 of {tasks}", f"{p99:.2f} ms", "≤ 10 ms"))
            down(emulator, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        # 3. memory per idle cluster with many systems.
        run_dir, took = up(emulator, work, large)
        time.sleep(2)  # idle: let start-up allocations settle before sampling
        table = json.loads((run_dir / "processes.json").read_text())
        per_cluster: dict[str, dict[str, int]] = {}
        for process in table:
            name = process["name"]
            if name.startswith("host/") or "/server-" in name:
                continue
            cluster = name.rsplit("/", 1)[0]
            sums = per_cluster.setdefault(cluster, {})
            for key, value in memory_kib(process["pid"]).items():
                sums[key] = sums.get(key, 0) + value
        mib = lambda key: sorted(c[key] / 1024 for c in per_cluster.values())
        pss, rss, anon = mib("Pss"), mib("Rss"), mib("Anonymous")
        print(f"bench-management: {large} systems up in {took:.2f} s; per idle cluster: "
              f"Pss mean {statistics.mean(pss):.1f} MiB (max {pss[-1]:.1f}), Rss {statistics.mean(rss):.1f}, "
              f"anonymous {statistics.mean(anon):.1f}", flush=True)
        rows.append((f"`up` to every agent registered and reported, {large} systems", f"{took:.2f} s", ""))
        rows.append((f"resident memory per idle cluster (driver + 2 agents), Pss, mean of {len(pss)}",
                     f"{statistics.mean(pss):.1f} MiB", "≤ 20 MiB"))
        rows.append(("… the largest cluster, Pss", f"{pss[-1]:.1f} MiB", ""))
        rows.append(("… Rss (counts the executable's shared pages in each process)", f"{statistics.mean(rss):.1f} MiB", ""))
        rows.append(("… of which anonymous (the processes' own memory)", f"{statistics.mean(anon):.1f} MiB", ""))
        down(emulator, run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = ["# Management plane benchmark", "", f"{when}, nproc {os.cpu_count()}, kernel {os.uname().release}", "",
             "| measure | value | bar |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
