#!/usr/bin/env bash
# Proves that a real Linux host attaches and uses the emulator's NBD export with
# the kernel's own nbd driver and nbd-client, on a machine that has no nbd
# module: a Debian kernel boots under QEMU (TCG, no network) from an initramfs
# that holds the emulator binary, nbd-client and e2fsprogs. Inside the guest:
#
#   round 1, TCP on the guest's loopback:
#     emulator image create (64 MiB) + emulator serve --listen 127.0.0.1:10809,
#     nbd-client -l, nbd-client attach of /dev/nbd0, mkfs.ext4, mount, write
#     files with known SHA-256 sums, sync, umount, nbd-client -d,
#     e2fsck -fn of the image file itself, reattach, e2fsck -fn /dev/nbd0,
#     mount and check every sum, write more, umount, detach,
#     SIGTERM (exit status 0), emulator image verify (exit status 0);
#   round 2, a fresh server on a Unix socket over the same image:
#     nbd-client -unix with two connections (multi-conn), read-only mount,
#     every sum from round 1 checked again, detach, SIGTERM (exit 0),
#     e2fsck -fn and emulator image verify of the image.
#   round 3, a whole domain and a controller failover:
#     emulator up (one server system, 4 + 1 spare disks of 24 MiB, RAID-5),
#     emulator attach of the volume to /dev/nbd0 (kernel netlink, request
#     timeout 10 s, dead-connection timeout 60 s), mkfs.ext4, mount, write
#     files with known sums; fail a disk and let the automatic rebuild onto
#     the hot spare finish while mounted and written to; kill -9 the owning
#     driver while writing: the partner takes the volume and its address
#     over, the attach reconnects, the writes complete; restart the driver
#     (failback while mounted), write more; umount, e2fsck -fn, every sum
#     checked; a scrub finds nothing; detach; emulator down.
#
#   the power-loss round, two more boots on two persistent virtual disks:
#     boot "power-write": mounts the ext4 (made by the host) of /dev/vda (the
#     data disk) and of /dev/vdb (the record disk, -o sync), emulator image
#     create and emulator array create (RAID-6, 5 members, one of them
#     failed at once, so that its writes go through the degraded-write
#     journal) on vda,
#     emulator serve --image and serve --array on Unix sockets, a whole domain
#     (emulator up, its run directory on vda), and the write oracle (emulator
#     workload run --qd 16 --fua-every 7 --flush-every 32) on the image, on the
#     array's volume and on the domain's volume at once, each with its record
#     on vdb.
#     Once each record holds a seeded number of acknowledged
#     writes and at least one acknowledged FLUSH, the guest prints
#     `PASS power-armed` and the host kills QEMU with SIGKILL at once: the
#     plug is pulled in the middle of the workload.
#     boot "power-verify", same disks: mount (journal replay, which must have
#     happened), umount, e2fsck -fn of both, emulator image verify (no
#     checksum error anywhere; it prints how many blocks the image's
#     write-intent record let it keep as a power cut left them), emulator serve
#     on the image again, emulator workload verify against the record through
#     it (exit 0: every write acknowledged with FUA, or acknowledged before an
#     acknowledged FLUSH, is there), SIGTERM (exit 0); then the array: image
#     verify of every member, serve --array again (its open resyncs the stripes
#     the members' write-intent records name, with the journal where a data
#     member is missing), workload verify of the volume, a second member
#     failed (chosen by the seed) and workload verify again, through the
#     parity, SIGTERM (exit 0); then the domain: emulator up again on the
#     run directory the cut left, workload verify of its volume, a disk failed
#     through a task and workload verify again, emulator down.
#
# Why the power loss is honest (what survives `kill -9` of QEMU):
#   The virtual disks are raw files given to QEMU with cache=writethrough. The
#   guest is then told its disks have no volatile write cache
#   (/sys/block/vdX/queue/write_cache = "write through", checked in the guest),
#   so in the guest's own model a write is durable once the disk completed it
#   and flushes are not needed. QEMU's raw driver keeps no data of its own: a
#   write it completed is in the host's file (here even synced), and the host
#   does not crash, so after `kill -9` of QEMU the disks hold exactly the
#   writes the guest kernel had completed, plus perhaps part of those in flight
#   -- what a power cut leaves on a disk without a write cache. Everything the
#   guest held in RAM is gone: its page cache (every write of the emulator not
#   yet written back by an fdatasync/msync), its processes, its /dev/shm lock
#   tables. So the only way an acknowledged FUA or flushed write survives is
#   the emulator's fdatasync/msync having written it to the virtual disk before
#   the acknowledgement; skip that and the write is lost (shown by running this
#   round against a build whose FLUSH and FUA do not sync).
#   Modes that would not be honest: cache=writeback, none or unsafe advertise
#   a write-back cache to the guest, but killing QEMU does not lose what that
#   "cache" holds (the host's page cache outlives QEMU), so writes the guest
#   never flushed would survive too: a lenient disk. cache=unsafe in
#   particular only drops flushes to the host's disk, which matters on a crash
#   of the host, never on a kill of QEMU.
#   The record: its lines reach the file (one write(2) per batch) before the
#   writes they announce are sent, and the record's file system is mounted
#   -o sync, so each of those write(2)s returns only once the lines are on the
#   disk. Hence every write that can be on the data disk has its `sent` line on
#   the record disk (a record that lost a tail while the data disk kept the
#   writes would make verify report content it does not know as lost: a false
#   failure), and every `acked`/`flush_acked` line the record holds was seen by
#   the client first (a line lost in the cut only makes the check weaker).
#
# Every step prints `PASS <step>` or `FAIL <step>` on the serial console; the
# script exits 0 only when every expected PASS marker is there and no FAIL.
#
# Usage: scripts/linux-host-test.sh
#
# Needs Debian's apt. Missing tools are installed as root (sudo when not root):
# busybox-static, nbd-client, cpio, e2fsprogs. The kernel (the package that
# `apt-cache depends linux-image-amd64` names) is fetched with `apt-get download`
# and unpacked with `dpkg -x` under run/linux-host/; nothing is installed for it.
# qemu-system-x86_64 is used from PATH when installed; otherwise qemu-system-x86
# and the dependencies the machine lacks are downloaded and unpacked the same
# way, because installing Debian's qemu-system-x86 removes a newer qemu-utils
# (from backports), which the black-box tests use.
#
# Environment:
#   EMULATOR            emulator binary to put in the guest (default: run
#                       `cargo build --release --locked` and use
#                       target/release/emulator); EMULATOR_BIN is accepted too
#   LINUX_HOST_DIR      cache and work directory (default <repo>/run/linux-host)
#   LINUX_HOST_TIMEOUT  seconds QEMU may run (default 300)
#   LINUX_HOST_KERNEL   kernel image package to use instead of the one that
#                       linux-image-amd64 names (e.g. linux-image-6.1.0-56-amd64)
#   QEMU_SYSTEM         qemu-system-x86_64 binary to use instead of the above
#   LINUX_HOST_ROUNDS   which boots to run: "main" (rounds 1 to 3), "power"
#                       (the power-loss round), default "main power"
#   POWER_SEED          seed of the power-loss round: the workload's seed and
#                       how many acknowledged writes come before the cut
#                       (default: random; printed, so a run can be replayed --
#                       up to the exact instant of the kill, which depends on
#                       timing)
#
# Output: the guest's consoles in $LINUX_HOST_DIR/console.log (the first boot),
# console-power-write.log and console-power-verify.log; the power-loss round's
# disks and a copy of its record under $LINUX_HOST_DIR/power/.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LINUX_HOST_DIR:-$REPO/run/linux-host}
TIMEOUT=${LINUX_HOST_TIMEOUT:-300}
EMULATOR=${EMULATOR:-${EMULATOR_BIN:-}}

