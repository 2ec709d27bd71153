#!/usr/bin/env bash
# scripts/setup.sh — shared setup for the keyfs scripts.
#
# Source it to get the functions (scripts/test.sh, scripts/demo.sh and
# scripts/pjdfstest.sh do):
#
#   source scripts/setup.sh
#   keyfs_install_deps        # Debian packages, /dev/fuse, cargo on PATH
#   keyfs_install_pjdfstest   # the POSIX test suite (crate pjdfstest)
#
# or run it directly (`scripts/setup.sh`) to install everything the test
# suite needs. Installs are idempotent: apt is skipped when every needed
# command is already present, and pjdfstest when it is already installed.
#
# Meant for Debian 12 as root (falls back to sudo when not root).

# Pinned version of the pjdfstest crate (the Rust rewrite of the POSIX file
# system test suite). 0.2.2 builds with `cargo install --locked` on Rust 1.85+
# and needs no C library.
KEYFS_PJDFSTEST_VERSION="${KEYFS_PJDFSTEST_VERSION:-0.2.2}"

# Command -> Debian package that provides it. Every command the scripts and
# the test suite call that is not part of a minimal Debian install.
KEYFS_DEPS=(
    "fusermount3:fuse3"    # FUSE mount helper; unmount of user mounts
    "openssl:openssl"      # tests and demo parse PEM keys
    "rsync:rsync"          # backup/restore tests (rsync -a)
    "tar:tar"              # backup/restore tests (tar -cpf / -xpf)
    "getfattr:attr"        # xattr tests (user.keyfs.*)
    "setfattr:attr"
    "setpriv:util-linux"   # run commands as another uid (permission tests)
    "mountpoint:util-linux"
    "umount:mount"
    "pgrep:procps"         # find / stop daemons
    "pkill:procps"
    "ps:procps"
    "timeout:coreutils"
    "stat:coreutils"
    "mknod:coreutils"
    "modprobe:kmod"        # load the fuse module where /dev/fuse is missing
    "cc:gcc"               # -sys crates
    "pkg-config:pkg-config"
    "protoc:protobuf-compiler" # builds the etcd-client crate (prost/tonic protos)
    "etcd:etcd-server"     # distributed tests: 3-member etcd cluster on loopback
    "etcdctl:etcd-client"  # distributed tests: cluster health, raw reads of the store
)

keyfs_log() {
    printf '[keyfs-setup] %s\n' "$*" >&2
}

# Run a command as root (directly when we are root, else through sudo).
keyfs_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        keyfs_log "need root for: $*  (run this script as root)"
        return 1
    fi
}

# Make sure cargo (rustup's ~/.cargo/bin) is on PATH.
keyfs_ensure_cargo_path() {
    local cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
    case ":$PATH:" in
        *":$cargo_bin:"*) ;;
        *) [ -d "$cargo_bin" ] && PATH="$cargo_bin:$PATH" && export PATH ;;
    esac
    if ! command -v cargo >/dev/null 2>&1; then
        keyfs_log "cargo not found (looked on PATH and in $cargo_bin); install a Rust toolchain with rustup"
        return 1
    fi
}

# rustfmt and clippy are rustup components; add them if missing.
keyfs_ensure_rust_components() {
    keyfs_ensure_cargo_path || return 1
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ "${#missing[@]}" -gt 0 ]; then
        keyfs_log "adding rustup components: ${missing[*]}"
        rustup component add "${missing[@]}" || {
            keyfs_log "could not add ${missing[*]} with rustup"
            return 1
        }
    fi
}

# Install the Debian packages behind KEYFS_DEPS when a command is missing.
keyfs_install_apt_deps() {
    local pkgs=() entry cmd pkg
    for entry in "${KEYFS_DEPS[@]}"; do
        cmd="${entry%%:*}"
        pkg="${entry#*:}"
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
            case " ${pkgs[*]-} " in
                *" $pkg "*) ;;
                *) pkgs+=("$pkg") ;;
            esac
        fi
    done
    if [ "${#pkgs[@]}" -eq 0 ]; then
        keyfs_log "system packages: all present"
        return 0
    fi
    keyfs_log "installing Debian packages: ${pkgs[*]}"
    # A new machine's package lists may be empty: always update first.
    keyfs_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || {
        keyfs_log "apt-get update failed"
        return 1
    }
    keyfs_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -o Dpkg::Use-Pty=0 "${pkgs[@]}" >/dev/null || {
        keyfs_log "apt-get install ${pkgs[*]} failed"
        return 1
    }
    for entry in "${KEYFS_DEPS[@]}"; do
        cmd="${entry%%:*}"
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
            keyfs_log "still missing after install: $cmd (package ${entry#*:})"
            return 1
        fi
    done
}

# /dev/fuse must exist and the kernel must know the fuse file system type.
keyfs_ensure_dev_fuse() {
    if ! grep -qw fuse /proc/filesystems 2>/dev/null; then
        keyfs_as_root modprobe fuse 2>/dev/null || true
    fi
    if [ ! -c /dev/fuse ]; then
        keyfs_as_root modprobe fuse 2>/dev/null || true
    fi
    if [ ! -c /dev/fuse ]; then
        keyfs_log "creating /dev/fuse (char 10:229)"
        keyfs_as_root mknod -m 0666 /dev/fuse c 10 229 || {
            keyfs_log "could not create /dev/fuse"
            return 1
        }
    fi
    if ! grep -qw fuse /proc/filesystems 2>/dev/null; then
        keyfs_log "the kernel has no FUSE support (no 'fuse' in /proc/filesystems, modprobe fuse failed)"
        return 1
    fi
}

# Everything the build, the tests and the demo need.
keyfs_install_deps() {
    keyfs_ensure_cargo_path || return 1
    keyfs_install_apt_deps || return 1
    keyfs_ensure_dev_fuse || return 1
    keyfs_ensure_rust_components || return 1
}

# The pjdfstest binary (crate pjdfstest, pinned). Skipped when the pinned
# version is already on PATH or in ~/.cargo/bin. Sets KEYFS_PJDFSTEST_BIN.
keyfs_install_pjdfstest() {
    keyfs_ensure_cargo_path || return 1
    local cand have
    for cand in "$(command -v pjdfstest 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest"; do
        if [ -z "$cand" ] || [ ! -x "$cand" ]; then
            continue
        fi
        have="$("$cand" --version 2>/dev/null | awk '{print $2}')"
        if [ "$have" = "$KEYFS_PJDFSTEST_VERSION" ]; then
            KEYFS_PJDFSTEST_BIN="$cand"
            export KEYFS_PJDFSTEST_BIN
            return 0
        fi
        keyfs_log "ignoring $cand (version ${have:-unknown}, want $KEYFS_PJDFSTEST_VERSION)"
    done
    keyfs_log "cargo install pjdfstest@$KEYFS_PJDFSTEST_VERSION (about a minute)"
    cargo install --quiet --locked pjdfstest --version "=$KEYFS_PJDFSTEST_VERSION" || {
        keyfs_log "cargo install pjdfstest failed"
        return 1
    }
    KEYFS_PJDFSTEST_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest"
    export KEYFS_PJDFSTEST_BIN
}

# Run directly: install what the test suite needs.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    keyfs_install_deps
    keyfs_install_pjdfstest
    keyfs_log "done"
fi
