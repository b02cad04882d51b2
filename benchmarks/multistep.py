"""A higher-order multistep solver: does it reach the guided answer in fewer network evaluations
than the default lagged midpoint?

The default (``lagged-midpoint``) evaluates the field once per step, at the step's midpoint,
which it reaches with the generator of the previous midpoint; the step then takes the midpoint
generator alone (second order). The trial solver here, ``lagged-adams3``, keeps the same nodes
and the same one evaluation per step, but uses the history (Adams' idea, on the Lie algebra of
rotations, where generators at nearby points add):

* the midpoint is reached with the line through the last two generators, extrapolated over
  the half step (the lagged midpoint holds the last one constant);
* the step takes the integral over [gamma_i, gamma_i+1] of the quadratic through the last three
  midpoint generators (the lagged midpoint: the newest alone, a one-point rule).

Its quadrature is third order on any grid (exact for quadratic generators). It is judged, like
every sampler setting, by the guided-answers criterion (:func:`confident.run_testbed`: within
twice the seed-to-seed spread of the authors' Euler 250 fp32 at the same guidance, paired seeds),
at fewer steps than the default, against the default itself and the lagged midpoint at the same
steps. It is registered for the duration of this experiment only: a trial, not a solver of the
package.

    python benchmarks/run.py multistep [-p only=syn-small-] [-p guidances=0,2]
        [-p candidates=lagged-adams3/published/32/mixed,lagged-midpoint/published/48/mixed]
"""

from __future__ import annotations

import contextlib
import math

import torch
from _common import gemm_rates, print_table
from _registry import experiment
from _testbeds import runs_default_solver
from confident import evaluations, parse_setting, passes_everywhere, run_testbed, testbeds_at

from globeflow.core.solvers import (
    EUCLIDEAN,
    SOLVERS,
    SPHERE,
    Geometry,
    Solver,
    lagged_midpoint_levels,
)

NAME = "lagged-adams3"


def lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """Integral over [a, b] of each Lagrange basis polynomial of ``nodes`` (distinct levels):
    sum_k w_k f(nodes[k]) integrates the polynomial through them exactly."""
    weights = []
    for k, node in enumerate(nodes):
        others = [n for j, n in enumerate(nodes) if j != k]
        poly = torch.tensor([1.0], dtype=torch.float64)  # coefficients, lowest degree first
        for other in others:  # multiply by (t - other) / (node - other)
            scaled = poly / (node - other)
            poly = torch.cat([torch.zeros(1, dtype=torch.float64), scaled]) - torch.cat(
                [other * scaled, torch.zeros(1, dtype=torch.float64)]
            )
        powers = torch.arange(1, len(poly) + 1, dtype=torch.float64)
        weights.append(float(((poly / powers) * (b**powers - a**powers)).sum()))
    return weights


def integrate_lagged_adams3(
    field, x: torch.Tensor, gammas: torch.Tensor, geometry: Geometry, with_log_density=False
) -> tuple[torch.Tensor, None]:
    """The trial solver from gammas[0] to gammas[-1] on the lagged midpoint's nodes (the start,
    then every step's midpoint). Returns (x_final (B, N, 3), None)."""
    if with_log_density:
        raise ValueError(f"{NAME} is a trial sampler; it carries no log-density")
    g = gammas.double().tolist()
    times = [g[0]]  # the level of each generator in history
    velocity, _ = field(x, 0, False)
    history = [geometry.lift(x, velocity)]
    for i in range(len(g) - 1):
        middle_level = 0.5 * (g[i] + g[i + 1])
        last = slice(-2, None)
        w = lagrange_integrals(times[last], g[i], middle_level)
        middle = geometry.act(x, sum(wk * hk for wk, hk in zip(w, history[last], strict=True)))
        velocity, _ = field(middle, i + 1, False)
        history.append(geometry.lift(middle, velocity))
        times.append(middle_level)
        last = slice(-3, None) if i >= 1 else slice(-1, None)  # step 0: its midpoint alone
        w = lagrange_integrals(times[last], g[i], g[i + 1])
        x = geometry.act(x, sum(wk * hk for wk, hk in zip(w, history[last], strict=True)))
        history, times = history[-3:], times[-3:]
    return x, None


TRIAL = Solver(
    name=NAME,
    order=3,
    levels=lagged_midpoint_levels,
    integrate=integrate_lagged_adams3,
    evaluations=lambda steps: steps + 1,
    divergence_quadrature=None,
    grid="published",
    geometries=(SPHERE, EUCLIDEAN),
)


@contextlib.contextmanager
def trial_solver():
    """:data:`TRIAL` in the solver registry while active."""
    SOLVERS[NAME] = TRIAL
    try:
        yield
    finally:
        SOLVERS.pop(NAME, None)