# Guest parameters (kept small: TCG runs the guest ~10x slower than native).
IMAGE_MIB=64
DATA_MIB=8
PORT=10809
EXPORT=disk0
# Round 3: the domain's first NBD port (s0/c0 serves the volume there).
DOMAIN_PORT=10811
# The power-loss round: sizes of the data disk, of the emulator's image on it
# and of the record disk; seconds the host waits for `PASS power-armed`.
POWER_DATA_MIB=192
POWER_IMAGE_MIB=32
POWER_ARRAY_DISK_MIB=8
POWER_RECORD_MIB=16
POWER_ARM_TIMEOUT=300
case $TIMEOUT in '' | *[!0-9]*) echo "linux-host-test: error: LINUX_HOST_TIMEOUT must be whole seconds" >&2; exit 2 ;; esac
ROUNDS=${LINUX_HOST_ROUNDS:-main power}
for r in $ROUNDS; do
    case $r in main | power) ;; *) echo "linux-host-test: error: LINUX_HOST_ROUNDS: unknown round $r (main, power)" >&2; exit 2 ;; esac
done
POWER_SEED=${POWER_SEED:-$(((RANDOM << 15 | RANDOM) % 1000000))}
case $POWER_SEED in '' | *[!0-9]*) echo "linux-host-test: error: POWER_SEED must be a whole number" >&2; exit 2 ;; esac
# The cut comes once the record holds this many acknowledged writes.
POWER_CUT_ACKED=$((100 + POWER_SEED % 400))
# The guest gives up (printing FAIL watchdog) a little before QEMU is killed.
GUEST_WATCHDOG=$((TIMEOUT > 60 ? TIMEOUT - 30 : TIMEOUT * 3 / 4 + 1))

# Every marker a passing run prints, in order.
EXPECTED=(
    modules loopback image-create
    serve-tcp list-exports attach-tcp mkfs-ext4 write-files umount-detach
    fsck-image reattach-tcp fsck-nbd verify-data write-more detach-tcp
    sigterm-exit-0 image-verify
    serve-unix attach-unix-multiconn verify-after-restart detach-unix
    sigterm-exit-0-unix fsck-image-final image-verify-final kernel-log-clean
    domain-up attach-domain mkfs-write-domain fail-disk-auto-rebuild
    kill-owner-ride-over failback fsck-verify-domain scrub-clean detach-domain
    domain-down kernel-log-no-errors
    all
)
# The power-loss round's two boots.
EXPECTED_POWER_WRITE=(
    modules power-disks power-image-create power-serve power-array-create power-array-degrade
    power-serve-array power-domain-up power-armed
)
EXPECTED_POWER_VERIFY=(
    modules power-mount-replay power-fsck power-record power-image-verify
    power-members-verify power-serve-again power-workload-verify power-sigterm-exit-0
    power-serve-array-again power-array-verify power-array-degraded-verify
    power-array-sigterm-exit-0 power-domain-up-again power-domain-verify
    power-domain-degraded-verify power-domain-down power-kernel-log power-all
)

export PATH="$PATH:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
START=$SECONDS

