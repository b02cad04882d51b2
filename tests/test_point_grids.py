"""Points on grids of their own in one loop (core/point_grids.py): each point takes exactly the
steps of a solve of its grid alone, for every solver the loop runs; and the one-pass
localizability that uses it gives the values of one solve per stiffness floor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from globeflow.core import likelihood, stiff_end
from globeflow.core.exact_field import MixtureTarget, exact_rfm_model, kernel_width_for_rms_km
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Denoiser
from globeflow.core.point_grids import (
    POINT_GRID_SOLVERS,
    grid_nodes,
    integrate_on_point_grids,
    longest_first,
)
from globeflow.core.solvers import SOLVERS, SPHERE

sys.path.insert(0, str(Path(__file__).parent))
from _analytic_field import two_poles_model  # noqa: E402

f64 = torch.float64


def _field(levels: torch.Tensor):
    """A level-dependent pull to the north pole with a made-up divergence: any field serves,
    the two integrations only have to evaluate it at the same points and levels."""

    def field(z: torch.Tensor, node, with_divergence: bool):
        gamma = levels[node]
        gamma = gamma[..., None] if gamma.dim() else gamma
        north = torch.zeros_like(z)
        north[..., 2] = 1.0
        strength = 1.0 + 3.0 * gamma
        velocity = strength * (north - z[..., 2:3] * z)
        div = (-2.0 * strength * z[..., 2:3])[..., 0] if with_divergence else None
        return velocity, div

    return field


@pytest.mark.parametrize("solver", POINT_GRID_SOLVERS)
def test_each_point_takes_the_steps_of_its_grid_alone(solver):
    """Three grids of 3, 7 and 12 steps (non-uniform), points of each in mixed order: the
    one-loop end points and log-density changes equal those of solving each grid on its own
    (float64: equal to rounding)."""
    g = torch.Generator().manual_seed(0)
    grids = [
        torch.linspace(0.0, 1.0, 4, dtype=f64),
        torch.linspace(0.0, 1.0, 8, dtype=f64) ** 2,
        1.0 - torch.logspace(0.0, -4.0, 12, dtype=f64).flip(0).cumsum(0).flip(0) / 2.2,
    ]
    grids[2] = torch.cat([torch.zeros(1, dtype=f64), grids[2][1:], torch.ones(1, dtype=f64)])
    grid_of_point = torch.tensor([2, 0, 1, 1, 2, 0, 0, 1, 2, 1])
    x = torch.nn.functional.normalize(
        torch.randn(len(grid_of_point), 1, 3, generator=g, dtype=f64), dim=-1
    )
    order = longest_first(grids, grid_of_point)
    levels, _ = grid_nodes(grids, solver)
    end, delta = integrate_on_point_grids(
        _field(levels), x[order], grids, grid_of_point[order], solver
    )
    back = torch.argsort(order)
    end, delta = end[back], delta[back]
    method = SOLVERS[solver]
    for k, grid in enumerate(grids):
        mine = grid_of_point == k
        alone_end, alone_delta = method.integrate(
            _field(method.levels(grid)), x[mine][None, :, 0], grid, SPHERE, True
        )
        assert torch.allclose(end[mine, 0], alone_end[0], atol=1e-13, rtol=0)
        assert torch.allclose(delta[mine, 0], alone_delta[0], atol=1e-13, rtol=0)


def test_points_must_come_longest_grid_first():
    grids = [torch.linspace(0.0, 1.0, 3, dtype=f64), torch.linspace(0.0, 1.0, 6, dtype=f64)]
    x = torch.nn.functional.normalize(torch.randn(2, 1, 3, dtype=f64), dim=-1)
    with pytest.raises(ValueError, match="longest grid first"):
        integrate_on_point_grids(
            _field(grid_nodes(grids, "midpoint")[0]), x, grids, torch.tensor([0, 1]), "midpoint"
        )
    with pytest.raises(ValueError, match="no per-point loop"):
        integrate_on_point_grids(_field(grids[0]), x, grids, torch.tensor([1, 0]), "data-2m")


def _two_scale_model():
    """An exact field (float64) whose samples have different stiffness floors: a 200-km mode
    and a 1-km one (the conditioning carries each level, so the rows must get their own)."""
    broad = MixtureTarget.from_latlon(
        torch.tensor([[35.7, 139.7]]), width=kernel_width_for_rms_km(200.0)
    )
    sharp = MixtureTarget.from_latlon(
        torch.tensor([[45.7, 139.7]]), width=kernel_width_for_rms_km(1.0)
    )
    return exact_rfm_model([MixtureTarget.combine([(broad, 0.6), (sharp, 0.4)])])


def _tiny_network_model() -> RiemannianFlowMatching:
    """A random network whose output is scaled up until its samples' floors spread over
    seven values (the bundled model's typical count)."""
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=6)).eval()
    with torch.no_grad():
        model.network.final_linear.weight.mul_(1.5)
    return model


