"""Points on time grids of their own, integrated in one loop.

The one-pass localizability (:func:`globeflow.core.likelihood.sample_with_log_density`) gives
each sample the stiff end its own posterior needs: one heading for a sharp mode takes tens of
steps uniform in log(1 - gamma), one in a broad mode the bulk steps alone. Solved one grid at a
time, a photo pays one solver loop per distinct grid (a median of 5 on the bundled model,
``benchmarks/run.py point_grids``), and on a narrow network it is the loop's per-operation
overhead, not its arithmetic, that costs.

Here the grids are aligned at their last level (the data end when sampling, the noise end for a
likelihood) and run in one loop: iteration k advances only the points whose grid has begun by
then. With the points sorted longest grid first
(:func:`longest_first`) those are always a prefix, so every network evaluation is one batch, each
point conditioned on its own level (the field's ``node`` is one index per point into
:func:`grid_nodes`). Each point takes exactly the steps, at exactly the levels, of a solve of its
grid alone (tests/test_point_grids.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from globeflow.core.solvers import SOLVERS, SPHERE, TABLEAUS, Field, Geometry, rk_step

__all__ = ["POINT_GRID_SOLVERS", "grid_nodes", "integrate_on_point_grids", "longest_first"]

POINT_GRID_SOLVERS = (*TABLEAUS, "lagged-midpoint")
"""The solvers this loop runs (the others are solved one grid at a time)."""


def grid_nodes(grids: Sequence[torch.Tensor], solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels the ``solver`` evaluates the field at on every grid (each (S_g + 1,), from
    noise to data), one grid after another, (L,); and the index of each grid's first, (G,)
    long."""
    levels = [SOLVERS[solver].levels(g) for g in grids]
    sizes = torch.tensor([0] + [len(lv) for lv in levels[:-1]])
    return torch.cat(levels), sizes.cumsum(0)


def longest_first(grids: Sequence[torch.Tensor], grid_of_point: torch.Tensor) -> torch.Tensor:
    """The order (R,) long that puts the points (``grid_of_point`` (R,) long) longest grid
    first, points of equal length in their given order."""
    steps = torch.tensor([len(g) - 1 for g in grids])[grid_of_point.cpu()]
    return torch.argsort(steps, descending=True, stable=True).to(grid_of_point.device)


@torch.no_grad()
def integrate_on_point_grids(
    field: Field,
    x: torch.Tensor,
    grids: Sequence[torch.Tensor],
    grid_of_point: torch.Tensor,
    solver: str,
    with_log_density: bool = True,
    geometry: Geometry = SPHERE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrate points x (R, 1, 3), point i on ``grids[grid_of_point[i]]`` ((S + 1,) levels
    each, float64), with ``solver`` (one of :data:`POINT_GRID_SOLVERS`).

    The points must come longest grid first (:func:`longest_first`). ``field(z, node,
    with_divergence)`` always sees a prefix, the first P points (P, 1, 3), and ``node`` (P, 1)
    long, each point's level as an index into ``grid_nodes(grids, solver)[0]``. Returns (end
    points (R, 1, 3), change of log-density (R, 1) or None)."""
    if solver not in POINT_GRID_SOLVERS:
        raise ValueError(f"solver {solver!r} has no per-point loop; one of {POINT_GRID_SOLVERS}")
    lengths = torch.tensor([len(g) - 1 for g in grids])
    steps = lengths[grid_of_point.cpu()]
    if bool((steps[1:] > steps[:-1]).any()):
        raise ValueError("the points must come longest grid first (longest_first)")
    total = int(steps.max())
    start = total - steps  # the iteration where each point's grid begins (ascending)
    live = torch.searchsorted(start, torch.arange(total), right=True).tolist()
    # Grids right-aligned on one table: a point's step at iteration k is its column k.
    table = torch.stack([torch.cat([g[:1].expand(total + 1 - len(g)), g]) for g in grids])
    sizes = (table[:, 1:] - table[:, :-1]).to(device=x.device, dtype=x.dtype)[grid_of_point]
    first = grid_nodes(grids, solver)[1].to(x.device)[grid_of_point]
    start = start.to(x.device)
    x = x.clone()
    delta = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    lagged = solver == "lagged-midpoint"
    generators = torch.zeros_like(x) if lagged else None
    begun = 0
    for k in range(total):
        p = live[k]
        h = sizes[:p, k : k + 1]  # (P, 1)
        local = (k - start[:p])[:, None]  # each point's own step index
        if lagged:
            if p > begun:  # the new points' first evaluation, at the start of their grids
                # (on the whole prefix: the field sees prefixes only; the others' are dropped)
                velocity, _ = field(x[:p], first[:p, None], False)
                generators[begun:p] = geometry.lift(x[begun:p], velocity[begun:p])
            middle = geometry.act(x[:p], 0.5 * h[..., None] * generators[:p])
            velocity, div = field(middle, first[:p, None] + local + 1, with_log_density)
            generators[:p] = geometry.lift(middle, velocity)
            x[:p] = geometry.act(x[:p], h[..., None] * generators[:p])
            change = -h * div if with_log_density else None
        else:
            tableau = TABLEAUS[solver]  # a grid's nodes begin at a multiple of its stages
            step = first[:p, None] // tableau.stages + local
            x[:p], change = rk_step(field, x[:p], h, step, tableau, geometry, with_log_density)
        if change is not None:
            delta[:p] += change
        begun = p
    return x, (delta if with_log_density else None)
