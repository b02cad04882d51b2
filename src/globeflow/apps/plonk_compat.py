"""The PLONK authors' one-liner, ``PlonkPipeline(model_id)(images, batch_size=...)``, on globeflow.

A thin shape-compatible wrapper over :class:`~globeflow.apps.pipeline.Locator` for users of the
authors' ``plonk`` package: same constructor, same call, same (N, 2) array of degrees, with the
authors' sampling defaults (250 steps, no guidance) unless told otherwise. Each returned row is
one random sample of the model, as in the authors' pipeline; :meth:`PlonkPipeline.locate` gives
globeflow's richer answers (best guess, regions, place names, localizability) for the same images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from globeflow.apps.pipeline import Locator
from globeflow.core.sampler_settings import AUTHORS_SAMPLER


class PlonkPipeline:
    """Geolocate images the way the authors' ``PlonkPipeline`` does, on globeflow's engine.

    ``model_path`` is a PLONK hub id (``nicolas-dufour/PLONK_YFCC``, ``..._OSV_5M``,
    ``..._iNaturalist``, each also ``_flow`` / ``_diffusion``) or a checkpoint directory; the
    encoder is the one the checkpoint was trained with (DINOv2 or StreetCLIP), on ``device``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        encoder: str | None = None,
        encoder_path: str | None = None,
        family: str | None = None,
        precision: str | None = None,
    ) -> None:
        options: dict[str, Any] = {"device": device}
        if precision is not None:
            options["precision"] = precision
        self.locator = Locator.from_pretrained(
            str(model_path),
            encoder=encoder,
            family=family,
            encoder_path=encoder_path,
            device=str(device),
            encoder_options=options,
        )
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], **kwargs: Any) -> PlonkPipeline:
        """Same as the constructor (the shape ``PLONKPipeline.from_pretrained(id)`` asks for)."""
        return cls(model_path, **kwargs)

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image],
        batch_size: int | None = None,
        num_steps: int | None = None,
        cfg: float | None = None,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """Sampled locations in degrees, float32 array (N, 2) of (lat, lon).

        As in the authors' pipeline: for several images, ``batch_size`` (default: their number)
        must equal their number and each row is one sample for one image; for a single image,
        the rows are ``batch_size`` samples for it. ``num_steps``: sampler steps; ``cfg``: the
        classifier-free guidance scale (0 = none). Their sampler, :data:`~globeflow.core.
        sampler_settings.AUTHORS_SAMPLER` (Euler on their grid, float32, 250 steps, cfg 0 unless
        given), so that the raw samples compare one-to-one with theirs; :meth:`locate` answers
        with globeflow's defaults (docs/defaults.md).
        """
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise ValueError("no images given")
        batch_size = len(images) if batch_size is None else int(batch_size)
        if len(images) > 1 and batch_size != len(images):
            raise ValueError(
                f"batch_size ({batch_size}) must equal the number of images ({len(images)}) "
                "when several images are given; pass one image to draw several samples for it"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        per_image = 1 if len(images) > 1 else batch_size
        emb = self.locator.encoder.embed(images).to(self.locator.model.device)
        with torch.no_grad():
            latlon = self.locator.model.sample(
                emb, per_image, num_steps, cfg, generator=generator, settings=AUTHORS_SAMPLER
            )
        return latlon.reshape(-1, 2).float().cpu().numpy()

    def locate(
        self, images: Image.Image | Sequence[Image.Image], **kwargs: Any
    ) -> list[dict[str, Any]]:
        """globeflow's answers for the same images (see ``Locator.locate_images``)."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        named = [(f"image_{i}", img) for i, img in enumerate(images)]
        return self.locator.locate_images(named, **kwargs)


#: The authors' README spells it ``PlonkPipeline``; the issue tracker ``PLONKPipeline``.
PLONKPipeline = PlonkPipeline
