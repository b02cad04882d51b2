"""A new solver needs only a registry entry: a toy Runge-Kutta solver (Ralston's second-order
tableau), registered here at run time, samples and carries log-densities in every family whose
geometry it runs on, through the same code as the built-in solvers."""

from __future__ import annotations

import math

import pytest
import torch
from _analytic_field import exact_height, exact_log_density, north_pull_model

from globeflow.core.families import Diffusion, FlowMatching, RiemannianFlowMatching
from globeflow.core.likelihood import log_prob_ode, sample_with_log_density
from globeflow.core.solvers import SOLVERS, SPHERE, Tableau, register_solver, runge_kutta
from globeflow.core.sphere import latlon_to_unit, sample_uniform_sphere
from globeflow.core.stiff_end import divergence_weights, stiff_end_levels

f64 = torch.float64
STRENGTH = 1.5
RALSTON = Tableau("ralston", a=((), (2 / 3,)), b=(0.25, 0.75), c=(0.0, 2 / 3), order=2)


@pytest.fixture()
def ralston():
    solver = register_solver(runge_kutta(RALSTON))
    try:
        yield solver.name
    finally:
        del SOLVERS[solver.name]


def test_registered_solver_joins_the_families_that_run_ode_solvers(ralston):
    assert ralston in RiemannianFlowMatching.solvers
    assert ralston in FlowMatching.solvers
    assert ralston not in Diffusion.solvers  # the published DDIM step only
    assert SOLVERS[ralston].carries_log_density
    with pytest.raises(ValueError, match="already registered"):
        register_solver(runge_kutta(RALSTON))


def test_registered_solver_samples_the_exact_flow(ralston):
    model = north_pull_model(STRENGTH)
    x0 = sample_uniform_sphere((1, 64), generator=torch.Generator().manual_seed(0), dtype=f64)
    latlon = model.sample(
        torch.zeros(1, 2, dtype=f64), steps=32, guidance=0.0, noise=x0, solver=ralston,
        grid="quadratic",
    )  # fmt: skip
    z = latlon_to_unit(latlon)[..., 2]
    assert float((z - exact_height(x0[..., 2], STRENGTH)).abs().max()) < 1e-3


def test_registered_solver_carries_the_exact_log_density(ralston):
    model = north_pull_model(STRENGTH)
    emb = torch.zeros(2, 2, dtype=f64)
    gen = torch.Generator().manual_seed(1)
    x, log_p = sample_with_log_density(model, emb, 128, 16, ralston, gen, stiff=math.inf)
    assert float((log_p - exact_log_density(x[..., 2], STRENGTH)).abs().max()) < 0.02
    # The likelihood ODE (data to noise) with the same solver, on the same points.
    back = log_prob_ode(model, x, emb, steps=16, stiff=math.inf, solver=ralston)
    assert float((back - exact_log_density(x[..., 2], STRENGTH)).abs().max()) < 0.02


def test_registered_solver_weights_its_own_divergence_nodes(ralston):
    """Its quadrature (the tableau's b) integrates the stiff shape -2 / (1 - gamma + w) exactly
    once weighted by :func:`divergence_weights`."""
    w = 1e-3
    gammas = stiff_end_levels(0.0, 24, w / 4, 0.2)
    solver = SOLVERS[ralston]
    levels = solver.levels(gammas)
    factors = divergence_weights(gammas, ralston, w)

    def field(z, node, with_divergence):
        div = factors[node] * -2.0 / (1.0 - levels[node] + w) * torch.ones(z.shape[:-1], dtype=f64)
        return torch.zeros_like(z), div if with_divergence else None

    x0 = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=f64)
    _, delta = solver.integrate(field, x0, gammas, SPHERE, with_log_density=True)
    exact = 2.0 * math.log((1.0 - gammas[0] + w) / (1.0 - gammas[-1] + w))
    assert float(delta) == pytest.approx(exact, rel=1e-10)
