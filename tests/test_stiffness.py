"""The stiff end of the likelihood and localizability solvers: the probe of each point's
stiffness floor, its independence from the batch, and accuracy on smooth and multi-scale exact
fields (closed-form densities, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.core.exact_field import (
    KERNEL_RMS_ANGLE,
    MixtureTarget,
    exact_rfm_model,
    kernel_width_for_rms_km,
    smooth_target,
)
from globeflow.core.families import NonFiniteOutputError, RiemannianFlowMatching
from globeflow.core.likelihood import log_prob_ode, sample_with_log_density
from globeflow.core.network import Denoiser
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import EARTH_RADIUS_KM
from globeflow.core.stiff_end import (
    divergence_weights,
    probe_ladder,
    stiff_end_levels,
    stiffness_floor,
)

f64 = torch.float64
TOKYO = (35.68, 139.65)
ONE = torch.ones(1, 1, dtype=f64)
FIRST = torch.tensor([0])


def _minor_mode_target(broad_km: float = 200.0) -> MixtureTarget:
    """95% a broad kernel (``broad_km`` RMS), 5% a 1-km one 10 degrees north of it (their
    kernels' compact supports apart: where a point sits on the edge of another atom's support
    the exact field has a kink in s that no fixed-step solver resolves, an artefact of the
    testbed's kernels)."""
    broad = MixtureTarget.from_latlon(
        torch.tensor([TOKYO]), width=kernel_width_for_rms_km(broad_km)
    )
    sharp = MixtureTarget.from_latlon(
        torch.tensor([[TOKYO[0] + 10.0, TOKYO[1]]]), width=kernel_width_for_rms_km(1.0)
    )
    return MixtureTarget.combine([(broad, 0.95), (sharp, 0.05)])


def test_kappa_shapes_of_kernel_and_smooth_posteriors():
    """The shapes the probe's docstring derives: a kernel of width w has kappa = s / (s + w)
    (linear below w); a smooth posterior of per-axis width sigma has kappa ~ c s^2 / sigma^2
    below sigma (quadratic), c = KERNEL_RMS_ANGLE^2 / 2."""
    from globeflow.core.guidance import GuidedField
    from globeflow.core.path_field import field_and_divergence

    def kappa(model, x, s):
        gamma = torch.tensor([1.0 - s], dtype=f64)
        _, div = field_and_divergence(model, x, GuidedField(model.network, ONE, gamma), 0, gamma[0])
        return float(s * div.abs().mean() / 2)

    kernel = exact_rfm_model([MixtureTarget.from_latlon(torch.tensor([TOKYO]), width=1e-3)])
    x = kernel.network.target_samples(0, 4, torch.Generator().manual_seed(0))[None]
    for s in (1e-4, 1e-3, 1e-2):  # model level s_model: the atom's s is w + (1 - w) s_model
        assert kappa(kernel, x, s) == pytest.approx(
            s * (1 - 1e-3) / (s * (1 - 1e-3) + 1e-3), rel=0.02
        )
    # The smooth testbed's atoms stop at their kernel width w, so its level s sees the atoms
    # through a kernel of width s_eff = w + (1 - w) s: kappa = s (1 - w) c s_eff / (sigma^2 +
    # c s_eff^2) (quadratic in s where s >> w, as a trained network's at every s).
    target = smooth_target(TOKYO, 100.0)
    smooth = exact_rfm_model([target])
    centre = smooth.network.atoms[0, :1][None]  # the posterior's centre
    sigma = 100.0 / math.sqrt(2.0) / EARTH_RADIUS_KM
    c, w = KERNEL_RMS_ANGLE**2 / 2.0, target.width
    for r in (1 / 16, 1 / 8, 1 / 2, 1, 2, 4):
        s = r * sigma
        s_eff = w + (1 - w) * s
        predicted = s * (1 - w) * c * s_eff / (sigma**2 + c * s_eff**2)
        assert kappa(smooth, centre, s) == pytest.approx(predicted, rel=0.25), r
    # Between sigma / 8 and sigma / 2 kappa grows faster than linearly (x4 in s).
    assert kappa(smooth, centre, sigma / 2) > 5 * kappa(smooth, centre, sigma / 8)


def test_a_non_finite_divergence_is_an_error():
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=2)).double()
    torch.nn.init.constant_(model.network.final_linear.weight, math.nan)
    x = torch.nn.functional.normalize(torch.randn(1, 4, 3, dtype=f64), dim=-1)
    with pytest.raises(NonFiniteOutputError, match="divergence"):
        stiffness_floor(model, torch.zeros(1, 2, dtype=f64), x, 16)
    with pytest.raises(NonFiniteOutputError):
        log_prob_ode(model, x, torch.zeros(1, 2, dtype=f64))


