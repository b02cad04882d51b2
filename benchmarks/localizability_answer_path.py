"""The localizability read along the answer's own path, against its own pass (issue 22, tried).

Without guidance an answer's samples follow the model's density, so the localizability could
ride on them: carry the divergence (one JVP, the localizability's Hutchinson estimate) along
the answer's own solve (its solver, grid, steps and precision: the default lagged midpoint on
the published grid, 48 steps, ``mixed``) for 128 of its samples, instead of a second pass of
its own (midpoint, 24 bulk steps plus a stiff end probed per sample). That would add one
network row per step to 128 samples (~6,000 rows) in place of the pass's ~32,000 on a 1-km
answer.

Beside the default pass (its recipe's ``localizability_precision``, "mixed"), the same pass in
bf16 throughout (the default before) and in fp32. All start from the same iid initial states;
each is scored at its own samples against a reference log-density: the closed form on the
exact-field testbeds (float64 exact RFM fields, :mod:`globeflow.core.exact_field`), the exact
log-likelihood (:func:`~globeflow.core.likelihood.log_prob_ode` in fp32, within ~0.03 nats of
dopri5 on these models) on a trained testbed. Reported: the mean over samples of (estimate -
reference) in bits per photo, averaged over photos (the discretisation and rounding bias; the
localizability's target is |bias| <= 0.1 bit), and seconds per photo of each (the answer-path
column is a whole solve here, not its marginal cost).

    python benchmarks/run.py localizability_answer_path [-p testbed=syn-small] --threads 2
"""

from __future__ import annotations

import math
import time

import torch
from _common import print_table
from _registry import Skipped, experiment
from _testbeds import TRAINED_ROOT, exact_field_testbeds, trained_testbeds

from globeflow.core import likelihood
from globeflow.core.path_field import probe_signs
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, resolve

LN2 = math.log(2.0)


@torch.no_grad()
def answer_path_log_density(model, emb: torch.Tensor, x0: torch.Tensor, recipe):
    """Unguided samples (B, N, 3) from x0 (B, N, 3) on the answer's own solve (``recipe``'s
    solver, grid, steps and precision), and their log-densities (B, N) carried along it with
    the one-JVP divergence, without a stiff end of their own."""
    gammas = model.sampling_levels(recipe.steps, emb, grid=recipe.grid).double()
    x, delta = likelihood._integrate_with_log_density(
        model, emb, x0, gammas, recipe.solver, None, recipe.precision, probe_signs(x0)
    )
    return x, model.base_log_prob(x0) + delta


def _bias_bits(log_p: torch.Tensor, reference: torch.Tensor) -> float:
    inside = torch.isfinite(reference)
    return float((log_p.double() - reference.double())[inside].mean()) / LN2


@torch.no_grad()
def compare(bed, photos: int, samples: int, exact: bool) -> dict:
    """One row: each estimator's bias (bits) and seconds per photo on ``bed``."""
    model = bed.model
    recipe = resolve(model, DEFAULT_SAMPLER.with_overrides(guidance=0.0))

    def own_pass(precision: str | None):
        return lambda e, x0: model.sample_with_log_density(
            e, samples, noise=x0, settings=recipe, precision=precision
        )

    estimators = {
        "own pass": own_pass(None),
        "own pass bf16": own_pass("bf16"),
        "own pass fp32": own_pass("fp32"),
        "answer path": lambda e, x0: answer_path_log_density(model, e, x0, recipe),
    }
    bias = {k: [] for k in estimators}
    seconds = {k: 0.0 for k in estimators}
    count = min(photos, bed.emb.shape[0])
    for p in range(count):
        emb = model.prepare_embeddings(bed.emb[p : p + 1])
        x0 = model.prepare_noise(emb, samples, None, torch.Generator().manual_seed(100 + p))
        for name, estimate in estimators.items():
            start = time.perf_counter()
            x, log_p = estimate(emb, x0)
            seconds[name] += time.perf_counter() - start
            if exact:
                reference = bed.log_density(x.double())
            else:
                reference = likelihood.log_prob_ode(model, x, emb, precision="fp32")
            bias[name].append(_bias_bits(log_p, reference))
    row = {"testbed": bed.name, "photos": count}
    for name in estimators:
        row[f"{name} bias bits"] = sum(bias[name]) / count
        row[f"{name} worst photo bits"] = max(bias[name], key=abs)
        row[f"{name} s/photo"] = seconds[name] / count
    return row


@experiment(
    "localizability_answer_path",
    quick={"testbed": "", "photos": 1, "samples": 16, "exact_testbeds": "exact-200km-1city"},
)
def localizability_answer_path(
    *,
    testbed: str = "syn-small",
    per_pattern: int = 2,
    photos: int = 2,
    samples: int = 128,
    exact_testbeds: str = "",
) -> dict:
    """Bias of the localizability read along the answer's path, against its own pass.

    ``testbed``: a trained testbed under ``GLOBEFLOW_TESTBEDS`` ("": exact fields only);
    ``exact_testbeds``: comma-separated exact-field testbeds ("": all)."""
    rows = []
    wanted = set(exact_testbeds.split(",")) if exact_testbeds else None
    for bed in exact_field_testbeds(photos_per_target=photos):
        if wanted is None or bed.name in wanted:
            rows.append(compare(bed, photos, samples, exact=True))
    if testbed:
        if not (TRAINED_ROOT / testbed / "model").is_dir():
            raise Skipped(f"{TRAINED_ROOT / testbed}: not built (benchmarks/run.py testbeds_build)")
        for bed in trained_testbeds(testbed, per_pattern=per_pattern):
            rows.append(compare(bed, photos, samples, exact=False))
    names = ("own pass", "own pass bf16", "own pass fp32", "answer path")
    columns = ["testbed", "photos", *(f"{n} bias bits" for n in names),
               "own pass worst photo bits", "answer path worst photo bits",
               *(f"{n} s/photo" for n in names)]  # fmt: skip
    print_table(rows, columns)
    return {"rows": rows, "target_bias_bits": 0.1}