@pytest.mark.parametrize(
    ("make", "emb", "tolerance"),
    [
        (_two_scale_model, torch.ones(1, 1, dtype=f64), 1e-10),
        (lambda: two_poles_model(1.5, 0.3, 0.0), torch.zeros(2, 2, dtype=f64), 1e-10),
        # float32: a matrix product's last bit depends on its row count; epsilon 1.2e-7
        # over ~50 steps of a few layers bounds the change by ~1e-5.
        (_tiny_network_model, torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), 1e-5),
    ],
)
@pytest.mark.parametrize("solver", ["midpoint", "lagged-midpoint"])
def test_localizability_in_one_loop_equals_one_solve_per_floor(
    monkeypatch, make, emb, tolerance, solver
):
    """sample_with_log_density with every floor's grid in one loop gives the samples and
    log-densities of one solve per quantized floor (the grid-by-grid path it replaced), on
    models whose samples have several floors."""
    model = make()
    x0 = model.prepare_noise(emb, 48, None, torch.Generator().manual_seed(2))
    landed = likelihood.pilot(model, emb, x0)
    floors = stiff_end.quantized_floors(stiff_end.stiffness_floor(model, emb, landed, 8))
    assert len(torch.unique(floors)) >= 2  # the loop has grids of different lengths to align
    one_loop = likelihood.sample_with_log_density(model, emb, 48, 8, solver, noise=x0)
    monkeypatch.setattr(likelihood, "POINT_GRID_SOLVERS", ())
    per_floor = likelihood.sample_with_log_density(model, emb, 48, 8, solver, noise=x0)
    assert (one_loop[0] - per_floor[0]).abs().max() < tolerance
    assert (one_loop[1] - per_floor[1]).abs().max() < tolerance


@pytest.mark.parametrize(
    ("make", "emb", "tolerance"),
    [
        (_two_scale_model, torch.ones(1, 1, dtype=f64), 1e-10),
        (_tiny_network_model, torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), 1e-5),
    ],
)
def test_log_likelihood_in_one_loop_equals_one_solve_per_floor(monkeypatch, make, emb, tolerance):
    """log_prob_ode with every point's grid in one loop (data to noise: the grids differ at
    their start) gives the values of one solve per quantized floor."""
    model = make()
    x, _ = likelihood.sample_with_log_density(
        model, emb, 24, 8, generator=torch.Generator().manual_seed(3)
    )
    floors = stiff_end.quantized_floors(stiff_end.stiffness_floor(model, emb, x, 8, 0.15))
    assert len(torch.unique(floors)) >= 2
    # fp32: a bf16 product's rounding follows its row count, which the two paths do not share
    one_loop = likelihood.log_prob_ode(model, x, emb, steps=8, precision="fp32")
    monkeypatch.setattr(likelihood, "POINT_GRID_SOLVERS", ())
    per_floor = likelihood.log_prob_ode(model, x, emb, steps=8, precision="fp32")
    assert (one_loop - per_floor).abs().max() < tolerance


def test_the_probe_reads_every_rung_alike_in_one_batch_or_one_rung_at_a_time(monkeypatch):
    """The stiffness probe's rungs side by side in one batch give the floors of one batch
    per rung."""
    model = _two_scale_model()
    x = model.prepare_noise(torch.ones(2, 1, dtype=f64), 40, None, torch.Generator().manual_seed(5))
    together = stiff_end.stiffness_floor(model, torch.ones(2, 1, dtype=f64), x, 8)
    monkeypatch.setattr(stiff_end, "PROBE_POINTS_PER_BATCH", 1)
    one_by_one = stiff_end.stiffness_floor(model, torch.ones(2, 1, dtype=f64), x, 8)
    assert torch.isfinite(together).any() and torch.equal(together.isinf(), one_by_one.isinf())
    finite = torch.isfinite(together)
    assert (together[finite] - one_by_one[finite]).abs().max() < 1e-12
