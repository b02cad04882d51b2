"""Does the multi-process machinery slow the single-process path? ``train()`` of this checkout
against ``train()`` of an earlier commit (``baseline_ref``, default: the commit before the
torchrun work), on the same in-memory data, in one process, in the same run.

The baseline's ``src/globeflow/jobs/training.py`` is read with ``git show`` and imported as a
separate module (it uses the same, unchanged core modules). Each repetition runs both, in
alternating order, for 5 and for ``steps`` steps of a network (default: the default config,
dim 256, depth 6, batch 512; cond_dim 1024, AdamW, EMA) with no validation set and one
checkpoint at the end. A tiny network (``net_dim=32 net_depth=1 batch_size=64``) makes the
per-step bookkeeping visible in microseconds. ``from_store=true`` times the ``globeflow train``
job (``train_from_embeddings``) on a store of the same rows instead: read, split, train. The
difference of the two wall times gives the time per step; the rest is start-up and the end
(checkpoint, final model). Reported: the ratio of median times per step, and of median wall
times of the long run (everything ``train()`` does).

Usage: ``python benchmarks/run.py train_overhead [-p steps=60] [-p reps=3]``.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import loadavg
from _registry import experiment

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "a119c43"


def load_baseline(ref: str):
    source = subprocess.run(
        ["git", "show", f"{ref}:src/globeflow/jobs/training.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_training.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_training", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def data(rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(rows, dim, generator=g)
    latlon = torch.stack(
        [torch.rand(rows, generator=g) * 180 - 90, torch.rand(rows, generator=g) * 360 - 180], 1
    ).double()
    return emb, latlon


def write_store(path: Path, emb: torch.Tensor, latlon: torch.Tensor) -> Path:
    from globeflow.data.embedding_store import EmbeddingWriter

    with EmbeddingWriter(path, "synthetic", emb.shape[1], chunk_size=65536) as writer:
        writer.add([f"r{i}" for i in range(len(emb))], emb, latlon=latlon)
    return path


def timed_run(module, emb, latlon, steps: int, net: dict, store: Path | None = None) -> float:
    """Seconds of one run: ``train()`` on the tensors, or (``store``) the ``globeflow train``
    job on a store (read, 5% random validation split, one small validation at the end)."""
    options = dict(
        max_steps=steps,
        val_every=10**6,
        checkpoint_every=10**6,
        log_every=10**6,
        warmup_steps=10,
        **net,
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        if store is None:
            module.train(
                module.TrainConfig(**options), emb, latlon, None, None, out, progress=False
            )
        else:
            module.train_from_embeddings(
                store, "rfm", out, val_split="0.05", progress=False, val_loss_rows=256,
                val_geo_rows=16, val_num_samples=8, val_sample_steps=4, **options,
            )  # fmt: skip
        return time.perf_counter() - start


@experiment(
    "train_overhead",
    quick={"steps": 6, "reps": 1, "rows": 512, "net_dim": 16, "net_depth": 1, "batch_size": 32},
)
def train_overhead(
    *,
    baseline_ref: str = BASELINE_REF,
    steps: int = 60,
    reps: int = 3,
    rows: int = 50_000,
    net_dim: int = 256,
    net_depth: int = 6,
    batch_size: int = 512,
    from_store: bool = False,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``from_store``: time the train job on a store (the CLI path)
    """

    from globeflow.jobs import training as current

    baseline = load_baseline(baseline_ref)
    emb, latlon = data(rows, 1024)
    net = {"dim": net_dim, "depth": net_depth, "batch_size": batch_size}
    store = write_store(Path(tempfile.mkdtemp()) / "s.parquet", emb, latlon) if from_store else None
    load_start = loadavg()
    timed_run(current, emb, latlon, 3, net, store)  # warm-up (allocator, first-call costs)
    timed_run(baseline, emb, latlon, 3, net, store)
    short = 5
    times: dict[str, list[float]] = {"baseline": [], "current": []}
    per_step: dict[str, list[float]] = {"baseline": [], "current": []}
    fixed: dict[str, list[float]] = {"baseline": [], "current": []}
    for rep in range(reps):
        order = [("baseline", baseline), ("current", current)]
        for name, module in order if rep % 2 == 0 else order[::-1]:
            t_short = timed_run(module, emb, latlon, short, net, store)
            t_long = timed_run(module, emb, latlon, steps, net, store)
            step_s = (t_long - t_short) / (steps - short)
            times[name].append(t_long)
            per_step[name].append(step_s)
            fixed[name].append(t_short - short * step_s)
            print(
                f"rep {rep} {name}: {steps / t_long:.2f} steps/s overall, "
                f"{1 / step_s:.2f} steps/s per step, start-up and end {fixed[name][-1]:.2f} s",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    med_step = {k: statistics.median(v) for k, v in per_step.items()}
    result = {
        "baseline_ref": baseline_ref,
        "steps": steps,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "network": net,
        "from_store": from_store,
        "seconds": times,
        "seconds_per_step": per_step,
        "fixed_seconds": fixed,
        "steps_per_s": {k: steps / v for k, v in med.items()},
        "current_over_baseline_speed": med["baseline"] / med["current"],
        "current_over_baseline_per_step_speed": med_step["baseline"] / med_step["current"],
        "per_rep_ratio": [b / c for b, c in zip(times["baseline"], times["current"])],
        "per_rep_per_step_ratio": [
            b / c for b, c in zip(per_step["baseline"], per_step["current"])
        ],
        "median_per_rep_per_step_ratio": statistics.median(
            b / c for b, c in zip(per_step["baseline"], per_step["current"])
        ),
        "per_step_overhead_us": 1e6 * (med_step["current"] - med_step["baseline"]),
        "loadavg": {"start": load_start, "end": loadavg()},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    print("| code | steps/s (median) |\n|---|---|")
    for k in ("baseline", "current"):
        print(f"| {k} | {result['steps_per_s'][k]:.2f} |")
    print(f"speed ratio current/baseline: {result['current_over_baseline_speed']:.3f} overall, "
          f"{result['current_over_baseline_per_step_speed']:.3f} per step")  # fmt: skip
    return result
