"""Exact log-likelihoods by the instantaneous change of variables (paper eq. 4).

From a point y at t = 0 (data) we integrate the probability-flow ODE to t = 1 (noise) together
with the divergence of the field:

    dx/dt = gamma'(t) v(x, gamma(t)),   d(delta)/dt = gamma'(t) div v(x, gamma(t)),
    log p(y | c) = log p_noise(x(1)) + delta(1).

On S^2 the field is the tangent projection P_x f(x) of the network output f and the divergence is
the Riemannian one, computed exactly from two Jacobian-vector products along a tangent basis
(e1, e2) at x:  div_S2 (P f) = e1.J e1 + e2.J e2 - 2 x.f  (the last term is the divergence of the
projection itself). In R^3 the trace of the 3x3 Jacobian is exact from three JVPs. The base
density is the uniform 1/(4 pi) on S^2, or the standard normal in R^3.

On S^2 the default solver is a midpoint rule in Lie-group form, uniform in gamma in the bulk and
uniform in log(1 - gamma) at a stiff data end (:func:`stiff_end_levels`, whose docstring says
why: the field of a sharp posterior behaves like -(x - x1) / (1 - gamma) there), that evaluates
the network once per step, at the midpoint, with the divergence: 3 network rows per step (the
midpoint's primal and its 2 tangents) against 12 for RK4, at the same accuracy on the YFCC-size
network (benchmarks/vs_reference.py). In R^3 it is RK4 on
a grid in t. The condition path of every solver stage is computed once, in one batched pass, and
shared by all points of an image; an adaptive solve (torchdiffeq dopri5) is the reference.

For the model's *own samples* the density comes almost for free: :func:`sample_with_log_density`
integrates the divergence along the sampling path itself (noise to data), with the sampler's
Runge-Kutta tableau, so one pass gives samples and their log-densities. That is the localizability
estimator (a Monte Carlo mean over samples, no second ODE per sample).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from globeflow.core.errors import NonFiniteOutputError
from globeflow.core.guidance import GuidedField, PointConditionedField
from globeflow.core.log_density_settings import StiffEnd, StiffEndWidth, as_stiff_end
from globeflow.core.network import Conditioning
from globeflow.core.parallel import cpu_workers, map_on_cores, split_evenly
from globeflow.core.point_grids import (
    POINT_GRID_SOLVERS,
    integrate_on_point_grids,
    longest_first,
)
from globeflow.core.precision import fastest_precision
from globeflow.core.sampler_settings import (
    AUTHORS_SAMPLER,
    FULL_PRECISION,
    LOCALIZABILITY_BULK_STEPS,
    LOCALIZABILITY_SOLVER,
)
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import project_to_sphere, tangent_basis

DEFAULT_LIKELIHOOD_STEPS = 48
"""Steps of the default solver (midpoint on S^2, RK4 in R^3). On the YFCC-size random network,
against dopri5 at 1e-7 (two sets of 32 and 64 points): max |delta log p| 0.007-0.009 nats at
48 midpoint steps (0.004 at 64), while 32-40 steps give 0.024-0.027. That network's time input
oscillates faster than the steps, so the error does not fall steadily until the steps are fine
enough. In bf16 the floor is 0.013-0.02 nats (benchmarks/vs_reference.py; docs/benchmarks.md).
These are the *bulk* steps: a sharp posterior adds steps uniform in log(1 - gamma) at the data
end (:func:`stiff_end_levels`); the 1-km accuracy is pinned by
tests/test_likelihood.py::test_exact_log_likelihood_of_a_1km_target_matches_its_closed_form."""
# Known limitation: the diffusion ODE of an *untrained* eps-network converges slowly in the number
# of steps, because its field is stiff near gamma = 0 (no test pins its accuracy); the R^3
# diffusion density is the paper's comparison number, not our default model.


STIFF_LOG_STEP = 0.2
"""Largest step in log(1 - gamma) of :func:`stiff_end_levels` where the field is stiff: the
steps there are STIFF_LOG_STEP (1 - gamma + floor) in gamma. The sampler's and the
localizability's (0.35 before: with the midpoint rule at 24 bulk steps, 0.2 brings the bias on
the exact testbeds within 0.1 bit; docs/benchmarks.md, "Localizability accuracy and cost")."""
SHARPEST_LEVEL_FLOOR = 1e-5
"""The smallest floor of the stiff-end grid, in 1 - gamma: the sharpest posterior supported
has 1 - gamma ~ 1e-4 at its stiffest (an RFM kernel of 1 km RMS radius has width
1 km / (1.71 x 6371 km) = 9.2e-5); the floor sits below it so that the steps keep resolving the
field until it stops being stiff."""
LIKELIHOOD_LOG_STEP = 0.15
"""The likelihood's step in log(1 - gamma) at the stiff end. Its error is second order in it:
on the trained 1-km and 5-km patterns of syn-small, against dopri5 at 1e-6 (8 points each),
+0.04..+0.14 nats at 0.35, -0.08..+0.04 at 0.2, -0.006..+0.027 at 0.15 (its sign is set by how
closely the divergence follows -2 / (1 - gamma + w)); 0.15 costs ~35% more time than 0.35, on
sharp models only (docs/benchmarks.md, "Exact log-likelihood of sharp posteriors")."""
LIKELIHOOD_SOLVER = "lagged-midpoint"
"""The solver of the likelihood ODE on S^2 (:func:`log_prob_ode`): one evaluation per step, at
its midpoint, with the divergence."""
STIFF_FLOOR_RATIO = 4.0
"""The stiff-end grid's floor is the probed bound (:func:`stiffness_floor`) over this: a margin
for the ladder's factor-4 rungs, between which kappa is not read."""


