import math

import pytest
import torch
from _analytic_field import exact_log_density, exact_negative_entropy, north_pull_model

from globeflow.core.families import (
    UNIFORM_LOCALIZABILITY_BITS,
    Diffusion,
    FlowMatching,
    RiemannianFlowMatching,
)
from globeflow.core.families.flow import gaussian_log_prob
from globeflow.core.guidance import GuidedField
from globeflow.core.likelihood import (
    StiffEnd,
    integration_grid,
    log_prob_adaptive,
    log_prob_ode,
    sample_with_log_density,
)
from globeflow.core.network import Denoiser
from globeflow.core.schedules import SigmoidSchedule
from globeflow.core.sphere import latlon_grid, latlon_to_unit, sample_uniform_sphere, tangent_basis

f64 = torch.float64


def _rfm(seed=0, dim=32, depth=2, cond_dim=4):
    torch.manual_seed(seed)
    return RiemannianFlowMatching(Denoiser(dim=dim, depth=depth, cond_dim=cond_dim)).double()


def _zero_output(model):
    torch.nn.init.zeros_(model.network.final_linear.weight)
    torch.nn.init.zeros_(model.network.final_linear.bias)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_random_rfm_density_integrates_to_one(seed):
    """An untrained network defines a valid flow too: its density must integrate to 1 over S^2.

    Quadrature: 3-degree cells with exact solid-angle weights (midpoint rule, error O(h^2) times
    the density's curvature). The density of a small random net varies on scales of tens of
    degrees, so the quadrature error is far below the 0.02 tolerance.
    """
    model = _rfm(seed).float()
    grid, weights = latlon_grid(60, 120)
    x = latlon_to_unit(grid).float()[None].expand(2, -1, -1)
    emb = torch.randn(2, 4)
    density = log_prob_ode(model, x, emb).double().exp()
    mass = (density * weights).sum(-1)
    assert torch.allclose(mass, torch.ones(2, dtype=f64), atol=0.02), mass
    assert density.min() < 0.9 / (4 * math.pi) or density.max() > 1.1 / (4 * math.pi)


def test_zero_field_gives_uniform_density_and_localizability():
    model = _zero_output(_rfm())
    x = sample_uniform_sphere((1, 10), dtype=f64)
    lp = model.log_prob_unit(x, torch.randn(1, 4, dtype=f64))
    assert torch.allclose(lp, torch.full_like(lp, -math.log(4 * math.pi)), atol=1e-10)
    bits = model.localizability(torch.randn(3, 4, dtype=f64), num_samples=32, steps=4)
    assert torch.allclose(bits, torch.full((3,), -math.log2(4 * math.pi), dtype=f64))


def test_flow_with_zero_field_is_gaussian():
    torch.manual_seed(0)
    model = _zero_output(FlowMatching(Denoiser(dim=32, depth=2, cond_dim=4)).double())
    x = torch.randn(1, 6, 3, dtype=f64)
    lp = model.log_prob_unit(x, torch.randn(1, 4, dtype=f64))
    assert torch.allclose(lp, gaussian_log_prob(x), atol=1e-10)


def test_diffusion_divergence_formula_on_a_known_field():
    """With eps-prediction 0 the probability-flow ODE is dx/dgamma = x / (2 gamma), so
    x(gamma) = y sqrt(gamma) and log p(y) = log N(y sqrt(g_end)) + 3/2 log(g_end)."""
    torch.manual_seed(0)
    model = _zero_output(Diffusion(Denoiser(dim=32, depth=2, cond_dim=4)).double())
    y = torch.randn(1, 5, 3, dtype=f64)
    lp = model.log_prob_unit(y, torch.randn(1, 4, dtype=f64), steps=128)
    g_end = Diffusion.likelihood_end_level
    expected = gaussian_log_prob(y * math.sqrt(g_end)) + 1.5 * math.log(g_end)
    assert torch.allclose(lp, expected, atol=0.02)


@pytest.mark.parametrize("cls", [RiemannianFlowMatching, FlowMatching])
def test_fixed_step_agrees_with_adaptive_solve(cls):
    """The fixed-step default against a tight dopri5 solve of the same ODE (float64).

    A random network's time input (sinusoidal features of 1000 gamma) makes its field oscillate
    quickly in time, a hard case; 64 steps spaced uniformly in gamma resolve it to ~0.01 nats.
    """
    torch.manual_seed(0)
    model = cls(Denoiser(dim=32, depth=2, cond_dim=4)).double()
    x = sample_uniform_sphere((2, 6), generator=torch.Generator().manual_seed(0), dtype=f64)
    emb = torch.randn(2, 4, dtype=f64)
    ref = log_prob_adaptive(model, x, emb, rtol=1e-8, atol=1e-8)
    fast = log_prob_ode(model, x, emb, steps=64, spacing="gamma")
    assert (fast - ref).abs().max() < 0.02


