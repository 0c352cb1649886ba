#!/usr/bin/env bash
# Benchmark `emulator serve` against nbdkit and qemu-nbd over NBD with fio's
# libnbd-based `nbd` ioengine: on tmpfs and on a disk file system, over Unix
# sockets and TCP, with and without FLUSH traffic, and the FLUSH rows once more
# for a served RAID-5 volume.
#
# This is a benchmark, not a test: it prints figures and ratios and fails only
# when it cannot measure (missing tool, server that does not come up, fio error).
# Beside the ratios it prints how much of a CPU fio itself used in the
# emulator's and nbdkit's runs: a row where fio's one thread is at 95% or more in
# both is client-bound, and its ratio then measures the client as much as the
# servers (the rows below nbdkit say so, and give the rounds' spread).
#
# Usage: scripts/bench-nbd.sh
#
# Environment:
#   BENCH_RUNTIME        seconds measured per row (default 5)
#   BENCH_RAMP           seconds of unmeasured ramp per row (default 2)
#   BENCH_ROUNDS         rounds per row (default 3): each round runs the row on
#                        every server in turn; the table shows each server's
#                        median and, as the ratio, the median of the rounds'
#                        ratios (each taken between runs next to each other).
#                        One round of a few seconds cannot decide a row near
#                        1.0x on a noisy VM; 1 gives a quick look.
#   BENCH_FS             which file systems: "tmpfs disk" (default), or one
#   BENCH_TRANSPORTS     which transports: "unix tcp" (default), or one
#   BENCH_DIR            directory for the disk file system's images (default:
#                        a new directory under <repo>/run/, on the repo's disk)
#   BENCH_OUT            Markdown report (default: <repo>/run/bench-nbd.md;
#                        a relative path is taken from the current directory)
#   BENCH_START_TIMEOUT  seconds to wait for each server to listen (default 15)
#   EMULATOR             emulator binary to use; when unset the script runs
#                        `cargo build --release` and uses target/release/emulator
#
# Servers, per file system:
#   tmpfs: the emulator's image and qemu-nbd's raw file in a directory on
#          /dev/shm; nbdkit's memory plugin (RAM).
#   disk:  all three on files in one directory of the disk file system;
#          nbdkit's file plugin.
#   Each serves 1 GiB, pre-filled once with a sequential 1 MiB write pass so
#   reads hit allocated data. The RAID-5 volume (4 x 1 GiB members, 64 KiB
#   chunks, in the same directory) runs the FLUSH rows only, beside the
#   single image.
# Rows are interleaved across servers (row 1 on each, then row 2, ...) so that
# drifting background load skews the ratios as little as possible.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-5}
RAMP=${BENCH_RAMP:-2}
ROUNDS=${BENCH_ROUNDS:-3}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
OUT=${BENCH_OUT:-$REPO/run/bench-nbd.md}
FILE_SYSTEMS=${BENCH_FS:-tmpfs disk}
TRANSPORTS=${BENCH_TRANSPORTS:-unix tcp}
SIZE_BYTES=$((1024 * 1024 * 1024))

die() {
    echo "bench-nbd: error: $*" >&2
    exit 2
}
log() { echo "bench-nbd: $*" >&2; }

for var in RUNTIME RAMP START_TIMEOUT ROUNDS; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "BENCH_${var} must be a whole number, got '${!var}'"
done
((ROUNDS > 0)) || die "BENCH_ROUNDS must be at least 1"
((RUNTIME > 0)) || die "BENCH_RUNTIME must be at least 1"
((START_TIMEOUT > 0)) || die "BENCH_START_TIMEOUT must be at least 1"
for fs in $FILE_SYSTEMS; do
    [[ $fs == tmpfs || $fs == disk ]] || die "BENCH_FS takes 'tmpfs' and 'disk', got '$fs'"
