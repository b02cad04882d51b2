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

from globeflow.answers.decode import best_guess, sample_density_grid, top_regions
from globeflow.answers.geocode import region_label
from globeflow.apps.threads import network_threads
from globeflow.core.checkpoints import load_model
from globeflow.core.families import UNIFORM_LOCALIZABILITY_BITS, GeoModel, effective_area_km2
from globeflow.core.likelihood import LOCALIZABILITY_BULK_STEPS, LOCALIZABILITY_SOLVER
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import haversine_km, unit_to_latlon

DEFAULT_MODEL_DIR = "default_model"
DEFAULT_GUIDANCE = 2.0
"""The paper's guidance for point prediction; a checkpoint may recommend its own
(metadata ``recommended_guidance``)."""

# Defaults chosen by measurement (benchmarks/defaults.py, docs/defaults.md): the cheapest setting
# whose answers are within noise of the expensive one.
DEFAULT_NUM_SAMPLES = 1024
DEFAULT_STEPS = 8
"""Solver steps: 9 network evaluations with the lagged midpoint solver (docs/defaults.md)."""
DEFAULT_SOLVER = "lagged-midpoint"
DEFAULT_PRECISION = "bf16"
DEFAULT_LOCALIZABILITY_SAMPLES = 128
DEFAULT_LOCALIZABILITY_STEPS = LOCALIZABILITY_BULK_STEPS
"""Bulk steps of the one-pass localizability estimate; a sharp posterior adds steps uniform in
log(1 - gamma) at the data end (core/likelihood.py, benchmarks/localizability_sharp.py)."""
ROWS_PER_SOLVE = 2048
"""Samples per batched solve (photos are grouped up to it): one solve over many photos' samples
at once leaves the CPU caches and ran up to 2x slower per sample."""


def default_model_path() -> Path:
    """The model bundled inside the package (trained on im2gps3k-train, see docs/)."""
    return Path(str(resources.files("globeflow") / DEFAULT_MODEL_DIR))


