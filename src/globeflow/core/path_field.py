"""The velocity field of a probability-flow ODE and its divergence, as the solvers see them.

On S^2 the field is the tangent projection P_x f(x) of the network output f and the divergence is
the Riemannian one, computed exactly from two Jacobian-vector products along a tangent basis
(e1, e2) at x:  div_S2 (P f) = e1.J e1 + e2.J e2 - 2 x.f  (the last term is the divergence of the
projection itself). In R^3 the trace of the 3x3 Jacobian is exact from three JVPs, and the
family turns the output into d x / d gamma (linear in it). Used by the likelihood and the
localizability (:mod:`globeflow.core.likelihood`) and by the stiffness probe
(:mod:`globeflow.core.stiff_end`).
"""

from __future__ import annotations

import torch

from globeflow.core.guidance import GuidedField, PointConditionedField
from globeflow.core.sphere import tangent_basis

__all__ = ["Evaluations", "field_and_divergence", "path_field"]

Evaluations = GuidedField | PointConditionedField
"""The network's evaluations at a grid's levels: one level per call, or each point its own."""


def field_and_divergence(
    model,
    x: torch.Tensor,
    field: Evaluations,
    node: int | torch.Tensor,
    gamma: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity d x / d gamma (B, N, 3) and its divergence (B, N) at x (B, N, 3), at the signal
    level ``gamma = field.gammas[node]`` of an unguided :class:`GuidedField` (or, with a
    :class:`PointConditionedField`, each point's own: ``node`` and ``gamma`` (B, 1))."""
    on_sphere = model.density_space == "sphere"
    if on_sphere:
        e1, e2 = tangent_basis(x)
        tangents = torch.stack([e1, e2])
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
    model, field: Evaluations, levels: torch.Tensor, div_factors: torch.Tensor | None = None
):
    """The solvers' field callable: velocity, and the divergence where a stage needs it
    (times ``div_factors[node]``, :func:`~globeflow.core.stiff_end.divergence_weights`, where
    given)."""

    def velocity(z: torch.Tensor, node: int, with_divergence: bool):
        if not with_divergence:
            return model.velocity_from_output(z, field.output(z, node), levels[node]), None
        v, div = field_and_divergence(model, z, field, node, levels[node])
        return v, div if div_factors is None else div * div_factors[node].to(div.dtype)

    return velocity
