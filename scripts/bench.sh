#!/usr/bin/env bash
# scripts/bench.sh — keyfs benchmarked against tmpfs and gocryptfs (SPEC §6),
# and keyfs on etcd against keyfs on sled (issue 7).
#
# Runs on the same machine, in the same run, side by side:
#   - open+read+close of a 32-byte key (1 thread; 2 threads on the same file;
#     `cat`-style read-to-EOF), and stat, on tmpfs, gocryptfs, keyfs (default
#     mode, sled store), keyfs --cache and keyfs-etcd (default mode, the same
#     tree in an etcd store: a single-member etcd this script starts on
#     loopback, data dir on the same disk as the sled stores);
#   - find | wc -l, ls -lR and tar over a tree of 10,000 clients;
#   - full rotations per second (write a temp file, rename it over the key;
#     with and without an fsync of the temp file);
#   - keyfs mount time and daemon RSS at 1,000 / 10,000 / 100,000 keys.
# It prints a table of medians with the ratios keyfs/tmpfs, keyfs/gocryptfs
# and keyfs-etcd/keyfs, checks the SPEC §6 bars and issue 7's etcd bar (key
# reads on etcd within 1.10× of sled) with PASS/MISS, and writes it all to
# docs/PERFORMANCE.md with the machine it ran on. With perf present it also
# profiles where a default-mode key read spends its time (FUSE requests per
# operation and their latency, from the kernel's fuse tracepoints; the
# daemon's hottest functions; its syscalls per read).
#
# Usage (Debian 12, as root; installs gocryptfs, gcc, fuse3, perf, strace,
# etcd-server, etcd-client):
#   scripts/bench.sh                 # full run (about 20 minutes)
#   BENCH_QUICK=1 scripts/bench.sh   # smoke run: 1,000 clients, few iterations
#
# Environment:
#   BENCH_QUICK=1         smoke run (writes to $BENCH_OUT, default
#                         /tmp/keyfs-bench-quick.md, not to docs/)
#   BENCH_OUT=FILE        where the report goes (full run: docs/PERFORMANCE.md)
#   BENCH_WORK=DIR        scratch directory on a real disk (default: a new
#                         directory under ~/.cache/keyfs-bench, out of the way of
#                         anything that tidies /tmp or /var/tmp; removed at the end)
#   BENCH_KEEP=1          keep the scratch directory
#   BENCH_MAX_LOAD=X      before starting, wait (up to BENCH_WAIT_S seconds,
#                         default 600) until the 1-minute load is at most X
#   BENCH_PROFILE=0       skip the profiling section
#   BENCH_ETCD=0          skip keyfs on etcd (no etcd started, no keyfs-etcd column)
#   BENCH_ETCD_MEMBERS=3  run a 3-member etcd on loopback instead of a single
#                         member (default 1: on 2 cores three members would
#                         compete with the daemons for the CPU)
#   BENCH_NO_INSTALL=1    do not apt-get anything
#   CARGO_TARGET_DIR      honoured for the keyfs build
#
# Every mount it makes is unmounted on exit (also on error or Ctrl-C).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK="${BENCH_QUICK:-0}"
[ "$QUICK" = 0 ] || QUICK=1
if [ "$QUICK" = 1 ]; then
    OUT="${BENCH_OUT:-/tmp/keyfs-bench-quick.md}"
    TREE_CLIENTS=1000 # the tree for find / ls -lR / tar
    SIZE_KEYS="1000 3000"
    ITERS=2000 # open+read+close per measurement
    EOF_ITERS=1000
    STAT_ITERS=5000
    REPS=3
    ROT_ITERS=50
    WALK_REPS=3
    MOUNT_REPS=3
    PROF_ITERS=1000
else
    OUT="${BENCH_OUT:-$ROOT/docs/PERFORMANCE.md}"
    TREE_CLIENTS=10000
    SIZE_KEYS="1000 10000 100000"
    ITERS=20000
    EOF_ITERS=5000
    STAT_ITERS=50000
    REPS=5
    ROT_ITERS=200
    WALK_REPS=5
    MOUNT_REPS=5
    PROF_ITERS=5000
fi
KEYS_PER_CLIENT=3 # storage, storage_sym, hmac (storage.pub is derived, not a key)
ETCD="${BENCH_ETCD:-1}"
[ "$ETCD" = 0 ] || ETCD=1
ETCD_MEMBERS="${BENCH_ETCD_MEMBERS:-1}"
case "$ETCD_MEMBERS" in
    1 | 3) ;;
    *)
        echo "BENCH_ETCD_MEMBERS must be 1 or 3, not $ETCD_MEMBERS" >&2
        exit 1
        ;;
esac

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
# On a failed measurement: what the trees look like at that moment.
diag() {
    local fs
    for fs in "${FSS[@]:-}"; do
        [ -n "$fs" ] || continue
        log "$fs: clients/c000001 holds: $(find "${MNT_OF[$fs]}/clients/c000001" -maxdepth 1 -printf '%f(%s) ' 2>&1)"
    done
    [ -d "${WORK:-}/gocryptfs-cipher" ] && log "gocryptfs cipherdir: $(find "$WORK/gocryptfs-cipher" | wc -l) entries"
    grep -s " ${WORK:-/nonexistent}/" /proc/mounts >&2 || true
}
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
load1() { cut -d' ' -f1 /proc/loadavg; }
LOADS=() # 1-minute load averages sampled between measurements
sample_load() {
    LAST_LOAD=$(load1)
    LOADS+=("$LAST_LOAD")
}

# ---------------------------------------------------------------- install

install_deps() {
    # Shared installs (fuse3, gcc, tar, procps, util-linux, /dev/fuse, cargo on PATH).
    # shellcheck source=scripts/setup.sh disable=SC1091
    source "$ROOT/scripts/setup.sh"
    keyfs_ensure_cargo_path || die "cargo not found"
    if [ "${BENCH_NO_INSTALL:-0}" = 1 ]; then
        return 0
    fi
    keyfs_install_apt_deps || die "installing the Debian packages failed"
    keyfs_ensure_dev_fuse || die "no FUSE on this machine"
    local need=()
    command -v gocryptfs >/dev/null 2>&1 || need+=(gocryptfs)
    command -v gcc >/dev/null 2>&1 || need+=(gcc)
    command -v find >/dev/null 2>&1 || need+=(findutils)
    command -v fusermount >/dev/null 2>&1 || command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
    if [ "${BENCH_PROFILE:-1}" != 0 ]; then
        command -v perf >/dev/null 2>&1 || need+=(linux-perf)
        command -v strace >/dev/null 2>&1 || need+=(strace)
    fi
    if [ "$ETCD" = 1 ]; then
        command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
        command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
        command -v ss >/dev/null 2>&1 || need+=(iproute2)
    fi
    if [ "${#need[@]}" -gt 0 ]; then
        log "apt-get install -y ${need[*]}"
        keyfs_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        keyfs_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -o Dpkg::Use-Pty=0 "${need[@]}" >/dev/null ||
            die "apt-get install ${need[*]} failed"
    fi
    command -v gocryptfs >/dev/null 2>&1 || die "gocryptfs is missing"
    command -v gcc >/dev/null 2>&1 || die "gcc is missing"
    if [ "$ETCD" = 1 ]; then
        command -v etcd >/dev/null 2>&1 || die "etcd is missing (apt-get install etcd-server, or BENCH_ETCD=0)"
        command -v etcdctl >/dev/null 2>&1 || die "etcdctl is missing (apt-get install etcd-client, or BENCH_ETCD=0)"
    fi
}

# ---------------------------------------------------------------- cleanup

MOUNTS=()     # every mountpoint this run mounted (unmounted on exit)
PIDS=()       # every daemon it started
ETCD_PIDS=()  # the etcd members it started (stopped on exit, after the mounts)
WORK=""

