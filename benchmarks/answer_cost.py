"""The cost of an answer at ``predict``'s defaults, by stage, against the authors' pipeline call.

On a trained testbed (``GLOBEFLOW_TESTBEDS``, default /work/testbeds; ``syn-published`` is the
published width: dim 512, depth 12, cond_dim 1024, 36M parameters), for each cell asked (scale
and number of cities) and each guidance, the whole ``Locator.locate_embeddings`` answer at its
defaults, from embeddings (no encoder), timed by stage:

* ``samples``: the answer's samples (adaptive: ``first_samples``, then more only where the
  answer's Monte Carlo errors are beyond tolerance; ``samples drawn`` is the mean per photo),
* ``localizability``: its own unguided pass with divergences,
* ``decode``: best guess, regions and the Monte Carlo check of the adaptive count,
* ``place names``: reverse geocoding, and ``other`` (result assembly);

with the matrix-product FLOPs of the samples and of the localizability (``count_flops``), the
seconds they take at this run's GEMM peak of the precision each runs at (the floor of that
arithmetic here, :func:`floor_seconds`) and the share of the peak reached. In the same run,
the authors' own sampler (``../shared/reference``, their ``riemannian_flow_sampler``: Euler,
their grid, ``authors_steps`` steps, ``authors_samples``
samples, fp32, the same guidance, the same weights exported in the published format): what their
``PLONKPipeline`` call spends per photo (it returns samples only, without regions,
localizability or names). Accuracy of both against the testbed's truth (best-guess error,
samples within 25 km of a true place) in the same run.

    python benchmarks/run.py answer_cost [-p testbed=syn-published] [-p cells=1km-x1,200km-x3]
        [-p guidances=0,2] [--threads 2]
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import EmbeddingsOnly, count_flops, gemm_rates, print_table, stage_timers
from _reference_code import ReferenceCode, find_source
from _registry import Skipped, experiment
from _testbeds import TRAINED_ROOT, Testbed, nearest_place_km, trained_testbeds

from globeflow.answers import draw
from globeflow.apps import pipeline
from globeflow.core.checkpoints import save_plonk_network
from globeflow.core.guidance import level_precisions
from globeflow.core.solvers import SOLVERS
from globeflow.core.sphere import haversine_km, sample_uniform_sphere, unit_to_latlon
from globeflow.core.time_grids import sampling_grid

STAGES = ("samples", "localizability", "decode", "place names", "other")


RANDOM_PUBLISHED = "random-published"
"""The ``testbed`` of the issue's own measurement: the authors' published-size network with
random weights (their ``make_yfcc_size.py``) and random embeddings. Speed only: it has no true
answer, and its posterior is nearly uniform (localizability ~-3 bits against the uniform
-3.65), the diffuse extreme that draws the most samples."""


def _random_published(ref: ReferenceCode, photos: int, out: Path) -> Testbed:
    """A :data:`RANDOM_PUBLISHED` testbed of ``photos`` photos, its network written to ``out``."""
    from globeflow.core.checkpoints import load_model

    ref.write_yfcc_size_network(out)
    model = load_model(out)
    emb = torch.randn(photos, model.cond_dim, generator=torch.Generator().manual_seed(0))
    return Testbed(RANDOM_PUBLISHED, model, emb, None, None, torch.zeros(photos, 2), math.inf,
                   regime="diffuse")  # fmt: skip


def _accuracy(bed: Testbed, samples: list[torch.Tensor]) -> dict:
    """Median best-guess error (km) and the share of samples within 25 km of a true place (NaN
    without a true answer)."""
    if bed.places is None:
        return {"guess_error_km": math.nan, "within_25_km": math.nan}
    guesses = torch.stack([pipeline.best_guess(s) for s in samples])
    error = haversine_km(guesses.double(), bed.true_location.double())
    near = [
        float((nearest_place_km(s[None], [bed.places[i]]) <= 25.0).double().mean())
        for i, s in enumerate(samples)
    ]
    return {"guess_error_km": float(error.median()), "within_25_km": statistics.fmean(near)}


def _our_answer(bed: Testbed, guidance: float) -> dict:
    """Seconds per photo by stage of the default answer, its FLOPs and its accuracy."""
    model, emb = bed.model, bed.emb
    locator = pipeline.Locator(model, EmbeddingsOnly(model.cond_dim), bed.name)
    targets = [
        (locator, "_draw", "draw"),
        (draw, "_localizability", "localizability"),
        (draw, "more_samples", "decode"),
        (pipeline, "best_guess", "decode"),
        (pipeline, "top_regions", "decode"),
        (pipeline, "_place_names", "place names"),
    ]
    locator.locate_embeddings(emb[:1], guidance=guidance)  # warm-up: the geocoder's tables
    with stage_timers(targets) as stages:
        start = time.perf_counter()
        results = locator.locate_embeddings(emb, guidance=guidance)
        stages["total"] = time.perf_counter() - start
    stages["samples"] = stages.pop("draw") - stages.get("localizability", 0.0)
    stages["other"] = stages["total"] - sum(stages.get(s, 0.0) for s in STAGES[:-1])
    photos = emb.shape[0]
    samples = [torch.tensor(r["samples"], dtype=torch.float64) for r in results]
    settings = results[0]["settings"]
    no_loc = {"guidance": guidance, "localizability_samples": 0}
    alone: list[dict] = []
    answer_flops = count_flops(lambda: alone.extend(locator.locate_embeddings(emb, **no_loc)))
    # Without the localizability's draws each stream runs on to other samples, and an adaptive
    # answer may stop at another count: scale to the samples the timed answer drew (the
    # answer's products are linear in its samples).
    answer_flops *= sum(len(s) for s in samples) / sum(len(r["samples"]) for r in alone)
    all_flops = count_flops(lambda: locator.locate_embeddings(emb, guidance=guidance))
    return {
        "settings": settings,
        "seconds_per_photo": {k: v / photos for k, v in stages.items()},
        "samples_drawn": statistics.fmean(len(s) for s in samples),
        "localizability_stderr_bits": statistics.fmean(
            r["localizability_stderr_bits"] for r in results
        ),
        "gflop_per_photo": {
            "samples": answer_flops / photos / 1e9,
            "localizability": (all_flops - answer_flops) / photos / 1e9,
        },
        "accuracy": _accuracy(bed, samples),
    }


def precision_shares(model, settings: dict) -> dict[str, float]:
    """The share of the answer's network evaluations at each precision: all at ``precision``,
    or for "mixed" the share of its solver's levels on each side of the switch (every level is
    evaluated once per step, for every sample)."""
    precision = settings.get("precision", "fp32")
    if precision != "mixed":
        return {precision: 1.0}
    solver = SOLVERS.get(settings["solver"])  # None: the family's published step
    grid = settings["grid"] or (solver.grid if solver else "published")
    gammas = sampling_grid(grid, model.schedule, settings["steps"])
    levels = solver.levels(gammas) if solver else gammas[:-1]  # its step: one per level
    per_level = level_precisions(precision, levels)
    return {p: per_level.count(p) / len(per_level) for p in set(per_level)}


def floor_seconds(gflop: dict, shares: dict, settings: dict, rates: dict) -> float:
    """Seconds per photo of the answer's matrix products at this run's GEMM peak of the
    precision each runs at (the samples at ``shares`` of :func:`precision_shares`, the
    localizability pass at ``localizability_precision``; a ``mixed`` pass, whose samples each
    switch to fp32 on a stiff-end grid of their own, at the bf16 peak: a lower bound): the
    floor of that arithmetic here."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}
    peak = {p: rates[d]["peak"] for p, d in dtype.items()}
    samples = sum(gflop["samples"] * share / peak[p] for p, share in shares.items())
    localizability = settings.get("localizability_precision", "fp32")
    return samples + gflop["localizability"] / peak.get(localizability, peak["bf16"])


