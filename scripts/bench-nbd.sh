#!/usr/bin/env bash
# Benchmark `emulator serve` against nbdkit (memory plugin) and qemu-nbd over
# NBD on Unix sockets, with fio's libnbd-based `nbd` ioengine.
#
# This is a benchmark, not a test: it prints figures and ratios and fails only
# when it cannot measure (missing tool, server that does not come up, fio error).
#
# Usage: scripts/bench-nbd.sh
#
# Environment:
#   BENCH_RUNTIME        seconds measured per row (default 10)
#   BENCH_RAMP           seconds of unmeasured ramp per row (default 2)
#   BENCH_OUT            Markdown report (default: <repo>/run/bench-nbd.md;
#                        a relative path is taken from the current directory)
#   BENCH_START_TIMEOUT  seconds to wait for each server's socket (default 15)
#   EMULATOR             emulator binary to use; when unset the script runs
#                        `cargo build --release` and uses target/release/emulator
#
# All three servers serve 1 GiB held in tmpfs / RAM: the emulator's image and
# qemu-nbd's raw file live in a mktemp -d directory on /dev/shm, nbdkit uses
# its memory plugin. Every server is pre-filled once with a sequential 1 MiB
# write pass so reads hit allocated data. Rows are interleaved across servers
# (row 1 on each server, then row 2, ...) so that drifting background load
# skews the ratios as little as possible.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-10}
RAMP=${BENCH_RAMP:-2}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
OUT=${BENCH_OUT:-$REPO/run/bench-nbd.md}
SIZE_BYTES=$((1024 * 1024 * 1024))

die() {
    echo "bench-nbd: error: $*" >&2
    exit 2
}
log() { echo "bench-nbd: $*" >&2; }

for var in RUNTIME RAMP START_TIMEOUT; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "BENCH_${var} must be a whole number of seconds, got '${!var}'"
done
((RUNTIME > 0)) || die "BENCH_RUNTIME must be at least 1"
((START_TIMEOUT > 0)) || die "BENCH_START_TIMEOUT must be at least 1"

