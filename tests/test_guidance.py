"""Classifier-free guided sampling: every solver follows the guided field, whatever the scale.

The exact RFM field (core/exact_field.py) gives the guided field exactly: its null condition is
the mixture of all targets, so (1 + w) v(x | c) - w v(x | null) is the field of a model whose
conditional and unconditional densities are known. A tight solve (Heun, 256 steps on the
authors' grid) stands in for the guided answer, which has no closed form.
"""

from __future__ import annotations

import pytest
import torch

from globeflow.core.exact_field import MixtureTarget, exact_rfm_model, kernel_width_for_rms_km
from globeflow.core.guidance import (
    GuidedField,
    GuidedVelocity,
    guided_combination,
    level_precisions,
)
from globeflow.core.network import Denoiser
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, MIXED_BF16_BELOW
from globeflow.core.solvers import SOLVERS
from globeflow.core.sphere import haversine_km, sample_uniform_sphere

f64 = torch.float64
KERNEL_KM = 1.0
FAR_KM = 25.0
"""25 kernel widths: a sample this far from where the tight solve puts it is at another place,
not a discretisation error of the answer's own scale."""


@pytest.fixture(scope="module")
def sharp_field():
    """1-km targets: Tokyo alone, and Paris (0.6) / Lyon (0.4); the null condition is their
    50/50 mixture. Two photos (one per target), 64 noise points each, and the tight solve at
    every guidance of the tests."""
    width = kernel_width_for_rms_km(KERNEL_KM)
    tokyo = MixtureTarget.from_latlon(torch.tensor([[35.68, 139.65]]), width=width)
    two = MixtureTarget.from_latlon(
        torch.tensor([[48.86, 2.35], [45.76, 4.84]]), torch.tensor([0.6, 0.4]), width=width
    )
    model = exact_rfm_model([tokyo, two])
    emb = torch.eye(2, dtype=f64)
    noise = sample_uniform_sphere((2, 64), generator=torch.Generator().manual_seed(0), dtype=f64)
    tight = {}

    def reference(w: float) -> torch.Tensor:
        if w not in tight:
            tight[w] = model.sample(emb, 64, 256, w, noise=noise, solver="heun", grid="published")
        return tight[w]

    return model, emb, noise, reference