class Locator:
    """Geolocate photos with an encoder + a generative model. Loaded once, reused."""

    def __init__(self, model: GeoModel, encoder, model_name: str = "model"):
        if encoder.dim != model.cond_dim:
            raise ValueError(
                f"encoder {encoder.name!r} gives {encoder.dim}-d embeddings but the model expects "
                f"{model.cond_dim}-d"
            )
        self.model = model.eval()
        self.encoder = encoder
        meta = getattr(model, "metadata", {}) or {}
        self.default_guidance = float(meta.get("recommended_guidance", DEFAULT_GUIDANCE))
        self.model_name = model_name

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
        region_radius_km: float = 500.0,
        localizability_samples: int | None = None,
        with_density: bool = False,
        seed: int = 0,
        solver: str | None = None,
        precision: str | None = None,
    ) -> list[dict]:
        """Answers for embeddings (B, D); see docs/ARCHITECTURE.md for the result structure.

        Unset settings take the defaults above (the model's recommended guidance). Samples of
        all B images are drawn in one batched solve.
        """
        settings = {
            "model": self.model_name,
            "family": self.model.family,
            "encoder": self.encoder.name,
            "num_samples": num_samples or DEFAULT_NUM_SAMPLES,
            "guidance": self.default_guidance if guidance is None else float(guidance),
            "steps": steps or DEFAULT_STEPS,
            "solver": self._solver(solver),
            "precision": precision or DEFAULT_PRECISION,
            "seed": seed,
            "region_radius_km": region_radius_km,
        }
        n_loc = DEFAULT_LOCALIZABILITY_SAMPLES
        n_loc = n_loc if localizability_samples is None else localizability_samples
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        with network_threads(_network_width(self.model)):
            parts = [
                self._draw(emb[photos], settings, n_loc, generator)
                for photos in photo_chunks(emb.shape[0], settings["num_samples"])
            ]
            samples, bits, stderr = (torch.cat(part) for part in zip(*parts, strict=True))
            guesses = best_guess(samples)
            regions = [
                top_regions(samples[i], k=top_k, radius_km=region_radius_km)
                for i in range(emb.shape[0])
            ]
        places = _place_names(guesses, regions)
        # Only densities per steradian compare with the uniform one (not the R^3 families').
        on_sphere = getattr(self.model, "density_space", "sphere") == "sphere"
        uniform = UNIFORM_LOCALIZABILITY_BITS if on_sphere else math.nan
        results = []
        for i in range(emb.shape[0]):
            result = {
                "best_guess": {
                    "lat": float(guesses[i, 0]),
                    "lon": float(guesses[i, 1]),
                    "place": places[i][0],
                },
                "regions": [
                    {**r.to_dict(), "place": place, "label": region_label(place, r.radius_km)}
                    for r, place in zip(regions[i], places[i][1:])
                ],
                "localizability_bits": _finite_or_none(float(bits[i])),
                "localizability_vs_uniform_bits": _finite_or_none(float(bits[i]) - uniform),
                "localizability_stderr_bits": _finite_or_none(float(stderr[i])),
                "effective_area_km2": _finite_or_none(float(effective_area_km2(bits[i]))),
                "samples": [[round(a, 4), round(b, 4)] for a, b in samples[i].tolist()],
                "settings": dict(settings),
            }
            if with_density:
                result["density"] = sample_density_grid(samples[i], n_lat=60, n_lon=120)
            results.append(result)
        return results

    def _solver(self, solver: str | None) -> str | None:
        """The requested solver, else the default where the model has it (baselines have none)."""
        if solver is not None:
            return solver
        solvers = getattr(self.model, "solvers", ())
        return DEFAULT_SOLVER if DEFAULT_SOLVER in solvers else None

    def _draw(
        self, emb: torch.Tensor, settings: dict, n_loc: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples (B, N, 2) degrees on CPU, localizability bits (B,) and its standard error.

        Without guidance the answer samples follow the model's density, so one pass with
        log-densities gives both; otherwise localizability takes its own unguided samples.
        """
        model, n = self.model, settings["num_samples"]
        solver, precision = settings["solver"], settings["precision"]
        on_sphere = getattr(model, "geometry", None) is SPHERE
        nan = torch.full((emb.shape[0],), float("nan"))
        if settings["guidance"] == 0.0 and on_sphere and solver in SOLVERS and n_loc > 0:
            # The answer samples follow the density: one pass gives samples and log-densities.
            emb = model.prepare_embeddings(emb)
            steps = max(settings["steps"], DEFAULT_LOCALIZABILITY_STEPS)
            x, log_p = model.sample_with_log_density(
                emb, n, steps, generator, method="path", solver=solver, precision=precision
            )
            bits = log_p / math.log(2.0)
            stderr = bits.std(-1) / math.sqrt(n) if n > 1 else nan
            return unit_to_latlon(x).cpu(), bits.mean(-1).cpu(), stderr.cpu()
        samples = model.sample(
            emb, n, settings["steps"], settings["guidance"], generator=generator, solver=solver,
            precision=precision,
        ).cpu()  # fmt: skip
        if n_loc <= 0:
            return samples, nan, nan
        density = {}
        if on_sphere:
            density = {"method": "path", "solver": LOCALIZABILITY_SOLVER, "precision": precision}
        bits, stderr = model.localizability(
            emb, n_loc, DEFAULT_LOCALIZABILITY_STEPS, generator, return_stderr=True, **density
        )
        return samples, bits.cpu(), stderr.cpu()

    def locate_images(
        self,
        images: Sequence[tuple[str, Image.Image]],
        num_samples: int | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        exif_gps: Sequence[tuple[float, float] | None] | None = None,
        with_density: bool = True,
        **kwargs,
    ) -> list[dict]:
        """Answers for already-loaded images [(name, PIL image)], in order."""
        if not images:
            return []
        emb = self.encoder.embed([img for _, img in images])
        results = self.locate_embeddings(
            emb, num_samples, guidance, steps, with_density=with_density, **kwargs
        )
        gps = list(exif_gps) if exif_gps is not None else [None] * len(images)
        for (name, _), result, truth in zip(images, results, gps, strict=True):
            _attach_truth(result, truth)
            result.update({"image": name, "ok": True, "error": None})
        return results

    def locate_paths(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 16,
        progress: bool = True,
        **kwargs,
    ) -> list[dict]:
        """Answers for image files; unreadable files give ``{"ok": False, "error": ...}`` entries
        and never stop the batch."""
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


def photo_chunks(num_photos: int, num_samples: int) -> list[slice]:
    """Photos per solve so that each solve has at most :data:`ROWS_PER_SOLVE` samples (2 network
    rows each with guidance), at least one photo per solve."""
    per_solve = max(1, ROWS_PER_SOLVE // max(1, num_samples))
    return [slice(i, i + per_solve) for i in range(0, num_photos, per_solve)]


def _network_width(model: GeoModel) -> int | None:
    """Width of the model's denoising network; None for the baselines, which have none."""
    network = getattr(model, "network", None)
    return getattr(network, "config", {}).get("dim")


def _failed(name: str, error: str) -> dict:
    return {"image": name, "ok": False, "error": error}


def _attach_truth(result: dict, truth: tuple[float, float] | None) -> None:
    if truth is None:
        result["exif_gps"], result["error_km"] = None, None
        return
    lat, lon = truth
    guess = torch.tensor([result["best_guess"]["lat"], result["best_guess"]["lon"]])
    km = float(haversine_km(guess, torch.tensor([lat, lon], dtype=guess.dtype)))
    result["exif_gps"] = {"lat": lat, "lon": lon}
    result["error_km"] = km


def _place_names(guesses: torch.Tensor, regions: list[list]) -> list[list[dict]]:
    """Place names of each image's best guess followed by its regions' centres, in one batched
    reverse-geocoding call: [[guess place, region 1 place, ...] per image]."""
    from globeflow.answers.geocode import reverse_geocode

    points = [guesses[i].tolist() for i in range(len(regions))]
    points += [[r.lat, r.lon] for regs in regions for r in regs]
    places = iter(reverse_geocode(torch.tensor(points, dtype=torch.float64)))
    guess_places = [next(places).to_dict() for _ in regions]
    return [[g] + [next(places).to_dict() for _ in regs] for g, regs in zip(guess_places, regions)]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
