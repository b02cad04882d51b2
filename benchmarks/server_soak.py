"""Soak test of the web server: resident memory over many requests to one real server process.

Starts ``globeflow serve`` (uvicorn on loopback) in a child process, sends ``--requests``
``POST /v1/locate`` requests from ``--concurrency`` parallel clients (the bundled example photos,
cycled; the default model and settings) and reads the server's resident set size (VmRSS) from
``/proc`` after every ``--every`` requests, once the server is idle again.

Baseline measured in the same run: the same server with ``GLOBEFLOW_MALLOC_TRIM=0``, i.e. without
giving freed heap memory back after each batch (the behaviour before the fix). Each ``--variant
NAME:K=V,...`` soaks one more server with that environment (e.g. ``MALLOC_ARENA_MAX=2``).

Usage: ``python benchmarks/server_soak.py [--requests 300] [--concurrency 8] [--out FILE]``.
Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _common import REPO, free_port, loadavg, start_server


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(args: argparse.Namespace, name: str, env: dict[str, str]) -> dict:
    """Run one server with ``env`` through the request loop; RSS trace and summary."""
    photos = sorted((REPO / "examples").glob("*.jpg"))
    payloads = [(p.name, p.read_bytes()) for p in photos]
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"globeflow-soak-{name}-{port}.log"
    cmd = [sys.executable, "-m", "globeflow.apps.cli"]
    cmd += ["--threads", str(args.threads), "serve"] if args.threads else ["serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = start_server(cmd, port, {**os.environ, **env}, log)
    url = f"http://127.0.0.1:{port}/v1/locate"
    params = {"num_samples": args.num_samples, "steps": args.steps}
    trace = [{"requests": 0, "rss_mb": round(rss_mb(proc.pid), 1), "busy_s": 0.0}]
    busy = 0.0  # seconds spent answering requests (the pauses before readings excluded)
    try:
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(args.concurrency) as pool:

            def one(i: int) -> int:
                fname, data = payloads[i % len(payloads)]
                r = client.post(url, params=params, files={"file": (fname, data, "image/jpeg")})
                return r.status_code

            for lo in range(0, args.requests, args.every):
                t0 = time.monotonic()
                codes = list(pool.map(one, range(lo, min(args.requests, lo + args.every))))
                busy += time.monotonic() - t0
                if any(c != 200 for c in codes):
                    raise RuntimeError(f"{name}: non-200 answers {sorted(set(codes))}")
                time.sleep(args.settle_s)  # the worker finishes its batch after the answer
                row = {
                    "requests": min(args.requests, lo + args.every),
                    "rss_mb": round(rss_mb(proc.pid), 1),
                    "busy_s": round(busy, 1),
                }
                trace.append(row)
                print(f"  {name}: {row}", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    after_warmup = [t["rss_mb"] for t in trace if t["requests"] >= args.warmup]
    median = statistics.median(after_warmup)
    return {
        "name": name,
        "env": env,
        "trace": trace,
        "rss_start_mb": trace[0]["rss_mb"],
        "rss_median_after_warmup_mb": median,
        "rss_max_after_warmup_mb": max(after_warmup),
        "growth_after_warmup_mb": round(after_warmup[-1] - after_warmup[0], 1),
        "above_start_mb": round(median - trace[0]["rss_mb"], 1),
        "seconds_per_request": round(busy / args.requests, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--every", type=int, default=25, help="requests between RSS readings")
    parser.add_argument("--warmup", type=int, default=50, help="requests before growth counts")
    parser.add_argument(
        "--settle-s", type=float, default=1.0, help="pause after each window, before reading"
    )
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the server (default: torch's)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME:K=V,K=V",
        help="server environment to soak (repeatable); default: baseline and fixed",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # A terminated benchmark must still stop its server (the finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = args.variant or ["before:GLOBEFLOW_MALLOC_TRIM=0", "after:"]
    runs = []
    load_before = loadavg()
    for spec in variants:
        name, _, pairs = spec.partition(":")
        env = dict(p.split("=", 1) for p in pairs.split(",") if p)
        runs.append(soak(args, name, env))
    report = {
        "benchmark": "server_soak",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "variant")},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "runs": runs,
    }
    print_table(runs)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def print_table(runs: list[dict]) -> None:
    steps = [t["requests"] for t in runs[0]["trace"]]
    print("| requests | " + " | ".join(f"{r['name']} RSS (MiB)" for r in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for i, n in enumerate(steps):
        print(f"| {n} | " + " | ".join(f"{r['trace'][i]['rss_mb']:.0f}" for r in runs) + " |")
    base = runs[0]
    print()
    for r in runs:
        print(
            f"{r['name']}: idle {r['rss_start_mb']:.0f} MiB; after warm-up median "
            f"{r['rss_median_after_warmup_mb']:.0f}, max {r['rss_max_after_warmup_mb']:.0f}, "
            f"last - first {r['growth_after_warmup_mb']:+.0f}; above idle {r['above_start_mb']:.0f}"
            f" MiB ({r['above_start_mb'] / base['above_start_mb']:.2f}x {base['name']}); "
            f"{r['seconds_per_request']:.2f} s per request "
            f"({r['seconds_per_request'] / base['seconds_per_request']:.2f}x)"
        )


if __name__ == "__main__":
    main()
