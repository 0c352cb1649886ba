#!/usr/bin/env bash
# Benchmark, not a test: rebuild and scrub of arrays of 4 x 1 GiB members (RAID-5)
# and 2 x 1 GiB (RAID-1) on tmpfs ($BENCH_DIR, default /dev/shm), with 1 and with 2 controller processes, in one
# run; prints GiB/s for each (best of $REPEAT runs), the 2-vs-1 ratio, CPU seconds
# per GiB, this machine's memcpy bandwidth as the ceiling, the speed of a plain
# kernel file copy (scripts/bench-filecopy.c) as a rebuild's ceiling, and how long
# `array replace` (which allocates the new disk) took. Writes the table as Markdown
# to $BENCH_OUT.
#
#   scripts/bench-controllers.sh            (DISK=1GiB; DISK=256MiB for a quick look)
#
# BENCH_DIR picks the file system the disks live on; for a tmpfs with huge pages:
#   mount -t tmpfs -o huge=always,size=12G tmpfs /mnt/huge && BENCH_DIR=/mnt/huge make bench-controllers
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DISK=${DISK:-1GiB}
REPEAT=${REPEAT:-2} # runs of each measurement; the table shows the fastest
BENCH_OUT=${BENCH_OUT:-run/bench-controllers.md}
EMULATOR=${EMULATOR:-}
if [ -z "$EMULATOR" ]; then
  cargo build --release --locked >&2
  EMULATOR=$PWD/target/release/emulator
fi
for tool in fio cc python3; do
  command -v "$tool" >/dev/null || { echo "bench-controllers: missing $tool" >&2; exit 2; }
done

BENCH_DIR=${BENCH_DIR:-/dev/shm}
scratch=$(mktemp -d "$BENCH_DIR/bench-controllers.XXXXXX")
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$scratch"
}
trap cleanup EXIT

# memcpy bandwidth: the ceiling for anything that moves bytes.
cat > "$scratch/memcpy.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(void) {
    size_t n = 256u << 20; char *a = malloc(n), *b = malloc(n);
    memset(a, 1, n); memset(b, 2, n);
    struct timespec t0, t1; double best = 0;
    for (int r = 0; r < 5; r++) {
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < 8; i++) memcpy(i % 2 ? a : b, i % 2 ? b : a, n);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        double gib = 8.0 * n / s / (1u << 30);
        if (gib > best) best = gib;
    }
    printf("%.2f\n", best);
    return a[n / 2] == 7;
}
EOF
cc -O2 -o "$scratch/memcpy" "$scratch/memcpy.c"
memcpy_gib=$("$scratch/memcpy")
cc -O2 -o "$scratch/filecopy" scripts/bench-filecopy.c

serve_and_fill() { # $1 array dir, $2 bytes
  "$EMULATOR" serve --array "$1" --socket "$scratch/s.sock" 2>"$scratch/serve.log" &
  server_pid=$!
  for _ in $(seq 200); do [ -S "$scratch/s.sock" ] && break; sleep 0.05; done
  [ -S "$scratch/s.sock" ] || { echo "server did not start" >&2; cat "$scratch/serve.log" >&2; exit 2; }
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///vol0?socket=$scratch/s.sock" --rw=write \
    --bs=1M --iodepth=8 --size="$2" >/dev/null
  kill "$server_pid"; wait "$server_pid" || true; server_pid=
}

seconds() { # runs "$@", prints "wall-seconds cpu-seconds" (CPU: user + system of the
  # command and the controller processes it waits for; the machine may be shared,
  # so CPU per GiB is the steadier figure)
  python3 -c '
import resource, subprocess, sys, time
t0 = time.monotonic()
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)
wall = time.monotonic() - t0
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{wall:.3f} {r.ru_utime + r.ru_stime:.3f}")
' "$@"
}

