"""What several benchmarks share: machine facts, trained models and validation embeddings.

Benchmarks print a table and JSON; they need ``../shared/data`` for the trained-model parts and
say so (skipping those parts) when it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLOBEFLOW_SHARED", REPO.parent / "shared"))
IM2GPS = SHARED / "data" / "im2gps3k-train"
MP16 = SHARED / "data" / "mp16-locations-100k" / "locations.csv"
CACHE = REPO / "out" / "bench" / "cache"


def machine() -> dict:
    """The facts a reader needs next to a timing: CPU, threads, load, torch version."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def gemm_gflops(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Measured matrix-multiply rate (GFLOP/s) for square matrices of ``size`` in ``dtype``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def median_time(fn, reps: int = 3) -> tuple[float, list[float]]:
    """Median wall-clock seconds of fn() over reps runs (after one warm-up), and all runs."""
    fn()
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return sorted(runs)[len(runs) // 2], runs


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A markdown table of the given columns (floats with 4 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")


def write_json(report: dict, out: str | None) -> None:
    """Print the report as JSON and write it to ``out`` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def validation_photos(val_fraction: float = 0.15, seed: int = 0) -> list[tuple[Path, float, float]]:
    """The bundled model's validation photos: im2gps3k-train minus the example photos' authors,
    split by author exactly as ``globeflow train`` did (``split_rows``), validation side.
    Empty when ../shared/data is absent."""
    from globeflow.jobs.training import split_rows

    csv_path = IM2GPS / "locations.csv"
    if not csv_path.exists():
        return []
    excluded = set((REPO / "examples" / "authors.txt").read_text().split())
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["author"] not in excluded]
    _, val = split_rows([r["author"] for r in rows], len(rows), val_fraction, seed)
    return [
        (IM2GPS / "images" / rows[i]["image"], float(rows[i]["lat"]), float(rows[i]["lon"]))
        for i in val.tolist()
    ]


def validation_embeddings(locator, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (V, D), truth (V, 2) degrees) of the validation photos under the locator's
    encoder, cached in out/bench/cache. Empty tensors when the data is absent."""
    from globeflow.data.images import load_image

    photos = validation_photos()[:limit]
    if not photos:
        return torch.zeros(0, locator.model.cond_dim), torch.zeros(0, 2)
    cache = CACHE / f"val-{locator.encoder.name}-{len(photos)}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        return data["emb"], data["truth"]
    embs = []
    for i in range(0, len(photos), 32):
        images = [load_image(p) for p, _, _ in photos[i : i + 32]]
        embs.append(locator.encoder.embed(images))
    emb = torch.cat(embs)
    truth = torch.tensor([[lat, lon] for _, lat, lon in photos], dtype=torch.float64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"emb": emb, "truth": truth}, cache)
    return emb, truth


def mp16_rfm(budget_s: float = 300.0):
    """An unconditional RFM trained on the MP-16 locations (benchmarks/density_mp16.py recipe,
    ``budget_s`` seconds), cached in out/bench/cache. None when the data is absent."""
    from density_mp16 import load_points, train_rfm

    from globeflow.core.checkpoints import load_model, save_model

    directory = CACHE / f"mp16-rfm-{int(budget_s)}s"
    if (directory / "config.json").exists():
        return load_model(directory)
    if not MP16.exists():
        return None
    args = argparse.Namespace(
        seed=0, dim=128, depth=4, expansion=4, schedule="sigmoid", device="cpu", lr=2e-3,
        weight_decay=0.0, batch=1024, budget_s=budget_s, max_steps=0, warmup_steps=100,
        ema=0.995, train_noise_km=0.0,
    )  # fmt: skip
    print(f"training an unconditional MP-16 RFM for {budget_s:.0f} s (cached afterwards)")
    model, _ = train_rfm(load_points(MP16), args, [])
    save_model(model, directory)
    return model


def yfcc_size_model(seed: int = 0):
    """(model, emb (1, 1024)): an RFM with a random network of the published YFCC layout (dim
    512, depth 12, cond_dim 1024; 36M parameters), weights N(0, 0.02) as in the authors'
    ``make_yfcc_size.py``."""
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(seed)
    net = Denoiser(dim=512, depth=12, expansion=4, cond_dim=1024)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return RiemannianFlowMatching(net).eval(), torch.randn(1, 1024)


@contextlib.contextmanager
def busy_process():
    """One CPU-bound process running beside the measurement (a pure-Python loop)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield proc
    finally:
        proc.kill()
        proc.wait()
