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
from globeflow.core.checkpoints import load_model
from globeflow.core.families import GeoModel, effective_area_km2
from globeflow.core.sphere import haversine_km

DEFAULT_MODEL_DIR = "default_model"
DEFAULT_GUIDANCE = 2.0
"""The paper's guidance for point prediction; a checkpoint may recommend its own
(metadata ``recommended_guidance``)."""


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
        ``encoder_options`` go to the encoder (e.g. ``device``, ``precision`` for DINOv2)."""
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
        enc = get_encoder(encoder_name, **kwargs, **(encoder_options or {}))
        return cls(geo, enc, model_name=str(model) if model is not None else "globeflow-default")

    @torch.no_grad()
    def locate_embeddings(
        self,
        emb: torch.Tensor,
        num_samples: int = 512,
        guidance: float | None = None,
        steps: int = 32,
        top_k: int = 5,
        region_radius_km: float = 500.0,
        localizability_samples: int = 128,
        with_density: bool = False,
        seed: int = 0,
    ) -> list[dict]:
        """Answers for embeddings (B, D); see docs/ARCHITECTURE.md for the result structure."""
        from globeflow.answers.geocode import reverse_geocode

        guidance = self.default_guidance if guidance is None else guidance
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        samples = self.model.sample(emb, num_samples, steps, guidance, generator=generator)
        guesses = best_guess(samples)
        loc_bits = torch.full((emb.shape[0],), float("nan"))
        if localizability_samples > 0:
            loc_bits = self.model.localizability(
                emb, num_samples=localizability_samples, steps=steps, generator=generator
            ).cpu()
        areas = effective_area_km2(loc_bits)
        results = []
        all_regions = [
            top_regions(samples[i].cpu(), k=top_k, radius_km=region_radius_km)
            for i in range(emb.shape[0])
        ]
        # One batched reverse-geocoding call for every best guess and region centre.
        points = [guesses[i].tolist() for i in range(emb.shape[0])]
        points += [[r.lat, r.lon] for regs in all_regions for r in regs]
        places = reverse_geocode(torch.tensor(points, dtype=torch.float64))
        region_places = iter(places[emb.shape[0] :])
        for i in range(emb.shape[0]):
            regions = [
                {**r.to_dict(), "place": next(region_places).to_dict()} for r in all_regions[i]
            ]
            result = {
                "best_guess": {
                    "lat": float(guesses[i, 0]),
                    "lon": float(guesses[i, 1]),
                    "place": places[i].to_dict(),
                },
                "regions": regions,
                "localizability_bits": _finite_or_none(float(loc_bits[i])),
                "effective_area_km2": _finite_or_none(float(areas[i])),
                "samples": [[round(a, 4), round(b, 4)] for a, b in samples[i].tolist()],
                "settings": {
                    "model": self.model_name,
                    "family": self.model.family,
                    "encoder": self.encoder.name,
                    "num_samples": num_samples,
                    "guidance": guidance,
                    "steps": steps,
                    "seed": seed,
                    "region_radius_km": region_radius_km,
                },
            }
            if with_density:
                result["density"] = sample_density_grid(samples[i].cpu(), n_lat=60, n_lon=120)
            results.append(result)
        return results

    def locate_images(
        self,
        images: Sequence[tuple[str, Image.Image]],
        num_samples: int = 512,
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
            emb, num_samples, guidance, steps or 32, with_density=with_density, **kwargs
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


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
