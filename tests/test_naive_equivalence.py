"""The speed benchmark's naive implementations compute the same maths as the library.

Tiny random networks in float64, so that agreement is to round-off: the naive per-row guided
Euler sampler equals ``sample_raw``, and the autograd-Jacobian Riemannian divergence equals the
library's fused-JVP divergence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _naive import naive_field_and_divergence, naive_log_prob, naive_sample  # noqa: E402

from globeflow.core.families import RiemannianFlowMatching  # noqa: E402
from globeflow.core.guidance import GuidedField  # noqa: E402
from globeflow.core.likelihood import log_prob_adaptive  # noqa: E402
from globeflow.core.network import Denoiser  # noqa: E402
from globeflow.core.path_field import field_and_divergence  # noqa: E402
from globeflow.core.sampler_settings import AUTHORS_SAMPLER, resolve  # noqa: E402
from globeflow.core.sphere import LOG_UNIFORM_DENSITY, sample_uniform_sphere  # noqa: E402

f64 = torch.float64


def _model(seed=0, out_std=0.3):
    torch.manual_seed(seed)
    net = Denoiser(dim=32, depth=2, cond_dim=8)
    # Non-trivial output scale, so that the divergence is not dominated by round-off.
    torch.nn.init.normal_(net.final_linear.weight, std=out_std)
    return RiemannianFlowMatching(net).double().eval()


def test_naive_sampler_equals_library_sampler():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 8, generator=gen, dtype=f64)
    noise = sample_uniform_sphere((2, 16), generator=gen, dtype=f64)
    ours = model.sample_raw(emb, resolve(model, AUTHORS_SAMPLER, steps=8, guidance=2.0), noise)
    naive = naive_sample(model.network, model.schedule, emb, noise, steps=8, guidance=2.0)
    torch.testing.assert_close(naive, ours, rtol=0, atol=1e-10)


def test_naive_divergence_equals_library_jvp_divergence():
    model = _model(2)
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 8, generator=gen, dtype=f64)
    x = sample_uniform_sphere((2, 5), generator=gen, dtype=f64)
    for gamma in (0.05, 0.5, 0.97):
        g = torch.tensor(gamma, dtype=f64)
        guided = GuidedField(model.network, emb, g.reshape(1))
        field, div = field_and_divergence(model, x, guided, 0, g)
        v, div_naive = naive_field_and_divergence(
            model.network, x.reshape(-1, 3), g, emb.repeat_interleave(5, dim=0)
        )
        torch.testing.assert_close(v.reshape(2, 5, 3), field, rtol=0, atol=1e-12)
        torch.testing.assert_close(div_naive.reshape(2, 5), div, rtol=0, atol=1e-9)
        assert div.abs().max() > 1e-3  # a non-trivial check


def test_naive_adaptive_log_prob_matches_library_adaptive():
    """The ODE plumbing (time direction, signs, base density): both adaptive solves agree to
    their tolerance. A milder field keeps the solves short."""
    model = _model(4, out_std=0.05)
    gen = torch.Generator().manual_seed(5)
    emb = torch.randn(1, 8, generator=gen, dtype=f64)
    x = sample_uniform_sphere((1, 2), generator=gen, dtype=f64)
    ours = log_prob_adaptive(model, x, emb, rtol=1e-5, atol=1e-5)
    naive, nfe = naive_log_prob(model.network, model.schedule, x, emb, rtol=1e-5, atol=1e-5)
    assert nfe > 0
    assert (ours - LOG_UNIFORM_DENSITY).abs().max() > 0.1  # far from the trivial answer
    # Both solves are tolerance-limited (global error ~100x the local tolerance here).
    torch.testing.assert_close(naive, ours, rtol=0, atol=5e-3)
