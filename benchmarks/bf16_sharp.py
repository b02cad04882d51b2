"""bf16 against fp32 where answers are sharp: how far bfloat16, throughout or only early on the
path ("mixed"), moves the samples, in km, and what it saves.

On the trained testbeds (/work/testbeds, :func:`_testbeds.all_trained_testbeds`), every photo's
samples are drawn from the same noise with the default sampler in fp32 and in each lower
precision, at each guidance. Reported per testbed, guidance and precision: the paired distance
to the fp32 samples (median, p90), the shift of the best guess (median, max), the sample miss
and best-guess error of each against the truth, and the seconds of each (best of ``repeats``,
interleaved) with the speed-up over fp32. ``mixed@0.9`` runs "mixed" with its switch at signal
level 0.9 instead of the default's. Tolerance (docs/defaults.md): a precision's sample
miss and best-guess error within 10% + 0.1 km of fp32's.

    python benchmarks/run.py bf16_sharp
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from _common import best_of_interleaved, gemm_rates, print_table
from _registry import experiment
from _testbeds import all_trained_testbeds, posterior_metrics

from globeflow.answers.decode import best_guess
from globeflow.core import guidance as guidance_module
from globeflow.core.precision import native_bf16
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, solver_for
from globeflow.core.sphere import haversine_km, sample_uniform_sphere


def within(low: float, fp32: float) -> bool:
    return abs(low - fp32) <= 0.1 * fp32 + 0.1


def compare(bed, samples: int, guidance: float, precisions: list[str], repeats: int) -> list:
    """One row per lower precision: ``bed``'s photos sampled from the same noise in fp32 and in
    it, at ``guidance``."""
    noise = sample_uniform_sphere(
        (len(bed.emb), samples), generator=torch.Generator().manual_seed(0)
    )

    def run(precision: str):
        name, _, switch = precision.partition("@")  # "mixed@0.9": bf16 below level 0.9

        def sample():
            switched = (
                mock.patch.object(guidance_module, "MIXED_BF16_BELOW", float(switch))
                if switch
                else contextlib.nullcontext()
            )
            with switched:
                return bed.model.sample(
                    bed.emb, samples, DEFAULT_SAMPLER.steps, guidance, noise=noise,
                    solver=DEFAULT_SAMPLER.solver, grid=DEFAULT_SAMPLER.grid, precision=name,
                )  # fmt: skip

        return sample

    seconds, out = best_of_interleaved({p: run(p) for p in ("fp32", *precisions)}, repeats)
    truth = bed.truth(samples, torch.Generator().manual_seed(1))
    m = {p: posterior_metrics(s, truth, bed.places, bed.true_location) for p, s in out.items()}
    fp32_guess = best_guess(out["fp32"]).double()
    rows = []
    for p in precisions:
        paired = haversine_km(out[p].double(), out["fp32"].double())
        shift = haversine_km(best_guess(out[p]).double(), fp32_guess)
        row = {
            "testbed": bed.name,
            "guidance": guidance,
            "precision": p,
            "paired median km": float(paired.median()),
            "paired p90 km": float(paired.quantile(0.9)),
            "guess shift km": float(shift.median()),
            "guess shift max km": float(shift.max()),
            "fp32 miss km": m["fp32"]["miss_median_km"],
            "fp32 guess km": m["fp32"]["guess_error_km"],
            "miss km": m[p]["miss_median_km"],
            "guess km": m[p]["guess_error_km"],
            "fp32 s": seconds["fp32"],
            "s": seconds[p],
            "speed-up": seconds["fp32"] / seconds[p],
        }
        row["within tolerance"] = within(row["miss km"], row["fp32 miss km"]) and within(
            row["guess km"], row["fp32 guess km"]
        )
        rows.append(row)
    return rows


@experiment("bf16_sharp", quick={"samples": 16, "max_scale_km": 1.0, "guidances": "0"})
def bf16_sharp(
    *,
    samples: int = 512,
    max_scale_km: float = 25.0,
    guidances: str = "0,2",
    precisions: str = "bf16,mixed",
    per_pattern: int = 1,
    repeats: int = 2,
    testbeds: str = "",
) -> dict:
    """fp32 against each of ``precisions`` (comma-separated; ``mixed@LEVEL`` moves the switch)
    at each of ``guidances`` on the
    trained testbeds up to ``max_scale_km`` whose family runs the default solver (the sphere's;
    the R^3 families' own steps start from other noise); ``testbeds``: only those trained
    testbeds (comma-separated names, e.g. ``syn-small``; default: every one built)."""
    default = DEFAULT_SAMPLER.solver
    beds = [
        b
        for b in all_trained_testbeds(per_pattern=per_pattern)
        if b.scale_km <= max_scale_km
        and solver_for(b.model, DEFAULT_SAMPLER.solver) == default
        and (not testbeds or b.name.rsplit("-", 2)[0] in testbeds.split(","))
    ]
    lower = precisions.split(",")
    rows = [
        row
        for bed in beds
        for g in (float(w) for w in guidances.split(","))
        for row in compare(bed, samples, g, lower, repeats)
    ]
    print(f"default sampler {DEFAULT_SAMPLER.label()}, native bf16 here: {native_bf16('cpu')}")
    print_table(rows, list(rows[0]) if rows else ["testbed"])
    return {"native_bf16": native_bf16("cpu"), "gemm_gflops": gemm_rates(), "rows": rows}
