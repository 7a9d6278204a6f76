#!/usr/bin/env python3
"""AMQP -> transform -> PostgreSQL batched insert: Sluice's flow (bench/flows/amqp-pg.yaml)
against the hand-written lapin + tokio-postgres program (bench/amqp-pg), alternated over rounds.

Each run gets a fresh durable queue loaded with COUNT orders of about 1 KiB and a fresh table;
the contender starts, and the clock stops when the table holds COUNT rows. Rate = rows / seconds
from the contender's start (both pay their connection setup). Writes bench/results/amqp-pg.md and
.json with the medians and the ratio. Needs RabbitMQ and PostgreSQL on loopback
(scripts/services.sh); called by `bench/run.sh amqp-pg`, which builds both programs first."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SLUICE = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "sluice"
LIMIT = BENCH / "amqp-pg" / "target" / "release" / "sluice-bench-amqp-pg"
PSQL = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qtAc"]
TIMEOUT = 300


def psql(sql):
    return subprocess.run(PSQL + [sql], check=True, capture_output=True, text=True).stdout.strip()


def run_once(contender, count, round_no, workdir):
    queue = f"bench_amqp_pg_{os.getpid()}_{round_no}_{contender}"
    table = queue
    psql(f"drop table if exists {table}; create table {table} "
         "(id bigint primary key, customer text not null, total float8 not null, payload jsonb not null)")
    subprocess.run([str(LIMIT), "publish", queue, str(count)], check=True)
    env = dict(os.environ, SLUICE_BENCH_QUEUE=queue, SLUICE_BENCH_TABLE=table, SLUICE_LOG="warn")
    if contender == "sluice":
        cmd = [str(SLUICE), "run", str(BENCH / "flows" / "amqp-pg.yaml"),
               "--data", str(workdir / f"data-{round_no}")]
    else:
        cmd = [str(LIMIT), "limit", queue, table, str(count)]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"{contender}-{round_no}.log", "w"))
    try:
        while True:
            rows = int(psql(f"select count(*) from {table}"))
            if rows >= count:
                break
            if time.monotonic() - began > TIMEOUT:
                raise SystemExit(f"{contender}: only {rows} of {count} rows after {TIMEOUT}s")
            # The count may have been read just before the contender's last commit: count again
            # once it has exited before calling the run short.
            if proc.poll() is not None and int(psql(f"select count(*) from {table}")) < count:
                raise SystemExit(f"{contender} exited with {proc.returncode} after {rows} rows; "
                                 f"see {workdir}/{contender}-{round_no}.log")
            time.sleep(0.02)
        seconds = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    total = float(psql(f"select sum(total) from {table}"))
    psql(f"drop table {table}")
    subprocess.run(["rabbitmqctl", "-q", "delete_queue", queue], capture_output=True)
    return {"rows": count, "seconds": seconds, "rate": count / seconds, "sum_total": total}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=50_000)
    args = p.parse_args()
    results = {"limit": [], "sluice": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            # Alternate who goes first so drift on the machine favours neither.
            order = ["limit", "sluice"] if r % 2 == 0 else ["sluice", "limit"]
            for c in order:
                res = run_once(c, args.count, r, Path(tmp))
                results[c].append(res)
                print(f"round {r + 1} {c}: {res['rate']:.0f} rows/s ({res['seconds']:.2f}s)",
                      file=sys.stderr)
    sums = {c: {round(x["sum_total"], 3) for x in v} for c, v in results.items()}
    assert sums["limit"] == sums["sluice"], f"the contenders computed different totals: {sums}"
    med = {c: statistics.median(x["rate"] for x in v) for c, v in results.items()}
    ratio = med["sluice"] / med["limit"]
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / "amqp-pg.json").write_text(json.dumps(
        {"count": args.count, "rounds": args.rounds, "runs": results, "median_rate": med,
         "ratio_sluice_to_limit": ratio}, indent=2))
    def runs(c):
        return ", ".join("%.0f" % x["rate"] for x in results[c])
    table = ("| contender | median rows/s | runs |\n|---|---|---|\n" +
             "".join(f"| {c} | {med[c]:.0f} | {runs(c)} |\n" for c in ("limit", "sluice")) +
             f"\nSluice / limit: **{ratio:.2f}x** ({args.count} messages of ~1 KiB per run, "
             f"{args.rounds} rounds, alternated)\n")
    (out / "amqp-pg.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
