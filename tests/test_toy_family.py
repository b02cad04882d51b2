"""A new family needs only a class and a registry entry: a toy vMF family, defined and registered
here at run time, runs sampling, densities, localizability, the Locator's answers and
save / load through the same code as the built-in families."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from globeflow.apps.pipeline import Locator
from globeflow.core.checkpoints import load_model, save_model
from globeflow.core.families import FAMILIES, GeoModel, family_class, family_names, register_family
from globeflow.core.sphere import latlon_to_unit, project_to_sphere
from globeflow.core.vmf import sample_vmf, vmf_log_density, vmf_log_normalizer

KAPPA = 50.0


class ToyVonMisesFisher(GeoModel):
    """p(x | c) = vMF(x; normalize(W c + b), KAPPA): a linear map from the condition to the mean
    direction, one fixed concentration."""

    family = "toy-vmf"
    density_space = "sphere"

    def __init__(self, cond_dim: int):
        super().__init__()
        self.cond_dim = cond_dim
        self.mean_head = nn.Linear(cond_dim, 3)

    def mean(self, emb: torch.Tensor) -> torch.Tensor:
        return project_to_sphere(self.mean_head(emb).double())

    def sample_unit(self, emb, recipe, noise=None, generator=None):
        mu = self.mean(emb)[:, None, :].expand(-1, recipe.num_samples, 3)
        kappa = torch.full(mu.shape[:-1], KAPPA, dtype=torch.float64)
        return sample_vmf(mu, kappa, generator).to(emb.dtype)

    def log_prob_unit(self, x, emb, steps=None, precision=None):
        kappa = torch.tensor(KAPPA, dtype=torch.float64)
        return vmf_log_density(x.double(), self.mean(emb)[:, None, :], kappa).to(x.dtype)

    def loss(self, x0, emb, generator=None):
        return -self.log_prob_unit(x0[:, None, :], emb).mean()

    def config_dict(self) -> dict:
        return {"family": self.family, "cond_dim": self.cond_dim}

    @classmethod
    def from_config(cls, config: dict) -> ToyVonMisesFisher:
        return cls(config["cond_dim"])


class FakeEncoder:
    name, dim = "fake-encoder", 4


@pytest.fixture()
def toy():
    register_family(ToyVonMisesFisher)
    torch.manual_seed(0)
    try:
        yield ToyVonMisesFisher(cond_dim=4).eval()
    finally:
        del FAMILIES[ToyVonMisesFisher.family]


def _entropy_bits() -> float:
    """E[log2 p] of vMF(KAPPA) on S^2: log C + KAPPA (A(KAPPA) - 1), A = coth - 1/kappa."""
    k = torch.tensor(KAPPA, dtype=torch.float64)
    mean_cos = 1.0 / math.tanh(KAPPA) - 1.0 / KAPPA
    return float(vmf_log_normalizer(k) + KAPPA * (mean_cos - 1.0)) / math.log(2.0)


def test_registered_family_is_listed_and_found(toy):
    assert ToyVonMisesFisher.family in family_names()
    assert family_class("toy-vmf") is ToyVonMisesFisher
    assert not toy.draws_initial_noise
    with pytest.raises(ValueError, match="already registered"):
        register_family(ToyVonMisesFisher)


def test_toy_family_samples_and_scores(toy):
    emb = torch.randn(3, 4)
    gen = torch.Generator().manual_seed(1)
    latlon = toy.sample(emb, 256, generator=gen)
    assert latlon.shape == (3, 256, 2)
    # The samples concentrate around the mean: E[mu.x] = coth(k) - 1/k.
    cos = (latlon_to_unit(latlon.double()) * toy.mean(emb)[:, None, :]).sum(-1)
    assert cos.mean().item() == pytest.approx(1.0 / math.tanh(KAPPA) - 1.0 / KAPPA, abs=0.01)
    log_p = toy.log_prob(latlon, emb)
    expected = vmf_log_density(latlon_to_unit(latlon.double()), toy.mean(emb)[:, None, :],
                               torch.tensor(KAPPA, dtype=torch.float64))  # fmt: skip
    assert torch.allclose(log_p.double(), expected, atol=1e-4)


def test_toy_family_localizability_is_its_entropy(toy):
    bits, stderr = toy.localizability(
        torch.randn(2, 4), 2000, generator=torch.Generator().manual_seed(2), return_stderr=True
    )
    assert torch.allclose(bits.double(), torch.full((2,), _entropy_bits(), dtype=torch.float64),
                          atol=float(4 * stderr.max()))  # fmt: skip


def test_toy_family_answers_through_the_locator(toy):
    locator = Locator(toy, FakeEncoder(), model_name="toy")
    emb = torch.randn(2, 4)
    results = locator.locate_embeddings(emb, num_samples=256, localizability_samples=64, seed=3)
    again = locator.locate_embeddings(emb, num_samples=256, localizability_samples=64, seed=3)
    assert results == again
    for result, mu in zip(results, toy.mean(emb), strict=True):
        guess = torch.tensor([[result["best_guess"]["lat"], result["best_guess"]["lon"]]])
        # 1/sqrt(KAPPA) = 0.14 rad of spread: the best guess lies within it of the mean.
        assert (latlon_to_unit(guess.double())[0] @ mu).item() > math.cos(0.14)


def test_toy_family_saves_and_loads(toy, tmp_path):
    save_model(toy, tmp_path / "toy")
    loaded = load_model(tmp_path / "toy")
    assert type(loaded) is ToyVonMisesFisher
    emb = torch.randn(2, 4)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(
        loaded.sample(emb, 16, generator=gen()), toy.sample(emb, 16, generator=gen())
    )
