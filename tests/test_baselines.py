"""Closed-form baselines: exact densities, normalisation, exact samplers, EM, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from globeflow.core.checkpoints import load_model, save_model
from globeflow.core.families.baselines import (
    BASELINES,
    UniformSphere,
    VonMisesFisher,
    VonMisesFisherMixture,
    fit_vmf_mixture_em,
)
from globeflow.core.sampler_settings import resolve
from globeflow.core.sphere import angle_between, latlon_grid, latlon_to_unit, sample_uniform_sphere
from globeflow.core.vmf import (
    sample_vmf,
    vmf_kappa_from_resultant,
    vmf_log_density,
    vmf_mean_resultant,
)


def _unit(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _fixed_mixture(weights, means, kappas) -> VonMisesFisherMixture:
    m = VonMisesFisherMixture(cond_dim=0, num_components=len(weights)).double()
    m.set_unconditional_parameters(
        torch.tensor(weights, dtype=torch.float64), _unit(means), torch.tensor(kappas).double()
    )
    return m


def _integral(model, cond_dim: int, cells_per_degree: int) -> float:
    latlon, w = latlon_grid(180 * cells_per_degree, 360 * cells_per_degree)
    x = latlon_to_unit(latlon)[None]
    emb = torch.zeros(1, cond_dim, dtype=torch.float64)
    with torch.no_grad():
        return float((model.log_prob_unit(x, emb).exp()[0] * w).sum())


@pytest.mark.parametrize("kappa", [1e-4, 0.3, 2.0, 25.0, 300.0])
def test_vmf_density_matches_independent_formula(kappa):
    mu = _unit([0.3, -0.5, 0.8])
    x = torch.cat(
        [
            sample_uniform_sphere(
                (200,), generator=torch.Generator().manual_seed(0), dtype=torch.float64
            ),
            mu[None],
        ]
    )
    ours = vmf_log_density(x, mu, torch.tensor(kappa, dtype=torch.float64))
    try:
        from scipy.stats import vonmises_fisher

        ref = torch.from_numpy(vonmises_fisher(mu.numpy(), kappa).logpdf(x.numpy()))
    except ImportError:  # scipy < 1.11: textbook normaliser kappa / (4 pi sinh kappa)
        ref = math.log(kappa / (4 * math.pi * math.sinh(kappa))) + kappa * (x @ mu)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-9)


def test_vmf_density_is_finite_for_extreme_kappa():
    mu = _unit([0.0, 0.0, 1.0])
    x = torch.stack([mu, _unit([0.0, 1e-3, 1.0]), -mu])
    for kappa in (1e-6, 1e7):
        lp = vmf_log_density(x, mu, torch.tensor(kappa, dtype=torch.float64))
        assert torch.isfinite(lp[:2]).all()
    lp = vmf_log_density(mu, mu, torch.tensor(1e7, dtype=torch.float64))
    assert lp == pytest.approx(math.log(1e7 / (2 * math.pi)), abs=1e-9)


def test_vmf_regression_nll_is_closed_form():
    torch.manual_seed(0)
    model = VonMisesFisher(cond_dim=5, hidden=32, depth=2).double()
    emb = torch.randn(4, 5, dtype=torch.float64)
    x = sample_uniform_sphere((4,), dtype=torch.float64)
    mu, kappa = model.parameters_for(emb)
    textbook = torch.log(kappa / (4 * math.pi * torch.sinh(kappa))) + kappa * (x * mu).sum(-1)
    assert torch.allclose(model.loss(x, emb), -textbook.mean(), atol=1e-10)
    model.loss(x, emb).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_kappa_solver_inverts_mean_resultant():
    kappa = torch.tensor([1e-3, 0.1, 1.0, 5.0, 29.0, 31.0, 200.0, 1e5], dtype=torch.float64)
    back = vmf_kappa_from_resultant(vmf_mean_resultant(kappa))
    assert torch.allclose(back, kappa, rtol=1e-6)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 40.0, 1e4])
def test_vmf_samples_have_exact_mean_resultant(kappa):
    n = 100_000
    mu = _unit([1.0, 2.0, -0.5])
    g = torch.Generator().manual_seed(1)
    k = torch.full((n,), max(kappa, 1e-6), dtype=torch.float64)
    x = sample_vmf(mu.expand(n, 3), k, g)
    assert torch.allclose(x.norm(dim=-1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    w = x @ mu
    expected = float(vmf_mean_resultant(k[0]))
    # Var[w] for S^2: 1 - 2 A(k) / k - A(k)^2 (from E[w^2] = 1 - 2 A / k); 1/3 at k = 0.
    var = 1 / 3 if kappa == 0 else 1 - 2 * expected / kappa - expected**2
    assert abs(float(w.mean()) - expected) < 4 * math.sqrt(var / n)
    # Angle around mu is uniform: the tangent components average to zero.
    resid = x - w[:, None] * mu
    assert float(resid.mean(0).norm()) < 4 * math.sqrt((1 - expected) / n) + 1e-12


@pytest.mark.parametrize(
    "make, cells_per_degree",
    [
        (lambda: UniformSphere(cond_dim=0).double(), 1),
        (lambda: _fixed_mixture([1.0], [[0, 0, 1]], [1.0]), 1),
        (lambda: _fixed_mixture([1.0], [[0.2, 0.9, 0.1]], [200.0]), 4),
        (
            lambda: _fixed_mixture(
                [0.5, 0.3, 0.2], [[1, 0, 0], [0, 1, 1], [-1, -1, -0.2]], [3.0, 60.0, 150.0]
            ),
            4,
        ),
    ],
)
def test_densities_integrate_to_one(make, cells_per_degree):
    # kappa = 200 has angular std 1/sqrt(200) = 4 degrees: 0.25 degree cells resolve it.
    assert _integral(make(), 0, cells_per_degree) == pytest.approx(1.0, abs=0.02)


def test_conditional_models_integrate_to_one():
    torch.manual_seed(0)
    for model in (
        VonMisesFisher(cond_dim=3, hidden=16).double(),
        VonMisesFisherMixture(cond_dim=3, num_components=4, hidden=16).double(),
    ):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
        emb = torch.randn(1, 3, dtype=torch.float64)
        latlon, w = latlon_grid(360, 720)
        x = latlon_to_unit(latlon)[None]
        with torch.no_grad():
            total = float((model.log_prob_unit(x, emb).exp()[0] * w).sum())
        assert total == pytest.approx(1.0, abs=0.02)


def test_uniform_baseline():
    model = UniformSphere(cond_dim=4)
    emb = torch.zeros(2, 4)
    lp = model.log_prob(torch.tensor([[[10.0, 20.0], [-80.0, 170.0]]]).expand(2, 2, 2), emb)
    assert torch.allclose(lp, torch.full((2, 2), -math.log(4 * math.pi)))
    s = model.sample_unit(
        emb, resolve(model, num_samples=5000), None, torch.Generator().manual_seed(0)
    )
    assert s.shape == (2, 5000, 3) and abs(float(s[..., 2].mean())) < 0.03
    assert float(model.loss(s[0], emb[:1].expand(5000, 4))) == pytest.approx(math.log(4 * math.pi))


def test_mixture_sampling_frequencies():
    model = _fixed_mixture([0.6, 0.3, 0.1], [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [500.0] * 3)
    n = 20_000
    s = model.sample_unit(
        torch.zeros(1, 0, dtype=torch.float64), resolve(model, num_samples=n), None,
        torch.Generator().manual_seed(0),
    )[0]  # fmt: skip
    assign = s.argmax(-1)
    for k, w in enumerate([0.6, 0.3, 0.1]):
        freq = float((assign == k).double().mean())
        assert abs(freq - w) < 4 * math.sqrt(w * (1 - w) / n)


def test_em_recovers_known_mixture():
    g = torch.Generator().manual_seed(3)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = _unit([[1.0, 0.2, 0.3], [-0.4, 1.0, -0.2], [0.1, -0.5, -1.0]])
    kappas = torch.tensor([30.0, 80.0, 10.0], dtype=torch.float64)
    n = 20_000
    idx = torch.multinomial(weights, n, replacement=True, generator=g)
    x = sample_vmf(means[idx], kappas[idx], g)
    fit = fit_vmf_mixture_em(x, 3, iters=200, seed=0)
    log_w, mu, kappa = fit.parameters_for(torch.zeros(1, 0))
    order = [int(angle_between(mu[0], m[None]).argmin()) for m in means]
    assert sorted(order) == [0, 1, 2]
    ang = torch.rad2deg(angle_between(mu[0, order], means))
    assert (ang < 2.0).all()
    assert torch.allclose(log_w.exp()[0, order], weights, atol=0.02)
    assert torch.allclose(kappa[0, order], kappas, rtol=0.1)
    # The fit is at least as likely as the truth on its training data (EM finds the MLE).
    truth = _fixed_mixture(weights.tolist(), means, kappas.tolist())
    emb = torch.zeros(1, 0, dtype=torch.float64)
    with torch.no_grad():
        truth_ll = float(truth.log_prob_unit(x[None], emb).mean())
    assert fit.em_log_likelihood >= truth_ll - 1e-6


def test_em_with_duplicates_stays_finite():
    x = torch.cat(
        [
            _unit([[0.0, 0.0, 1.0]]).expand(500, 3),
            _unit(np.random.default_rng(0).normal(size=(500, 3))),
        ]
    )
    fit = fit_vmf_mixture_em(x, 2, iters=100, seed=0)
    lp = fit.log_prob_unit(x[None].float(), torch.zeros(1, 0))
    assert torch.isfinite(lp).all()
    _, _, kappa = fit.parameters_for(torch.zeros(1, 0))
    assert float(kappa.max()) <= fit.kappa_max * (1 + 1e-6)


def test_unconditional_sgd_works():
    torch.manual_seed(0)
    model = VonMisesFisher(cond_dim=0)
    target = _unit([0.0, 0.6, 0.8]).float()
    n = 4000
    x = sample_vmf(target.expand(n, 3), torch.full((n,), 20.0), torch.Generator().manual_seed(0))
    # Gradient-based fitting of the constant head (L-BFGS converges in a few dozen steps).
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = model.loss(x, torch.zeros(n, 0))
        loss.backward()
        return loss

    opt.step(closure)
    mu, kappa = model.parameters_for(torch.zeros(1, 0))
    assert float(torch.rad2deg(angle_between(mu[0].float(), target))) < 2.0
    # SGD reaches the closed-form maximum likelihood to within 0.01 nats per point.
    xbar = x.double().mean(0)
    mle = vmf_log_density(
        x.double(), xbar / xbar.norm(), vmf_kappa_from_resultant(xbar.norm())
    ).mean()
    with torch.no_grad():
        assert float(model.loss(x, torch.zeros(n, 0))) < -float(mle) + 0.01
    assert 10.0 < float(kappa) < 30.0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    kwargs = {"hidden": 16} if name != "uniform" else {}
    model = BASELINES[name](cond_dim=6, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_model(model, tmp_path / name)
    loaded = load_model(tmp_path / name)
    assert type(loaded) is type(model) and loaded.config_dict() == model.config_dict()
    emb = torch.randn(3, 6)
    latlon = torch.tensor([[[48.8, 2.3], [-33.9, 151.2]]]).expand(3, 2, 2)
    assert torch.allclose(loaded.log_prob(latlon, emb), model.log_prob(latlon, emb))
    s = loaded.sample(emb, 7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 7, 2)


def test_em_model_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = sample_vmf(_unit([0.0, 1.0, 0.0]).expand(3000, 3), torch.full((3000,), 50.0), g)
    fit = fit_vmf_mixture_em(x, 2, iters=50, seed=0)
    save_model(fit, tmp_path / "em")
    loaded = load_model(tmp_path / "em")
    pts = x[None, :10].float()
    assert torch.allclose(
        loaded.log_prob_unit(pts, torch.zeros(1, 0)), fit.log_prob_unit(pts, torch.zeros(1, 0))
    )
