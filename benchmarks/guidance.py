"""Choosing the default guidance for models that recommend none, on testbeds with a known answer.

A checkpoint may carry ``recommended_guidance`` in its metadata; every model trained with
``globeflow train`` and every published PLONK checkpoint carries none and gets the fallback
``DEFAULT_GUIDANCE``. This benchmark measures what each guidance scale gives on the trained
synthetic testbeds (``python benchmarks/run.py testbeds_build``), whose true posterior is known:

- the best guess: its expected distance to the true location under the true posterior (mean
  over photos of E_truth[d(guess, y)], from truth samples), the median distance to one drawn
  true location, and acc@1/25/200 km;
- the region probabilities: each region of the answer (:func:`answers.decode.top_regions`, at
  the samples' own scale as ``predict`` finds them) claims a probability p; the true posterior
  puts a mass q inside the region's radius. ``calibration_error``: the mean |p - q| over the
  regions of all photos (0: every probability is what the truth says); ``overconfidence``: the
  mean p - q (> 0: the answer claims more than the truth gives);
- ``truth_in_top_region``: how often the drawn true location lies in the top region, beside the
  mean probability the answer claims for it.

Samples are drawn with ``predict``'s recipe (``sampler`` to change it) at each guidance.

    python benchmarks/run.py guidance
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import loadavg, print_table
from _registry import experiment
from _testbeds import TRAINED_ROOT, trained_testbeds

from globeflow.answers.decode import best_guess, top_regions
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, SamplerSettings
from globeflow.core.sphere import haversine_km

GUIDANCES = (0.0, 0.5, 1.0, 2.0, 3.0)
KM = (1.0, 25.0, 200.0)
"""Accuracy thresholds of the best guess, km."""


def photo_scores(samples: torch.Tensor, truth: torch.Tensor, true_location: torch.Tensor) -> dict:
    """One photo's numbers: samples (N, 2), truth samples (T, 2), the drawn truth (2,)."""
    guess = best_guess(samples)
    expected_km = float(haversine_km(guess.double()[None], truth.double()).mean())
    error_km = float(haversine_km(guess.double(), true_location.double()))
    regions = top_regions(samples)
    claimed, true_mass, hit_top = [], [], False
    for j, region in enumerate(regions):
        centre = torch.tensor([region.lat, region.lon], dtype=torch.float64)
        inside = haversine_km(centre[None], truth.double()) <= region.radius_km
        claimed.append(region.probability)
        true_mass.append(float(inside.double().mean()))
        if j == 0:
            hit_top = float(haversine_km(centre, true_location.double())) <= region.radius_km
    return {
        "expected_km": expected_km,
        "error_km": error_km,
        "claimed": claimed,
        "true_mass": true_mass,
        "hit_top": hit_top,
        "top_claim": claimed[0] if claimed else 0.0,
    }


def run(
    name: str,
    guidances: list[float],
    per_pattern: int,
    samples: int,
    truth_samples: int,
    seed: int,
    sampler: SamplerSettings,
) -> list[dict]:
    """Rows per (testbed cell, guidance) for one trained testbed model."""
    rows = []
    for w in guidances:
        beds = trained_testbeds(name, per_pattern=per_pattern, guidance=w)
        for bed in beds:
            start = time.perf_counter()
            g = torch.Generator().manual_seed(seed)
            drawn = bed.model.sample(bed.emb, samples, guidance=w, generator=g, settings=sampler)
            truth = bed.truth(truth_samples, torch.Generator().manual_seed(99))
            scores = [
                photo_scores(drawn[p], truth[p], bed.true_location[p]) for p in range(len(bed.emb))
            ]
            claimed = [c for s in scores for c in s["claimed"]]
            true_mass = [q for s in scores for q in s["true_mass"]]
            errors = [s["error_km"] for s in scores]
            gaps = list(zip(claimed, true_mass, strict=True))
            row = {
                "testbed": bed.name,
                "guidance": w,
                "photos": len(bed.emb),
                "expected_error_km": statistics.fmean(s["expected_km"] for s in scores),
                "guess_error_median_km": statistics.median(errors),
                **{f"acc_{t:g}_km": statistics.fmean(e <= t for e in errors) for t in KM},
                "calibration_error": statistics.fmean(abs(p - q) for p, q in gaps),
                "overconfidence": statistics.fmean(p - q for p, q in gaps),
                "truth_in_top_region": statistics.fmean(float(s["hit_top"]) for s in scores),
                "top_region_claim": statistics.fmean(s["top_claim"] for s in scores),
                "seconds": time.perf_counter() - start,
            }  # fmt: skip
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per guidance: the means over testbed cells."""
    out = []
    keys = ["expected_error_km", "guess_error_median_km", "acc_1_km", "acc_25_km"]
    keys += ["calibration_error", "overconfidence", "truth_in_top_region", "top_region_claim"]
    for model in sorted({r["testbed"].rsplit("-", 2)[0] for r in rows}):
        for w in sorted({r["guidance"] for r in rows}):
            mine = [r for r in rows if r["guidance"] == w and r["testbed"].startswith(model + "-")]
            if mine:
                out.append({"model": model, "guidance": w, "cells": len(mine)}
                           | {k: statistics.fmean(r[k] for r in mine) for k in keys})  # fmt: skip
    return out


@experiment(
    "guidance",
    quick={
        "testbeds": "syn-small",
        "guidances": "0",
        "per_pattern": 1,
        "samples": 16,
        "truth_samples": 64,
    },
)
def guidance(
    *,
    testbeds: str = "syn-small,syn-published",
    guidances: str = ",".join(f"{w:g}" for w in GUIDANCES),
    per_pattern: int = 2,
    samples: int = DEFAULT_SAMPLER.num_samples,
    truth_samples: int = 4096,
    seed: int = 0,
    sampler: str | None = None,
) -> dict:
    """Each guidance of ``guidances`` (comma-separated) on the trained ``testbeds``.

    ``sampler``: "solver/grid/steps/precision" (None: predict's recipe)."""
    scales = [float(w) for w in guidances.split(",")]
    recipe = DEFAULT_SAMPLER
    if sampler:
        solver, grid, steps, precision = sampler.split("/")
        recipe = DEFAULT_SAMPLER.with_overrides(
            solver=solver, grid=grid, steps=int(steps), precision=precision
        )
    names = [n for n in testbeds.split(",") if (TRAINED_ROOT / n / "model").is_dir()]
    if not names:
        print(f"no trained testbeds in {TRAINED_ROOT}: python benchmarks/run.py testbeds_build")
        return {"skipped": f"no trained testbeds in {TRAINED_ROOT}"}
    report = {"sampler": recipe.describe(), "samples": samples}
    rows = [
        row
        for name in names
        for row in run(name, scales, per_pattern, samples, truth_samples, seed, recipe)
    ]
    summary = summarise(rows)
    columns = ["model", "guidance", "cells", "expected_error_km", "guess_error_median_km"]
    columns += ["acc_1_km", "acc_25_km", "calibration_error", "overconfidence"]
    columns += ["truth_in_top_region", "top_region_claim"]
    print_table(summary, columns)
    report.update({"rows": rows, "summary": summary, "load_average_after": loadavg()})
    return report
