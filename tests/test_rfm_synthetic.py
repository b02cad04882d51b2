"""End-to-end check of Riemannian flow matching on a synthetic conditional task.

Three conditions (one-hot embeddings); under condition c the location is a known mixture of two
vMF distributions on S^2 with kappa = 50 (angular std about 8 degrees). A small RFM
(``Denoiser(dim=64, depth=3, cond_dim=3)``) is trained for a fixed number of steps with a fixed
seed, then its samples and its exact likelihood are compared with the truth.

How the tolerances were derived:

* Mixture frequencies: with n samples per condition the sampling error of a frequency is
  sqrt(w (1 - w) / n); we allow 4 such standard errors (false alarm < 1e-4 per check for a
  perfect model) plus 0.05 for the model's own error after a short training run.
* Fraction of samples within 15 degrees of a true mode: for a vMF on S^2,
  P(angle < r) = (1 - exp(-kappa (1 - cos r))) / (1 - exp(-2 kappa)) = 0.82 for kappa = 50;
  the modes are > 60 degrees apart so the mixture's fraction is the same. Same allowance:
  4 binomial standard errors + 0.07.
* Held-out NLL: for the same held-out points, NLL_model - NLL_true estimates KL(p || q) >= 0
  (up to sampling noise); an undertrained model sits a few tenths of a nat above. We require
  the gap to lie in [-4 SE, 0.35] nats (SE: standard error of the paired difference), and the
  model to beat the uniform density (log 4 pi = 2.53 nats) by more than 2 nats (truth: ~2.9).
"""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Denoiser
from globeflow.core.sampler_settings import AUTHORS_SAMPLER, resolve
from globeflow.core.sphere import LOG_UNIFORM_DENSITY, angle_between
from globeflow.core.vmf import sample_vmf, vmf_log_density

KAPPA = 50.0
WEIGHTS = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
MEANS_LATLON = [
    [(40.0, 0.0), (-20.0, 100.0)],
    [(0.0, -90.0), (60.0, 150.0)],
    [(-50.0, 30.0), (10.0, 170.0)],
]


def _means() -> torch.Tensor:
    from globeflow.core.sphere import latlon_to_unit

    return latlon_to_unit(torch.tensor(MEANS_LATLON, dtype=torch.float64))  # (3, 2, 3)


def _sample_truth(cond: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    comp = torch.multinomial(WEIGHTS[cond], 1, generator=g)[:, 0]
    mu = _means()[cond, comp]
    return sample_vmf(mu, torch.full((cond.shape[0],), KAPPA, dtype=torch.float64), g)


def _true_log_prob(x: torch.Tensor, cond: int) -> torch.Tensor:
    """x (M, 3) -> (M,) natural log density per steradian under condition cond."""
    mu = _means()[cond]
    k = torch.tensor(KAPPA, dtype=torch.float64)
    comp = torch.stack([vmf_log_density(x, mu[j], k) for j in range(2)], -1)
    return torch.logsumexp(comp + WEIGHTS[cond].log(), -1)


@pytest.fixture(scope="module")
def trained_model() -> RiemannianFlowMatching:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=64, depth=3, cond_dim=3), cond_drop_prob=0.0)
    steps, batch = 1500, 256
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        cond = torch.randint(3, (batch,), generator=g)
        x0 = _sample_truth(cond, g).float()
        emb = torch.nn.functional.one_hot(cond, 3).float()
        loss = model.loss(x0, emb, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.mark.slow
def test_samples_match_the_true_mixture(trained_model):
    n = 2000
    emb = torch.eye(3)
    recipe = resolve(trained_model, AUTHORS_SAMPLER, num_samples=n, steps=64)  # unguided Euler
    x = trained_model.sample_unit(emb, recipe, None, torch.Generator().manual_seed(1))
    x = x.double()
    for c in range(3):
        ang = torch.rad2deg(angle_between(x[c, :, None, :], _means()[c][None]))  # (n, 2)
        assign = ang.argmin(-1)
        for j in range(2):
            w = float(WEIGHTS[c, j])
            freq = float((assign == j).double().mean())
            assert abs(freq - w) < 4 * math.sqrt(w * (1 - w) / n) + 0.05, (c, j, freq, w)
        r = math.radians(15.0)
        p_true = -math.expm1(-KAPPA * (1 - math.cos(r))) / -math.expm1(-2 * KAPPA)
        frac = float((ang.min(-1).values < 15.0).double().mean())
        assert abs(frac - p_true) < 4 * math.sqrt(p_true * (1 - p_true) / n) + 0.07, (c, frac)


@pytest.mark.slow
def test_held_out_nll_is_close_to_the_truth(trained_model):
    m = 150
    g = torch.Generator().manual_seed(2)
    diffs, model_nll, true_nll = [], [], []
    for c in range(3):
        x = _sample_truth(torch.full((m,), c), g)
        emb = torch.nn.functional.one_hot(torch.tensor([c]), 3).float()
        with torch.no_grad():
            lp_model = trained_model.log_prob_unit(x[None].float(), emb)[0].double()
        lp_true = _true_log_prob(x, c)
        diffs.append(lp_true - lp_model)
        model_nll.append(-lp_model)
        true_nll.append(-lp_true)
    d = torch.cat(diffs)
    gap, se = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
    assert -4 * se < gap < 0.35, (gap, se)
    nll = float(torch.cat(model_nll).mean())
    assert nll < -LOG_UNIFORM_DENSITY - 2.0, nll
    assert abs(nll - float(torch.cat(true_nll).mean())) < 0.35 + 4 * se
