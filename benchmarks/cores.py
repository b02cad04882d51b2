"""Points and samples side by side on the cores (``core/parallel.py``) against torch's own
threads, in one process, as the command line runs torch (``OMP_WAIT_POLICY=PASSIVE``).

Workloads: the exact log-likelihood of ``points`` points of one image on the YFCC-size random
network (``model.log_prob``: 48 lagged-midpoint steps and the stiffness probe), and on one
held-out photo of each of the first ``photos`` patterns of a trained testbed the localizability
pass (``model.localizability``: ``samples`` samples) and 256 samples at guidance 2 with the
default sampler (``model.sample``). "one pass": the work as one batch
on the process's intra-op threads (:func:`globeflow.core.parallel.cpu_workers` made to answer
1, the code path before); "side by side": the defaults (one Python worker per thread, each on
one intra-op thread). Interleaved, best of ``repeats``; the values of both must be the same
(max difference printed).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/run.py cores --threads 2
"""

from __future__ import annotations

import math
import os
import time

import torch
from _common import gemm_rates, loadavg, print_table, yfcc_size_model
from _reference_code import loglik_points
from _registry import experiment
from _testbeds import TRAINED_ROOT, photo_per_pattern

from globeflow.core import likelihood
from globeflow.core.families import base as families_base
from globeflow.core.sampler_settings import LOCALIZABILITY_SAMPLES


def _workloads(points: int, photos: int, samples: int, testbed: str) -> dict:
    """{name: callable returning a tensor}."""
    from globeflow.core.sphere import unit_to_latlon

    model, emb = yfcc_size_model()
    latlon = unit_to_latlon(loglik_points(points))[None]
    runs = {f"log p, YFCC-size, {points} points": lambda: model.log_prob(latlon, emb)}
    directory = TRAINED_ROOT / testbed
    if (directory / "model" / "config.json").exists():
        bed, bed_emb = photo_per_pattern(testbed, photos)

        def localizability() -> torch.Tensor:
            return bed.localizability(
                bed_emb, num_samples=samples, generator=torch.Generator().manual_seed(0)
            )

        def guided_samples() -> torch.Tensor:
            return bed.sample(
                bed_emb, 256, guidance=2.0, generator=torch.Generator().manual_seed(0)
            )

        runs[f"localizability, {testbed}, {photos} photos x {samples}"] = localizability
        runs[f"samples at guidance 2 (defaults), {testbed}, {photos} photos x 256"] = guided_samples
    else:
        print(f"{directory}: missing, localizability not timed (benchmarks/run.py testbeds_build)")
    return runs


@experiment("cores", quick={"points": 8, "photos": 1, "samples": 16, "repeats": 1})
def cores(
    *,
    points: int = 64,
    photos: int = 2,
    samples: int = LOCALIZABILITY_SAMPLES,
    repeats: int = 3,
    testbed: str = "syn-published",
) -> dict:
    real = likelihood.cpu_workers
    variants = {"one pass": lambda device, items: 1, "side by side": real}
    modules = (likelihood, families_base)
    rows = []
    for name, run in _workloads(points, photos, samples, testbed).items():
        best, values = dict.fromkeys(variants, math.inf), {}
        try:
            for _ in range(repeats):
                for label, workers in variants.items():
                    for module in modules:
                        module.cpu_workers = workers
                    start = time.perf_counter()
                    values[label] = run()
                    best[label] = min(best[label], time.perf_counter() - start)
        finally:
            for module in modules:
                module.cpu_workers = real
        rows.append({
            "workload": name, "one pass s": best["one pass"],
            "side by side s": best["side by side"],
            "speed-up": best["one pass"] / best["side by side"],
            "max difference": float((values["one pass"] - values["side by side"]).abs().max()),
        })  # fmt: skip
    print_table(rows, list(rows[0]))
    return {
        "gemm_gflops": gemm_rates(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)"),
        "rows": rows,
        "load_average_after": loadavg(),
    }
