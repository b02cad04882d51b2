"""Per-photo random streams: batch-free initial states, iid or scrambled Sobol nets."""

from __future__ import annotations

import pytest
import torch

from globeflow.core.exact_field import MixtureTarget, exact_rfm_model
from globeflow.core.families import FlowMatching
from globeflow.core.network import Denoiser
from globeflow.core.random_streams import (
    SOBOL_REPLICATES,
    photo_generators,
    replicate_ids,
    stream_design,
    stream_noise,
)


@pytest.fixture(scope="module")
def sphere_model():
    target = MixtureTarget.from_latlon(torch.tensor([[48.86, 2.35]], dtype=torch.float64))
    return exact_rfm_model([target, target])


def test_sobol_draws_are_nets_per_photo_and_batch_free(sphere_model):
    emb = torch.eye(2, dtype=torch.float64)
    noise, padded = stream_noise(sphere_model, photo_generators(0, ["a", "b"]), 100, emb, "sobol")
    assert padded == 128 and noise.shape == (2, 128, 3)
    assert torch.allclose(noise.norm(dim=-1), torch.ones(2, 128, dtype=torch.float64))
    alone, _ = stream_noise(sphere_model, photo_generators(0, ["b"]), 100, emb[1:], "sobol")
    assert torch.equal(alone[0], noise[1])
    assert not torch.equal(noise[0], noise[1])
    # A stream's next draw scrambles afresh: new nets, not a repeat.
    streams = photo_generators(0, ["a"])
    first, _ = stream_noise(sphere_model, streams, 64, emb[:1], "sobol")
    second, _ = stream_noise(sphere_model, streams, 64, emb[:1], "sobol")
    assert not torch.equal(first, second)


def test_replicate_ids_follow_the_nets_of_each_draw():
    per_net = 128 // SOBOL_REPLICATES
    ids = replicate_ids(100, 128, draw=2)
    assert ids.shape == (100,)
    assert ids[0] == 2 * SOBOL_REPLICATES and ids[per_net] == 2 * SOBOL_REPLICATES + 1
    assert torch.equal(ids.unique_consecutive(), ids.unique())  # each net is one run


def test_only_sphere_noise_is_drawn_as_sobol_nets(sphere_model):
    flow = FlowMatching(Denoiser(dim=32, depth=1, cond_dim=4))
    assert stream_design(sphere_model, "sobol") == "sobol"
    assert stream_design(flow, "sobol") == "iid"  # Gaussian noise in R^3
    assert stream_design(sphere_model, "iid") == "iid"
    with pytest.raises(ValueError, match="noise design"):
        stream_design(sphere_model, "halton")
