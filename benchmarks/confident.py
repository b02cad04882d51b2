"""Choosing the sampler defaults on every testbed: within noise of the authors' sampler at the
same guidance, then the cheapest.

For every testbed (:mod:`_testbeds`: exact RFM fields of sharp, multimodal targets from 1 km to
1,000 km; trained synthetic testbeds in /work/testbeds when present; the bundled model on its
validation photos; the unconditional MP-16 RFM), at every guidance of ``guidances`` (default:
0 and the model's default guidance, what ``predict`` runs: the recommended guidance of the
bundled model, the fallback of models without one elsewhere) and every setting (solver x time
grid x steps x precision, at ``samples`` samples), the answer's samples are scored by
:func:`_testbeds.posterior_metrics` (sample miss, samples within 1/25/200 km, sliced
Wasserstein, best-guess error, acc@1/25/200 km, the mass on each true place) against the truth
where it is known (exact guided fields: a tight solve), else against the reference's samples
and the photos' labels.

Reference: the authors' sampler (Euler on the published grid, 250 steps, fp32) at the same
guidance, run with ``ref_seeds`` seeds (cached in out/bench/cache/confident, as are the guided
exact truths); every setting runs from the same seeds (paired: the same initial noise), so its
mean shift from the reference is its systematic effect. Noise band of a metric: twice its
seed-to-seed standard deviation under the reference (the Monte Carlo noise of one answer), at
least ``10% + 0.1 km`` (km metrics), 0.05 (fractions of samples, place masses) or one photo
(fractions of photos). A setting passes a testbed when every metric's mean shift is within its
band; the cheapest setting (network evaluations, then ms/photo of the bundled model's full
``Locator`` answer) that passes every testbed at every guidance is the default.

    python benchmarks/run.py confident    # writes out/bench/confident.json
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time

import torch
from _common import (
    CACHE,
    bundled_validation,
    cpu_model,
    gemm_rates,
    loadavg,
    mp16_rfm,
    print_table,
)
from _registry import experiment
from _testbeds import (
    TRAINED_ROOT,
    Testbed,
    exact_field_testbeds,
    noise_band,
    posterior_metrics,
    trained_testbeds,
)

from globeflow.core.sampler_settings import (
    AUTHORS_SAMPLER,
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    SamplerSettings,
)
from globeflow.core.solvers import SOLVERS

CANDIDATES = [
    DEFAULT_SAMPLER.with_overrides(num_samples=1024),
    DEFAULT_SAMPLER.with_overrides(solver="euler", steps=24),
    DEFAULT_SAMPLER.with_overrides(solver="euler", steps=32),
    DEFAULT_SAMPLER.with_overrides(solver="data-2m", steps=16),
    DEFAULT_SAMPLER.with_overrides(solver="data-2m", steps=32),
    DEFAULT_SAMPLER.with_overrides(solver="lagged-midpoint", steps=24),
]
"""The default, the authors' step at 24 and 32 steps, and the second-order candidates (bf16
rows only on float32 networks: the exact fields run in float64 whatever the precision)."""
KM_METRICS = ("miss_median_km", "sw_km", "guess_error_km")
SAMPLE_FRACTIONS = ("within_1_km", "within_25_km", "within_200_km", "place_mass_tv")
PHOTO_FRACTIONS = ("acc_1_km", "acc_25_km", "acc_200_km")
CRITERIA = KM_METRICS + SAMPLE_FRACTIONS + PHOTO_FRACTIONS
"""The metrics a setting must match the reference on (the others are reported)."""
PARTIAL = CACHE / "confident-partial.json"
"""The testbeds done so far, rewritten after each (in case the run is cut short)."""
REFERENCE_CACHE = CACHE / "confident"


def parse_setting(text: str) -> SamplerSettings:
    """ "solver/grid/steps/precision" -> the default recipe with those fields."""
    solver, grid, steps, precision = text.split("/")
    return DEFAULT_SAMPLER.with_overrides(
        solver=solver, grid=grid, steps=int(steps), precision=precision
    )


def evaluations(s: SamplerSettings) -> int:
    return SOLVERS[s.solver].evaluations(s.steps) if s.solver in SOLVERS else s.steps


def draw(bed: Testbed, s: SamplerSettings, n: int, seed: int) -> torch.Tensor:
    """Samples (P, n, 2) of a testbed's photos with setting ``s`` as ``predict`` runs it on that
    model (a family without the solver runs its own step: sampler_settings.resolve)."""
    g = torch.Generator().manual_seed(seed)
    return bed.model.sample(bed.emb, n, guidance=bed.guidance, generator=g, settings=s)


def band(metric: str, refs: list[float], photos: int) -> float:
    """:func:`_testbeds.noise_band` of one of :data:`CRITERIA`."""
    kind = "km" if metric in KM_METRICS else "share" if metric in SAMPLE_FRACTIONS else "photos"
    return noise_band(kind, refs, photos)


def score(bed: Testbed, samples: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return posterior_metrics(samples, truth, bed.places, bed.true_location)


def cached(key: str, make) -> tuple[torch.Tensor, float | None]:
    """``make()`` and the seconds it took, cached by ``key`` in :data:`REFERENCE_CACHE`
    (references and guided truths are the slow part of a run; a rerun or a new candidate reuses
    them, and reports the time the draw took when it was made)."""
    path = REFERENCE_CACHE / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")
    if path.is_file():
        entry = torch.load(path, weights_only=True)
        return entry["value"], entry.get("seconds")
    start = time.perf_counter()
    value = make()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "value": value, "seconds": seconds}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return value, seconds


def bed_key(bed: Testbed) -> str:
    """What identifies a testbed's draws: name, guidance, photos and their embeddings."""
    digest = hashlib.sha256(bed.emb.double().numpy().tobytes()).hexdigest()[:16]
    return f"{bed.name}|w={bed.guidance:g}|{len(bed.emb)}|{digest}"


