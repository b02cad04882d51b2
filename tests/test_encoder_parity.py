"""Exact parity with the PLONK authors' encoder pipelines (shared/compat/encoders).

The vectors were made with the authors' code (torchvision-style DINOv2 preprocessing + the hub
DINOv2 model; transformers' CLIP image processor + CLIPVisionModel) on tiny random models of the
real architectures. Same weights and same pixels must give the same embeddings: float32 noise
only (<= 1e-5), never a moved crop or a resized edge (those show up as 1e-2..1e-1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, require_shared
from PIL import Image

from globeflow.data.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    center_crop_square,
    clip_pixels,
    dinov2_pixels,
    get_encoder,
    resize_short_side,
    to_rgb,
    to_tensor,
)
from globeflow.data.encoders.preprocessing import short_side_size

COMPAT = SHARED / "compat" / "encoders"
IMAGES = ("gray_351x256_L", "landscape_500x300_rgb", "portrait_240x400_rgb", "rgba_400x539_RGBA")
TOL = 1e-5


@pytest.fixture(scope="module")
def compat() -> Path:
    require_shared(COMPAT / "expected_embeddings.safetensors", "encoder parity vectors")
    pytest.importorskip("transformers", reason="transformers not installed (optional hub extra)")
    return COMPAT


@pytest.fixture(scope="module")
def expected(compat: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(compat / "expected_embeddings.safetensors"))


def _image(compat: Path, stem: str) -> Image.Image:
    with Image.open(compat / "images" / f"{stem}.png") as img:
        img.load()
        return img


# ---- preprocessing: pixel-exact against the authors' stored crops (no model involved) ----


@pytest.mark.parametrize("stem", IMAGES)
def test_dinov2_pixels_equal_the_authors_crop(compat: Path, stem: str) -> None:
    ref = Image.open(compat / "preprocessed" / f"dinov2_{stem}_336.png")
    want = to_tensor(ref, IMAGENET_MEAN, IMAGENET_STD, rescale="divide")
    assert torch.equal(dinov2_pixels(_image(compat, stem)), want)


@pytest.mark.parametrize("stem", IMAGES)
def test_streetclip_pixels_equal_the_processor_output(compat: Path, stem: str) -> None:
    """The stored processor crop is the transformers 5 one (alpha composited on white)."""
    ref = Image.open(compat / "preprocessed" / f"streetclip_{stem}_336.png")
    want = to_tensor(ref, CLIP_MEAN, CLIP_STD, rescale="float64")
    assert torch.equal(clip_pixels(_image(compat, stem), alpha="white"), want)


# ---- embeddings: the encoders end to end against the stored vectors ----


@pytest.fixture(scope="module")
def dinov2(compat: Path):
    return get_encoder("dinov2-vitl14-reg", path=compat / "dinov2_tiny_hf", precision="fp32")


@pytest.fixture(scope="module")
def streetclip(compat: Path):
    return get_encoder("streetclip", path=compat / "clip_tiny_hf", precision="fp32")


def test_dinov2_encoder_reproduces_every_vector(compat, expected, dinov2) -> None:
    got = dinov2.embed([_image(compat, s) for s in IMAGES], batch_size=3)
    for i, stem in enumerate(IMAGES):
        err = (got[i] - expected[f"dinov2/{stem}"]).abs().max().item()
        assert err <= TOL, (stem, err)


def test_streetclip_encoder_reproduces_every_vector(compat, expected, streetclip) -> None:
    """Default alpha rule "drop" (transformers 4.x, when the OSV-5M embeddings were made)."""
    assert streetclip.alpha == "drop"
    got = streetclip.embed([_image(compat, s) for s in IMAGES], batch_size=4)
    for i, stem in enumerate(IMAGES):
        key = "streetclip_alpha_dropped" if stem.endswith("RGBA") else "streetclip"
        err = (got[i] - expected[f"{key}/{stem}"]).abs().max().item()
        assert err <= TOL, (stem, err)


def test_streetclip_white_alpha_reproduces_the_transformers_5_vectors(compat, expected) -> None:
    enc = get_encoder("streetclip", path=compat / "clip_tiny_hf", precision="fp32", alpha="white")
    got = enc.embed([_image(compat, s) for s in IMAGES])
    for i, stem in enumerate(IMAGES):
        err = (got[i] - expected[f"streetclip/{stem}"]).abs().max().item()
        assert err <= TOL, (stem, err)
    # the two stored RGBA variants really differ, so each test above pins one rule
    rgba = "rgba_400x539_RGBA"
    gap = expected[f"streetclip/{rgba}"] - expected[f"streetclip_alpha_dropped/{rgba}"]
    assert gap.abs().max() > 0.05


# ---- the rounding rules themselves, on sizes where they disagree ----


def test_square_crop_rounds_half_to_even_like_torchvision() -> None:
    # 351 - 256 = 95: offset 47.5 -> 48 (floor would give 47); 353: 48.5 -> 48
    for w, left in ((351, 48), (353, 48), (355, 50), (300, 22)):
        img = Image.fromarray(np.arange(w, dtype=np.uint8)[None, :].repeat(256, 0))
        crop = center_crop_square(img)
        assert crop.size == (256, 256)
        assert np.asarray(crop)[0, 0] == left % 256, w


def test_clip_resize_truncates_and_crop_floors_like_transformers() -> None:
    # 256 x 351: 336 * 351 / 256 = 460.69 -> 460 (rounding would give 461)
    assert short_side_size(256, 351, 336, "truncate") == (336, 460)
    assert short_side_size(256, 351, 336, "round") == (336, 461)
    assert short_side_size(500, 300, 336, "truncate") == (560, 336)
    img = Image.fromarray(np.arange(463, dtype=np.int32).astype(np.uint8)[:, None].repeat(5, 1))
    # 463 - 336 = 127: floor 63, torchvision rounding 64
    assert np.asarray(center_crop(img, 5, 336, rounding="floor"))[0, 0] == 63
    assert np.asarray(center_crop(img, 5, 336, rounding="round"))[0, 0] == 64
    assert resize_short_side(Image.new("RGB", (256, 351)), 336, "truncate").size == (336, 460)


def test_alpha_rules() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 0))  # fully transparent green
    assert np.asarray(to_rgb(rgba, "drop"))[0, 0].tolist() == [10, 200, 30]
    assert np.asarray(to_rgb(rgba, "white"))[0, 0].tolist() == [255, 255, 255]
    gray = Image.new("L", (2, 2), 77)
    assert to_rgb(gray, "white").mode == "RGB" and np.asarray(to_rgb(gray))[0, 0, 2] == 77
    with pytest.raises(ValueError, match="alpha rule"):
        to_rgb(gray, "black")
