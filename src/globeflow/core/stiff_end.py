"""The stiff data end of a sharp posterior: its time grid, the divergence weights that integrate
it, and the probe of each point's stiffness floor.

Near the data end the field of a posterior of width w behaves like -(x - x1) / (1 - gamma) (x1
where it is heading): a rate 1 / (1 - gamma) that uniform steps in gamma cannot follow. The grid
of :func:`stiff_end_levels` steps uniformly in log(1 - gamma) there, down to a floor that
:func:`stiffness_floor` reads from the divergence at each point; points of equal quantized floor
share a grid (:func:`quantized_floors`). The likelihood and the one-pass localizability
(:mod:`globeflow.core.likelihood`) run every point on its own grid in one loop
(:mod:`globeflow.core.point_grids`), or one solve per floor (:func:`solve_by_floor`); fusion's
batched proposals take one width per image (:func:`stiff_width`, :func:`by_width`).
"""

from __future__ import annotations

import math

import torch

from globeflow.core.errors import NonFiniteOutputError
from globeflow.core.guidance import PointConditionedField
from globeflow.core.log_density_settings import StiffEnd, StiffEndWidth
from globeflow.core.path_field import field_and_divergence
from globeflow.core.sampler_settings import FULL_PRECISION
from globeflow.core.solvers import SOLVERS

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
    (H the bulk step) to :data:`SHARPEST_LEVEL_FLOOR` (the divergence at every rung, the
    rungs side by side in one network batch, :func:`_divergence_on_rungs`); each point's
    floor depends on that point alone, never on the others of its batch
    (tests/test_stiffness.py::test_log_density_of_a_point_does_not_depend_on_its_batch).
    Raises :class:`~globeflow.core.errors.NonFiniteOutputError` where the divergence is
    not finite (a silent fallback would hide a broken model)."""
    noise_level = float(model.schedule.signal_level(torch.ones(1, dtype=torch.float64)))
    knee = (1.0 - noise_level) / bulk_steps / log_step
    ladder = probe_ladder(knee)
    gammas = 1.0 - torch.tensor(ladder, dtype=torch.float64)
    gammas = gammas.to(device=emb.device, dtype=emb.dtype)
    div = _divergence_on_rungs(model, emb, x, gammas, precision)
    floor = torch.full(x.shape[:-1], math.inf, dtype=torch.float64, device=x.device)
    for rung, s in enumerate(ladder):
        if not bool(torch.isfinite(div[rung]).all()):
            raise NonFiniteOutputError(
                f"the model's divergence is not finite at level 1 - gamma = {s:.3g} for "
                f"{int((~torch.isfinite(div[rung])).sum())} of {div[rung].numel()} points "
                "(check its weights and the embeddings)"
            )
        kappa = (s * div[rung].abs().double() / 2.0).clamp(max=1.0 - 1e-9)
        bound = torch.where(kappa > 0, s * (1.0 - kappa) / kappa, torch.full_like(kappa, math.inf))
        floor = torch.minimum(floor, bound)
    floor = floor.clamp_min(SHARPEST_LEVEL_FLOOR)
    # A floor at or above the knee's: the geometric grid would take no step below the knee.
    return torch.where(floor * STIFF_FLOOR_RATIO < knee, floor, torch.full_like(floor, math.inf))


PROBE_POINTS_PER_BATCH = 4096
"""Points per network batch of the stiffness probe (its rungs side by side, as many as fit)."""


def _divergence_on_rungs(
    model, emb: torch.Tensor, x: torch.Tensor, gammas: torch.Tensor, precision: str
) -> torch.Tensor:
    """The divergence (R, B, M) at points x (B, M, 3) of images emb (B, D), at every level of
    ``gammas`` (R,): the rungs side by side in one network batch (up to
    :data:`PROBE_POINTS_PER_BATCH` points), one conditioning row per point
    (:class:`~globeflow.core.guidance.PointConditionedField`), rather than one small batch
    per rung."""
    b, m, _ = x.shape
    cond = model.network.condition_grid(emb, gammas)
    per_batch = max(1, PROBE_POINTS_PER_BATCH // max(1, b * m))
    images = torch.arange(b, device=x.device).repeat_interleave(m)
    parts = []
    for first in range(0, len(gammas), per_batch):
        rungs = torch.arange(first, min(first + per_batch, len(gammas)), device=x.device)
        field = PointConditionedField(model.network, cond, images.repeat(len(rungs)), precision)
        node = rungs.repeat_interleave(b * m)[:, None]
        # A copy: an expanded view would alias its rows, which a field's in-place work rejects.
        points = x.reshape(1, b * m, 3).repeat(len(rungs), 1, 1).reshape(-1, 1, 3)
        _, div = field_and_divergence(model, points, field, node, gammas[node])
        parts.append(div.reshape(len(rungs), b, m))
    return torch.cat(parts)


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


def fixed_width(stiff: StiffEndWidth) -> float | None:
    """The stiff-end width of an explicit ``stiff`` (a width, or ``StiffEnd.NONE``: None)."""
    return None if stiff is StiffEnd.NONE else float(stiff)  # type: ignore[arg-type]


def floor_as_stiff_end(floor: float) -> StiffEndWidth:
    """A probed (quantized) floor as an explicit stiff end: ``inf`` (never stiff) is none."""
    return StiffEnd.NONE if floor == math.inf else floor


def grid_floor(width: float | None) -> float | None:
    """The floor of the stiff-end grid for a field that stops steepening at ``width``."""
    return None if width is None else max(width / STIFF_FLOOR_RATIO, SHARPEST_LEVEL_FLOOR)


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
