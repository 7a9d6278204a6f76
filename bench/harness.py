#!/usr/bin/env python3
"""Runs one benchmark workload against every contender, alternating them over several rounds,
and writes a markdown table and JSON of medians and ratios. Called by bench/run.sh, which builds
the binaries first. Standard library only; loopback only; every run bounded in time."""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SLUICE = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "sluice"
LIMIT = BENCH / "limit" / "target" / "release" / "sluice-bench-limit"
NODE_RED = BENCH / "node_modules" / "node-red" / "red.js"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Contender:
    """One program under test, started fresh for each round."""

    def __init__(self, name, workload, workdir):
        self.name, self.workload, self.workdir = name, workload, workdir
        self.port = free_port()
        self.out = workdir / f"{name}.jsonl"
        self.proc = None

    def command(self):
        env = {"SLUICE_BENCH_PORT": str(self.port), "SLUICE_BENCH_OUT": str(self.out)}
        if self.name == "sluice":
            flow = BENCH / "flows" / f"{self.workload}.yaml"
            data = self.workdir / f"data-{self.port}"
            return ([str(SLUICE), "run", str(flow), "--data", str(data)],
                    {**env, "SLUICE_LOG": "warn"})
        if self.name == "limit":
            args = [str(LIMIT), str(self.port)]
            if self.workload == "w2":
                args.append(str(self.out))
            return args, env
        user_dir = self.workdir / "node-red"
        user_dir.mkdir(exist_ok=True)
        flows = (BENCH / "node-red" / "flows.json").read_text()
        # The file node gets the literal path: typed filename inputs vary across Node-RED versions.
        flows = flows.replace('"SLUICE_BENCH_OUT"', json.dumps(str(self.out)))
        flows = flows.replace('"filenameType": "env"', '"filenameType": "str"')
        (user_dir / "flows.json").write_text(flows)
        shutil.copy(BENCH / "node-red" / "settings.js", user_dir / "settings.js")
        return ["node", str(NODE_RED), "--userDir", str(user_dir),
                "--settings", str(user_dir / "settings.js")], env

    def start(self):
        args, env = self.command()
        self.out.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, env={**os.environ, **env}, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def url(self):
        return f"http://127.0.0.1:{self.port}/{self.workload}"

    def wait_ready(self, body, timeout=60.0):
        """Polls with a real request until one succeeds (200, or 202 for W3); returns seconds
        since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                req = urllib.request.Request(self.url(), data=body,
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=1) as resp:
                    if resp.status in (200, 202):
                        return time.monotonic() - self.started
            except OSError:
                time.sleep(0.002)
        raise SystemExit(f"{self.name} did not answer on {self.url()} within {timeout}s")

    def proc_status(self, field):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wrk(url, seconds, connections):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
         "-s", str(BENCH / "post.lua"), url],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 30,
        env={**os.environ, "SLUICE_BENCH_BODY": str(BENCH / "order.json")})
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise SystemExit(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")


def count_lines(path):
    return sum(1 for _ in path.open()) if path.exists() else 0


def load_round(c, args, body):
    c.start()
    try:
        c.wait_ready(body)
        wrk(c.url(), 2, args.connections)  # warm-up, not recorded
        cpu0 = c.cpu_seconds()
        r = wrk(c.url(), args.duration, args.connections)
        cpu = c.cpu_seconds() - cpu0
        peak = c.proc_status("VmHWM")
        if c.workload == "w3":
            # Every 202 means the message is on disk; let the archive flow catch up before the
            # file is counted below.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and count_lines(c.out) < r["requests"]:
                time.sleep(0.2)
    finally:
        c.stop()
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["status_errors"] + r["timeouts"]
    result = {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "p999_ms": r["p999_us"] / 1000,
        "peak_rss_mb": peak / 2**20, "cpu_s": cpu,
        # Requests per CPU-second of the contender: what each request costs, less sensitive than
        # throughput to whatever else the machine is doing.
        "req_per_cpu_s": r["requests"] / cpu if cpu > 0 else 0.0,
        "errors": errors, "requests": r["requests"],
    }
    if c.workload in ("w2", "w3"):
        lines = count_lines(c.out)
        # Every answered request of the measured run and the warm-up must be on file.
        if lines < r["requests"]:
            raise SystemExit(f"{c.name}: {lines} lines on file for {r['requests']} answered requests")
        result["lines_on_file"] = lines
    return result


def startup_round(c, body):
    c.start()
    try:
        seconds = c.wait_ready(body)
        time.sleep(1.0)
        idle = c.proc_status("VmRSS")
    finally:
        c.stop()
    return {"startup_ms": seconds * 1000, "idle_rss_mb": idle / 2**20}


def twenty_flows(workdir):
    """20 flows on one listener for the startup workload; the first answers /w1."""
    text = ["flows:"]
    for i in range(20):
        path = "/w1" if i == 0 else f"/flow{i}"
        text += [f"  - name: flow{i}",
                 "    from:",
                 f"      http: {{ listen: \"127.0.0.1:${{env:SLUICE_BENCH_PORT}}\", path: {path}, methods: [POST] }}",
                 "    steps:",
                 "      - transform: '. + {processed: true, n: %d}'" % i]
    path = workdir / "startup.yaml"
    path.write_text("\n".join(text) + "\n")
    return path


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["w1", "w2", "w3", "startup"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10, help="seconds of measured load per run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--contenders", default="sluice,limit,node-red")
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args()
    body = (BENCH / "order.json").read_bytes()
    names = args.contenders.split(",")
    if args.workload == "w3" and names != ["sluice"]:
        # Neither Node-RED nor the hand-written program has a durable queue to compare with.
        names = ["sluice"]
    results = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        for rnd in range(args.rounds):
            for name in names:  # A B C, A B C, ...: drift on the machine hits every contender
                c = Contender(name, "w1" if args.workload == "startup" else args.workload, workdir)
                if args.workload == "startup":
                    if name == "sluice":
                        flows = twenty_flows(workdir)
                        c.command = (lambda c=c, f=flows: (
                            [str(SLUICE), "run", str(f)],
                            {"SLUICE_BENCH_PORT": str(c.port), "SLUICE_LOG": "warn"}))
                    r = startup_round(c, body)
                else:
                    r = load_round(c, args, body)
                results[name].append(r)
                print(f"round {rnd + 1} {name}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    report(args, names, results)


def report(args, names, results):
    keys = list(results[names[0]][0].keys())
    med = {n: {k: median(results[n], k) for k in keys} for n in names}
    lines = [f"Workload `{args.workload}`: {args.rounds} rounds, contenders alternating; medians."]
    if args.workload != "startup":
        lines[0] += f" wrk -t1 -c{args.connections} -d{args.duration}s, body bench/order.json."
    lines += ["", "| contender | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{med[n][k]:.2f}" for k in keys) + " |")
    if "sluice" in names and args.workload != "startup":
        lines.append("")
        for other in names:
            if other != "sluice":
                ratio = med["sluice"]["rps"] / med[other]["rps"]
                per_cpu = med["sluice"]["req_per_cpu_s"] / med[other]["req_per_cpu_s"]
                lines.append(f"- sluice / {other}: throughput **{ratio:.2f}x**, requests per CPU-second **{per_cpu:.2f}x**")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.workload}.md").write_text(text)
    (out / f"{args.workload}.json").write_text(json.dumps(
        {"workload": args.workload, "rounds": args.rounds, "duration_s": args.duration,
         "connections": args.connections, "runs": results, "medians": med}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
