"""Randomized quasi-Monte Carlo initial noise: how much Monte Carlo error of an answer it removes.

The answer's samples are a deterministic map (the flow) of their initial noise, uniform on S^2.
Each number of the answer is a mean over samples: a region's probability, the best guess's
expected GeoScore, the localizability. Drawn independently (iid), the error of such a
mean falls like 1 / sqrt(N). With a scrambled Sobol net mapped to the sphere by an
area-preserving map (z = 1 - 2u, phi = 2 pi v), each point is still uniform. The points cover
the sphere evenly, so the mean of a function that is smooth in the noise converges faster:
e.g. the share of noise that the flow carries to one place, where that preimage has a smooth
boundary.

For one photo of each cell asked, ``replicates`` independent answers per design (iid, and Sobol
with independent scrambles) at each N. Reported: the standard deviation over replicates of
- the place shares (the largest over the photo's true places),
- the best guess's expected GeoScore, and the best guess's spread (median km from the
  replicates' mean guess),
- the localizability (its own pass, at ``localizability_samples``);
and the "equivalent iid samples", N x (SD iid / SD Sobol)^2. The answer is also drawn as
``noise="sobol"`` draws it ("sobol x8": 8 nets of N / 8), with the share's standard error it
reads off its nets. Every design uses the default recipe at the cell's guidance; only the
initial noise differs.

    python benchmarks/run.py noise_design [-p cells=1km-x1,1km-x3] [-p guidances=0,2]
"""

from __future__ import annotations

import math
import statistics

import torch
from _common import gemm_rates, print_table
from _registry import experiment
from _testbeds import Testbed, place_shares, trained_testbeds

from globeflow.answers.decode import best_guess
from globeflow.answers.monte_carlo import geoscores, replicate_stderr
from globeflow.core.random_streams import photo_generators, replicate_ids, stream_noise
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, resolve
from globeflow.core.sphere import haversine_km, sample_uniform_sphere, sobol_sphere

LN2 = math.log(2.0)


def iid_on_sphere(n: int, seed: int) -> torch.Tensor:
    """n independent uniform points on S^2, (n, 3) float64."""
    generator = torch.Generator().manual_seed(seed)
    return sample_uniform_sphere((n,), generator=generator, dtype=torch.float64)


def sobol_on_sphere(n: int, seed: int) -> torch.Tensor:
    """One scrambled Sobol net of n points on S^2, (n, 3) float64."""
    return sobol_sphere(n, seed, dtype=torch.float64)


DESIGNS = {"iid": iid_on_sphere, "sobol": sobol_on_sphere}
"""The localizability's designs: iid points, one scrambled net."""
ANSWER_DESIGNS = ("iid", "sobol", "sobol x8")
"""The answer's: also "sobol x8", the package's ``noise="sobol"`` layout (8 independently
scrambled nets, :func:`globeflow.core.random_streams.stream_noise`), whose error the answer
reads off the nets' spread."""


def answer_spread(bed: Testbed, n: int, replicates: int, design: str) -> dict[str, float]:
    """SDs over replicates of one photo's place shares (the most variable place's), expected
    GeoScore and best guess; for "sobol x8" also the root mean square of the share's standard
    error as the answer reads it off its nets (``read SE share``)."""
    emb, places = bed.emb[:1], bed.places[:1]
    shares, scores, guesses, read = [], [], [], []
    for r in range(replicates):
        nets = None
        if design == "sobol x8":
            noise, padded = stream_noise(bed.model, photo_generators(r, [bed.name]), n, emb,
                                         "sobol")  # fmt: skip
            nets = replicate_ids(n, padded, 0)
        else:
            noise = DESIGNS[design](n, 1000 + r).to(emb.dtype)[None]
        samples = bed.model.sample(emb, n, guidance=bed.guidance, noise=noise[:, :n])[0]
        shares.append(place_shares(samples[None], places)[0])
        if nets is not None:
            d = haversine_km(samples[:, None, :].double(), places[0][None].double())
            nearest = torch.nn.functional.one_hot(d.argmin(-1), len(places[0])).double()
            read.append(replicate_stderr(nearest, nets))
        guess = best_guess(samples)
        guesses.append(guess)
        scores.append(float(geoscores(guess[None].double(), samples.double())[0].mean()))
    guesses = torch.stack(guesses).double()
    centre = guesses.mean(0, keepdim=True).expand_as(guesses)
    spread = torch.stack(shares).std(0)
    place = int(spread.argmax())
    out = {
        "sd share": float(spread[place]),
        "sd score": statistics.stdev(scores),
        "guess spread km": float(haversine_km(guesses, centre).median()),
    }
    if read:
        out["read SE share"] = float(torch.stack(read)[:, place].pow(2).mean().sqrt())
    return out