done
for transport in $TRANSPORTS; do
    [[ $transport == unix || $transport == tcp ]] ||
        die "BENCH_TRANSPORTS takes 'unix' and 'tcp', got '$transport'"
done

# --- required tools ---------------------------------------------------------
required=(fio nbdkit qemu-nbd qemu-img python3 mktemp stat findmnt)
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
for plugin in memory file; do
    nbdkit "$plugin" --dump-plugin >/dev/null 2>&1 || die "nbdkit has no '$plugin' plugin"
done
[[ -d /dev/shm && -w /dev/shm ]] || die "/dev/shm is missing or not writable"
mkdir -p -- "$(dirname -- "$OUT")" || die "cannot create the directory for BENCH_OUT=$OUT"
[[ -w $(dirname -- "$OUT") ]] || die "cannot write to the directory of BENCH_OUT=$OUT"

# --- scratch space and cleanup ----------------------------------------------
SCRATCH=$(mktemp -d /dev/shm/bench-nbd.XXXXXX)
DISK_DIR=
OWN_DISK_DIR=
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

stop_servers() {
    local pid
    for pid in "${SERVER_PIDS[@]}"; do
        stop_pid "$pid"
    done
    SERVER_PIDS=()
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $FIO_PID ]]; then
        stop_pid "$FIO_PID"
    fi
    stop_servers
    rm -rf -- "$SCRATCH"
    if [[ -n $OWN_DISK_DIR ]]; then
        rm -rf -- "$OWN_DISK_DIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ " $FILE_SYSTEMS " == *" disk "* ]]; then
    if [[ -n ${BENCH_DIR:-} ]]; then
        [[ -d $BENCH_DIR && -w $BENCH_DIR ]] || die "BENCH_DIR=$BENCH_DIR is not a writable directory"
        DISK_DIR=$(mktemp -d "$BENCH_DIR/bench-nbd.XXXXXX")
    else
        mkdir -p "$REPO/run"
        DISK_DIR=$(mktemp -d "$REPO/run/bench-nbd.XXXXXX")
    fi
    OWN_DISK_DIR=$DISK_DIR
fi

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
declare -A URI CMD PID

quote_cmd() {
    local out= arg
    for arg in "$@"; do
        out+="${out:+ }$(printf '%q' "$arg")"
    done
    printf '%s' "$out"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits until the server at $address (a socket path, or a TCP port) accepts a
# connection, failing if it exits or the deadline passes. Polls; never relies
# on a fixed sleep.
wait_ready() {
    local name=$1 pid=$2 address=$3 logfile=$4
    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench-nbd: $name exited during start-up; its log:" >&2
            sed 's/^/    /' "$logfile" >&2 || true
            die "$name did not start"
        fi
        if python3 - "$address" <<'EOF' 2>/dev/null; then
import socket, sys
address = sys.argv[1]
if address.isdigit():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target = ("127.0.0.1", int(address))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target = address
s.settimeout(1.0)
s.connect(target)
s.close()
EOF
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "bench-nbd: $name log:" >&2
            sed 's/^/    /' "$logfile" >&2 || true
            die "$name did not accept connections on $address within ${START_TIMEOUT}s"
        fi
        sleep 0.05
    done
}

# start_server NAME TRANSPORT EXPORT -- command with @LISTEN@ standing for the
# server's listen arguments. Sets URI[NAME] and CMD[NAME].
start_server() {
    local name=$1 transport=$2 export=$3 address
    shift 3
    local logfile=$SCRATCH/$name-$transport.log
    local listen=() args=() arg
    if [[ $transport == unix ]]; then
        address=$SCRATCH/$name.sock
        rm -f -- "$address"
        URI[$name]="nbd+unix:///$export?socket=$address"
    else
        address=$(free_port)
        URI[$name]="nbd://127.0.0.1:$address/$export"
    fi
    case $name in
    emulator | raid5) [[ $transport == unix ]] && listen=(--socket "$address") || listen=(--listen "127.0.0.1:$address") ;;
    nbdkit) [[ $transport == unix ]] && listen=(-U "$address") || listen=(-i 127.0.0.1 -p "$address") ;;
    qemu-nbd) [[ $transport == unix ]] && listen=(-k "$address") || listen=(-b 127.0.0.1 -p "$address") ;;
    esac
    for arg in "$@"; do
        if [[ $arg == @LISTEN@ ]]; then
            args+=("${listen[@]}")
        else
            args+=("$arg")
        fi
    done
    CMD[$name]=$(quote_cmd "${args[@]}")
    log "starting $name: ${CMD[$name]}"
    "${args[@]}" >"$logfile" 2>&1 </dev/null &
    PID[$name]=$!
    SERVER_PIDS+=("${PID[$name]}")
    wait_ready "$name" "${PID[$name]}" "$address" "$logfile"
}

