"""The authors' one-liner shape (PlonkPipeline(id)(images, batch_size=...)) over our Locator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_hub import tiny_dinov2, tiny_plonk
from PIL import Image

pytest.importorskip("transformers", reason="transformers not installed (optional hub extra)")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import globeflow as gf

    root = tmp_path_factory.mktemp("compat")
    model = tiny_plonk(root / "PLONK_YFCC")  # a local copy named like the hub repo
    tiny_dinov2(root / "dinov2")
    return gf.PlonkPipeline.from_pretrained(model, encoder_path=str(root / "dinov2"))


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), np.uint8)) for i in range(n)]


def test_call_shapes_follow_the_authors_pipeline(pipe) -> None:
    imgs = _images(3)
    many = pipe(imgs, batch_size=3, num_steps=4)
    assert many.shape == (3, 2) and many.dtype == np.float32
    assert (np.abs(many[:, 0]) <= 90).all() and (np.abs(many[:, 1]) <= 180).all()
    assert pipe(imgs[0], batch_size=7, num_steps=4).shape == (7, 2)  # samples for one image
    assert pipe(imgs[:1], num_steps=4).shape == (1, 2)
    with pytest.raises(ValueError, match="must equal the number of images"):
        pipe(imgs, batch_size=5)
    with pytest.raises(ValueError, match="no images"):
        pipe([])


def test_call_is_the_locator_model_sample(pipe) -> None:
    """Thin wrapper: same embeddings, same sampler, authors' defaults (250 steps, cfg 0)."""
    imgs = _images(2)
    got = pipe(imgs, generator=torch.Generator().manual_seed(5))
    emb = pipe.locator.encoder.embed(imgs)
    want = pipe.locator.model.sample(
        emb, 1, 250, 0.0, generator=torch.Generator().manual_seed(5), solver="euler",
        grid="published", precision="fp32",
    )  # fmt: skip
    assert np.allclose(got, want.reshape(-1, 2).numpy(), atol=1e-5)
    guided = pipe(imgs, num_steps=250, cfg=2.0, generator=torch.Generator().manual_seed(5))
    assert not np.allclose(guided, got, atol=1e-3)


def test_locate_gives_the_richer_answers(pipe) -> None:
    results = pipe.locate(_images(1), num_samples=32, steps=2, localizability_samples=16)
    assert len(results) == 1 and results[0]["ok"]
    assert {"best_guess", "regions", "localizability_bits"} <= set(results[0])
    assert results[0]["settings"]["encoder"] == "dinov2-vitl14-reg"