def localizability_spread(bed: Testbed, n: int, replicates: int, design: str) -> float:
    """SD over replicates of one photo's localizability (bits) from n samples."""
    emb = bed.emb[:1]
    recipe = resolve(bed.model, DEFAULT_SAMPLER)
    values = []
    for r in range(replicates):
        noise = DESIGNS[design](n, 2000 + r).to(emb.dtype)[None]
        _, log_p = bed.model.sample_with_log_density(emb, n, noise=noise, settings=recipe)
        values.append(float(log_p.mean()) / LN2)
    return statistics.stdev(values)


def equivalent(n: int, sd_iid: float, sd_sobol: float) -> float | None:
    """iid samples that would give the Sobol design's SD: n (sd_iid / sd_sobol)^2 (None where
    neither varies, e.g. the place share of a one-city answer)."""
    if sd_sobol == 0.0:
        return None if sd_iid == 0.0 else math.inf
    return n * (sd_iid / sd_sobol) ** 2


@experiment(
    "noise_design",
    quick={
        "cells": "1km-x1",
        "guidances": "0",
        "samples": "64",
        "localizability_samples": "16",
        "replicates": 3,
    },
)
def noise_design(
    *,
    testbed: str = "syn-small",
    cells: str = "1km-x1,1km-x3,25km-x1,200km-x3,2000km-x3",
    guidances: str = "0,2",
    samples: str = "256,1024",
    localizability_samples: str = "32,128",
    replicates: int = 16,
) -> dict:
    """iid against scrambled Sobol initial noise on one photo per cell.

    - ``testbed``: a trained testbed (``GLOBEFLOW_TESTBEDS``)
    - ``cells``: comma-separated cells (scale and cities, e.g. 1km-x3)
    - ``guidances``: comma-separated guidance scales of the answer's samples
    - ``samples``: comma-separated sample counts of the answer
    - ``localizability_samples``: comma-separated sample counts of the localizability (guidance
      0 only: it is unguided)
    - ``replicates``: independent answers per design and count
    """
    report = {"gemm_gflops": gemm_rates(), "replicates": replicates}
    wanted = cells.split(",")
    rows, loc_rows = [], []
    for w in (float(g) for g in guidances.split(",")):
        beds = trained_testbeds(testbed, per_pattern=1, guidance=w)
        for bed in [b for b in beds if b.name.removeprefix(testbed + "-") in wanted]:
            for n in (int(v) for v in samples.split(",")):
                spread = {d: answer_spread(bed, n, replicates, d) for d in ANSWER_DESIGNS}
                row = {"cell": bed.name, "w": w, "N": n}
                for key in ("sd share", "sd score", "guess spread km"):
                    row.update({f"{key} {d}": spread[d][key] for d in ANSWER_DESIGNS})
                row["read SE share sobol x8"] = spread["sobol x8"].get("read SE share")
                row["iid-equivalent N (share)"] = equivalent(
                    n, spread["iid"]["sd share"], spread["sobol"]["sd share"]
                )
                row["iid-equivalent N (score)"] = equivalent(
                    n, spread["iid"]["sd score"], spread["sobol"]["sd score"]
                )
                rows.append(row)
                print(row, flush=True)
            if w != 0.0:
                continue
            for n in (int(v) for v in localizability_samples.split(",")):
                sd = {d: localizability_spread(bed, n, replicates, d) for d in DESIGNS}
                loc_rows.append(
                    {
                        "cell": bed.name,
                        "N": n,
                        "sd bits iid": sd["iid"],
                        "sd bits sobol": sd["sobol"],
                        "iid-equivalent N": equivalent(n, sd["iid"], sd["sobol"]),
                    }
                )
                print(loc_rows[-1], flush=True)
    print_table(rows, list(rows[0]) if rows else [])
    print()
    print_table(loc_rows, list(loc_rows[0]) if loc_rows else [])
    report.update({"answers": rows, "localizability": loc_rows, "gemm_gflops_after": gemm_rates()})
    return report