# --- fio ----------------------------------------------------------------------
# name|fio arguments|metric|flush row
ROWS=(
    "4K randread QD1|--rw=randread --bs=4k --iodepth=1|iops|"
    "4K randread QD32|--rw=randread --bs=4k --iodepth=32|iops|"
    "4K randwrite QD1|--rw=randwrite --bs=4k --iodepth=1|iops|"
    "4K randwrite QD32|--rw=randwrite --bs=4k --iodepth=32|iops|"
    "1M seqread QD8|--rw=read --bs=1m --iodepth=8|mibs|"
    "1M seqwrite QD8|--rw=write --bs=1m --iodepth=8|mibs|"
    "4K randwrite QD1, FLUSH after every write|--rw=randwrite --bs=4k --iodepth=1 --fsync=1|iops|flush"
    "4K randwrite QD16, FLUSH every 32 writes|--rw=randwrite --bs=4k --iodepth=16 --fsync=32|iops|flush"
    "1M seqwrite QD4, FLUSH every 4 writes|--rw=write --bs=1m --iodepth=4 --fsync=4|mibs|flush"
)
BENCH_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
RESULTS=$SCRATCH/results.tsv
SETUPS=$SCRATCH/setups.tsv
: >"$RESULTS"
: >"$SETUPS"
FAILURES=0

# Prints the figure (IOPS or MiB/s) from fio's JSON output and, after a tab,
# the share of one CPU fio itself used (user + system, percent), or fails.
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
figure = f"{side['iops']:.0f}" if metric == "iops" else f"{side['bw_bytes'] / 1048576:.1f}"
print(f"{figure}\t{job['usr_cpu'] + job['sys_cpu']:.0f}")
EOF
}

# run_fio SERVER NAME JSONFILE fio-args... ; runs fio in the background so a
# signal to this script can stop it too.
run_fio() {
    local server=$1 name=$2 json=$3
    shift 3
    local rc=0
    fio --name="$name" --ioengine=nbd --uri="${URI[$server]}" \
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
            sed 's/^/    /' "$SCRATCH/$server"-*.log >&2 || true
        fi
        return 1
    fi
}

# measure FS TRANSPORT SERVERS... : every row on every server, interleaved.
measure() {
    local fs=$1 transport=$2
    shift 2
    local servers=("$@") row name args metric flush ddir s json value fio_cpu round n=0
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name args metric flush <<<"$row"
        case $args in *--rw=*read*) ddir=read ;; *) ddir=write ;; esac
        for ((round = 1; round <= ROUNDS; round++)); do
            for s in "${servers[@]}"; do
                [[ $s == raid5 && -z $flush ]] && continue
                n=$((n + 1))
                json=$SCRATCH/$fs-$transport-$n.json
                value= fio_cpu=
                # shellcheck disable=SC2086 # the row's fio arguments are words
                if run_fio "$s" "${name// /-}" "$json" $args --time_based --runtime="$RUNTIME" \
                    --ramp_time="$RAMP"; then
                    if ! IFS=$'\t' read -r value fio_cpu < <(extract "$json" "$ddir" "$metric" 2>"$json.err") ||
                        [[ -z $value ]]; then
                        log "could not read fio's result for $s ($name): $(cat "$json.err")"
                        value=
                    fi
                fi
                if [[ -z $value ]]; then
                    FAILURES=$((FAILURES + 1))
                    value=FAIL fio_cpu=
                fi
                log "[$fs/$transport] $name on $s$( ((ROUNDS > 1)) && echo " (round $round)"): $value $([[ $metric == iops ]] && echo IOPS || echo MiB/s)"
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fs" "$transport" "$name" "$metric" "$s" "$value" \
                    "$round" "${fio_cpu:--}" >>"$RESULTS"
            done
        done
    done
}

