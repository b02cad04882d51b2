"""The localizability with Hutchinson's one-JVP divergence against the exact two-JVP one, in one
run, on models that know something and on a diffuse one.

For each model, ``model.localizability`` of the same photos from the same noise (128 samples,
the recipe's solver, steps and precision), with ``divergence="exact"`` and
``divergence="hutchinson"`` (:mod:`globeflow.core.path_field`: one JVP along e1 + s e2, the
sign s fixed per sample and flipping at each of its steps), interleaved, best of ``repeats``.
Both follow the same paths; the estimate's error has mean zero over the samples' signs, so the
paired difference per photo is reported beside the Monte Carlo standard error of each. Models:
the bundled one (diffuse; its validation photos) and the trained testbeds in
``/work/testbeds`` (sharp: one held-out photo per pattern).

    python benchmarks/run.py localizability_divergence --threads 2
"""

from __future__ import annotations

import contextlib

from _testbeds import localizability_experiment

DIVERGENCES = ("exact", "hutchinson")


def variants(model) -> dict:
    return {d: (contextlib.nullcontext, {"divergence": d}) for d in DIVERGENCES}


def row(model, emb, best, out, samples: int) -> dict:
    (exact, exact_se), (estimate, estimate_se) = (out[d] for d in DIVERGENCES)
    diff = estimate - exact
    return {
        "exact s": best["exact"], "hutchinson s": best["hutchinson"],
        "speed-up": best["exact"] / best["hutchinson"],
        "diff mean bits": float(diff.mean()), "diff max bits": float(diff.abs().max()),
        "MC stderr exact bits": float(exact_se.mean()),
        "MC stderr hutchinson bits": float(estimate_se.mean()),
    }  # fmt: skip


localizability_divergence = localizability_experiment(
    "localizability_divergence", __name__, variants, row
)