unmount_one() {
    local m="$1"
    grep -qs " $m " /proc/mounts || return 0
    case "$(awk -v m="$m" '$2 == m { print $3 }' /proc/mounts | tail -1)" in
        fuse.keyfs) "$K" umount "$m" 2>/dev/null || true ;;
        fuse*) fusermount3 -u "$m" 2>/dev/null || fusermount -u "$m" 2>/dev/null || true ;;
        *) umount "$m" 2>/dev/null || true ;;
    esac
    grep -qs " $m " /proc/mounts || return 0
    sleep 0.5
    grep -qs " $m " /proc/mounts || return 0
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM ERR
    local i m p
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        unmount_one "${MOUNTS[$i]}"
    done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.2
        done
        kill "$p" 2>/dev/null
    done
    etcd_stop
    wait 2>/dev/null
    if [ -n "$WORK" ]; then
        while read -r _ m _; do
            case "$m" in
                "$WORK"/*)
                    log "left-over mount $m: unmounting"
                    unmount_one "$m"
                    ;;
            esac
        done </proc/mounts
        if grep -qs " $WORK/" /proc/mounts; then
            log "ERROR: mounts under $WORK remain:"
            grep " $WORK/" /proc/mounts >&2
            rc=1
        elif [ "${BENCH_KEEP:-0}" = 1 ]; then
            log "kept $WORK"
        else
            if [ "$rc" != 0 ] && [ -d "$WORK/logs" ]; then
                local keep
                keep="$(mktemp -d /tmp/keyfs-bench-logs.XXXXXX)"
                cp -a "$WORK/logs/." "$keep/" 2>/dev/null
                log "the run failed; daemon logs kept in $keep"
            fi
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
set -E
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# etcd_stop — stop the members this run started (SIGTERM, then SIGKILL after 10 s).
etcd_stop() {
    local p i
    for p in "${ETCD_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${ETCD_PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$p" 2>/dev/null; then
            log "etcd (pid $p) did not stop on SIGTERM; killing it"
            kill -KILL "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || true
    done
    ETCD_PIDS=()
}

# ---------------------------------------------------------------- helpers

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "nan"; exit } if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A R    # R[metric,fs] = median
declare -A RAW  # RAW[metric,fs] = "v1 v2 ..." (one value per repetition)
declare -A NOTE # NOTE[metric,fs] = free text

add_raw() { RAW[$1,$2]="${RAW[$1,$2]:-}${RAW[$1,$2]:+ }$3"; }
finish_metric() {
    local metric="$1" fs
    for fs in "${FSS[@]}"; do
        if [ -n "${RAW[$metric,$fs]:-}" ]; then
            R[$metric,$fs]="$(tr ' ' '\n' <<<"${RAW[$metric,$fs]}" | median)"
        fi
    done
}

# kbench's RESULT line: field N (1 = median).
kb_result() { awk -v f="$1" '/^RESULT/ { print $(f + 1) }'; }

# The first N non-empty, non-comment lines (reads all its input: no SIGPIPE under pipefail).
top_lines() { awk -v n="$1" 'NF && !/^#/ { if (c++ < n) print }'; }

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo nan; }

# keyfs_mount STORE MNT [mount options] — sets KPID, MOUNT_ROOT_US (spawn to
# MNT/clients answering stat) and MOUNT_US (spawn to MNT/.keyfs/status answering).
keyfs_mount() {
    local store="$1" mnt="$2"
    shift 2
    mkdir -p "$mnt"
    local t0 t1 t2
    t0=$(now_us)
    "$K" --master-key-file "$MK" mount "$store" "$mnt" "$@" >>"$WORK/logs/keyfs.log" 2>&1 &
    KPID=$!
    PIDS+=("$KPID")
    MOUNTS+=("$mnt")
    t1=$("$KB" waitmount "$mnt/clients" "$(dirname "$mnt")" 60000) ||
        die "keyfs did not mount $store at $mnt (see $WORK/logs/keyfs.log)"
    t2=$("$KB" waitmount "$mnt/.keyfs/status" "$(dirname "$mnt")" 60000) ||
        die "keyfs at $mnt does not answer for .keyfs/status (see $WORK/logs/keyfs.log)"
    MOUNT_ROOT_US=$((t1 - t0))
    MOUNT_US=$((t2 - t0))
}

# gocryptfs_mount CIPHERDIR MNT — default options, foreground daemon; sets GPID, MOUNT_US.
gocryptfs_mount() {
    local cipher="$1" mnt="$2" t0 t1
    mkdir -p "$mnt"
    t0=$(now_us)
    gocryptfs -fg -q -nosyslog -extpass 'echo bench-password' "$cipher" "$mnt" >>"$WORK/logs/gocryptfs.log" 2>&1 &
    GPID=$!
    PIDS+=("$GPID")
    MOUNTS+=("$mnt")
    t1=$("$KB" waitmount "$mnt" "$(dirname "$mnt")" 60000) ||
        die "gocryptfs did not mount (see $WORK/logs/gocryptfs.log)"
    MOUNT_US=$((t1 - t0))
}

# free_ports N — N loopback TCP ports that no socket of this machine uses now,
# consecutive from a random base below the kernel's ephemeral range (so no
# outgoing connection can be holding one). Another process may still take one
# before etcd binds it: etcd_start then retries with other ports.
free_ports() {
    local n="$1" lo=20000 hi p ports_out=()
    hi=$(($(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768) - 1))
    [ "$hi" -gt $((lo + 2000)) ] || hi=32767
    local used
    used=" $(ss -Htan 2>/dev/null | awk '{ n = split($4, a, ":"); printf "%s ", a[n] }') "
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo)))
    while [ "${#ports_out[@]}" -lt "$n" ]; do
        [ "$p" -le "$hi" ] || p=$lo
        case "$used" in *" $p "*) ;; *) ports_out+=("$p") ;; esac
        p=$((p + 1))
    done
    echo "${ports_out[@]}"
}

# etcd_start DATADIR — start ETCD_MEMBERS etcd members on 127.0.0.1 (free
# ports; data dirs DATADIR/mN.etcd, logs in $WORK/logs/etcd-mN.log), with the
# flags docs/DISTRIBUTED.md asks for, and wait until every member reports
# healthy. Sets ETCD_EPS (host:port,… — the host part of a store URL) and
# ETCD_PIDS. Call it from the main shell, not from $( … ): the members get
# PR_SET_PDEATHSIG=KILL (setpriv), so they die with this script even if it
# is killed without running its cleanup.
etcd_start() {
    local dd="$1" attempt i ports cluster token eps p ok
    for attempt in 1 2 3; do
        read -r -a ports <<<"$(free_ports $((2 * ETCD_MEMBERS)))"
        token="keyfs-bench-$$-$attempt"
        cluster=""
        eps=""
        for ((i = 0; i < ETCD_MEMBERS; i++)); do
            cluster+="${cluster:+,}m$i=http://127.0.0.1:${ports[$((ETCD_MEMBERS + i))]}"
            eps+="${eps:+,}127.0.0.1:${ports[$i]}"
        done
        for ((i = 0; i < ETCD_MEMBERS; i++)); do
            local client="http://127.0.0.1:${ports[$i]}" peer="http://127.0.0.1:${ports[$((ETCD_MEMBERS + i))]}"
            mkdir -p "$dd"
            rm -rf "$dd/m$i.etcd"
            (
                # Only our flags: no ETCD_* settings from the environment.
                for v in $(compgen -e); do case "$v" in ETCD*) unset "$v" ;; esac; done
                exec setpriv --pdeathsig KILL etcd --name "m$i" --data-dir "$dd/m$i.etcd" \
                    --listen-client-urls "$client" --advertise-client-urls "$client" \
                    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
                    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "$token" \
                    --max-txn-ops 10000 --max-request-bytes 10485760
            ) >"$WORK/logs/etcd-m$i.log" 2>&1 &
            ETCD_PIDS+=("$!")
        done
        ETCD_EPS="$eps"
        ok=0
        for ((i = 0; i < 300; i++)); do
            if etcdctl --endpoints "$ETCD_EPS" --dial-timeout=1s --command-timeout=2s endpoint health \
                >/dev/null 2>&1; then
                ok=1
                break
            fi
            for p in "${ETCD_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || break 2; done
            sleep 0.1
        done
        [ "$ok" = 1 ] && return 0
        etcd_stop
        if [ "$attempt" -lt 3 ] && grep -qs 'address already in use' "$WORK"/logs/etcd-m*.log; then
            log "etcd: a port was taken meanwhile; retrying with other ports"
            continue
        fi
        tail -n 20 "$WORK"/logs/etcd-m*.log >&2
        die "etcd did not become healthy on $ETCD_EPS (logs in $WORK/logs/etcd-m*.log)"
    done
}

# stop_daemon MNT PID — unmount and wait for the daemon to exit.
stop_daemon() {
    unmount_one "$1"
    local i
    for i in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    wait "$2" 2>/dev/null || true
}

# ---------------------------------------------------------------- setup

START_US=$(now_us)
START_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

if [ -n "${BENCH_MAX_LOAD:-}" ]; then
    waited=0
    while awk -v l="$(load1)" -v m="$BENCH_MAX_LOAD" 'BEGIN { exit !(l > m) }'; do
        if [ "$waited" -ge "${BENCH_WAIT_S:-600}" ]; then
            log "load $(load1) still above $BENCH_MAX_LOAD after ${waited}s; running anyway"
            break
        fi
        log "load $(load1) > $BENCH_MAX_LOAD; waiting"
        sleep 15
        waited=$((waited + 15))
    done
fi
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"

[ "$(id -u)" = 0 ] || die "run as root (mounts tmpfs, installs packages, reads fuse tracepoints)"
install_deps

log "building keyfs (cargo build --release)"
(cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
K="$TARGET_DIR/release/keyfs"
[ -x "$K" ] || die "no keyfs binary at $K"

if [ -n "${BENCH_WORK:-}" ]; then
    WORK="$BENCH_WORK"
    mkdir -p "$WORK"
    [ -z "$(ls -A "$WORK")" ] || die "BENCH_WORK=$WORK is not empty"
else
    mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/keyfs-bench"
    WORK="$(mktemp -d "${XDG_CACHE_HOME:-$HOME/.cache}/keyfs-bench/run.XXXXXX")"
fi
WORK="$(cd "$WORK" && pwd)"
mkdir -p "$WORK/logs" "$WORK/mnt"
KB="$WORK/kbench"
gcc -O2 -Wall -pthread -o "$KB" "$ROOT/scripts/bench/kbench.c" || die "building the timing helper failed"

# A private tmpfs: the tmpfs reference, and the scratch space for building stores.
SHM="$WORK/shm"
mkdir -p "$SHM"
mount -t tmpfs -o size=4g,mode=0755 bench-tmpfs "$SHM"
MOUNTS+=("$SHM")

# The machine.
CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
NPROC="$(nproc)"
KERNEL="$(uname -r)"
RAM_GIB="$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)"
# shellcheck disable=SC1091
OS="$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}")"
DISK_FS="$(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')"
GOCRYPTFS_VERSION="$(gocryptfs -version 2>/dev/null | awk -F';' 'NR == 1 { print $1 }')"
KEYFS_REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    KEYFS_REV="$KEYFS_REV + uncommitted changes in src/"
fi
log "machine: $NPROC x $CPU_MODEL, $RAM_GIB GiB, kernel $KERNEL; load $LOAD_START; scratch $WORK ($DISK_FS)"

# fsync cost on the scratch disk (context for the rotation numbers).
FSYNC_US="$(
    cd "$WORK"
    t0=$(now_us)
    dd if=/dev/zero of=fsync.probe bs=4k count=100 oflag=dsync status=none
    t1=$(now_us)
    rm -f fsync.probe
    echo $(((t1 - t0) / 100))
)"
log "one 4 KiB O_DSYNC write on the scratch disk: ${FSYNC_US} us"

# ---------------------------------------------------------------- stores

# Client counts: one store snapshot per size in SIZE_KEYS, plus the tree.
declare -A SNAP_FOR # client count -> store directory
STAGES=()
for k in $SIZE_KEYS; do
    STAGES+=($(((k + KEYS_PER_CLIENT - 1) / KEYS_PER_CLIENT)))
done
STAGES+=("$TREE_CLIENTS")
mapfile -t STAGES < <(printf '%s\n' "${STAGES[@]}" | sort -n -u)

MK="$WORK/master.key"
"$K" init "$SHM/build" --generate-master-key "$MK" >>"$WORK/logs/keyfs.log" 2>&1 || die "keyfs init failed"

# Build the stores through a mount: `mkdir clients/cNNNNNN` generates the
# default key set (storage, storage_sym, hmac) in one durable change — the same
# code path as an operator's mkdir. The store is built on tmpfs (where sled's
# fsync is free: population is bound by key generation, not by the disk) and
# each snapshot is copied to the disk, where every measurement runs.
log "building stores: ${STAGES[*]} clients (mkdir through a keyfs mount, store on tmpfs)"
BUILD_T0=$(now_us)
prev=0
for n in "${STAGES[@]}"; do
    keyfs_mount "$SHM/build" "$WORK/mnt/build"
    "$KB" mkdirs "$WORK/mnt/build/clients" c $((prev + 1)) $((n - prev)) || die "mkdir through the mount failed"
    stop_daemon "$WORK/mnt/build" "$KPID"
    cp -a "$SHM/build" "$WORK/store-$n"
    SNAP_FOR[$n]="$WORK/store-$n"
    prev=$n
done
BUILD_S=$(awk -v a="$BUILD_T0" -v b="$(now_us)" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
rm -rf "$SHM/build"
BUILD_RATE=$(awk -v n="$prev" -v s="$BUILD_S" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 1) }')
log "built $prev clients in ${BUILD_S}s (~$BUILD_RATE clients/s, 3 keys each)"

# keyfs on etcd: the tree's $TREE_CLIENTS clients, built the same way (mkdir
# through a keyfs mount: one etcd transaction per client) in an etcd this
# script starts on loopback. Its data dir is on the scratch disk, next to the
# sled stores the measurements use, so both backends pay the same disk for
# their durable commits. (It is built in place: etcd cannot be copied like a
# sled directory without restarting it, and its build costs one etcd commit
# per client.) Same names, same sizes, same one version per key as the sled
# tree; the key bytes are its own (mkdir generates them).
ETCD_URL=""
if [ "$ETCD" = 1 ]; then
    ETCD_VERSION="$(etcd --version 2>/dev/null | awk -F': ' '/^etcd Version/ { print $2 }')"
    ETCD_DIR="$WORK/etcd"
    log "starting a $ETCD_MEMBERS-member etcd ${ETCD_VERSION:-?} on loopback (data dir $ETCD_DIR, $DISK_FS: the disk of the sled stores)"
    etcd_start "$ETCD_DIR"
    ETCD_URL="etcd://$ETCD_EPS/keyfs-bench"
    log "etcd answers on $ETCD_EPS (pids ${ETCD_PIDS[*]}); store $ETCD_URL"
    "$K" --master-key-file "$MK" init "$ETCD_URL" >>"$WORK/logs/keyfs.log" 2>&1 || die "keyfs init $ETCD_URL failed"
    log "building the etcd store: $TREE_CLIENTS clients (mkdir through a keyfs mount on etcd)"
    T0=$(now_us)
    keyfs_mount "$ETCD_URL" "$WORK/mnt/build-etcd"
    "$KB" mkdirs "$WORK/mnt/build-etcd/clients" c 1 "$TREE_CLIENTS" || die "mkdir through the etcd mount failed"
    stop_daemon "$WORK/mnt/build-etcd" "$KPID"
    ETCD_BUILD_S=$(awk -v a="$T0" -v b="$(now_us)" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
    ETCD_BUILD_RATE=$(awk -v n="$TREE_CLIENTS" -v s="$ETCD_BUILD_S" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 1) }')
    ETCD_DB_MIB=$(du -sm "$ETCD_DIR" | awk '{ print $1 }')
    log "built $TREE_CLIENTS clients on etcd in ${ETCD_BUILD_S}s (~$ETCD_BUILD_RATE clients/s); etcd data dir ${ETCD_DB_MIB} MiB"
fi

# The tree every filesystem gets: the same names and the same bytes.
# The tree mounts get their own copies (rotations change them; a store has one daemon).
TREE_STORE="$WORK/store-tree"
cp -a "$WORK/store-$TREE_CLIENTS" "$TREE_STORE"
cp -a "$WORK/store-$TREE_CLIENTS" "$WORK/store-cache"
M_TMPFS="$SHM/tree"
M_GOC="$WORK/mnt/gocryptfs"
M_KEYFS="$WORK/mnt/keyfs"
M_CACHE="$WORK/mnt/keyfs-cache"
M_ETCD="$WORK/mnt/keyfs-etcd"
mkdir -p "$M_TMPFS"

keyfs_mount "$TREE_STORE" "$M_KEYFS"
KPID_DEFAULT=$KPID
KEYFS_TREE_MOUNT_US=$MOUNT_US
keyfs_mount "$WORK/store-cache" "$M_CACHE" --cache
KPID_CACHE=$KPID
if [ "$ETCD" = 1 ]; then
    keyfs_mount "$ETCD_URL" "$M_ETCD"
    KPID_ETCD=$KPID
    ETCD_TREE_MOUNT_US=$MOUNT_US
    ETCD_RSS_MOUNT=$(rss_kb "$KPID_ETCD")
    grep -q '"synced": *true' "$M_ETCD/.keyfs/status" ||
        log "warning: keyfs-etcd's .keyfs/status does not say synced: $(tr -d '\n' <"$M_ETCD/.keyfs/status")"
fi

log "copying the tree out of keyfs into tmpfs (tar)"
tar -C "$M_KEYFS" -cf - clients poison audit | tar -C "$M_TMPFS" -xpf -

mkdir -p "$WORK/gocryptfs-cipher"
gocryptfs -init -q -nosyslog -extpass 'echo bench-password' "$WORK/gocryptfs-cipher" >>"$WORK/logs/gocryptfs.log" 2>&1 ||
    die "gocryptfs -init failed"
gocryptfs_mount "$WORK/gocryptfs-cipher" "$M_GOC"
GOC_MOUNT_US=$MOUNT_US
GOC_RSS_MOUNT=$(rss_kb "$GPID")
log "copying the tree into gocryptfs (tar)"
T0=$(now_us)
tar -C "$M_TMPFS" -cf - . | tar -C "$M_GOC" -xpf -
sync
log "gocryptfs populated in $((($(now_us) - T0) / 1000000))s"

FSS=(tmpfs gocryptfs keyfs cache)
[ "$ETCD" = 1 ] && FSS+=(etcd)
declare -A MNT_OF=([tmpfs]="$M_TMPFS" [gocryptfs]="$M_GOC" [keyfs]="$M_KEYFS" [cache]="$M_CACHE" [etcd]="$M_ETCD")
declare -A LABEL=([tmpfs]="tmpfs" [gocryptfs]="gocryptfs" [keyfs]="keyfs" [cache]="keyfs --cache" [etcd]="keyfs-etcd")
KEYFILE=clients/c000001/storage_sym
for fs in "${FSS[@]}"; do
    s=$(stat -c %s "${MNT_OF[$fs]}/$KEYFILE") || { diag; die "$fs: $KEYFILE is missing"; }
    [ "$s" = 32 ] || die "$fs: $KEYFILE is $s bytes, not 32"
done
cmp -s "$M_TMPFS/$KEYFILE" "$M_GOC/$KEYFILE" || die "gocryptfs copy differs"
cmp -s "$M_TMPFS/$KEYFILE" "$M_KEYFS/$KEYFILE" || die "tmpfs copy differs"

# ---------------------------------------------------------------- measurements
# Every repetition runs once on each filesystem in turn, so a change in the
# machine's load touches all of them alike; the median of the repetitions is kept.

log "key reads: open+read+close, $ITERS per measurement, $REPS repetitions"
for ((r = 0; r < REPS; r++)); do
    for fs in "${FSS[@]}"; do
        f="${MNT_OF[$fs]}/$KEYFILE"
        out=$("$KB" read "$f" "$ITERS" 1 1) || { diag; die "$fs: read failed"; }
        add_raw read1 "$fs" "$(kb_result 1 <<<"$out")"
        out=$("$KB" read "$f" "$ITERS" 2 1) || { diag; die "$fs: read (2 threads) failed"; }
        add_raw read2 "$fs" "$(kb_result 1 <<<"$out")"
        add_raw read2_ops "$fs" "$(kb_result 4 <<<"$out")"
        out=$("$KB" read "$f" "$EOF_ITERS" 1 1 eof) || { diag; die "$fs: read to EOF failed"; }
        add_raw readeof "$fs" "$(kb_result 1 <<<"$out")"
        out=$("$KB" stat "$f" "$STAT_ITERS" 1) || { diag; die "$fs: stat failed"; }
        add_raw stat "$fs" "$(kb_result 1 <<<"$out")"
    done
    sample_load
    log "  rep $((r + 1))/$REPS: keyfs $(kb_result 1 <<<"$out") us/stat (load $LAST_LOAD)"
done
for m in read1 read2 read2_ops readeof stat; do finish_metric "$m"; done

log "tree walks over $TREE_CLIENTS clients: find | wc -l, ls -lR, tar; $WALK_REPS repetitions"
for ((r = 0; r < WALK_REPS; r++)); do
    for fs in "${FSS[@]}"; do
        m="${MNT_OF[$fs]}"
        t0=$(now_us)
        n=$(find "$m" | wc -l)
        t1=$(now_us)
        add_raw find "$fs" "$(awk -v d=$((t1 - t0)) 'BEGIN { print d / 1e6 }')"
        NOTE[find,$fs]="$n entries"
        t0=$(now_us)
        ls -lR "$m" >/dev/null
        t1=$(now_us)
        add_raw lsR "$fs" "$(awk -v d=$((t1 - t0)) 'BEGIN { print d / 1e6 }')"
        t0=$(now_us)
        tar -C "$m" -cf "$SHM/walk.tar" clients poison audit
        t1=$(now_us)
        add_raw tar "$fs" "$(awk -v d=$((t1 - t0)) 'BEGIN { print d / 1e6 }')"
        NOTE[tar,$fs]="$(($(stat -c %s "$SHM/walk.tar") / 1048576)) MiB"
        rm -f "$SHM/walk.tar"
    done
    sample_load
    log "  rep $((r + 1))/$WALK_REPS done (load $LAST_LOAD)"
done
for m in find lsR tar; do finish_metric "$m"; done

RSS_KEYFS_WALKED=$(rss_kb "$KPID_DEFAULT")
RSS_CACHE_WALKED=$(rss_kb "$KPID_CACHE")
RSS_ETCD_WALKED=$([ "$ETCD" = 1 ] && rss_kb "$KPID_ETCD" || echo 0)
RSS_GOC_WALKED=$(rss_kb "$GPID")

log "rotations: $ROT_ITERS per measurement (write temp, [fsync,] close, rename over), $REPS repetitions"
# Each repetition rotates another client's storage_sym (the key's history grows by one per rotation).
for ((r = 0; r < REPS; r++)); do
    for fs in "${FSS[@]}"; do
        f="${MNT_OF[$fs]}/clients/$(printf 'c%06d' $((2 + r)))/storage_sym"
        out=$("$KB" rotate "$ROT_ITERS" 0 "$f") || die "$fs: rotation failed"
        add_raw rot "$fs" "$(kb_result 1 <<<"$out")"
        f="${MNT_OF[$fs]}/clients/$(printf 'c%06d' $((2 + REPS + r)))/storage_sym"
        out=$("$KB" rotate "$ROT_ITERS" 1 "$f") || die "$fs: rotation (fsync) failed"
        add_raw rotfs "$fs" "$(kb_result 1 <<<"$out")"
    done
    sample_load
    log "  rep $((r + 1))/$REPS done (load $LAST_LOAD)"
done
finish_metric rot
finish_metric rotfs
# Rotated keys must read back as 32 bytes everywhere.
for fs in "${FSS[@]}"; do
    s=$(stat -c %s "${MNT_OF[$fs]}/clients/c000002/storage_sym")
    [ "$s" = 32 ] || die "$fs: a rotated key is $s bytes"
done

# ---------------------------------------------------------------- profile

PROFILE_MD=""
profile_fuse() {
    # profile_fuse LABEL MNT NOPS CMD... — FUSE requests the kernel sent to
    # MNT's daemon while CMD ran, per operation, with their round-trip latency
    # (fuse_request_send -> fuse_request_end, as the kernel sees it).
    local label="$1" mnt="$2" nops="$3"
    shift 3
    local conn data="$WORK/perf-fuse.data"
    conn=$(stat -c %d "$mnt")
    perf record -q -e fuse:fuse_request_send -e fuse:fuse_request_end -a -o "$data" -- "$@" >/dev/null 2>>"$WORK/logs/perf.log" ||
        return 1
    perf script -i "$data" -F time,event,trace 2>/dev/null | awk -v c="$conn" -v n="$nops" -v label="$label" '
        {
            for (i = 1; i <= NF; i++) {
                if ($i == "connection") cn = $(i + 1)
                if ($i == "req") rq = $(i + 1)
            }
            if (cn != c) next
            t = $1; sub(":", "", t)
            if ($0 ~ /fuse_request_send/) {
                op = $0; sub(/.*\(FUSE_/, "", op); sub(/\).*/, "", op)
                start[rq] = t; opof[rq] = op; cnt[op]++
                if (!(op in seen)) { seen[op] = 1; order[++no] = op }
            } else if (rq in start) {
                lat[opof[rq]] += (t - start[rq]) * 1e6; done[opof[rq]]++; delete start[rq]
            }
        }
        END {
            printf "| %s | requests per op | mean round trip (µs) |\n|---|---:|---:|\n", label
            tot = 0; tl = 0
            for (i = 1; i <= no; i++) {
                op = order[i]
                printf "| %s | %.2f | %.1f |\n", op, cnt[op] / n, done[op] ? lat[op] / done[op] : 0
                tot += cnt[op]; tl += lat[op]
            }
            printf "| **all** | **%.2f** | µs in the daemon+kernel per op: %.1f |\n", tot / n, tl / n
        }'
    rm -f "$data"
}

