#!/usr/bin/env bash
# Install nostr-rs-relay (the Nostr relay the relay-transport tests and benchmark run as a
# child process) from crates.io into a cache directory outside the work tree:
#   ${XDG_DATA_HOME:-~/.local/share}/crsync/nostr-rs-relay/bin/nostr-rs-relay
# and print that path on stdout.
#
# usage: install.sh [ROOT]   (default ROOT: the cache directory above)
#
# Idempotent: if ROOT/bin/nostr-rs-relay exists and reports the pinned version, nothing is
# built (a check takes milliseconds). Otherwise `cargo install --locked` builds it (about
# 6.5 minutes on 2 cores, niced); its build needs `protoc` (Debian's protobuf-compiler),
# which setup.sh installs when missing. Set NOSTR_RS_RELAY_FORCE=1 to rebuild anyway.
set -euo pipefail

VERSION=0.8.12
log() { printf '[nostr-rs-relay] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ROOT=${1:-${XDG_DATA_HOME:-$HOME/.local/share}/crsync/nostr-rs-relay}
BIN="$ROOT/bin/nostr-rs-relay"

installed_version() {
  # clap prints "nostr-rs-relay 0.8.12"
  "$BIN" --version 2>/dev/null | awk '{print $2}'
}

if [ "${NOSTR_RS_RELAY_FORCE:-0}" != 1 ] && [ -x "$BIN" ] && [ "$(installed_version)" = "$VERSION" ]; then
  log "up to date: $BIN"
  printf '%s\n' "$BIN"
  exit 0
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found"
command -v protoc >/dev/null 2>&1 || die "protoc not found (Debian: protobuf-compiler)"
log "building nostr-rs-relay $VERSION into $ROOT (a few minutes)"
(
  # Keep caller flags (e.g. RUSTFLAGS=-D warnings in CI) from breaking this third-party build.
  unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR
  export RUSTFLAGS="--cap-lints allow"
  nice -n 10 cargo install --locked --force nostr-rs-relay --version "$VERSION" --root "$ROOT"
) >&2 || die "cargo install failed"
[ "$(installed_version)" = "$VERSION" ] || die "$BIN does not report version $VERSION"
log "installed: $BIN"
printf '%s\n' "$BIN"
