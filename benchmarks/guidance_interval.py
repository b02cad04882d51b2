"""Guidance over part of the path only (a "guidance interval"): does the guided answer stay the
same for fewer network rows?

Classifier-free guidance doubles every network row: the conditional and the null branch at each
level. Applying it only over an interval of signal levels [lo, hi) (the conditional field alone
elsewhere) saves the null rows outside it. That changes the field being integrated, so a trial
is judged by the guided-answers criterion (:func:`confident.run_testbed`): for every cell, the
default recipe with the interval against the authors' sampler (Euler on their grid, 250 steps,
fp32) at the same guidance with *full* guidance, paired seeds, each metric within twice the
reference's seed-to-seed spread (floors 10% + 0.1 km, 0.05, one photo). ``0-1`` is the default
(guidance everywhere), run beside the intervals as the control.

"rows" is the network rows per sample relative to full guidance, each level weighted by its
precision's cost (a bf16 row half an fp32 one, as "mixed" runs them). The interval is applied by
a patch of :class:`~globeflow.core.guidance.GuidedField` for the duration of the run: this is a
trial, not a setting of the package.

    python benchmarks/run.py guidance_interval [-p only=syn-small-] [-p intervals=0-1,0-0.97]
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from _common import gemm_rates, print_table
from _registry import experiment
from _testbeds import runs_default_solver
from confident import run_testbed, testbeds_at

from globeflow.core.guidance import GuidedField, level_precisions
from globeflow.core.sampler_settings import DEFAULT_SAMPLER
from globeflow.core.solvers import SOLVERS


def parse_interval(text: str) -> tuple[float, float]:
    """ "lo-hi" -> (lo, hi), signal levels with 0 <= lo < hi <= 1."""
    lo, hi = (float(v) for v in text.split("-"))
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"interval {text!r}: need 0 <= lo < hi <= 1")
    return lo, hi


@contextlib.contextmanager
def guidance_between(lo: float, hi: float):
    """While active, every :class:`GuidedField` guides only at levels in [lo, hi); elsewhere it
    returns the conditional branch alone (one row instead of two)."""
    full = GuidedField.branches

    def branches(self, x: torch.Tensor, node: int):
        level = float(self.gammas[node])
        if self.null is None or lo <= level < hi:  # the levels stay below 1
            return full(self, x, node)
        return self.network.forward_conditioned(x, self.cond.at(node), self.precisions[node]), None

    with mock.patch.object(GuidedField, "branches", branches):
        yield


def relative_rows(lo: float, hi: float, model) -> float:
    """Network rows per sample of the default recipe with guidance on [lo, hi), relative to full
    guidance; each level weighted by its precision (bf16 rows count half)."""
    recipe = DEFAULT_SAMPLER
    gammas = model.sampling_levels(recipe.steps, torch.zeros(1), grid=recipe.grid)
    levels = SOLVERS[recipe.solver].levels(gammas)
    cost = torch.tensor(
        [0.5 if p == "bf16" else 1.0 for p in level_precisions(recipe.precision, levels)]
    )
    inside = (levels >= lo) & (levels < hi)
    return float((cost.sum() + cost[inside].sum()) / (2 * cost.sum()))


@experiment(
    "guidance_interval",
    quick={"only": "syn-small-1km", "samples": 16, "ref_seeds": 2, "intervals": "0-1,0-0.97"},
)
def guidance_interval(
    *,
    only: str = "syn-small-",
    guidance: float = 2.0,
    per_pattern: int = 2,
    samples: int = 256,
    ref_seeds: int = 3,
    intervals: str = "0-1,0-0.97,0-0.99,0.1-1,0.3-1",
) -> dict:
    """The default recipe with guidance on each interval, against the authors' full guidance.

    - ``only``: trained testbed names or prefixes (comma-separated), as in ``confident``
    - ``guidance``: the guidance scale
    - ``per_pattern``: photos per trained pattern
    - ``samples``: samples per photo
    - ``ref_seeds``: seeds of the reference (and of each trial, paired)
    - ``intervals``: comma-separated lo-hi signal-level intervals; 0-1 is full guidance
    """
    chosen = [parse_interval(t) for t in intervals.split(",")]
    beds = testbeds_at(str(guidance), only, per_pattern, 1, 0, 0.0)
    beds = [b for b in beds if any(b.name.startswith(n) for n in only.split(","))]
    # Where the default recipe runs as given (diffusion samples with its own step, DDIM 250):
    # the rows column counts its levels and precisions.
    beds = [b for b in beds if runs_default_solver(b)]
    if not beds:
        return {"skipped": f"no trained testbed matches {only!r}"}
    report = {"gemm_gflops": gemm_rates(), "samples": samples, "guidance": guidance}
    rows, verdicts = [], {}
    for bed in beds:
        for lo, hi in chosen:
            label = f"{lo:g}-{hi:g}"
            with guidance_between(lo, hi):
                result = run_testbed(bed, samples, ref_seeds, [DEFAULT_SAMPLER])
            row = result["rows"][0]
            ref = result["reference"]["mean"]
            rows.append(
                {
                    "testbed": bed.name,
                    "interval": label,
                    "rows": relative_rows(lo, hi, bed.model),
                    **{k: row[k] for k in ("miss_median_km", "within_1_km", "within_25_km")},
                    "ref miss km": ref["miss_median_km"],
                    "ref within 1 km": ref["within_1_km"],
                    "place_mass_tv": row["place_mass_tv"],
                    "ref place TV": ref["place_mass_tv"],
                    "guess_error_km": row["guess_error_km"],
                    "ref guess km": ref["guess_error_km"],
                    "s/photo": row["s/photo"],
                    "within noise": row["within noise"],
                }
            )
            verdicts.setdefault(label, []).append(row["within noise"] == "yes")
    print_table(rows, list(rows[0]))
    summary = {label: f"{sum(v)}/{len(v)}" for label, v in verdicts.items()}
    print(f"\ncells within noise of the authors' full guidance: {summary}")
    report.update({"rows": rows, "within_noise": summary, "gemm_gflops_after": gemm_rates()})
    return report
