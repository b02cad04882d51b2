"""Exponential-integrator solvers of the RFM sampling ODE in the data prediction, on S^2.

Near the data the RFM field is v(x, gamma) ~ log_x(D) / s with s = 1 - gamma and D the field's
implied data prediction D = exp_x(s v) (exact for one atom: the geodesic's end). Along
u = -log(s) the ODE reads dx/du = log_x(D(u)), and for a constant D its solution moves x a
fraction 1 - exp(-(u1 - u0)) = 1 - s1 / s0 of the way along the geodesic to D: whatever the step,
the stiff, contracting part (eigenvalue -1 / s, down to the posterior's width) is integrated
exactly and never overshoots. Explicit Runge-Kutta rules integrate the same part with
h lambda = -h / s, stable only for h / s <= 2 (Euler, midpoint) or <= 1 (the lagged midpoint),
which grids that end at gamma = 1 violate in the last steps of a sharp answer.

- ``data-2m``: second order with one network evaluation per step (the DPM-Solver++(2M) idea
  carried over to S^2): D is extrapolated linearly in u from the last two steps,
  D_eff = exp_{D_i}(-k log_{D_i} D_{i-1}) with k = phi_2(h) / (phi_1(h) h_prev),
  phi_1(h) = 1 - e^-h, phi_2(h) = h - phi_1(h) (the variation-of-constants integral of a linear
  D), then x moves phi_1(h) of the way to D_eff. 0 <= k <= h / h_prev, so the extrapolation is
  bounded; the first step and the last one (to s = 0, where h is infinite and x lands on D) are
  first order. Euler on S^2 in Lie-group form is the first-order member (x moves h / s of the way
  to D: exp_x(h v) = geodesic(x, D, h / s)).

The solver samples only; it does not carry log-densities (localizability runs its own pass).
"""

from __future__ import annotations

import math

import torch

from globeflow.core.sphere import exp_map, geodesic, log_map

MAX_PREDICTION_ANGLE = 1e3
"""Radians. A valid RFM field's data prediction lies at most pi away (a geodesic on S^2); a
network whose s |v| exceeds this is broken (overflowing weights), and its prediction becomes NaN
so that the sampler's non-finite check reports it instead of wrapping it round the sphere."""


def data_prediction(x: torch.Tensor, velocity: torch.Tensor, remaining: float) -> torch.Tensor:
    """The field's implied data point D = exp_x(s v) (B, N, 3) at x (B, N, 3) with velocity v
    (tangent d x / d gamma) and s = 1 - gamma the remaining signal level; NaN where s |v| is
    beyond :data:`MAX_PREDICTION_ANGLE` or not finite."""
    step = remaining * velocity
    broken = ~(step.norm(dim=-1, keepdim=True) <= MAX_PREDICTION_ANGLE)
    return exp_map(x, step.masked_fill(broken, float("nan")))


def extrapolation_weight(h: float, h_prev: float) -> float:
    """k = phi_2(h) / (phi_1(h) h_prev): how far D is extrapolated beyond the latest data
    prediction, in units of the last change of D, for steps h, h_prev in u = -log(1 - gamma).
    Tends to h / (2 h_prev) for small h (the Adams-Bashforth weight) and to (h - 1) / h_prev
    for large h."""
    phi_1 = -math.expm1(-h)
    return (h - phi_1) / (phi_1 * h_prev)


def integrate_data_multistep(
    field,
    x: torch.Tensor,
    gammas: torch.Tensor,
    geometry=None,
    with_log_density: bool = False,
) -> tuple[torch.Tensor, None]:
    """``data-2m`` from gammas[0] to gammas[-1] (S + 1 levels in [0, 1], S steps); node i of the
    field is gammas[i] (the levels of :func:`data_multistep_levels`). Returns (x_final, None).

    ``field(x, node, False) -> (velocity (B, N, 3), None)`` as in :mod:`globeflow.core.solvers`;
    the geometry is S^2 (``geometry`` is accepted for the common solver interface)."""
    if with_log_density:
        raise ValueError("data-2m does not carry log-densities; use lagged-midpoint or midpoint")
    levels = [float(g) for g in gammas.double()]
    previous, h_prev = None, None
    for i in range(len(levels) - 1):
        s_now, s_next = 1.0 - levels[i], max(0.0, 1.0 - levels[i + 1])
        velocity, _ = field(x, i, False)
        target = data_prediction(x, velocity, s_now)
        fraction = 1.0 - s_next / s_now
        h = math.log(s_now / s_next) if s_next > 0.0 else math.inf
        if previous is not None and math.isfinite(h):
            k = extrapolation_weight(h, h_prev)
            point = exp_map(target, -k * log_map(target, previous))
        else:
            point = target
        # log_map treats a NaN target as "already there"; keep the NaN for the caller's check.
        lost = ~torch.isfinite(point).all(dim=-1, keepdim=True)
        x = geodesic(x, point, fraction).masked_fill(lost, float("nan"))
        previous, h_prev = target, h
    return x, None


def data_multistep_levels(gammas: torch.Tensor) -> torch.Tensor:
    """Nodes of ``data-2m``: the start of every step, (S,)."""
    return gammas[:-1]
