"""The exact RFM field testbed: its closed-form density, field and samples agree."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.core.exact_field import (
    KERNEL_RMS_ANGLE,
    MixtureTarget,
    exact_rfm_model,
    kernel_width_for_rms_km,
    log_kernel,
)
from globeflow.core.likelihood import log_prob_adaptive
from globeflow.core.sphere import angle_between


@pytest.mark.parametrize("width", [1e-4, 1e-2, 0.3, 1.0])
def test_kernel_is_a_density_on_the_sphere(width):
    # int_0^{s pi} k_s(d) 2 pi sin(d) dd = 1; Simpson on a fine grid of the support.
    d = torch.linspace(0.0, width * math.pi, 20001, dtype=torch.float64)
    f = torch.exp(log_kernel(d, width)) * 2 * math.pi * torch.sin(d)
    h = d[1] - d[0]
    simpson = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    assert float(simpson) == pytest.approx(1.0, abs=1e-6)
    assert torch.isneginf(log_kernel(torch.tensor([width * math.pi * 1.01]), width)).all()


def test_samples_have_the_kernel_spread():
    target = MixtureTarget.from_latlon(torch.tensor([[10.0, 20.0]]), width=1e-3)
    model = exact_rfm_model([target])
    x = model.network.target_samples(0, 20000, torch.Generator().manual_seed(0))
    d = angle_between(x, target.atoms.expand_as(x))
    # E[d^2] = (width * KERNEL_RMS_ANGLE)^2; Var(d^2) is finite: 5 standard errors.
    second = (d**2).mean() / (1e-3 * KERNEL_RMS_ANGLE) ** 2
    se = (d**2).std() / (1e-3 * KERNEL_RMS_ANGLE) ** 2 / math.sqrt(len(d))
    assert abs(float(second) - 1.0) < 5 * float(se)


@pytest.mark.parametrize("kernel_km", [1.0, 300.0])
def test_field_transports_noise_to_the_closed_form_density(kernel_km):
    """The likelihood ODE of the exact field (tight adaptive solve) reproduces the closed-form
    target density: field, time map and density are consistent."""
    atoms = torch.tensor([[48.85, 2.35], [45.76, 4.83], [43.30, 5.37]])
    target = MixtureTarget.from_latlon(
        atoms, torch.tensor([0.5, 0.3, 0.2]), kernel_width_for_rms_km(kernel_km)
    )
    model = exact_rfm_model([target])
    # One point at a tolerance of 1e-7 keeps it to seconds (3 points at 1e-8: ~25 s): every point
    # crosses the support edges of the other atoms (jumps of the divergence), which the solver
    # must resolve for all points of the batch.
    x = model.network.target_samples(0, 1, torch.Generator().manual_seed(1))[None]
    emb = torch.ones(1, 1, dtype=torch.float64)
    exact = model.network.target_log_density(x, torch.tensor([0]))
    solved = log_prob_adaptive(model, x, emb, rtol=1e-7, atol=1e-7)
    assert torch.allclose(solved, exact, atol=1e-3)


def test_null_embedding_gives_the_mixture_of_all_targets():
    """The null condition is the unconditional model: its samples split between the targets
    by the prior weights (an exact mixture of flows), so guided fields are exact too."""
    north = MixtureTarget.from_latlon(torch.tensor([[60.0, 10.0]]), width=1e-3)
    south = MixtureTarget.from_latlon(torch.tensor([[-30.0, 150.0]]), width=1e-3)
    model = exact_rfm_model([north, south], condition_weights=torch.tensor([0.75, 0.25]))
    n = 512
    x = model.sample(
        torch.zeros(1, 2, dtype=torch.float64), n, 64, generator=torch.Generator().manual_seed(0)
    )
    share_north = float((x[0, :, 0] > 0).double().mean())
    # Binomial(512, 0.75): 5 standard errors; every sample lands on one of the two atoms.
    assert abs(share_north - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n)
    atoms = torch.tensor([[60.0, 10.0], [-30.0, 150.0]], dtype=torch.float64)
    from globeflow.core.sphere import haversine_km

    nearest = haversine_km(x[0, :, None, :], atoms[None]).min(-1).values
    assert float(nearest.max()) < 50.0
