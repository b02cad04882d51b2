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

    python benchmarks/likelihood_accuracy.py --threads 1 --out docs/results/likelihood_accuracy.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from _common import machine, print_table, write_json
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


def run(name: str, target: MixtureTarget, args) -> list[dict]:
    model = exact_rfm_model([target])
    emb = torch.ones(1, 1, dtype=torch.float64)
    index = torch.tensor([0])
    truth = model.network.target_samples(0, args.exact_samples, torch.Generator().manual_seed(5))
    true_bits = model.network.target_log_density(truth[None], index)[0] / LN2
    exact, exact_se = float(true_bits.mean()), float(true_bits.std()) / math.sqrt(len(true_bits))
    points = truth[None, : args.points]
    start = time.perf_counter()
    lp = L.log_prob_ode(model, points, emb)
    ll_seconds = time.perf_counter() - start
    ll_error = float((lp - model.network.target_log_density(points, index)).abs().max())
    rows = []
    for label, (solver, steps, log_step) in RECIPES.items():
        start = time.perf_counter()
        x, log_p = L.sample_with_log_density(
            model, emb, args.samples, steps, solver, torch.Generator().manual_seed(1),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--points", type=int, default=32, help="exact samples scored by log_prob_ode")
    ap.add_argument("--exact-samples", type=int, default=20000)
    ap.add_argument("--testbeds", nargs="*", default=None)
    ap.add_argument("--recipes", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.recipes:
        for key in [k for k in RECIPES if k not in args.recipes]:
            del RECIPES[key]
    targets = all_targets()
    report = {"machine": machine(), "settings": vars(args), "rows": []}
    for name in args.testbeds or list(targets):
        report["rows"] += run(name, targets[name], args)
        print(f"{name} done", file=sys.stderr, flush=True)
    columns = ["testbed", "recipe", "bias bits", "minus exact bits", "its SE", "seconds",
               "loglik max err nats", "loglik seconds"]  # fmt: skip
    print_table(report["rows"], columns)
    report["targets"] = {"localizability_bias_bits": 0.1, "loglik_error_nats": 0.02}
    report["machine_after"] = machine()
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