# --- required tools ---------------------------------------------------------
required=(fio nbdkit qemu-nbd qemu-img python3 mktemp)
[[ -n ${EMULATOR:-} ]] || required+=(cargo)
missing=()
for tool in "${required[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
((${#missing[@]} == 0)) || die "missing required tool(s): ${missing[*]} (install them, e.g. via the Makefile)"
fio_nbd_help=$(fio --enghelp=nbd 2>&1 || true)
if ! grep -q '^uri' <<<"$fio_nbd_help"; then
    die "fio at $(command -v fio) has no 'nbd' ioengine (it needs fio built with libnbd)"
fi
if ! nbdkit memory --dump-plugin >/dev/null 2>&1; then
    die "nbdkit has no 'memory' plugin"
fi
[[ -d /dev/shm && -w /dev/shm ]] || die "/dev/shm is missing or not writable"
mkdir -p -- "$(dirname -- "$OUT")" || die "cannot create the directory for BENCH_OUT=$OUT"
[[ -w $(dirname -- "$OUT") ]] || die "cannot write to the directory of BENCH_OUT=$OUT"

# --- scratch space and cleanup ----------------------------------------------
SCRATCH=$(mktemp -d /dev/shm/bench-nbd.XXXXXX)
SERVER_PIDS=()
FIO_PID=

stop_pid() {
    local pid=$1 deadline
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $FIO_PID ]]; then
        stop_pid "$FIO_PID"
    fi
    local pid
    for pid in "${SERVER_PIDS[@]}"; do
        stop_pid "$pid"
    done
    rm -rf -- "$SCRATCH"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- emulator binary --------------------------------------------------------
if [[ -n ${EMULATOR:-} ]]; then
    [[ -x $EMULATOR ]] || die "EMULATOR=$EMULATOR is not an executable file"
else
    log "building the emulator (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin emulator) ||
        die "cargo build --release failed (if someone is mid-edit, retry shortly)"
    EMULATOR=$REPO/target/release/emulator
    [[ -x $EMULATOR ]] || die "build succeeded but $EMULATOR is missing"
fi

# --- servers ----------------------------------------------------------------
SERVERS=(emulator nbdkit qemu-nbd)
declare -A SOCK CMD PID

quote_cmd() {
    local out= arg
    for arg in "$@"; do
        out+="${out:+ }$(printf '%q' "$arg")"
    done
    printf '%s' "$out"
}

# Waits until $sock accepts a connection, failing if the server exits or the
# deadline passes. Polls; never relies on a fixed sleep.
wait_ready() {
    local name=$1 pid=$2 sock=$3 logfile=$4
    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench-nbd: $name exited during start-up; its log:" >&2
            sed 's/^/    /' "$logfile" >&2 || true
            die "$name did not start"
        fi
        if [[ -S $sock ]] && python3 - "$sock" <<'EOF' 2>/dev/null; then
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(1.0)
s.connect(sys.argv[1])
s.close()
EOF
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "bench-nbd: $name log:" >&2
            sed 's/^/    /' "$logfile" >&2 || true
            die "$name did not accept connections on $sock within ${START_TIMEOUT}s"
        fi
        sleep 0.05
    done
}

start_server() {
    local name=$1
    shift
    local logfile=$SCRATCH/$name.log
    CMD[$name]=$(quote_cmd "$@")
    log "starting $name: ${CMD[$name]}"
    "$@" >"$logfile" 2>&1 </dev/null &
    PID[$name]=$!
    SERVER_PIDS+=("${PID[$name]}")
    wait_ready "$name" "${PID[$name]}" "${SOCK[$name]}" "$logfile"
}

for s in "${SERVERS[@]}"; do
    SOCK[$s]=$SCRATCH/$s.sock
done

# (1) the emulator, image on tmpfs.
EMU_IMAGE=$SCRATCH/emulator.img
"$EMULATOR" image create "$EMU_IMAGE" --size 1GiB >"$SCRATCH/emulator-create.log" 2>&1 ||
    { cat "$SCRATCH/emulator-create.log" >&2; die "emulator image create failed"; }
start_server emulator "$EMULATOR" serve --image "$EMU_IMAGE" --socket "${SOCK[emulator]}"

# (2) nbdkit's memory plugin (sparse RAM disk).
start_server nbdkit nbdkit -U "${SOCK[nbdkit]}" --foreground memory 1G

# (3) qemu-nbd on a raw file on tmpfs. -t: keep serving after a client
# disconnects (fio's nbd engine opens a probe connection first, and qemu-nbd
# would otherwise exit when it closes); --shared: allow concurrent clients.
# --cache=writeback --aio=threads are qemu-nbd's defaults (O_DIRECT is not
# available on tmpfs anyway).
QEMU_IMAGE=$SCRATCH/qemu.img
qemu-img create -q -f raw "$QEMU_IMAGE" "$SIZE_BYTES"
start_server qemu-nbd qemu-nbd -k "${SOCK[qemu-nbd]}" -f raw --cache=writeback --aio=threads \
    -t --shared=8 -x '' "$QEMU_IMAGE"

# --- fio ----------------------------------------------------------------------
# name|rw|bs|iodepth|metric
ROWS=(
    "4K randread QD1|randread|4k|1|iops"
    "4K randread QD32|randread|4k|32|iops"
    "4K randwrite QD1|randwrite|4k|1|iops"
    "4K randwrite QD32|randwrite|4k|32|iops"
    "1M seqread QD8|read|1m|8|mibs"
    "1M seqwrite QD8|write|1m|8|mibs"
)
BENCH_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
RESULTS=$SCRATCH/results.tsv
: >"$RESULTS"
FAILURES=0

# Prints the figure (IOPS or MiB/s) from fio's JSON output, or fails.
extract() {
    python3 - "$@" <<'EOF'
import json, sys
path, ddir, metric = sys.argv[1:4]
text = open(path, encoding="utf-8", errors="replace").read()
# fio's engines may print lines before the JSON document; start at the first '{'.
start = text.find("{")
if start < 0:
    sys.exit(f"no JSON in {path}")
doc, _ = json.JSONDecoder().raw_decode(text[start:])
job = doc["jobs"][0]
if job.get("error", 0):
    sys.exit(f"fio job error {job['error']}")
side = job[ddir]
if side["total_ios"] <= 0:
    sys.exit("fio completed no I/O")
if metric == "iops":
    print(f"{side['iops']:.0f}")
else:
    print(f"{side['bw_bytes'] / 1048576:.1f}")
EOF
}

# run_fio SERVER NAME JSONFILE fio-args... ; runs fio in the background so a
# signal to this script can stop it too.
run_fio() {
    local server=$1 name=$2 json=$3
    shift 3
    local rc=0
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=${SOCK[$server]}" \
        --numjobs=1 --size="$SIZE_BYTES" --output-format=json --output="$json" "$@" \
        >"$json.stdout" 2>"$json.stderr" </dev/null &
    FIO_PID=$!
    wait "$FIO_PID" || rc=$?
    FIO_PID=
    if ((rc != 0)); then
        log "fio failed on $server ($name), exit $rc:"
        cat "$json.stdout" "$json.stderr" | sed 's/^/    /' >&2 || true
        if ! kill -0 "${PID[$server]}" 2>/dev/null; then
            log "$server is no longer running; its log:"
            sed 's/^/    /' "$SCRATCH/$server.log" >&2 || true
        fi
        return 1
    fi
}

for s in "${SERVERS[@]}"; do
    log "pre-filling $s (sequential 1 MiB writes over the whole 1 GiB)"
    run_fio "$s" prefill "$SCRATCH/prefill-$s.json" --rw=write --bs=1m --iodepth=8 ||
        die "pre-fill failed on $s"
done

total=$((${#ROWS[@]} * ${#SERVERS[@]}))
n=0
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw bs qd metric <<<"$row"
    case $rw in *read) ddir=read ;; *) ddir=write ;; esac
    for s in "${SERVERS[@]}"; do
        n=$((n + 1))
        json=$SCRATCH/$n.json
        value=
        if run_fio "$s" "${name// /-}" "$json" --rw="$rw" --bs="$bs" --iodepth="$qd" \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"; then
            if ! value=$(extract "$json" "$ddir" "$metric" 2>"$json.err"); then
                log "could not read fio's result for $s ($name): $(cat "$json.err")"
                value=
            fi
        fi
        if [[ -z $value ]]; then
            FAILURES=$((FAILURES + 1))
            value=FAIL
        fi
        unit=$([[ $metric == iops ]] && echo IOPS || echo MiB/s)
        log "[$n/$total] $name on $s: $value $unit"
        printf '%s\t%s\t%s\t%s\n' "$name" "$metric" "$s" "$value" >>"$RESULTS"
    done
done

# --- report ---------------------------------------------------------------------
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
emu_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain -- emulator disk-images 2>/dev/null) ]]; then
    emu_rev+=" (+ uncommitted changes)"