def run_testbed(
    bed: Testbed, samples: int, ref_seeds: int, candidates: list[SamplerSettings]
) -> dict:
    """Reference seeds, then every candidate from the same seeds: metrics, bands and verdict.

    Paired: seed k of a candidate starts from the noise of seed k of the reference, so the mean
    difference over seeds is the setting's systematic effect, free of the Monte Carlo noise
    that the band measures (how much a metric moves from seed to seed of the reference)."""
    known = bed.places is not None
    seeds = list(range(ref_seeds))
    extra = [] if known else [ref_seeds]  # unknown truth: one more seed stands in

    def reference(seed: int) -> torch.Tensor:
        key = f"{bed_key(bed)}|{AUTHORS_SAMPLER.label()}|{samples}|{seed}"
        return cached(key, lambda: draw(bed, AUTHORS_SAMPLER, samples, seed))

    drawn = [reference(seed) for seed in seeds + extra]
    refs = [value for value, _ in drawn]
    times = [seconds for _, seconds in drawn if seconds is not None]
    ref_s = statistics.fmean(times) / len(bed.emb) if times else None
    if known:
        truth_seed = torch.Generator().manual_seed(99)
        truth, _ = cached(f"{bed_key(bed)}|truth|{samples}", lambda: bed.truth(samples, truth_seed))
    else:  # diffuse models: the reference's extra seed stands in for the truth
        truth = refs.pop()
    ref_metrics = [score(bed, r, truth) for r in refs]
    names = list(ref_metrics[0])
    ref_mean = {m: statistics.fmean(r[m] for r in ref_metrics) for m in names}
    bands = {m: band(m, [r[m] for r in ref_metrics], len(bed.emb)) for m in names}
    rows = []
    float64 = next(bed.model.parameters()).dtype == torch.float64
    for s in candidates:
        s = s.with_overrides(num_samples=samples)
        if float64 and s.precision == "bf16":
            continue
        start = time.perf_counter()
        per_seed = [score(bed, draw(bed, s, samples, seed), truth) for seed in seeds]
        seconds = (time.perf_counter() - start) / len(seeds)
        metrics = {m: statistics.fmean(r[m] for r in per_seed) for m in names}
        shift = {m: metrics[m] - ref_mean[m] for m in names}
        failed = [m for m in CRITERIA if m in metrics and abs(shift[m]) > bands[m]]
        verdict = "yes" if not failed else "no: " + ", ".join(failed)
        row = {"testbed": bed.name, **s.describe(), "guidance": bed.guidance, "NFE": evaluations(s)}
        row.update({"s/photo": seconds / len(bed.emb), **metrics, "within noise": verdict})
        rows.append(row)
        print(f"{bed.name} w={bed.guidance:g} {s.label()}: {verdict}", flush=True)
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


def diffuse_testbeds(guidance: str, bundled_photos: int, mp16_budget_s: float) -> list[Testbed]:
    """The bundled model (validation photos, labels as true locations) at ``guidance`` ("default":
    its recommended one) and, at guidance 0 only, the unconditional MP-16 RFM."""
    beds = []
    bundled = bundled_validation(bundled_photos)
    if bundled is not None:
        locator, emb, labels = bundled
        w = locator.default_guidance if guidance == "default" else float(guidance)
        beds.append(Testbed("bundled", locator.model, emb, truth=None, places=None,
                            true_location=labels, scale_km=2000.0, guidance=w,
                            regime="diffuse"))  # fmt: skip
    model = mp16_rfm(mp16_budget_s) if guidance in ("0", "0.0") else None
    if model is not None:
        g = torch.Generator().manual_seed(3)
        labels = model.sample(torch.zeros(4, 0), 1, 32, generator=g)[:, 0]
        beds.append(Testbed("mp16-rfm", model, torch.zeros(4, 0), truth=None, places=None,
                            true_location=labels, scale_km=2000.0, regime="diffuse"))  # fmt: skip
    return beds


def trained_names() -> list[str]:
    """The trained testbeds built in TRAINED_ROOT (saying so when there is none)."""
    names = sorted(d.name for d in TRAINED_ROOT.glob("*") if (d / "model/config.json").exists())
    if not names:
        print(f"no trained testbeds in {TRAINED_ROOT}: python benchmarks/run.py testbeds_build")
    return names


