#!/usr/bin/env bash
# shellcheck disable=SC2317  # (0.9 thinks the trap handlers are unreachable)
# scripts/pjdfstest.sh — run the POSIX file system test suite (pjdfstest, the
# Rust rewrite, crate `pjdfstest`) against a live keyfs mount.
#
# Usage: scripts/pjdfstest.sh [PATTERN...]
#
#   With no PATTERN, runs the groups open, rename, unlink, mkdir, rmdir, chmod,
#   chown, truncate, ftruncate, utimensat, symlink. A PATTERN selects cases
#   whose name contains it (pjdfstest's own filter), e.g.
#   `scripts/pjdfstest.sh rename::exdev_target chmod::`.
#
# What it does: installs what it needs (Debian packages, pjdfstest), builds
# keyfs (debug), creates a temporary store with a fresh master key, mounts it
# with `--mkdir-generates=none` in the background, creates the client
# directory clients/pjdfs01 (mode 0755 so that pjdfstest's unprivileged
# users can reach their files) and runs pjdfstest in it. Cases listed in
# scripts/pjdfstest-exclude.txt may fail without failing the run; every other
# failing case fails it. The mount is always unmounted and the daemon stopped
# on exit, whatever happens.
#
# Environment:
#   PJDFSTEST_REPORT_ONLY=1   print results, exit 0 even if cases fail (a run
#                             that could not start or finish still fails)
#   PJDFSTEST_GROUPS="a b"    groups to run (default above)
#   PJDFSTEST_FEATURES="x y"  pjdfstest opt-in features (default: utimensat
#                             utime_now; see `pjdfstest -l`)
#   PJDFSTEST_NAPTIME=0.01    pause between changes whose times are compared
#   PJDFSTEST_TIMEOUT=600     seconds before the whole run is stopped
#   PJDFSTEST_EXCLUDE=FILE    exclusion list (default scripts/pjdfstest-exclude.txt)
#   PJDFSTEST_VERBOSE=1       stream pjdfstest's full output
#   PJDFSTEST_KEEP=1          keep the temporary store and logs
#   KEYFS_BIN=PATH            keyfs binary to test (default: cargo build, debug)
#
# Logs: target/pjdfstest.log (pjdfstest output), target/pjdfstest-daemon.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"