def _authors_answer(
    ref: ReferenceCode, bed: Testbed, guidance: float, samples: int, steps: int
) -> dict:
    """Seconds per photo of the authors' sampler on the same weights, and its accuracy."""
    model, emb = bed.model, bed.emb
    noise = sample_uniform_sphere((emb.shape[0], samples), generator=torch.Generator())
    with tempfile.TemporaryDirectory(prefix="gf-cost-") as tmp:
        net = ref.load_network(save_plonk_network(model, Path(tmp)))
        ref.sample(net, emb[:1], noise[:1, :8], 2, guidance)  # warm-up
        start = time.perf_counter()
        out = ref.sample(net, emb, noise, steps, guidance)
        seconds = time.perf_counter() - start
    latlon = [unit_to_latlon(x.double()) for x in out]
    return {
        "seconds_per_photo": seconds / emb.shape[0],
        "samples": samples,
        "steps": steps,
        "accuracy": _accuracy(bed, latlon),
    }


@experiment(
    "answer_cost",
    quick={"cells": "1km-x1", "per_pattern": 1, "guidances": "0", "authors_steps": 8,
           "authors_samples": 64},
    default=True,
    threads=2,
)  # fmt: skip
def answer_cost(
    *,
    testbed: str = "syn-small",
    cells: str = "1km-x1,1km-x3,200km-x3",
    per_pattern: int = 1,
    guidances: str = "0,2",
    authors_samples: int = 1024,
    authors_steps: int = 250,
    root: Path = TRAINED_ROOT,
) -> dict:
    """Options:

    - ``testbed``: trained testbed (``syn-small``, ``syn-published``, ...), or
      ``random-published`` (:data:`RANDOM_PUBLISHED`: speed only, ``cells`` ignored, 2 photos
      per ``per_pattern``)
    - ``cells``: its cells, as SCALE-xCITIES (e.g. 1km-x1, 200km-x3)
    - ``per_pattern``: held-out photos per pattern
    - ``guidances``: comma-separated guidance scales (both sides)
    - ``authors_samples`` / ``authors_steps``: the authors' pipeline call (theirs: 1024 x 250)
    """
    src, why = find_source()
    ref = ReferenceCode(src) if src is not None else None
    if ref is None:
        print(why)
    rates = gemm_rates()
    rows, report = [], {"gemm_gflops": rates, "cells": []}
    random_bed = None
    if testbed == RANDOM_PUBLISHED:
        if ref is None:
            raise Skipped(f"{RANDOM_PUBLISHED} needs the authors' code: {why}")
        with tempfile.TemporaryDirectory(prefix="gf-cost-net-") as tmp:
            random_bed = _random_published(ref, 2 * per_pattern, Path(tmp))
    for guidance in (float(g) for g in guidances.split(",")):
        if random_bed is not None:
            beds = [random_bed]
        else:
            beds = trained_testbeds(testbed, root, per_pattern, guidance)
            beds = [b for b in beds if b.name.split(f"{testbed}-", 1)[1] in cells.split(",")]
        for bed in beds:
            ours = _our_answer(bed, guidance)
            theirs = (
                _authors_answer(ref, bed, guidance, authors_samples, authors_steps)
                if ref is not None
                else None
            )
            s = ours["seconds_per_photo"]
            flop = sum(ours["gflop_per_photo"].values())
            shares = precision_shares(bed.model, ours["settings"])
            floor = floor_seconds(ours["gflop_per_photo"], shares, ours["settings"], rates)
            row = {
                "cell": bed.name,
                "guidance": guidance,
                "samples drawn": round(ours["samples_drawn"]),
                "bf16 share": round(shares.get("bf16", 0.0), 2),
                **{f"{k} s": round(s.get(k, 0.0), 3) for k in STAGES},
                "total s": round(s["total"], 3),
                "GFLOP": round(flop, 1),
                "floor s": round(floor, 3),
                "% of peak": round(100 * floor / s["total"], 1),
                "guess km": round(ours["accuracy"]["guess_error_km"], 2),
                "in 25 km": round(ours["accuracy"]["within_25_km"], 3),
                "loc SE bits": round(ours["localizability_stderr_bits"], 3),
            }
            if theirs is not None:
                row["authors s"] = round(theirs["seconds_per_photo"], 3)
                row["vs authors (whole answer)"] = round(
                    theirs["seconds_per_photo"] / s["total"], 2
                )
                row["vs authors (samples)"] = round(theirs["seconds_per_photo"] / s["samples"], 2)
                row["authors guess km"] = round(theirs["accuracy"]["guess_error_km"], 2)
                row["authors in 25 km"] = round(theirs["accuracy"]["within_25_km"], 3)
            rows.append(row)
            report["cells"].append({"name": bed.name, "guidance": guidance, "ours": ours,
                                    "authors": theirs, "row": row})  # fmt: skip
    if rows:
        print_table(rows, list(rows[0]))
    return report
