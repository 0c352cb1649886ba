#!/usr/bin/env bash
# Benchmark, not a test: rebuild and scrub of arrays of 4 x 1 GiB members (RAID-5)
# and 2 x 1 GiB (RAID-1) on tmpfs, with 1 and with 2 controller processes, in one
# run; prints GiB/s for each, the 2-vs-1 ratio, and this machine's memcpy
# bandwidth as the ceiling. Writes the table as Markdown to $BENCH_OUT.
#
#   scripts/bench-controllers.sh            (DISK=1GiB; DISK=256MiB for a quick look)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DISK=${DISK:-1GiB}
BENCH_OUT=${BENCH_OUT:-run/bench-controllers.md}
EMULATOR=${EMULATOR:-}
if [ -z "$EMULATOR" ]; then
  cargo build --release --locked >&2
  EMULATOR=$PWD/target/release/emulator
fi
for tool in fio cc python3; do
  command -v "$tool" >/dev/null || { echo "bench-controllers: missing $tool" >&2; exit 2; }
done

scratch=$(mktemp -d /dev/shm/bench-controllers.XXXXXX)
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

serve_and_fill() { # $1 array dir, $2 bytes
  "$EMULATOR" serve --array "$1" --socket "$scratch/s.sock" 2>"$scratch/serve.log" &
  server_pid=$!
  for _ in $(seq 200); do [ -S "$scratch/s.sock" ] && break; sleep 0.05; done
  [ -S "$scratch/s.sock" ] || { echo "server did not start" >&2; cat "$scratch/serve.log" >&2; exit 2; }
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///vol0?socket=$scratch/s.sock" --rw=write \
    --bs=1M --iodepth=8 --size="$2" >/dev/null
  kill "$server_pid"; wait "$server_pid" || true; server_pid=
}

seconds() { # runs "$@", prints wall seconds
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
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
  for controllers in 1 2; do
    echo "bench-controllers: $level scrub, $controllers controller(s)" >&2
    local s
    s=$(seconds "$EMULATOR" array scrub "$dir" --controllers "$controllers" --wait --json)
    rows+=("$level scrub|$controllers|$scanned|$s")
  done
  for controllers in 1 2; do
    "$EMULATOR" array fail "$dir" --disk 1 >/dev/null
    "$EMULATOR" array replace "$dir" --disk 1 >/dev/null
    echo "bench-controllers: $level rebuild, $controllers controller(s)" >&2
    local s
    s=$(seconds "$EMULATOR" array rebuild "$dir" --controllers "$controllers" --wait --json)
    rows+=("$level rebuild|$controllers|$disk_bytes|$s")
  done
  rm -rf "$dir"
}

bench_level raid5 4
bench_level raid1 2

python3 - "$memcpy_gib" "$BENCH_OUT" "$DISK" "${rows[@]}" <<'EOF'
import os, platform, sys, datetime
memcpy, out, disk, rows = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
results = {}
for row in rows:
    name, controllers, nbytes, secs = row.split("|")
    results[(name, int(controllers))] = int(nbytes) / float(secs) / 2**30
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
lines = [
    f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC | nproc {os.cpu_count()} | {cpu} | kernel {platform.release()} | disks of {disk} on tmpfs",
    "",
    f"memcpy bandwidth (ceiling): {memcpy:.2f} GiB/s",
    "",
    "| task | 1 controller GiB/s | 2 controllers GiB/s | 2 vs 1 | 1 controller vs memcpy |",
    "|---|---:|---:|---:|---:|",
]
for name in dict.fromkeys(k[0] for k in results):
    one, two = results[(name, 1)], results[(name, 2)]
    lines.append(f"| {name} | {one:.2f} | {two:.2f} | {two / one:.2f}x | {one / memcpy:.0%} |")
lines += ["", "Scrub GiB/s counts every member byte read; rebuild GiB/s counts bytes written to the rebuilt disk."]
text = "\n".join(lines) + "\n"
print(text)
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
open(out, "w").write(text)
EOF
