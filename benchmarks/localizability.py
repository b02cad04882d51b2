"""Localizability estimators: cost at equal Monte Carlo standard error, and bias.

Localizability is E_p[log2 p(y | photo)], a Monte Carlo mean over the model's own samples.

- ``ode`` (globeflow before this work): N samples with 32 Euler steps, then each sample's
  log-density by the likelihood ODE (here the current default solver at 32 steps);
- ``path``: one pass that samples with a second-order solver and carries the log-density along
  the sampling path (:func:`globeflow.core.likelihood.sample_with_log_density`).

For each estimator on the bundled model's validation photos: ms per photo at N samples, the
standard error (SE, from the per-photo sample variance, averaged over photos), the cost at equal
SE relative to ``ode`` (time x SE^2 ratio: halving the SE costs 4x the samples), and the bias
against a reference (path, ``--ref-steps`` steps, ``--ref-samples`` samples), in bits and in
units of the reference's SE.

    python benchmarks/localizability.py --out out/bench/localizability.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from _common import machine, print_table, validation_embeddings, write_json

from globeflow.apps.pipeline import Locator

LAGGED = {"method": "path", "solver": "lagged-midpoint"}
ESTIMATORS = [
    ("ode (before)", {"method": "ode", "steps": 32, "likelihood_steps": 32}),
    ("path midpoint 16 fp32", {"method": "path", "solver": "midpoint", "steps": 16}),
    ("path lagged-midpoint 8 fp32", {**LAGGED, "steps": 8}),
    ("path lagged-midpoint 16 fp32", {**LAGGED, "steps": 16}),
    ("path lagged-midpoint 32 fp32", {**LAGGED, "steps": 32}),
    ("path lagged-midpoint 16 bf16 (default)", {**LAGGED, "steps": 16, "precision": "bf16"}),
]


def estimate(model, emb, n, options, seed=0):
    g = torch.Generator().manual_seed(seed)
    options = dict(options)
    steps = options.pop("steps")
    start = time.perf_counter()
    bits, se = model.localizability(emb, n, steps, generator=g, return_stderr=True, **options)
    return bits.double(), se.double(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--ref-samples", type=int, default=2048)
    ap.add_argument("--ref-steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    locator = Locator.from_pretrained()
    emb, _ = validation_embeddings(locator, limit=args.photos)
    if not len(emb):
        print("skipping: ../shared/data/im2gps3k-train not found")
        return 0
    model = locator.model
    ref, ref_se, _ = estimate(
        model, emb, args.ref_samples, {"method": "path", "steps": args.ref_steps}
    )
    rows = []
    for name, options in ESTIMATORS:
        estimate(model, emb[:2], 8, options)  # warm-up
        bits, se, seconds = estimate(model, emb, args.samples, options, seed=1)
        rows.append(
            {
                "estimator": name,
                "ms/photo": 1000 * seconds / len(emb),
                "SE bits": float(se.mean()),
                "mean bits": float(bits.mean()),
                "bias bits": float((bits - ref).mean()),
                "|bias| / SE": float(((bits - ref).abs() / se).mean()),
            }
        )
    base = rows[0]
    for row in rows:
        row["cost at equal SE"] = (row["ms/photo"] * row["SE bits"] ** 2) / (
            base["ms/photo"] * base["SE bits"] ** 2
        )
    print(
        f"\n{len(emb)} photos, N = {args.samples} samples; reference: path {args.ref_steps} steps "
        f"x {args.ref_samples} samples, mean {float(ref.mean()):.3f} bits (SE "
        f"{float(ref_se.mean()):.3f})"
    )
    columns = ["estimator", "ms/photo", "SE bits", "cost at equal SE", "mean bits", "bias bits"]
    print_table(rows, columns + ["|bias| / SE"])
    report = {
        "machine": machine(),
        "photos": len(emb),
        "samples": args.samples,
        "reference": {
            "steps": args.ref_steps,
            "samples": args.ref_samples,
            "bits": ref.tolist(),
            "se": ref_se.tolist(),
        },
        "rows": rows,
        "target_cost_ratio": 0.25,
        "se_note": f"SE scales as 1/sqrt(N); ln2 = {math.log(2):.4f}",
        "machine_after": machine(),
    }
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