log() { printf '[pjdfstest.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

REPORT_ONLY="${PJDFSTEST_REPORT_ONLY:-0}"
GROUPS_TO_RUN="${PJDFSTEST_GROUPS:-open rename unlink mkdir rmdir chmod chown truncate ftruncate utimensat symlink}"
FEATURES="${PJDFSTEST_FEATURES:-utimensat utime_now}"
NAPTIME="${PJDFSTEST_NAPTIME:-0.01}"
RUN_TIMEOUT="${PJDFSTEST_TIMEOUT:-600}"
EXCLUDE_FILE="${PJDFSTEST_EXCLUDE:-$ROOT/scripts/pjdfstest-exclude.txt}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RESULT_LOG="$TARGET_DIR/pjdfstest.log"
DAEMON_LOG_COPY="$TARGET_DIR/pjdfstest-daemon.log"
CLIENT_ID="pjdfs01"
# pjdfstest switches to these users/groups in some cases; Debian has both.
AUTH_USERS=("nobody:nogroup" "daemon:daemon")

# ---------------------------------------------------------------- exclusions
# Parse the exclusion file into EXCLUDES (patterns); refuse entries with no reason.
EXCLUDES=()
parse_excludes() {
    local line entry name reason n=0
    [ -f "$EXCLUDE_FILE" ] || { log "no exclusion file at $EXCLUDE_FILE (none excluded)"; return 0; }
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        entry="${line#"${line%%[![:space:]]*}"}"          # trim leading space
        [ -z "$entry" ] && continue
        [ "${entry:0:1}" = "#" ] && continue
        name="${entry%%#*}"
        name="${name%"${name##*[![:space:]]}"}"            # trim trailing space
        if [[ "$entry" != *"#"* ]]; then
            die "$EXCLUDE_FILE:$n: '$name' has no reason (write: name  # reason)"
        fi
        reason="${entry#*#}"
        reason="${reason#"${reason%%[![:space:]]*}"}"
        [ -n "$reason" ] || die "$EXCLUDE_FILE:$n: '$name' has an empty reason"
        [[ "$name" =~ [[:space:]] ]] && die "$EXCLUDE_FILE:$n: one case per line, got '$name'"
        EXCLUDES+=("$name")
    done <"$EXCLUDE_FILE"
}

is_excluded() {
    local pat
    for pat in "${EXCLUDES[@]+"${EXCLUDES[@]}"}"; do
        # shellcheck disable=SC2053  # glob match on purpose
        [[ "$1" == $pat ]] && return 0
    done
    return 1
}

# ------------------------------------------------------------- mount helpers
is_mounted() {
    awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts
}

WORK=""
MNT=""
DAEMON_PID=""
RUN_PID=""
KEYFS=""

stop_run() {
    [ -n "$RUN_PID" ] || return 0
    if kill -0 "$RUN_PID" 2>/dev/null; then
        log "stopping pjdfstest"
        kill -TERM "$RUN_PID" 2>/dev/null   # timeout passes it on to pjdfstest
        local i
        for i in $(seq 1 50); do
            kill -0 "$RUN_PID" 2>/dev/null || break
            [ "$i" -eq 25 ] && kill -KILL "$RUN_PID" 2>/dev/null
            sleep 0.2
        done
    fi
    wait "$RUN_PID" 2>/dev/null
    RUN_PID=""
}

stop_daemon() {
    set +e
    if [ -n "$MNT" ] && is_mounted "$MNT"; then
        log "unmounting $MNT"
        if ! timeout 20 "$KEYFS" umount "$MNT" >/dev/null 2>&1; then
            timeout 10 fusermount3 -u "$MNT" 2>/dev/null ||
                timeout 10 umount "$MNT" 2>/dev/null ||
                umount -l "$MNT" 2>/dev/null ||
                fusermount3 -uz "$MNT" 2>/dev/null
        fi
    fi
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        local i
        for i in $(seq 1 50); do
            kill -0 "$DAEMON_PID" 2>/dev/null || break
            [ "$i" -eq 20 ] && kill -TERM "$DAEMON_PID" 2>/dev/null
            sleep 0.2
        done
        if kill -0 "$DAEMON_PID" 2>/dev/null; then
            log "daemon $DAEMON_PID did not stop; killing it"
            kill -KILL "$DAEMON_PID" 2>/dev/null
        fi
    fi
    [ -n "$DAEMON_PID" ] && wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=""
    if [ -n "$MNT" ] && is_mounted "$MNT"; then
        log "mount still present after the daemon stopped; lazy unmount"
        umount -l "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_run
    stop_daemon
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        [ -f "$WORK/daemon.log" ] && cp "$WORK/daemon.log" "$DAEMON_LOG_COPY" 2>/dev/null
        if [ "$rc" -ne 0 ] && [ -s "$WORK/daemon.log" ]; then
            log "last lines of the daemon log ($DAEMON_LOG_COPY):"
            tail -n 30 "$WORK/daemon.log" >&2
        fi
        if [ -n "$MNT" ] && is_mounted "$MNT"; then
            log "$MNT is still mounted; leaving $WORK in place"
            rc=1
        elif [ "${PJDFSTEST_KEEP:-0}" = 1 ]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------- setup
parse_excludes
[ "$(id -u)" -eq 0 ] || log "warning: not root; cases that need root are skipped and the mount has no allow_other"

keyfs_install_deps
keyfs_install_pjdfstest
PJDFSTEST="$KEYFS_PJDFSTEST_BIN"

for pair in "${AUTH_USERS[@]}"; do
    u="${pair%%:*}" g="${pair#*:}"
    ugid="$(getent passwd "$u" | cut -d: -f4)" || die "user $u does not exist (pjdfstest needs it)"
    ggid="$(getent group "$g" | cut -d: -f3)" || die "group $g does not exist (pjdfstest needs it)"
    [ "$ugid" = "$ggid" ] || die "user $u's primary group is not $g"
done

if [ -n "${KEYFS_BIN:-}" ]; then
    KEYFS="$KEYFS_BIN"
else
    log "building keyfs (debug)"
    cargo build --quiet --bin keyfs
    KEYFS="$TARGET_DIR/debug/keyfs"
fi
[ -x "$KEYFS" ] || die "no keyfs binary at $KEYFS"
mkdir -p "$TARGET_DIR"

# Short names on purpose: pjdfstest binds UNIX sockets at
# <dir>/.tmpXXXXXX/.tmpXXXXXX/<32 chars>, and a socket path has at most 107
# bytes, so the test directory's path must stay within 52.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kpjd.XXXXXX")"
STORE="$WORK/store"
MNT="$WORK/m"
KEY="$WORK/master.key"
SECONDARY="$WORK/secondary"   # another file system (for EXDEV cases)
CONFIG="$WORK/pjdfstest.toml"
mkdir -p "$MNT" "$SECONDARY"
chmod 0755 "$WORK" "$MNT"

log "creating store $STORE"
"$KEYFS" init "$STORE" --generate-master-key "$KEY" >"$WORK/init.log" 2>&1 ||
    { cat "$WORK/init.log" >&2; die "keyfs init failed"; }

log "mounting $STORE on $MNT"
"$KEYFS" --master-key-file "$KEY" mount "$STORE" "$MNT" --mkdir-generates=none \
    >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!

for _ in $(seq 1 300); do
    is_mounted "$MNT" && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { DAEMON_PID=""; die "keyfs mount exited before the mount came up"; }
    sleep 0.1
done
is_mounted "$MNT" || die "mount did not come up within 30 s"
timeout 10 stat "$MNT/clients" >/dev/null || die "mount is up but $MNT/clients does not answer"

TESTDIR="$MNT/clients/$CLIENT_ID"
if [ "${#TESTDIR}" -gt 52 ]; then
    log "warning: $TESTDIR is longer than 52 bytes: socket cases will fail with ENAMETOOLONG (use a shorter TMPDIR)"
fi
mkdir "$TESTDIR" || die "mkdir $TESTDIR failed"
chmod 0755 "$TESTDIR" || die "chmod 0755 $TESTDIR failed"
for d in "$MNT" "$MNT/clients" "$TESTDIR"; do
    mode="$(stat -c %a "$d")"
    [ $((8#$mode & 8#001)) -ne 0 ] || log "warning: $d is $mode: other users cannot traverse it, cases that switch users will fail"
done

{
    echo "[features]"
    for f in $FEATURES; do echo "$f = {}"; done
    echo
    echo "[settings]"
    echo "naptime = $NAPTIME"
    echo "allow_remount = false"
    echo "expected_failures = []"
    echo
    echo "[dummy_auth]"
    printf 'entries = ['
    sep=""
    for pair in "${AUTH_USERS[@]}"; do
        printf '%s["%s", "%s"]' "$sep" "${pair%%:*}" "${pair#*:}"
        sep=", "
    done
    echo "]"
} >"$CONFIG"

PATTERNS=()
if [ "$#" -gt 0 ]; then
    PATTERNS=("$@")
else
    for g in $GROUPS_TO_RUN; do PATTERNS+=("$g::"); done
fi

# ----------------------------------------------------------------------- run
log "running pjdfstest $("$PJDFSTEST" --version | awk '{print $2}') in $TESTDIR: ${PATTERNS[*]}"
start=$(date +%s)
# In the background with `wait`, so that Ctrl-C or SIGTERM reach the trap
# at once (cleanup stops pjdfstest, then unmounts).
NO_COLOR=1 timeout --kill-after=10 "$RUN_TIMEOUT" \
    "$PJDFSTEST" -c "$CONFIG" -p "$TESTDIR" -s "$SECONDARY" "${PATTERNS[@]}" >"$RESULT_LOG" 2>&1 &
RUN_PID=$!
if [ "${PJDFSTEST_VERBOSE:-0}" = 1 ]; then
    tail -n +1 -f --pid="$RUN_PID" "$RESULT_LOG" &
fi
set +e
wait "$RUN_PID"
prc=$?
set -e
RUN_PID=""
log "pjdfstest exited with $prc after $(($(date +%s) - start)) s (full output: $RESULT_LOG)"
if [ "$prc" -eq 124 ] || [ "$prc" -eq 137 ]; then
    log "pjdfstest was stopped after ${RUN_TIMEOUT} s"
fi

# ------------------------------------------------------------------- results
# Lines look like "<name>   ok|skipped|FAILED"; a FAILED line is followed by
# tab-indented lines with the reason.
pass=0 fail=0 skip=0 excluded=0
FAILED_CASES=() EXCLUDED_CASES=() OK_CASES=()
while read -r status name; do
    case "$status" in
        ok)
            pass=$((pass + 1)) OK_CASES+=("$name")
            ;;
        skipped) skip=$((skip + 1)) ;;
        FAILED)
            if is_excluded "$name"; then
                excluded=$((excluded + 1)) EXCLUDED_CASES+=("$name")
            else
                fail=$((fail + 1)) FAILED_CASES+=("$name")
            fi
            ;;
    esac
done < <(awk '/^[A-Za-z0-9_]+(::[A-Za-z0-9_]+)+[ \t]+(ok|skipped|FAILED)[ \t]*$/ { print $NF, $1 }' "$RESULT_LOG")

# An exclusion is stale when every case it matched passed (none failed).
STALE=() UNMATCHED=()
for pat in "${EXCLUDES[@]+"${EXCLUDES[@]}"}"; do
    failed_hit=0 ok_hit=0
    for name in "${EXCLUDED_CASES[@]+"${EXCLUDED_CASES[@]}"}"; do
        # shellcheck disable=SC2053  # glob match on purpose
        [[ "$name" == $pat ]] && { failed_hit=1; break; }
    done
    [ "$failed_hit" -eq 1 ] && continue
    for name in "${OK_CASES[@]+"${OK_CASES[@]}"}"; do
        # shellcheck disable=SC2053
        [[ "$name" == $pat ]] && { ok_hit=1; break; }
    done
    if [ "$ok_hit" -eq 1 ]; then
        STALE+=("$pat")
    else
        UNMATCHED+=("$pat")
    fi
done

summary="$(grep -E '^Summary: ' "$RESULT_LOG" | tail -n 1 || true)"
total="$(sed -nE 's/.* ([0-9]+) total$/\1/p' <<<"$summary")"

if [ "${#FAILED_CASES[@]}" -gt 0 ]; then
    echo "---- failing cases (not excluded) ----"
    # Print each failing case with its reason lines.
    awk -v list=" ${FAILED_CASES[*]} " '
        /^[^ \t]/ { show = 0 }
        /^[A-Za-z0-9_:]+[ \t]+FAILED[ \t]*$/ { if (index(list, " " $1 " ")) show = 1 }
        show { print }
    ' "$RESULT_LOG"
fi
if [ "${#EXCLUDED_CASES[@]}" -gt 0 ]; then
    echo "---- excluded cases that failed (see $EXCLUDE_FILE) ----"
    printf '  %s\n' "${EXCLUDED_CASES[@]}"
fi
if [ "${#STALE[@]}" -gt 0 ]; then
    echo "---- exclusions whose cases all PASS now: remove them from $EXCLUDE_FILE ----"
    printf '  %s\n' "${STALE[@]}"
fi
if [ "${#UNMATCHED[@]}" -gt 0 ] && [ "$#" -eq 0 ]; then
    echo "---- exclusions that match no case that ran (typo? skipped?) ----"
    printf '  %s\n' "${UNMATCHED[@]}"
fi
echo "${summary:-pjdfstest printed no summary}"
echo "pjdfstest exclusions: $excluded excluded cases failed, ${#STALE[@]} stale exclusions"
echo "pjdfstest: $pass passed, $fail failed, $skip skipped"

# A run that did not finish, or whose lines we could not account for, fails
# even in report-only mode: it says nothing about the file system.
[ -n "$summary" ] || die "pjdfstest did not finish (exit $prc); see $RESULT_LOG"
counted=$((pass + fail + skip + excluded))
[ "$counted" = "$total" ] || die "counted $counted cases but pjdfstest reports $total; see $RESULT_LOG"
[ "$total" -gt 0 ] || die "no pjdfstest case ran (patterns: ${PATTERNS[*]})"

if [ "$fail" -gt 0 ]; then
    if [ "$REPORT_ONLY" = 1 ]; then
        log "$fail case(s) failed (PJDFSTEST_REPORT_ONLY=1: not failing)"
    else
        log "$fail case(s) failed that are not in $EXCLUDE_FILE"
        exit 1
    fi
fi
exit 0