if [ "${BENCH_PROFILE:-1}" != 0 ] && command -v perf >/dev/null 2>&1 &&
    perf list 2>/dev/null | grep 'fuse:fuse_request_send' >/dev/null; then
    log "profiling keyfs (fuse tracepoints, perf, strace)"
    nops=$((PROF_ITERS + PROF_ITERS / 20 + 10)) # kbench warms up with ITERS/20+10 ops
    PROFILE_MD+=$'\n### FUSE requests per operation (kernel fuse tracepoints)\n\n'
    PROFILE_MD+="Counted with \`perf record -e fuse:fuse_request_send -e fuse:fuse_request_end -a\`, filtered to the mount's connection; the round trip is from the kernel queueing the request to the daemon's reply being processed (it includes waiting for a free daemon thread)."$'\n\n'
    prof_fss=(keyfs cache gocryptfs)
    [ "$ETCD" = 1 ] && prof_fss+=(etcd)
    for fs in "${prof_fss[@]}"; do
        t=$(profile_fuse "${LABEL[$fs]}: open+read+close (1 thread)" "${MNT_OF[$fs]}" "$nops" \
            "$KB" read "${MNT_OF[$fs]}/$KEYFILE" "$PROF_ITERS" 1 1) && PROFILE_MD+="$t"$'\n\n'
    done
    t=$(profile_fuse "keyfs: open+read+close, 2 threads" "$M_KEYFS" $((2 * PROF_ITERS + PROF_ITERS / 20 + 10)) \
        "$KB" read "$M_KEYFS/$KEYFILE" "$PROF_ITERS" 2 1) && PROFILE_MD+="$t"$'\n\n'
    t=$(profile_fuse "keyfs: rotation (write temp, close, rename)" "$M_KEYFS" 50 \
        "$KB" rotate 50 0 "$M_KEYFS/clients/c000100/storage_sym") && PROFILE_MD+="$t"$'\n\n'
    if [ "$ETCD" = 1 ]; then
        t=$(profile_fuse "keyfs-etcd: open+read+close, 2 threads" "$M_ETCD" $((2 * PROF_ITERS + PROF_ITERS / 20 + 10)) \
            "$KB" read "$M_ETCD/$KEYFILE" "$PROF_ITERS" 2 1) && PROFILE_MD+="$t"$'\n\n'
        t=$(profile_fuse "keyfs-etcd: rotation (write temp, close, rename)" "$M_ETCD" 50 \
            "$KB" rotate 50 0 "$M_ETCD/clients/c000100/storage_sym") && PROFILE_MD+="$t"$'\n\n'
    fi
    nentries=$(find "$M_KEYFS/clients" | wc -l)
    t=$(profile_fuse "keyfs: find clients/ (per entry)" "$M_KEYFS" "$nentries" \
        find "$M_KEYFS/clients") && PROFILE_MD+="$t"$'\n\n'
    t=$(profile_fuse "gocryptfs: find clients/ (per entry)" "$M_GOC" "$nentries" \
        find "$M_GOC/clients") && PROFILE_MD+="$t"$'\n\n'

    # Client-side split of one key read.
    PROFILE_MD+=$'### Where one key read waits (client side, mean µs per call)\n\n| filesystem | open | read | close |\n|---|---:|---:|---:|\n'
    for fs in "${FSS[@]}"; do
        p=$("$KB" phases "${MNT_OF[$fs]}/$KEYFILE" "$PROF_ITERS" | awk '/^PHASES/ { printf "%s | %s | %s", $2, $3, $4 }')
        PROFILE_MD+="| ${LABEL[$fs]} | $p |"$'\n'
    done
    PROFILE_MD+=$'\n'

    # Where the daemon's CPU goes during default-mode key reads (software clock sampling).
    cpu_ticks() { # cpu_ticks PID... — utime+stime of the processes, in clock ticks
        local p t=0 v
        for p in "$@"; do
            v=$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)
            t=$((t + v))
        done
        echo "$t"
    }
    profile_cpu() { # profile_cpu LABEL PID MNT — perf of daemon PID while keys are read through MNT for 2 s
        local label="$1" pid="$2" mnt="$3" data="$WORK/perf-cpu.data" pp t0 nreads=0 e0 e1 hz
        perf record -q -e cpu-clock -F 4000 -p "$pid" -o "$data" -- sleep 4 >/dev/null 2>>"$WORK/logs/perf.log" &
        pp=$!
        sleep 1
        e0=$(cpu_ticks "${ETCD_PIDS[@]}")
        t0=$(now_us)
        while [ $(($(now_us) - t0)) -lt 2000000 ]; do
            "$KB" read "$mnt/$KEYFILE" 2000 1 1 >/dev/null
            nreads=$((nreads + 2110))
        done
        e1=$(cpu_ticks "${ETCD_PIDS[@]}")
        wait "$pp" || true
        [ -s "$data" ] || return 0
        echo "### Daemon CPU during $label key reads (perf record -e cpu-clock -p DAEMON, ~$nreads reads in the window)"
        echo
        if [ "${#ETCD_PIDS[@]}" -gt 0 ]; then
            hz=$(getconf CLK_TCK)
            echo "CPU used meanwhile by the etcd server (utime+stime over the ~2 s of reads): $(((e1 - e0) * 1000 / hz)) ms."
            echo
        fi
        echo 'Top symbols (self time):'
        echo
        echo '```'
        perf report -i "$data" --no-children --sort dso,sym --stdio 2>/dev/null | top_lines 40
        echo '```'
        echo
        echo 'By thread:'
        echo
        echo '```'
        perf report -i "$data" --no-children --sort comm --stdio 2>/dev/null | top_lines 10
        echo '```'
        echo
        echo 'By module:'
        echo
        echo '```'
        perf report -i "$data" --no-children --sort dso --stdio 2>/dev/null | top_lines 10
        echo '```'
        echo
        rm -f "$data"
    }
    PROFILE_MD+="$(profile_cpu "default-mode (keyfs, sled)" "$KPID_DEFAULT" "$M_KEYFS")"$'\n\n'
    if [ "$ETCD" = 1 ]; then
        PROFILE_MD+="$(profile_cpu "keyfs-etcd (default mode, etcd store)" "$KPID_ETCD" "$M_ETCD")"$'\n\n'
    fi

    # Syscalls of the daemon per key read and per rotation.
    strace_counts() { # strace_counts PID LABEL NOPS CMD...
        local pid="$1" label="$2" n="$3" sf="$WORK/strace.txt" sp
        shift 3
        strace -f -c -o "$sf" -p "$pid" 2>/dev/null &
        sp=$!
        sleep 1
        "$@" >/dev/null
        sleep 0.5
        kill -INT "$sp" 2>/dev/null || true
        wait "$sp" 2>/dev/null || true
        [ -s "$sf" ] || return 0
        echo "| $label: syscall | calls | per op |"
        echo "|---|---:|---:|"
        awk -v n="$n" '$1 ~ /^[0-9.]+$/ && $NF != "total" && NF >= 5 {
                if ($4 + 0 >= n / 20) printf "| %s | %d | %.2f |\n", $NF, $4, $4 / n
            }' "$sf"
        echo
        rm -f "$sf"
    }
    if command -v strace >/dev/null 2>&1; then
        PROFILE_MD+="### Daemon syscalls (strace -f -c on the daemon; strace slows it, so counts only)"$'\n\n'
        PROFILE_MD+="$(strace_counts "$KPID_DEFAULT" "keyfs: key read" "$nops" "$KB" read "$M_KEYFS/$KEYFILE" "$PROF_ITERS" 1 1)"$'\n\n'
        PROFILE_MD+="$(strace_counts "$KPID_DEFAULT" "keyfs: rotation" 50 "$KB" rotate 50 0 "$M_KEYFS/clients/c000101/storage_sym")"$'\n\n'
        if [ "$ETCD" = 1 ]; then
            PROFILE_MD+="$(strace_counts "$KPID_ETCD" "keyfs-etcd: key read" "$nops" "$KB" read "$M_ETCD/$KEYFILE" "$PROF_ITERS" 1 1)"$'\n\n'
            PROFILE_MD+="$(strace_counts "$KPID_ETCD" "keyfs-etcd: rotation" 50 "$KB" rotate 50 0 "$M_ETCD/clients/c000101/storage_sym")"$'\n\n'
        fi
    fi
