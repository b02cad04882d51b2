"""Soak test of the web server: resident memory over many requests to one real server process.

Starts ``globeflow serve`` (uvicorn on loopback) in a child process, sends ``requests``
``POST /v1/locate`` requests from ``concurrency`` parallel clients (the bundled example photos,
cycled; the default model and settings) and reads the server's resident set size (VmRSS) from
``/proc`` after every ``every`` requests, once the server is idle again.

Baseline measured in the same run: the same server with ``GLOBEFLOW_MALLOC_TRIM=0``, i.e. without
giving freed heap memory back after each batch (the behaviour before the fix). Each variant
``NAME:K=V,...`` of ``variants`` soaks one server with that environment (e.g.
``MALLOC_ARENA_MAX=2``).

Usage: ``python benchmarks/run.py server_soak [-p requests=300] [-p concurrency=8]``.
Linux only (reads ``/proc``).
"""

from __future__ import annotations

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
from _registry import experiment


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(name: str, env: dict[str, str], plan: dict) -> dict:
    """Run one server with ``env`` through the request loop of ``plan`` (the experiment's
    parameters); RSS trace and summary."""
    photos = sorted((REPO / "examples").glob("*.jpg"))
    payloads = [(p.name, p.read_bytes()) for p in photos]
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"globeflow-soak-{name}-{port}.log"
    cmd = [sys.executable, "-m", "globeflow.apps.cli"]
    threads = plan["server_threads"]
    cmd += ["--threads", str(threads), "serve"] if threads else ["serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = start_server(cmd, port, {**os.environ, **env}, log)
    url = f"http://127.0.0.1:{port}/v1/locate"
    params = {"num_samples": plan["num_samples"], "steps": plan["steps"]}
    trace = [{"requests": 0, "rss_mb": round(rss_mb(proc.pid), 1), "busy_s": 0.0}]
    busy = 0.0  # seconds spent answering requests (the pauses before readings excluded)
    try:
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(plan["concurrency"]) as pool:

            def one(i: int) -> int:
                fname, data = payloads[i % len(payloads)]
                r = client.post(url, params=params, files={"file": (fname, data, "image/jpeg")})
                return r.status_code

            for lo in range(0, plan["requests"], plan["every"]):
                t0 = time.monotonic()
                codes = list(pool.map(one, range(lo, min(plan["requests"], lo + plan["every"]))))
                busy += time.monotonic() - t0
                if any(c != 200 for c in codes):
                    raise RuntimeError(f"{name}: non-200 answers {sorted(set(codes))}")
                time.sleep(plan["settle_s"])  # the worker finishes its batch after the answer
                row = {
                    "requests": min(plan["requests"], lo + plan["every"]),
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
    after_warmup = [t["rss_mb"] for t in trace if t["requests"] >= plan["warmup"]]
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
        "seconds_per_request": round(busy / plan["requests"], 3),
    }


@experiment(
    "server_soak",
    quick={
        "requests": 4,
        "concurrency": 2,
        "every": 2,
        "warmup": 2,
        "settle_s": 0.1,
        "num_samples": 16,
        "steps": 4,
        "variants": "after:",
    },
    threads=None,
)
def server_soak(
    *,
    requests: int = 300,
    concurrency: int = 8,
    every: int = 25,
    warmup: int = 50,
    settle_s: float = 1.0,
    num_samples: int = 512,
    steps: int = 32,
    server_threads: int | None = None,
    variants: str = "before:GLOBEFLOW_MALLOC_TRIM=0;after:",
) -> dict:
    """Options (see the module docstring for the rest):

    - ``every``: requests between RSS readings
    - ``warmup``: requests before growth counts
    - ``settle_s``: pause after each window, before reading
    - ``server_threads``: the server's ``--threads`` (None: its own policy)
    - ``variants``: server environments to soak, ``NAME:K=V,...`` separated by ";"
    """
    # A terminated benchmark must still stop its server (the finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = {k: v for k, v in locals().items() if k != "variants"}
    runs = []
    load_before = loadavg()
    for spec in variants.split(";"):
        name, _, pairs = spec.partition(":")
        env = dict(p.split("=", 1) for p in pairs.split(",") if p)
        runs.append(soak(name, env, plan))
    report = {
        "benchmark": "server_soak",
        "settings": plan,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "runs": runs,
    }
    print_table(runs)
    return report


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