def test_integration_grids_are_monotone_and_span():
    for spacing in ("t", "gamma", "mixed"):
        ts = integration_grid(SigmoidSchedule(), 16, 1.0, spacing)
        assert ts[0] == 0 and ts[-1] == 1 and (ts[1:] > ts[:-1]).all()
    with pytest.raises(ValueError):
        integration_grid(SigmoidSchedule(), 4, 1.0, "log")


def test_log_prob_public_api_in_degrees():
    model = _rfm()
    emb = torch.randn(2, 4, dtype=f64)
    latlon = torch.tensor([[[48.85, 2.35], [0.0, 0.0]], [[-33.9, 151.2], [10.0, 20.0]]], dtype=f64)
    lp = model.log_prob(latlon, emb)
    assert lp.shape == (2, 2)
    direct = model.log_prob_unit(latlon_to_unit(latlon), emb)
    assert torch.allclose(lp, direct)
    guided = GuidedField(model.network, emb, torch.tensor([0.5], dtype=f64), guidance=1.0)
    x = latlon_to_unit(latlon)
    with pytest.raises(ValueError, match="unguided"):
        guided.output_and_jvp(x, torch.stack(tangent_basis(x)), 0)


def test_path_log_density_is_exact_on_a_known_flow():
    """Samples and their log-densities from one pass match the closed-form density of the
    north-pull flow, to the solver's second-order discretisation error."""
    model = north_pull_model(1.5)
    emb = torch.zeros(2, 2, dtype=f64)
    gen = torch.Generator().manual_seed(0)
    errors = []
    for steps in (8, 16):
        x, log_p = sample_with_log_density(model, emb, 256, steps, "midpoint", gen)
        errors.append(float((log_p - exact_log_density(x[..., 2], 1.5)).abs().max()))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 3  # second order: / 4 per halving


def test_localizability_estimator_is_unbiased_on_a_known_density():
    """The Monte Carlo mean of the path log-densities agrees with the exact negative entropy
    within 4 standard errors plus the (measured) discretisation error."""
    strength, steps = 1.5, 16
    model = north_pull_model(strength)
    emb = torch.zeros(1, 2, dtype=f64)
    gen = torch.Generator().manual_seed(1)
    bits, stderr = model.localizability(
        emb, num_samples=4000, steps=steps, generator=gen, return_stderr=True
    )
    x, log_p = sample_with_log_density(model, emb, 500, steps, "midpoint", gen)
    discretisation = float((log_p - exact_log_density(x[..., 2], strength)).abs().max())
    exact_bits = exact_negative_entropy(strength) / math.log(2)
    assert float(stderr) > 0
    assert abs(float(bits) - exact_bits) < 4 * float(stderr) + discretisation / math.log(2)
    # Not trivially satisfied: the uniform answer is far outside that band.
    assert abs(-math.log2(4 * math.pi) - exact_bits) > 20 * float(stderr)


def test_likelihood_solver_is_second_order_on_a_known_flow():
    """log p at given points (data to noise) against the closed form of the north-pull flow."""
    model = north_pull_model(1.5)
    emb = torch.zeros(1, 2, dtype=f64)
    x = sample_uniform_sphere((1, 200), generator=torch.Generator().manual_seed(4), dtype=f64)
    x = x[:, x[0, :, 2] < 0.95]  # away from the pole, where the density is steepest
    exact = exact_log_density(x[..., 2], 1.5)
    # The bulk solver's order: no stiff end (its probe adds a few steps on this field).
    errors = [
        float((log_prob_ode(model, x, emb, steps=s, stiff=math.inf) - exact).abs().max())
        for s in (16, 32)
    ]
    assert errors[1] < 2e-3
    assert abs(math.log2(errors[0] / errors[1]) - 2) < 0.3, errors


def _sharp_single_atom_model(rms_km: float = 1.0):
    from globeflow.core.exact_field import MixtureTarget, exact_rfm_model, kernel_width_for_rms_km

    atom = torch.tensor([[35.68, 139.65]], dtype=f64)
    return exact_rfm_model([MixtureTarget.from_latlon(atom, width=kernel_width_for_rms_km(rms_km))])


