#!/usr/bin/env bash
# The test command from the README: every unit, behaviour and snapshot test, then the flow tests
# of every example folder (each folder is one project), run by Sluice itself. Fails on any
# failure.
#
#   scripts/test.sh              hermetic: connector tests whose service is not running skip with
#                                a line naming it
#   scripts/test.sh --services   the full run (CI): starts every broker and database on loopback
#                                first (scripts/services.sh, installing from Debian's packages if
#                                needed), and an unreachable service fails its tests (SLUICE_IT=1)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--services" ]; then
  scripts/services.sh
  export SLUICE_IT=1
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/test.sh [--services]" >&2
  exit 2
fi

cargo test --workspace --locked
# The benchmark flows must stay valid too (their listen port and output path come from the env).
SLUICE_BENCH_PORT=18080 SLUICE_BENCH_OUT=bench-out.jsonl SLUICE_BENCH_QUEUE=q SLUICE_BENCH_TABLE=t cargo run --quiet --locked -p sluice -- validate bench/flows/
for dir in examples examples/eip examples/connectors; do
  cargo run --quiet --locked -p sluice -- validate "$dir/"
  cargo run --quiet --locked -p sluice -- test "$dir/"
done
