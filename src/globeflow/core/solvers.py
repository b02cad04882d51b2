"""Fixed-step ODE solvers for the probability-flow ODEs, on S^2 and in R^3.

The ODE is dx/dgamma = v(x, gamma) from the noise end (gamma = 0) to the data end (gamma = 1).
Each solver is an explicit Runge-Kutta tableau. On the sphere it runs in Lie-group form
(Runge-Kutta-Munthe-Kaas to second order): a velocity v at a point p becomes the rotation vector
p x v, stages combine rotation vectors, and the state moves by a rotation, so iterates stay on
S^2 exactly and each step follows the exponential map. In R^3 the same tableau is the classical
method. Midpoint and Heun are second order; Euler is first order.

The solvers can also carry the log-density along the path (the instantaneous change of
variables, d log p / dgamma = -div v), integrated with the same tableau: what the cheap
localizability estimator of :mod:`globeflow.core.likelihood` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from globeflow.core.sphere import rotate


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage k starts from x + h sum_j a[k][j] k_j at
    gamma + c[k] h; the step is x + h sum_k b[k] k_k."""

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.b)


EULER = Tableau("euler", a=((),), b=(1.0,), c=(0.0,), order=1)
MIDPOINT = Tableau("midpoint", a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5), order=2)
HEUN = Tableau("heun", a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2)
TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN)}


@dataclass(frozen=True)
class Geometry:
    """How velocities combine and move points: ``lift(p, v)`` turns a velocity v at p into a
    displacement generator, ``act(x, d)`` moves x by a (scaled, summed) generator."""

    lift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


SPHERE = Geometry(lift=lambda p, v: torch.linalg.cross(p, v, dim=-1), act=rotate)
EUCLIDEAN = Geometry(lift=lambda p, v: v, act=lambda x, d: x + d)

Field = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor | None]]
"""field(x, node, with_divergence) -> (velocity (B, N, 3), divergence (B, N) or None).
``node`` indexes the signal levels of :func:`stage_levels` (step * stages + stage)."""


def stage_levels(gammas: torch.Tensor, tableau: Tableau) -> torch.Tensor:
    """Signal level of every stage of every step: gammas (S + 1,) -> (S * stages,)."""
    h = gammas[1:] - gammas[:-1]
    c = torch.tensor(tableau.c, dtype=gammas.dtype, device=gammas.device)
    return (gammas[:-1, None] + h[:, None] * c[None, :]).reshape(-1)


def rk_step(
    field: Field,
    x: torch.Tensor,
    h: float | torch.Tensor,
    step: int,
    tableau: Tableau,
    geometry: Geometry,
    with_log_density: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of size h (in gamma) from x (B, N, 3); returns (x_next, change of log-density
    (B, N) or None). Only stages with a nonzero weight b compute a divergence."""
    generators: list[torch.Tensor] = []
    delta = None
    for k in range(tableau.stages):
        point = x
        if k:
            combo = sum(a * g for a, g in zip(tableau.a[k], generators) if a)
            point = geometry.act(x, h * combo)
        need_div = with_log_density and tableau.b[k] != 0.0
        velocity, div = field(point, step * tableau.stages + k, need_div)
        generators.append(geometry.lift(point, velocity))
        if need_div:
            term = -h * tableau.b[k] * div
            delta = term if delta is None else delta + term
    combo = sum(b * g for b, g in zip(tableau.b, generators) if b)
    return geometry.act(x, h * combo), delta


def integrate(
    field: Field,
    x: torch.Tensor,
    gammas: torch.Tensor,
    tableau: Tableau,
    geometry: Geometry,
    with_log_density: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrate from gammas[0] to gammas[-1] (S + 1 levels, S steps).

    Returns (x_final (B, N, 3), log p(x_final) - log p(x_start) (B, N) or None).
    """
    total = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device) if with_log_density else None
    for i in range(len(gammas) - 1):
        x, delta = rk_step(
            field, x, gammas[i + 1] - gammas[i], i, tableau, geometry, with_log_density
        )
        if delta is not None:
            total = total + delta
    return x, total
