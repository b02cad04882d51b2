"""Solvers and precision on trained models: how close to a 512-step reference, and how fast.

For each trained model every setting starts from the same noise as the reference (midpoint
solver, 512 steps, float32), so the paired distance measures the solver's error directly
(Euler is the authors' sampler on their time grid; midpoint, Heun and the lagged midpoint run on
the grid of ``DenoisingModel.sampling_levels``):

- ``paired km``: mean great-circle distance between a setting's samples and the reference's;
- ``SW km``: sliced Wasserstein distance between the two sample sets (distributional);
- ``best-guess km``: median distance between the best guesses (bundled model only);
- ``ms``: wall-clock milliseconds per image (bundled) or per 1,000 samples (MP-16), median of
  ``--reps`` runs;
- ``vs fp32 ...``: a bf16 setting against the same setting in fp32 (same noise), the cost of the
  lower precision alone.

Models: the bundled model on its validation photos with its recommended guidance (needs
../shared/data/im2gps3k-train), and an unconditional RFM trained on the MP-16 locations
(``--mp16-budget-s`` seconds of training on first use, cached in out/bench/cache).

    python benchmarks/solvers.py --out out/bench/solvers.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    MP16,
    bundled_validation,
    machine,
    median_time,
    mp16_rfm,
    print_table,
    write_json,
)

from globeflow.answers.decode import best_guess
from globeflow.core.solvers import SOLVERS
from globeflow.core.sphere import haversine_km, sample_uniform_sphere
from globeflow.jobs.metrics import sliced_wasserstein_km

# (solver, steps, precision): today's default first, then the candidates.
SETTINGS = [
    ("euler", 32, "fp32"),
    ("euler", 16, "fp32"),
    ("midpoint", 4, "fp32"),
    ("midpoint", 6, "fp32"),
    ("midpoint", 8, "fp32"),
    ("heun", 8, "fp32"),
    ("midpoint", 16, "fp32"),
    ("lagged-midpoint", 8, "fp32"),
    ("lagged-midpoint", 16, "fp32"),
    ("euler", 32, "bf16"),
    ("midpoint", 8, "bf16"),
    ("lagged-midpoint", 8, "bf16"),
    ("lagged-midpoint", 16, "bf16"),
]
REFERENCE = ("midpoint", 512, "fp32")


def network_evaluations(solver: str, steps: int) -> int:
    return SOLVERS[solver].evaluations(steps) if solver in SOLVERS else steps


def compare(model, emb, noise, guidance, reps, per, with_guess) -> list[dict]:
    """One row per setting against the reference, all from the same noise."""

    def run(solver, steps, precision):
        return model.sample(
            emb, noise.shape[1], steps, guidance, noise=noise, solver=solver, precision=precision
        )

    ref = run(*REFERENCE)
    ref_guess = best_guess(ref) if with_guess else None
    rows, outputs = [], {}
    for solver, steps, precision in SETTINGS:
        out = run(solver, steps, precision)
        outputs[solver, steps, precision] = out
        seconds, _ = median_time(lambda: run(solver, steps, precision), reps)  # noqa: B023
        row = {
            "solver": solver,
            "steps": steps,
            "NFE": network_evaluations(solver, steps),
            "precision": precision,
            "paired km": float(haversine_km(out, ref).mean()),
            "SW km": float(sliced_wasserstein_km(out, ref).mean()),
            "ms": 1000 * seconds / per,
        }
        if with_guess:
            row["best-guess km"] = float(haversine_km(best_guess(out), ref_guess).median())
        fp32 = outputs.get((solver, steps, "fp32"))
        if precision != "fp32" and fp32 is not None:  # bf16 against fp32, same noise
            row["vs fp32 paired km"] = float(haversine_km(out, fp32).mean())
            row["vs fp32 SW km"] = float(sliced_wasserstein_km(out, fp32).mean())
            if with_guess:
                row["vs fp32 guess km"] = float(
                    haversine_km(best_guess(out), best_guess(fp32)).median()
                )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="validation photos (bundled model)")
    ap.add_argument("--num-samples", type=int, default=512, help="samples per photo")
    ap.add_argument("--mp16-samples", type=int, default=4096)
    ap.add_argument("--mp16-budget-s", type=float, default=300.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"machine": machine(), "reference": REFERENCE, "models": {}}
    columns = ["solver", "steps", "NFE", "precision", "paired km", "SW km", "best-guess km", "ms"]
    columns += ["vs fp32 paired km", "vs fp32 SW km", "vs fp32 guess km"]

    bundled = bundled_validation(args.images)
    if bundled is not None:
        locator, emb, _ = bundled
        g = torch.Generator().manual_seed(0)
        noise = sample_uniform_sphere((len(emb), args.num_samples), generator=g)
        w = locator.default_guidance
        rows = compare(locator.model, emb, noise, w, args.reps, len(emb), True)
        print(f"\nbundled model, {len(emb)} validation photos x {args.num_samples} samples, "
              f"guidance {w:g} (ms per photo)")  # fmt: skip
        print_table(rows, columns)
        report["models"]["bundled"] = {"images": len(emb), "guidance": w, "rows": rows}

    model = mp16_rfm(args.mp16_budget_s)
    if model is not None:
        g = torch.Generator().manual_seed(1)
        noise = sample_uniform_sphere((1, args.mp16_samples), generator=g)
        emb0 = torch.zeros(1, 0)
        rows = compare(model, emb0, noise, 0.0, args.reps, args.mp16_samples / 1000, False)
        print(f"\nunconditional MP-16 RFM, {args.mp16_samples} samples (ms per 1,000 samples)")
        print_table(rows, [c for c in columns if "guess" not in c])
        report["models"]["mp16"] = {"samples": args.mp16_samples, "rows": rows}
    else:
        print(f"skipping the MP-16 model: {MP16} not found")
    report["machine_after"] = machine()
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