die() {
    echo "linux-host-test: error: $*" >&2
    exit 2
}
log() { echo "linux-host-test: $*" >&2; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
    # apt-get download drops to the _apt user unless told otherwise; as root
    # write straight into the cache instead of warning about its permissions.
    APT_DL=(apt-get -o APT::Sandbox::User=root -q download)
else
    SUDO=(sudo)
    APT_DL=(apt-get -q download)
fi

# ---------------------------------------------------------------- host tools
install_missing_tools() {
    local missing=() bb
    bb=$(command -v busybox || true)
    # A static busybox: the guest has no libc of its own for it.
    if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then missing+=(busybox-static); fi
    command -v nbd-client >/dev/null || missing+=(nbd-client)
    command -v cpio >/dev/null || missing+=(cpio)
    { command -v mke2fs && command -v e2fsck; } >/dev/null || missing+=(e2fsprogs)
    command -v apt-get >/dev/null || die "needs Debian's apt-get"
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        if [ ${#SUDO[@]} -gt 0 ] && ! command -v sudo >/dev/null; then
            die "missing packages ${missing[*]} and not root; install them with apt-get"
        fi
        "${SUDO[@]}" apt-get update -qq
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# apt-get download PKG into $CACHE/debs once; prints the .deb's path.
fetch_deb() {
    local pkg=$1 debs=$CACHE/debs f
    mkdir -p "$debs"
    f=$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)
    if [ -z "$f" ]; then
        log "downloading $pkg"
        (cd "$debs" && "${APT_DL[@]}" "$pkg" >/dev/null) ||
            { "${SUDO[@]}" apt-get update -qq && (cd "$debs" && "${APT_DL[@]}" "$pkg" >/dev/null); } ||
            die "apt-get download $pkg failed"
        f=$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)
    fi
    [ -n "$f" ] || die "no .deb for $pkg after apt-get download"
    echo "$f"
}

# ---------------------------------------------------------------- kernel
KERNEL_PKG=${LINUX_HOST_KERNEL:-}
prepare_kernel() {
    if [ -z "$KERNEL_PKG" ]; then
        KERNEL_PKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
        if [ -z "$KERNEL_PKG" ]; then
            "${SUDO[@]}" apt-get update -qq
            KERNEL_PKG=$(apt-cache depends linux-image-amd64 |
                awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
        fi
        [ -n "$KERNEL_PKG" ] || die "apt-cache depends linux-image-amd64 names no kernel package"
    fi
    KROOT=$CACHE/kernel/$KERNEL_PKG
    # .unpacked-2: the cache keeps drivers/virtio too (the power-loss round's
    # virtual disks); an older cache without it is unpacked again.
    if [ ! -e "$KROOT/.unpacked-2" ]; then
        local deb
        deb=$(fetch_deb "$KERNEL_PKG")
        # Only one kernel is kept: drop any older one.
        rm -rf "$CACHE/kernel"
        mkdir -p "$KROOT"
        dpkg -x "$deb" "$KROOT" || { rm -f "$deb"; die "dpkg -x of $deb failed (deleted it; run again)"; }
        # Keep the cache small (~60 MiB instead of ~400): the guest's modules
        # and their dependencies live under fs/, lib/, crypto/, drivers/block/
        # and drivers/virtio/.
        local k
        for k in "$KROOT"/lib/modules/*/kernel; do
            rm -rf "$k/sound" "$k/net"
            find "$k/drivers" -mindepth 1 -maxdepth 1 ! -name block ! -name virtio -exec rm -rf {} +
        done
        touch "$KROOT/.unpacked-2"
        rm -f "$deb" # the unpacked tree is the cache
    fi
    VMLINUZ=$(find "$KROOT/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
    [ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $KERNEL_PKG"
    KVER=${VMLINUZ##*/vmlinuz-}
    MODDIR=$KROOT/lib/modules/$KVER
    [ -d "$MODDIR/kernel" ] || die "no modules for $KVER in $KERNEL_PKG"
}

# Orders the modules the guest needs (dependencies first, from each module's
# own `depends=` field: the unpacked package has no modules.dep) and copies
# them into the initramfs. Built-in ones are skipped.
declare -A MOD_SEEN=()
MOD_ORDER=()
MOD_BUILTIN=()
add_module() {
    local name=$1 file dep deps
    [ -n "${MOD_SEEN[$name]:-}" ] && return 0
    MOD_SEEN[$name]=1
    if grep -qE "/(${name}|${name//_/-})\.ko(\.[a-z]+)?\$" "$MODDIR/modules.builtin"; then
        MOD_BUILTIN+=("$name")
        return 0
    fi
    file=$(find "$MODDIR/kernel" \( -name "${name}.ko*" -o -name "${name//_/-}.ko*" \) | head -n 1)
    [ -n "$file" ] || die "kernel $KVER has no module $name, built-in or loadable (or the cache pruned it: see prepare_kernel)"
    deps=$(mod_cat "$file" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    MOD_ORDER+=("$name")
    mod_cat "$file" >"$INITRD_ROOT/lib/modules/$name.ko"
}
mod_cat() {
    case $1 in
    *.ko) cat "$1" ;;
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -qdc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) die "unknown module format: $1" ;;
    esac
}

# ---------------------------------------------------------------- qemu
QEMU_ENV=()
QEMU_EXTRA=()
prepare_qemu() {
    if [ -n "${QEMU_SYSTEM:-}" ]; then
        QEMU=$QEMU_SYSTEM
        return
    fi
    if command -v qemu-system-x86_64 >/dev/null; then
        QEMU=$(command -v qemu-system-x86_64)
        return
    fi
    # Not installed: unpack Debian's qemu-system-x86 (and whatever it depends
    # on that the machine lacks) under the cache instead of installing it.
    local qroot=$CACHE/qemu pkg deb status notfound
    if [ ! -e "$qroot/.unpacked" ]; then
        local pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
        for pkg in $(apt-cache depends qemu-system-x86 | awk '$1 == "Depends:" { print $2 }' | sort -u); do
            status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
            case $status in ii*) ;; *) pkgs+=("$pkg") ;; esac
        done
        rm -rf "$qroot"
        mkdir -p "$qroot"
        for pkg in $(printf '%s\n' "${pkgs[@]}" | sort -u); do
            deb=$(fetch_deb "$pkg")
            dpkg -x "$deb" "$qroot" || { rm -f "$deb"; die "dpkg -x of $deb failed (deleted it; run again)"; }
        done
        touch "$qroot/.unpacked"
        rm -f "$CACHE"/debs/*.deb
    fi
    QEMU=$qroot/usr/bin/qemu-system-x86_64
    [ -x "$QEMU" ] || die "no qemu-system-x86_64 in the unpacked qemu-system-x86"
    QEMU_ENV=(
        "LD_LIBRARY_PATH=$qroot/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        "QEMU_MODULE_DIR=$qroot/usr/lib/x86_64-linux-gnu/qemu"
    )
    notfound=$(env "${QEMU_ENV[@]}" ldd "$QEMU" | grep 'not found' || true)
    [ -z "$notfound" ] || die "unpacked qemu-system-x86_64 lacks libraries: $notfound"
    local d
    for d in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do
        [ -d "$qroot/$d" ] && QEMU_EXTRA+=(-L "$qroot/$d")
    done
}

# ---------------------------------------------------------------- initramfs
# Copies a dynamically linked program and the libraries ldd lists to the same
# paths inside the initramfs.
copy_with_libs() {
    local src=$1 dest=$2 lib
    mkdir -p "$INITRD_ROOT$(dirname "$dest")"
    cp -L "$src" "$INITRD_ROOT$dest"
    while read -r lib; do
        [ -e "$INITRD_ROOT$lib" ] && continue
        mkdir -p "$INITRD_ROOT$(dirname "$lib")"
        cp -L "$lib" "$INITRD_ROOT$lib"
    done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
    if ldd "$src" | grep -q 'not found'; then die "$src: libraries not found: $(ldd "$src" | grep 'not found')"; fi
}

build_initramfs() {
    INITRD_ROOT=$CACHE/initramfs
    rm -rf "$INITRD_ROOT"
    mkdir -p "$INITRD_ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,lib/modules,proc,sys,dev,tmp,data,mnt,run}

    # busybox and its applets as symlinks (none over the real tools below).
    cp -L "$(command -v busybox)" "$INITRD_ROOT/bin/busybox"
    copy_with_libs "$EMULATOR" /usr/bin/emulator
    copy_with_libs "$(command -v nbd-client)" /usr/sbin/nbd-client
    copy_with_libs "$(command -v mke2fs)" /usr/sbin/mke2fs
    copy_with_libs "$(command -v e2fsck)" /usr/sbin/e2fsck
    ln -s mke2fs "$INITRD_ROOT/usr/sbin/mkfs.ext4"
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$INITRD_ROOT/etc/"
    local applet
    while read -r applet; do
        [ -e "$INITRD_ROOT/$applet" ] || [ -L "$INITRD_ROOT/$applet" ] && continue
        mkdir -p "$INITRD_ROOT/$(dirname "$applet")"
        ln -s /bin/busybox "$INITRD_ROOT/$applet"
    done < <("$INITRD_ROOT/bin/busybox" --list-full)
    # The kernel normally provides /dev/console from its built-in initramfs;
    # add one in case (needs root; the guest's /init reopens it on devtmpfs).
    mknod -m 600 "$INITRD_ROOT/dev/console" c 5 1 2>/dev/null || true

    add_module nbd
    # ext4 and jbd2 ask the crypto API for "crc32c" at mount time, which is
    # not a symbol dependency: load the generic implementation explicitly.
    add_module crc32c_generic
    add_module ext4
    # The power-loss round's virtual disks.
    add_module virtio_pci
    add_module virtio_blk

    cat >"$INITRD_ROOT/etc/linux-host-test.conf" <<EOF
IMAGE_MIB=$IMAGE_MIB
DATA_MIB=$DATA_MIB
PORT=$PORT
EXPORT=$EXPORT
DOMAIN_PORT=$DOMAIN_PORT
MODULES="${MOD_ORDER[*]}"
WATCHDOG=$GUEST_WATCHDOG
POWER_DATA_MIB=$POWER_DATA_MIB
POWER_IMAGE_MIB=$POWER_IMAGE_MIB
POWER_ARRAY_DISK_MIB=$POWER_ARRAY_DISK_MIB
POWER_RECORD_MIB=$POWER_RECORD_MIB
EOF
    write_guest_init >"$INITRD_ROOT/init"
    chmod 755 "$INITRD_ROOT/init"

    (cd "$INITRD_ROOT" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$CACHE/initrd.gz"
}

# The guest's /init (busybox sh). Each step prints PASS/FAIL on the console;
# the first failure prints its output, the emulator's log and the kernel log,
# then powers off.
write_guest_init() {
    cat <<'GUEST'
#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o size=256m tmpfs /data
mount -t tmpfs tmpfs /run
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
. /etc/linux-host-test.conf
IMAGE=/data/$EXPORT.img
SOCKET=/run/nbd.sock
echo "guest: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"

finish() {
    sync
    echo "guest: powering off"
    poweroff -f
    sleep 30
}
(sleep "$WATCHDOG"; echo "FAIL watchdog (guest steps took over ${WATCHDOG}s)"; finish) &

step() {
    name=$1
    shift
    t0=$(cut -d' ' -f1 /proc/uptime)
    if "$@" >/tmp/step.out 2>&1; then
        echo "PASS $name ($(awk -v t0="$t0" '{ printf "%.1f", $1 - t0 }' /proc/uptime)s)"
    else
        rc=$?
        echo "FAIL $name (exit status $rc)"
        tail -n 40 /tmp/step.out | sed 's/^/  | /'
        if [ -s /tmp/emulator.log ]; then
            echo "  emulator log (tail):"
            tail -n 30 /tmp/emulator.log | sed 's/^/  | /'
        fi
        for log in /tmp/attach.log /data/domain/logs/s0-c1-driver.log /data/domain/logs/s0-c0-driver.log; do
            [ -s "$log" ] || continue
            echo "  $log (tail):"
            tail -n 15 "$log" | sed 's/^/  | /'
        done
        echo "  kernel log (tail):"
        dmesg | tail -n 25 | sed 's/^/  | /'
        finish
    fi
}

# Waits up to $2 tenths of a second for the command in $1 to succeed.
wait_for() {
    n=0
    until eval "$1"; do
        n=$((n + 1))
        [ "$n" -ge "$2" ] && return 1
        sleep 0.1
    done
}

load_modules() {
    for m in $MODULES; do
        echo "insmod $m"
        insmod "/lib/modules/$m.ko" || return 1
    done
    wait_for '[ -b /dev/nbd0 ]' 50 || { echo "no /dev/nbd0"; return 1; }
    grep -w ext4 /proc/filesystems
}

loopback_up() {
    ip link set lo up && ip addr show dev lo && ip addr show dev lo | grep -q 'inet 127.0.0.1/'
}

server_alive() {
    pid=$(cat /tmp/emulator.pid)
    state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}

start_server() {
    : >/tmp/emulator.log
    emulator serve --image "$IMAGE" "$@" >>/tmp/emulator.log 2>&1 &
    echo $! >/tmp/emulator.pid
}

tcp_listening() {
    hexport=$(printf '%04X' "$PORT")
    grep -q ":$hexport 00000000:0000 0A" /proc/net/tcp
}

# Waits up to 30 s for the server to listen ($1: the check), giving up as soon
# as the server has exited.
wait_listening() {
    wait_for "$1 || ! server_alive" 300
    if ! server_alive; then
        wait "$(cat /tmp/emulator.pid)"
        echo "emulator exited with status $?"
        return 1
    fi
    eval "$1" || { echo "not listening after 30s"; return 1; }
}

serve_tcp() {
    start_server --listen "127.0.0.1:$PORT"
    wait_listening tcp_listening
}

serve_unix() {
    start_server --socket "$SOCKET"
    wait_listening '[ -S "$SOCKET" ]'
}

list_exports() {
    timeout 30 nbd-client -l 127.0.0.1 "$PORT" >/tmp/list.out 2>&1
    rc=$?
    cat /tmp/list.out
    # One line per export: its name, then ": description" when it has one.
    [ "$rc" -eq 0 ] && grep -qE "^$EXPORT(:|\$)" /tmp/list.out
}

# Checks that /dev/nbd0 is connected and has the image's size.
attached() {
    want=$((IMAGE_MIB * 2048))
    wait_for '[ "$(cat /sys/block/nbd0/size)" = "$want" ]' 50 ||
        { echo "/sys/block/nbd0/size is $(cat /sys/block/nbd0/size), want $want"; return 1; }
    echo "nbd0: $(cat /sys/block/nbd0/size) sectors, logical block $(cat /sys/block/nbd0/queue/logical_block_size)," \
        "discard max $(cat /sys/block/nbd0/queue/discard_max_bytes) bytes"
}

attach_tcp() {
    timeout 60 nbd-client 127.0.0.1 "$PORT" /dev/nbd0 -N "$EXPORT" && attached
}

attach_unix_multiconn() {
    timeout 60 nbd-client -unix "$SOCKET" /dev/nbd0 -N "$EXPORT" -connections 2 && attached || return 1
    # The server's side of each connected stream socket names the path.
    wait_for '[ "$(grep -c " 03 .*$SOCKET\$" /proc/net/unix)" -eq 2 ]' 50 ||
        { echo "want 2 connections to $SOCKET:"; grep "$SOCKET" /proc/net/unix; return 1; }
    echo "connections to $SOCKET: 2"
}

detach() {
    nbd-client -d /dev/nbd0 || return 1
    wait_for '[ "$(cat /sys/block/nbd0/size)" = 0 ]' 100 ||
        { echo "/dev/nbd0 still has size $(cat /sys/block/nbd0/size) after nbd-client -d"; return 1; }
    # Nothing of the device stays in the page cache: the next reads go over NBD.
    echo 3 >/proc/sys/vm/drop_caches
}

mkfs_ext4() {
    mkfs.ext4 -F /dev/nbd0
}

make_files() {
    mkdir -p /tmp/src/dir
    dd if=/dev/urandom of=/tmp/src/random.bin bs=1M count="$DATA_MIB" 2>&1
    echo "written by $(uname -r) through /dev/nbd0" >/tmp/src/hello.txt
    i=1
    while [ "$i" -le 24 ]; do
        dd if=/dev/urandom of="/tmp/src/dir/small-$i" bs=1k count=$((i * 3 % 17 + 1)) 2>/dev/null
        i=$((i + 1))
    done
    # A sparse file with data at both ends.
    dd if=/dev/urandom of=/tmp/src/sparse.bin bs=4k count=1 2>/dev/null
    dd if=/dev/urandom of=/tmp/src/sparse.bin bs=4k count=1 seek=1000 conv=notrunc 2>/dev/null
    (cd /tmp/src && find . -type f | sort | xargs sha256sum) >/tmp/sums
}

write_files() {
    make_files && mount -t ext4 /dev/nbd0 /mnt && cp -a /tmp/src/. /mnt/ && sync && df -k /mnt &&
        cat /tmp/sums
}

umount_detach() {
    umount /mnt && detach
}

fsck_image() {
    e2fsck -fn "$IMAGE"
}

fsck_nbd() {
    e2fsck -fn /dev/nbd0
}

verify_data() {
    mount -t ext4 /dev/nbd0 /mnt && (cd /mnt && sha256sum -c /tmp/sums) &&
        [ "$(cd /mnt && find . -type f | grep -vc lost+found)" -eq "$(grep -c '' /tmp/sums)" ]
}

write_more() {
    dd if=/dev/urandom of=/tmp/more.bin bs=64k count=16 2>&1 &&
        cp /tmp/more.bin /mnt/more.bin && (cd /tmp && sha256sum more.bin) >>/tmp/sums &&
        rm /mnt/dir/small-1 && sed -i '/dir\/small-1$/d' /tmp/sums &&
        sync && umount /mnt
}

verify_after_restart() {
    mount -t ext4 -o ro /dev/nbd0 /mnt && (cd /mnt && sha256sum -c /tmp/sums) &&
        [ ! -e /mnt/dir/small-1 ] && umount /mnt
}

# SIGTERM: the server must finish in order and exit with status 0.
stop_server() {
    pid=$(cat /tmp/emulator.pid)
    kill -TERM "$pid" || return 1
    wait_for '! server_alive' 300 || { echo "emulator still running 30s after SIGTERM"; return 1; }
    wait "$pid"
    rc=$?
    echo "emulator exit status $rc"
    tail -n 5 /tmp/emulator.log
    [ "$rc" -eq 0 ]
}

image_verify() {
    emulator image verify "$IMAGE"
}

# No I/O error, NBD error or ext4 error was logged by the kernel at any point.
kernel_log_clean() {
    dmesg >/tmp/dmesg.out
    grep -c '' /tmp/dmesg.out
    ! grep -iE 'I/O error|nbd[0-9]*:.*(error|fail|timed out)|EXT4-fs error|EXT4-fs warning|JBD2:.*error|blk_update_request|Buffer I/O' /tmp/dmesg.out
}

# ---- Round 3: a whole domain, a disk failure and a controller failover.
DOMAIN=/data/domain

# Writes a domain configuration to $1: servers A and B on s0's clusters, one
# RAID-5 system of $2 disks of $3 each and $4 hot spares, one volume.
domain_config() {
    cat >"$1" <<EOF
[servers]
a = "s0/c0"
b = "s0/c1"
[ports]
nbd = $DOMAIN_PORT
http = 8080
[[systems]]
disks = $2
disk_size = "$3"
raid = "raid5"
spares = $4
chunk = "64KiB"
volumes = 1
EOF
}

domain_up() {
    domain_config /tmp/domain.toml 5 24MiB 1 &&
        timeout 150 emulator up --config /tmp/domain.toml --run-dir "$DOMAIN" --detach
}

status() {
    emulator status --run-dir "$DOMAIN"
}

attach_domain() {
    emulator attach --timeout 10 --dead-conn-timeout 60 "nbd://127.0.0.1:$DOMAIN_PORT/vol0" >/tmp/attach.log 2>&1 &
    echo $! >/tmp/attach.pid
    wait_for 'grep -q "^attached" /tmp/attach.log' 300 || { cat /tmp/attach.log; return 1; }
    cat /tmp/attach.log
    [ "$(cat /sys/block/nbd0/size)" -gt 0 ] && status | grep -F "owner s0/c0 (home s0/c0), path optimized"
}

# Writes $2 KiB of random data to /mnt/$1 and records its sum.
put_file() {
    dd if=/dev/urandom of="/tmp/$1" bs=1k count="$2" 2>/dev/null &&
        cp "/tmp/$1" "/mnt/$1" && (cd /tmp && sha256sum "$1") >>/tmp/domain.sums && rm "/tmp/$1"
}

mkfs_write_domain() {
    : >/tmp/domain.sums
    mkfs.ext4 -q -F /dev/nbd0 && mount -t ext4 /dev/nbd0 /mnt && put_file first.bin 4096 &&
        put_file small.txt 3 && sync
}

fail_disk_auto_rebuild() {
    emulator task submit --run-dir "$DOMAIN" --system s0 --cluster c1 fail-disk --disk 1 --wait || return 1
    # Written while the array is degraded and the spare is being rebuilt.
    put_file during-rebuild.bin 2048 && sync || return 1
    wait_for 'status | grep -q "system s0: optimal" && ! status | grep -qE "^  (rebuild|scrub) "' 1200 ||
        { status; return 1; }
    status
}

kill_owner_ride_over() {
    pid=$(status | sed -n 's/.*cluster s0\/c0 .*driver \([0-9]*\) (running).*/\1/p')
    [ -n "$pid" ] || { status; return 1; }
    echo "kill -9 s0/c0/driver (pid $pid) while writing"
    dd if=/dev/urandom of=/tmp/after-kill.bin bs=64k count=32 2>/dev/null
    cp /tmp/after-kill.bin /mnt/after-kill.bin &
    writer=$!
    kill -9 "$pid"
    wait "$writer" && sync && (cd /tmp && sha256sum after-kill.bin) >>/tmp/domain.sums || return 1
    put_file after-failover.bin 1024 && sync || return 1
    grep reconnected /tmp/attach.log || { cat /tmp/attach.log; return 1; }
    wait_for 'status | grep -qF "owner s0/c1 (home s0/c0), path failed-over"' 100 || { status; return 1; }
    status | grep -F vol0
}

