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


GEMM_SHAPE = (512, 512, 2048)
"""(rows, inner, cols) of the rate measurement: the first linear layer of a dim-512 AdaLN block
on 512 rows (256 guided samples), the products that dominate sampling and likelihoods of the
published-size network. (At 4096 rows the float32 output no longer fits the cache and oneDNN's
rate drops by 30%.)"""


def _linear_runner(dtype: torch.dtype, kernel: str):
    """A no-argument function running one (rows, inner) x (inner, cols) product, or None when
    the kernel is not available here. "matmul": torch.matmul (MKL on CPU); "onednn": oneDNN on
    a weight packed once (globeflow.core.packed_linear, what the network uses at inference)."""
    rows, inner, cols = GEMM_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=g).to(dtype)
    layer = torch.nn.Linear(inner, cols, bias=False)
    if kernel == "matmul":
        w_t = layer.weight.detach().to(dtype).T.contiguous()
        out = torch.empty(rows, cols, dtype=dtype)
        return lambda: torch.matmul(x, w_t, out=out)
    try:
        from globeflow.core.packed_linear import linear, pack
    except ImportError:
        return None
    packed = pack(layer, dtype)
    return (lambda: linear(x, packed)) if packed.packed else None


def linear_gflops(dtype: torch.dtype, kernel: str = "matmul", seconds: float = 0.5) -> float | None:
    """Measured rate of the :data:`GEMM_SHAPE` product in GFLOP/s (2 FLOPs per multiply-add),
    median over ~``seconds`` of repetitions with the current thread count; None when the
    kernel is unavailable."""
    run = _linear_runner(dtype, kernel)
    if run is None:
        return None
    run()  # warm-up (lazy initialisation of the kernels)
    rows, inner, cols = GEMM_SHAPE
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        run()
        rates.append(2.0 * rows * inner * cols / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def gemm_rates(seconds: float = 0.5) -> dict[str, dict[str, float | None]]:
    """Matrix-product rates of this machine now (GFLOP/s), float32 and bfloat16, per kernel and
    the best of them ("peak")."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernels = {k: linear_gflops(dtype, k, seconds) for k in ("matmul", "onednn")}
        out[name] = {**kernels, "peak": max(v for v in kernels.values() if v is not None)}
    return out


def _linear_pointwise_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * x_shape[-1] * out_shape[-1]


def count_flops(fn) -> int:
    """FLOPs of the matrix products (mm, addmm, bmm, ..., oneDNN packed linears) that fn() runs,
    counted by torch's FlopCounterMode; elementwise work is not counted, so this is a lower bound
    on the work."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        extra[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
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
