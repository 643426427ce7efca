#!/usr/bin/env bash
# The whole test suite: set-up, format check, clippy (warnings are errors), all tests.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
bash scripts/check-lean.sh
cargo test --workspace --all-targets
cargo test --workspace --doc
