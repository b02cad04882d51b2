"""The one-pass localizability with every sample's stiff end in one solver loop
(``core/point_grids.py``) against one solve per quantized floor (the code path before), in one
run, on models that know something and on a diffuse one.

For each model, ``model.localizability`` of the same photos from the same noise (128 samples,
the recipe's solver, steps and precision), once with the per-floor solves (the loop switched
off, as a solver it does not run would take) and once as it runs by default, interleaved, best
of ``repeats``. The two take the same steps at the same levels, so the estimates should agree
up to rounding (the paired difference is reported beside the Monte Carlo standard error).
Models: the bundled one (diffuse; its validation photos) and the trained testbeds in
``/work/testbeds`` (sharp: one held-out photo per pattern).

    python benchmarks/run.py point_grids --threads 2
"""

from __future__ import annotations

from unittest import mock

import torch
from _testbeds import localizability_experiment

from globeflow.core import likelihood
from globeflow.core.sampler_settings import resolve
from globeflow.core.stiff_end import quantized_floors, stiffness_floor

PATHS = {
    "one solve per floor": lambda: mock.patch.object(likelihood, "POINT_GRID_SOLVERS", ()),
    "one loop (default)": lambda: mock.patch.object(likelihood, "POINT_GRID_SOLVERS",
                                                    likelihood.POINT_GRID_SOLVERS),
}  # fmt: skip


def distinct_floors(model, emb: torch.Tensor, samples: int, recipe) -> float:
    """Median number of distinct quantized floors per photo among its samples (the separate
    solves of the per-floor path)."""
    counts = []
    for i in range(emb.shape[0]):
        e = emb[i : i + 1]
        x0 = model.prepare_noise(e, samples, None, torch.Generator().manual_seed(0))
        landed = likelihood.pilot(model, e, x0, recipe.localizability_precision)
        floors = stiffness_floor(
            model, e, landed, recipe.localizability_steps, precision=recipe.localizability_precision
        )
        counts.append(len(torch.unique(quantized_floors(floors))))
    return float(torch.tensor(counts, dtype=torch.float64).median())


def variants(model) -> dict:
    return {path: (switch, {}) for path, switch in PATHS.items()}


def row(model, emb, best, out, samples: int) -> dict:
    before, after = list(PATHS)
    diff = out[after][0] - out[before][0]
    return {
        "floors per photo (median)": distinct_floors(model, emb, samples, resolve(model)),
        "per-floor s": best[before], "one loop s": best[after],
        "speed-up": best[before] / best[after],
        "diff max bits": float(diff.abs().max()),
        "MC stderr bits": float(out[before][1].mean()),
    }  # fmt: skip


point_grids = localizability_experiment("point_grids", __name__, variants, row)
