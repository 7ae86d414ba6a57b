#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