def smooth_field(levels: torch.Tensor):
    """A smooth time-dependent velocity field on S^2 (a rotation plus a tangential drift),
    evaluated at node ``node`` of ``levels``: the solvers' convergence order on it."""

    def field(x: torch.Tensor, node: int, with_divergence: bool = False):
        g = float(levels[node])
        axis = torch.tensor([math.cos(3 * g), math.sin(2 * g), g], dtype=x.dtype)
        drift = x[..., [1, 2, 0]]
        drift = drift - x * (x * drift).sum(-1, keepdim=True)
        return torch.linalg.cross(axis.expand_as(x), x, dim=-1) + 0.5 * g * drift, None

    return field


def convergence(steps: tuple[int, ...] = (8, 16, 32, 64)) -> dict[str, list[float]]:
    """Max error over 64 points of each solver at each step count, against Heun at 4,096 steps
    on :func:`smooth_field` (the grid gamma = u^1.5, non-uniform like the published one)."""
    x0 = torch.nn.functional.normalize(
        torch.randn(1, 64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        dim=-1,
    )

    def solve(solver: Solver, n: int) -> torch.Tensor:
        gammas = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64) ** 1.5
        return solver.integrate(smooth_field(solver.levels(gammas)), x0, gammas, SPHERE)[0]

    tight = solve(SOLVERS["heun"], 4096)
    solvers = {"lagged-midpoint": SOLVERS["lagged-midpoint"], NAME: TRIAL}
    return {
        name: [float((solve(s, n) - tight).norm(dim=-1).max()) for n in steps]
        for name, s in solvers.items()
    }


@experiment(
    "multistep",
    quick={
        "only": "syn-small-1km",
        "samples": 16,
        "ref_seeds": 2,
        "guidances": "2",
        "candidates": "lagged-adams3/published/8/mixed",
    },
)
def multistep(
    *,
    only: str = "syn-small-",
    guidances: str = "0,2",
    per_pattern: int = 2,
    photos: int = 4,
    samples: int = 256,
    ref_seeds: int = 3,
    candidates: str = (
        "lagged-adams3/published/24/mixed,lagged-adams3/published/32/mixed,"
        "lagged-midpoint/published/32/mixed,lagged-midpoint/published/48/mixed"
    ),
) -> dict:
    """Each candidate against the authors' sampler on each trained testbed cell and guidance.

    - ``only``: trained testbed names or prefixes (comma-separated), as in ``confident``
    - ``guidances``: comma-separated guidance scales
    - ``per_pattern``: photos per trained pattern
    - ``photos``: photos per exact-field testbed (``only=exact-``)
    - ``samples``: samples per photo
    - ``ref_seeds``: seeds of the reference (and of each candidate, paired)
    - ``candidates``: comma-separated solver/grid/steps/precision
    """
    errors = convergence()
    print_table(
        [{"solver": k, **{f"{n} steps": f"{e:.2e}" for n, e in zip((8, 16, 32, 64), v)}}
         for k, v in errors.items()],
        ["solver", "8 steps", "16 steps", "32 steps", "64 steps"],
    )  # fmt: skip
    report = {"gemm_gflops": gemm_rates(), "samples": samples, "smooth_field_errors": errors}
    results = []
    with trial_solver():  # settings naming it are checked against the registry
        settings = [parse_setting(t) for t in candidates.split(",")]
        nfe = {s.with_overrides(num_samples=samples).label(): evaluations(s) for s in settings}
        for w in guidances.split(","):
            beds = testbeds_at(w, only, per_pattern, photos, 0, 0.0)
            beds = [b for b in beds if any(b.name.startswith(n) for n in only.split(","))]
            # where the default recipe runs as given (diffusion samples with its own DDIM)
            for bed in [b for b in beds if runs_default_solver(b)]:
                results.append(run_testbed(bed, samples, ref_seeds, settings))
    rows = [row for res in results for row in res["rows"]]
    columns = ["testbed", "guidance", "label", "NFE", "miss_median_km", "within_1_km"]
    columns += ["place_mass_tv", "guess_error_km", "s/photo", "within noise"]
    print_table(rows, columns)
    labels = [s.with_overrides(num_samples=samples).label() for s in settings]
    summary = {
        label: f"{sum(r['within noise'] == 'yes' for r in rows if r['label'] == label)}/"
        f"{sum(r['label'] == label for r in rows)}"
        for label in labels
    }
    passing = [label for label in labels if passes_everywhere(label, results)]
    print(f"\ncells within noise: {summary}\nwithin noise everywhere: {passing}")
    report.update({"testbeds": results, "within_noise": summary, "passing": passing, "nfe": nfe})
    return report