def test_log_density_of_a_point_does_not_depend_on_its_batch():
    """Points near a sharp 5% mode and in a broad mode, scored in one order, in another order
    and in other chunks: the same values (each point's grid comes from its own probe)."""
    model = exact_rfm_model([_minor_mode_target()])
    g = torch.Generator().manual_seed(3)
    x = model.network.target_samples(0, 400, g)
    near_sharp = x[:, 2] > float(torch.tensor(TOKYO[0] + 5.0).deg2rad().sin())
    pts = torch.cat([x[near_sharp][:3], x[~near_sharp][:13]])[None]  # sharp ones first
    first = log_prob_ode(model, pts, ONE)
    perm = torch.arange(pts.shape[1]).flip(0)
    again = log_prob_ode(model, pts[:, perm], ONE, chunk_size=5)[:, perm.argsort()]
    assert (first - again).abs().max() < 1e-9


@pytest.mark.xfail(
    strict=True,
    reason="multi-scale accuracy not reached yet (0.37 nats at one "
    "broad-mode point; per-sample errors up to 1.5 bits on the sharp mode)",
)
def test_log_likelihood_of_a_multi_scale_target_matches_its_closed_form():
    model = exact_rfm_model([_minor_mode_target()])
    x = model.network.target_samples(0, 400, torch.Generator().manual_seed(3))
    near_sharp = x[:, 2] > float(torch.tensor(TOKYO[0] + 5.0).deg2rad().sin())
    pts = torch.cat([x[near_sharp][:3], x[~near_sharp][:13]])[None]
    exact = model.network.target_log_density(pts, FIRST)
    assert (log_prob_ode(model, pts, ONE) - exact).abs().max() < 0.02


@pytest.mark.parametrize("rms_km", [1.0, 10.0, 100.0])
def test_smooth_posteriors_log_likelihood_and_localizability(rms_km):
    """vMF-like posteriors of 1, 10 and 100 km: log-likelihood within 0.02 nats of the closed
    form at exact samples; the one-pass localizability's per-sample log-densities within 0.1
    bit on average (its discretisation bias)."""
    model = exact_rfm_model([smooth_target(TOKYO, rms_km, rings=4)])
    pts = model.network.target_samples(0, 6, torch.Generator().manual_seed(1))[None]
    exact = model.network.target_log_density(pts, FIRST)
    assert (log_prob_ode(model, pts, ONE) - exact).abs().max() < 0.02
    x, log_p = sample_with_log_density(model, ONE, 64, generator=torch.Generator().manual_seed(2),
                                       solver="lagged-midpoint")  # fmt: skip
    true = model.network.target_log_density(x, FIRST)
    assert float((log_p - true).mean().abs()) / math.log(2) < 0.1