else
    log "profiling skipped (BENCH_PROFILE=0, or perf without fuse tracepoints)"
fi

# Done with the tree mounts.
GOC_RSS_WALKED=$RSS_GOC_WALKED
stop_daemon "$M_CACHE" "$KPID_CACHE"
stop_daemon "$M_KEYFS" "$KPID_DEFAULT"
stop_daemon "$M_GOC" "$GPID"
if [ "$ETCD" = 1 ]; then
    # The keyfs-etcd daemon first (it flushes its audit to etcd as it unmounts), then etcd.
    stop_daemon "$M_ETCD" "$KPID_ETCD"
    ETCD_DB_END_MIB=$(du -sm "$ETCD_DIR" | awk '{ print $1 }')
    ETCD_RSS_KB=$(for p in "${ETCD_PIDS[@]}"; do rss_kb "$p"; done | awk '{ s += $1 } END { print s + 0 }')
    etcd_stop
    log "etcd stopped (data dir ${ETCD_DB_END_MIB} MiB at the end; its RSS was $((ETCD_RSS_KB / 1024)) MiB)"
fi

# ---------------------------------------------------------------- mount time and memory

log "keyfs mount time and RSS at ${SIZE_KEYS// / / } keys ($MOUNT_REPS mounts each)"
declare -A MT MTR RSS_M RSS_F FINDN
SIZE_ROWS=()
measure_size() {
    # measure_size LABEL STORE [mount options]
    local label="$1" store="$2"
    shift 2
    local mnt="$WORK/mnt/size" r times=() rtimes=() rm=() rf=""
    for ((r = 0; r < MOUNT_REPS; r++)); do
        sync
        keyfs_mount "$store" "$mnt" "$@"
        times+=("$MOUNT_US")
        rtimes+=("$MOUNT_ROOT_US")
        sleep 0.3 # let the mount settle (audit flush) before reading RSS
        rm+=("$(rss_kb "$KPID")")
        if [ "$r" = 0 ]; then
            FINDN[$label]=$(find "$mnt" | wc -l)
            rf=$(rss_kb "$KPID")
        fi
        stop_daemon "$mnt" "$KPID"
    done
    MT[$label]=$(printf '%s\n' "${times[@]}" | median)
    MTR[$label]=$(printf '%s\n' "${rtimes[@]}" | median)
    RSS_M[$label]=$(printf '%s\n' "${rm[@]}" | median)
    RSS_F[$label]=$rf
    SIZE_ROWS+=("$label")
    sample_load
    log "  $label keys: mount $((MT[$label] / 1000)) ms (clients/ after $((MTR[$label] / 1000)) ms), RSS $((RSS_M[$label] / 1024)) MiB, after find $((rf / 1024)) MiB (load $LAST_LOAD)"
}
for k in $SIZE_KEYS; do
    n=$(((k + KEYS_PER_CLIENT - 1) / KEYS_PER_CLIENT))
    measure_size "$k" "${SNAP_FOR[$n]}"
