#!/usr/bin/env bash
# Crash loop: mount, run concurrent rotations / imports / destructions, kill -9
# the daemon at a random moment, then check that
#   - `keyfs check` passes (every record authenticates, the audit chain verifies),
#   - every key is wholly one version that some writer wrote (never a mix),
#   - every rotation/import whose rename returned success is present (current
#     or archived), and every destruction that returned is gone.
# Usage: scripts/crash-loop.sh [ITERATIONS]   (default 50; CRASH_LOOP_WORKERS=3)
# Needs root (FUSE mount with allow_other) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
ITER="${1:-${CRASH_LOOP_ITERATIONS:-50}}"
WORKERS="${CRASH_LOOP_WORKERS:-3}"
KEYFS="${KEYFS_BIN:-}"
if [ -z "$KEYFS" ]; then
  cargo build --release --quiet
  KEYFS="$PWD/target/release/keyfs"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/keyfs-crash.XXXXXX")"
MNT="$WORK/mnt"
DAEMON=""
cleanup() {
  if [ -n "$DAEMON" ]; then kill -9 "$DAEMON" 2>/dev/null || true; fi
  if grep -q " $MNT " /proc/mounts 2>/dev/null; then umount -l "$MNT" 2>/dev/null || true; fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$MNT"
"$KEYFS" init "$WORK/store" --generate-master-key "$WORK/mk" 2>/dev/null
export KEYFS_MASTER_KEY
KEYFS_MASTER_KEY="$(cat "$WORK/mk")"
"$KEYFS" generate --store "$WORK/store" --client-id crash01 >/dev/null
: > "$WORK/acked"      # lines: <op> <key> <sha256>  (appended only after the call returned)
: > "$WORK/attempted"  # lines: <op> <key> <sha256>  (appended before the call)

mount_it() {
  "$KEYFS" mount "$WORK/store" "$MNT" 2>>"$WORK/daemon.log" &
  DAEMON=$!
  for _ in $(seq 1 200); do
    grep -q " $MNT " /proc/mounts && return 0
    sleep 0.05
  done
  echo "mount did not come up; daemon log:" >&2
  cat "$WORK/daemon.log" >&2
  exit 1
}

worker() { # $1 = worker number, $2 = iteration
  local w=$1 it=$2 n=0 dir="$MNT/clients/crash01"
  while :; do
    n=$((n + 1))
    local key="w${w}k$((n % 3))" content tmp sum
    content="iteration $it worker $w write $n $(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    sum=$(printf '%s' "$content" | sha256sum | cut -d' ' -f1)
    case $((n % 7)) in
      6) # destruction
        echo "destroy $key -" >> "$WORK/attempted"
        # Plain rm: only a destruction that really happened (not "no such
        # file", which rm -f would count as success) is acknowledged.
        if rm "$dir/$key" 2>/dev/null && [ ! -e "$dir/$key" ]; then echo "destroy $key -" >> "$WORK/acked"; fi
        ;;
      *) # import or rotation by atomic replace
        tmp="$dir/.tmp-$it-$w-$n"
        echo "write $key $sum" >> "$WORK/attempted"
        if printf '%s' "$content" > "$tmp" 2>/dev/null && mv -f "$tmp" "$dir/$key" 2>/dev/null; then
          echo "write $key $sum" >> "$WORK/acked"
        else
          return 0
        fi
        ;;
    esac
  done
}

for it in $(seq 1 "$ITER"); do
  mount_it
  pids=()
  for w in $(seq 1 "$WORKERS"); do worker "$w" "$it" 2>/dev/null & pids+=($!); done
  sleep "0.$((RANDOM % 9 + 1))"
  kill -9 "$DAEMON"
  # A request the daemon never answered keeps its caller (and possibly a
  # daemon thread) in uninterruptible sleep until the kernel connection is
  # aborted: `keyfs umount` does that for a stale mount, then detaches it.
  sleep 0.1
  "$KEYFS" umount "$MNT" 2>>"$WORK/daemon.log" || umount -l "$MNT" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
  DAEMON=""
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  sync "$WORK/acked"
  if ! "$KEYFS" check --store "$WORK/store" >"$WORK/check.out" 2>&1; then
    echo "iteration $it: keyfs check FAILED" >&2
    cat "$WORK/check.out" >&2
    exit 1
  fi
  "$KEYFS" list --store "$WORK/store" clients/crash01 --versions --json > "$WORK/list.json"
  python3 - "$WORK" "$it" <<'EOF'
import hashlib, json, sys, os
work, it = sys.argv[1], sys.argv[2]
inv = {}
for k in json.load(open(os.path.join(work, "list.json"))):
    name = k["path"].rsplit("/", 1)[1]
    # A path can appear twice: the live key and tombstones of an earlier key there.
    inv.setdefault(name, []).extend(k["versions"])
def lines(f):
    return [l.split() for l in open(os.path.join(work, f)) if l.strip()]
attempted = {(k, s) for op, k, s in lines("attempted") if op == "write"}
problems = []
# Every version present must be something a writer wrote (wholly old or new).
for name, vs in inv.items():
    if not name.startswith("w"):
        continue
    for v in vs:
        if v["state"] == "destroyed":
            continue
        if (name, v["fingerprint"]) not in attempted:
            problems.append(f"{name} v{v['version']} ({v['state']}) holds content no writer wrote")
# Every acknowledged write is present unless a later acknowledged destroy of that key
# may have removed it (destroy removes only the current version).
# A destruction counts whether or not it was acknowledged: one that was in
# flight when the daemon died may have committed (its reply never arrived).
acked = lines("acked")
attempts = lines("attempted")
for i, (op, key, s) in enumerate(acked):
    if op != "write":
        continue
    fps = {v.get("fingerprint") for v in inv.get(key, []) if v["state"] != "destroyed"}
    at = attempts.index([op, key, s])
    later_destroy = any(o == "destroy" and k == key for o, k, _ in attempts[at + 1:])
    if s not in fps and not later_destroy:
        problems.append(f"acknowledged write of {key} ({s[:12]}…) is missing")
# The last acknowledged operation on each key decides whether it exists... unless an
# unacknowledged (in-flight) one followed it, which may or may not have committed.
last = {}
for op, key, s in acked:
    last[key] = (op, s)
inflight = {}
for op, key, s in lines("attempted"):
    inflight[key] = (op, s)
for key, (op, s) in last.items():
    cur = [v for v in inv.get(key, []) if v["state"] == "current"]
    if inflight.get(key) != (op, s):
        continue  # a later attempt was in flight when the daemon died
    if op == "destroy" and cur:
        problems.append(f"{key}: destroyed (acknowledged) but has a current version")
    if op == "write" and (not cur or cur[0]["fingerprint"] != s):
        problems.append(f"{key}: current version is not the last acknowledged write")
if problems:
    print(f"iteration {it}: " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
EOF
  # Start the next iteration's bookkeeping fresh: what is in the store now is the baseline.
  : > "$WORK/acked"
  python3 - "$WORK" <<'EOF'
import json, os, sys
work = sys.argv[1]
with open(os.path.join(work, "attempted"), "a") as f:
    for k in json.load(open(os.path.join(work, "list.json"))):
        name = k["path"].rsplit("/", 1)[1]
        for v in k["versions"]:
            if v.get("fingerprint"):
                f.write(f"write {name} {v['fingerprint']}\n")
EOF
  printf '.'
done
echo
"$KEYFS" audit --store "$WORK/store" --verify
echo "crash loop: $ITER iterations x $WORKERS workers, kill -9 at random moments: every key whole, every acknowledged change present, check and audit chain clean"
