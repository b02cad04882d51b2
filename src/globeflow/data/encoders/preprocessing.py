"""Image preprocessing for the encoders: pure functions on PIL images and tensors.

Each paper encoder must see exactly the pixels the PLONK authors' pipeline fed it, or the
published checkpoints get embeddings they were not trained on. The two reference pipelines round
differently, so the rules are spelled out here and named after the library whose behaviour they
reproduce (checked against ``shared/compat/encoders`` to 1e-5):

- torchvision (authors' DINOv2 path): square crop offset ``int(round((w - s) / 2))`` (halves to
  even), ``ToTensor`` divides by 255 in float32;
- transformers' CLIP image processor (StreetCLIP path): long side ``int(size * long / short)``
  (truncation), crop offset ``(n - size) // 2`` (floor), rescale in float64 then cast to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: How an image with an alpha channel becomes RGB. ``"drop"``: ``convert("RGB")``, the colour
#: under transparent pixels is kept (PIL, torchvision, transformers 4.x). ``"white"``: composite
#: onto a white background (transformers 5.x ``convert_to_rgb``).
ALPHA_RULES = ("drop", "white")

#: How uint8 pixels become floats in [0, 1]. ``"multiply"``: float32 ``x * (1/255)``;
#: ``"divide"``: float32 ``x / 255`` (torchvision ``ToTensor``); ``"float64"``: ``x * (1/255)``
#: in float64, then cast to float32 (transformers ``rescale``). They differ by at most one ulp.
RESCALE_RULES = ("multiply", "divide", "float64")


def to_rgb(img: Image.Image, alpha: str = "drop") -> Image.Image:
    """Any PIL image -> mode ``RGB`` following ``alpha`` (see :data:`ALPHA_RULES`)."""
    if alpha not in ALPHA_RULES:
        raise ValueError(f"alpha rule must be one of {ALPHA_RULES}, got {alpha!r}")
    if alpha == "white" and ("A" in img.getbands() or img.info.get("transparency") is not None):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def center_crop_square(img: Image.Image) -> Image.Image:
    """Largest centred square, offsets rounded half to even as torchvision's ``center_crop``
    does (the authors' DINOv2 crop): 351x256 -> left 48, not 47."""
    w, h = img.size
    side = min(w, h)
    return center_crop(img, side, side, rounding="round")


def center_crop(
    img: Image.Image, width: int, height: int | None = None, rounding: str = "round"
) -> Image.Image:
    """Centred ``width`` x ``height`` crop of an image at least that large.

    ``rounding="round"``: offset ``int(round((n - size) / 2))`` (torchvision, halves to even);
    ``rounding="floor"``: offset ``(n - size) // 2`` (transformers ``center_crop``).
    """
    height = width if height is None else height
    w, h = img.size
    if rounding == "round":
        left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))
    elif rounding == "floor":
        left, top = (w - width) // 2, (h - height) // 2
    else:
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    return img.crop((left, top, left + width, top + height))


def short_side_size(width: int, height: int, size: int, rounding: str = "round") -> tuple[int, int]:
    """Output (width, height) when the shorter side becomes ``size`` pixels.

    The longer side is ``size * long / short`` rounded to nearest (``"round"``) or truncated
    (``"truncate"``, transformers' ``get_resize_output_image_size`` and torchvision ``Resize``).
    """
    short, long = min(width, height), max(width, height)
    exact = size * long / short
    if rounding == "round":
        new_long = max(1, round(exact))
    elif rounding == "truncate":
        new_long = int(exact)
    else:
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    return (size, new_long) if width <= height else (new_long, size)


def resize_short_side(img: Image.Image, size: int, rounding: str = "round") -> Image.Image:
    """Bicubic resize so the shorter side is ``size`` pixels, keeping the aspect ratio
    (long side rounded as in :func:`short_side_size`)."""
    return img.resize(short_side_size(*img.size, size, rounding), Image.BICUBIC)


def unit_pixels(img: Image.Image, rescale: str = "multiply") -> np.ndarray:
    """RGB PIL image -> float32 array (H, W, 3) in [0, 1] (see :data:`RESCALE_RULES`)."""
    arr = np.asarray(img.convert("RGB"))
    if rescale == "multiply":
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)
    if rescale == "divide":
        return arr.astype(np.float32) / np.float32(255.0)
    if rescale == "float64":
        return (arr.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    raise ValueError(f"rescale rule must be one of {RESCALE_RULES}, got {rescale!r}")


def to_tensor(
    img: Image.Image,
    mean: Sequence[float],
    std: Sequence[float],
    rescale: str = "multiply",
) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, H, W): ``(pixel / 255 - mean) / std``,
    the division done as ``rescale`` says, the rest in float32."""
    x = torch.from_numpy(unit_pixels(img, rescale)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def dinov2_pixels(img: Image.Image, size: int = 336) -> torch.Tensor:
    """The authors' DINOv2 preprocessing: drop alpha, torchvision square centre crop, bicubic
    resize to ``size``, ``ToTensor``, ImageNet mean/std. Returns (3, size, size) float32."""
    square = center_crop_square(to_rgb(img, "drop"))
    if square.size != (size, size):
        square = square.resize((size, size), Image.BICUBIC)
    return to_tensor(square, IMAGENET_MEAN, IMAGENET_STD, rescale="divide")


def clip_pixels(img: Image.Image, size: int = 336, alpha: str = "drop") -> torch.Tensor:
    """transformers' CLIP image processor (PIL backend): RGB by ``alpha``, shorter side to
    ``size`` (long side truncated), bicubic, floor-offset centre crop, float64 rescale, CLIP
    mean/std. Returns (3, size, size) float32."""
    resized = resize_short_side(to_rgb(img, alpha), size, rounding="truncate")
    return to_tensor(center_crop(resized, size, rounding="floor"), CLIP_MEAN, CLIP_STD, "float64")