def stiff_end_levels(
    start_level: float, bulk_steps: int, floor: float | None, log_step: float = STIFF_LOG_STEP
) -> torch.Tensor:
    """Signal levels from ``start_level`` (noise) to 1 (data), (S + 1,) float64, increasing.

    With s = 1 - gamma, the step is h(s) = min(H, log_step (s + floor)), H = (1 -
    start_level) / ``bulk_steps``: uniform in gamma in the bulk, uniform in log(s + floor)
    where s < H / log_step. ``floor`` None (or not below H / log_step): ``bulk_steps`` steps
    uniform in gamma. The stiff end adds about (log(H / (log_step floor)) - 1) / log_step steps.

    Why: near the data end the field of a posterior of width w behaves like -(x - x1) / s
    (x1 where it is heading) for s >> w, a rate 1 / s, and its divergence like -2 / s. Uniform
    steps in gamma spend their last step on log(H / w) e-folds of it: the midpoint rule then
    misses nats of the divergence integral 2 log(H / w), and h |lambda| = H / w >> 1. Steps of
    log_step x (s + floor) keep h |lambda| <= log_step (the grid's bound is pinned by
    tests/test_stiffness.py::test_stiff_end_grid_bounds_its_steps). The points themselves move
    at a constant speed in gamma toward a single atom (along geodesics, d = d0 s from where they
    head), which every solver follows exactly
    (tests/test_solvers.py::test_every_solver_transports_a_single_sharp_atom_exactly); only the
    divergence, ~1 / s, needs the quadrature weights of :func:`divergence_weights`. Below s ~ w
    the field stops
    steepening (its rate saturates near 1 / w), so steps of log_step x floor reach s = 0 in
    about log(2) / log_step steps.
    """
    s_max = 1.0 - float(start_level)
    h_bulk = s_max / bulk_steps
    f = h_bulk / log_step if floor is None else min(max(float(floor), 1e-300), h_bulk / log_step)
    knee = min(h_bulk / log_step - f, s_max)  # below it: geometric steps
    c_knee = math.log1p(knee / f) / log_step
    total = c_knee + (s_max - knee) / h_bulk  # the coordinate c(s) = int_0^s ds' / h(s')
    steps = max(1, math.ceil(total - 1e-9))
    c = torch.linspace(total, 0.0, steps + 1, dtype=torch.float64)
    s = torch.where(c <= c_knee, f * torch.expm1(log_step * c), knee + (c - c_knee) * h_bulk)
    s = s.clamp(0.0, s_max)
    s[0], s[-1] = s_max, 0.0
    return 1.0 - s


def divergence_weights(
    gammas: torch.Tensor, solver: str, width: float | None
) -> torch.Tensor | None:
    """Per-node factors (nodes of ``solver`` on ``gammas``) on the divergence term so that each
    step integrates c / (1 - gamma + width) exactly (the shape of the divergence at the stiff
    end), instead of only to second order; None where ``width`` is None (no stiff end). The
    factors are 1 + O(h^2 / (1 - gamma + width)^2): ~1 in the bulk (both pinned by
    tests/test_stiffness.py::test_divergence_weights_integrate_the_stiff_shape_exactly). The
    nodes and their weights are the solver's own (``Solver.divergence_quadrature``); a solver
    that carries no log-density raises ``ValueError``."""
    rule = SOLVERS[solver].divergence_quadrature
    if rule is None:
        raise ValueError(
            f"solver {solver!r} carries no log-density; choose one of "
            f"{sorted(name for name, s in SOLVERS.items() if s.carries_log_density)}"
        )
    if width is None:
        return None
    levels = SOLVERS[solver].levels(gammas)
    g = gammas.to(torch.float64)
    a = float(width)
    exact = torch.log((1.0 - g[:-1] + a) / (1.0 - g[1:] + a))  # int dgamma / (1 - gamma + a)
    h = g[1:] - g[:-1]
    step, weight = rule.nodes(len(h), g.dtype)
    if len(step) != len(levels):
        raise ValueError(
            f"solver {solver!r}: its divergence quadrature has {len(step)} nodes on "
            f"{len(h)} steps, its levels {len(levels)}"
        )
    terms = weight * h[step] / (1.0 - levels.to(torch.float64) + a)
    quadrature = torch.zeros_like(h).index_add_(0, step, terms)
    factor = exact / quadrature.where(quadrature != 0, torch.ones_like(quadrature))
    return factor[step].where(weight != 0, torch.ones_like(weight))


