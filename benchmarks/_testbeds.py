"""Testbeds whose true answer is known, and the metrics that compare an answer with it.

A :class:`Testbed` is a model, a batch of "photos" (embeddings) and, per photo, a way to draw
samples of the true posterior, the true places (where the mass is) and one true location (what
an evaluation would score the best guess against). The sampler settings of ``predict`` are
chosen by comparing, on every testbed, a setting's samples with the truth
(:func:`posterior_metrics`) against the same numbers for the authors' settings.

Testbeds here:

- ``exact_field_testbeds()``: the exact RFM field of sharp, multimodal targets
  (:mod:`globeflow.core.exact_field`): no network, so the solver's error is all there is. Scales
  from a 1-km kernel around three cities to 1,000-km clusters.
- ``trained_testbeds(name)``: RFMs trained by ``globeflow train`` on synthetic conditioning with
  a known posterior (:mod:`globeflow.data.synthetic`; 1 to 2,000 km, 1 or 3 cities), built by
  ``python benchmarks/run.py testbeds_build`` into ``$GLOBEFLOW_TESTBEDS`` (/work/testbeds).
  ``all_trained_testbeds()``: every one built there.
- the diffuse models (bundled, MP-16) have no known posterior: ``places`` and ``truth`` are None
  and the benchmarks compare with the reference sampler's samples instead.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from globeflow.answers.decode import best_guess
from globeflow.core.exact_field import MixtureTarget, exact_rfm_model, kernel_width_for_rms_km
from globeflow.core.sampler_settings import PLAIN
from globeflow.core.sphere import (
    EARTH_RADIUS_KM,
    exp_map,
    haversine_km,
    latlon_to_unit,
    tangent_basis,
    unit_to_latlon,
)
from globeflow.jobs.metrics import sliced_wasserstein_km

CITIES = {
    "paris": (48.8566, 2.3522),
    "lyon": (45.7640, 4.8357),
    "marseille": (43.2965, 5.3698),
    "tokyo": (35.6762, 139.6503),
    "nairobi": (-1.2921, 36.8219),
    "lima": (-12.0464, -77.0428),
    "sydney": (-33.8688, 151.2093),
    "reykjavik": (64.1466, -21.9426),
}


@dataclass
class Testbed:
    """A model and photos with a known answer.

    ``truth(n, generator)`` -> (P, n, 2) degrees: samples of each photo's true posterior.
    ``places``: per photo, (K, 2) degrees where the true mass is (atoms or cluster centres).
    ``true_location``: (P, 2) degrees, one draw of each photo's posterior (scored like a label).
    ``scale_km``: the typical width of the answer, for reading the numbers.
    """

    name: str
    model: torch.nn.Module
    emb: torch.Tensor
    truth: Callable[[int, torch.Generator], torch.Tensor] | None
    places: list[torch.Tensor] | None
    true_location: torch.Tensor
    scale_km: float
    guidance: float = 0.0
    regime: str = "sharp"
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Exact log-density per steradian at unit vectors (P, N, 3) -> (P, N), when known."""
    notes: dict = field(default_factory=dict)


