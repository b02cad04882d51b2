"""Fixed-step ODE solvers for the probability-flow ODEs, on S^2 and in R^3.

The ODE is dx/dgamma = v(x, gamma), integrated along a grid of signal levels in either direction
(noise to data when sampling, data to noise for likelihoods). On the sphere every solver runs in
Lie-group form (Runge-Kutta-Munthe-Kaas to second order): a velocity v at a point p becomes the
rotation vector p x v, steps combine rotation vectors, and the state moves by a rotation, so
iterates stay on S^2 exactly and each step follows the exponential map. In R^3 the same rules
are the classical methods.

- Explicit Runge-Kutta tableaus: Euler (first order), midpoint and Heun (second order, two
  network evaluations per step).
- ``lagged-midpoint``: the midpoint rule with the midpoint predicted from the *previous* step's
  midpoint velocity (a rotation vector is valid anywhere on S^2) instead of a fresh evaluation at
  the step's start: one evaluation per step (plus one at the very start), still second order,
  since the O(h) lag moves the midpoint only by O(h^2).
- ``data-2m`` (S^2 only): a second-order exponential integrator in the data prediction, one
  evaluation per step, exact for the stiff end of a sharp answer
  (:mod:`globeflow.core.data_prediction`).

The solvers can also carry the log-density along the path (the instantaneous change of
variables, d log p / dgamma = -div v), integrated with the same tableau: what the cheap
localizability estimator of :mod:`globeflow.core.likelihood` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from globeflow.core.data_prediction import data_multistep_levels, integrate_data_multistep
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
    step: int | torch.Tensor,
    tableau: Tableau,
    geometry: Geometry,
    with_log_density: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of size h (in gamma) from x (B, N, 3); returns (x_next, change of log-density
    (B, N) or None). Only stages with a nonzero weight b compute a divergence. ``h`` may be
    one size per point, (B, N), and ``step`` one step index per point, (B, N) long (the
    field's ``node`` is then per point too: :mod:`globeflow.core.point_grids`)."""
    per_point = isinstance(h, torch.Tensor) and h.dim() > 0
    h_move = h[..., None] if per_point else h  # broadcast over the 3 coordinates
    generators: list[torch.Tensor] = []
    delta = None
    for k in range(tableau.stages):
        point = x
        if k:
            combo = sum(a * g for a, g in zip(tableau.a[k], generators) if a)
            point = geometry.act(x, h_move * combo)
        need_div = with_log_density and tableau.b[k] != 0.0
        velocity, div = field(point, step * tableau.stages + k, need_div)
        generators.append(geometry.lift(point, velocity))
        if need_div:
            term = -h * tableau.b[k] * div
            delta = term if delta is None else delta + term
    combo = sum(b * g for b, g in zip(tableau.b, generators) if b)
    return geometry.act(x, h_move * combo), delta