@torch.no_grad()
def stiffness_floor(
    model,
    emb: torch.Tensor,
    x: torch.Tensor,
    bulk_steps: int,
    log_step: float = STIFF_LOG_STEP,
    precision: str = FULL_PRECISION,
) -> torch.Tensor:
    """The largest floor f of the stiff-end grid that keeps every step's h |lambda| within
    ``log_step`` at each point x (B, M, 3): (B, M) float64, in s = 1 - gamma; ``math.inf``
    where the field is never stiff there (uniform steps suffice). ``precision``: of the
    probe's network evaluations (the floor only chooses a grid: bf16's ~1% error in the
    divergence moves it by ~1%, inside the margin :data:`STIFF_FLOOR_RATIO`).

    Derivation. Near the data end the field contracts isotropically in the tangent plane at a
    rate |lambda| = |div v| / 2 (div v < 0: the flow converges on the mass). Write
    kappa(s) = s |div v| / 2, so |lambda| = kappa / s. The grid of :func:`stiff_end_levels`
    takes steps h = log_step (s + f) below its knee, so h |lambda| = log_step kappa (s + f) / s,
    which stays <= log_step at level s iff f <= s (1 - kappa) / kappa. The floor is therefore
    min over s of s (1 - kappa(s)) / kappa(s), whatever the shape of kappa:

    - a kernel-smoothed atom of width w (the exact fields of :mod:`globeflow.core.exact_field`)
      moves every point along its geodesic at speed d / (s + w): kappa = s / (s + w), and the
      bound is w at every s;
    - a smooth posterior of width sigma (per axis) under the RFM kernel: to first order in the
      kernel's covariance c s^2 I (c = (pi^2 - 4) / 4, the kernel's RMS radius 1.71 s),
      E[a - x | x] = c s^2 grad log p(x), so v = c s grad log p / s, div v = -2 c s / sigma^2
      and kappa = c s^2 / (sigma^2 + c s^2): quadratic below sigma, not linear. The bound
      sigma^2 / (c s) is smallest at the largest stiff s (the field is stiffest near
      s ~ sigma / sqrt(c), at rate sqrt(c) / (2 sigma), and *less* stiff below);
    - several scales (clusters of sharp modes): kappa dips and rises again; the minimum over the
      ladder takes the sharpest scale the point sits in.

    The first two shapes are pinned by
    tests/test_stiffness.py::test_kappa_shapes_of_kernel_and_smooth_posteriors.

    kappa is read at each point on a ladder of levels falling by 4 from the knee H / log_step
    (H the bulk step) to :data:`SHARPEST_LEVEL_FLOOR` (one evaluation with the divergence per
    rung); each point's floor depends on that point alone, never on the others of its batch
    (tests/test_stiffness.py::test_log_density_of_a_point_does_not_depend_on_its_batch).
    Raises :class:`~globeflow.core.errors.NonFiniteOutputError` where the divergence is
    not finite (a silent fallback would hide a broken model)."""
    noise_level = float(model.schedule.signal_level(torch.ones(1, dtype=torch.float64)))
    knee = (1.0 - noise_level) / bulk_steps / log_step
    ladder = probe_ladder(knee)
    gammas = 1.0 - torch.tensor(ladder, dtype=torch.float64)
    gammas = gammas.to(device=emb.device, dtype=emb.dtype)
    field = GuidedField(model.network, emb, gammas, precision=precision)
    floor = torch.full(x.shape[:-1], math.inf, dtype=torch.float64, device=x.device)
    for node, s in enumerate(ladder):
        _, div = field_and_divergence(model, x, field, node, gammas[node])
        if not bool(torch.isfinite(div).all()):
            raise NonFiniteOutputError(
                f"the model's divergence is not finite at level 1 - gamma = {s:.3g} for "
                f"{int((~torch.isfinite(div)).sum())} of {div.numel()} points (check its "
                "weights and the embeddings)"
            )
        kappa = (s * div.abs().double() / 2.0).clamp(max=1.0 - 1e-9)
        bound = torch.where(kappa > 0, s * (1.0 - kappa) / kappa, torch.full_like(kappa, math.inf))
        floor = torch.minimum(floor, bound)
    floor = floor.clamp_min(SHARPEST_LEVEL_FLOOR)
    # A floor at or above the knee's: the geometric grid would take no step below the knee.
    return torch.where(floor * STIFF_FLOOR_RATIO < knee, floor, torch.full_like(floor, math.inf))


