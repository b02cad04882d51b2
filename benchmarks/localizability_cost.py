"""Cost of the localizability estimate before and after its defaults changed, in one run.

``model.localizability`` on the bundled model's validation photos (``--photos`` of them,
``--samples`` samples each, one thread): the current defaults (midpoint, 24 bulk steps, stiff-end
step 0.2 in log(1 - gamma)) against the previous ones (lagged midpoint, 16 bulk steps, 0.35),
interleaved, best of ``--repeats``. The accuracy side is ``benchmarks/likelihood_accuracy.py``.

    python benchmarks/localizability_cost.py --out out/bench/localizability_cost.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from _common import bundled_validation, gemm_rates, machine, print_table, write_json

from globeflow.core import likelihood as L
from globeflow.core.sampler_settings import LOCALIZABILITY_BULK_STEPS, LOCALIZABILITY_SOLVER

BEFORE = {"solver": "lagged-midpoint", "steps": 16, "log_step": 0.35}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    found = bundled_validation(args.photos)
    if found is None:
        return 1
    locator, emb, _ = found
    model = locator.model
    emb = model.prepare_embeddings(emb)
    after = {"solver": LOCALIZABILITY_SOLVER, "steps": LOCALIZABILITY_BULK_STEPS,
             "log_step": L.STIFF_LOG_STEP}  # fmt: skip

    def before_run(g):
        _, log_p = L.sample_with_log_density(
            model, emb, args.samples, BEFORE["steps"], BEFORE["solver"], g,
            log_step=BEFORE["log_step"],
        )  # fmt: skip
        return log_p.mean(-1) / math.log(2.0)

    def after_run(g):
        return model.localizability(emb, num_samples=args.samples, generator=g)

    runs = {"before": before_run, "after (defaults)": after_run}
    best = dict.fromkeys(runs, math.inf)
    bits = {}
    for _ in range(args.repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            bits[label] = run(torch.Generator().manual_seed(0))
            best[label] = min(best[label], time.perf_counter() - start)
    rows = [
        {"recipe": label, **(BEFORE if label == "before" else after), "seconds": best[label],
         "ratio": best[label] / best["before"], "mean bits": float(bits[label].mean())}
        for label in runs
    ]  # fmt: skip
    report = {"machine": machine(), "gemm_gflops": gemm_rates(), "settings": vars(args),
              "rows": rows}  # fmt: skip
    print_table(rows, ["recipe", "solver", "steps", "log_step", "seconds", "ratio", "mean bits"])
    report["machine_after"] = machine()
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