failback() {
    emulator restart --run-dir "$DOMAIN" s0/c0/driver || return 1
    wait_for 'status | grep -qF "owner s0/c0 (home s0/c0), path optimized"' 300 || { status; return 1; }
    put_file after-failback.bin 1024 && sync && status | grep -F vol0
}

fsck_verify_domain() {
    umount /mnt && e2fsck -fn /dev/nbd0 && mount -t ext4 -o ro /dev/nbd0 /mnt &&
        (cd /mnt && sha256sum -c /tmp/domain.sums) && umount /mnt
}

scrub_clean() {
    emulator task submit --run-dir "$DOMAIN" --system s0 --cluster c1 scrub --wait --json >/tmp/scrub.json || return 1
    grep -E '"(checksum_errors|parity_mismatches)"' /tmp/scrub.json &&
        grep -q '"checksum_errors": 0' /tmp/scrub.json && grep -q '"parity_mismatches": 0' /tmp/scrub.json
}

detach_domain() {
    pid=$(cat /tmp/attach.pid)
    kill -TERM "$pid" && wait "$pid" || { cat /tmp/attach.log; return 1; }
    cat /tmp/attach.log
    wait_for '[ "$(cat /sys/block/nbd0/size)" = 0 ]' 100
}

domain_down() {
    timeout 60 emulator down --run-dir "$DOMAIN"
}

