"""Cost of the localizability estimate before and after its defaults changed, in one run.

``model.localizability`` on the bundled model's validation photos (``photos`` of them,
``samples`` samples each, one thread): the current defaults (midpoint, 24 bulk steps, stiff-end
step 0.2 in log(1 - gamma)) against the previous ones (lagged midpoint, 16 bulk steps, 0.35),
interleaved, best of ``repeats``. The accuracy side is ``benchmarks/likelihood_accuracy.py``.

    python benchmarks/run.py localizability_cost
"""

from __future__ import annotations

import math
import time

import torch
from _common import gemm_rates, loadavg, print_table, require_bundled_validation
from _registry import experiment

from globeflow.core import likelihood as L
from globeflow.core.sampler_settings import LOCALIZABILITY_BULK_STEPS, LOCALIZABILITY_SOLVER
from globeflow.core.stiff_end import STIFF_LOG_STEP

BEFORE = {"solver": "lagged-midpoint", "steps": 16, "log_step": 0.35}


@experiment("localizability_cost", quick={"photos": 2, "samples": 8, "repeats": 1})
def localizability_cost(
    *,
    photos: int = 8,
    samples: int = 128,
    repeats: int = 3,
) -> dict:
    locator, emb, _ = require_bundled_validation(photos)
    model = locator.model
    emb = model.prepare_embeddings(emb)
    after = {"solver": LOCALIZABILITY_SOLVER, "steps": LOCALIZABILITY_BULK_STEPS,
             "log_step": STIFF_LOG_STEP}  # fmt: skip

    def before_run(g):
        _, log_p = L.sample_with_log_density(
            model, emb, samples, BEFORE["steps"], BEFORE["solver"], g,
            log_step=BEFORE["log_step"],
        )  # fmt: skip
        return log_p.mean(-1) / math.log(2.0)

    def after_run(g):
        return model.localizability(emb, num_samples=samples, generator=g)

    runs = {"before": before_run, "after (defaults)": after_run}
    best = dict.fromkeys(runs, math.inf)
    bits = {}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            bits[label] = run(torch.Generator().manual_seed(0))
            best[label] = min(best[label], time.perf_counter() - start)
    rows = [
        {"recipe": label, **(BEFORE if label == "before" else after), "seconds": best[label],
         "ratio": best[label] / best["before"], "mean bits": float(bits[label].mean())}
        for label in runs
    ]  # fmt: skip
    report = {"gemm_gflops": gemm_rates(), "rows": rows}
    print_table(rows, ["recipe", "solver", "steps", "log_step", "seconds", "ratio", "mean bits"])
    report["load_average_after"] = loadavg()
    return report
