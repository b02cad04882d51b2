"""Non-finite model outputs are an error, never an answer (they used to become the North Pole)."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.core.families import (
    DENOISING_FAMILIES,
    NonFiniteOutputError,
    RiemannianFlowMatching,
)
from globeflow.core.network import Denoiser
from globeflow.core.sphere import project_to_sphere
from globeflow.jobs.evaluation import evaluate


def test_projection_keeps_nan_and_inf_visible():
    x = torch.tensor(
        [[0.0, 0.0, 0.0], [math.nan, 1.0, 0.0], [math.inf, 0.0, 1.0], [3e30, 3e30, 0.0]]
        + [[0.0, 3.0, 4.0]]
    )
    y = project_to_sphere(x)
    assert torch.equal(y[0], torch.tensor([0.0, 0.0, 1.0]))  # zero vector: the north pole
    assert torch.isnan(y[1:4]).all(dim=1).all()  # NaN, inf, a float32 norm that overflows
    assert torch.allclose(y[4], torch.tensor([0.0, 0.6, 0.8]))


def _model(family: str = "rfm"):
    torch.manual_seed(0)
    return DENOISING_FAMILIES[family](Denoiser(dim=16, depth=1, cond_dim=4)).eval()


CASES = [(family, math.nan) for family in sorted(DENOISING_FAMILIES)]
# DDIM clamps its x0 estimate, so diffusion turns inf guidance into finite (extreme) samples;
# the settings check refuses inf guidance before any model runs.
CASES += [("rfm", math.inf), ("flow", math.inf)]


@pytest.mark.parametrize(("family", "guidance"), CASES)
def test_non_finite_guidance_raises_instead_of_answering(family, guidance):
    emb = torch.randn(3, 4)
    with pytest.raises(NonFiniteOutputError) as info:
        _model(family).sample(emb, num_samples=8, steps=2, guidance=guidance)
    message = str(info.value)
    assert "\n" not in message and "3 of 3 inputs" in message and "NaN or inf" in message


def test_nan_weights_raise_and_finite_rows_are_counted():
    model = _model()
    with torch.no_grad():
        model.network.final_linear.weight.fill_(math.nan)
    with pytest.raises(NonFiniteOutputError, match="2 of 2 inputs"):
        model.sample(torch.randn(2, 4), num_samples=8, steps=2, guidance=2.0)


def test_one_bad_embedding_is_counted_alone():
    emb = torch.randn(4, 4)
    emb[2, 0] = math.inf
    with pytest.raises(NonFiniteOutputError, match="1 of 4 inputs"):
        _model().sample(emb, num_samples=8, steps=2, guidance=1.0)


def test_finite_settings_still_sample_the_sphere():
    latlon = _model().sample(torch.randn(2, 4), num_samples=8, steps=2, guidance=10.0)
    assert latlon.shape == (2, 8, 2) and torch.isfinite(latlon).all()


class _Embeddings:
    def __init__(self, n: int) -> None:
        self.embeddings = torch.randn(n, 4).numpy()
        self.latlon = torch.tensor([[48.85, 2.35]] * n).numpy()


def test_evaluate_does_not_score_nan_guidance():
    model = _model()
    assert isinstance(model, RiemannianFlowMatching)
    with pytest.raises(NonFiniteOutputError):
        evaluate(model, _Embeddings(4), guidance=math.nan, num_samples=8, steps=2, progress=False)