@pytest.mark.xfail(strict=True, reason="per-sample errors up to 1.5 bits on the sharp mode")
def test_a_5_percent_sharp_minor_mode_is_integrated_on_its_own_grid():
    """One-pass samples of a 95% broad + 5% 1-km target: the samples of the sharp mode get the
    sharp mode's grid (an 8-sample pilot missed it about 2 times in 3), so their log-densities
    are right to 0.1 bit, and the floors read there are those of a 1-km kernel."""
    model = exact_rfm_model([_minor_mode_target()])
    x, log_p = sample_with_log_density(model, ONE, 128, generator=torch.Generator().manual_seed(4),
                                       solver="lagged-midpoint")  # fmt: skip
    true = model.network.target_log_density(x, FIRST)
    sharp = x[0, :, 2] > float(torch.tensor(TOKYO[0] + 5.0).deg2rad().sin())
    assert 1 <= int(sharp.sum()) <= 20
    err = (log_p - true)[0] / math.log(2)
    assert float(err[sharp].abs().max()) < 0.3 and float(err.mean().abs()) < 0.1
    floors = stiffness_floor(model, ONE, x, 16)[0]
    w_sharp = kernel_width_for_rms_km(1.0)
    assert float(floors[sharp].max()) <= w_sharp and float(floors[~sharp].min()) > 10 * w_sharp


def test_probe_ladder_reaches_the_sharpest_floor():
    ladder = probe_ladder(0.2)
    assert ladder[0] == 0.2 and ladder[-1] == pytest.approx(1e-5)
    assert all(a / b <= 4.0 + 1e-9 for a, b in zip(ladder, ladder[1:], strict=False))
    assert len(probe_ladder(1.0)) <= 13  # the docstring's bound, from any knee


@pytest.mark.parametrize("floor", [1e-4, 1e-3])
@pytest.mark.parametrize("log_step", [0.2, 0.35])
def test_stiff_end_grid_bounds_its_steps(floor, log_step):
    """Each step of :func:`stiff_end_levels` is at most the bulk step H and at most log_step
    (s + floor) at its upper end s = 1 - gamma, and the stiff end adds about (log(H / (log_step
    floor)) - 1) / log_step steps to the bulk ones (its docstring)."""
    bulk = 24
    s = 1.0 - stiff_end_levels(0.0, bulk, floor, log_step)
    h = s[:-1] - s[1:]
    assert bool((h > 0).all())
    assert float(h.max()) <= 1.0 / bulk * (1 + 1e-9)
    assert bool((h <= log_step * (s[:-1] + floor) * (1 + 1e-9) + 1e-15).all())
    predicted = bulk + (math.log(1.0 / bulk / (log_step * floor)) - 1.0) / log_step
    assert abs(len(h) - predicted) <= 2


@pytest.mark.parametrize("solver", ["lagged-midpoint", "midpoint"])
def test_divergence_weights_integrate_the_stiff_shape_exactly(solver):
    """With :func:`divergence_weights` the solver's log-density integral of a divergence
    -2 / (1 - gamma + w) is exact on the stiff-end grid (unweighted it is not), and the weights
    are ~1 where the steps are short against 1 - gamma + w."""
    w = 1e-3
    gammas = stiff_end_levels(0.0, 24, w / 4, 0.2)
    method = SOLVERS[solver]
    levels = method.levels(gammas)
    x0 = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=f64)

    def integral(factors):
        def field(z, node, with_divergence):
            div = (
                factors[node]
                * -2.0
                / (1.0 - levels[node] + w)
                * torch.ones(z.shape[:-1], dtype=f64)
            )
            return torch.zeros_like(z), div if with_divergence else None

        return float(method.integrate(field, x0, gammas, SPHERE, with_log_density=True)[1])

    exact = 2.0 * math.log((1.0 - gammas[0] + w) / (1.0 - gammas[-1] + w))  # -int div
    factors = divergence_weights(gammas, solver, w)
    assert integral(factors) == pytest.approx(exact, rel=1e-10)
    assert abs(integral(torch.ones_like(factors)) - exact) > 1e-3
    short = (1.0 / 24) / (1.0 - levels + w) < 0.1  # bulk steps short against the scale
    assert bool(short.any()) and float((factors[short] - 1).abs().max()) < 0.01