# The failover may log the nbd driver's own notices (a dead connection, a
# request retried); never an I/O error reaching a file system.
kernel_log_no_errors() {
    dmesg >/tmp/dmesg.out
    grep -iE 'nbd' /tmp/dmesg.out | tail -n 20
    ! grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|JBD2:.*error|blk_update_request|Buffer I/O' /tmp/dmesg.out
}

# ---- The power-loss round: boot "power-write" runs the workload until the
# host pulls the plug; boot "power-verify" checks what the disks kept.
PDATA=/pdata
PRECORD_DIR=/precord
PRECORD=$PRECORD_DIR/power.jsonl
PURI="nbd+unix:///power?socket=/run/power.sock"
# The array beside the image: RAID-6 over 5 members, degraded from the start
# (member PARRAY_FAILED failed), so that a write to a stripe whose data is on
# that member saves its bytes in the degraded-write journal first; its volume
# vol0 written by a second workload with a record of its own.
PARRAY_FAILED=2
PARRAY=$PDATA/parray
PRECORD_ARRAY=$PRECORD_DIR/power-array.jsonl
PASOCKET=/run/parray.sock
PURI_ARRAY="nbd+unix:///vol0?socket=$PASOCKET"
# And a whole domain (emulator up: drivers, agents, servers, persistent data)
# whose volume a third workload writes over TCP.
PDOMAIN=$PDATA/domain
PRECORD_DOMAIN=$PRECORD_DIR/power-domain.jsonl
PURI_DOMAIN="nbd://127.0.0.1:$DOMAIN_PORT/vol0"

# Brings the power-loss round's domain up (the same configuration both boots).
power_domain_up() {
    loopback_up >/dev/null && domain_config /tmp/pdomain.toml 4 8MiB 0 &&
        timeout 150 emulator up --config /tmp/pdomain.toml --run-dir "$PDOMAIN" --detach
}

# Both virtual disks are there, with the sizes the host gave them, and without
# a volatile write cache (see the host side for why that keeps the test honest).
power_disks_check() {
    wait_for '[ -b /dev/vda ] && [ -b /dev/vdb ]' 100 || { ls /sys/block; return 1; }
    for d in vda vdb; do
        echo "$d: $(cat /sys/block/$d/size) sectors, write cache: $(cat /sys/block/$d/queue/write_cache)"
    done
    [ "$(cat /sys/block/vda/size)" = $((POWER_DATA_MIB * 2048)) ] &&
        [ "$(cat /sys/block/vdb/size)" = $((POWER_RECORD_MIB * 2048)) ] ||
        { echo "want vda of ${POWER_DATA_MIB} MiB and vdb of ${POWER_RECORD_MIB} MiB"; return 1; }
    [ "$(cat /sys/block/vda/queue/write_cache)" = "write through" ] &&
        [ "$(cat /sys/block/vdb/queue/write_cache)" = "write through" ]
}

power_disks() {
    power_disks_check && mkdir -p "$PDATA" "$PRECORD_DIR" && mount -t ext4 /dev/vda "$PDATA" &&
        mount -t ext4 -o sync /dev/vdb "$PRECORD_DIR" && grep -E " $PDATA | $PRECORD_DIR " /proc/mounts
}

# Whether the process whose pid is in file $1 runs.
pid_alive() {
    pid=$(cat "$1")
    state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}

workload_alive() {
    pid_alive /tmp/workload.pid && pid_alive /tmp/workload-array.pid && pid_alive /tmp/workload-domain.pid
}

# Counts the lines of one kind (acked, flush_acked, fua) of a record ($2,
# default the image's).
record_count() {
    case $1 in
    fua) grep -c '"fua":true' "${2:-$PRECORD}" ;;
    *) grep -c "\"$1\":" "${2:-$PRECORD}" ;;
    esac
}

