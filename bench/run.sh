#!/usr/bin/env bash
# Benchmarks, one entry point:  bench/run.sh w1|w2|w3|startup|amqp-pg|all [harness options]
#   e.g. bench/run.sh w1 --rounds 5 --duration 15
# Builds Sluice and the hand-written limit in release mode, installs Node-RED 4 and wrk when
# missing, then runs bench/harness.py, which alternates the contenders and writes
# bench/results/<workload>.md and .json. Loopback only. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
workload="${1:?usage: bench/run.sh w1|w2|w3|startup|amqp-pg|all [--rounds N] [--duration S] [--contenders a,b]}"
shift

if [ "$workload" = amqp-pg ]; then
  # AMQP -> transform -> PostgreSQL: needs RabbitMQ and PostgreSQL on loopback.
  scripts/services.sh >/dev/null
  echo "== building sluice and the hand-written lapin + tokio-postgres program (release)"
  cargo build --release --locked -p sluice
  (cd bench/amqp-pg && CARGO_TARGET_DIR=target cargo build --release --locked)
  exec python3 bench/amqp_pg.py "$@"
fi

if ! command -v wrk >/dev/null; then
  echo "== installing wrk (Debian package)"
  apt-get install -y wrk >/dev/null
fi
if [ ! -f bench/node_modules/node-red/red.js ]; then
  echo "== installing Node-RED 4 into bench/node_modules (Node-RED 5 needs Node 22)"
  npm install --prefix bench --no-audit --no-fund --no-save node-red@4 >/dev/null
fi
echo "== building sluice and the limit (release)"
cargo build --release --locked -p sluice
(cd bench/limit && CARGO_TARGET_DIR=target cargo build --release --locked)

if [ "$workload" = all ]; then
  for w in w1 w2 w3 startup; do python3 bench/harness.py "$w" "$@"; done
else
  python3 bench/harness.py "$workload" "$@"
fi
