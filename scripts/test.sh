#!/usr/bin/env bash
# scripts/test.sh — run the whole keyfs test suite (what CI runs).
#
# Usage: scripts/test.sh [STEP...]
#
# Steps, in order: deps fmt clippy test pjdfstest
#   deps       install what the suite needs (scripts/setup.sh)
#   fmt        cargo fmt --check
#   clippy     cargo clippy --all-targets -- -D warnings
#   test       cargo test --all-targets (as root, so the FUSE mount tests run)
#   pjdfstest  scripts/pjdfstest.sh (POSIX suite against a live mount)
# With STEP arguments only those run (deps always runs first).
#
# Every step runs even if an earlier one failed (set KEYFS_TEST_FAIL_FAST=1 to
# stop at the first failure), except that a failed `deps` stops at once.
#
# No keyfs FUSE mount may outlive the run: every temp file of the run goes
# below one directory ($TMPDIR/keyfs-t.*, exported as TMPDIR), and a keyfs
# mount still there at the end is a leak (unmounted, and the run fails). On CI
# (CI set) any keyfs mount that appeared during the run counts as a leak;
# elsewhere such mounts are only reported (they may be someone else's).
#
# Exit status is non-zero if any step failed or a mount leaked; the failing
# steps are named in the summary.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"

ALL_STEPS=(fmt clippy test pjdfstest)
if [ "$#" -gt 0 ]; then
    STEPS=("$@")
    for s in "${STEPS[@]}"; do
        case " ${ALL_STEPS[*]} deps " in
            *" $s "*) ;;
            *) echo "test.sh: unknown step '$s' (steps: deps ${ALL_STEPS[*]})" >&2; exit 1 ;;
        esac
    done
else
    STEPS=("${ALL_STEPS[@]}")
fi

# keyfs FUSE mounts as "mountpoint<TAB>fsname<TAB>type": type fuse.keyfs, or a
# fuse mount whose fsname mentions keyfs.
keyfs_mounts() {
    awk '$3 ~ /^fuse/ && ($3 ~ /keyfs/ || $1 ~ /keyfs/) { print $2 "\t" $1 "\t" $3 }' /proc/mounts | sort
}

FAILED=()
RESULTS=()
run_step() {
    local name="$1" start rc
    shift
    echo
    echo "==== [$name] $*"
    start=$(date +%s)
    if "$@"; then
        rc=0
    else
        rc=$?
    fi
    local took=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        echo "==== [$name] ok (${took} s)"
        RESULTS+=("$name: ok (${took} s)")
    else
        echo "==== [$name] FAILED with exit status $rc (${took} s)"
        RESULTS+=("$name: FAILED, exit $rc (${took} s)")
        FAILED+=("$name")
    fi
    return "$rc"
}

step_fmt() {
    local color=auto
    [ -n "${CI:-}" ] && color=never
    cargo fmt --all -- --check --color="$color"
}
step_clippy() { cargo clippy --all-targets -- -D warnings; }
step_test() { RUST_BACKTRACE="${RUST_BACKTRACE:-1}" cargo test --all-targets; }
step_pjdfstest() { bash "$ROOT/scripts/pjdfstest.sh"; }

# Everything the run creates in temp space (the tests' tempdirs, pjdfstest's
# store and mount) goes below one directory, so that mounts it leaks can be
# told apart from mounts of anyone else on the machine. 0755: tests switch to
# other uids that must reach their mounts.
RUN_TMP="$(mktemp -d "${TMPDIR:-/tmp}/keyfs-t.XXXXXX")"   # short: see pjdfstest.sh
chmod 0755 "$RUN_TMP"
export TMPDIR="$RUN_TMP"
# On the way out, remove it unless something is still mounted below it.
remove_run_tmp() {
    if awk -v d="$RUN_TMP/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        echo "test.sh: something is still mounted below $RUN_TMP; leaving it" >&2
    else
        rm -rf --one-file-system "$RUN_TMP" || echo "test.sh: could not remove $RUN_TMP" >&2
    fi
}
trap remove_run_tmp EXIT

MOUNTS_BEFORE="$(keyfs_mounts)"
if [ -n "$MOUNTS_BEFORE" ]; then
    echo "test.sh: note: keyfs mounts present before the run (not counted):"
    printf '%s\n' "$MOUNTS_BEFORE" | sed 's/^/  /'
fi
[ "$(id -u)" -eq 0 ] || echo "test.sh: warning: not root; mounted tests need root (allow_other, other uids)" >&2

run_step deps keyfs_install_deps || {
    echo "test.sh: FAILED: installing dependencies failed; nothing else can run" >&2
    exit 1
}

for s in "${STEPS[@]}"; do
    [ "$s" = deps ] && continue
    if ! run_step "$s" "step_$s"; then
        if [ "${KEYFS_TEST_FAIL_FAST:-0}" = 1 ]; then
            echo "test.sh: stopping at the first failure (KEYFS_TEST_FAIL_FAST=1)"
            break
        fi
    fi
done

# ---- no mount may outlive the run
# Leaked by this run for sure: keyfs mounts below RUN_TMP. Other keyfs mounts
# that appeared meanwhile are counted as leaks on CI (nothing else runs there)
# and only reported elsewhere (a developer may have mounted one).
MOUNTS_AFTER="$(keyfs_mounts)"
NEW="$(comm -13 <(printf '%s\n' "$MOUNTS_BEFORE") <(printf '%s\n' "$MOUNTS_AFTER") | sed '/^$/d')"
OURS="$(printf '%s\n' "$NEW" | awk -F'\t' -v d="$RUN_TMP/" 'index($1, d) == 1' || true)"
OTHERS="$(printf '%s\n' "$NEW" | awk -F'\t' -v d="$RUN_TMP/" 'NF && index($1, d) != 1' || true)"
if [ -n "${CI:-}" ]; then
    LEFT="$(printf '%s\n%s\n' "$OURS" "$OTHERS" | sed '/^$/d')"
else
    LEFT="$OURS"
    if [ -n "$OTHERS" ]; then
        echo "test.sh: note: keyfs mounts appeared outside $RUN_TMP during the run (not unmounted;"
        echo "  a leak if the tests mount outside \$TMPDIR, or someone else's):"
        printf '%s\n' "$OTHERS" | sed 's/^/  /'
    fi
fi
echo
if [ -n "$LEFT" ]; then
    echo "==== [mounts] FAILED: keyfs FUSE mounts left behind by the run:"
    printf '%s\n' "$LEFT" | sed 's/^/  /'
    FAILED+=("leftover-mounts")
    RESULTS+=("mounts: FAILED, $(printf '%s\n' "$LEFT" | wc -l) left behind")
    # Unmount them so that the machine stays usable (errors reported only).
    while IFS=$'\t' read -r mnt _; do
        mnt="$(printf '%b' "$mnt")"   # /proc/mounts escapes spaces as \040
        fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null ||
            echo "  could not unmount $mnt" >&2
    done <<<"$LEFT"
else
    echo "==== [mounts] ok: no keyfs mount left behind"
    RESULTS+=("mounts: ok")
fi

echo
echo "==== summary"
printf '  %s\n' "${RESULTS[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "test.sh: FAILED steps: ${FAILED[*]}"
    exit 1
fi
echo "test.sh: all steps passed"