for fs in $FILE_SYSTEMS; do
    if [[ $fs == tmpfs ]]; then
        dir=$SCRATCH/images
    else
        dir=$DISK_DIR/images
    fi
    mkdir -p "$dir"
    fs_type=$(stat -f -c %T "$dir")
    mount_options=$(findmnt -no OPTIONS --target "$dir" 2>/dev/null | tail -n1 || true)
    mount_options=${mount_options:-unknown}
    "$EMULATOR" image create "$dir/emulator.img" --size 1GiB >"$SCRATCH/create.log" 2>&1 ||
        { cat "$SCRATCH/create.log" >&2; die "emulator image create failed in $dir"; }
    "$EMULATOR" array create "$dir/raid5" --level raid5 --disks 4 --disk-size 1GiB \
        >"$SCRATCH/create.log" 2>&1 ||
        { cat "$SCRATCH/create.log" >&2; die "emulator array create failed in $dir"; }
    qemu-img create -q -f raw "$dir/qemu.img" "$SIZE_BYTES"
    if [[ $fs == disk ]]; then
        truncate -s "$SIZE_BYTES" "$dir/nbdkit.img"
    fi
    prefilled=
    for transport in $TRANSPORTS; do
        start_server emulator "$transport" "" "$EMULATOR" serve --image "$dir/emulator.img" @LISTEN@
        if [[ $fs == tmpfs ]]; then
            start_server nbdkit "$transport" "" nbdkit @LISTEN@ --foreground memory 1G
        else
            start_server nbdkit "$transport" "" nbdkit @LISTEN@ --foreground file "$dir/nbdkit.img"
        fi
        # -t: keep serving after a client disconnects (fio's nbd engine opens a
        # probe connection first); --shared: allow concurrent clients.
        # --cache=writeback --aio=threads are qemu-nbd's defaults.
        start_server qemu-nbd "$transport" "" qemu-nbd @LISTEN@ -f raw --cache=writeback \
            --aio=threads -t --shared=8 -x '' "$dir/qemu.img"
        start_server raid5 "$transport" vol0 "$EMULATOR" serve --array "$dir/raid5" @LISTEN@
        if [[ -z $prefilled ]]; then
            # The memory plugin keeps nothing across restarts: it is pre-filled
            # again below, the others once.
            for s in emulator nbdkit qemu-nbd raid5; do
                log "pre-filling $s on $fs (sequential 1 MiB writes over the whole 1 GiB)"
                run_fio "$s" prefill "$SCRATCH/prefill.json" --rw=write --bs=1m --iodepth=8 ||
                    die "pre-fill failed on $s"
            done
            prefilled=yes
        elif [[ $fs == tmpfs ]]; then
            run_fio nbdkit prefill "$SCRATCH/prefill.json" --rw=write --bs=1m --iodepth=8 ||
                die "pre-fill failed on nbdkit"
        fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fs" "$transport" "$fs_type" "$mount_options" \
            "${CMD[emulator]}" "${CMD[nbdkit]}" "${CMD[qemu-nbd]}" "${CMD[raid5]}" >>"$SETUPS"
        measure "$fs" "$transport" emulator nbdkit qemu-nbd raid5
        stop_servers
    done
