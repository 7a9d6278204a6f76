#!/usr/bin/env bash
# The test command from the README: every unit, behaviour and snapshot test, then the flow tests
# of every example, run by Sluice itself. Fails on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked
cargo run --quiet --locked -p sluice -- validate examples/
cargo run --quiet --locked -p sluice -- test examples/
