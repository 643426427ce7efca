#!/usr/bin/env bash
# Installs what crsync needs to build and run, idempotently:
#   - Debian packages for the cr-sqlite build (C compiler, patch, node + npm for `npm pack`)
#   - the cr-sqlite extension, built from the npm source into .crsqlite/crsqlite.so,
#     and copied to the user's data directory (where an installed or release-built
#     crsync looks: ${XDG_DATA_HOME:-~/.local/share}/crsync/crsqlite.so)
#   - Debian's headless-capable Chromium, for the status page's browser test
#   - nostr-rs-relay 0.8.12, the Nostr relay the relay-transport tests and benchmark
#     run, built from crates.io (with Debian's protobuf-compiler, only when it must
#     be built) into ${XDG_DATA_HOME:-~/.local/share}/crsync/nostr-rs-relay/bin/
#     (scripts/nostr-rs-relay/install.sh; tests find it there or at $CRSYNC_NOSTR_RS_RELAY)
# A second run with nothing changed takes well under a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v patch >/dev/null 2>&1 || missing+=(patch)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
NOSTR_RS_RELAY_INSTALL="$ROOT/scripts/nostr-rs-relay/install.sh"
if ! bash "$NOSTR_RS_RELAY_INSTALL" --check; then
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install a stable Rust toolchain (https://rustup.rs) and re-run"
  exit 1
fi

bash "$ROOT/scripts/crsqlite/build-crsqlite.sh" "$ROOT/.crsqlite"
DATA_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/crsync"
if ! cmp -s "$ROOT/.crsqlite/crsqlite.so" "$DATA_DIR/crsqlite.so" 2>/dev/null; then
  mkdir -p "$DATA_DIR"
  cp "$ROOT/.crsqlite/crsqlite.so" "$DATA_DIR/crsqlite.so.tmp"
  mv "$DATA_DIR/crsqlite.so.tmp" "$DATA_DIR/crsqlite.so"
  log "installed cr-sqlite at $DATA_DIR/crsqlite.so"
fi
bash "$NOSTR_RS_RELAY_INSTALL" >/dev/null
