"""Choosing the sampler defaults on every testbed: within noise of the authors' sampler, then
the cheapest.

For every testbed (:mod:`_testbeds`: exact RFM fields of sharp, multimodal targets from 1 km to
1,000 km; trained synthetic testbeds in /work/testbeds when present; the bundled model on its
validation photos at its recommended guidance; the unconditional MP-16 RFM) and every setting
(solver x time grid x steps x precision, at ``--samples`` samples), the answer's samples are
scored by :func:`_testbeds.posterior_metrics` (sample miss, sliced Wasserstein, best-guess error,
acc@1/25/200 km) against the truth where it is known, else against the reference's samples and
the photos' labels.

Reference: the authors' sampler (Euler on the published grid, 250 steps, fp32), run with
``--ref-seeds`` seeds in the same run. Noise band of a metric: twice the spread of the
reference's seeds, at least ``10% + 0.1 km`` (km metrics), 0.05 (fractions of samples) or one
photo (fractions of photos). A setting passes a testbed when every metric is within its band of
the reference's mean; the cheapest setting (network evaluations, then ms/photo of the bundled
model's full ``Locator`` answer) that passes every testbed is the default.

    python benchmarks/confident.py --out out/bench/confident.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import bundled_validation, gemm_rates, machine, mp16_rfm, print_table, write_json
from _testbeds import (
    Testbed,
    all_trained_testbeds,
    exact_field_testbeds,
    posterior_metrics,
)

from globeflow.core.sampler_settings import AUTHORS_SAMPLER, DEFAULT_SAMPLER, SamplerSettings
from globeflow.core.solvers import SOLVERS

CANDIDATES = [
    SamplerSettings(solver="euler", grid="published", steps=32, precision="fp32"),
    SamplerSettings(solver="lagged-midpoint", grid="quadratic", steps=8, precision="fp32"),
    SamplerSettings(solver="midpoint", grid="published", steps=8, precision="fp32"),
    SamplerSettings(solver="data-2m", grid="published", steps=12, precision="fp32"),
    SamplerSettings(solver="data-2m", grid="published", steps=16, precision="fp32"),
    SamplerSettings(solver="data-2m", grid="published", steps=16, precision="bf16"),
]
"""The authors' 32 steps, the old default, and the cheap second-order candidates (bf16 rows
only on float32 networks: the exact fields run in float64 whatever the precision)."""
KM_METRICS = ("miss_median_km", "sw_km", "guess_error_km")
CRITERIA = ("miss_median_km", "sw_km", "guess_error_km", "acc_1_km", "acc_25_km", "acc_200_km")
"""The metrics a setting must match the reference on (the others are reported)."""
SAMPLE_FRACTIONS = ("within_1_km", "within_25_km", "within_200_km")
PHOTO_FRACTIONS = ("acc_1_km", "acc_25_km", "acc_200_km")


def parse_setting(text: str) -> SamplerSettings:
    """ "solver/grid/steps/precision" -> SamplerSettings."""
    solver, grid, steps, precision = text.split("/")
    return SamplerSettings(solver=solver, grid=grid, steps=int(steps), precision=precision)


def evaluations(s: SamplerSettings) -> int:
    return SOLVERS[s.solver].evaluations(s.steps) if s.solver in SOLVERS else s.steps


def draw(bed: Testbed, s: SamplerSettings, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return bed.model.sample(
        bed.emb, n, s.steps, bed.guidance, generator=g, solver=s.solver,
        precision=s.precision, grid=s.grid,
    )  # fmt: skip


def band(metric: str, refs: list[float], photos: int) -> float:
    spread = 2.0 * (max(refs) - min(refs))
    mean = statistics.fmean(refs)
    if metric in KM_METRICS:
        return max(spread, 0.1 * abs(mean) + 0.1)
    if metric in SAMPLE_FRACTIONS:
        return max(spread, 0.05)
    return max(spread, 1.0 / photos + 1e-9)


def score(bed: Testbed, samples: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return posterior_metrics(samples, truth, bed.places, bed.true_location)


def run_testbed(bed: Testbed, args) -> dict:
    """Reference seeds, then every candidate: metrics, bands and the verdict."""
    known = bed.places is not None
    started = time.perf_counter()
    seeds = args.ref_seeds + (0 if known else 1)  # unknown truth: one more seed stands in
    refs = [draw(bed, AUTHORS_SAMPLER, args.samples, seed) for seed in range(seeds)]
    ref_s = (time.perf_counter() - started) / seeds
    if known:
        truth = bed.truth(args.samples, torch.Generator().manual_seed(99))
    else:  # diffuse models: the reference's last seed stands in for the truth
        truth = refs[-1]
        refs = refs[:-1]
    ref_metrics = [score(bed, r, truth) for r in refs]
    names = list(ref_metrics[0])
    ref_mean = {m: statistics.fmean(r[m] for r in ref_metrics) for m in names}
    bands = {m: band(m, [r[m] for r in ref_metrics], len(bed.emb)) for m in names}
    rows = []
    float64 = next(bed.model.parameters()).dtype == torch.float64
    for s in CANDIDATES:
        s = s.with_overrides(num_samples=args.samples)
        if float64 and s.precision == "bf16":
            continue
        start = time.perf_counter()
        metrics = score(bed, draw(bed, s, args.samples, 100), truth)
        seconds = time.perf_counter() - start
        failed = [m for m in CRITERIA if m in metrics and abs(metrics[m] - ref_mean[m]) > bands[m]]
        verdict = "yes" if not failed else "no: " + ", ".join(failed)
        row = {"testbed": bed.name, **s.describe(), "NFE": evaluations(s)}
        row.update({"s/photo": seconds / len(bed.emb), **metrics, "within noise": verdict})
        rows.append(row)
        print(rows[-1], flush=True)
    return {
        "name": bed.name,
        "regime": bed.regime,
        "scale_km": bed.scale_km,
        "photos": len(bed.emb),
        "guidance": bed.guidance,
        "reference": {"mean": ref_mean, "seeds": ref_metrics, "band": bands, "s/photo": ref_s},
        "rows": rows,
    }


def passes_everywhere(label: str, results: list[dict]) -> bool:
    """Within noise on every testbed that ran the setting (bf16 rows skip the float64 fields)."""
    verdicts = [r["within noise"] for res in results for r in res["rows"] if r["label"] == label]
    return bool(verdicts) and all(v == "yes" for v in verdicts)


def diffuse_testbeds(args) -> list[Testbed]:
    """The bundled model (validation photos, labels as true locations) and the MP-16 RFM."""
    beds = []
    bundled = bundled_validation(args.bundled_photos)
    if bundled is not None:
        locator, emb, labels = bundled
        beds.append(Testbed("bundled", locator.model, emb, truth=None, places=None,
                            true_location=labels, scale_km=2000.0,
                            guidance=locator.default_guidance, regime="diffuse"))  # fmt: skip
    model = mp16_rfm(args.mp16_budget_s)
    if model is not None:
        g = torch.Generator().manual_seed(3)
        labels = model.sample(torch.zeros(4, 0), 1, 32, generator=g)[:, 0]
        beds.append(Testbed("mp16-rfm", model, torch.zeros(4, 0), truth=None, places=None,
                            true_location=labels, scale_km=2000.0, regime="diffuse"))  # fmt: skip
    return beds


def locator_ms_per_photo(settings: list[SamplerSettings], photos: int) -> dict[str, float]:
    """ms/photo of the bundled model's whole Locator answer at each setting (1 thread)."""
    bundled = bundled_validation(photos)
    if bundled is None:
        return {}
    locator, emb, _ = bundled
    out = {}
    for s in settings:
        locator.locate_embeddings(emb[:2], sampler=s)  # warm-up
        start = time.perf_counter()
        locator.locate_embeddings(emb, sampler=s)
        out[s.label()] = 1000 * (time.perf_counter() - start) / len(emb)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--photos", type=int, default=4, help="photos per exact-field testbed")
    ap.add_argument("--per-pattern", type=int, default=2, help="photos per trained pattern")
    ap.add_argument("--bundled-photos", type=int, default=16)
    ap.add_argument("--ref-seeds", type=int, default=2)
    ap.add_argument("--mp16-budget-s", type=float, default=300.0)
    ap.add_argument("--only", default="", help="comma-separated testbed names (default: all)")
    ap.add_argument(
        "--candidates",
        default="",
        help="comma-separated solver/grid/steps/precision (default: all)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.candidates:
        CANDIDATES[:] = [parse_setting(text) for text in args.candidates.split(",")]
    report = {"machine": machine(), "gemm_gflops": gemm_rates(), "samples": args.samples}
    beds = all_trained_testbeds(per_pattern=args.per_pattern) + diffuse_testbeds(args)
    beds += exact_field_testbeds(args.photos)
    if args.only:
        beds = [b for b in beds if b.name in args.only.split(",")]
    results = []
    for bed in beds:
        results.append(run_testbed(bed, args))
        if args.out:  # partial results, in case the run is cut short
            Path(args.out).write_text(json.dumps({**report, "testbeds": results}, indent=1))
    labels = [s.with_overrides(num_samples=args.samples).label() for s in CANDIDATES]
    passing = [label for label in labels if passes_everywhere(label, results)]
    timings = locator_ms_per_photo([AUTHORS_SAMPLER, DEFAULT_SAMPLER, *CANDIDATES], 16)
    columns = ["testbed", "label", "NFE", "miss_median_km", "sw_km", "guess_error_km"]
    columns += ["within_25_km", "acc_1_km", "acc_25_km", "acc_200_km", "within noise"]
    rows = [row for res in results for row in res["rows"]]
    ref_label = {"label": AUTHORS_SAMPLER.label() + " (ref mean)"}
    refs = [{"testbed": res["name"], **ref_label, **res["reference"]["mean"]} for res in results]
    print_table(refs + rows, columns)
    print("\nLocator ms/photo (bundled model, 16 photos, 1 thread):")
    print_table([{"label": k, "ms/photo": v} for k, v in timings.items()], ["label", "ms/photo"])
    print(f"\nwithin noise on every testbed: {passing}")
    report.update({"testbeds": results, "passing": passing, "locator_ms_per_photo": timings})
    report["machine_after"] = machine()
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