def test_guided_combination_is_the_cfg_formula():
    cond, null = torch.randn(4, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    for w in (-1.0, -0.5, 0.0, 2.0, 7.5):
        assert torch.allclose(guided_combination(cond, null, w), (1 + w) * cond - w * null)


def test_guided_velocity_gives_branches_and_refuses_divergences():
    x = sample_uniform_sphere((1, 5), generator=torch.Generator().manual_seed(1), dtype=f64)
    field = GuidedVelocity(lambda z, node: (z * 2.0, z * 0.5), guidance=3.0)
    velocity, divergence = field(x, 0)
    assert divergence is None
    assert torch.allclose(velocity, 4 * (2.0 * x) - 3 * (0.5 * x))
    with pytest.raises(ValueError, match="no density"):
        field(x, 0, True)


def test_mixed_precision_runs_bf16_early_and_fp32_at_the_data_end():
    """ "mixed" evaluates the levels below MIXED_BF16_BELOW in bf16 and the rest in fp32: each
    level's guided output is, bit for bit, that of a field of its own precision."""
    gammas = torch.tensor([0.1, 0.5, MIXED_BF16_BELOW - 1e-3, MIXED_BF16_BELOW, 0.999])
    assert level_precisions("mixed", gammas) == ["bf16"] * 3 + ["fp32"] * 2
    assert level_precisions("fp32", gammas) == ["fp32"] * 5
    with pytest.raises(ValueError, match="--precision fp16: must be one of fp32, bf16, mixed"):
        level_precisions("fp16", gammas)
    torch.manual_seed(0)
    net = Denoiser(dim=32, depth=2, cond_dim=4).eval()
    emb = torch.randn(2, 4)
    x = torch.nn.functional.normalize(torch.randn(2, 16, 3), dim=-1)
    fields = {p: GuidedField(net, emb, gammas, 2.0, p) for p in ("mixed", "fp32", "bf16")}
    with torch.no_grad():
        for node, want in enumerate(level_precisions("mixed", gammas)):
            mixed = fields["mixed"].output(x, node)
            assert torch.equal(mixed, fields[want].output(x, node))
            other = "fp32" if want == "bf16" else "bf16"
            assert not torch.equal(mixed, fields[other].output(x, node))  # bf16 really differs


def test_the_null_condition_is_the_mixture_of_the_targets(sharp_field):
    model, emb, noise, _ = sharp_field
    null = model.sample(torch.zeros(1, 2, dtype=f64), 64, 64, 0.0, noise=noise[:1], solver="heun")
    tokyo = haversine_km(null[0], torch.tensor([[35.68, 139.65]], dtype=f64)) < FAR_KM
    # Binomial(64, 1/2): within 4 standard errors (0.0625 each).
    assert abs(float(tokyo.double().mean()) - 0.5) < 4 * 0.5 / 64**0.5


@pytest.mark.parametrize("guidance", [2.0, 5.0])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_converges_to_the_tight_guided_solve(sharp_field, solver, guidance):
    """At w = 2 and 5 a guided displacement s |v| reaches (1 + 2 w) pi, beyond the antipode.
    Every solver converges to the tight solve from the same noise: quadrupling the steps (16 ->
    64) at least halves the median paired miss (first order would quarter it), and at 64 steps
    the median is below the kernel width and at most 3% of the samples are over 25 kernel widths
    away (samples near a boundary between basins, a set that shrinks with the step: measured
    0-1.6% at 64 steps, 0-5.5% at 24). data-2m used to step towards the wrapped data point and
    did not converge: 20-36% over 25 km at 24, 32 and 64 steps alike."""
    model, emb, noise, reference = sharp_field
    tight = reference(guidance)

    def miss(steps: int) -> torch.Tensor:
        x = model.sample(emb, 64, steps, guidance, noise=noise, solver=solver, grid="published")
        return haversine_km(x, tight)

    coarse, fine = miss(16), miss(64)
    assert float((fine > FAR_KM).double().mean()) <= 0.03, solver
    assert float(fine.median()) < KERNEL_KM, solver
    assert float(fine.median()) <= 0.5 * float(coarse.median()), solver


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_negative_guidance_converges_to_the_tight_solve(sharp_field, solver):
    """At w = -0.5 the guided field blends the conditional and the unconditional field: samples
    between Tokyo and Paris are pulled towards both, and the answer is sensitive near the
    boundaries (even Heun at 64 steps leaves 5% of the samples over 25 km from the 256-step
    solve). The bulk converges: the median paired miss is far below the kernel width at 64
    steps, and below the one at 16 steps."""
    model, emb, noise, reference = sharp_field
    tight = reference(-0.5)

    def median_miss(steps: int) -> float:
        x = model.sample(emb, 64, steps, -0.5, noise=noise, solver=solver, grid="published")
        return float(haversine_km(x, tight).median())

    fine = median_miss(64)
    assert fine < 0.1 * KERNEL_KM and fine < median_miss(16), solver


@pytest.mark.parametrize("guidance", [0.0, 2.0, 5.0])
def test_the_default_recipe_follows_the_guided_field(sharp_field, guidance):
    """What ``predict`` runs (solver, grid and steps of DEFAULT_SAMPLER) lands where the tight
    solve does at guidance 0, at the fallback default 2 and at 5: median paired miss below the
    kernel width and at most 3% of the samples at another place (the bound of the convergence
    test above, which every solver meets at 64 steps)."""
    model, emb, noise, reference = sharp_field
    s = DEFAULT_SAMPLER
    x = model.sample(emb, 64, s.steps, guidance, noise=noise, solver=s.solver, grid=s.grid)
    miss = haversine_km(x, reference(guidance))
    assert float((miss > FAR_KM).double().mean()) <= 0.03
    assert float(miss.median()) < KERNEL_KM


def test_point_conditioned_mixed_runs_each_point_at_its_own_levels_precision():
    """Points on either side of the switch in one evaluation: each takes its level's precision,
    exactly as if the points of each side were evaluated alone."""
    from globeflow.core.guidance import PointConditionedField
    from globeflow.core.network import Denoiser

    torch.manual_seed(0)
    network = Denoiser(dim=32, depth=2, cond_dim=6).eval()
    levels = torch.tensor([0.1, 0.3, 0.6, 0.9])
    cond = network.condition_grid(torch.randn(2, 6), levels)
    images = torch.tensor([0, 1, 1, 0, 1])
    node = torch.tensor([[0], [2], [1], [3], [0]])  # levels 0.1, 0.6, 0.3, 0.9, 0.1
    x = torch.nn.functional.normalize(torch.randn(5, 1, 3), dim=-1)
    tangents = torch.randn(2, 5, 1, 3)
    field = PointConditionedField(network, cond, images, "mixed", levels, bf16_below=0.5)
    out, jvp = field.output_and_jvp(x, tangents, node)
    low, high = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    for rows, precision in ((low, "bf16"), (high, "fp32")):
        alone = network.forward_with_jvp(
            x[rows], tangents[:, rows], cond.rows(node[rows, 0], images[rows]), precision
        )
        assert torch.equal(out[rows], alone[0]) and torch.equal(jvp[:, rows], alone[1])
        value = network.forward_conditioned(
            x[rows], cond.rows(node[rows, 0], images[rows]), precision
        )
        assert torch.equal(field.output(x, node)[rows], value)
    # bf16 moved the low points (by its rounding, ~2^-8), fp32 rows only by their row count
    fp32 = PointConditionedField(network, cond, images, "fp32").output(x, node)
    assert (fp32[low] - out[low]).abs().max() > 1e-4
    torch.testing.assert_close(fp32[high], out[high], rtol=1e-6, atol=1e-6)