done
BIG_K="${SIZE_KEYS##* }"
BIG_N=$(((BIG_K + KEYS_PER_CLIENT - 1) / KEYS_PER_CLIENT))
measure_size "$BIG_K --cache" "${SNAP_FOR[$BIG_N]}" --cache

END_US=$(now_us)
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
LOAD_RANGE="$(printf '%s\n' "${LOADS[@]}" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1; s += $1 } END { if (NR) printf "%s–%s (mean %.1f, %d samples)", lo, hi, s / NR, NR }')"
ELAPSED_S=$(((END_US - START_US) / 1000000))

# ---------------------------------------------------------------- report

fmt() { # fmt VALUE — 3 significant digits
    awk -v v="$1" 'BEGIN { if (v == "" || v == "nan") { print "–"; exit }
        if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else if (v >= 1) printf "%.2f", v; else printf "%.3f", v }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "–"; else printf "%.2f×", a / b }'; }

row() { # row METRIC "what" "unit"
    local m="$1" what="$2" unit="$3"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$what" "$unit" \
        "$(fmt "${R[$m,tmpfs]:-}")" "$(fmt "${R[$m,gocryptfs]:-}")" "$(fmt "${R[$m,keyfs]:-}")" "$(fmt "${R[$m,cache]:-}")" \
        "$(fmt "${R[$m,etcd]:-}")" \
        "$(ratio "${R[$m,keyfs]:-}" "${R[$m,tmpfs]:-}")" "$(ratio "${R[$m,keyfs]:-}" "${R[$m,gocryptfs]:-}")" \
        "$(ratio "${R[$m,cache]:-}" "${R[$m,tmpfs]:-}")" "$(ratio "${R[$m,cache]:-}" "${R[$m,gocryptfs]:-}")" \
        "$(ratio "${R[$m,etcd]:-}" "${R[$m,keyfs]:-}")"
}

