"""bf16 against fp32 where answers are sharp: how far bfloat16 moves the samples, in km.

On the sharpest trained testbeds (/work/testbeds, :func:`_testbeds.all_trained_testbeds`), every
photo's samples are drawn twice from the same noise with the default sampler, in fp32 and in
bf16. Reported per testbed: the paired distance between the two (median, p90), and the sample
miss and best-guess error of each against the truth. Tolerance (docs/defaults.md): bf16's sample
miss and best-guess error within 10% + 0.1 km of fp32's.

    python benchmarks/run.py bf16_sharp
"""

from __future__ import annotations

import torch
from _common import print_table
from _registry import experiment
from _testbeds import all_trained_testbeds, posterior_metrics

from globeflow.answers.decode import best_guess
from globeflow.core.precision import native_bf16
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, solver_for
from globeflow.core.sphere import haversine_km, sample_uniform_sphere


def within(bf16: float, fp32: float) -> bool:
    return abs(bf16 - fp32) <= 0.1 * fp32 + 0.1


def compare(bed, samples: int) -> dict:
    noise = sample_uniform_sphere(
        (len(bed.emb), samples), generator=torch.Generator().manual_seed(0)
    )
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = bed.model.sample(
            bed.emb, samples, DEFAULT_SAMPLER.steps, bed.guidance, noise=noise,
            solver=DEFAULT_SAMPLER.solver, grid=DEFAULT_SAMPLER.grid, precision=precision,
        )  # fmt: skip
    truth = bed.truth(samples, torch.Generator().manual_seed(1))
    paired = haversine_km(out["bf16"].double(), out["fp32"].double())
    guesses = haversine_km(best_guess(out["bf16"]).double(), best_guess(out["fp32"]).double())
    m = {p: posterior_metrics(s, truth, bed.places, bed.true_location) for p, s in out.items()}
    row = {
        "testbed": bed.name,
        "paired median km": float(paired.median()),
        "paired p90 km": float(paired.quantile(0.9)),
        "guess shift km": float(guesses.median()),
    }
    for p in ("fp32", "bf16"):
        row[f"{p} miss km"] = m[p]["miss_median_km"]
        row[f"{p} guess km"] = m[p]["guess_error_km"]
    row["within tolerance"] = within(row["bf16 miss km"], row["fp32 miss km"]) and within(
        row["bf16 guess km"], row["fp32 guess km"]
    )
    return row


@experiment("bf16_sharp", quick={"samples": 16, "max_scale_km": 1.0})
def bf16_sharp(
    *,
    samples: int = 512,
    max_scale_km: float = 25.0,
) -> dict:
    """fp32 against bf16 on the trained testbeds up to ``max_scale_km`` whose family runs the
    default solver (the sphere's; the R^3 families' own steps start from other noise)."""
    default = DEFAULT_SAMPLER.solver
    beds = [
        b
        for b in all_trained_testbeds(per_pattern=1)
        if b.scale_km <= max_scale_km and solver_for(b.model, DEFAULT_SAMPLER.solver) == default
    ]
    rows = [compare(bed, samples) for bed in beds]
    print(f"default sampler {DEFAULT_SAMPLER.label()}, native bf16 here: {native_bf16('cpu')}")
    print_table(rows, list(rows[0]) if rows else ["testbed"])
    return {"native_bf16": native_bf16("cpu"), "rows": rows}