record_reached() {
    [ -s "$1" ] && [ "$(record_count acked "$1")" -ge "$CUT" ] && [ "$(record_count flush_acked "$1")" -ge 1 ]
}

power_cut_reached() {
    record_reached "$PRECORD" && record_reached "$PRECORD_ARRAY" && record_reached "$PRECORD_DOMAIN"
}

array_server_alive() {
    pid_alive /tmp/emulator-array.pid
}

# emulator serve --array on the power-loss round's array, over a Unix socket.
serve_array() {
    emulator serve --array "$PARRAY" --socket "$PASOCKET" >>/tmp/emulator-array.log 2>&1 &
    echo $! >/tmp/emulator-array.pid
    wait_for '[ -S "$PASOCKET" ] || ! array_server_alive' 300
    array_server_alive && [ -S "$PASOCKET" ] || { echo "the array server is not listening"; tail -n 20 /tmp/emulator-array.log; return 1; }
}

stop_array_server() {
    pid=$(cat /tmp/emulator-array.pid)
    kill -TERM "$pid" || return 1
    wait_for '! array_server_alive' 300 || { echo "the array server still runs 30s after SIGTERM"; return 1; }
    wait "$pid"
    rc=$?
    echo "array server exit status $rc"
    [ "$rc" -eq 0 ]
}

# Starts the three workloads and waits (up to 240 s) until each record holds
# $CUT acknowledged writes and an acknowledged FLUSH, the workloads still
# running.
power_armed() {
    emulator workload run --uri "$PURI" --seed "$SEED" --duration 900s --qd 16 \
        --fua-every 7 --flush-every 32 --record "$PRECORD" >/tmp/workload.log 2>&1 &
    echo $! >/tmp/workload.pid
    emulator workload run --uri "$PURI_ARRAY" --seed "$((SEED + 1))" --duration 900s --qd 16 \
        --fua-every 7 --flush-every 32 --record "$PRECORD_ARRAY" >/tmp/workload-array.log 2>&1 &
    echo $! >/tmp/workload-array.pid
    emulator workload run --uri "$PURI_DOMAIN" --seed "$((SEED + 2))" --duration 900s --qd 16 \
        --fua-every 7 --flush-every 32 --record "$PRECORD_DOMAIN" >/tmp/workload-domain.log 2>&1 &
    echo $! >/tmp/workload-domain.pid
    wait_for 'power_cut_reached || ! workload_alive' 2400
    if ! workload_alive; then
        for w in workload workload-array workload-domain; do
            pid_alive /tmp/$w.pid && continue
            wait "$(cat /tmp/$w.pid)"
            echo "$w exited with status $?"
            cat /tmp/$w.log
        done
        return 1
    fi
    power_cut_reached || {
        echo "the records hold $(record_count acked), $(record_count acked "$PRECORD_ARRAY") and" \
            "$(record_count acked "$PRECORD_DOMAIN") acked writes after 240 s, want $CUT each"
        return 1
    }
    echo "power: the records hold $(record_count acked) acked writes ($(record_count fua) sent with FUA)," \
        "$(record_count flush_acked) acked FLUSHes on the image; $(record_count acked "$PRECORD_ARRAY") acked writes," \
        "$(record_count flush_acked "$PRECORD_ARRAY") acked FLUSHes on the array;" \
        "$(record_count acked "$PRECORD_DOMAIN") acked writes, $(record_count flush_acked "$PRECORD_DOMAIN")" \
        "acked FLUSHes on the domain: pulling the plug" >/dev/console
}

round_power_write() {
    echo "guest: power-loss round, writing (seed $SEED, cut after $CUT acked writes)"
    step modules load_modules
    step power-disks power_disks
    IMAGE=$PDATA/power.img
    SOCKET=/run/power.sock
    step power-image-create emulator image create "$IMAGE" --size "${POWER_IMAGE_MIB}MiB"
    step power-serve serve_unix
    step power-array-create emulator array create "$PARRAY" --level raid6 --disks 5 \
        --disk-size "${POWER_ARRAY_DISK_MIB}MiB"
    step power-array-degrade emulator array fail "$PARRAY" --disk "$PARRAY_FAILED"
    step power-serve-array serve_array
    step power-domain-up power_domain_up
    step power-armed power_armed
    # The host kills QEMU as soon as it reads PASS power-armed: nothing after
    # this line may run, unless the workload ends first.
    wait "$(cat /tmp/workload.pid)"
    echo "FAIL power-cut (the workload ended with status $? and the plug was never pulled)"
    tail -n 20 /tmp/workload.log | sed 's/^/  | /'
    finish
}

# Mounting replays both journals: the file systems were left as a crash leaves
# them (had they been unmounted cleanly, the plug was pulled at the wrong time).
power_mount_replay() {
    power_disks_check && mkdir -p "$PDATA" "$PRECORD_DIR" &&
        mount -t ext4 /dev/vda "$PDATA" && mount -t ext4 -o ro /dev/vdb "$PRECORD_DIR" || return 1
    dmesg | grep -E 'EXT4-fs \(vd[ab]\)'
    dmesg | grep -qE 'EXT4-fs \(vda\): recovery complete' && dmesg | grep -qE 'EXT4-fs \(vdb\): recovery complete'
}

# After the replay both file systems are consistent.
power_fsck() {
    umount "$PDATA" && umount "$PRECORD_DIR" && e2fsck -fn /dev/vda && e2fsck -fn /dev/vdb &&
        mount -t ext4 /dev/vda "$PDATA" && mount -t ext4 -o ro /dev/vdb "$PRECORD_DIR"
}

# The record made it, and it claims durable writes (else verify proves nothing).
power_record() {
    for record in "$PRECORD" "$PRECORD_ARRAY" "$PRECORD_DOMAIN"; do
        echo "power: $record has $(grep -c '' "$record") lines: $(record_count sent "$record") writes sent," \
            "$(record_count acked "$record") acked ($(record_count fua "$record") sent with FUA)," \
            "$(record_count flush_acked "$record") FLUSHes acked; last line: $(tail -n 1 "$record" | cut -c1-100)" |
            tee /dev/console
        [ "$(record_count flush_acked "$record")" -ge 1 ] || return 1
    done
}

# emulator image verify of the image left by the power cut: every block must
# pass its checksum. A write that was not durable may have reached the disk
# with its data and not its checksum, or the other way round; the image's
# write-intent record (synced before the first write into a region) names the
# regions where that can be, and a block there is kept as it was left, each
# byte old or new (the count is printed). A checksum error anywhere fails, with
# whether the block's last write in the record was durable.
power_image_verify() {
    emulator image verify "$IMAGE" >/tmp/image-verify.out 2>&1
    rc=$?
    tail -n 3 /tmp/image-verify.out
    kept=$(grep -c 'cut short by a power loss' /tmp/image-verify.out)
    echo "power: $kept blocks half-written by undurable writes, kept as they were left" | tee /dev/console
    sed -n 's/^bad block \([0-9]*\) .*/\1/p' /tmp/image-verify.out >/tmp/bad-blocks
    [ "$rc" -eq 0 ] && [ ! -s /tmp/bad-blocks ] && return 0
    [ -s /tmp/bad-blocks ] || { echo "image verify failed (exit status $rc) without naming a bad block"; return 1; }
    # The record's lines are written by serde in a fixed field order:
    # {"sent":S,"offset":O,"len":L,"fua":F} {"acked":S} {"flush_sent":I,"acked_before":N} {"flush_acked":I}
    awk -F'[:,}]' -v bs=4096 '
        FNR == NR { bad[$1] = 1; next }
        !/}$/ { next }
        $1 == "{\"sent\"" { fua[$2] = ($8 == "true"); for (b = $4 / bs; b < ($4 + $6) / bs; b++) if (b in bad) last[b] = $2; next }
        $1 == "{\"acked\"" { acks++; ack[$2] = acks; next }
        $1 == "{\"flush_sent\"" { before[$2] = $4; next }
        $1 == "{\"flush_acked\"" { if (before[$2] > covered) covered = before[$2]; next }
        END {
            for (b in bad) {
                s = last[b]
                if (s == "") print "block " b ": checksum error in a block the workload never wrote"
                else if ((s in ack) && (fua[s] || ack[s] <= covered)) print "block " b ": checksum error, and its last write " s " was durable"
                else print "block " b ": checksum error, its last write " s " was not durable"
            }
        }' /tmp/bad-blocks "$PRECORD"
    return 1
}

