#!/usr/bin/env bash
# The test command from the README: every unit, behaviour and snapshot test, then the flow tests
# of every example folder (each folder is one project), run by Sluice itself. Fails on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked
# The benchmark flows must stay valid too (their listen port and output path come from the env).
SLUICE_BENCH_PORT=18080 SLUICE_BENCH_OUT=bench-out.jsonl cargo run --quiet --locked -p sluice -- validate bench/flows/
for dir in examples examples/eip; do
  cargo run --quiet --locked -p sluice -- validate "$dir/"
  cargo run --quiet --locked -p sluice -- test "$dir/"
done
