"""Naive reference implementations that the speed benchmark compares the library against.

They are deliberately written the straightforward way, from the maths, without the library's
shortcuts:

* :func:`naive_sample` -- RFM Euler sampling with classifier-free guidance where every sample row
  carries its own copy of the embedding and of gamma through the plain per-row network call
  ``network(y (R, 3), gamma (R,), emb (R, D))``. The condition mapper, time MLP and every AdaLN
  modulation are therefore recomputed for every sample, and the guided output takes two separate
  calls (conditional rows, then null rows).
* :func:`naive_log_prob` -- exact log-density by torchdiffeq ``dopri5`` on the augmented state
  [x, log-det], with the Riemannian divergence of the tangent-projected field taken from the full
  autograd Jacobian (three reverse passes, one per output component), again with per-row
  conditions.

Only the network weights, the schedule and (for sampling) the time grid are shared with the
library; everything else is independent so that agreement is a real check.
"""

from __future__ import annotations

import math

import torch

from globeflow.core.schedules import time_grid

LOG_UNIFORM = -math.log(4.0 * math.pi)
"""Base density of RFM: uniform on S^2, per steradian."""


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def naive_sample(
    network,
    schedule,
    emb: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 32,
    guidance: float = 0.0,
) -> torch.Tensor:
    """Guided RFM Euler sampler, one network row per sample: emb (B, D), noise (B, N, 3) unit
    vectors -> final state (B, N, 3) (the same quantity as ``sample_raw``).

    Euler in gamma with radial retraction: x <- normalize(x + (gamma_next - gamma_now) f), where
    f = (1 + w) f(x | c) - w f(x | null) and the null condition is the all-zeros embedding.
    """
    b, n, _ = noise.shape
    rows = b * n
    x = noise.reshape(rows, 3)
    # Every row gets its own copy of its image's embedding (and of the null embedding).
    emb_rows = emb.repeat_interleave(n, dim=0)
    null_rows = torch.zeros_like(emb_rows)
    gammas = schedule.signal_level(time_grid(steps, dtype=torch.float64)).to(emb.dtype)
    for i in range(steps):
        gamma_rows = gammas[i].expand(rows)
        out = network(x, gamma_rows, emb_rows)
        if guidance != 0:
            out_null = network(x, gamma_rows, null_rows)
            out = (1.0 + guidance) * out - guidance * out_null
        x = _normalize(x + (gammas[i + 1] - gammas[i]) * out)
    return x.reshape(b, n, 3)


def naive_field_and_divergence(
    network, x: torch.Tensor, gamma: torch.Tensor, emb_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tangent field v = P(x) f(x) (R, 3) and its Riemannian divergence (R,) on S^2, by autograd.

    The divergence on the sphere is the ambient trace of the 3x3 Jacobian of v minus its
    normal-normal component n^T J_v n (n = x): the surface divergence of a field defined in a
    neighbourhood of the sphere. The Jacobian comes row by row from three reverse passes.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        f = network(x, gamma.expand(x.shape[0]), emb_rows)
        # Projection with x inside the graph, so that its own derivative is part of J_v.
        v = f - (x * f).sum(-1, keepdim=True) * x
        rows = [
            torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < 2, create_graph=False)[0]
            for i in range(3)
        ]
    jac = torch.stack(rows, dim=1)  # (R, 3 outputs, 3 inputs)
    xd = x.detach()
    trace = jac.diagonal(dim1=1, dim2=2).sum(-1)
    normal_normal = torch.einsum("ri,rij,rj->r", xd, jac, xd)
    return v.detach(), trace - normal_normal


def naive_log_prob(
    network,
    schedule,
    x: torch.Tensor,
    emb: torch.Tensor,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    method: str = "dopri5",
) -> tuple[torch.Tensor, int]:
    """log p(x | emb) per steradian by an adaptive solve: x (B, M, 3) unit vectors, emb (B, D)
    -> ((B, M), number of field evaluations).

    Integrates dx/dt = gamma'(t) v and d(delta)/dt = gamma'(t) div v from t = 0 (data) to t = 1
    (noise); log p = -log(4 pi) + delta(1). One solve for all points (torchdiffeq's error norm is
    taken over the whole state, which favours the naive method: one step size for every point).
    """
    from torchdiffeq import odeint

    b, m, _ = x.shape
    emb_rows = emb.repeat_interleave(m, dim=0)
    nfe = 0

    def rhs(t, state):
        nonlocal nfe
        nfe += 1
        # The iterate drifts off S^2 by the local error only; evaluate at its projection.
        z = _normalize(state[:, :3])
        gamma = schedule.signal_level(t).to(x.dtype)
        dgamma = schedule.signal_level_derivative(t).to(x.dtype)
        v, div = naive_field_and_divergence(network, z, gamma, emb_rows)
        return torch.cat([dgamma * v, (dgamma * div)[:, None]], dim=-1)

    state0 = torch.cat([x.reshape(-1, 3), x.new_zeros(b * m, 1)], dim=-1)
    ts = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    final = odeint(rhs, state0, ts, rtol=rtol, atol=atol, method=method)[-1]
    return (LOG_UNIFORM + final[:, 3]).reshape(b, m), nfe