# The oracle over an export ($1: URI, default the image's; $2: record,
# default the image's): exit 0, and some durable write was checked.
power_workload_verify() {
    emulator workload verify --uri "${1:-$PURI}" --record "${2:-$PRECORD}" >/tmp/verify.out 2>&1
    rc=$?
    sed 's/^/  | /' /tmp/verify.out >/dev/console
    echo "workload verify exit status $rc"
    [ "$rc" -eq 0 ] || return 1
    durable=$(sed -n 's/^writes: .* acked, \([0-9]*\) durable$/\1/p' /tmp/verify.out)
    [ -n "$durable" ] && [ "$durable" -gt 0 ] || { echo "no durable write was checked"; return 1; }
}

# Every member of the array passes its checksums (read-only: nothing changes).
power_members_verify() {
    for member in "$PARRAY"/disk*.img; do
        emulator image verify "$member" >/tmp/member-verify.out 2>&1 ||
            { echo "$member:"; cat /tmp/member-verify.out; return 1; }
        echo "$member: $(tail -n 1 /tmp/member-verify.out)" \
            "($(grep -c 'cut short by a power loss' /tmp/member-verify.out) blocks kept as left)"
    done
}

# The array server, opening the array first after the cut, resynced the
# stripes its members' write-intent records name (the log says how many).
power_serve_array_again() {
    serve_array || return 1
    grep -E 'resync' /tmp/emulator-array.log | tail -n 3
    echo "power: the array server resynced after the power loss:" \
        "$(sed -n 's/.*resyncing the stripes.* stripes=\([0-9]*\).*/\1/p' /tmp/emulator-array.log | head -n 1) stripes," \
        "$(grep -c 'from the journal' /tmp/emulator-array.log) of them from the degraded-write journal" |
        tee /dev/console
}

