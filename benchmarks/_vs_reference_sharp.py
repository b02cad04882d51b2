"""Time at equal accuracy on the sharp testbed: the authors' sampler against ``predict``'s default.

Part of ``benchmarks/vs_reference.py`` (``--sharp``). The testbed is a model trained with
``globeflow train`` on synthetic conditioning whose true posterior is known (the ``trained``
testbeds in ``GLOBEFLOW_TESTBEDS``, default /work/testbeds: ``syn-published`` is the published
width, dim 512, depth 12, cond_dim 1024), its held-out photos of the sharp patterns (1, 5 and
25 km; one and three cities). The model is exported in the published checkpoint format
(``save_plonk_network``) and read by the authors' ``GeoAdaLNMLP``, so both sides run the same
weights.

Runs, interleaved, from the same noise, without guidance by default (the truth is the
conditional posterior p(y | photo), which guidance would sharpen away from; ``--sharp-guidance``
sets another scale for both sides):

* ``authors-euler-250`` / ``authors-euler-32``: their ``riemannian_flow_sampler`` (fp32), 250
  steps (their pipeline's default) and 32;
* ``ours-euler-32``: our ``model.sample`` with their step, grid and precision (equal steps; its
  distance to ``authors-euler-32``'s samples checks the exported network and the shared noise);
* ``ours-default-sampler``: ``model.sample`` with the sampler settings ``predict`` uses, read
  from the pipeline's answer (``settings`` of ``Locator.locate_embeddings``), never written here;
* ``ours-default-predict``: the whole ``Locator.locate_embeddings`` answer at its defaults
  (samples, best guess, regions, localizability, place names).

Each is scored against the truth by ``_testbeds.posterior_metrics``; an independent draw of the
truth gives the floor (what a perfect sampler scores with this many samples). "Equal accuracy":
no km metric worse than ``authors-euler-250``'s by more than 10% + 0.1 km (the sliced
Wasserstein distance and the best guess's distance to the truth's best guess: at least by the
floor, their own Monte Carlo noise), no fraction of samples lower by more than 0.05 and no
fraction of photos by more than one photo.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path

import torch
from _common import EmbeddingsOnly, count_flops
from _testbeds import Testbed, posterior_metrics

from globeflow.apps.pipeline import Locator
from globeflow.core.checkpoints import load_model, save_plonk_network
from globeflow.core.schedules import SigmoidSchedule
from globeflow.core.sphere import haversine_km, sample_uniform_sphere, unit_to_latlon

TESTBEDS = Path(os.environ.get("GLOBEFLOW_TESTBEDS", "/work/testbeds"))
SHARP_SCALES_KM = (1.0, 5.0, 25.0)
AUTHORS_STEPS = (250, 32)
KM_METRICS = ("miss_median_km", "sw_km", "guess_error_km", "guess_vs_oracle_km")


def sharp_testbed(directory: Path, per_pattern: int = 1, every: int = 1) -> Testbed:
    """The sharp part of a trained synthetic testbed: ``per_pattern`` held-out photos of every
    ``every``-th pattern whose scale is in :data:`SHARP_SCALES_KM` (the testbeds list, per
    scale, two one-city patterns then two three-city ones: ``every=2`` keeps one of each), their
    exact posteriors as the truth."""
    from globeflow.data import synthetic

    patterns = synthetic.load_patterns(directory)
    held = synthetic.load_heldout(directory / "heldout.pt")
    sharp = [p for p in range(len(patterns)) if float(patterns.scale_km[p]) in SHARP_SCALES_KM]
    rows = [
        int(i)
        for p in sharp[::every]
        for i in torch.nonzero(held["pattern"] == p).flatten()[:per_pattern]
    ]
    index = held["pattern"][rows]

    def truth(n: int, generator: torch.Generator) -> torch.Tensor:
        return synthetic.sample_posterior(patterns, index, n, generator)

    k = patterns.num_modes
    return Testbed(
        name=f"{directory.name}-sharp",
        model=load_model(directory / "model").eval(),
        emb=held["embeddings"][rows].float(),
        truth=truth,
        places=[patterns.centres[p, : int(k[p])] for p in index.tolist()],
        true_location=held["latlon"][rows].double(),
        scale_km=max(SHARP_SCALES_KM),
        notes={"patterns": [patterns.names[p] for p in index.tolist()]},
    )


def find_testbed(name: str | None) -> Path | None:
    """The trained testbed to use: ``name`` under :data:`TESTBEDS` (or a path), else
    ``syn-published`` when its model is there, else ``syn-small``; None when none is."""
    names = [name] if name else ["syn-published", "syn-small"]
    for candidate in names:
        directory = Path(candidate) if "/" in candidate else TESTBEDS / candidate
        if (directory / "model" / "config.json").exists():
            return directory
    return None


def predict_settings(locator: Locator, emb: torch.Tensor, guidance: float) -> tuple[dict, dict]:
    """(settings of ``predict``'s answer at ``guidance``, keyword arguments of ``model.sample``
    reproducing its sampler): read from one call of the pipeline, so that a change of the
    defaults changes what is measured here."""
    settings = locator.locate_embeddings(emb[:1], guidance=guidance)[0]["settings"]
    kwargs = {"steps": settings["steps"], "solver": settings["solver"]}
    kwargs["precision"] = settings["precision"]
    if settings.get("grid"):
        kwargs["grid"] = settings["grid"]
    return settings, kwargs


def _answer_samples(results: list[dict]) -> torch.Tensor:
    """The answers' samples (P, N, 2): an adaptive answer holds N_i >= N per photo; the first N
    of each are an independent draw of its distribution like the rest."""
    n = min(len(r["samples"]) for r in results)
    return torch.tensor([r["samples"][:n] for r in results], dtype=torch.float64)


NOISE_METRICS = ("sw_km", "guess_vs_oracle_km")
"""Distances to the truth that a perfect sampler does not bring to 0 at a finite sample count:
their noise is the truth floor's value (an independent draw of the truth scored the same way)."""