def test_exact_log_likelihood_of_a_1km_target_matches_its_closed_form():
    """The default likelihood (stiff-end grid, probed width) on a 1-km exact field: within 0.02
    nats of the closed form, where 48 steps uniform in gamma are ~7 nats low."""
    model = _sharp_single_atom_model(1.0)
    emb = torch.ones(1, 1, dtype=f64)
    x = model.network.target_samples(0, 2, torch.Generator().manual_seed(2))[None]
    exact = model.network.target_log_density(x, torch.tensor([0]))
    assert (log_prob_ode(model, x, emb) - exact).abs().max() < 0.02
    assert (log_prob_ode(model, x, emb, stiff=math.inf) - exact).abs().min() > 5


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_one_pass_localizability_is_unbiased_on_a_1km_target(divergence):
    """Localizability (~22 bits; 25.9 vs uniform) of a 1-km exact field from the one-pass sampler
    at its default bulk steps: the per-sample log-density error is < 0.1 bits on average, and
    the estimate agrees with the closed-form E_p[log2 p] within 4 standard errors (of both
    Monte Carlo means) plus that 0.1-bit budget; with either divergence."""
    model = _sharp_single_atom_model(1.0)
    emb = torch.ones(1, 1, dtype=f64)
    x, log_p = sample_with_log_density(
        model, emb, 256, solver="lagged-midpoint", generator=torch.Generator().manual_seed(1),
        divergence=divergence,
    )  # fmt: skip
    true = model.network.target_log_density(x, torch.tensor([0]))
    assert float(((log_p - true) / math.log(2)).mean().abs()) < 0.1
    exact = model.network.target_samples(0, 4000, torch.Generator().manual_seed(5))[None]
    exact_bits = model.network.target_log_density(exact, torch.tensor([0]))[0] / math.log(2)
    bits = log_p[0] / math.log(2)
    se = math.sqrt(float(bits.var()) / len(bits) + float(exact_bits.var()) / len(exact_bits))
    assert abs(float(bits.mean() - exact_bits.mean())) < 4 * se + 0.1
    assert float(exact_bits.mean()) - UNIFORM_LOCALIZABILITY_BITS > 25


def _record_precisions(monkeypatch, network) -> list[str]:
    """The precision of every ``forward_with_jvp`` call of ``network``, in order."""
    seen: list[str] = []
    original = network.forward_with_jvp

    def recording(x, tangents, cond, precision="fp32"):
        seen.append(precision)
        return original(x, tangents, cond, precision)

    monkeypatch.setattr(network, "forward_with_jvp", recording)
    return seen


def test_the_likelihood_runs_bf16_only_below_its_switch_where_bf16_is_native(monkeypatch):
    import globeflow.core.likelihood as likelihood

    model = _rfm(seed=3).float()
    x = sample_uniform_sphere((1, 4), generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 4)
    levels = []
    original_grid = likelihood._integrate_on_floor_grids

    def grid_levels(*args, **kwargs):
        levels.append(kwargs["bf16_below"])
        return original_grid(*args, **kwargs)

    monkeypatch.setattr(likelihood, "_integrate_on_floor_grids", grid_levels)
    monkeypatch.setattr(likelihood, "fastest_precision", lambda device: "bf16")
    seen = _record_precisions(monkeypatch, model.network)
    for stiff in (StiffEnd.PROBED, StiffEnd.NONE):  # every point's grid in one loop; one grid
        seen.clear()
        log_prob_ode(model, x, emb, steps=20, stiff=stiff)
        if stiff is StiffEnd.PROBED:
            assert levels == [likelihood.LIKELIHOOD_BF16_BELOW]
            assert seen.pop(0) == "bf16"  # the stiffness probe: the device's fastest
        # data (gamma = 1) to noise: fp32 first, bf16 from the switch on, never back
        first_bf16 = seen.index("bf16")
        assert set(seen[:first_bf16]) == {"fp32"} and set(seen[first_bf16:]) == {"bf16"}
        # 20 uniform steps of ~0.05: the switch at 0.4 leaves about 8 midpoints in bf16
        assert 6 <= len(seen) - first_bf16 <= 10, seen
    seen.clear()
    monkeypatch.setattr(likelihood, "fastest_precision", lambda device: "fp32")
    log_prob_ode(model, x, emb, steps=20)
    assert set(seen) == {"fp32"}  # where bf16 is not native: fp32 throughout
    seen.clear()
    monkeypatch.setattr(likelihood, "fastest_precision", lambda device: "bf16")
    log_prob_ode(model.double(), x.double(), emb.double(), steps=20)
    assert set(seen) == {"fp32"}  # float64 models keep their precision


def test_the_mixed_likelihood_stays_within_its_bound_of_fp32():
    """The default on a float32 network against fp32 from the same points: bf16 below signal
    level 0.4 adds rounding errors to the divergence's integral, which must stay inside the
    likelihood's 0.02-nat bound (the error of fp32 itself against a tight solve is ~0.01)."""
    model = _rfm(seed=4, dim=64, depth=3).float()
    x = sample_uniform_sphere((2, 16), generator=torch.Generator().manual_seed(1))
    emb = torch.randn(2, 4)
    fp32 = log_prob_ode(model, x, emb, precision="fp32")
    mixed = log_prob_ode(model, x, emb, precision="mixed")
    assert not torch.equal(fp32, mixed)  # bf16 ran
    assert (mixed - fp32).abs().max() < 0.02
