"""The localizability pass at the recipe's precision ("auto": bf16 where native) against fp32,
in one run, on models that know something and on a diffuse one.

For each model, ``model.localizability`` of the same photos from the same noise (128 samples,
the recipe's solver and steps), once with ``precision="fp32"`` (the pass before
``localizability_precision`` existed) and once at the recipe's own precision, interleaved, best
of ``repeats``. Accuracy: the paired difference per photo (the Monte Carlo noise cancels in
it), beside the estimate's own Monte Carlo standard error. Models: the bundled one (diffuse;
its validation photos) and the trained testbeds in ``/work/testbeds`` (sharp, 1 to 2,000 km:
one held-out photo per pattern, ``photos_per_model`` of them).

    python benchmarks/run.py localizability_precision --threads 2
"""

from __future__ import annotations

import contextlib

from _testbeds import localizability_experiment

from globeflow.core.sampler_settings import resolve


def variants(model) -> dict:
    return {p: (contextlib.nullcontext, {"precision": p}) for p in ("fp32", _auto(model))}


def row(model, emb, best, out, samples: int) -> dict:
    auto = _auto(model)
    diff = out[auto][0] - out["fp32"][0]
    return {
        "default": auto, "fp32 s": best["fp32"], "default s": best[auto],
        "speed-up": best["fp32"] / best[auto],
        "diff mean bits": float(diff.mean()),
        "diff sd bits": float(diff.std()) if len(diff) > 1 else 0.0,
        "diff max bits": float(diff.abs().max()),
        "MC stderr bits": float(out["fp32"][1].mean()),
    }  # fmt: skip


localizability_precision = localizability_experiment(
    "localizability_precision", __name__, variants, row, quick_testbeds="syn-small"
)


def _auto(model) -> str:
    """The recipe's own localizability precision for this model ("auto" resolved)."""
    return resolve(model).localizability_precision