def equal_accuracy(ours: dict, theirs: dict, photos: int, floor: dict) -> dict:
    """Per metric: how much worse ours is than theirs (km metrics: ours - theirs; fractions:
    theirs - ours) and the tolerance; ``met`` when none is worse by more than its tolerance
    (better is fine). Tolerances: 10% + 0.1 km (for :data:`NOISE_METRICS` at least the truth
    floor ``floor``), 0.05 of the samples, one photo."""
    out = {}
    for key, value in theirs.items():
        if key in KM_METRICS:
            worse, tol = ours[key] - value, 0.1 * abs(value) + 0.1
            if key in NOISE_METRICS:
                tol = max(tol, floor[key])
        elif key.startswith("within_"):
            worse, tol = value - ours[key], 0.05
        else:
            worse, tol = value - ours[key], 1.0 / photos + 1e-9
        out[key] = {"worse_by": worse, "tolerance": tol}
    outside = [k for k, v in out.items() if v["worse_by"] > v["tolerance"]]
    return {"met": not outside, "outside_tolerance": outside, "by_metric": out}


def bench_sharp(bed: Testbed, ref, opts, interleaved) -> dict:
    """Time and accuracy of the authors' Euler 250 / 32 and of ours at predict's defaults on
    ``bed``, interleaved by ``interleaved`` (vs_reference's timer). ``ref``: the authors' code,
    or None (ours only)."""
    model, emb = bed.model, bed.emb
    if model.schedule != SigmoidSchedule():
        raise SystemExit(f"{bed.name}: schedule {model.schedule} is not the authors' sigmoid")
    locator = Locator(model, EmbeddingsOnly(model.cond_dim), model_name=bed.name)
    w = opts.sharp_guidance
    settings, kwargs = predict_settings(locator, emb, w)
    n = opts.sharp_samples or settings["num_samples"]
    photos = emb.shape[0]
    noise = sample_uniform_sphere((photos, n), generator=torch.Generator().manual_seed(opts.seed))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gf-sharp-") as tmp:
        if ref is not None:
            ref_net = ref.load_network(save_plonk_network(model, Path(tmp)))
            for steps in AUTHORS_STEPS:
                theirs = partial(ref.sample, ref_net, emb, noise, steps, w)
                runs[f"authors-euler-{steps}"] = theirs
            ref.sample(ref_net, emb[:1], noise[:1, :8], 2, w)  # warm-up
    euler = {"steps": 32, "solver": "euler", "precision": "fp32"}
    runs["ours-euler-32"] = partial(model.sample, emb, n, guidance=w, noise=noise, **euler)
    sample = partial(model.sample, emb, n, guidance=w, noise=noise, **kwargs)
    runs["ours-default-sampler"] = sample
    runs["ours-default-predict"] = partial(
        locator.locate_embeddings, emb, num_samples=n, guidance=w, seed=opts.seed
    )
    sample()  # warm-up
    first_only = {"authors-euler-250": 1}
    timing, rates = interleaved(runs, opts.sharp_reps, "sharp", first_only)
    g = torch.Generator().manual_seed(opts.seed + 1)
    truth = bed.truth(n, g)
    report = {
        "testbed": bed.name,
        "photos": photos,
        "patterns": bed.notes["patterns"],
        "samples_per_photo": n,
        "guidance": w,
        "predict_settings": settings,
        "sampler_kwargs": kwargs,
        "gemm_gflops": rates,
        "runs": {},
        "truth_floor": posterior_metrics(bed.truth(n, g), truth, bed.places, bed.true_location),
    }
    for name, (times, result) in timing.items():
        if name.startswith("authors"):
            samples = unit_to_latlon(result.double())
        elif name == "ours-default-predict":
            samples = _answer_samples(result)
        else:
            samples = result.double()
        median = sorted(times)[len(times) // 2]
        report["runs"][name] = {
            "seconds": times,
            "median_seconds": median,
            "seconds_per_photo": median / photos,
            "metrics": posterior_metrics(samples, truth, bed.places, bed.true_location),
        }
    report["runs"]["ours-default-sampler"]["flops"] = count_flops(sample)
    if "authors-euler-32" in timing:
        theirs = unit_to_latlon(timing["authors-euler-32"][1].double())
        km = haversine_km(timing["ours-euler-32"][1].double(), theirs)
        report["runs"]["ours-euler-32"]["vs_authors_euler_32_km"] = {
            "median": float(km.median()),
            "max": float(km.max()),
        }
    _compare(report, photos)
    return report


def _compare(report: dict, photos: int) -> None:
    runs = report["runs"]
    for ref_name in [k for k in runs if k.startswith("authors")]:
        for name in [k for k in runs if k.startswith("ours")]:
            r = runs[name]
            r[f"ratio_vs_{ref_name}"] = runs[ref_name]["median_seconds"] / r["median_seconds"]
            if ref_name == "authors-euler-250":
                theirs = runs[ref_name]["metrics"]
                r["equal_accuracy_vs_euler_250"] = equal_accuracy(
                    r["metrics"], theirs, photos, report["truth_floor"]
                )


def print_sharp(report: dict, machine_line: str) -> None:
    """The table of the sharp comparison, with the machine facts on its first line."""
    s = report["predict_settings"]
    print(
        f"\nTime at equal accuracy, sharp testbed {report['testbed']} ({report['photos']} photos "
        f"of the 1/5/25-km patterns, {report['samples_per_photo']} samples each, guidance "
        f"{report['guidance']:g}); "
        f"ours = predict's default: {s['solver']}, {s.get('grid') or 'its own'} grid, "
        f"{s['steps']} steps, {s['precision']}\n{machine_line}"
    )
    cols = ("miss_median_km", "within_25_km", "sw_km", "guess_error_km", "acc_25_km")
    print(
        "| run | s/photo | vs Euler 250 | vs Euler 32 | "
        + " | ".join(cols)
        + " | equal accuracy to Euler 250 |"
    )
    print("|---" * (len(cols) + 5) + "|")
    rows = {**report["runs"], "truth (independent draw)": {"metrics": report["truth_floor"]}}
    for name, r in rows.items():
        m = r["metrics"]
        eq = r.get("equal_accuracy_vs_euler_250")
        verdict = "" if eq is None else ("yes" if eq["met"] else f"no: {eq['outside_tolerance']}")
        spp = r.get("seconds_per_photo")
        print(
            f"| {name} | {'' if spp is None else f'{spp:.3f}'} "
            f"| {_ratio(r, 'authors-euler-250')} | {_ratio(r, 'authors-euler-32')} | "
            + " | ".join(f"{m[c]:.3g}" for c in cols)
            + f" | {verdict} |"
        )
    check = report["runs"].get("ours-euler-32", {}).get("vs_authors_euler_32_km")
    if check:
        print(
            f"ours-euler-32 against authors-euler-32, same noise: median {check['median']:.4f} km, "
            f"max {check['max']:.4f} km apart"
        )


def _ratio(r: dict, name: str) -> str:
    v = r.get(f"ratio_vs_{name}")
    return "" if v is None else f"{v:.2f}x"
