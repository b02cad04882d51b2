"""The velocity field of a probability-flow ODE and its divergence, as the solvers see them.

On S^2 the field is the tangent projection P_x f(x) of the network output f and the divergence is
the Riemannian one, computed exactly from two Jacobian-vector products along a tangent basis
(e1, e2) at x:  div_S2 (P f) = e1.J e1 + e2.J e2 - 2 x.f  (the last term is the divergence of the
projection itself), or estimated from one, along t = e1 + s e2 with a random sign s:
t.J t = e1.J e1 + e2.J e2 + s (e1.J e2 + e2.J e1), whose mean over s is the trace (Hutchinson's
estimator; a Monte Carlo mean over samples, the localizability, can take it, one row of the
network's three fewer). In R^3 the trace of the 3x3 Jacobian is exact from three JVPs, and the
family turns the output into d x / d gamma (linear in it). Used by the likelihood and the
localizability (:mod:`globeflow.core.likelihood`) and by the stiffness probe
(:mod:`globeflow.core.stiff_end`).
"""

from __future__ import annotations

import torch

from globeflow.core.guidance import GuidedField, PointConditionedField
from globeflow.core.sphere import tangent_basis

__all__ = ["Evaluations", "field_and_divergence", "path_field", "probe_signs"]

Evaluations = GuidedField | PointConditionedField
"""The network's evaluations at a grid's levels: one level per call, or each point its own."""


def field_and_divergence(
    model,
    x: torch.Tensor,
    field: Evaluations,
    node: int | torch.Tensor,
    gamma: torch.Tensor,
    sign: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity d x / d gamma (B, N, 3) and its divergence (B, N) at x (B, N, 3), at the signal
    level ``gamma = field.gammas[node]`` of an unguided :class:`GuidedField` (or, with a
    :class:`PointConditionedField`, each point's own: ``node`` and ``gamma`` (B, 1)). ``sign``
    (B, N) of +-1, on S^2: the one-JVP estimate along e1 + sign e2 instead of the exact trace."""
    on_sphere = model.density_space == "sphere"
    if on_sphere:
        e1, e2 = tangent_basis(x)
        tangents = torch.stack([e1, e2]) if sign is None else (e1 + sign[..., None] * e2)[None]
    else:
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        tangents = eye[:, None, None, :].expand(3, *x.shape)
    outs, jvps = field.output_and_jvp(x, tangents, node)
    # sum_i t_i . J t_i
    trace = (tangents * jvps).sum(-1).sum(0)

    if on_sphere:
        radial = (x * outs).sum(-1)
        return outs - radial[..., None] * x, trace - 2.0 * radial
    # R^3 families: convert the network output into d x / d gamma (linear in the output).
    velocity = model.velocity_from_output(x, outs, gamma)
    return velocity, model.divergence_from_output(x, outs, trace, gamma)


def path_field(
    model,
    field: Evaluations,
    levels: torch.Tensor,
    div_factors: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
):
    """The solvers' field callable: velocity, and the divergence where a stage needs it
    (times ``div_factors[node]``, :func:`~globeflow.core.stiff_end.divergence_weights`, where
    given). ``signs`` (B, N) of +-1, one per point (:func:`probe_signs`): the divergence is the
    one-JVP estimate, its sign flipping at each of a point's divergence evaluations, so that the
    estimate's error along a smooth path mostly cancels between consecutive steps (its mean
    over the points' signs is the exact divergence). A field in one loop of
    :mod:`globeflow.core.point_grids` sees prefixes of the points: ``signs[:P]``."""
    flips = None if signs is None else torch.zeros_like(signs)

    def velocity(z: torch.Tensor, node: int, with_divergence: bool):
        if not with_divergence:
            return model.velocity_from_output(z, field.output(z, node), levels[node]), None
        sign = None
        if signs is not None:
            p = z.shape[0]
            sign = (signs[:p] * (1.0 - 2.0 * flips[:p])).to(z.dtype)
            flips[:p] = 1.0 - flips[:p]
        v, div = field_and_divergence(model, z, field, node, levels[node], sign)
        return v, div if div_factors is None else div * div_factors[node].to(div.dtype)

    return velocity


def probe_signs(x0: torch.Tensor) -> torch.Tensor:
    """One sign +-1 per point of initial states x0 (..., 3) float32 or float64, (...): the last
    bit of its first coordinate's float32 mantissa (the same bit of a float64, which float32
    noise cast to float64 keeps). A function of the point's own noise (so its estimate does not
    depend on its batch, and repeats with its seed) that no smooth function of it follows: over
    the noise, a fair coin independent of the path."""
    first = x0[..., 0].contiguous()
    if first.dtype == torch.float64:
        bits = (first.view(torch.int64) >> 29) & 1  # float32 keeps 23 of float64's 52 bits
    else:
        bits = first.float().view(torch.int32) & 1
    return (1 - 2 * bits).to(x0.dtype)