# Writing DISK bytes into a tmpfs file, new and then once more over the same pages:
# the ceiling for a rebuild, which writes a whole disk (a new disk's pages are
# allocated, and on a VM often backed by the host, on their first write).
disk_mib=$(( $("$EMULATOR" array create "$scratch/probe" --level raid1 --disks 2 --disk-size "$DISK" >/dev/null &&
  "$EMULATOR" array status "$scratch/probe" --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["geometry"]["disk_bytes"])') >> 20 ))
rm -rf "$scratch/probe"
write_new=$(seconds dd if=/dev/zero of="$scratch/w" bs=1M count="$disk_mib" status=none)
write_again=$(seconds dd if=/dev/zero of="$scratch/w" bs=1M count="$disk_mib" conv=notrunc status=none)
rm -f "$scratch/w"
# The kernel copying a disk-sized tmpfs file into a new, fallocated one, checking
# nothing: the ceiling for a rebuild on this file system.
filecopy_gib=$("$scratch/filecopy" "$scratch/copy-src" "$scratch/copy-dst" $((disk_mib << 20)))

member_file() { # $1 array dir, $2 disk index: that member's image file name
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["metadata"]["members"][int(sys.argv[2])]["file"])' \
    "$1/array.json" "$2"
}

best() { # "wall cpu" lines on stdin: the one with the least wall time
  sort -n | head -1
}

rows=()
bench_level() { # $1 level, $2 disks
  local level=$1 disks=$2 dir="$scratch/$1"
  "$EMULATOR" array create "$dir" --level "$level" --disks "$disks" --spares 1 --disk-size "$DISK" >/dev/null
  local disk_bytes data_bytes
  disk_bytes=$("$EMULATOR" array status "$dir" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["geometry"]["disk_bytes"])')
  data_bytes=$("$EMULATOR" array status "$dir" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_bytes"])')
  echo "bench-controllers: filling $level ($disks x $DISK)" >&2
  serve_and_fill "$dir" "$data_bytes"
  local scanned=$((disks * disk_bytes))
  # One untimed pass first, so that 1 and 2 controllers find the page cache in
  # the same state (the first read after the fill costs more).
  "$EMULATOR" array scrub "$dir" --controllers 1 --wait --json >/dev/null
  local controllers run s old
  for controllers in 1 2; do
    echo "bench-controllers: $level scrub, $controllers controller(s), best of $REPEAT" >&2
    s=$(for run in $(seq "$REPEAT"); do
      seconds "$EMULATOR" array scrub "$dir" --controllers "$controllers" --wait --json
    done | best)
    rows+=("$level scrub|$controllers|$scanned|${s// /|}")
  done
  for controllers in 1 2; do
    echo "bench-controllers: $level rebuild, $controllers controller(s), best of $REPEAT" >&2
    s=$(for run in $(seq "$REPEAT"); do
      old=$(member_file "$dir" 1)
      "$EMULATOR" array fail "$dir" --disk 1 >/dev/null
      # replace allocates the new disk (timed on its own, reported below).
      echo "$disk_bytes $(seconds "$EMULATOR" array replace "$dir" --disk 1)" >>"$scratch/replace.times"
      rm -f "$dir/$old" "$dir/$old.crc" # keep tmpfs usage flat
      seconds "$EMULATOR" array rebuild "$dir" --controllers "$controllers" --wait --json
    done | best)
    rows+=("$level rebuild|$controllers|$disk_bytes|${s// /|}")
  done
  rm -rf "$dir"
}

bench_level raid5 4
bench_level raid6 4
bench_level raid1 2

MOUNT="$BENCH_DIR: $(findmnt -rno FSTYPE,OPTIONS --target "$BENCH_DIR" | tail -1)" \
REPEAT=$REPEAT FILECOPY="$filecopy_gib" WRITE_NEW="$write_new" WRITE_AGAIN="$write_again" DISK_MIB=$disk_mib \
python3 - "$memcpy_gib" "$BENCH_OUT" "$DISK" "$scratch/replace.times" "${rows[@]}" <<'EOF'
import os, platform, sys, datetime
memcpy, out, disk, times, rows = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
disk_gib = int(os.environ["DISK_MIB"]) / 1024
write_new = disk_gib / float(os.environ["WRITE_NEW"].split()[0])
write_again = disk_gib / float(os.environ["WRITE_AGAIN"].split()[0])
replace_s_per_gib = sorted(float(wall) / (int(nbytes) / 2**30)
                           for nbytes, wall, _cpu in (line.split() for line in open(times)))
results, cpu_per_gib = {}, {}
for row in rows:
    name, controllers, nbytes, secs, cpu_secs = row.split("|")
    results[(name, int(controllers))] = int(nbytes) / float(secs) / 2**30
    cpu_per_gib[(name, int(controllers))] = float(cpu_secs) / (int(nbytes) / 2**30)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
lines = [
    f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC | nproc {os.cpu_count()} | {cpu} | kernel {platform.release()} | disks of {disk} on {os.environ['MOUNT']}",
    "",
    f"memcpy bandwidth (ceiling): {memcpy:.2f} GiB/s; writing a {disk} tmpfs file with dd: "
    f"{write_new:.2f} GiB/s new, {write_again:.2f} GiB/s over its pages again; "
    f"copying it into a new, fallocated file (copy_file_range, no checks): {float(os.environ['FILECOPY']):.2f} GiB/s",
    "",
    "| task | 1 controller GiB/s | 2 controllers GiB/s | 2 vs 1 | 1 controller vs memcpy | rebuild vs file copy | CPU s/GiB, 1 / 2 controllers |",
    "|---|---:|---:|---:|---:|---:|---:|",
]
for name in dict.fromkeys(k[0] for k in results):
    one, two = results[(name, 1)], results[(name, 2)]
    cpu1, cpu2 = cpu_per_gib[(name, 1)], cpu_per_gib[(name, 2)]
    vs_copy = f"{one / float(os.environ['FILECOPY']):.0%}" if "rebuild" in name else "-"
    lines.append(f"| {name} | {one:.2f} | {two:.2f} | {two / one:.2f}x | {one / memcpy:.0%} | {vs_copy} | {cpu1:.2f} / {cpu2:.2f} |")
lines += ["", "Scrub GiB/s counts every member byte read; rebuild GiB/s counts bytes written to the rebuilt disk.",
          "CPU s/GiB: user + system seconds of the command and its controller processes, per GiB counted the same way.",
          f"Best of {os.environ['REPEAT']} runs each. `array replace`, which allocates the new disk before a rebuild and is not",
          f"in the rebuild figures, took {replace_s_per_gib[len(replace_s_per_gib) // 2]:.2f} s per GiB (median of {len(replace_s_per_gib)})."]
text = "\n".join(lines) + "\n"
print(text)
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
open(out, "w").write(text)
EOF
