"""Photos in, answers out: the one pipeline that the CLI, the server and the benchmarks call.

``Locator`` holds a frozen encoder and a generative model; ``locate_images`` embeds a batch of
photos, samples locations, and decodes a best guess, top regions with place names, the
localizability and (optionally) a density map for each.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from globeflow.answers.decode import attach_truth, best_guess, sample_density_grid, top_regions
from globeflow.answers.draw import (
    Draw,
    draw_answers,
    localizability_estimator,
    localizability_precision,
)
from globeflow.answers.geocode import region_label
from globeflow.answers.monte_carlo import answer_errors
from globeflow.answers.zoom import answer_extent, extent_radius_km, osm_url
from globeflow.apps.threads import network_threads, network_workers
from globeflow.core.checkpoints import load_model
from globeflow.core.families import UNIFORM_LOCALIZABILITY_BITS, GeoModel, effective_area_km2
from globeflow.core.parallel import map_on_cores
from globeflow.core.random_streams import embedding_ids, photo_generators, stream_design
from globeflow.core.sampler_settings import (
    IID,
    SOBOL,
    SamplerSettings,
    model_recipe,
    recommended_guidance,
    resolve,
    solver_for,
)
from globeflow.core.sphere import haversine_km

DEFAULT_MODEL_DIR = "default_model"
ROWS_PER_SOLVE = 2048
"""Samples per batched solve of a recipe's first draw (photos are grouped up to it): one solve
over many photos' samples at once leaves the CPU caches and ran up to 2x slower per sample.
An adaptive recipe's first draw is its ``first_samples`` (the bundled model's 256: 8 photos
per solve, 8% more photos/s than 2 in ``predict``, docs/benchmarks.md)."""


def default_model_path() -> Path:
    """The model bundled inside the package (trained on im2gps3k-train, see docs/)."""
    return Path(str(resources.files("globeflow") / DEFAULT_MODEL_DIR))


class Locator:
    """Geolocate photos with an encoder + a generative model. Loaded once, reused."""

    def __init__(
        self,
        model: GeoModel,
        encoder,
        model_name: str = "model",
        sampler: SamplerSettings | None = None,
    ):
        if encoder.dim != model.cond_dim:
            raise ValueError(
                f"encoder {encoder.name!r} gives {encoder.dim}-d embeddings but the model expects "
                f"{model.cond_dim}-d"
            )
        self.model = model.eval()
        self.encoder = encoder
        self.default_guidance = recommended_guidance(model)
        self.model_name = model_name
        self.sampler = sampler if sampler is not None else model_recipe(model)
        """The default sampling recipe (default: the model's own, :func:`~globeflow.core.
        sampler_settings.model_recipe`); each call may override fields of it."""

    @property
    def encoder_name(self) -> str:
        return self.encoder.name

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        encoder: str | None = None,
        family: str | None = None,
        encoder_path: str | None = None,
        device: str = "cpu",
        encoder_options: dict | None = None,
    ) -> Locator:
        """Load a model (default: the bundled one) and the encoder its metadata names;
        ``encoder_options`` go to the encoder where it takes them (e.g. ``device``,
        ``precision`` for DINOv2; the offline encoders take neither and run on the CPU)."""
        from globeflow.data.encoders import encoder_options as options_of
        from globeflow.data.encoders import get_encoder

        path = Path(model) if model is not None else default_model_path()
        geo = load_model(path if model is None or Path(model).exists() else model, family, device)
        meta = getattr(geo, "metadata", {}) or {}
        encoder_name = encoder or meta.get("encoder")
        if encoder_name is None:
            raise ValueError(
                f"{path}: the checkpoint does not name its image encoder; pass --encoder "
                "(e.g. dinov2-vitl14-reg for PLONK_YFCC / PLONK_iNaturalist, streetclip for "
                "PLONK_OSV_5M)"
            )
        kwargs = {"path": encoder_path} if encoder_path else {}
        taken = options_of(encoder_name)
        kwargs.update({k: v for k, v in (encoder_options or {}).items() if k in taken})
        enc = get_encoder(encoder_name, **kwargs)
        return cls(geo, enc, model_name=str(model) if model is not None else "globeflow-default")

    @torch.no_grad()
    def locate_embeddings(
        self,
        emb: torch.Tensor,
        num_samples: int | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        top_k: int = 5,
        region_radius_km: float | None = None,
        localizability_samples: int | None = None,
        with_density: bool = False,
        seed: int = 0,
        solver: str | None = None,
        precision: str | None = None,
        within: object = None,
        photo_ids: Sequence[str] | None = None,
        grid: str | None = None,
        sampler: SamplerSettings | None = None,
        first_samples: int | None = None,
        noise: str | None = None,
    ) -> list[dict]:
        """Answers for embeddings (B, D); see docs/ARCHITECTURE.md for the result structure.

        ``sampler`` (default: the locator's) is the sampling recipe; the keyword settings
        override its fields (a solver given without a grid runs on the recipe's grid,
        :func:`~globeflow.core.sampler_settings.resolve`). Samples of
        all B images are drawn in one batched solve, each image's from its own random stream
        seeded by (``seed``, its id in ``photo_ids``; default: a hash of its embedding), so an
        answer does not depend on the other images of the batch. Regions are found at the
        samples' own scale unless ``region_radius_km`` fixes their radius
        (``answers.decode.top_regions``). ``within`` (a region, see
        :func:`globeflow.answers.within.parse_region`): answers from the model's density
        truncated to it, with the mass inside (``mass_inside``). ``first_samples``: samples of
        the first draw of an adaptive recipe (0: all ``num_samples`` at once); each answer's
        ``monte_carlo`` block gives the samples drawn and the standard errors of its numbers.
        ``noise``: the answer's initial states, "sobol" or "iid"
        (:data:`~globeflow.core.sampler_settings.NOISE_DESIGNS`; default: the recipe's).
        """
        recipe = self._recipe(
            sampler, solver, grid, num_samples=num_samples, guidance=guidance, steps=steps,
            precision=precision, localizability_samples=localizability_samples,
            first_samples=first_samples, noise=noise,
        )  # fmt: skip
        recipe = resolve(self.model, recipe)
        settings = {**self._settings(recipe, seed), "region_radius_km": region_radius_km}
        ids = list(photo_ids) if photo_ids is not None else embedding_ids(emb)
        generators = photo_generators(seed, ids, self.model.device)
        if within is not None:
            decode = (top_k, region_radius_km, with_density)
            return self._locate_within(emb, within, settings, generators, decode)
        width = _network_width(self.model)
        workers = network_workers(width)  # before network_threads drops to one thread
        with network_threads(width):
            # Each chunk draws from its own photos' streams: the answers do not depend on
            # which worker runs it, or when.
            parts = map_on_cores(
                lambda photos: self._draw(emb[photos], recipe, generators[photos]),
                photo_chunks(emb.shape[0], _first_draw(recipe), workers),
                workers,
            )
            samples = [s for part in parts for s in part[0]]
            bits, stderr = (torch.cat([part[k] for part in parts]) for k in (1, 2))
            nets = [n for part in parts for n in part[3]]
        return self._decode(
            samples, bits, stderr, settings, top_k, region_radius_km, with_density, nets=nets
        )

    def _decode(
        self,
        samples: Sequence[torch.Tensor],
        bits: torch.Tensor,
        stderr: torch.Tensor,
        settings: dict,
        top_k: int,
        region_radius_km: float | None,
        with_density: bool,
        effective_samples: float | None = None,
        nets: Sequence[torch.Tensor | None] | None = None,
    ) -> list[dict]:
        """Result dicts from each photo's samples (N_i, 2) degrees and localizability bits (B,)
        +- (B,); ``effective_samples``: the independent draws a resampled set stands for;
        ``nets``: each photo's Sobol net per sample (None: iid draws), from which its Monte
        Carlo errors are read (:func:`~globeflow.answers.monte_carlo.answer_errors`)."""
        with network_threads(_network_width(self.model)):
            guesses = torch.stack([best_guess(s) for s in samples])  # alone: batch-free
            regions = [
                top_regions(samples[i], k=top_k, radius_km=region_radius_km)
                for i in range(len(samples))
            ]
        places = _place_names(guesses, regions)
        # Only densities per steradian compare with the uniform one (not the R^3 families').
        on_sphere = getattr(self.model, "density_space", "sphere") == "sphere"
        uniform = UNIFORM_LOCALIZABILITY_BITS if on_sphere else math.nan
        results = []
        for i in range(len(samples)):
            extent = answer_extent(samples[i], guesses[i].tolist(), regions[i])
            answer = _answer_at_scale(guesses[i], regions[i], places[i], extent)
            shares = [r.probability for r in regions[i]]
            replicates = None if nets is None else nets[i]
            noise = IID if replicates is None else SOBOL
            errors = answer_errors(
                samples[i], guesses[i], shares, effective_samples,
                replicates=replicates,
                region_members=[r.members for r in regions[i]],
            )  # fmt: skip
            for region, se in zip(answer["regions"], errors.region_probability, strict=True):
                region["probability_stderr"] = se
            result = {
                **answer,
                "monte_carlo": {**errors.to_dict(), "noise": noise, **_tolerances(settings)},
                "localizability_bits": _finite_or_none(float(bits[i])),
                "localizability_vs_uniform_bits": _finite_or_none(float(bits[i]) - uniform),
                "localizability_stderr_bits": _finite_or_none(float(stderr[i])),
                "effective_area_km2": _finite_or_none(float(effective_area_km2(bits[i]))),
                "samples": [[round(a, 4), round(b, 4)] for a, b in samples[i].tolist()],
                "settings": dict(settings),
            }
            if with_density:
                result["density"] = sample_density_grid(
                    samples[i], n_lat=60, n_lon=120, extent=extent
                )
            results.append(result)
        return results

    # ---- several photos of one place, a region the user knows (answers/fusion.py) ----------
    @torch.no_grad()
    def locate_together(
        self,
        photos: torch.Tensor | Sequence,
        names: Sequence[str] | None = None,
        num_samples: int | None = None,
        steps: int | None = None,
        top_k: int = 5,
        region_radius_km: float | None = None,
        with_density: bool = False,
        seed: int = 0,
        solver: str | None = None,
        precision: str | None = None,
        within: object = None,
        proposals_per_round: int | None = None,
    ) -> dict:
        """One answer for photos that all show the same place: p(y | c_1..c_n), proportional to
        p(y) prod_i [p(y | c_i) / p(y)]^e, by importance resampling
        (:mod:`globeflow.answers.fusion`, which says which exponent e a model gets).

        ``photos``: embeddings (n, D), image paths, or [(name, PIL image)]; unreadable paths are
        listed in ``skipped``. The answer depends on the set of photos only (not their order;
        a photo given twice counts once). The result has the usual structure plus ``photos``,
        ``effective_sample_size``, ``fusion`` (the product used, the Bayes factor of one place
        against unrelated places, each photo's agreement, the normaliser and null-condition
        checks) and ``disagreement`` (None, or what the answer must say: ``different_places``
        below a Bayes factor of 1; ``refused`` below the refusal threshold, then ``ok`` is false
        and ``error`` says why). ``within``: as in :meth:`locate_embeddings`.
        """
        from globeflow.answers.fusion import (
            LIKELIHOOD_STEPS,
            NULL_ID,
            TARGET_ESS,
            check_fusable,
            disagreement,
            draw_posterior,
            fused_sample,
            fusion_product,
            null_check,
            own_samples,
            photo_set,
            set_generator,
            single_sample,
        )
        from globeflow.answers.fusion import (
            proposals_per_round as per_round_for,
        )

        emb, names, skipped = self._embed_together(photos, names)
        check_fusable(self.model)
        recipe = self._recipe(None, solver, None, num_samples=num_samples, steps=steps,
                              precision=precision)  # fmt: skip
        # Bayes' rule holds for the model's density: fused answers take no guidance (a tempered
        # product plays its part, see answers/fusion.py).
        settings = {**self._settings(recipe, seed), "guidance": 0.0}
        group = photo_set(emb.to(self.model.device), embedding_ids(emb))
        n_distinct = len(group.ids)
        product = fusion_product(self.model, n_distinct)
        per_round = per_round_for(n_distinct, proposals_per_round)
        settings.update(same_place=True, proposals_per_round=per_round)
        region = _as_region(within)
        generator = set_generator(group, seed, self.model.device)
        n, steps = settings["num_samples"], settings["steps"]
        options = {"solver": settings["solver"], "precision": settings["precision"]}
        checks: dict = {}
        with network_threads(_network_width(self.model)):
            if n_distinct == 1 and product.exponent == 1.0:
                sample = single_sample(
                    self.model, group.emb, n, steps, generator, region, **options
                )
            else:
                prepared = self.model.prepare_embeddings(group.emb)
                conditions = torch.cat([prepared, torch.zeros_like(prepared[:1])])
                likelihood_steps = max(steps, LIKELIHOOD_STEPS)
                own = own_samples(self.model, conditions, [*group.ids, NULL_ID], seed,
                                  likelihood_steps)  # fmt: skip
                checks["null_condition"] = null_check(own)
                sample = fused_sample(
                    self.model, group.emb, steps, generator, per_round=per_round,
                    target_ess=min(n, TARGET_ESS), region=region, exponent=product.exponent,
                    own=own,
                )  # fmt: skip
            draw = draw_posterior(sample, n, generator, region)
        conflict = disagreement(draw, [names[group.index.index(k)] for k in range(n_distinct)])
        error = conflict["message"] if conflict and conflict["refused"] else None
        null = checks.get("null_condition")
        if null is not None and not null["ok"]:  # no prior: nothing else the answer says holds
            error = (
                f"the model's null condition is sharper ({null['null_bits']:.1f} bits) than any "
                f"photo's answer ({null['sharpest_photo_bits']:.1f} bits): it is no prior over "
                "places (was the model trained with condition dropout?), so photos cannot be "
                "fused with it"
            )
        result = self._posterior_result(
            draw, settings, region, (top_k, region_radius_km, with_density), error
        )
        odds = [_finite_or_none(v) for v in draw.agreement_log_odds or []]
        bf, bf_se = draw.log_bayes_factor, draw.log_bayes_factor_stderr
        fusion = {
            **product.to_dict(),
            "proposals": draw.proposals,
            "rounds": draw.rounds,
            "distinct_photos": n_distinct,
            "log_bayes_factor_same_place": None if bf is None else _finite_or_none(bf),
            "log_bayes_factor_stderr": None if bf_se is None else _finite_or_none(bf_se),
            "different_places": bool(conflict and conflict["different_places"]),
            "agreement_log_odds": {
                name: odds[k] if k < len(odds) else None
                for name, k in zip(names, group.index, strict=True)
            },
            "normaliser_check": _normaliser_check(draw, [names[group.index.index(k)]
                                                         for k in range(n_distinct)]),
            **checks,
        }  # fmt: skip
        label = f"same place: {', '.join(names)}"
        result.setdefault("ok", True)
        result.setdefault("error", None)
        result.update(image=label, photos=list(names), skipped=skipped, fusion=fusion)
        result["disagreement"] = conflict
        if conflict and not conflict["refused"]:
            result["warning"] = conflict["message"]
        return result

    def _embed_together(self, photos, names) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Embeddings (n, D), names and the unreadable files of ``locate_together``'s input."""
        from globeflow.data.images import ImageLoadError, load_image

        skipped: list[dict] = []
        if isinstance(photos, torch.Tensor):
            emb = photos if photos.dim() == 2 else photos[None]
            labels = list(names or [f"photo {i + 1}" for i in range(emb.shape[0])])
        else:
            loaded = []
            for item in photos:
                if isinstance(item, tuple):
                    loaded.append(item)
                    continue
                try:
                    loaded.append((str(item), load_image(item)))
                except ImageLoadError as exc:
                    skipped.append(_failed(str(item), str(exc)))
            if not loaded:
                raise ValueError("none of the photos could be read")
            labels = list(names or [name for name, _ in loaded])
            emb = self.encoder.embed([img for _, img in loaded])
        if emb.shape[0] != len(labels):
            raise ValueError(f"{len(labels)} names for {emb.shape[0]} photos")
        return emb, labels, skipped

    def _recipe(
        self, sampler: SamplerSettings | None, solver: str | None, grid: str | None, **overrides
    ) -> SamplerSettings:
        """The locator's recipe (or ``sampler``) with the keyword settings that were given: a
        solver given without a grid runs on the recipe's grid, so the recipe's own solver
        spelled out is the recipe (:func:`~globeflow.core.sampler_settings.resolve`)."""
        return (sampler or self.sampler).with_overrides(solver=solver, grid=grid, **overrides)

    def answer_settings(
        self, seed: int = 0, solver: str | None = None, grid: str | None = None,
        region_radius_km: float | None = None, **overrides,
    ) -> dict:  # fmt: skip
        """The ``settings`` block of the answers :meth:`locate_embeddings` gives for these
        keyword settings (every default filled in), and their ``localizability_samples``,
        without locating anything: what decides whether stored answers can be resumed."""
        recipe = self._recipe(None, solver, grid, **overrides)
        return {**self._settings(recipe, seed), "region_radius_km": region_radius_km,
                "localizability_samples": recipe.localizability_samples}  # fmt: skip

    def _settings(self, recipe: SamplerSettings, seed: int) -> dict:
        """The ``settings`` block of an answer drawn with ``recipe`` (solver, guidance and
        precision as this model and device run them: :func:`~globeflow.core.sampler_settings.
        resolve`; no solver or grid for models without solvers)."""
        recipe = resolve(self.model, recipe)
        solver = solver_for(self.model, recipe.solver)
        return {
            "model": self.model_name,
            "family": self.model.family,
            "encoder": self.encoder.name,
            "num_samples": recipe.num_samples,
            "first_samples": recipe.first_samples if recipe.adaptive else recipe.num_samples,
            "guess_score_tolerance": recipe.guess_score_tolerance,
            "region_probability_tolerance": recipe.region_probability_tolerance,
            "guidance": float(recipe.guidance),
            "steps": recipe.steps,
            "solver": solver,
            "grid": recipe.grid if solver is not None else None,
            "precision": recipe.precision,
            "noise": stream_design(self.model, recipe.noise),
            "localizability_steps": recipe.localizability_steps,
            "localizability_solver": recipe.localizability_solver,
            "localizability_precision": localizability_precision(self.model, recipe),
            "localizability_estimator": localizability_estimator(self.model, recipe),
            "seed": seed,
        }

    def _locate_within(self, emb, within, settings, generators, decode) -> list[dict]:
        """``locate_embeddings(within=...)``: each photo's density truncated to the region, by
        rejection from its unguided samples (from its own random stream), with P(region |
        photo)."""
        from globeflow.answers.fusion import draw_posterior, single_sample

        region = _as_region(within)
        settings = {**settings, "guidance": 0.0}
        options = (settings["solver"], settings["precision"])
        n = settings["num_samples"]
        results = []
        with network_threads(_network_width(self.model)):
            for i, generator in enumerate(generators):
                row = emb[i : i + 1]
                sample = single_sample(
                    self.model, row, n, settings["steps"], generator, region, *options
                )
                draw = draw_posterior(sample, n, generator, region)
                results.append(self._posterior_result(draw, settings, region, decode, None))
        return results

    def _posterior_result(self, draw, settings, region, decode, error: str | None) -> dict:
        """The result dict of a :class:`~globeflow.answers.fusion.PosteriorDraw`: decoded as
        usual, or ``ok: false`` with ``error`` when refused or when nothing fell in the region."""
        extra = {"effective_sample_size": draw.effective_sample_size}
        if region is not None:
            extra["mass_inside"] = {**draw.mass.to_dict(), "region": region.to_dict()}
            settings = {**settings, "within": region.description}
            if draw.samples.shape[0] == 0 and error is None:
                error = (
                    f"the model puts no mass inside {region.description} (under "
                    f"{draw.mass.upper_95:.2g} at 95%)"
                )
            error = error or _too_few_inside(draw, region)
        if error is not None:
            return {"ok": False, "error": error, **extra, "settings": settings}
        bits = torch.tensor([draw.localizability_bits])
        stderr = torch.tensor([draw.localizability_stderr_bits])
        top_k, radius_km, with_density = decode
        settings = {**settings, "region_radius_km": radius_km}
        samples = draw.samples[None].float()
        result = self._decode(
            samples, bits, stderr, settings, top_k, radius_km, with_density,
            effective_samples=draw.effective_sample_size,
        )[0]  # fmt: skip
        result.update(extra)
        return result

    def _draw(
        self, emb: torch.Tensor, recipe: SamplerSettings, generators: list[torch.Generator]
    ) -> Draw:
        """Samples (N_i, 2) degrees on CPU per photo, localizability bits (B,), its standard
        error and each sample's Sobol net, each photo's drawn from its own generator with a
        resolved ``recipe``: :func:`globeflow.answers.draw.draw_answers` (the draw
        ``evaluate`` makes too)."""
        return draw_answers(self.model, emb, generators, recipe)

    def locate_images(
        self,
        images: Sequence[tuple[str, Image.Image]],
        num_samples: int | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        exif_gps: Sequence[tuple[float, float] | None] | None = None,
        with_density: bool = True,
        embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> list[dict]:
        """Answers for already-loaded images [(name, PIL image)], in order. Each image's random
        stream is seeded by its name (or its id in ``photo_ids``). ``embeddings_out`` (a list):
        gets (name, embedding (D,)) per image, for a caller that uses them again (fusion).
        ``embeddings`` (B, D): the encoder's for these images, where the caller already has
        them (a job that encodes the next batch while this one is answered)."""
        if not images:
            return []
        keep = kwargs.pop("embeddings_out", None)
        emb = embeddings if embeddings is not None else self.encoder.embed([i for _, i in images])
        if keep is not None:
            keep.extend((name, row) for (name, _), row in zip(images, emb, strict=True))
        kwargs.setdefault("photo_ids", [name for name, _ in images])
        results = self.locate_embeddings(
            emb, num_samples, guidance, steps, with_density=with_density, **kwargs
        )
        gps = list(exif_gps) if exif_gps is not None else [None] * len(images)
        for (name, _), result, truth in zip(images, results, gps, strict=True):
            attach_truth(result, truth)
            result.update(
                {"image": name, "ok": result.get("ok", True), "error": result.get("error")}
            )
        return results

    def locate_paths(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 16,
        progress: bool = False,
        **kwargs,
    ) -> list[dict]:
        """Answers for image files; unreadable files give ``{"ok": False, "error": ...}`` entries
        and never stop the batch. ``progress``: a progress bar on stderr (the command line's;
        a library stays quiet by default)."""
        from tqdm.auto import tqdm

        from globeflow.data.images import ImageLoadError, load_image, read_exif_gps

        results: list[dict] = []
        bar = tqdm(total=len(paths), desc="locating", unit="photo", disable=not progress)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded, gps, order = [], [], []
            for p in chunk:
                try:
                    img = load_image(p)
                except ImageLoadError as exc:
                    results.append(_failed(str(p), str(exc)))
                    continue
                loaded.append((str(p), img))
                gps.append(read_exif_gps(p))
                order.append(len(results))
                results.append({})
            for idx, res in zip(order, self.locate_images(loaded, exif_gps=gps, **kwargs)):
                results[idx] = res
            bar.update(len(chunk))
        bar.close()
        return results


def photo_chunks(num_photos: int, num_samples: int, workers: int = 1) -> list[slice]:
    """Photos per solve so that each solve has at most :data:`ROWS_PER_SOLVE` samples (2 network
    rows each with guidance), at least one photo per solve, and at least ``workers`` solves
    when there are that many photos (each worker gets one)."""
    per_solve = max(1, ROWS_PER_SOLVE // max(1, num_samples))
    per_solve = min(per_solve, max(1, math.ceil(num_photos / max(1, workers))))
    return [slice(i, i + per_solve) for i in range(0, num_photos, per_solve)]


def _first_draw(recipe: SamplerSettings) -> int:
    """Samples per photo of a recipe's first solve: ``first_samples`` for an adaptive one
    (the photos that need more draw them in later solves, a few photos each), else all."""
    return recipe.first_samples if recipe.adaptive else recipe.num_samples


def _network_width(model: GeoModel) -> int | None:
    """Width of the model's denoising network; None for the baselines, which have none."""
    network = getattr(model, "network", None)
    return getattr(network, "config", {}).get("dim")


def _failed(name: str, error: str) -> dict:
    return {"image": name, "ok": False, "error": error}


def _place_names(guesses: torch.Tensor, regions: list[list]) -> list[list[dict]]:
    """Place names of each image's best guess followed by its regions' centres, in one batched
    reverse-geocoding call: [[guess place, region 1 place, ...] per image]."""
    from globeflow.answers.geocode import reverse_geocode

    points = [guesses[i].tolist() for i in range(len(regions))]
    points += [[r.lat, r.lon] for regs in regions for r in regs]
    places = iter(reverse_geocode(torch.tensor(points, dtype=torch.float64), great_circle=True))
    guess_places = [next(places).to_dict() for _ in regions]
    return [[g] + [next(places).to_dict() for _ in regs] for g, regs in zip(guess_places, regions)]


def _answer_at_scale(
    guess: torch.Tensor, regions: list, places: list[dict], extent: tuple | None
) -> dict:
    """The best guess and regions of one photo, named at their scale, with the OpenStreetMap
    link and the map window: ``best_guess``, ``regions``, ``osm_url``, ``map_extent``.

    The best guess's scale is the radius of the first region that holds it (else of the top
    region; with no region, the map window's): its name and the link's zoom then say no more
    than the answer knows.
    """
    lat, lon = float(guess[0]), float(guess[1])
    centres = torch.tensor([[r.lat, r.lon] for r in regions], dtype=torch.float64).reshape(-1, 2)
    km = haversine_km(guess.double(), centres).tolist()
    holding = [r.radius_km for r, d in zip(regions, km) if d <= r.radius_km]
    if regions:
        scale_km = holding[0] if holding else regions[0].radius_km
    else:  # none (no disc of a fixed radius holds enough samples): the map window's scale
        scale_km = extent_radius_km(extent)
    return {
        "best_guess": {
            "lat": lat,
            "lon": lon,
            "place": places[0],
            "label": region_label(places[0], scale_km),
            "scale_km": scale_km,
        },
        "regions": [
            {**r.to_dict(), "place": place, "label": region_label(place, r.radius_km)}
            for r, place in zip(regions, places[1:])
        ],
        "osm_url": osm_url(lat, lon, scale_km),
        "map_extent": list(extent) if extent is not None else None,
    }


def _too_few_inside(draw, region) -> str | None:
    """Why an answer inside ``region`` would look more certain than it is: too few of the
    model's samples fell inside (effective sample size below the fused answers' floor)."""
    from globeflow.answers.fusion import MIN_ESS

    ess = draw.effective_sample_size
    if ess >= MIN_ESS:
        return None
    return (
        f"too few of the model's samples fall inside {region.description} for an answer there "
        f"(effective sample size {ess:.1f} of {draw.proposals:,} draws, below {MIN_ESS:.0f}); "
        f"the model puts {draw.mass.probability:.2g} of its mass inside (± "
        f"{draw.mass.stderr:.1g})"
    )


def _as_region(within: object):
    """A parsed region (``within=`` of the locate methods), or None."""
    if within is None:
        return None
    from globeflow.answers.within import Region, parse_region

    return within if isinstance(within, Region) else parse_region(within)


def _normaliser_check(draw, names: list[str]) -> dict | None:
    """Each photo's density and the null's integrated over the fusion proposals (log, 0 when
    the weights are right) with standard errors, and the largest deviation in standard errors."""
    if draw.normaliser_log is None:
        return None
    keys = [*names, "null condition"]
    logs, ses = draw.normaliser_log, draw.normaliser_stderr
    z = [abs(v) / s if s and math.isfinite(s) and s > 0 else math.inf for v, s in zip(logs, ses)]
    return {
        "log_integral": dict(zip(keys, map(_finite_or_none, logs), strict=True)),
        "stderr": dict(zip(keys, map(_finite_or_none, ses), strict=True)),
        "worst_z": _finite_or_none(max(z)),
    }


def _tolerances(settings: dict) -> dict:
    """The Monte Carlo tolerances an answer was drawn to (see
    :class:`~globeflow.core.sampler_settings.SamplerSettings`), from its ``settings`` block."""
    return {
        "guess_score_tolerance": settings.get("guess_score_tolerance"),
        "region_probability_tolerance": settings.get("region_probability_tolerance"),
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
