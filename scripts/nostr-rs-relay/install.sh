#!/usr/bin/env bash
# Install nostr-rs-relay (the Nostr relay the relay-transport tests and benchmark run as a
# child process) from crates.io into a cache directory outside the work tree:
#   ${XDG_DATA_HOME:-~/.local/share}/crsync/nostr-rs-relay/bin/nostr-rs-relay
# and print that path on stdout.
#
# usage: install.sh [--check] [ROOT]   (default ROOT: the cache directory above)
#   --check: only tell (exit status 0 or 1) whether it is installed and up to date
#
# Idempotent: if ROOT/bin/nostr-rs-relay exists and reports the pinned version, nothing is
# built (a check takes milliseconds). Otherwise `cargo install` builds it (about
# 6.5 minutes on 2 cores, niced); its build needs `protoc` (Debian's protobuf-compiler),
# which setup.sh installs when missing. Set NOSTR_RS_RELAY_FORCE=1 to rebuild anyway.
#
# Not `--locked`: the crate's own Cargo.lock pins time 0.3.25, which no longer compiles
# on current Rust (E0282 in format_description); without it cargo picks the newest
# semver-compatible versions. The build directory is kept under ROOT until a build
# succeeds, so an interrupted build resumes where it stopped.
set -euo pipefail

VERSION=0.8.12
log() { printf '[nostr-rs-relay] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

CHECK=0
if [ "${1:-}" = --check ]; then CHECK=1; shift; fi
ROOT=${1:-${XDG_DATA_HOME:-$HOME/.local/share}/crsync/nostr-rs-relay}
BIN="$ROOT/bin/nostr-rs-relay"

installed_version() {
  # clap prints "nostr-rs-relay 0.8.12"
  "$BIN" --version 2>/dev/null | awk '{print $2}'
}

if [ "${NOSTR_RS_RELAY_FORCE:-0}" != 1 ] && [ -x "$BIN" ] && [ "$(installed_version)" = "$VERSION" ]; then
  [ "$CHECK" = 1 ] && exit 0
  log "up to date: $BIN"
  printf '%s\n' "$BIN"
  exit 0
fi
[ "$CHECK" = 1 ] && exit 1

command -v cargo >/dev/null 2>&1 || die "cargo not found"
command -v protoc >/dev/null 2>&1 || die "protoc not found (Debian: protobuf-compiler)"
log "building nostr-rs-relay $VERSION into $ROOT (a few minutes)"
(
  # Keep caller flags (e.g. RUSTFLAGS=-D warnings in CI) from breaking this third-party build.
  unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
  export RUSTFLAGS="--cap-lints allow"
  export CARGO_TARGET_DIR="$ROOT/build"
  nice -n 10 cargo install --force nostr-rs-relay --version "$VERSION" --root "$ROOT"
) >&2 || die "cargo install failed (build directory kept: $ROOT/build)"
rm -rf "$ROOT/build"
[ "$(installed_version)" = "$VERSION" ] || die "$BIN does not report version $VERSION"
log "installed: $BIN"
printf '%s\n' "$BIN"
