"""Localizability on sharp testbeds: the one-pass estimator against the truth.

On every exact-field testbed (``benchmarks/_testbeds.py``: exact RFM fields of 1 km to 1,000 km
targets, float64) the exact localizability E_p[log2 p] is known: closed-form log-densities at
exact samples. For each estimator, from the same noise (common random numbers):

- ``before``: the one-pass estimator as it was (lagged midpoint, 16 steps on the quadratic
  sampling grid, gamma_k = 1 - (1 - k/16)^2), reproduced here as the baseline;
- ``default``: :func:`globeflow.core.likelihood.sample_with_log_density` at its defaults
  (LOCALIZABILITY_BULK_STEPS bulk steps plus the stiff end, lagged midpoint);
- ``lagged 32 + stiff end``: the same at 32 bulk steps;
- ``reference``: the same at 256 bulk steps.

Trained testbeds (``trained``, default /work/testbeds/syn-small when present): one held-out
photo per pattern; per estimator the worst pattern's bias against the reference and its SE, the
number of patterns whose bias exceeds 0.1 bits by more than 2 SE, and the mean |bias|.

Columns: the estimate (bits, and bits vs uniform), its Monte Carlo SE, its bias against the
256-step reference (same noise: the Monte Carlo noise cancels), the mean error of the per-sample
log-density against the closed form at the sample (bits), the estimate minus the closed-form
localizability (with the SE of both means), the fraction of samples that landed outside every
kernel's support (density 0: a sampler error), steps and seconds.

    python benchmarks/run.py localizability_sharp
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from _common import loadavg, print_table
from _registry import experiment
from _testbeds import EXACT_TARGETS, exact_targets

from globeflow.core.checkpoints import load_model
from globeflow.core.exact_field import exact_rfm_model
from globeflow.core.families import UNIFORM_LOCALIZABILITY_BITS, effective_area_km2
from globeflow.core.guidance import GuidedField
from globeflow.core.likelihood import (
    LOCALIZABILITY_BULK_STEPS,
    LOCALIZABILITY_SOLVER,
    sample_with_log_density,
)
from globeflow.core.path_field import path_field
from globeflow.core.solvers import SOLVERS, SPHERE

LN2 = math.log(2.0)


def before(model, emb, n, generator):
    """The one-pass estimator before the stiff-end grid: 16 lagged midpoint steps on the
    quadratic sampling grid (samples (B, N, 3), log p (B, N))."""
    method = SOLVERS["lagged-midpoint"]
    x0 = model.prepare_noise(emb, n, None, generator)
    gammas = model.sampling_levels(16, emb)
    levels = method.levels(gammas)
    field = GuidedField(model.network, emb, levels)
    x, delta = method.integrate(path_field(model, field, levels), x0, gammas, SPHERE, True)
    return x, model.base_log_prob(x0) + delta


ESTIMATORS = {
    "before (lagged 16, quadratic grid)": before,
    f"default (lagged {LOCALIZABILITY_BULK_STEPS} + stiff end)": lambda m, e, n, g: (
        sample_with_log_density(m, e, n, solver=LOCALIZABILITY_SOLVER, generator=g)
    ),
    "lagged 32 + stiff end": lambda m, e, n, g: sample_with_log_density(
        m, e, n, 32, LOCALIZABILITY_SOLVER, g
    ),
    "reference (256 + stiff end)": lambda m, e, n, g: sample_with_log_density(
        m, e, n, 256, LOCALIZABILITY_SOLVER, g
    ),
}


def run_testbed(name, target, samples: int, exact_samples: int) -> list[dict]:
    model = exact_rfm_model([target])
    emb = torch.ones(1, 1, dtype=torch.float64)
    index = torch.tensor([0])
    truth = model.network.target_samples(0, exact_samples, torch.Generator().manual_seed(5))
    true_bits = model.network.target_log_density(truth[None], index)[0] / LN2
    exact, exact_se = float(true_bits.mean()), float(true_bits.std()) / math.sqrt(exact_samples)
    rows, estimates = [], {}
    for label, estimator in ESTIMATORS.items():
        start = time.perf_counter()
        x, log_p = estimator(model, emb, samples, torch.Generator().manual_seed(1))
        seconds = time.perf_counter() - start
        bits = log_p[0] / LN2
        at_sample = model.network.target_log_density(x, index)[0] / LN2
        inside = torch.isfinite(at_sample)
        estimates[label] = bits
        se = float(bits.std()) / math.sqrt(samples)
        rows.append(
            {
                "testbed": name,
                "estimator": label,
                "bits": float(bits.mean()),
                "vs uniform bits": float(bits.mean()) - UNIFORM_LOCALIZABILITY_BITS,
                "effective area km2": float(effective_area_km2(bits.mean())),
                "SE bits": se,
                "minus exact bits": float(bits.mean()) - exact,
                "its SE": math.sqrt(se**2 + exact_se**2),
                "per-sample error bits": float((bits - at_sample)[inside].mean()),
                "outside support": float((~inside).double().mean()),
                "seconds": seconds,
            }
        )
    reference = estimates["reference (256 + stiff end)"]
    for row in rows:
        diff = estimates[row["estimator"]] - reference
        row["bias vs 256 bits"] = float(diff.mean())
        row["bias SE"] = float(diff.std()) / math.sqrt(samples)
        row["exact bits"] = exact
    return rows


def run_trained(path: Path, samples: int) -> list[dict]:
    """Bias against the 256-step reference on a trained testbed (one held-out photo per
    pattern; published by the ``trained`` branch under /work/testbeds/NAME)."""
    model = load_model(path / "model").eval()
    heldout = torch.load(path / "heldout.pt", weights_only=True)
    pattern = heldout["pattern"]
    first = torch.stack([torch.nonzero(pattern == p)[0, 0] for p in pattern.unique()])
    emb = model.prepare_embeddings(heldout["embeddings"][first])
    scales = _pattern_names(path, len(first))
    estimates, seconds = {}, {}
    for label, estimator in ESTIMATORS.items():
        start = time.perf_counter()
        _, log_p = estimator(model, emb, samples, torch.Generator().manual_seed(1))
        seconds[label] = time.perf_counter() - start
        estimates[label] = log_p.double() / LN2
    reference = estimates["reference (256 + stiff end)"]
    rows = []
    for label, bits in estimates.items():
        diff = bits - reference
        bias, bias_se = diff.mean(-1), diff.std(-1) / math.sqrt(samples)
        worst = int(bias.abs().argmax())
        rows.append(
            {
                "testbed": path.name,
                "estimator": label,
                "bits": float(bits.mean(-1).max()),
                "vs uniform bits": float(bits.mean(-1).max()) - UNIFORM_LOCALIZABILITY_BITS,
                "bias vs 256 bits": float(bias[worst]),
                "bias SE": float(bias_se[worst]),
                "worst pattern": scales[worst],
                "patterns over 0.1 + 2 SE": int((bias.abs() > 0.1 + 2 * bias_se).sum()),
                "mean abs bias bits": float(bias.abs().mean()),
                "seconds": seconds[label],
            }
        )
    return rows


def _pattern_names(path: Path, count: int) -> list[str]:
    try:
        return [p["name"] for p in json.loads((path / "patterns.json").read_text())["patterns"]]
    except (OSError, KeyError, ValueError):
        return [str(i) for i in range(count)]


@experiment(
    "localizability_sharp",
    quick={"samples": 16, "exact_samples": 256, "testbeds": "exact-200km-1city", "trained": ""},
)
def localizability_sharp(
    *,
    samples: int = 256,
    exact_samples: int = 20000,
    testbeds: str = ",".join(EXACT_TARGETS),
    trained: str = "/work/testbeds/syn-small",
    trained_samples: int = 128,
) -> dict:
    """The localizability estimators on the exact sharp fields and trained testbeds.

    ``testbeds``: comma-separated exact testbeds; ``trained``: comma-separated trained testbed
    folders (with model/ and heldout.pt; missing: skipped)."""
    targets = exact_targets()
    report = {"rows": []}
    for name in testbeds.split(","):
        report["rows"] += run_testbed(name, targets[name], samples, exact_samples)
        print(f"{name} done", file=sys.stderr, flush=True)
    columns = ["testbed", "estimator", "bits", "vs uniform bits", "bias vs 256 bits", "bias SE",
               "minus exact bits", "its SE", "per-sample error bits", "outside support",
               "seconds"]  # fmt: skip
    print_table(report["rows"], columns)
    report["trained_rows"] = []
    for folder in map(Path, filter(None, trained.split(","))):
        if not (folder / "heldout.pt").exists():
            print(f"skipping trained testbed {folder}: no heldout.pt", file=sys.stderr)
            continue
        report["trained_rows"] += run_trained(folder, trained_samples)
    trained_columns = ["testbed", "estimator", "bits", "vs uniform bits", "bias vs 256 bits",
                       "bias SE", "worst pattern", "patterns over 0.1 + 2 SE",
                       "mean abs bias bits", "seconds"]  # fmt: skip
    if report["trained_rows"]:
        print_table(report["trained_rows"], trained_columns)
    report["target_bias_bits"] = 0.1
    report["load_average_after"] = loadavg()
    return report
