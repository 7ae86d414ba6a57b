#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
# The test suite is built once, with the fail points compiled in (the `failpoints` feature of
# every crate that has one): the crash tests at fail points (tests/failpoints.rs,
# fuse-lazypull/tests/cache_failpoints.rs) run beside the others. Clippy checks the same build,
# and the one file whose code differs without the feature.
cargo clippy --workspace --all-targets --features failpoints -- -D warnings
cargo clippy -p failpoint --all-targets -- -D warnings
cargo test --workspace --features failpoints
