#!/usr/bin/env bash
# Smoke-runs the fuzz targets of emulator/fuzz: builds them with cargo-fuzz and
# runs each for FUZZ_SECONDS seconds (default 20). Fails if any target finds a
# crash (panic, sanitizer error, timeout or OOM); the input that triggered it is
# left in emulator/fuzz/artifacts/TARGET/.
#
# Usage: scripts/fuzz-smoke.sh [TARGET...]   (default: every target)
#
# cargo-fuzz needs nightly flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them.
set -euo pipefail

FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
# Longest a single input may run before libFuzzer calls it a hang.
FUZZ_TIMEOUT="${FUZZ_TIMEOUT:-10}"
# AddressSanitizer by default; FUZZ_SANITIZER=none runs the handshake target
# several times faster (the server has no unsafe code), at the cost of a rebuild.
FUZZ_SANITIZER="${FUZZ_SANITIZER:-address}"

cd "$(dirname "${BASH_SOURCE[0]}")/../emulator/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found: installing it" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1

cargo fuzz build --sanitizer "$FUZZ_SANITIZER"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${FUZZ_SECONDS}s" >&2
    # libFuzzer prints a line per new input: keep it in a log, show it on failure.
    if cargo fuzz run --sanitizer "$FUZZ_SANITIZER" "$target" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout="$FUZZ_TIMEOUT" -print_final_stats=1 \
        >"$logs/$target.log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^Done' "$logs/$target.log" >&2 || true
    else
        tail -n 60 "$logs/$target.log" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz-smoke: crashes in: ${failed[*]} (inputs in emulator/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} target(s) ran ${FUZZ_SECONDS}s each without a crash" >&2
