#!/usr/bin/env bash
# The whole test suite: set-up, format check, clippy (warnings are errors), all tests.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
# The nostr-rs-relay the relay tests start (installed by setup.sh).
CRSYNC_NOSTR_RS_RELAY=${CRSYNC_NOSTR_RS_RELAY:-$(bash scripts/nostr-rs-relay/install.sh 2>/dev/null)}
export CRSYNC_NOSTR_RS_RELAY
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
bash scripts/check-lean.sh
cargo test --workspace --all-targets
cargo test --workspace --doc