raw_list() { # raw_list METRIC FS — the repetitions, 3 significant digits, " · "-separated
    local v out=""
    for v in ${RAW[$1,$2]:-}; do out+="${out:+ · }$(fmt "$v")"; done
    echo "${out:-–}"
}

paired() { # paired METRIC FS REF — ratio FS/REF within each repetition (same round, same load)
    local -a a b
    read -r -a a <<<"${RAW[$1,$2]:-}"
    read -r -a b <<<"${RAW[$1,$3]:-}"
    local i out=""
    for ((i = 0; i < ${#a[@]} && i < ${#b[@]}; i++)); do
        out+="${out:+ · }$(awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN { printf "%.2f", x / y }')"
    done
    echo "${out:-–}"
}

bar() { # bar "name" "measured" PASS-condition(0/1)
    if [ "$3" = 1 ]; then echo "| $1 | $2 | **PASS** |"; else echo "| $1 | $2 | **MISS** |"; fi
}
le() { awk -v a="$1" -v b="$2" 'BEGIN { print (a != "" && b != "" && a + 0 <= b + 0) ? 1 : 0 }'; }

BIG_MT_MS=$(awk -v v="${MT[$BIG_K]}" 'BEGIN { printf "%.0f", v / 1000 }')
BIG_RSS_MIB=$(awk -v a="${RSS_M[$BIG_K]}" -v b="${RSS_F[$BIG_K]}" 'BEGIN { m = (a > b) ? a : b; printf "%.1f", m / 1024 }')
R_READ=$(awk -v a="${R[read1,keyfs]:-}" -v b="${R[read1,gocryptfs]:-}" 'BEGIN { printf "%.2f", a / b }')
R_CACHE=$(awk -v a="${R[read1,cache]:-}" -v b="${R[read1,tmpfs]:-}" 'BEGIN { printf "%.2f", a / b }')
r2() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print ""; else printf "%.2f", a / b }'; }
R_ETCD1=$(r2 "${R[read1,etcd]:-}" "${R[read1,keyfs]:-}")
R_ETCD2=$(r2 "${R[read2,etcd]:-}" "${R[read2,keyfs]:-}")
R_ETCDROT=$(r2 "${R[rot,etcd]:-}" "${R[rot,keyfs]:-}")

etcd_where() { # the rest of the "Where each store lives" line
    if [ "$ETCD" = 1 ]; then
        echo "gocryptfs's cipherdir, the sled stores of keyfs and keyfs --cache, and keyfs-etcd's etcd data dir are all on the scratch disk ($DISK_FS, in the run's scratch directory). The sled stores were built on tmpfs and copied there. keyfs-etcd's store is the prefix \`keyfs-bench\` in a **$ETCD_MEMBERS-member etcd** that the script started on 127.0.0.1 (plain HTTP on loopback; \`--max-txn-ops 10000 --max-request-bytes 10485760\`, everything else default, so every commit waits for etcd's WAL fsync on that disk); its $TREE_CLIENTS clients were made by \`mkdir\` through a keyfs mount on it (one etcd transaction per client) at ~$ETCD_BUILD_RATE clients/s (${ETCD_BUILD_S}s). Data dir: ${ETCD_DB_MIB} MiB after building, ${ETCD_DB_END_MIB:-?} MiB at the end. Same names, sizes and one version per key as the sled tree; its key bytes are its own (mkdir generated them)"
    else
        echo "gocryptfs's cipherdir and the sled stores of keyfs and keyfs --cache are on the scratch disk ($DISK_FS). keyfs on etcd was not measured (BENCH_ETCD=0)"
    fi
}

report() {
    local mode="full run"
    [ "$QUICK" = 1 ] && mode="QUICK smoke run (BENCH_QUICK=1: $TREE_CLIENTS clients, few iterations — not for the record)"
    cat <<EOF
# keyfs performance

Produced by \`scripts/bench.sh\` ($mode). Each run rewrites everything above the \`<!-- analysis -->\` marker and keeps the hand-written analysis below it.

- **Date:** $START_DATE, took ${ELAPSED_S}s (store building ${BUILD_S}s)
- **Machine:** $NPROC × $CPU_MODEL, $RAM_GIB GiB RAM, kernel $KERNEL, $OS
- **Load average** (1/5/15 min): $LOAD_START at the start, $LOAD_END at the end; 1-minute load sampled between measurements: ${LOAD_RANGE:-n/a} (other work on the machine inflates every column alike; the repetitions are interleaved across the filesystems)
- **Disk** under the stores and the gocryptfs cipherdir: $DISK_FS; one 4 KiB O_DSYNC write took ${FSYNC_US} µs at the start
- **Where each store lives:** tmpfs is a private tmpfs mount (in RAM); $(etcd_where)
- **Versions:** keyfs $KEYFS_REV (release build), $GOCRYPTFS_VERSION (default options, \`-fg\` to keep its pid)$([ "$ETCD" = 1 ] && echo ", etcd ${ETCD_VERSION:-?} (Debian's etcd-server)")
- **Tree:** $TREE_CLIENTS clients (\`clients/c000001\` …), each with storage, storage.pub, storage_sym, hmac. Built by \`mkdir clients/cNNNNNN\` through a keyfs mount (which generates the default key set in one durable change) on a store kept on tmpfs, at ~$BUILD_RATE clients/s, then copied to the disk; tmpfs and gocryptfs got the same files (same names, same bytes) with \`tar\` out of the keyfs mount.
- **Method:** every measurement is repeated ($REPS× for reads and rotations, $WALK_REPS× for walks, $MOUNT_REPS× for mounts), each repetition going round all the filesystems in turn; the table shows medians. Loops run in \`scripts/bench/kbench.c\` (open/read/close in C, no shell in the loop). Key read = \`open(O_RDONLY)\` + one \`read(4096)\` returning 32 bytes + \`close\` of \`$KEYFILE\`, $ITERS times per measurement; 2 threads = two threads looping on the same file (per-op latency each thread sees, and the aggregate rate). "to EOF" adds the second \`read\` that \`cat\` makes. Rotation = write 32 random bytes to \`storage_sym.new\`, close, \`rename\` over \`storage_sym\` ($ROT_ITERS per measurement, a fresh key each repetition); "+ fsync" also fsyncs the temp file before close (what tmpfs/gocryptfs need for the rotation to be durable; keyfs's rotation is durable when \`rename\` returns without it; on etcd that means both commits are etcd transactions, each waiting for etcd's WAL fsync). \`find\` and \`ls -lR\` walk the whole mount, \`tar\` archives \`clients poison audit\` into a file on tmpfs.

## Results (medians)

Ratios are keyfs ÷ reference: below 1 is faster for times, above 1 is better for rates. keyfs is the default mode on a sled store; keyfs-etcd is the same default mode on the etcd store, and keyfs-etcd/keyfs compares the two backends.

| operation | unit | tmpfs | gocryptfs | keyfs | keyfs --cache | keyfs-etcd | keyfs/tmpfs | keyfs/gocryptfs | cache/tmpfs | cache/gocryptfs | keyfs-etcd/keyfs |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
$(row read1 "key read: open+read+close, 1 thread" "µs/op")
$(row read2 "key read, 2 threads on the same file" "µs/op per thread")
$(row read2_ops "key read, 2 threads: aggregate" "ops/s")
$(row readeof "key read to EOF (\`cat\`: 2 reads), 1 thread" "µs/op")
$(row stat "stat of the key" "µs/op")
$(row find "\`find MNT \| wc -l\`, $TREE_CLIENTS clients" "s")
$(row lsR "\`ls -lR\`, $TREE_CLIENTS clients" "s")
$(row tar "\`tar -cf\` of the $TREE_CLIENTS-client tree" "s")
$(row rot "rotation: write temp + rename (durable on keyfs only)" "rotations/s")
$(row rotfs "rotation: write temp + fsync + rename (durable everywhere)" "rotations/s")

Entries found by find: tmpfs ${NOTE[find,tmpfs]:-?}, gocryptfs ${NOTE[find,gocryptfs]:-?}, keyfs ${NOTE[find,keyfs]:-?}, keyfs --cache ${NOTE[find,cache]:-?}$([ "$ETCD" = 1 ] && echo ", keyfs-etcd ${NOTE[find,etcd]:-?}"). Tar size: ${NOTE[tar,keyfs]:-?}.

Daemon memory after the walks (VmRSS): gocryptfs $((GOC_RSS_WALKED / 1024)) MiB, keyfs $((RSS_KEYFS_WALKED / 1024)) MiB, keyfs --cache $((RSS_CACHE_WALKED / 1024)) MiB$([ "$ETCD" = 1 ] && echo ", keyfs-etcd $((RSS_ETCD_WALKED / 1024)) MiB (it holds the prefix in memory, except the audit entries; the etcd server itself $((ETCD_RSS_KB / 1024)) MiB at the end)"). Mount of the $TREE_CLIENTS-client tree: gocryptfs $((GOC_MOUNT_US / 1000)) ms (mostly its scrypt password hashing; RSS $((GOC_RSS_MOUNT / 1024)) MiB), keyfs $((KEYFS_TREE_MOUNT_US / 1000)) ms$([ "$ETCD" = 1 ] && echo ", keyfs-etcd $((ETCD_TREE_MOUNT_US / 1000)) ms (loading the prefix from etcd; RSS $((ETCD_RSS_MOUNT / 1024)) MiB)").

### keyfs mount time and daemon memory by inventory size

Mount time = from spawning \`keyfs mount\` to \`MNT/.keyfs/status\` answering \`stat\` (median of $MOUNT_REPS); the column before it stops the clock when \`MNT/clients\` first answers (the first probe; the status probe follows it). RSS = VmRSS of the daemon 0.3 s after both probes (median) and after one \`find\` over the whole mount.

| keys | clients | until clients/ answers (ms) | mount time: until .keyfs/status answers (ms) | RSS after mount (MiB) | RSS after find (MiB) | entries walked |
|---:|---:|---:|---:|---:|---:|---:|
$(for l in "${SIZE_ROWS[@]}"; do
        k="${l%% *}"
        printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$l" $(((k + KEYS_PER_CLIENT - 1) / KEYS_PER_CLIENT)) \
            "$(awk -v v="${MTR[$l]}" 'BEGIN { printf "%.0f", v / 1000 }')" \
            "$(awk -v v="${MT[$l]}" 'BEGIN { printf "%.0f", v / 1000 }')" \
            "$(awk -v v="${RSS_M[$l]}" 'BEGIN { printf "%.1f", v / 1024 }')" \
            "$(awk -v v="${RSS_F[$l]}" 'BEGIN { printf "%.1f", v / 1024 }')" "${FINDN[$l]}"
    done)

## Bars (SPEC §6; the keyfs-etcd rows: issue 7)

| bar | measured | verdict |
|---|---|---|
$(bar "key read, default mode ≤ 0.6× gocryptfs" "$(fmt "${R[read1,keyfs]:-}") µs vs $(fmt "${R[read1,gocryptfs]:-}") µs = ${R_READ}× (within each repetition: $(paired read1 keyfs gocryptfs))" "$(le "$R_READ" 0.6)")
$(bar "key read, --cache ≤ 1.5× tmpfs" "$(fmt "${R[read1,cache]:-}") µs vs $(fmt "${R[read1,tmpfs]:-}") µs = ${R_CACHE}× (within each repetition: $(paired read1 cache tmpfs))" "$(le "$R_CACHE" 1.5)")
$(bar "find over $TREE_CLIENTS clients ≤ gocryptfs (default mode)" "$(fmt "${R[find,keyfs]:-}") s vs $(fmt "${R[find,gocryptfs]:-}") s (within each repetition: $(paired find keyfs gocryptfs)); $(fmt "${R[find,cache]:-}") s with --cache" "$(le "${R[find,keyfs]:-}" "${R[find,gocryptfs]:-}")")
$(bar "mount ≤ 1 s at $BIG_K keys" "${BIG_MT_MS} ms" "$(le "$BIG_MT_MS" 1000)")
$(bar "daemon RSS ≤ 64 MiB at $BIG_K keys (after mount and after a full find)" "${BIG_RSS_MIB} MiB" "$(le "$BIG_RSS_MIB" 64)")
$(bar "≥ 1,000 durable rotations/s, one thread (write temp, rename)" "$(fmt "${R[rot,keyfs]:-}")/s ($(fmt "${R[rotfs,keyfs]:-}")/s with an fsync of the temp file)" "$(le 1000 "${R[rot,keyfs]:-}")")
EOF
    if [ "$ETCD" = 1 ]; then
        bar "keyfs-etcd key read ≤ 1.10× keyfs on sled, 1 thread (served from the local mirror)" \
            "$(fmt "${R[read1,etcd]:-}") µs vs $(fmt "${R[read1,keyfs]:-}") µs = ${R_ETCD1:-?}× (within each repetition: $(paired read1 etcd keyfs))" "$(le "$R_ETCD1" 1.10)"
        bar "keyfs-etcd key read ≤ 1.10× keyfs on sled, 2 threads (per-thread latency)" \
            "$(fmt "${R[read2,etcd]:-}") µs vs $(fmt "${R[read2,keyfs]:-}") µs = ${R_ETCD2:-?}× (within each repetition: $(paired read2 etcd keyfs))" "$(le "$R_ETCD2" 1.10)"
        echo
        echo "Rotations on etcd (no bar; each is two etcd transactions): $(fmt "${R[rot,etcd]:-}")/s, $(fmt "${R[rotfs,etcd]:-}")/s with an fsync of the temp file; ${R_ETCDROT:-?}× keyfs on sled ($(fmt "${R[rot,keyfs]:-}")/s; within each repetition: $(paired rot etcd keyfs))."
    fi
    if [ "$QUICK" = 1 ]; then
        echo
        echo "Quick run: the size bars are checked at $BIG_K keys, not 100,000."
    fi
    echo
    echo "### Every repetition"
    echo
    echo "The values behind each median, in the order they ran (same units as above)."
    echo
    echo "| operation | tmpfs | gocryptfs | keyfs | keyfs --cache | keyfs-etcd |"
    echo "|---|---|---|---|---|---|"
    local m
    declare -A ml=([read1]="key read, 1 thread (µs)" [read2]="key read, 2 threads (µs per thread)"
        [read2_ops]="key read, 2 threads (ops/s)" [readeof]="key read to EOF (µs)" [stat]="stat (µs)"
        [find]="find (s)" [lsR]="ls -lR (s)" [tar]="tar (s)" [rot]="rotation (/s)" [rotfs]="rotation + fsync (/s)")
    for m in read1 read2 read2_ops readeof stat find lsR tar rot rotfs; do
        printf '| %s | %s | %s | %s | %s | %s |\n' "${ml[$m]}" \
            "$(raw_list "$m" tmpfs)" "$(raw_list "$m" gocryptfs)" "$(raw_list "$m" keyfs)" "$(raw_list "$m" cache)" "$(raw_list "$m" etcd)"
    done
    if [ -n "$PROFILE_MD" ]; then
        echo
        echo "## Profile (same run)"
        echo "$PROFILE_MD"
    fi
}

REPORT="$(report)"
mkdir -p "$(dirname "$OUT")"
if [ "$QUICK" = 0 ] && [ -f "$OUT" ] && grep -q '^<!-- analysis -->' "$OUT"; then
    # Keep the hand-written analysis below the marker.
    { echo "$REPORT"; echo; sed -n '/^<!-- analysis -->/,$p' "$OUT"; } >"$OUT.new"
else
    echo "$REPORT" >"$OUT.new"
fi
mv "$OUT.new" "$OUT"
echo "$REPORT"
log "report written to $OUT (${ELAPSED_S}s)"
