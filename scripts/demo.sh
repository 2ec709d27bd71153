#!/usr/bin/env bash
# scripts/demo.sh — set everything up and run keyfs: a mounted keystore on the
# embedded sled backend with sample clients, in the foreground until Ctrl-C.
#
# Usage: scripts/demo.sh [MOUNT OPTION...]      e.g. scripts/demo.sh --cache -v
#
# Environment:
#   KEYFS_DEMO_DIR     where the demo lives (default /tmp/keyfs-demo):
#                      master.key (0600), store/ (sled), mnt/ (the mountpoint)
#   KEYFS_DEMO_RESET=1 delete an existing demo store and start afresh
#   KEYFS_BIN=PATH     use this keyfs binary instead of building one
#
# The store and its master key are kept between runs: a second run mounts the
# same inventory again (with whatever you changed in it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"

say() { printf '[demo] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

DIR="${KEYFS_DEMO_DIR:-/tmp/keyfs-demo}"
STORE="$DIR/store"
MNT="$DIR/mnt"
KEY="$DIR/master.key"

is_mounted() {
    awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts
}

unmount_if_mounted() {
    if is_mounted "$MNT"; then
        "$KEYFS" umount "$MNT" 2>/dev/null ||
            fusermount3 -u "$MNT" 2>/dev/null ||
            umount -l "$MNT" 2>/dev/null ||
            fusermount3 -u -z "$MNT" 2>/dev/null ||
            say "could not unmount $MNT"
    fi
}

keyfs_install_deps

if [ -n "${KEYFS_BIN:-}" ]; then
    KEYFS="$KEYFS_BIN"
else
    say "building keyfs (release)"
    cargo build --release --quiet
    KEYFS="${CARGO_TARGET_DIR:-$ROOT/target}/release/keyfs"
fi
[ -x "$KEYFS" ] || die "no binary at $KEYFS after the build"

mkdir -p "$DIR"
chmod 0700 "$DIR"

# A mount left over from an earlier demo that did not end cleanly.
if is_mounted "$MNT"; then
    say "unmounting a leftover mount on $MNT"
    unmount_if_mounted
fi

if [ "${KEYFS_DEMO_RESET:-0}" = 1 ] && [ -e "$STORE" ]; then
    say "KEYFS_DEMO_RESET=1: removing $STORE and $KEY"
    rm -rf "$STORE" "$KEY"
fi

if [ -d "$STORE" ]; then
    [ -f "$KEY" ] || die "$STORE exists but $KEY does not; rerun with KEYFS_DEMO_RESET=1 or another KEYFS_DEMO_DIR"
    say "reusing the store at $STORE"
else
    say "creating the store $STORE with a new master key in $KEY"
    "$KEYFS" init "$STORE" --generate-master-key "$KEY"
    for client in alice01 bob02; do
        say "generating the default key set of client $client"
        "$KEYFS" --master-key-file "$KEY" generate --store "$STORE" --client-id "$client"
    done
    say "generating the global keys (poison records, audit log)"
    "$KEYFS" --master-key-file "$KEY" generate --store "$STORE" --global
fi

mkdir -p "$MNT"

cat <<EOF

================================================================================
 keyfs demo: the store $STORE is mounted on
   $MNT
 In another terminal, try:

   ls -l $MNT/clients/alice01
   cat $MNT/clients/alice01/storage.pub
   openssl pkey -in $MNT/clients/alice01/storage -noout -text

   # rotate: copy new material over a key; the old one is archived
   head -c 32 /dev/urandom > /tmp/new.key
   cp /tmp/new.key $MNT/clients/alice01/storage_sym
   ls -l $MNT/clients/alice01/storage_sym.old/

   getfattr -d $MNT/clients/alice01/storage    # kind, version, fingerprint
   rm $MNT/clients/bob02/hmac                  # destroy a key
   mkdir $MNT/clients/carol03 && ls -l $MNT/clients/carol03   # new client
   ls -l $MNT/poison $MNT/audit
   cat $MNT/.keyfs/status
   cat $MNT/.keyfs/audit                       # who did what

   $KEYFS list $MNT

 Press Ctrl-C here to unmount and stop.
================================================================================

EOF

# Unmount on the way out even if the daemon died without doing it.
trap 'unmount_if_mounted' EXIT

say "mounting (foreground)"
"$KEYFS" --master-key-file "$KEY" mount "$STORE" "$MNT" "$@"
