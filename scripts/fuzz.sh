#!/usr/bin/env bash
# Short fuzzing run of keyfs's parsers (the cargo-fuzz crate in fuzz/).
#
#   scripts/fuzz.sh [TARGET...]        default: every target of `cargo fuzz list`
#
# Environment:
#   FUZZ_SECONDS=30      time per target (libFuzzer -max_total_time)
#   FUZZ_SANITIZER=address   or none (faster build and runs, catches panics only)
#
# Installs what it needs (a C++ compiler for libFuzzer, cargo-fuzz). The
# machine has only a stable Rust toolchain: cargo-fuzz passes nightly-only
# `-Z` flags (the sanitizer), which stable rustc accepts with
# RUSTC_BOOTSTRAP=1, set here for the fuzz build only.
#
# Each target runs for FUZZ_SECONDS over fuzz/corpus/<target> (kept between
# runs, not in git) seeded from fuzz/seeds/<target> (in git). A crash leaves
# its input in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# (from fuzz/), then add it to tests/fuzz_regressions.rs.
# Exit status: 0 when no target crashed, 1 when one did, 2 on setup errors.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD

if [ -z "${HOME:-}" ]; then
    HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
    export HOME
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export CARGO_TERM_COLOR=never

SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
SANITIZER="${FUZZ_SANITIZER:-address}"
case "$SECONDS_PER_TARGET" in
    '' | *[!0-9]*) echo "fuzz.sh: FUZZ_SECONDS must be a whole number of seconds" >&2; exit 2 ;;
esac

die() { echo "fuzz.sh: $*" >&2; exit 2; }

command -v cargo >/dev/null || die "cargo not found (install Rust with rustup first)"

# libfuzzer-sys builds libFuzzer's C++ sources.
if ! command -v c++ >/dev/null; then
    echo "== installing a C++ compiler (g++)"
    if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
    { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq g++ >/dev/null; } ||
        die "cannot install g++"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (cargo install --locked cargo-fuzz; a few minutes)"
    cargo install --locked cargo-fuzz || die "cannot install cargo-fuzz"
fi

# Stable rustc refuses -Z flags unless bootstrapping is allowed.
export RUSTC_BOOTSTRAP=1
# Known false leak reports (threads sled spawns); see fuzz/lsan.supp.
export LSAN_OPTIONS="suppressions=$ROOT/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

cd "$ROOT/fuzz" || die "no fuzz/ directory"

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo fuzz list)
fi
[ ${#TARGETS[@]} -gt 0 ] || die "no fuzz targets"

echo "== building ${#TARGETS[@]} targets (sanitizer: $SANITIZER)"
build_start=$(date +%s)
cargo fuzz build --sanitizer "$SANITIZER" || die "the fuzz build failed"
echo "== built in $(( $(date +%s) - build_start )) s"

LOGS="$ROOT/fuzz/target/fuzz-logs"
mkdir -p "$LOGS"

declare -a SUMMARY
crashed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="$LOGS/$t.log"
    echo "== $t: ${SECONDS_PER_TARGET} s"
    start=$(date +%s)
    # -timeout: an input running 20 s is reported as a hang (a crash);
    # -rss_limit_mb: an input needing 2 GiB is reported as an OOM.
    cargo fuzz run --sanitizer "$SANITIZER" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    execs=$(grep -h '^stat::number_of_executed_units:' "$log" | awk '{s += $2} END {print s + 0}')
    if [ $rc -eq 0 ]; then
        result=ok
    else
        crashed=1
        artifact=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
        result="CRASH (exit $rc) ${artifact:+input: $artifact }log: $log"
        grep -m1 -A3 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$log" | sed 's/^/    /'
    fi
    SUMMARY+=("$(printf '%-12s %12s execs %6s s  %s' "$t" "$execs" "$secs" "$result")")
done

echo
echo "== fuzz summary (${SECONDS_PER_TARGET} s per target, sanitizer $SANITIZER)"
printf '%s\n' "${SUMMARY[@]}"
if [ $crashed -ne 0 ]; then
    echo "fuzz.sh: a target crashed; its input is under fuzz/artifacts/ (see above)" >&2
    exit 1
fi
echo "fuzz.sh: no crash"
