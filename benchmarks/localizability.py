"""Localizability estimators: cost at equal Monte Carlo standard error, and bias.

Localizability is E_p[log2 p(y | photo)], a Monte Carlo mean over the model's own samples.

- ``ode`` (globeflow before this work, reproduced exactly): N samples with 32 Euler steps, then
  each sample's log-density by the likelihood ODE with 32 RK4 steps (2 JVPs per evaluation);
- ``path``: one pass that samples with a second-order solver and carries the log-density along
  the sampling path (:func:`globeflow.core.likelihood.sample_with_log_density`).

For each estimator on the bundled model's validation photos: ms per photo at N samples, the
standard error (SE, from the per-photo sample variance, averaged over photos), the cost at equal
SE relative to ``ode`` (time x SE^2 ratio: halving the SE costs 4x the samples), and the
discretisation bias of the path estimators: the mean over photos of the estimate minus the same
estimator at ``ref_steps`` steps from the same noise (common random numbers, so the Monte
Carlo noise cancels), with its standard error over photos.

    python benchmarks/run.py localizability
"""

from __future__ import annotations

import math
import time

import torch
from _common import loadavg, print_table, require_bundled_validation
from _registry import experiment

from globeflow.core.likelihood import log_prob_ode
from globeflow.core.sampler_settings import (
    AUTHORS_SAMPLER,
    DEFAULT_SAMPLER,
    LOCALIZABILITY_SOLVER,
    resolve,
)

LAGGED = {"method": "path", "solver": "lagged-midpoint"}
ESTIMATORS = [
    ("ode (before)", {"method": "ode", "steps": 32, "likelihood_steps": 32}),
    ("path midpoint 16 fp32", {"method": "path", "solver": "midpoint", "steps": 16}),
    ("path lagged-midpoint 8 fp32", {**LAGGED, "steps": 8}),
    ("path lagged-midpoint 16 fp32", {**LAGGED, "steps": 16}),
    ("path lagged-midpoint 32 fp32", {**LAGGED, "steps": 32}),
    ("path lagged-midpoint 16 bf16 (default)", {**LAGGED, "steps": 16, "precision": "bf16"}),
]


def estimate(model, emb, n, options, seed=0):
    """(bits (B,), SE (B,), seconds) of one estimator."""
    g = torch.Generator().manual_seed(seed)
    options = dict(options)
    steps = options.pop("steps")
    start = time.perf_counter()
    if options.pop("method") == "ode":  # as before: Euler samples, then RK4 per sample
        recipe = resolve(model, AUTHORS_SAMPLER, num_samples=n, steps=steps)  # Euler, guidance 0
        x = model.sample_unit(emb, recipe, None, g)
        log_p = log_prob_ode(model, x, emb, steps=options["likelihood_steps"], method="rk4")
        bits = log_p.double() / math.log(2.0)
        se = bits.std(-1) / math.sqrt(n)
        return bits.mean(-1), se, time.perf_counter() - start
    bits, se = model.localizability(
        emb, n, steps, generator=g, return_stderr=True, method="path", **options
    )
    return bits.double(), se.double(), time.perf_counter() - start


def bulk_step_estimators(bulk_steps: str) -> list[tuple[str, dict]]:
    """The default estimator (path, :data:`LOCALIZABILITY_SOLVER`, probed stiff end) at each of
    the comma-separated ``bulk_steps``."""
    solver = LOCALIZABILITY_SOLVER
    return [
        (f"path {solver} {n} fp32", {"method": "path", "solver": solver, "steps": int(n)})
        for n in bulk_steps.split(",")
    ]


@experiment("localizability", quick={"photos": 2, "samples": 8, "ref_steps": 16}, default=True)
def localizability(
    *,
    photos: int = 16,
    samples: int = DEFAULT_SAMPLER.localizability_samples,
    ref_steps: int = 128,
    bulk_steps: str = "",
) -> dict:
    """The estimators of :data:`ESTIMATORS` on the bundled model, or with ``bulk_steps``
    (comma-separated, e.g. "8,12,24") the default estimator at those bulk steps."""
    locator, emb, _ = require_bundled_validation(photos)
    model = locator.model
    rows = []
    estimators = bulk_step_estimators(bulk_steps) if bulk_steps else ESTIMATORS
    for name, options in estimators:
        estimate(model, emb[:2], 8, options)  # warm-up
        bits, se, seconds = estimate(model, emb, samples, options, seed=1)
        row = {
            "estimator": name,
            "ms/photo": 1000 * seconds / len(emb),
            "SE bits": float(se.mean()),
            "mean bits": float(bits.mean()),
        }
        if options["method"] == "path":  # same noise, many steps: the discretisation bias
            ref_options = {**options, "steps": ref_steps, "precision": "fp32"}
            ref, _, _ = estimate(model, emb, samples, ref_options, seed=1)
            diff = bits - ref
            row["bias bits"] = float(diff.mean())
            row["bias SE"] = float(diff.std() / math.sqrt(len(diff)))
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["cost at equal SE"] = (row["ms/photo"] * row["SE bits"] ** 2) / (
            base["ms/photo"] * base["SE bits"] ** 2
        )
    print(f"\n{len(emb)} photos, N = {samples} samples; bias against {ref_steps} steps")
    columns = ["estimator", "ms/photo", "SE bits", "cost at equal SE", "mean bits", "bias bits"]
    print_table(rows, columns + ["bias SE"])
    report = {
        "photos": len(emb),
        "samples": samples,
        "bias_reference_steps": ref_steps,
        "rows": rows,
        "bulk_steps": bulk_steps,
        "target_cost_ratio": 0.25,
        "se_note": f"SE scales as 1/sqrt(N); ln2 = {math.log(2):.4f}",
        "load_average_after": loadavg(),
    }
    return report
