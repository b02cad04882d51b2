"""Exact log-likelihoods by the instantaneous change of variables (paper eq. 4).

From a point y at t = 0 (data) we integrate the probability-flow ODE to t = 1 (noise) together
with the divergence of the field:

    dx/dt = gamma'(t) v(x, gamma(t)),   d(delta)/dt = gamma'(t) div v(x, gamma(t)),
    log p(y | c) = log p_noise(x(1)) + delta(1).

The field and its exact divergence (Riemannian on S^2) are :mod:`globeflow.core.path_field`'s. The
base density is the uniform 1/(4 pi) on S^2, or the standard normal in R^3.

On S^2 the default solver is a midpoint rule in Lie-group form, uniform in gamma in the bulk and
uniform in log(1 - gamma) at a stiff data end
(:func:`~globeflow.core.stiff_end.stiff_end_levels`, whose docstring says
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

from globeflow.core.guidance import GuidedField, PointConditionedField
from globeflow.core.log_density_settings import (
    DIVERGENCES,
    StiffEnd,
    StiffEndWidth,
    as_stiff_end,
)
from globeflow.core.network import Conditioning
from globeflow.core.parallel import cpu_workers, map_on_cores, split_evenly
from globeflow.core.path_field import field_and_divergence, path_field, probe_signs
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
    MIXED,
    MIXED_BF16_BELOW,
)
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import project_to_sphere
from globeflow.core.stiff_end import (
    STIFF_LOG_STEP,
    divergence_weights,
    fixed_width,
    floor_as_stiff_end,
    grid_floor,
    quantized_floors,
    solve_by_floor,
    stiff_end_levels,
    stiffness_floor,
)

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


LIKELIHOOD_PRECISION = MIXED
"""The likelihood's precision on S^2 for float32 models where bfloat16 is native (fp32
elsewhere): bf16 for the steps below signal level :data:`LIKELIHOOD_BF16_BELOW`, fp32 from
there to the data end, where a sharp posterior's stiff end lies."""
LIKELIHOOD_BF16_BELOW = 0.4
"""Signal level below which the likelihood runs bf16 (issue 22). A log-density sums the
divergence's errors along the whole path (unlike a sample, whose early errors the rest of the
path shrinks), so the bf16 share sets the error: on the YFCC-size random network, 64 points,
against dopri5 at 1e-7 (two networks), max |delta log p| 0.0096 / 0.0072 nats in fp32, 0.0117 /
0.0101 with bf16 below 0.4, 0.0138 / 0.0124 below 0.5 and 0.020 / 0.017 in bf16 throughout (the
bound is 0.02), for 1.12-1.14x the speed of fp32 below 0.4 (``benchmarks/run.py
likelihood_bf16``; docs/benchmarks.md, "The exact log-likelihood in bf16")."""