done

# --- report ---------------------------------------------------------------------
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
emu_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain -- emulator disk-images controllers 2>/dev/null) ]]; then
    emu_rev+=" (+ uncommitted changes)"
fi

BENCH_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
BENCH_NPROC=$(nproc)
BENCH_CPU=$cpu_model
BENCH_KERNEL=$(uname -r)
export BENCH_DATE BENCH_NPROC BENCH_CPU BENCH_KERNEL BENCH_LOAD
export BENCH_RUNTIME_S=$RUNTIME BENCH_RAMP_S=$RAMP BENCH_ROUNDS_N=$ROUNDS
export BENCH_VERSIONS="fio $(fio --version | sed 's/^fio-//'), $(nbdkit --version), $(qemu-nbd --version | head -n1 | sed 's/ (.*//'), emulator $emu_rev"
export BENCH_FIO="fio --ioengine=nbd --uri=URI --numjobs=1 --size=1GiB --time_based --runtime=$RUNTIME --ramp_time=$RAMP --output-format=json ROW-ARGUMENTS"

python3 - "$RESULTS" "$SETUPS" "$OUT" <<'EOF'
import os, statistics, sys

results_path, setups_path, out_path = sys.argv[1:4]

# fio's own CPU use (percent of one CPU) at or above which a row is marked
# client-bound: fio's one thread, not the server, sets its pace.
CLIENT_BOUND_CPU = 95

rows, metric, runs, cpus, tables = [], {}, {}, {}, []
with open(results_path, encoding="utf-8") as f:
    for line in f:
        fs, transport, name, m, server, v, round_, cpu = line.rstrip("\n").split("\t")
        if (fs, transport) not in tables:
            tables.append((fs, transport))
        if name not in metric:
            rows.append(name)
            metric[name] = m
        runs.setdefault((fs, transport, name, server), {})[round_] = (
            None if v == "FAIL" else float(v))
        if cpu != "-":
            cpus.setdefault((fs, transport, name, server), []).append(float(cpu))
# A server's figure for a row: the median of its rounds (None if any failed).
value = {key: None if None in by_round.values() else statistics.median(by_round.values())
         for key, by_round in runs.items()}
setups = {}
with open(setups_path, encoding="utf-8") as f:
    for line in f:
        fs, transport, fs_type, options, *cmds = line.rstrip("\n").split("\t")
        setups[(fs, transport)] = (fs_type, options, cmds)

def fmt(key):
    v = value.get(key)
    if v is None:
        return "FAIL" if key in value else "-"
    return f"{v:,.0f}" if metric[key[2]] == "iops" else f"{v:,.1f}"

def round_ratios(a_key, b_key):
    """a's figure over b's in each round, or None if a round is missing one."""
    a, b = runs.get(a_key, {}), runs.get(b_key, {})
    ratios = [a[r] / b[r] for r in a if a[r] is not None and b.get(r)]
    return ratios if ratios and len(ratios) == len(a) else None

def ratio_of(a_key, b_key):
    """The median over rounds of a's figure over b's in the same round."""
    ratios = round_ratios(a_key, b_key)
    return None if ratios is None else statistics.median(ratios)

def fio_cpu(key):
    """fio's CPU use in the server's runs of a row (median of rounds), or None."""
    return statistics.median(cpus[key]) if key in cpus else None

def cpu_cell(a_key, b_key):
    a, b = fio_cpu(a_key), fio_cpu(b_key)
    return "-" if a is None or b is None else f"{a:.0f}% / {b:.0f}%"

def below_note(a_key, b_key):
    """What a reader needs beside a ratio below 1: the rounds' spread, and
    whether fio was the bottleneck in both runs."""
    notes = []
    ratios = round_ratios(a_key, b_key)
    if ratios and len(ratios) > 1:
        notes.append(f"rounds {min(ratios):.2f}-{max(ratios):.2f}x")
    a, b = fio_cpu(a_key), fio_cpu(b_key)
    if a is not None and b is not None and min(a, b) >= CLIENT_BOUND_CPU:
        notes.append(f"client-bound: fio at {a:.0f}% / {b:.0f}% of a CPU")
    return f" ({'; '.join(notes)})" if notes else ""