def probe_ladder(knee: float) -> list[float]:
    """Levels s = 1 - gamma where :func:`stiffness_floor` reads kappa: from ``knee`` down by 4
    to :data:`SHARPEST_LEVEL_FLOOR` (at most 13 rungs)."""
    ladder, top = [], knee
    while top >= SHARPEST_LEVEL_FLOOR and len(ladder) < 12:
        ladder.append(top)
        top /= 4.0
    return [*ladder, SHARPEST_LEVEL_FLOOR]


def quantized_floors(floors: torch.Tensor) -> torch.Tensor:
    """Floors rounded down to a power of 2 (a finer grid, never a coarser one; ``inf`` kept):
    points whose floors round alike share one solve."""
    finite = torch.isfinite(floors)
    rounded = torch.exp2(torch.floor(torch.log2(floors.where(finite, torch.ones_like(floors)))))
    return rounded.where(finite, floors)


def solve_by_floor(floors: torch.Tensor, x: torch.Tensor, solve) -> tuple[torch.Tensor, ...]:
    """Run ``solve(rows, points, floor) -> tuple of (B', M', ...) tensors`` once per distinct
    quantized floor (``floors`` (B, M)), on the points (B', M', 3) of ``x`` that have it (images
    ``rows`` holding any, padded with copies of their first such point), and put each point's
    results back in place: a point's result depends on its own floor, not on its batch."""
    b, m = floors.shape
    outs: list[torch.Tensor] | None = None
    for value in torch.unique(floors).tolist():
        mask = floors == value
        rows = mask.any(1).nonzero().flatten()
        counts = mask[rows].sum(1)
        width = int(counts.max())
        # Each image's points of this floor first (stable), padded by repeating the first.
        order = torch.argsort((~mask[rows]).to(torch.int8), dim=1, stable=True)[:, :width]
        slot = torch.arange(width, device=x.device)[None, :]
        order = torch.where(slot < counts[:, None], order, order[:, :1])
        points = x[rows[:, None], order]
        got = solve(rows, points, value)
        if outs is None:
            outs = [torch.empty((b, m, *o.shape[2:]), dtype=o.dtype, device=o.device)
                    for o in got]  # fmt: skip
        keep = slot < counts[:, None]
        for out, part in zip(outs, got, strict=True):
            out[rows[:, None].expand_as(order)[keep], order[keep]] = part[keep]
    assert outs is not None
    return tuple(outs)


