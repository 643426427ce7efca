#!/usr/bin/env bash
# The demo: installs what it needs, then runs two peers syncing through a local server.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo run --release --quiet --example demo -- "$@"