# The domain comes up again on the run directory the power cut left (its
# processes' files name processes of another boot), and its drivers, opening
# the array first, resync what its members' records name.
power_domain_up_again() {
    power_domain_up || { tail -n 30 "$PDOMAIN"/logs/*.log 2>/dev/null; return 1; }
    grep -h 'resync' "$PDOMAIN"/logs/*driver*.log 2>/dev/null | tail -n 3
    emulator status --run-dir "$PDOMAIN" | head -n 20
}

# A disk of the domain's system fails (a task through server B): every durable
# write must still read back through the parity.
power_domain_degraded_verify() {
    disk=$(((SEED + 2) % 4))
    emulator task submit --run-dir "$PDOMAIN" --system s0 --cluster c1 fail-disk --disk "$disk" --wait ||
        return 1
    echo "power: disk $disk of the domain's system failed; reading through its parity" | tee /dev/console
    power_workload_verify "$PURI_DOMAIN" "$PRECORD_DOMAIN"
}

# A second member fails (one chosen by the seed): every durable write must
# still read back, now reconstructed from the parity the resync (and the
# journal, where the first failed member held data) made consistent.
power_array_degraded_verify() {
    disk=$(((PARRAY_FAILED + 1 + SEED % 4) % 5))
    emulator array fail "$PARRAY" --disk "$disk" || return 1
    echo "power: disk $disk of the array failed; reading through its parity" | tee /dev/console
    power_workload_verify "$PURI_ARRAY" "$PRECORD_ARRAY"
}

round_power_verify() {
    echo "guest: power-loss round, verifying after the power cut"
    step modules load_modules
    step power-mount-replay power_mount_replay
    step power-fsck power_fsck
    step power-record power_record
    IMAGE=$PDATA/power.img
    SOCKET=/run/power.sock
    step power-image-verify power_image_verify
    step power-members-verify power_members_verify
    step power-serve-again serve_unix
    step power-workload-verify power_workload_verify
    step power-sigterm-exit-0 stop_server
    step power-serve-array-again power_serve_array_again
    step power-array-verify power_workload_verify "$PURI_ARRAY" "$PRECORD_ARRAY"
    step power-array-degraded-verify power_array_degraded_verify
    step power-array-sigterm-exit-0 stop_array_server
    step power-domain-up-again power_domain_up_again
    step power-domain-verify power_workload_verify "$PURI_DOMAIN" "$PRECORD_DOMAIN"
    step power-domain-degraded-verify power_domain_degraded_verify
    step power-domain-down timeout 60 emulator down --run-dir "$PDOMAIN"
    step power-kernel-log kernel_log_clean
    umount "$PDATA" && umount "$PRECORD_DIR"
    echo "PASS power-all"
    finish
}

ROUND=main
SEED=
CUT=
for arg in $(cat /proc/cmdline); do
    case $arg in
    emu.round=*) ROUND=${arg#*=} ;;
    emu.seed=*) SEED=${arg#*=} ;;
    emu.cut=*) CUT=${arg#*=} ;;
    esac
done
case $ROUND in
main) ;;
power-write) round_power_write ;;
power-verify) round_power_verify ;;
*) echo "FAIL round (unknown emu.round=$ROUND)"; finish ;;
esac

step modules load_modules
step loopback loopback_up
step image-create emulator image create "$IMAGE" --size "${IMAGE_MIB}MiB"

# Round 1: TCP on the loopback.
step serve-tcp serve_tcp
step list-exports list_exports
step attach-tcp attach_tcp
step mkfs-ext4 mkfs_ext4
step write-files write_files
step umount-detach umount_detach
step fsck-image fsck_image
step reattach-tcp attach_tcp
step fsck-nbd fsck_nbd
step verify-data verify_data
step write-more write_more
step detach-tcp detach
step sigterm-exit-0 stop_server
step image-verify image_verify

# Round 2: a fresh server over the same image, Unix socket, two connections.
step serve-unix serve_unix
step attach-unix-multiconn attach_unix_multiconn
step verify-after-restart verify_after_restart
step detach-unix detach
step sigterm-exit-0-unix stop_server
step fsck-image-final fsck_image
step image-verify-final image_verify
step kernel-log-clean kernel_log_clean

# Round 3: a domain, a disk failure and a controller failover under a mount.
step domain-up domain_up
step attach-domain attach_domain
step mkfs-write-domain mkfs_write_domain
step fail-disk-auto-rebuild fail_disk_auto_rebuild
step kill-owner-ride-over kill_owner_ride_over
step failback failback
step fsck-verify-domain fsck_verify_domain
step scrub-clean scrub_clean
step detach-domain detach_domain
step domain-down domain_down
step kernel-log-no-errors kernel_log_no_errors

echo "PASS all"
finish
GUEST
}

# ---------------------------------------------------------------- main
mkdir -p "$CACHE"
install_missing_tools
prepare_kernel
prepare_qemu

if [ -z "$EMULATOR" ]; then
    log "building the emulator (cargo build --release --locked)"
    (cd "$REPO" && cargo build --release --locked --quiet) || die "cargo build --release failed"
    EMULATOR=$REPO/target/release/emulator
fi
[ -x "$EMULATOR" ] || die "emulator binary $EMULATOR is missing or not executable"
EMULATOR=$(readlink -f "$EMULATOR")

build_initramfs
log "kernel $KERNEL_PKG ($KVER); modules: ${MOD_ORDER[*]}${MOD_BUILTIN[*]:+; built in: ${MOD_BUILTIN[*]}}"
log "initramfs $(du -h "$CACHE/initrd.gz" | cut -f1); qemu: $QEMU; prepared in $((SECONDS - START))s"

QEMU_GUEST=(
    env "${QEMU_ENV[@]}" "$QEMU" "${QEMU_EXTRA[@]}"
    -accel tcg -m 1024 -nographic -no-reboot -nic none
    -kernel "$VMLINUZ" -initrd "$CACHE/initrd.gz"
)

# boot_guest LOG ROUND [QEMU ARGS…]: boots the guest for one round and waits
# (up to the timeout) until it powers off; its console goes to LOG.
boot_guest() {
    local log=$1 round=$2 raw=$1.raw rc
    shift 2
    log "booting the guest, round $round (TCG, timeout ${TIMEOUT}s); console: $log"
    set +e
    timeout -k 10 "$TIMEOUT" "${QEMU_GUEST[@]}" "$@" \
        -append "console=ttyS0 panic=-1 quiet emu.round=$round" </dev/null >"$raw" 2>&1
    rc=$?
    set -e
    tr -d '\r' <"$raw" >"$log"
    rm -f "$raw"
    [ "$rc" -eq 124 ] && log "QEMU was stopped by the ${TIMEOUT}s timeout"
    return 0
}

# check_boot LABEL LOG MARKER…: every marker's PASS line is in LOG and no FAIL
# line is; prints the markers, and the console's tail on failure.
check_boot() {
    local label=$1 log=$2 marker missing=() fails
    shift 2
    for marker in "$@"; do
        grep -qE "^PASS ${marker}( |\$)" "$log" || missing+=("$marker")
    done
    fails=$(grep -E '(^|[^[:alnum:]])FAIL ' "$log" || true)
    grep -E '^(PASS|FAIL|KNOWN) ' "$log" || true
    [ ${#missing[@]} -eq 0 ] && [ -z "$fails" ] && return 0
    log "FAIL ($label): missing markers: ${missing[*]:-none}"
    echo "---- $label: console log (tail) ----" >&2
    tail -n 80 "$log" >&2
    return 1
}

failed=()
if [[ " $ROUNDS " == *" main "* ]]; then
    BOOT=$SECONDS
    boot_guest "$CACHE/console.log" main
    check_boot "first boot" "$CACHE/console.log" "${EXPECTED[@]}" || failed+=(main)
    log "first boot: $((SECONDS - BOOT))s"
fi
if [[ " $ROUNDS " != *" power "* ]]; then
    [ ${#failed[@]} -eq 0 ] || { log "FAIL: ${failed[*]}"; exit 1; }
    log "PASS: rounds $ROUNDS (total $((SECONDS - START))s)"
    exit 0
fi

# ---- The power-loss round (see the top of this file for why it is honest).
PDIR=$CACHE/power
rm -rf "$PDIR"
mkdir -p "$PDIR"
case $PDIR in *,*) die "the cache directory's path must not contain a comma (QEMU's -drive syntax): $PDIR" ;; esac
# Both file systems are made here (natively, with the mke2fs the guest has):
# the guest's writes go through to the host's file one by one, slow under TCG.
truncate -s "${POWER_DATA_MIB}M" "$PDIR/data.raw"
truncate -s "${POWER_RECORD_MIB}M" "$PDIR/record.raw"
mke2fs -q -F -t ext4 "$PDIR/data.raw"
mke2fs -q -F -t ext4 "$PDIR/record.raw"
POWER_DISKS=(
    -drive "file=$PDIR/data.raw,format=raw,if=virtio,cache=writethrough"
    -drive "file=$PDIR/record.raw,format=raw,if=virtio,cache=writethrough"
)
log "power-loss round: POWER_SEED=$POWER_SEED (workload seed $POWER_SEED, the plug is pulled after" \
    "$POWER_CUT_ACKED acked writes); replay with POWER_SEED=$POWER_SEED"

# Boot "power-write" runs in the background; the host watches its console
# for `PASS power-armed` (or a FAIL, or QEMU's exit), up to POWER_ARM_TIMEOUT
# seconds, then kills QEMU with SIGKILL: the power cut.
PLOG=$CACHE/console-power-write.log
BOOT=$SECONDS
log "booting the guest, round power-write (TCG); console: $PLOG"
# (`exec`: the pid of the background job is QEMU's own.)
(exec "${QEMU_GUEST[@]}" "${POWER_DISKS[@]}" \
    -append "console=ttyS0 panic=-1 quiet emu.round=power-write emu.seed=$POWER_SEED emu.cut=$POWER_CUT_ACKED") \
    </dev/null >"$PLOG.raw" 2>&1 &
qpid=$!
armed=no
deadline=$((SECONDS + POWER_ARM_TIMEOUT))
while [ "$SECONDS" -lt "$deadline" ]; do
    if grep -qE $'^PASS power-armed( |\r|$)' "$PLOG.raw"; then
        armed=yes
        break
    fi
    grep -qE '(^|[^[:alnum:]])FAIL ' "$PLOG.raw" && break
    kill -0 "$qpid" 2>/dev/null || break
    sleep 0.05
done
if kill -KILL "$qpid" 2>/dev/null; then
    log "power cut: QEMU (pid $qpid) killed with SIGKILL $((SECONDS - BOOT))s after boot (armed: $armed)"
else
    log "QEMU exited by itself before the power cut (armed: $armed)"
fi
wait "$qpid" 2>/dev/null || true
# The pid was QEMU's own: nothing of it may be left holding the disks.
! kill -0 "$qpid" 2>/dev/null || die "QEMU (pid $qpid) still runs after SIGKILL"
tr -d '\r' <"$PLOG.raw" >"$PLOG"
rm -f "$PLOG.raw"
[ "$armed" = yes ] || log "no PASS power-armed within ${POWER_ARM_TIMEOUT}s"
check_boot "power-write boot" "$PLOG" "${EXPECTED_POWER_WRITE[@]}" || failed+=(power-write)

if [ "$armed" = yes ]; then
    VLOG=$CACHE/console-power-verify.log
    BOOT=$SECONDS
    boot_guest "$VLOG" power-verify "${POWER_DISKS[@]}"
    check_boot "power-verify boot" "$VLOG" "${EXPECTED_POWER_VERIFY[@]}" || failed+=(power-verify)
    log "power-verify boot: $((SECONDS - BOOT))s"
    # A copy of the record, for a look at what was cut (debugfs reads the file
    # system image without mounting it).
    debugfs -R "dump /power.jsonl $PDIR/record.jsonl" "$PDIR/record.raw" >/dev/null 2>&1 &&
        debugfs -R "dump /power-array.jsonl $PDIR/record-array.jsonl" "$PDIR/record.raw" >/dev/null 2>&1 &&
        debugfs -R "dump /power-domain.jsonl $PDIR/record-domain.jsonl" "$PDIR/record.raw" >/dev/null 2>&1 &&
        log "the power-loss round's records: $PDIR/record{,-array,-domain}.jsonl"
else
    failed+=(power-verify)
fi

if [ ${#failed[@]} -eq 0 ]; then
    log "PASS: real Linux $KVER attached and used the export, and every durable write survived" \
        "the power cut (POWER_SEED=$POWER_SEED; total $((SECONDS - START))s)"
    exit 0
fi
log "FAIL: ${failed[*]} (POWER_SEED=$POWER_SEED)"
exit 1