def field_and_divergence(
    model, x: torch.Tensor, field: GuidedField, node: int, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity d x / d gamma (B, N, 3) and its divergence (B, N) at x (B, N, 3), at the signal
    level ``gamma = field.gammas[node]`` of an unguided :class:`GuidedField`."""
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


def _t_end(model) -> float:
    """The time where the likelihood ODE stops: 1, or where the signal level falls to the
    family's ``likelihood_end_level``."""
    end_level = model.likelihood_end_level
    if end_level is None:
        return 1.0
    # Solve gamma(t) = end_level by bisection (schedules are monotone).
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(model.schedule.signal_level(torch.tensor(mid, dtype=torch.float64))) > end_level:
            lo = mid
        else:
            hi = mid
    return lo


def log_prob_ode(
    model,
    x: torch.Tensor,
    emb: torch.Tensor,
    steps: int | None = None,
    chunk_size: int = 8192,
    spacing: str | None = None,
    precision: str = FULL_PRECISION,
    method: str | None = None,
    stiff: StiffEndWidth | None = StiffEnd.PROBED,
    log_step: float = LIKELIHOOD_LOG_STEP,
    solver: str = LIKELIHOOD_SOLVER,
) -> torch.Tensor:
    """log p(x | emb) by the likelihood ODE from data to noise: x (B, M, 3), emb (B, D) -> (B, M).

    ``method="midpoint"`` (default on S^2): ``steps`` Lie-group midpoint steps uniform in gamma,
    with the divergence (2 JVPs) at each step's midpoint only: 3 network rows per step
    (:func:`_midpoint_log_prob`); ``solver`` names another solver of
    :data:`~globeflow.core.solvers.SOLVERS` that carries log-densities to run instead.
    ``method="rk4"`` (default in R^3): ``steps`` RK4 steps on the ``spacing`` grid (4
    evaluations with 2 or 3 JVPs each). Points are processed in chunks of about
    ``chunk_size``. ``precision="bf16"`` runs the matrix products in bfloat16 (for maps; the
    accuracy figures above are float32). A float32 model's stiffness probe runs at the
    device's fastest precision (it only chooses the grid, :func:`stiffness_floor`). On a CPU
    the points are split across the cores, one worker thread each
    (:mod:`globeflow.core.parallel`; the values change by float32 rounding at most).
    """
    method = method or ("midpoint" if model.geometry is SPHERE else "rk4")
    steps = steps or DEFAULT_LIKELIHOOD_STEPS
    b, m, _ = x.shape
    per_chunk = max(1, chunk_size // max(b, 1))
    with torch.no_grad():
        if method == "midpoint":
            solve = _midpoint_log_prob(
                model, emb, steps, precision, as_stiff_end(stiff), log_step, solver
            )
        elif method == "rk4":
            solve = _rk4_log_prob(model, emb, steps, spacing, precision)
        else:
            raise ValueError(f"unknown likelihood method {method!r}; choose midpoint or rk4")

        def solve_points(part: slice) -> torch.Tensor:
            chunks = range(part.start, part.stop, per_chunk)
            return torch.cat([solve(x[:, i : min(i + per_chunk, part.stop)]) for i in chunks], 1)

        # Each point's value depends on that point alone: the points are split across the cores.
        parts = split_evenly(m, cpu_workers(x.device, m))
        return torch.cat(map_on_cores(solve_points, parts, len(parts)), dim=1)


def _path_field(
    model, field: GuidedField, levels: torch.Tensor, div_factors: torch.Tensor | None = None
):
    """The solvers' field callable: velocity, and the divergence where a stage needs it
    (times ``div_factors[node]``, :func:`divergence_weights`, where given)."""

    def velocity(z: torch.Tensor, node: int, with_divergence: bool):
        if not with_divergence:
            return model.velocity_from_output(z, field.output(z, node), levels[node]), None
        v, div = field_and_divergence(model, z, field, node, levels[node])
        return v, div if div_factors is None else div * div_factors[node].to(div.dtype)

    return velocity


def _fixed_width(stiff: StiffEndWidth) -> float | None:
    """The stiff-end width of an explicit ``stiff`` (a width, or ``StiffEnd.NONE``: None)."""
    return None if stiff is StiffEnd.NONE else float(stiff)  # type: ignore[arg-type]


def _floor_as_stiff_end(floor: float) -> StiffEndWidth:
    """A probed (quantized) floor as an explicit stiff end: ``inf`` (never stiff) is none."""
    return StiffEnd.NONE if floor == math.inf else floor


def _grid_floor(width: float | None) -> float | None:
    """The floor of the stiff-end grid for a field that stops steepening at ``width``."""
    return None if width is None else max(width / STIFF_FLOOR_RATIO, SHARPEST_LEVEL_FLOOR)


def _integrate_with_log_density(
    model,
    emb: torch.Tensor,
    x: torch.Tensor,
    gammas: torch.Tensor,
    solver: str,
    width: float | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate the unguided path field from x (B, N, 3) over the signal levels ``gammas``
    (float64, either direction) with ``solver``, carrying the log-density: (end point, the
    change of log p along the way (B, N)), with the divergence weights of the stiff end of
    ``width``."""
    method = SOLVERS[solver]
    factors = divergence_weights(gammas, solver, width)
    gammas = gammas.to(device=emb.device, dtype=emb.dtype)
    levels = method.levels(gammas)
    field = GuidedField(model.network, emb, levels, precision=precision)
    return method.integrate(
        _path_field(model, field, levels, factors), x, gammas, SPHERE, with_log_density=True
    )


def _integrate_on_floor_grids(
    model,
    emb: torch.Tensor,
    x: torch.Tensor,
    floors: torch.Tensor,
    start_level: float,
    steps: int,
    solver: str,
    log_step: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_integrate_with_log_density` of each point of x (B, N, 3) from ``start_level``
    on the grid of its own quantized floor (``floors`` (B, N)), all grids in one loop
    (:mod:`globeflow.core.point_grids`): (end points (B, N, 3), change of log p (B, N))."""
    b, n, _ = x.shape
    values, grid_of_point = torch.unique(floors.reshape(-1), return_inverse=True)
    widths = [_fixed_width(_floor_as_stiff_end(v)) for v in values.tolist()]
    exact = [stiff_end_levels(start_level, steps, _grid_floor(w), log_step) for w in widths]
    weights = [divergence_weights(g, solver, w) for g, w in zip(exact, widths, strict=True)]
    grids = [g.to(device=emb.device, dtype=emb.dtype) for g in exact]
    node_levels = [SOLVERS[solver].levels(g) for g in grids]  # as grid_nodes orders them
    levels = torch.cat(node_levels)
    weight = torch.cat([
        torch.ones(len(lv), dtype=torch.float64) if w is None else w
        for lv, w in zip(node_levels, weights, strict=True)
    ])  # fmt: skip
    # Each grid's condition path on its own, as its separate solve computes it.
    cond = Conditioning.cat([model.network.condition_grid(emb, lv) for lv in node_levels])
    order = longest_first(grids, grid_of_point)
    images = torch.arange(b, device=x.device).repeat_interleave(n)[order]
    field = PointConditionedField(model.network, cond, images, precision)
    end, delta = integrate_on_point_grids(
        _path_field(model, field, levels, weight.to(levels)), x.reshape(-1, 1, 3)[order],
        grids, grid_of_point[order], solver,
    )  # fmt: skip
    back = torch.argsort(order)
    return end[back].reshape(b, n, 3), delta[back].reshape(b, n)


def _midpoint_log_prob(
    model,
    emb,
    steps: int,
    precision: str,
    stiff: StiffEndWidth,
    log_step: float,
    solver: str = LIKELIHOOD_SOLVER,
):
    """Solver for chunks of points: data (gamma = 1) to noise with the lagged midpoint rule of
    :mod:`globeflow.core.solvers` (one evaluation per step, at its midpoint, with the divergence:
    3 network rows; or the log-density-carrying ``solver`` named), on :func:`stiff_end_levels`
    with ``steps`` bulk steps; ``stiff`` ``StiffEnd.PROBED``: the floor is probed at each point
    (:func:`stiffness_floor`), and points are solved in groups of equal quantized floor
    (:func:`solve_by_floor`); a number: that width for all; ``StiffEnd.NONE``: no stiff end."""
    if model.geometry is not SPHERE:
        raise ValueError(f"the midpoint likelihood needs a model on S^2, not {model.family!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    noise_level = float(model.schedule.signal_level(torch.ones(1, dtype=torch.float64)))

    def solve(x: torch.Tensor) -> torch.Tensor:
        if stiff is StiffEnd.PROBED:  # each point's own floor: its answer is batch-free
            probe = fastest_precision(x.device) if x.dtype == torch.float32 else FULL_PRECISION
            floors = quantized_floors(stiffness_floor(model, emb, x, steps, log_step, probe))
            (out,) = solve_by_floor(
                floors,
                x,
                lambda rows, points, w: (solve_at(points, emb[rows], _floor_as_stiff_end(w)),),
            )
            return out
        return solve_at(x, emb, stiff)

    def solve_at(x: torch.Tensor, emb: torch.Tensor, stiff_end: StiffEndWidth) -> torch.Tensor:
        width = _fixed_width(stiff_end)
        gammas = stiff_end_levels(noise_level, steps, _grid_floor(width), log_step).flip(0)
        end, delta = _integrate_with_log_density(model, emb, x, gammas, solver, width, precision)
        # delta = log p_noise(end) - log p_data(x) along the flow.
        return model.base_log_prob(end) - delta

    return solve


def _rk4_log_prob(model, emb, steps: int, spacing: str | None, precision: str):
    """Solver for chunks of points: RK4 from data (t = 0) to noise along a grid in t; the stage
    times of every step share one batched condition path."""
    spacing = spacing or model.likelihood_spacing
    ts = integration_grid(model.schedule, steps, _t_end(model), spacing)
    stage_t = torch.stack([ts[:-1], (ts[:-1] + ts[1:]) / 2, ts[1:]], -1).reshape(-1)
    gammas = model.schedule.signal_level(stage_t).to(emb.dtype)
    rates = model.schedule.signal_level_derivative(stage_t).to(emb.dtype)
    field = GuidedField(model.network, emb, gammas, precision=precision)
    retract = project_to_sphere if model.density_space == "sphere" else (lambda z: z)

    def f(z, node):
        v, div = field_and_divergence(model, z, field, node, field.gammas[node])
        return rates[node] * v, rates[node] * div

    def solve(x: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        for i in range(len(ts) - 1):  # stage s of step i uses node 3 i + s
            h = float(ts[i + 1] - ts[i])
            k1, d1 = f(x, 3 * i)
            k2, d2 = f(retract(x + 0.5 * h * k1), 3 * i + 1)
            k3, d3 = f(retract(x + 0.5 * h * k2), 3 * i + 1)
            k4, d4 = f(retract(x + h * k3), 3 * i + 2)
            x = retract(x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
            delta = delta + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
        return model.base_log_prob(x) + delta

    return solve


PILOT_STEPS = 16
"""Euler steps (on the published grid) of the pilot that says where each sample ends, for
:func:`stiffness_floor` (one network row per step, on the sample's own initial state)."""


@torch.no_grad()
def sample_with_log_density(
    model,
    emb: torch.Tensor,
    num_samples: int,
    steps: int = LOCALIZABILITY_BULK_STEPS,
    solver: str = LOCALIZABILITY_SOLVER,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    precision: str = FULL_PRECISION,
    stiff: StiffEndWidth | None = StiffEnd.PROBED,
    log_step: float = STIFF_LOG_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unguided samples of a sphere model and log p at each, in one pass.

    emb (B, D) -> (samples (B, N, 3) unit vectors, log p (B, N) natural log per steradian). The
    sampler integrates noise -> data with ``solver`` on :func:`stiff_end_levels` (``steps``
    bulk steps uniform in gamma, plus steps uniform in log(1 - gamma) where the field is stiff)
    and carries d log p / d gamma = -div v with the same tableau (divergence weights of
    :func:`divergence_weights`), so log p is exact up to the solver's discretisation
    (tests/test_likelihood.py::test_path_log_density_is_exact_on_a_known_flow).
    ``stiff``: the stiff end's width for all samples; ``StiffEnd.PROBED``: each sample's own
    floor (:func:`stiffness_floor`) probed where its :func:`pilot` from the same initial state
    lands, samples of equal quantized floor solved together (:func:`solve_by_floor`);
    ``StiffEnd.NONE``: no stiff end (``steps`` uniform steps). None and ``math.inf`` are the
    older spellings of these two (:func:`~globeflow.core.log_density_settings.as_stiff_end`).
    ``log_step``: the steps' size in log(1 - gamma) at the stiff end.
    ``precision="bf16"`` runs the network's matrix products (JVPs included; the pilot's and the
    probe's too) in bfloat16. On a CPU the samples are split across the cores, one worker
    thread each (:mod:`globeflow.core.parallel`).
    """
    if model.geometry is not SPHERE:
        raise ValueError(f"path log-densities need a model on S^2, not {model.family!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    x0 = model.prepare_noise(emb, num_samples, noise, generator)
    stiff = as_stiff_end(stiff)
    workers = cpu_workers(x0.device, x0.shape[1])
    if workers > 1:  # each sample's path depends on its own initial state alone
        parts = map_on_cores(
            lambda part: sample_with_log_density(
                model, emb, part.stop - part.start, steps, solver, None, x0[:, part], precision,
                stiff, log_step,
            ),
            split_evenly(x0.shape[1], workers),
            workers,
        )  # fmt: skip
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    if stiff is StiffEnd.PROBED:  # each sample's own floor: its answer does not depend on the batch
        landed = pilot(model, emb, x0, precision)
        floors = quantized_floors(stiffness_floor(model, emb, landed, steps, log_step, precision))
        if solver in POINT_GRID_SOLVERS:  # every floor's grid in one loop
            start = float(model.sampling_levels(steps, emb)[0])
            x, delta = _integrate_on_floor_grids(
                model, emb, x0, floors, start, steps, solver, log_step, precision
            )
            return x, model.base_log_prob(x0) + delta

        def solve(rows, points, width: float) -> tuple[torch.Tensor, torch.Tensor]:
            return sample_with_log_density(
                model, emb[rows], points.shape[1], steps, solver, None, points, precision,
                stiff=_floor_as_stiff_end(width), log_step=log_step,
            )  # fmt: skip

        return solve_by_floor(floors, x0, solve)
    width = _fixed_width(stiff)
    start = model.sampling_levels(steps, emb)[0]
    gammas = stiff_end_levels(float(start), steps, _grid_floor(width), log_step)
    x, delta = _integrate_with_log_density(model, emb, x0, gammas, solver, width, precision)
    return x, model.base_log_prob(x0) + delta


def pilot(
    model, emb: torch.Tensor, x0: torch.Tensor, precision: str = FULL_PRECISION
) -> torch.Tensor:
    """Where each initial state x0 (B, N, 3) lands under :data:`PILOT_STEPS` Euler steps on the
    published grid, (B, N, 3): near the end of its own accurate path, so that the stiffness is
    probed where that sample's mass is. A pilot that lands between modes reads the field as
    stiffer than it is (there it pulls at the full rate 1 / s), which costs steps; one that
    misses a sharp mode its sample reaches gives that sample too coarse a grid (the strict xfail
    tests/test_stiffness.py::test_a_5_percent_sharp_minor_mode_is_integrated_on_its_own_grid)."""
    recipe = AUTHORS_SAMPLER.with_overrides(
        steps=PILOT_STEPS, num_samples=x0.shape[1], precision=precision
    )
    return model.sample_unit(emb, dataclasses.replace(recipe, guidance=0.0), x0, None)


def integration_grid(schedule, steps: int, t_end: float = 1.0, spacing: str = "mixed"):
    """Times 0 = t_0 < ... < t_steps = t_end for the fixed-step solver, (steps + 1,) float64.

    "t": uniform in t. "gamma": uniform in the signal level (equal increments of the network's
    time input; default of the flow families). "mixed": uniform in
    t + 1 - gamma(t), which also shortens steps where the density sharpens (t near 0).
    "mixed-log" (default for diffusion): adds log(gamma) / log(gamma_end), since the diffusion
    probability-flow ODE behaves like dx/dgamma = x / (2 gamma) near the noise end and is smooth
    only in log gamma.
    """
    if spacing == "t":
        return torch.linspace(0.0, t_end, steps + 1, dtype=torch.float64)
    dense = torch.linspace(0.0, t_end, 4097, dtype=torch.float64)
    gamma = schedule.signal_level(dense).to(torch.float64)
    if spacing == "gamma":
        u = 1.0 - gamma
    elif spacing == "mixed":
        u = dense / t_end + (1.0 - gamma)
    elif spacing == "mixed-log":
        log_g = torch.log(gamma.clamp_min(1e-300))
        u = dense / t_end + (1.0 - gamma) + log_g / log_g[-1]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose t, gamma, mixed or mixed-log")
    u = (u - u[0]) / (u[-1] - u[0])
    targets = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    idx = torch.searchsorted(u, targets).clamp(1, len(u) - 1)
    lo, hi = u[idx - 1], u[idx]
    frac = ((targets - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
    ts = dense[idx - 1] + frac * (dense[idx] - dense[idx - 1])
    ts[0], ts[-1] = 0.0, t_end
    return ts


def log_prob_adaptive(
    model,
    x: torch.Tensor,
    emb: torch.Tensor,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    method: str = "dopri5",
) -> torch.Tensor:
    """Reference log p with an adaptive solver (torchdiffeq), same field and divergence:
    x (B, M, 3), emb (B, D) -> (B, M). Slow; used to check the fixed-step default."""
    from torchdiffeq import odeint

    b, m, _ = x.shape
    t_end = _t_end(model)

    def rhs(t, state):
        z = state[..., :3].reshape(b, m, 3)
        gamma = model.schedule.signal_level(t).to(x.dtype).reshape(1)
        dgamma = model.schedule.signal_level_derivative(t).to(x.dtype)
        field = GuidedField(model.network, emb, gamma)
        v, div = field_and_divergence(model, z, field, 0, gamma[0])
        return torch.cat([dgamma * v, (dgamma * div)[..., None]], -1)

    state0 = torch.cat([x, torch.zeros(b, m, 1, dtype=x.dtype, device=x.device)], -1)
    ts = torch.tensor([0.0, t_end], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        final = odeint(rhs, state0, ts, rtol=rtol, atol=atol, method=method)[-1]
    z = final[..., :3]
    if model.density_space == "sphere":
        z = project_to_sphere(z)
    return model.base_log_prob(z) + final[..., 3]


# ---- one width for a whole image (fusion's batched proposals) --------------------------------


def stiff_width(
    model, emb: torch.Tensor, x: torch.Tensor, bulk_steps: int, log_step: float = STIFF_LOG_STEP
) -> float | None:
    """One stiff-end width for all points x (B, M, 3) of the images emb (B, D): the smallest of
    their floors (:func:`stiffness_floor`), None where none is stiff. For callers that solve
    many points of an image on one grid (fusion); the others take per-point floors."""
    floor = float(stiffness_floor(model, emb, x, bulk_steps, log_step).min())
    return None if floor == math.inf else floor


def quantized_width(width: float | None) -> float:
    """A width rounded down to a power of 2 (a finer grid, never a coarser one), and
    ``math.inf`` for none: images whose widths round alike share one solve."""
    if width is None or width == math.inf:
        return math.inf
    return 2.0 ** math.floor(math.log2(width))


def by_width(widths: list[float], solve):
    """Run ``solve(rows, width)`` once per distinct width over the images (rows) that have it
    and put the results (tensors, or tuples of tensors, with images first) back in order."""
    groups: dict[float, list[int]] = {}
    for i, w in enumerate(widths):
        groups.setdefault(w, []).append(i)
    if len(groups) == 1:
        ((width, rows),) = groups.items()
        return solve(rows, width)
    parts = {width: solve(rows, width) for width, rows in groups.items()}
    first = next(iter(parts.values()))
    single = isinstance(first, torch.Tensor)
    outs = [first] if single else list(first)
    results = [torch.empty((len(widths), *o.shape[1:]), dtype=o.dtype, device=o.device)
               for o in outs]  # fmt: skip
    for width, rows in groups.items():
        got = parts[width]
        for out, part in zip(results, [got] if single else got, strict=True):
            out[rows] = part
    return results[0] if single else tuple(results)
