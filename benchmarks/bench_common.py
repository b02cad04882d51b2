"""Pieces every speed benchmark needs: timing, machine load, the machine's matrix-product rate and
FLOP counts of a workload (for "ceiling" ratios: how fast a workload could be at that rate)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device = torch.device("cpu")):
    """(result, seconds) of fn()."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages (empty where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def uptime() -> str:
    """The ``uptime`` line (load averages as the docs quote them), or "" without the command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return ""


def matmul_gflops(
    dtype: torch.dtype, rows: int = 4096, inner: int = 512, cols: int = 2048, seconds: float = 0.5
) -> float:
    """Measured rate of (rows, inner) @ (inner, cols) products in GFLOP/s (2 FLOPs per
    multiply-add), median over ~``seconds`` of repetitions, with the current thread count.

    The default shape is the first linear layer of a dim-512 AdaLN block on 4096 rows: the
    products that dominate sampling and likelihoods of the published-size network.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=g).to(dtype)
    b = torch.randn(inner, cols, generator=g).to(dtype)
    out = torch.empty(rows, cols, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up (lazy initialisation of the GEMM kernels)
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2.0 * rows * inner * cols / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def gemm_rates(seconds: float = 0.5) -> dict[str, float]:
    """Matrix-product rate of this machine now, float32 and bfloat16 (GFLOP/s)."""
    return {
        "float32": matmul_gflops(torch.float32, seconds=seconds),
        "bfloat16": matmul_gflops(torch.bfloat16, seconds=seconds),
    }


def count_flops(fn) -> int:
    """FLOPs of the matrix products (mm, addmm, bmm, ...) that fn() runs, counted by torch's
    FlopCounterMode; elementwise work is not counted, so this is a lower bound on the work."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def emit(report: dict, print_table, out: Path | None, hide: tuple[str, ...] = ()) -> None:
    """Print the report as JSON (without the ``hide`` keys) and as a table; write the whole
    report to ``out`` as JSON when given."""
    print(json.dumps({k: v for k, v in report.items() if k not in hide}, indent=1))
    print_table(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
