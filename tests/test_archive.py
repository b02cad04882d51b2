"""Answers at archive scale: one random stream per photo, so that a photo's answer is the same
bit for bit alone, in any batch, in the server's concurrent batches and on any rank."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from globeflow.apps import pipeline
from globeflow.apps.pipeline import Locator
from globeflow.apps.server import create_app
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.families.baselines import VonMisesFisher
from globeflow.core.network import Denoiser
from globeflow.core.random_streams import photo_seed


class ColourEncoder:
    """6-d embedding of a photo: the mean colour of its left and right halves (per image, so
    an image's embedding does not depend on its batch)."""

    name, dim = "colour-halves", 6

    def embed(self, images, batch_size: int | None = None) -> torch.Tensor:
        halves = [np.asarray(img.convert("RGB").resize((2, 1)), dtype=np.float32) for img in images]
        return torch.from_numpy(np.stack(halves)).reshape(len(images), 6) / 255.0


def toy_locator(family: str = "rfm") -> Locator:
    torch.manual_seed(0)
    if family == "vmf":
        model = VonMisesFisher(cond_dim=6, hidden=16, depth=1)
    else:
        model = RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=6))
    return Locator(model, ColourEncoder(), model_name="toy")


def _answer(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "settings"}


def test_photo_seed_is_stable_and_separates_photos_and_seeds():
    # a fixed value: the same in every process (Python's hash() is salted per process)
    assert photo_seed(0, "a/photo.jpg") == photo_seed(0, "a/photo.jpg") == 7018910361584855354
    seeds = {photo_seed(s, p) for s in (0, 1) for p in ("a.jpg", "b.jpg", "é.jpg")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    "family,settings",
    [
        ("rfm", {"guidance": 2.0}),
        ("rfm", {"guidance": 0.0}),  # one pass gives samples and densities
        ("rfm", {"guidance": 2.0, "precision": "fp32", "solver": "euler"}),
        ("vmf", {}),  # a baseline draws inside sample(): one call per photo
    ],
)
def test_answer_is_bitwise_the_same_alone_and_in_any_batch(monkeypatch, family, settings):
    loc = toy_locator(family)
    monkeypatch.setattr(pipeline, "ROWS_PER_SOLVE", 96)  # three photos of 32 samples per solve
    emb = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    ids = [f"photo{i}.jpg" for i in range(7)]
    kw = dict(num_samples=32, steps=4, localizability_samples=16, seed=11, **settings)
    batch = loc.locate_embeddings(emb, photo_ids=ids, **kw)
    order = [5, 2, 6, 0, 3, 1, 4]
    shuffled = loc.locate_embeddings(emb[order], photo_ids=[ids[i] for i in order], **kw)
    for i in (0, 4, 6):
        alone = loc.locate_embeddings(emb[i : i + 1], photo_ids=ids[i : i + 1], **kw)[0]
        assert _answer(alone) == _answer(batch[i])
    for j, i in enumerate(order):
        assert _answer(shuffled[j]) == _answer(batch[i])
    # The stream is the photo's: another id or seed gives other samples.
    other = loc.locate_embeddings(emb[:1], photo_ids=["renamed.jpg"], **kw)[0]
    assert other["samples"] != batch[0]["samples"]
    reseeded = loc.locate_embeddings(emb[:1], photo_ids=ids[:1], **{**kw, "seed": 12})[0]
    assert reseeded["samples"] != batch[0]["samples"]


def test_without_ids_the_embedding_names_the_stream():
    loc = toy_locator()
    emb = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    kw = dict(num_samples=32, steps=2, localizability_samples=8)
    batch = loc.locate_embeddings(emb, **kw)
    alone = loc.locate_embeddings(emb[2:], **kw)[0]
    assert _answer(alone) == _answer(batch[2])


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (64, 48), colour)
    img.paste((255 - colour[0], 90, 30), (0, 0, 32, 48))
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_server_answer_does_not_depend_on_other_users_traffic():
    loc = toy_locator()
    photos = {f"p{i}.jpg": _jpeg((40 * i, 200 - 30 * i, 120)) for i in range(6)}
    params = {"num_samples": 32, "steps": 2}
    with TestClient(create_app(loc, max_batch=8)) as client:

        def post(names: list[str]) -> list[dict]:
            files = [("file", (n, photos[n], "image/jpeg")) for n in names]
            r = client.post("/v1/locate", files=files, params=params)
            assert r.status_code == 200, r.text
            return r.json()["results"]

        alone = post(["p0.jpg"])[0]
        worker = client.app.state.worker
        batches_before = worker.batches_run
        # Concurrent requests: the worker batches their photos together.
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(post, [["p1.jpg", "p0.jpg"], ["p2.jpg", "p3.jpg"], ["p4.jpg", "p5.jpg"]])
            )
        assert worker.batches_run - batches_before < 3 * 2  # some photos shared a model call
        assert _answer(answers[0][1]) == _answer(alone)
        assert answers[0][1]["samples"] != answers[0][0]["samples"]
