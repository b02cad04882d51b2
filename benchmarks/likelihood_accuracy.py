"""Likelihood and localizability accuracy on every exact-field testbed, with their cost.

Testbeds (float64 exact RFM fields with closed-form densities, :mod:`globeflow.core.exact_field`):
the kernel mixtures of ``benchmarks/_testbeds.py`` (1 km to 1,000 km), smooth (vMF-like)
posteriors of 1, 10 and 100 km RMS (:func:`~globeflow.core.exact_field.smooth_target`, whose
kappa grows like s^2, not s), and a 100-km smooth posterior with a sharp (1-km) minor mode holding
5% of the mass.

- log-likelihood: :func:`~globeflow.core.likelihood.log_prob_ode` at its defaults at exact
  samples against the closed form: the largest |error| in nats (target <= 0.02);
- localizability, per recipe (solver, bulk steps, step in log(1 - gamma) at the stiff end): the
  one-pass estimator's mean per-sample log-density error against the closed form at its own
  samples, in bits (its discretisation bias; target |bias| <= 0.1), the estimate minus the exact
  E_p[log2 p] with the SE of both Monte Carlo means, and seconds.

    python benchmarks/run.py likelihood_accuracy --threads 1
"""

from __future__ import annotations

import math
import sys
import time

import torch
from _common import loadavg, print_table
from _registry import experiment
from _testbeds import CITIES, exact_targets

from globeflow.core import likelihood as L
from globeflow.core.exact_field import (
    MixtureTarget,
    exact_rfm_model,
    kernel_width_for_rms_km,
    smooth_target,
)

LN2 = math.log(2.0)

RECIPES = {
    "lagged-midpoint 16 / 0.35 (before)": ("lagged-midpoint", 16, 0.35),
    "lagged-midpoint 16 / 0.2": ("lagged-midpoint", 16, 0.2),
    "lagged-midpoint 24 / 0.2": ("lagged-midpoint", 24, 0.2),
    "midpoint 16 / 0.2": ("midpoint", 16, 0.2),
    "midpoint 24 / 0.2": ("midpoint", 24, 0.2),
    "midpoint 24 / 0.3": ("midpoint", 24, 0.3),
    "midpoint 24 / 0.35": ("midpoint", 24, 0.35),
}


def all_targets() -> dict[str, MixtureTarget]:
    targets = dict(exact_targets())
    tokyo = CITIES["tokyo"]
    for km in (1.0, 10.0, 100.0):
        targets[f"smooth-{km:g}km"] = smooth_target(tokyo, km)
    minor = MixtureTarget.from_latlon(
        torch.tensor([[tokyo[0] + 3.0, tokyo[1]]]), width=kernel_width_for_rms_km(1.0)
    )
    targets["smooth-100km+5%-1km"] = MixtureTarget.combine(
        [(smooth_target(tokyo, 100.0), 0.95), (minor, 0.05)]
    )
    return targets


def run(
    name: str,
    target: MixtureTarget,
    recipes: dict[str, tuple],
    samples: int,
    points: int,
    exact_samples: int,
) -> list[dict]:
    model = exact_rfm_model([target])
    emb = torch.ones(1, 1, dtype=torch.float64)
    index = torch.tensor([0])
    truth = model.network.target_samples(0, exact_samples, torch.Generator().manual_seed(5))
    true_bits = model.network.target_log_density(truth[None], index)[0] / LN2
    exact, exact_se = float(true_bits.mean()), float(true_bits.std()) / math.sqrt(len(true_bits))
    scored = truth[None, :points]
    start = time.perf_counter()
    lp = L.log_prob_ode(model, scored, emb)
    ll_seconds = time.perf_counter() - start
    ll_error = float((lp - model.network.target_log_density(scored, index)).abs().max())
    rows = []
    for label, (solver, steps, log_step) in recipes.items():
        start = time.perf_counter()
        x, log_p = L.sample_with_log_density(
            model, emb, samples, steps, solver, torch.Generator().manual_seed(1),
            log_step=log_step,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        bits = log_p[0] / LN2
        at_sample = model.network.target_log_density(x, index)[0] / LN2
        inside = torch.isfinite(at_sample)
        se = float(bits.std()) / math.sqrt(len(bits))
        rows.append({
            "testbed": name, "recipe": label, "exact bits": exact,
            "bias bits": float((bits - at_sample)[inside].mean()),
            "minus exact bits": float(bits.mean()) - exact,
            "its SE": math.hypot(se, exact_se),
            "outside support": float((~inside).double().mean()),
            "seconds": seconds,
            "loglik max err nats": ll_error, "loglik seconds": ll_seconds,
        })  # fmt: skip
    return rows


@experiment(
    "likelihood_accuracy",
    quick={
        "samples": 16,
        "points": 4,
        "exact_samples": 256,
        "testbeds": "exact-200km-1city",
        "recipes": "midpoint 16 / 0.2",
    },
)
def likelihood_accuracy(
    *,
    samples: int = 256,
    points: int = 32,
    exact_samples: int = 20000,
    testbeds: str = "",
    recipes: str = "",
) -> dict:
    """Log-likelihood error and localizability bias per recipe on each exact-field testbed.

    ``points``: exact samples scored by log_prob_ode; ``testbeds``, ``recipes``: comma-separated
    names ("": all)."""
    chosen = {k: v for k, v in RECIPES.items() if not recipes or k in recipes.split(",")}
    targets = all_targets()
    report = {"rows": []}
    for name in testbeds.split(",") if testbeds else list(targets):
        report["rows"] += run(name, targets[name], chosen, samples, points, exact_samples)
        print(f"{name} done", file=sys.stderr, flush=True)
    columns = ["testbed", "recipe", "bias bits", "minus exact bits", "its SE", "seconds",
               "loglik max err nats", "loglik seconds"]  # fmt: skip
    print_table(report["rows"], columns)
    report["targets"] = {"localizability_bias_bits": 0.1, "loglik_error_nats": 0.02}
    report["load_average_after"] = loadavg()
    return report
