"""The adaptive sample count against a fixed 1,024 (and 256): answer accuracy and cost.

On a trained testbed (its cells: one and three cities, 1 to 2,000 km), each photo's answer is
drawn as ``predict`` draws it (``answers.draw.draw_answers``, the default sampler, no
localizability) with four recipes (:data:`COUNTS`): fixed 1,024 from iid noise (the reference),
adaptive from iid noise (256 first, more up to 1,024 where the Monte Carlo errors are beyond
tolerance), adaptive from Sobol nets (the default since issue 22: errors read off the nets'
spread) and a fixed 256 from Sobol nets. Over paired seeds: the best guess's error (median km),
acc@1/25/200 km, the total variation between the samples' shares of the true places and the
truth's, the top region's probability, the samples drawn and the seconds per photo. A recipe is
within noise of the reference when every metric's mean is within twice the reference's
seed-to-seed standard deviation, at least 10% + 0.1 km (km), 0.05 (shares) or one photo
(fractions of photos), as in ``confident``.

    python benchmarks/run.py adaptive_samples [-p testbed=syn-small] [-p guidances=0,2]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from _common import print_table
from _registry import experiment
from _testbeds import TRAINED_ROOT, Testbed, noise_band, place_shares, trained_testbeds

from globeflow.answers.decode import best_guess, top_regions
from globeflow.answers.draw import draw_answers
from globeflow.core.random_streams import photo_generators
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, resolve
from globeflow.core.sphere import haversine_km

COUNTS = {
    "fixed 1024 iid": {"first_samples": 0, "noise": "iid"},
    "adaptive iid": {"noise": "iid"},
    "adaptive sobol": {"noise": "sobol"},
    "fixed 256 sobol": {"num_samples": 256, "first_samples": 0, "noise": "sobol"},
}
"""Sample counts and noise designs compared, as overrides of the default recipe (the first is
the reference: every sample at once from independent noise, as the authors draw; "adaptive
sobol" is the default)."""
CRITERIA = {"guess_error_km": "km", "acc_1_km": "photos", "acc_25_km": "photos",
            "acc_200_km": "photos", "place_mass_tv": "share", "top_region_p": "share"}  # fmt: skip
"""The metrics a count must match fixed 1,024 on, with their kind of noise floor
(:func:`_testbeds.noise_band`)."""


def answer_metrics(bed: Testbed, samples: list[torch.Tensor]) -> dict[str, float]:
    """Accuracy of each photo's samples (N_i, 2) against the testbed's truth, averaged."""
    guesses = torch.stack([best_guess(s) for s in samples])
    error = haversine_km(guesses.double(), bed.true_location.double())
    truth = bed.truth(4096, torch.Generator().manual_seed(123))
    tv = [
        0.5 * float((place_shares(s[None], [bed.places[i]])[0]
                     - place_shares(truth[i : i + 1], [bed.places[i]])[0]).abs().sum())
        for i, s in enumerate(samples)
    ]  # fmt: skip
    out = {f"acc_{t}_km": float((error <= t).double().mean()) for t in (1, 25, 200)}
    return {
        "guess_error_km": float(error.median()),
        **out,
        "place_mass_tv": statistics.fmean(tv),
        "top_region_p": statistics.fmean(top_regions(s)[0].probability for s in samples),
        "samples": statistics.fmean(s.shape[0] for s in samples),
    }


@experiment("adaptive_samples", quick={"cells": "1km-x1", "seeds": 2, "guidances": "0"})
def adaptive_samples(
    *,
    testbed: str = "syn-small",
    cells: str = "",
    guidances: str = "0,2",
    per_pattern: int = 2,
    seeds: int = 3,
    root: Path = TRAINED_ROOT,
) -> dict:
    """Options: ``testbed``; ``cells`` (comma-separated SCALE-xCITIES, default all);
    ``guidances``; ``per_pattern`` held-out photos per pattern; ``seeds`` paired seeds."""
    rows, report = [], []
    for guidance in (float(g) for g in guidances.split(",")):
        for bed in trained_testbeds(testbed, root, per_pattern, guidance):
            cell = bed.name.split(f"{testbed}-", 1)[1]
            if cells and cell not in cells.split(","):
                continue
            ids = [f"{bed.name}/{i}" for i in range(bed.emb.shape[0])]
            results = {}
            for label, counts in COUNTS.items():
                recipe = resolve(bed.model, DEFAULT_SAMPLER, guidance=guidance,
                                 localizability_samples=0, **counts)  # fmt: skip
                runs, spent = [], 0.0
                for seed in range(seeds):
                    start = time.perf_counter()
                    streams = photo_generators(seed, ids)
                    samples, _, _, _ = draw_answers(bed.model, bed.emb, streams, recipe)
                    spent += time.perf_counter() - start
                    runs.append(answer_metrics(bed, samples))
                mean = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
                results[label] = {"mean": mean, "runs": runs,
                                  "s/photo": spent / seeds / len(ids)}  # fmt: skip
            ref = results["fixed 1024 iid"]
            for label, res in results.items():
                res["within_noise"] = all(
                    abs(res["mean"][k] - ref["mean"][k])
                    <= noise_band(kind, [r[k] for r in ref["runs"]], len(ids))
                    for k, kind in CRITERIA.items()
                )
                rows.append({"cell": cell, "guidance": guidance, "count": label,
                             **{k: round(v, 3) for k, v in res["mean"].items()},
                             "s/photo": round(res["s/photo"], 3),
                             "within noise": res["within_noise"]})  # fmt: skip
            report.append({"name": bed.name, "guidance": guidance, "photos": len(ids),
                           "results": results})  # fmt: skip
    if rows:
        print_table(rows, list(rows[0]))
    return {"testbeds": report}
