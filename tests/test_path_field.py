"""The path field's divergence: exact from two JVPs on S^2, or Hutchinson's one-JVP estimate."""

import math

import torch

from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.guidance import GuidedField
from globeflow.core.likelihood import sample_with_log_density
from globeflow.core.network import Denoiser
from globeflow.core.path_field import field_and_divergence, probe_signs
from globeflow.core.sphere import sample_uniform_sphere

f64 = torch.float64


def _rfm(seed: int = 0) -> RiemannianFlowMatching:
    torch.manual_seed(seed)
    return RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=4)).double()


@torch.no_grad()
def test_the_one_jvp_divergence_averages_to_the_exact_one():
    """t.J t along t = e1 + s e2 is the trace plus s (e1.J e2 + e2.J e1): the two signs average
    to the exact divergence, and each alone differs from it (the estimate is really one JVP)."""
    model = _rfm()
    emb = torch.randn(2, 4, dtype=f64, generator=torch.Generator().manual_seed(1))
    field = GuidedField(model.network, emb, torch.tensor([0.3, 0.9], dtype=f64))
    x = sample_uniform_sphere((2, 50), generator=torch.Generator().manual_seed(2), dtype=f64)
    for node in (0, 1):
        gamma = field.gammas[node]
        v, exact = field_and_divergence(model, x, field, node, gamma)
        ones = torch.ones(2, 50, dtype=f64)
        (v_plus, plus), (_, minus) = (
            field_and_divergence(model, x, field, node, gamma, s * ones) for s in (1.0, -1.0)
        )
        torch.testing.assert_close(v_plus, v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((plus + minus) / 2, exact, rtol=1e-10, atol=1e-10)
        assert float((plus - exact).abs().min()) > 1e-8


def test_probe_signs_are_fair_coins_of_each_point_alone():
    """Over 20,000 noise points the mean sign is within 4 / sqrt(N) of 0 (4 sigma of a fair
    coin), float32 noise cast to float64 keeps its signs, and a point's sign is its own."""
    x = sample_uniform_sphere((2, 10_000), generator=torch.Generator().manual_seed(3))
    signs = probe_signs(x)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 4 / math.sqrt(signs.numel())
    assert torch.equal(probe_signs(x.double()), signs.double())
    assert torch.equal(probe_signs(x[:, 17:40]), signs[:, 17:40])
    doubles = sample_uniform_sphere(
        (1, 20_000), generator=torch.Generator().manual_seed(4), dtype=f64
    )
    assert abs(float(probe_signs(doubles).mean())) < 4 / math.sqrt(20_000)


def test_the_hutchinson_localizability_follows_the_same_paths_unbiased():
    """Same noise, same samples; each sample's log-density moves by its sign times its path's
    shear, so over N samples the mean moves by less than 4 standard errors of the per-sample
    changes (4 sigma), while the changes are not zero. A sample's value does not depend on its
    batch."""
    model = _rfm(5)
    emb = torch.randn(1, 4, dtype=f64, generator=torch.Generator().manual_seed(6))
    noise = sample_uniform_sphere((1, 256), generator=torch.Generator().manual_seed(7), dtype=f64)
    x, exact = sample_with_log_density(model, emb, 256, noise=noise)
    y, estimate = sample_with_log_density(model, emb, 256, noise=noise, divergence="hutchinson")
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    change = (estimate - exact)[0]
    assert float(change.std()) > 1e-6
    assert abs(float(change.mean())) < 4 * float(change.std()) / math.sqrt(change.numel())
    _, part = sample_with_log_density(
        model, emb, 64, noise=noise[:, 100:164], divergence="hutchinson"
    )
    torch.testing.assert_close(part, estimate[:, 100:164], rtol=0, atol=1e-10)