def integrate(
    field: Field,
    x: torch.Tensor,
    gammas: torch.Tensor,
    tableau: Tableau,
    geometry: Geometry,
    with_log_density: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrate with a Runge-Kutta tableau from gammas[0] to gammas[-1] (S + 1 levels, S steps).

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


def lagged_midpoint_levels(gammas: torch.Tensor) -> torch.Tensor:
    """Nodes of the lagged midpoint rule: the start, then every step's midpoint, (S + 1,)."""
    return torch.cat([gammas[:1], (gammas[:-1] + gammas[1:]) / 2])


def integrate_lagged_midpoint(
    field: Field,
    x: torch.Tensor,
    gammas: torch.Tensor,
    geometry: Geometry,
    with_log_density: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lagged midpoint rule from gammas[0] to gammas[-1]; node 0 is the start, node i + 1 the
    midpoint of step i (:func:`lagged_midpoint_levels`). Returns as :func:`integrate`."""
    velocity, _ = field(x, 0, False)
    generator = geometry.lift(x, velocity)
    total = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device) if with_log_density else None
    for i in range(len(gammas) - 1):
        h = gammas[i + 1] - gammas[i]
        middle = geometry.act(x, 0.5 * h * generator)
        velocity, div = field(middle, i + 1, with_log_density)
        generator = geometry.lift(middle, velocity)
        x = geometry.act(x, h * generator)
        if with_log_density:
            total = total - h * div
    return x, total


@dataclass(frozen=True)
class DivergenceQuadrature:
    """How a solver integrates d log p / dgamma = -div v over each step: its nodes (the signal
    levels of ``Solver.levels``) are ``lead`` nodes before the first step, weighted 0, then
    ``len(weights)`` nodes per step, node k of step i weighted ``weights[k]``: the step adds
    -h_i sum_k weights[k] div v(node). A Runge-Kutta tableau's is its b; the lagged midpoint
    rule's is one node per step (its midpoint) after the lead node at the start."""

    weights: tuple[float, ...]
    lead: int = 0

    def nodes(
        self, steps: int, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(step index (lead + steps * len(weights),) long, weight per node, same length):
        the lead nodes get step 0 and weight 0."""
        per_step = len(self.weights)
        node = torch.arange(self.lead + steps * per_step)
        step = (node - self.lead).div(per_step, rounding_mode="floor").clamp_min(0)
        weight = torch.cat(
            [
                torch.zeros(self.lead, dtype=dtype),
                torch.tensor(self.weights, dtype=dtype).repeat(steps),
            ]
        )
        return step, weight


@dataclass(frozen=True)
class Solver:
    """A named fixed-step solver: the signal levels its field is evaluated at, and the solve."""

    name: str
    order: int
    levels: Callable[[torch.Tensor], torch.Tensor]
    integrate: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    evaluations: Callable[[int], int]
    """Network evaluations for a number of steps."""
    divergence_quadrature: DivergenceQuadrature | None
    """How ``integrate(..., with_log_density=True)`` weights the divergence at its nodes; None
    where it carries no log-density."""
    grid: str = "quadratic"
    """Its default time grid (:mod:`globeflow.core.time_grids`)."""
    geometries: tuple[Geometry, ...] = (SPHERE, EUCLIDEAN)
    """Where it runs (S^2 and R^3, or S^2 alone)."""

    @property
    def carries_log_density(self) -> bool:
        """Whether ``integrate(..., with_log_density=True)`` works (localizability in one pass)."""
        return self.divergence_quadrature is not None


def runge_kutta(tableau: Tableau) -> Solver:
    """The solver of an explicit Runge-Kutta tableau, carrying log-densities with weights b."""
    return Solver(
        name=tableau.name,
        order=tableau.order,
        levels=lambda gammas: stage_levels(gammas, tableau),
        integrate=lambda field, x, gammas, geometry, with_log_density=False: integrate(
            field, x, gammas, tableau, geometry, with_log_density
        ),
        evaluations=lambda steps: steps * tableau.stages,
        divergence_quadrature=DivergenceQuadrature(weights=tableau.b),
    )


SOLVERS: dict[str, Solver] = {
    **{name: runge_kutta(tableau) for name, tableau in TABLEAUS.items()},
    "lagged-midpoint": Solver(
        name="lagged-midpoint",
        order=2,
        levels=lagged_midpoint_levels,
        integrate=integrate_lagged_midpoint,
        evaluations=lambda steps: steps + 1,
        divergence_quadrature=DivergenceQuadrature(weights=(1.0,), lead=1),
    ),
    "data-2m": Solver(
        name="data-2m",
        order=2,
        levels=data_multistep_levels,
        integrate=integrate_data_multistep,
        evaluations=lambda steps: steps,
        divergence_quadrature=None,
        grid="log-width",
        geometries=(SPHERE,),
    ),
}
"""Every solver by name: the families' solver lists (beside their published step) are read from
here, so a solver registered here (:func:`register_solver`) runs in every family whose geometry
it supports."""


def register_solver(solver: Solver) -> Solver:
    """Add ``solver`` to :data:`SOLVERS` under its name (a name already taken raises)."""
    if solver.name in SOLVERS:
        raise ValueError(f"a solver named {solver.name!r} is already registered")
    SOLVERS[solver.name] = solver
    return solver