def ratio(a_key, b_key):
    r = ratio_of(a_key, b_key)
    return "-" if r is None else f"{r:.2f}x"

env = os.environ
header = (f"{env['BENCH_DATE']} | nproc {env['BENCH_NPROC']} | CPU {env['BENCH_CPU']} | "
          f"kernel {env['BENCH_KERNEL']} | load at start {env['BENCH_LOAD']}")
common = [
    f"runtime {env['BENCH_RUNTIME_S']} s + ramp {env['BENCH_RAMP_S']} s per row, one fio job, 1 GiB, pre-filled"
    + (f"; {env['BENCH_ROUNDS_N']} rounds per row: medians, and the median of the rounds' ratios"
       if env['BENCH_ROUNDS_N'] != "1" else ""),
    f"versions: {env['BENCH_VERSIONS']}",
    f"fio: {env['BENCH_FIO']}",
    "fio CPU: the share of one CPU the fio job itself used (user + system) in the emulator's "
    f"run / nbdkit's run; at {CLIENT_BOUND_CPU}% or more in both, fio's one thread sets the pace "
    "(client-bound) and the ratio says more about how fast the machine ran fio in each run than "
    "about the servers",
]
headers = ["row", "unit", "emulator", "nbdkit", "qemu-nbd", "emu/nbdkit", "emu/qemu-nbd",
           "fio CPU emu / nbdkit", "RAID-5 volume", "RAID-5/emu"]
md = ["# NBD server benchmark", "", header, ""] + [f"- {d}" for d in common]
print()
print(header)
for d in common:
    print(d)
below = []
for fs, transport in tables:
    fs_type, options, (cmd_emu, cmd_kit, cmd_qemu, cmd_raid) = setups[(fs, transport)]
    title = f"{fs} ({fs_type}, {options}), {'Unix socket' if transport == 'unix' else 'TCP'}"
    table = []
    for name in rows:
        k = lambda s: (fs, transport, name, s)
        table.append([name, "IOPS" if metric[name] == "iops" else "MiB/s",
                      fmt(k("emulator")), fmt(k("nbdkit")), fmt(k("qemu-nbd")),
                      ratio(k("emulator"), k("nbdkit")), ratio(k("emulator"), k("qemu-nbd")),
                      cpu_cell(k("emulator"), k("nbdkit")),
                      fmt(k("raid5")), ratio(k("raid5"), k("emulator"))])
        for other in ("nbdkit", "qemu-nbd"):
            r = ratio_of(k("emulator"), k(other))
            if r is not None and r < 1:
                below.append(f"{title}: {name}: {r:.2f}x {other}"
                             + below_note(k("emulator"), k(other)))
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(title)
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in table:
        print(line(r))
    md += ["", f"## {title}", "",
           f"- emulator: `{cmd_emu}`", f"- nbdkit: `{cmd_kit}`", f"- qemu-nbd: `{cmd_qemu}`",
           f"- RAID-5 volume: `{cmd_raid}`", "",
           "| " + " | ".join(headers) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in table]
md += ["", "## Rows where the emulator is below nbdkit or qemu-nbd", ""]
md += [f"- {b}" for b in below] or ["- none"]
print()
print("Rows where the emulator is below nbdkit or qemu-nbd:", "none" if not below else "")
for b in below:
    print(f"  {b}")
with open(out_path, "w", encoding="utf-8") as f:
    f.write("\n".join(md) + "\n")
print()
print(f"Markdown written to {out_path}")
EOF

if ((FAILURES > 0)); then
    log "$FAILURES measurement(s) failed (shown as FAIL)"
    exit 1
fi
