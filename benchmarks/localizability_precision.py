"""The localizability pass at the recipe's precision ("auto": bf16 where native) against fp32,
in one run, on models that know something and on a diffuse one.

For each model, ``model.localizability`` of the same photos from the same noise (128 samples,
the recipe's solver and steps), once with ``precision="fp32"`` (the pass before
``localizability_precision`` existed) and once at the recipe's own precision, interleaved, best
of ``repeats``. Accuracy: the paired difference per photo (the Monte Carlo noise cancels in
it), beside the estimate's own Monte Carlo standard error. Models: the bundled one (diffuse;
its validation photos) and the trained testbeds in ``/work/testbeds`` (sharp, 1 to 2,000 km:
one held-out photo per pattern, ``photos_per_model`` of them).

    python benchmarks/run.py localizability_precision --threads 2
"""

from __future__ import annotations

import math
import time

import torch
from _common import bundled_validation, gemm_rates, loadavg, print_table
from _registry import experiment
from _testbeds import TRAINED_ROOT, photo_per_pattern

from globeflow.core.sampler_settings import resolve


def _models(testbeds: str, photos: int) -> dict:
    found = {}
    bundled = bundled_validation(photos)
    if bundled is not None:
        locator, emb, _ = bundled
        found["bundled (diffuse)"] = (locator.model, emb)
    for name in [t for t in testbeds.split(",") if t]:
        if (TRAINED_ROOT / name / "model" / "config.json").exists():
            found[f"{name} (sharp)"] = photo_per_pattern(name, photos)
        else:
            print(f"{TRAINED_ROOT / name}: missing (benchmarks/run.py testbeds_build)")
    return found


@experiment(
    "localizability_precision",
    quick={"photos": 2, "samples": 16, "repeats": 1, "testbeds": "syn-small"},
)
def localizability_precision(
    *,
    photos: int = 8,
    samples: int = 128,
    repeats: int = 2,
    testbeds: str = "syn-small,syn-published",
) -> dict:
    rows = []
    for label, (model, emb) in _models(testbeds, photos).items():
        emb = model.prepare_embeddings(emb)
        auto = resolve(model).localizability_precision
        best = {"fp32": math.inf, auto: math.inf}
        out = {}
        for _ in range(repeats):
            for precision in best:
                start = time.perf_counter()
                out[precision] = model.localizability(
                    emb, num_samples=samples, generator=torch.Generator().manual_seed(0),
                    return_stderr=True, precision=precision,
                )  # fmt: skip
                best[precision] = min(best[precision], time.perf_counter() - start)
        diff = out[auto][0] - out["fp32"][0]
        rows.append({
            "model": label, "photos": emb.shape[0], "default": auto,
            "fp32 s": best["fp32"], "default s": best[auto],
            "speed-up": best["fp32"] / best[auto],
            "diff mean bits": float(diff.mean()),
            "diff sd bits": float(diff.std()) if len(diff) > 1 else 0.0,
            "diff max bits": float(diff.abs().max()),
            "MC stderr bits": float(out["fp32"][1].mean()),
        })  # fmt: skip
        print_table(rows[-1:], list(rows[-1]))
    report = {"gemm_gflops": gemm_rates(), "samples": samples, "rows": rows}
    if rows:
        print_table(rows, list(rows[0]))
    report["load_average_after"] = loadavg()
    return report
