#!/usr/bin/env bash
# Emulates Acra v1's key writer against `keyfs mount --layout=acra-v1` and
# checks the result (SPEC §5). Acra's filesystem keystore rotates a key file by
#   1. writing the new key to a temporary file next to it,
#   2. hard-linking the current file to <file>.old/<UTC timestamp>
#      (Go layout 2006-01-02T15:04:05.999999999, no zone),
#   3. renaming the temporary file over the current one,
# which must leave exactly one archived version (the old key) and the new
# current key. Needs root and /dev/fuse. Usage: scripts/acra-v1-writer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KEYFS="${KEYFS_BIN:-}"
if [ -z "$KEYFS" ]; then
  cargo build --quiet
  KEYFS="$PWD/target/debug/keyfs"
fi
W="$(mktemp -d "${TMPDIR:-/tmp}/keyfs-acra.XXXXXX")"
M="$W/keys"
cleanup() {
  "$KEYFS" umount "$M" 2>/dev/null || umount -l "$M" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
fail() { echo "acra-v1-writer: FAIL: $*" >&2; exit 1; }
mkdir -p "$M"
"$KEYFS" init "$W/store" --generate-master-key "$W/mk" 2>/dev/null
export KEYFS_MASTER_KEY
KEYFS_MASTER_KEY="$(cat "$W/mk")"
"$KEYFS" generate --store "$W/store" --client-id alice01 >/dev/null
"$KEYFS" generate --store "$W/store" --global >/dev/null
"$KEYFS" mount --layout=acra-v1 "$W/store" "$M" 2>"$W/daemon.log" &
DAEMON=$!
for _ in $(seq 1 200); do grep -q " $M " /proc/mounts && break; sleep 0.05; done
grep -q " $M " /proc/mounts || { cat "$W/daemon.log" >&2; fail "mount did not come up"; }

# The keystore looks like Acra's v1 .acrakeys directory.
[ "$(stat -c %a "$M")" = 700 ] || fail "keystore directory is $(stat -c %a "$M"), Acra requires 0700"
for f in alice01_storage alice01_storage.pub alice01_storage_sym alice01_hmac .poison_key/poison_key .poison_key/poison_key.pub .poison_key/poison_key_sym secure_log_key; do
  [ -f "$M/$f" ] || fail "missing $f"
done
openssl pkey -in "$M/alice01_storage" -noout || fail "alice01_storage is not a private key"

acra_write() { # acra_write FILE CONTENT-FILE — Acra's WriteFile for an existing or new key
  local file="$1" src="$2" tmp ts
  tmp="$M/$(basename "$file")$RANDOM$RANDOM"           # ioutil.TempFile(dir, base)
  cp "$src" "$tmp"
  if [ -e "$file" ]; then
    mkdir -p "$file.old"                                  # os.MkdirAll(<file>.old)
    ts="$(date -u +%Y-%m-%dT%H:%M:%S.%N | sed 's/0*$//; s/\.$//')"
    ln "$file" "$file.old/$ts"                            # backup by hard link
  fi
  mv -f "$tmp" "$file"                                    # atomic replace
}

old="$W/old.key"; new="$W/new.key"
cp "$M/alice01_storage_sym" "$old"
head -c 32 /dev/urandom > "$new"
acra_write "$M/alice01_storage_sym" "$new"
cmp -s "$new" "$M/alice01_storage_sym" || fail "current key is not the new key"
n=$(find "$M/alice01_storage_sym.old" -type f | wc -l)
[ "$n" = 1 ] || fail "expected exactly one archived version, found $n: $(ls "$M/alice01_storage_sym.old")"
cmp -s "$old" "$M/alice01_storage_sym.old/"* || fail "the archived version is not the old key"
ls "$M" | grep -q '[0-9]\{6\}' && fail "Acra's temporary file was left behind: $(ls "$M")"

# A second rotation adds exactly one more archived version.
head -c 32 /dev/urandom > "$W/third.key"
acra_write "$M/alice01_storage_sym" "$W/third.key"
n=$(find "$M/alice01_storage_sym.old" -type f | wc -l)
[ "$n" = 2 ] || fail "expected two archived versions after two rotations, found $n"
cmp -s "$W/third.key" "$M/alice01_storage_sym" || fail "current key is not the third key"

# A new client's key, written the same way (no current file, so no link).
head -c 32 /dev/urandom > "$W/carol.key"
acra_write "$M/carol03_hmac" "$W/carol.key"
cmp -s "$W/carol.key" "$M/carol03_hmac" || fail "new client's key was not stored"
[ ! -e "$M/carol03_hmac.old" ] || [ -z "$(ls "$M/carol03_hmac.old")" ] || fail "a new key has history"

# The same keys through the tree layout (the daemon releases the store when it exits).
"$KEYFS" umount "$M"
wait "$DAEMON" 2>/dev/null || true
"$KEYFS" list --store "$W/store" clients/alice01 --versions --json > "$W/list.json"
python3 - "$W/list.json" <<'PY'
import json, sys
keys = {k["path"]: k for k in json.load(open(sys.argv[1]))}
v = keys["clients/alice01/storage_sym"]["versions"]
states = sorted(x["state"] for x in v)
assert states == ["archived", "archived", "current"], states
PY
"$KEYFS" check --store "$W/store" >/dev/null || fail "keyfs check reports problems"
echo "acra-v1-writer: ok — Acra's write sequence (temp file, hard link into <file>.old/<ts>, rename over) leaves exactly one archived version per rotation and the new current key"