def cluster_atoms(
    centre: tuple[float, float], spread_km: float, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` atoms (count, 2) degrees scattered around ``centre`` with an isotropic Gaussian
    of ``spread_km`` per axis in the tangent plane (one atom at the centre when count is 1)."""
    c = latlon_to_unit(torch.tensor(centre, dtype=torch.float64))
    if count == 1:
        return unit_to_latlon(c)[None]
    e1, e2 = tangent_basis(c)
    offsets = torch.randn(count, 2, generator=generator, dtype=torch.float64) * (
        spread_km / EARTH_RADIUS_KM
    )
    tangent = offsets[:, :1] * e1 + offsets[:, 1:] * e2
    return unit_to_latlon(exp_map(c.expand(count, 3), tangent))


EXACT_TARGETS: dict[str, dict] = {
    # name: cities with weights, atoms per city, their spread and the kernel's RMS radius (km)
    "exact-1km-3city": {"cities": {"paris": 0.5, "lyon": 0.3, "marseille": 0.2},
                        "atoms": 1, "spread_km": 0.0, "kernel_km": 1.0, "scale_km": 1.0},
    "exact-1km-1city": {"cities": {"tokyo": 1.0}, "atoms": 1, "spread_km": 0.0,
                        "kernel_km": 1.0, "scale_km": 1.0},
    "exact-5km-3city": {"cities": {"paris": 0.5, "lyon": 0.3, "marseille": 0.2},
                        "atoms": 16, "spread_km": 5.0, "kernel_km": 1.0, "scale_km": 5.0},
    "exact-25km-3city": {"cities": {"nairobi": 0.6, "lima": 0.25, "sydney": 0.15},
                         "atoms": 32, "spread_km": 25.0, "kernel_km": 2.0, "scale_km": 25.0},
    "exact-200km-1city": {"cities": {"reykjavik": 1.0}, "atoms": 32, "spread_km": 200.0,
                          "kernel_km": 20.0, "scale_km": 200.0},
    "exact-1000km-2city": {"cities": {"nairobi": 0.7, "tokyo": 0.3}, "atoms": 32,
                           "spread_km": 1000.0, "kernel_km": 100.0, "scale_km": 1000.0},
}  # fmt: skip
"""The exact-field targets: 1 km to 1,000 km, unimodal and multimodal, unequal weights."""


def exact_targets(seed: int = 0) -> dict[str, MixtureTarget]:
    """The :data:`EXACT_TARGETS` as mixtures (atoms drawn with a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    targets = {}
    for name, spec in EXACT_TARGETS.items():
        atoms, weights = [], []
        for city, weight in spec["cities"].items():
            atoms.append(cluster_atoms(CITIES[city], spec["spread_km"], spec["atoms"], g))
            weights.append(torch.full((spec["atoms"],), weight / spec["atoms"]))
        targets[name] = MixtureTarget.from_latlon(
            torch.cat(atoms), torch.cat(weights), kernel_width_for_rms_km(spec["kernel_km"])
        )
    return targets


GUIDED_REFERENCE = {"solver": "heun", "grid": "published", "steps": 512}
"""The tight solve that stands in for the truth of a guided exact field (a guided field has no
closed-form samples): Heun, 1,024 evaluations on the authors' grid; from the same noise it moves
by 0.002 km between 512 and 1,024 Heun steps on the 5-km three-city target at w = 0 and 2."""


def exact_field_testbeds(
    photos_per_target: int = 4, seed: int = 0, guidance: float = 0.0
) -> list[Testbed]:
    """One testbed per exact target, ``photos_per_target`` photos each (the same embedding,
    different true locations), all on one float64 model whose null condition is the mixture of
    all the targets. At ``guidance`` w != 0 the truth is the tight solve
    :data:`GUIDED_REFERENCE` of the exact guided field (1 + w) v_c - w v_null."""
    targets = exact_targets(seed)
    model = exact_rfm_model(list(targets.values()))
    network = model.network
    g = torch.Generator().manual_seed(seed + 1)
    beds = []
    for index, (name, target) in enumerate(targets.items()):
        emb = torch.zeros(photos_per_target, len(targets), dtype=torch.float64)
        emb[:, index] = 1.0
        where = torch.full((photos_per_target,), index)

        def truth(n: int, generator: torch.Generator, index=index, count=photos_per_target):
            if guidance != 0.0:
                rows = torch.zeros(count, len(targets), dtype=torch.float64)
                rows[:, index] = 1.0
                return model.sample(rows, n, guidance=guidance, generator=generator,
                                    **GUIDED_REFERENCE)  # fmt: skip
            draws = [network.target_samples(index, n, generator) for _ in range(count)]
            return unit_to_latlon(torch.stack(draws))

        def log_density(x: torch.Tensor, where=where) -> torch.Tensor:
            return network.target_log_density(x, where[: x.shape[0]])

        places = [unit_to_latlon(target.atoms)] * photos_per_target
        beds.append(
            Testbed(
                name=name,
                model=model,
                emb=emb,
                truth=truth,
                places=places,
                true_location=truth(1, g)[:, 0],
                scale_km=EXACT_TARGETS[name]["scale_km"],
                guidance=guidance,
                log_density=log_density if guidance == 0.0 else None,
            )
        )
    return beds


def nearest_place_km(samples: torch.Tensor, places: list[torch.Tensor]) -> torch.Tensor:
    """Distance (P, N) km from each sample (P, N, 2) to its photo's nearest true place."""
    rows = []
    for p, spots in enumerate(places):
        d = haversine_km(samples[p][:, None, :].double(), spots[None].double())
        rows.append(d.min(-1).values)
    return torch.stack(rows)


def place_shares(samples: torch.Tensor, places: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per photo, the share (K,) of its samples (P, N, 2) nearest each of its true places."""
    shares = []
    for p, spots in enumerate(places):
        d = haversine_km(samples[p][:, None, :].double(), spots[None].double())
        nearest = d.argmin(-1)
        shares.append(torch.bincount(nearest, minlength=len(spots)).double() / len(nearest))
    return shares


def noise_band(kind: str, refs: list[float], photos: int) -> float:
    """How far a setting's mean metric may sit from the reference's: twice the reference's
    seed-to-seed standard deviation (the Monte Carlo noise of one answer), at least a floor by
    ``kind``: "km" 10% + 0.1 km, "share" (of samples) 0.05, "photos" (a fraction) one photo."""
    spread = 2.0 * statistics.stdev(refs) if len(refs) > 1 else 0.0
    if kind == "km":
        return max(spread, 0.1 * abs(statistics.fmean(refs)) + 0.1)
    if kind == "share":
        return max(spread, 0.05)
    return max(spread, 1.0 / photos + 1e-9)


def posterior_metrics(
    samples: torch.Tensor,
    truth: torch.Tensor,
    places: list[torch.Tensor] | None,
    true_location: torch.Tensor,
    thresholds_km: tuple[float, ...] = (1.0, 25.0, 200.0),
) -> dict[str, float]:
    """How an answer's samples (P, N, 2) compare with the truth, in km.

    - ``miss_median_km``: median distance of a sample to its photo's nearest true place;
      ``within_X_km``: the fraction of samples within X km of one (the truth's own values come
      from the same function on truth samples); ``place_mass_tv``: the mean over photos of the
      total variation between the shares of samples nearest each true place and the truth's
      shares (the probabilities of the answer's regions, 0 = right mass on every place); left
      out when ``places`` is None;
    - ``sw_km``: mean over photos of the sliced Wasserstein distance to truth samples (P, N, 2);
    - ``guess_error_km``: median distance from the best guess to the true location (P, 2);
      ``acc_X_km``: the fraction of photos whose best guess is within X km of it;
    - ``guess_vs_oracle_km``: median distance to the best guess of the truth samples.
    """
    guess = best_guess(samples)
    error = haversine_km(guess.double(), true_location.double())
    oracle = haversine_km(guess.double(), best_guess(truth).double())
    out = {}
    if places is not None:
        miss = nearest_place_km(samples, places)
        out["miss_median_km"] = float(miss.median())
        out.update({f"within_{t:g}_km": float((miss <= t).double().mean()) for t in thresholds_km})
        tv = [
            0.5 * float((a - b).abs().sum())
            for a, b in zip(place_shares(samples, places), place_shares(truth, places), strict=True)
        ]
        out["place_mass_tv"] = sum(tv) / len(tv)
    out["sw_km"] = float(sliced_wasserstein_km(samples, truth).mean())
    out["guess_error_km"] = float(error.median())
    out.update({f"acc_{t:g}_km": float((error <= t).double().mean()) for t in thresholds_km})
    out["guess_vs_oracle_km"] = float(oracle.median())
    return out


# ---- trained on synthetic conditioning (``python benchmarks/run.py testbeds_build``) -----------
TRAINED_ROOT = Path(os.environ.get("GLOBEFLOW_TESTBEDS", "/work/testbeds"))
TRAINED_NAMES = ("syn-small", "syn-small-flow", "syn-small-diffusion", "syn-published")
"""Models trained by ``globeflow train`` on :mod:`globeflow.data.synthetic` patterns: RFMs of dim
256 / depth 4 and of the published width (dim 512, depth 12, cond_dim 1024), and flow matching
and diffusion in R^3 on the small recipe."""


def trained_testbeds(
    name: str, root: Path = TRAINED_ROOT, per_pattern: int = 8, guidance: float = 0.0
) -> list[Testbed]:
    """One testbed per (scale, modes) cell of a trained synthetic testbed: held-out embeddings
    of the cell's patterns (``per_pattern`` of each, at most 8), whose true posterior is the
    pattern's vMF mixture. ``guidance`` 0 samples what the truth describes."""
    from globeflow.core.checkpoints import load_model
    from globeflow.data import synthetic

    directory = Path(root) / name
    if not (directory / "model").is_dir():
        raise FileNotFoundError(
            f"{directory / 'model'}: missing; build it with "
            f"`python benchmarks/run.py testbeds_build -p only={name}` (recipe in that file)"
        )
    model = load_model(directory / "model")
    patterns = synthetic.load_patterns(directory)
    held = synthetic.load_heldout(directory / "heldout.pt")
    rank = torch.zeros_like(held["pattern"])
    for p in range(len(patterns)):
        where = held["pattern"] == p
        rank[where] = torch.arange(int(where.sum()))
    beds = []
    for scale in patterns.scale_km.unique().tolist():
        for modes in (1, 3):
            cell = (patterns.scale_km == scale) & (patterns.num_modes == modes)
            rows = (cell[held["pattern"]] & (rank < per_pattern)).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            idx = held["pattern"][rows]

            def truth(n: int, generator: torch.Generator, idx=idx) -> torch.Tensor:
                return synthetic.sample_posterior(patterns, idx, n, generator)

            def log_density(x: torch.Tensor, idx=idx) -> torch.Tensor:
                latlon = unit_to_latlon(x.double())
                return synthetic.posterior_log_density(patterns, idx[: x.shape[0]], latlon)

            beds.append(
                Testbed(
                    name=f"{name}-{scale:g}km-x{modes}",
                    model=model,
                    emb=held["embeddings"][rows],
                    truth=truth,
                    places=[patterns.centres[p, : int(patterns.num_modes[p])] for p in idx],
                    true_location=held["latlon"][rows],
                    scale_km=scale,
                    guidance=guidance,
                    regime="sharp" if scale <= 200 else "diffuse",
                    log_density=log_density,
                    notes={"patterns": patterns, "pattern_idx": idx, "modes": modes},
                )
            )
    return beds


def runs_default_solver(bed: Testbed) -> bool:
    """Whether ``bed``'s model samples with the default recipe's solver (a diffusion model runs
    its own step, DDIM 250): where a trial of that recipe's levels or solver applies."""
    from globeflow.core.sampler_settings import DEFAULT_SAMPLER, resolve

    return resolve(bed.model, DEFAULT_SAMPLER).solver == DEFAULT_SAMPLER.solver


def photo_per_pattern(name: str, photos: int, root: Path = TRAINED_ROOT):
    """(model, emb (P, D)): a trained testbed's model and the first held-out photo of each of
    its first ``photos`` patterns."""
    from globeflow.core.checkpoints import load_model
    from globeflow.data import synthetic

    held = synthetic.load_heldout(Path(root) / name / "heldout.pt")
    pattern = held["pattern"]
    rows = [int((pattern == p).nonzero()[0]) for p in torch.unique(pattern)][:photos]
    return load_model(Path(root) / name / "model"), held["embeddings"][rows]


def sharp_and_diffuse_models(testbeds: str, photos: int) -> dict:
    """{label: (model, emb (P, D))}: the bundled model on ``photos`` of its validation photos
    (diffuse), and each trained testbed named in ``testbeds`` (comma-separated) on one held-out
    photo per pattern (:func:`photo_per_pattern`; sharp); a testbed not built is said and
    skipped."""
    from _common import bundled_validation

    found = {}
    bundled = bundled_validation(photos)
    if bundled is not None:
        locator, emb, _ = bundled
        found["bundled (diffuse)"] = (locator.model, emb)
    for name in [t for t in testbeds.split(",") if t]:
        if (TRAINED_ROOT / name / "model" / "config.json").exists():
            found[f"{name} (sharp)"] = photo_per_pattern(name, photos)
        else:
            print(f"{TRAINED_ROOT / name}: missing (benchmarks/run.py testbeds_build)")
    return found


def time_localizability(model, emb: torch.Tensor, samples: int, repeats: int, variants: dict):
    """``model.localizability`` of photos emb (P, D) from the same noise under each variant
    ({name: (context manager factory, keyword arguments)}), interleaved, best of ``repeats``
    (:func:`_common.best_of_interleaved`): ({name: best seconds}, {name: (bits (P,), standard
    error (P,))}). The plain estimate (one pass over the samples) unless a variant says
    otherwise: these comparisons are of the pass."""
    from _common import best_of_interleaved

    def variant(context, kwargs: dict):
        def run():
            with context():
                return model.localizability(
                    emb, num_samples=samples, generator=torch.Generator().manual_seed(0),
                    return_stderr=True, **{"estimator": PLAIN, **kwargs},
                )  # fmt: skip

        return run

    return best_of_interleaved({name: variant(*v) for name, v in variants.items()}, repeats)


def localizability_comparison(
    testbeds: str, photos: int, samples: int, repeats: int, variants, row
) -> dict:
    """A benchmark report comparing ``model.localizability`` variants on the models of
    :func:`sharp_and_diffuse_models`: ``variants(model)`` gives each model's variants (as
    :func:`time_localizability` takes them), ``row(model, emb, best, out)`` its table row
    beyond the model and photo count."""

    def row_of(model, emb: torch.Tensor) -> dict:
        best, out = time_localizability(model, emb, samples, repeats, variants(model))
        return row(model, emb, best, out)

    return comparison_on_models(testbeds, photos, samples, row_of)


def comparison_on_models(
    testbeds: str, photos: int, samples: int, row_of, models: dict | None = None
) -> dict:
    """A benchmark report with one table row per model of :func:`sharp_and_diffuse_models`
    (or of ``models``, {label: (model, emb (P, D))}): ``row_of(model, prepared emb (P, D))``
    gives the row beyond the model and photo count."""
    from _common import gemm_rates, loadavg, print_table

    rows = []
    models = sharp_and_diffuse_models(testbeds, photos) if models is None else models
    for label, (model, emb) in models.items():
        emb = model.prepare_embeddings(emb)
        rows.append({"model": label, "photos": emb.shape[0], **row_of(model, emb)})
        print_table(rows[-1:], list(rows[-1]))
    report = {"gemm_gflops": gemm_rates(), "samples": samples, "rows": rows}
    if rows:
        print_table(rows, list(rows[0]))
    report["load_average_after"] = loadavg()
    return report


def localizability_experiment(
    name: str, module: str, variants, row, quick_testbeds: str = ""
) -> Callable[..., dict]:
    """Register experiment ``name`` of ``module``: :func:`localizability_comparison` of
    ``variants(model)`` with table rows ``row(model, emb, best, out, samples)``, with the
    options every such comparison takes (``photos`` per model, ``samples`` per photo,
    ``repeats`` interleaved, ``testbeds`` comma-separated; the bundled model always)."""
    from _registry import experiment

    def run(
        *,
        photos: int = 8,
        samples: int = 128,
        repeats: int = 2,
        testbeds: str = "syn-small,syn-published",
    ) -> dict:
        def table_row(model, emb, best, out) -> dict:
            return row(model, emb, best, out, samples)

        return localizability_comparison(testbeds, photos, samples, repeats, variants, table_row)

    run.__module__, run.__qualname__, run.__name__ = module, name, name
    quick = {"photos": 2, "samples": 16, "repeats": 1, "testbeds": quick_testbeds}
    return experiment(name, quick=quick)(run)


def all_trained_testbeds(root: Path = TRAINED_ROOT, per_pattern: int = 2) -> list[Testbed]:
    """:func:`trained_testbeds` of every model built in ``root``; empty (saying why) when none
    is there."""
    names = sorted(d.name for d in Path(root).glob("*") if (d / "model" / "config.json").exists())
    if not names:
        print(f"no trained testbeds in {root}: python benchmarks/run.py testbeds_build")
    return [bed for name in names for bed in trained_testbeds(name, root, per_pattern)]
