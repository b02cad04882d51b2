"""The paper's encoders through ``transformers``: DINOv2-L/14 with registers and StreetCLIP.

Both reproduce the PLONK authors' embeddings (same weights, same pixels; see
:mod:`globeflow.data.encoders.preprocessing`) in ``precision="fp32"``. The default precision is
the fastest mode whose embeddings keep cosine >= 0.999 to fp32 in
``benchmarks/encoders_paper.py``. ``transformers`` is optional and imported on first use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from globeflow.core.hub_downloads import (
    DINOV2_HUB_ID,
    STREETCLIP_HUB_ID,
    announce_download,
    looks_like_hub_id,
)
from globeflow.core.precision import fastest_precision
from globeflow.data.encoders.base import Encoder
from globeflow.data.encoders.preprocessing import ALPHA_RULES, clip_pixels, dinov2_pixels

#: ``"fp32"``: float32 weights and maths (bit-for-bit the authors' pipeline);
#: ``"bf16-autocast"``: float32 weights, matrix products in bfloat16 under ``torch.autocast``;
#: ``"bf16"``: bfloat16 weights (half the memory) under ``torch.autocast``.
PRECISIONS = ("fp32", "bf16-autocast", "bf16")
#: transformers attention kernels: ``"sdpa"`` (``scaled_dot_product_attention``) or ``"eager"``.
ATTENTIONS = ("sdpa", "eager")


def default_precision(device: str | torch.device) -> str:
    """The fastest accurate precision for ``device``: ``"bf16"`` on GPUs and on CPUs with native
    bfloat16 instructions (benchmarks/encoders_paper.py: 1.7-3.5x fp32 at cosine >= 0.9999),
    ``"fp32"`` on CPUs without them, where bfloat16 maths is emulated and slow."""
    return fastest_precision(device)


def _need_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "this encoder needs the optional dependency transformers: "
            "pip install 'globeflow[hub]' (or pip install transformers)"
        ) from exc
    return transformers


def load_pretrained(loader: Any, path: str | os.PathLike[str], **kwargs: Any) -> torch.nn.Module:
    """``loader.from_pretrained(path)`` for a local directory or a hub id.

    A hub id that is not cached yet is announced first (size, licence) on stderr. The weights
    must cover the whole model: a checkpoint of another architecture would otherwise leave
    layers at random values without an error. Weights the model does not use (the text tower of
    a full CLIP checkpoint) are ignored quietly.
    """
    text = str(path)
    downloading = False
    if not Path(text).expanduser().exists() and looks_like_hub_id(text):
        downloading = announce_download(text)
    try:
        with _quiet_transformers(progress=downloading):
            model, info = loader.from_pretrained(text, output_loading_info=True, **kwargs)
    except OSError as exc:  # transformers' messages span lines and may not name the model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"{text}: cannot load the encoder weights ({reason})") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{text}: not a checkpoint of {type(model).__name__} (no weights for {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''})"
        )
    return model


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """transformers' load report and progress bars off (bars kept while downloading)."""
    from transformers.utils import logging as tf_logging

    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    if not progress:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


class _TransformersVisionEncoder(Encoder):
    """A transformers vision model whose embedding is the CLS token of its last hidden state."""

    def __init__(
        self,
        loader: Any,
        path: str | os.PathLike[str],
        device: str | torch.device,
        precision: str | None,
        attention: str,
        **from_pretrained_kwargs: Any,
    ) -> None:
        self.device = torch.device(device)
        self.precision = precision or default_precision(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention = attention
        kwargs = {"attn_implementation": attention, **from_pretrained_kwargs}
        model = load_pretrained(loader, path, **kwargs)
        weights = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = model.to(device=self.device, dtype=weights).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        weights_dtype = next(self.model.parameters()).dtype
        with self._autocast():
            out = self.model(pixel_values=x.to(self.device, weights_dtype))
        return out.last_hidden_state[:, 0].float()


class Dinov2Encoder(_TransformersVisionEncoder):
    """DINOv2 ViT-L/14 with registers (paper: ``facebook/dinov2-with-registers-large``, 1024-d).

    Embedding = CLS token after the final layer norm (``last_hidden_state[:, 0]``, equal to the
    hub model's ``model(x)``). Preprocessing = the authors' (:func:`dinov2_pixels`): drop alpha,
    square centre crop, bicubic resize to ``image_size`` (336), ImageNet mean/std.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DINOV2_HUB_ID,
        image_size: int = 336,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        attention: str = "sdpa",
        **from_pretrained_kwargs: Any,
    ) -> None:
        tf = _need_transformers()
        super().__init__(tf.AutoModel, path, device, precision, attention, **from_pretrained_kwargs)
        self.image_size = int(image_size)
        self.name = "dinov2-vitl14-reg"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return dinov2_pixels(img, self.image_size)


class StreetCLIPEncoder(_TransformersVisionEncoder):
    """StreetCLIP vision tower (paper: ``geolocal/StreetCLIP``, CLIP ViT-L/14-336, 1024-d).

    Embedding = CLS token of the vision tower's last hidden state (before the post-layernorm and
    projection). Preprocessing = transformers' CLIP image processor (:func:`clip_pixels`).
    ``alpha`` says how transparent images become RGB: ``"drop"`` (default) as the published
    OSV-5M embeddings saw them (the authors' extraction opened every image with
    ``convert("RGB")``, and the checkpoints date from December 2024, when transformers 4.x also
    dropped alpha), or ``"white"`` as transformers 5.x's processor composites it. Accepts a full
    CLIP checkpoint or a vision-only one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = STREETCLIP_HUB_ID,
        image_size: int | None = None,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        attention: str = "sdpa",
        alpha: str = "drop",
        **from_pretrained_kwargs: Any,
    ) -> None:
        if alpha not in ALPHA_RULES:
            raise ValueError(f"alpha must be one of {ALPHA_RULES}, got {alpha!r}")
        tf = _need_transformers()
        loader = tf.CLIPVisionModel
        super().__init__(loader, path, device, precision, attention, **from_pretrained_kwargs)
        self.alpha = alpha
        self.image_size = int(image_size or self.model.config.image_size)
        self.name = "streetclip"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return clip_pixels(img, self.image_size, self.alpha)