def testbeds_at(
    guidance: str,
    only: str,
    per_pattern: int,
    photos: int,
    bundled_photos: int,
    mp16_budget_s: float,
) -> list[Testbed]:
    """Every testbed asked for by ``only`` (names or prefixes, comma-separated; "": all) at
    ``guidance``: a number, or "default" (what
    ``predict`` runs: the bundled model's recommended guidance; the fallback DEFAULT_GUIDANCE
    for the trained testbeds and the exact fields, which carry no recommendation)."""
    w = DEFAULT_GUIDANCE if guidance == "default" else float(guidance)
    wanted_names = [name for name in only.split(",") if name]

    def wanted(group: str) -> bool:
        return not wanted_names or any(
            name.startswith(group) or group.startswith(name) for name in wanted_names
        )

    beds = [
        bed
        for name in trained_names()
        if wanted(name)
        for bed in trained_testbeds(name, per_pattern=per_pattern, guidance=w)
    ]
    if wanted("bundled") or wanted("mp16-rfm"):
        beds += diffuse_testbeds(guidance, bundled_photos, mp16_budget_s)
    if wanted("exact-"):
        beds += exact_field_testbeds(photos, guidance=w)
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


@experiment(
    "confident",
    quick={
        "samples": 16,
        "photos": 1,
        "ref_seeds": 2,
        "only": "exact-200km",
        "guidances": "0",
        "candidates": "lagged-midpoint/published/8/fp32",
        "timings": False,
    },
    default=True,
)
def confident(
    *,
    samples: int = DEFAULT_SAMPLER.num_samples,
    photos: int = 4,
    per_pattern: int = 2,
    bundled_photos: int = 16,
    ref_seeds: int = 3,
    mp16_budget_s: float = 300.0,
    only: str = "",
    guidances: str = "0,default",
    candidates: str = "",
    timings: bool = True,
) -> dict:
    """Every candidate setting against the authors' sampler on every testbed asked for.

    - ``samples``: samples per photo
    - ``photos``: photos per exact-field testbed
    - ``per_pattern``: photos per trained pattern
    - ``only``: comma-separated testbed names or trained testbed prefixes such as syn-small
      (default: all)
    - ``guidances``: comma-separated guidance scales; 'default': what predict runs
    - ``candidates``: comma-separated solver/grid/steps/precision (default: all)
    - ``timings``: time the candidates' whole Locator answer on the bundled model
    """
    settings = [parse_setting(t) for t in candidates.split(",")] if candidates else CANDIDATES
    report = {"gemm_gflops": gemm_rates(), "samples": samples}
    beds = [
        bed
        for g in guidances.split(",")
        for bed in testbeds_at(g, only, per_pattern, photos, bundled_photos, mp16_budget_s)
    ]
    if only:
        wanted = only.split(",")
        beds = [b for b in beds if any(b.name.startswith(name) for name in wanted)]
    results = []
    for bed in beds:
        results.append(run_testbed(bed, samples, ref_seeds, settings))
        PARTIAL.parent.mkdir(parents=True, exist_ok=True)  # in case the run is cut short
        PARTIAL.write_text(json.dumps({**report, "testbeds": results}, indent=1))
    labels = [s.with_overrides(num_samples=samples).label() for s in settings]
    passing = [label for label in labels if passes_everywhere(label, results)]
    locator_ms = locator_ms_per_photo([AUTHORS_SAMPLER, *settings], 16) if timings else {}
    columns = ["testbed", "guidance", "label", "NFE", "miss_median_km", "within_1_km"]
    columns += ["within_25_km", "within_200_km", "sw_km", "guess_error_km", "place_mass_tv"]
    columns += ["acc_25_km", "s/photo", "within noise"]
    rows = [row for res in results for row in res["rows"]]
    ref_label = {"label": AUTHORS_SAMPLER.label() + " (ref mean)"}
    refs = [
        {
            "testbed": res["name"],
            "guidance": res["guidance"],
            **ref_label,
            **res["reference"]["mean"],
            "s/photo": res["reference"]["s/photo"],
        }
        for res in results
    ]
    rates = report["gemm_gflops"]
    print(
        f"CPU: {cpu_model()}, {torch.get_num_threads()} thread(s), GEMM "
        f"{rates['float32']['peak']:.0f} GFLOP/s fp32, {rates['bfloat16']['peak']:.0f} bf16"
    )
    print_table(refs + rows, columns)
    print("\nLocator ms/photo (bundled model, 16 photos, 1 thread):")
    print_table([{"label": k, "ms/photo": v} for k, v in locator_ms.items()], ["label", "ms/photo"])
    print(f"\nwithin noise on every testbed: {passing}")
    report.update({"testbeds": results, "passing": passing, "locator_ms_per_photo": locator_ms})
    report["gemm_gflops_after"] = gemm_rates()
    report["load_average_after"] = loadavg()
    return report