fi

BENCH_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
BENCH_NPROC=$(nproc)
BENCH_CPU=$cpu_model
BENCH_KERNEL=$(uname -r)
export BENCH_DATE BENCH_NPROC BENCH_CPU BENCH_KERNEL BENCH_LOAD
export BENCH_RUNTIME_S=$RUNTIME BENCH_RAMP_S=$RAMP
export BENCH_VERSIONS="fio $(fio --version | sed 's/^fio-//'), $(nbdkit --version), $(qemu-nbd --version | head -n1 | sed 's/ (.*//'), emulator $emu_rev"
export BENCH_CMD_EMULATOR="${CMD[emulator]}"
export BENCH_CMD_NBDKIT="${CMD[nbdkit]}"
export BENCH_CMD_QEMU="${CMD[qemu-nbd]}"
export BENCH_FIO="fio --ioengine=nbd --uri=nbd+unix:///?socket=SOCK --numjobs=1 --size=1GiB --time_based --runtime=$RUNTIME --ramp_time=$RAMP --rw=RW --bs=BS --iodepth=QD --output-format=json"

python3 - "$RESULTS" "$OUT" <<'EOF'
import os, sys

results_path, out_path = sys.argv[1:3]
servers = ["emulator", "nbdkit", "qemu-nbd"]
rows, metric, value = [], {}, {}
with open(results_path, encoding="utf-8") as f:
    for line in f:
        name, m, server, v = line.rstrip("\n").split("\t")
        if name not in metric:
            rows.append(name)
            metric[name] = m
        value[(name, server)] = None if v == "FAIL" else float(v)

def fmt(name, server):
    v = value.get((name, server))
    if v is None:
        return "FAIL"
    return f"{v:,.0f}" if metric[name] == "iops" else f"{v:,.1f}"

def ratio(name, other):
    a, b = value.get((name, "emulator")), value.get((name, other))
    return "n/a" if a is None or not b else f"{a / b:.2f}x"

headers = ["row", "unit", "emulator", "nbdkit", "qemu-nbd", "emu/nbdkit", "emu/qemu-nbd"]
table = [
    [name, "IOPS" if metric[name] == "iops" else "MiB/s",
     fmt(name, "emulator"), fmt(name, "nbdkit"), fmt(name, "qemu-nbd"),
     ratio(name, "nbdkit"), ratio(name, "qemu-nbd")]
    for name in rows
]
env = os.environ
header = (f"{env['BENCH_DATE']} | nproc {env['BENCH_NPROC']} | CPU {env['BENCH_CPU']} | "
          f"kernel {env['BENCH_KERNEL']} | load at start {env['BENCH_LOAD']}")
details = [
    f"runtime {env['BENCH_RUNTIME_S']} s + ramp {env['BENCH_RAMP_S']} s per row, one fio job, 1 GiB, pre-filled",
    f"versions: {env['BENCH_VERSIONS']}",
    f"emulator: {env['BENCH_CMD_EMULATOR']}",
    f"nbdkit:   {env['BENCH_CMD_NBDKIT']}",
    f"qemu-nbd: {env['BENCH_CMD_QEMU']}",
    f"fio:      {env['BENCH_FIO']}",
]

widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
def line(cells):
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
print()
print(header)
for d in details:
    print(d)
print()
print(line(headers))
print(line(["-" * w for w in widths]))
for r in table:
    print(line(r))

md = ["# NBD server benchmark", "", header, ""]
md += [f"- {d.split(':', 1)[0]}: `{d.split(':', 1)[1].strip()}`" if d.startswith(("emulator:", "nbdkit:", "qemu-nbd:", "fio:"))
       else f"- {d}" for d in details]
md += ["", "| " + " | ".join(headers) + " |",
       "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|"]
md += ["| " + " | ".join(r) + " |" for r in table]
with open(out_path, "w", encoding="utf-8") as f:
    f.write("\n".join(md) + "\n")
print()
print(f"Markdown written to {out_path}")
EOF

if ((FAILURES > 0)); then
    log "$FAILURES measurement(s) failed (shown as FAIL)"
    exit 1
fi
