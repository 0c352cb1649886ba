#!/usr/bin/env bash
# The web console in a real browser (tests/console/console_test.py): Debian's
# Chromium, headless, driven by Playwright from PyPI in a venv under run/
# (Debian's Python refuses a global pip install; `playwright install` is never
# run: the browser is Debian's /usr/bin/chromium).
#
# Usage: EMULATOR=target/release/emulator scripts/console-test.sh
# The screenshot is left in run/console-test/console.png.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EMULATOR=${EMULATOR:-$REPO/target/release/emulator}
VENV=$REPO/run/console-venv
WORK=$REPO/run/console-test

log() { echo "console-test: $*" >&2; }

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian's ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! "$VENV/bin/python" -c 'import playwright' >/dev/null 2>&1; then
    log "installing playwright (PyPI) in $VENV"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'playwright>=1.40,<2'
fi
rm -rf "$WORK"
timeout 300 "$VENV/bin/python" "$REPO/tests/console/console_test.py" "$EMULATOR" "$WORK"