LIKELIHOOD_LOG_STEP = 0.15
"""The likelihood's step in log(1 - gamma) at the stiff end. Its error is second order in it:
on the trained 1-km and 5-km patterns of syn-small, against dopri5 at 1e-6 (8 points each),
+0.04..+0.14 nats at 0.35, -0.08..+0.04 at 0.2, -0.006..+0.027 at 0.15 (its sign is set by how
closely the divergence follows -2 / (1 - gamma + w)); 0.15 costs ~35% more time than 0.35, on
sharp models only (docs/benchmarks.md, "Exact log-likelihood of sharp posteriors")."""
LIKELIHOOD_SOLVER = "lagged-midpoint"
"""The solver of the likelihood ODE on S^2 (:func:`log_prob_ode`): one evaluation per step, at
its midpoint, with the divergence."""


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
    precision: str | None = None,
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
    ``chunk_size``. ``precision`` None: :data:`LIKELIHOOD_PRECISION` for the midpoint method of
    a float32 model where bf16 is native, else fp32; "fp32" or "bf16" (for maps) at every
    step; "mixed" (midpoint method) bf16 below :data:`LIKELIHOOD_BF16_BELOW`. A float32
    model's stiffness probe runs at the device's fastest precision (it only chooses the grid,
    :func:`stiffness_floor`). On a CPU the points are split across the cores, one worker
    thread each (:mod:`globeflow.core.parallel`; the values change by the rounding of the
    precision that runs at most: a product's last bits follow its row count).
    """
    method = method or ("midpoint" if model.geometry is SPHERE else "rk4")
    steps = steps or DEFAULT_LIKELIHOOD_STEPS
    if precision is None:
        native = x.dtype == torch.float32 and fastest_precision(x.device) == "bf16"
        precision = LIKELIHOOD_PRECISION if method == "midpoint" and native else FULL_PRECISION
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


def _integrate_with_log_density(
    model,
    emb: torch.Tensor,
    x: torch.Tensor,
    gammas: torch.Tensor,
    solver: str,
    width: float | None,
    precision: str,
    signs: torch.Tensor | None = None,
    bf16_below: float = MIXED_BF16_BELOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate the unguided path field from x (B, N, 3) over the signal levels ``gammas``
    (float64, either direction) with ``solver``, carrying the log-density: (end point, the
    change of log p along the way (B, N)), with the divergence weights of the stiff end of
    ``width``; ``signs`` (B, N): the one-JVP divergence (:func:`~globeflow.core.path_field.
    path_field`); ``bf16_below``: where "mixed" switches to fp32."""
    method = SOLVERS[solver]
    factors = divergence_weights(gammas, solver, width)
    gammas = gammas.to(device=emb.device, dtype=emb.dtype)
    levels = method.levels(gammas)
    field = GuidedField(model.network, emb, levels, precision=precision, bf16_below=bf16_below)
    return method.integrate(
        path_field(model, field, levels, factors, signs), x, gammas, SPHERE, with_log_density=True
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
    to_noise: bool = False,
    signs: torch.Tensor | None = None,
    bf16_below: float = MIXED_BF16_BELOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_integrate_with_log_density` of each point of x (B, N, 3) between
    ``start_level`` and the data on the grid of its own quantized floor (``floors`` (B, N)),
    all grids in one loop (:mod:`globeflow.core.point_grids`): (end points (B, N, 3), change
    of log p (B, N)). Noise to data (sampling), or data to noise with ``to_noise``
    (likelihoods). ``signs`` (B, N): the one-JVP divergence (:func:`~globeflow.core.path_field.
    path_field`); ``bf16_below``: where "mixed" switches to fp32."""
    b, n, _ = x.shape
    values, grid_of_point = torch.unique(floors.reshape(-1), return_inverse=True)
    widths = [fixed_width(floor_as_stiff_end(v)) for v in values.tolist()]
    exact = [stiff_end_levels(start_level, steps, grid_floor(w), log_step) for w in widths]
    exact = [g.flip(0) for g in exact] if to_noise else exact
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
    field = PointConditionedField(model.network, cond, images, precision, levels, bf16_below)
    signs = None if signs is None else signs.reshape(-1, 1)[order]
    end, delta = integrate_on_point_grids(
        path_field(model, field, levels, weight.to(levels), signs), x.reshape(-1, 1, 3)[order],
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
    (:func:`stiffness_floor`), and each point solved on the grid of its quantized floor, all
    grids in one loop (:mod:`globeflow.core.point_grids`; for a solver that loop does not run,
    one solve per floor, :func:`solve_by_floor`); a number: that width for all;
    ``StiffEnd.NONE``: no stiff end."""
    if model.geometry is not SPHERE:
        raise ValueError(f"the midpoint likelihood needs a model on S^2, not {model.family!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    noise_level = float(model.schedule.signal_level(torch.ones(1, dtype=torch.float64)))

    def solve(x: torch.Tensor) -> torch.Tensor:
        if stiff is StiffEnd.PROBED:  # each point's own floor: its answer is batch-free
            probe = grid_choosing_precision(x)
            floors = quantized_floors(stiffness_floor(model, emb, x, steps, log_step, probe))
            if solver in POINT_GRID_SOLVERS:  # every floor's grid in one loop
                end, delta = _integrate_on_floor_grids(
                    model, emb, x, floors, noise_level, steps, solver, log_step, precision, True,
                    bf16_below=LIKELIHOOD_BF16_BELOW,
                )  # fmt: skip
                return model.base_log_prob(end) - delta
            (out,) = solve_by_floor(
                floors,
                x,
                lambda rows, points, w: (solve_at(points, emb[rows], floor_as_stiff_end(w)),),
            )
            return out
        return solve_at(x, emb, stiff)

    def solve_at(x: torch.Tensor, emb: torch.Tensor, stiff_end: StiffEndWidth) -> torch.Tensor:
        width = fixed_width(stiff_end)
        gammas = stiff_end_levels(noise_level, steps, grid_floor(width), log_step).flip(0)
        end, delta = _integrate_with_log_density(
            model, emb, x, gammas, solver, width, precision, bf16_below=LIKELIHOOD_BF16_BELOW
        )
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
    divergence: str = "exact",
    return_floors: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Unguided samples of a sphere model and log p at each, in one pass.

    emb (B, D) -> (samples (B, N, 3) unit vectors, log p (B, N) natural log per steradian). The
    sampler integrates noise -> data with ``solver`` on :func:`stiff_end_levels` (``steps``
    bulk steps uniform in gamma, plus steps uniform in log(1 - gamma) where the field is stiff)
    and carries d log p / d gamma = -div v with the same tableau (divergence weights of
    :func:`divergence_weights`), so log p is exact up to the solver's discretisation
    (tests/test_likelihood.py::test_path_log_density_is_exact_on_a_known_flow).
    ``stiff``: the stiff end's width for all samples; ``StiffEnd.PROBED``: each sample's own
    floor (:func:`stiffness_floor`) probed where its :func:`pilot` from the same initial state
    lands, every sample on the grid of its quantized floor, all grids in one solver loop
    (:mod:`globeflow.core.point_grids`; for a solver that loop does not run, one solve per
    floor, :func:`solve_by_floor`);
    ``StiffEnd.NONE``: no stiff end (``steps`` uniform steps). None and ``math.inf`` are the
    older spellings of these two (:func:`~globeflow.core.log_density_settings.as_stiff_end`).
    ``log_step``: the steps' size in log(1 - gamma) at the stiff end.
    ``precision="bf16"`` runs the network's matrix products (JVPs included; the pilot's and the
    probe's too) in bfloat16. ``divergence``: ``"exact"`` (two JVPs), or ``"hutchinson"`` (one,
    along a random tangent; each sample's log p then carries a zero-mean error, so only means
    over samples, the localizability, should take it: :func:`~globeflow.core.path_field.
    path_field`, with each sample's sign from its own initial state). On a CPU the samples are
    split across the cores, one worker thread each (:mod:`globeflow.core.parallel`).
    ``return_floors``: also each sample's stiff-end width (B, N) float64 (its quantized probed
    floor, or the one given; ``math.inf`` where it has no stiff end), e.g. for a coarser pass
    on one grid (:mod:`globeflow.core.localizability`).
    """
    if model.geometry is not SPHERE:
        raise ValueError(f"path log-densities need a model on S^2, not {model.family!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {DIVERGENCES}")
    x0 = model.prepare_noise(emb, num_samples, noise, generator)
    stiff = as_stiff_end(stiff)
    workers = cpu_workers(x0.device, x0.shape[1])
    if workers > 1:  # each sample's path depends on its own initial state alone
        parts = map_on_cores(
            lambda part: sample_with_log_density(
                model, emb, part.stop - part.start, steps, solver, None, x0[:, part], precision,
                stiff, log_step, divergence, return_floors,
            ),
            split_evenly(x0.shape[1], workers),
            workers,
        )  # fmt: skip
        return tuple(torch.cat(outs, 1) for outs in zip(*parts, strict=True))
    signs = probe_signs(x0) if divergence == "hutchinson" else None
    if stiff is not StiffEnd.PROBED:
        width = fixed_width(stiff)
        start = model.sampling_levels(steps, emb)[0]
        gammas = stiff_end_levels(float(start), steps, grid_floor(width), log_step)
        x, delta = _integrate_with_log_density(
            model, emb, x0, gammas, solver, width, precision, signs
        )
        widths = torch.full(x0.shape[:2], math.inf if width is None else width)
        floors = widths.to(device=x0.device, dtype=torch.float64)
        return (x, model.base_log_prob(x0) + delta, *([floors] if return_floors else []))
    # Each sample's own floor: its answer does not depend on the batch. The pilot and the probe
    # only choose each sample's grid: "mixed" runs them at its bulk precision (bf16 moved no
    # floor enough to move the estimate: docs/benchmarks.md, "Issue 22's last round").
    chooser = grid_choosing_precision(x0) if precision == MIXED else precision
    landed = pilot(model, emb, x0, chooser)
    floors = quantized_floors(stiffness_floor(model, emb, landed, steps, log_step, chooser))
    if solver in POINT_GRID_SOLVERS:  # every floor's grid in one loop
        start = float(model.sampling_levels(steps, emb)[0])
        x, delta = _integrate_on_floor_grids(
            model, emb, x0, floors, start, steps, solver, log_step, precision, signs=signs
        )
        log_p = model.base_log_prob(x0) + delta
    else:

        def solve(rows, points, width: float) -> tuple[torch.Tensor, torch.Tensor]:
            return sample_with_log_density(
                model, emb[rows], points.shape[1], steps, solver, None, points, precision,
                stiff=floor_as_stiff_end(width), log_step=log_step, divergence=divergence,
            )  # fmt: skip

        x, log_p = solve_by_floor(floors, x0, solve)
    return (x, log_p, *([floors] if return_floors else []))


def grid_choosing_precision(x: torch.Tensor) -> str:
    """The precision of the passes that only choose a point's grid (the pilot and the stiffness
    probe) for points x of a float32 model: the device's fastest; fp32 for float64 models."""
    return fastest_precision(x.device) if x.dtype == torch.float32 else FULL_PRECISION


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
