"""The localizability in two levels against the plain estimate, in one run, on models that know
something and on a diffuse one.

For each model and photo, from the same initial states: the plain estimate (the recipe's pass
on N samples, ``localizability_estimator="plain"``, what the default was) and the two-level one
(:mod:`globeflow.core.localizability`: a coarse pass on N + N/4 samples corrected by the
recipe's pass on the first N/4, or plain for a photo where that would be less precise),
interleaved, best of ``repeats``. Reported: seconds, the
paired difference of the estimates (both have the recipe's pass's expectation), each one's
Monte Carlo standard error, and the spread of the per-sample correction against the spread of
the log-density (sd(fine - coarse) / sd(fine); the two-level error matches the plain one's
where it is <= 1/4). Models: the bundled one (diffuse; its validation photos) and the trained
testbeds in ``/work/testbeds`` (sharp: one held-out photo per pattern); ``exact=true``: the
exact fields instead (a perfect network, float64; 2 photos per target).

    python benchmarks/run.py localizability_two_level --threads 2
"""

from __future__ import annotations

import torch
from _common import best_of_interleaved
from _registry import experiment
from _testbeds import comparison_on_models, exact_field_testbeds

from globeflow.core.localizability import (
    bits_and_stderr,
    two_level_localizability,
    two_level_log_densities,
    two_level_sizes,
)
from globeflow.core.sampler_settings import PLAIN, resolve


def _compare(model, emb: torch.Tensor, samples: int, repeats: int) -> dict:
    recipe = resolve(model, localizability_samples=samples)  # the model's own recipe
    plain = resolve(model, localizability_samples=samples, localizability_estimator=PLAIN)
    fine, coarse = two_level_sizes(samples)
    x0 = model.prepare_noise(emb, coarse, None, torch.Generator().manual_seed(0))

    def run_plain():
        _, log_p = model.sample_with_log_density(emb, samples, noise=x0[:, :samples],
                                                 settings=plain)  # fmt: skip
        return bits_and_stderr(log_p)

    def run_two_levels():
        return two_level_localizability(model, emb, x0, recipe)

    best, out = best_of_interleaved({"plain": run_plain, "two-level": run_two_levels}, repeats)
    (plain_bits, plain_se), (bits, se, fell_back) = out["plain"], out["two-level"]
    fine_lp, coarse_lp = two_level_log_densities(model, emb, x0, recipe, fine)  # untimed
    spread = (fine_lp - coarse_lp[:, :fine]).double().std(-1) / fine_lp.double().std(-1)
    diff = bits - plain_bits.double()
    return {
        "plain s": best["plain"], "two-level s": best["two-level"],
        "speed-up": best["plain"] / best["two-level"],
        "photos plain (fell back)": int(fell_back.sum()),
        "diff mean bits": float(diff.mean()), "diff max bits": float(diff.abs().max()),
        "MC stderr plain bits": float(plain_se.mean()),
        "MC stderr two-level bits": float(se.mean()),
        "correction spread / log p spread (max)": float(spread.max()),
        "correction spread / log p spread (mean)": float(spread.mean()),
    }  # fmt: skip


@experiment("localizability_two_level", quick={"photos": 2, "samples": 32, "testbeds": ""})
def localizability_two_level(
    *, photos: int = 8, samples: int = 128, repeats: int = 2,
    testbeds: str = "syn-small,syn-published", exact: bool = False,
) -> dict:  # fmt: skip
    models = None
    if exact:
        models = {bed.name: (bed.model, bed.emb) for bed in exact_field_testbeds(2)}
    return comparison_on_models(
        testbeds, photos, samples, lambda model, emb: _compare(model, emb, samples, repeats),
        models,
    )  # fmt: skip
