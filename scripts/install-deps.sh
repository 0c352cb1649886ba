#!/usr/bin/env bash
# Installs the real clients the tests and benchmarks drive, from Debian's packages,
# when they are missing. Usage: scripts/install-deps.sh test|bench
set -euo pipefail

want=${1:-test}
declare -A need=(
  [qemu-io]=qemu-utils [qemu-img]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=libnbd-bin
  [fio]=fio
  [ss]=iproute2
)
if [ "$want" = bench ]; then
  need[nbdkit]=nbdkit
  need[qemu-nbd]=qemu-utils
fi

missing=()
for tool in "${!need[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)
/usr/bin/python3 -c 'import pytest' >/dev/null 2>&1 || missing+=(python3-pytest)
/usr/bin/python3 -c 'import pytest_timeout' >/dev/null 2>&1 || missing+=(python3-pytest-timeout)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing missing test tools: ${packages[*]}"
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "error: missing packages ${packages[*]} and not root; install them with apt-get" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
