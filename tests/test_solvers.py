"""Runge-Kutta solvers on S^2 and R^3: order of convergence on a field with a known flow."""

from __future__ import annotations

import math

import pytest
import torch
from _analytic_field import exact_height

from globeflow.core.solvers import EUCLIDEAN, SOLVERS, SPHERE, TABLEAUS, integrate, stage_levels
from globeflow.core.sphere import exp_map, project_to_tangent, rotate, sample_uniform_sphere

f64 = torch.float64
STRENGTH = 1.5


def north_pull(x, node, with_divergence):
    ez = torch.zeros_like(x)
    ez[..., 2] = 1.0
    velocity = STRENGTH * (ez - x[..., 2:3] * x)
    return velocity, (-2 * STRENGTH * x[..., 2]) if with_divergence else None


def _errors(solver, steps):
    x0 = sample_uniform_sphere((1, 64), generator=torch.Generator().manual_seed(0), dtype=f64)
    gammas = torch.linspace(0, 1, steps + 1, dtype=f64)
    x, delta = solver.integrate(north_pull, x0, gammas, SPHERE, with_log_density=True)
    z = exact_height(x0[..., 2], STRENGTH)
    # Same longitude, exact height.
    r = torch.sqrt(1 - z**2) / torch.sqrt(1 - x0[..., 2] ** 2)
    exact = torch.stack([x0[..., 0] * r, x0[..., 1] * r, z], -1)
    # log p(x1) - log p(x0) = log(1 - z0^2) - log(1 - z^2) at the exact endpoint.
    exact_delta = torch.log1p(-(x0[..., 2] ** 2)) - torch.log1p(-(z**2))
    position = torch.arccos((x * exact).sum(-1).clamp(-1, 1)).max()
    return float(position), float((delta - exact_delta).abs().max()), x


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_convergence_order_on_the_sphere(name):
    solver = SOLVERS[name]
    coarse_pos, coarse_lp, _ = _errors(solver, 16)
    fine_pos, fine_lp, x = _errors(solver, 32)
    assert torch.allclose(x.norm(dim=-1), torch.ones(1, 64, dtype=f64), atol=1e-12)
    # Halving the step divides the global error by 2^order (within a margin for the
    # pre-asymptotic regime).
    for coarse, fine in ((coarse_pos, fine_pos), (coarse_lp, fine_lp)):
        observed = math.log2(coarse / fine)
        assert abs(observed - solver.order) < 0.25, (name, observed)


def test_second_order_at_half_the_evaluations_beats_euler():
    euler, _, _ = _errors(SOLVERS["euler"], 32)
    midpoint, _, _ = _errors(SOLVERS["midpoint"], 16)
    lagged, _, _ = _errors(SOLVERS["lagged-midpoint"], 31)  # 32 evaluations, like Euler's
    assert SOLVERS["lagged-midpoint"].evaluations(31) == SOLVERS["euler"].evaluations(32) == 32
    assert midpoint < euler / 10 and lagged < euler / 10


def test_euclidean_geometry_is_the_classical_method():
    # dx/dgamma = x: exact x0 e; midpoint gives (1 + h + h^2 / 2)^n per step.
    x0 = torch.tensor([[[1.0, -2.0, 0.5]]], dtype=f64)

    def linear(x, node, with_divergence):
        return x, torch.full(x.shape[:-1], 3.0, dtype=f64) if with_divergence else None

    gammas = torch.linspace(0, 1, 5, dtype=f64)
    x, delta = integrate(linear, x0, gammas, TABLEAUS["midpoint"], EUCLIDEAN, True)
    assert torch.allclose(x, x0 * (1 + 0.25 + 0.25**2 / 2) ** 4, atol=1e-12)
    assert torch.allclose(delta, torch.full((1, 1), -3.0, dtype=f64))


def test_stage_levels_follow_the_tableau():
    gammas = torch.tensor([0.0, 0.2, 1.0], dtype=f64)
    assert stage_levels(gammas, TABLEAUS["midpoint"]).tolist() == pytest.approx([0, 0.1, 0.2, 0.6])
    assert stage_levels(gammas, TABLEAUS["heun"]).tolist() == pytest.approx([0, 0.2, 0.2, 1.0])


def test_rotation_of_a_tangent_generator_is_the_exponential_map():
    g = torch.Generator().manual_seed(1)
    x = sample_uniform_sphere((50,), generator=g, dtype=f64)
    v = project_to_tangent(x, torch.randn(50, 3, generator=g, dtype=f64))
    for scale in (1e-7, 0.3, 2.5):
        rotated = rotate(x, torch.linalg.cross(x, scale * v, dim=-1))
        assert torch.allclose(rotated, exp_map(x, scale * v), atol=1e-12)
