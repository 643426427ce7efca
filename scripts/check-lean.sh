#!/usr/bin/env bash
# The library stays lean: an app that takes crsync with only the SSE client
# (`default-features = false, features = ["sse"]`) must not pull in the
# server's or the command line's dependencies. Prints the package count.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tree=$(cargo tree -p crsync --no-default-features --features sse -e normal --prefix none --offline 2>/dev/null \
    || cargo tree -p crsync --no-default-features --features sse -e normal --prefix none)
packages=$(printf '%s\n' "$tree" | sed 's/ (\*)//; s/ (proc-macro)//' | sort -u)
forbidden='^(axum|axum-core|toml|clap|clap_builder|indicatif|tracing-subscriber|crsync-node-server|eventsource-client|tokio-tungstenite|nostr|secp256k1) |^hyper v0\.'
if crept=$(printf '%s\n' "$packages" | grep -E "$forbidden"); then
    echo "error: the minimal crsync (features = [\"sse\"]) depends on server or CLI crates:" >&2
    printf '%s\n' "$crept" >&2
    exit 1
fi
echo "crsync with features = [\"sse\"]: $(printf '%s\n' "$packages" | wc -l) packages (none of the server's or CLI's)"
