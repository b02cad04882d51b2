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

On S^2 the default solver is a midpoint rule in Lie-group form, uniform in gamma, that evaluates
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

import torch

from globeflow.core.guidance import GuidedField
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import project_to_sphere, tangent_basis

DEFAULT_LIKELIHOOD_STEPS = 48
"""Steps of the default solver (midpoint on S^2, RK4 in R^3). On the YFCC-size random network,
against dopri5 at 1e-7 (two sets of 32 and 64 points): max |delta log p| 0.007-0.009 nats at
48 midpoint steps (0.004 at 64), while 32-40 steps give 0.024-0.027. That network's time input
oscillates faster than the steps, so the error does not fall steadily until the steps are fine
enough. In bf16 the floor is 0.013-0.02 nats."""
# Known limitation: the diffusion ODE of an *untrained* eps-network converges only at first order
# in the number of steps (about 1 nat at 1024 steps in our tests), because its field is stiff near
# gamma = 0; the R^3 diffusion density is the paper's comparison number, not our default model.
DIFFUSION_GAMMA_END = 1e-5
"""The diffusion ODE is singular at gamma = 0; it is integrated down to this signal level and
scored there under the standard normal (the marginal is N(sqrt(gamma) x0, (1-gamma) I))."""


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
    if model.family == "diffusion":
        # v = (x - s1 eps)/(2g) - eps/(2 s1): div v = 3/(2g) - (s1/(2g) + 1/(2 s1)) tr(J_eps)
        s1 = (1 - gamma).clamp_min(1e-12).sqrt()
        return velocity, 3.0 / (2 * gamma) - (s1 / (2 * gamma) + 1 / (2 * s1)) * trace
    return velocity, trace


def _t_end(model) -> float:
    if model.family != "diffusion":
        return 1.0
    # Solve gamma(t) = DIFFUSION_GAMMA_END by bisection (schedules are monotone).
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(model.schedule.signal_level(torch.tensor(mid, dtype=torch.float64))) > (
            DIFFUSION_GAMMA_END
        ):
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
    precision: str = "fp32",
    method: str | None = None,
) -> torch.Tensor:
    """log p(x | emb) by the likelihood ODE from data to noise: x (B, M, 3), emb (B, D) -> (B, M).

    ``method="midpoint"`` (default on S^2): ``steps`` Lie-group midpoint steps uniform in gamma,
    with the divergence (2 JVPs) at each step's midpoint only: 3 network rows per step
    (:func:`_midpoint_log_prob`). ``method="rk4"`` (default in R^3): ``steps`` RK4 steps on the
    ``spacing`` grid (4 evaluations with 2 or 3 JVPs each). Points are processed in chunks of
    about ``chunk_size``. ``precision="bf16"`` runs the matrix products in bfloat16 (for maps;
    the accuracy figures above are float32).
    """
    method = method or ("midpoint" if model.geometry is SPHERE else "rk4")
    steps = steps or DEFAULT_LIKELIHOOD_STEPS
    b, m, _ = x.shape
    per_chunk = max(1, chunk_size // max(b, 1))
    with torch.no_grad():
        if method == "midpoint":
            solve = _midpoint_log_prob(model, emb, steps, precision)
        elif method == "rk4":
            solve = _rk4_log_prob(model, emb, steps, spacing, precision)
        else:
            raise ValueError(f"unknown likelihood method {method!r}; choose midpoint or rk4")
        parts = [solve(x[:, i : i + per_chunk].detach()) for i in range(0, m, per_chunk)]
    return torch.cat(parts, dim=1)


def _path_field(model, field: GuidedField, levels: torch.Tensor):
    """The solvers' field callable: velocity, and the divergence where a stage needs it."""

    def velocity(z: torch.Tensor, node: int, with_divergence: bool):
        if with_divergence:
            return field_and_divergence(model, z, field, node, levels[node])
        return model.velocity_from_output(z, field.output(z, node), levels[node]), None

    return velocity


def _midpoint_log_prob(model, emb, steps: int, precision: str):
    """Solver for chunks of points: data (gamma = 1) to noise, ``steps`` steps uniform in gamma,
    with the lagged midpoint rule of :mod:`globeflow.core.solvers`: one evaluation per step, at
    its midpoint, with the divergence (3 network rows). It matched the plain midpoint rule's
    accuracy on the YFCC-size network at 3/4 of its cost, and RK4's at 1/4."""
    if model.geometry is not SPHERE:
        raise ValueError(f"the midpoint likelihood needs a model on S^2, not {model.family!r}")
    method = SOLVERS["lagged-midpoint"]
    noise_level = float(model.schedule.signal_level(torch.ones(1, dtype=torch.float64)))
    gammas = torch.linspace(1.0, noise_level, steps + 1, dtype=torch.float64)
    gammas = gammas.to(device=emb.device, dtype=emb.dtype)
    levels = method.levels(gammas)
    field = GuidedField(model.network, emb, levels, precision=precision)

    def solve(x: torch.Tensor) -> torch.Tensor:
        end, delta = method.integrate(
            _path_field(model, field, levels), x, gammas, SPHERE, with_log_density=True
        )
        # delta = log p_noise(end) - log p_data(x) along the flow.
        return model.base_log_prob(end) - delta

    return solve


def _rk4_log_prob(model, emb, steps: int, spacing: str | None, precision: str):
    """Solver for chunks of points: RK4 from data (t = 0) to noise along a grid in t; the stage
    times of every step share one batched condition path."""
    spacing = spacing or ("mixed-log" if model.family == "diffusion" else "gamma")
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


@torch.no_grad()
def sample_with_log_density(
    model,
    emb: torch.Tensor,
    num_samples: int,
    steps: int = 16,
    solver: str = "midpoint",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unguided samples of a sphere model and log p at each, in one pass.

    emb (B, D) -> (samples (B, N, 3) unit vectors, log p (B, N) natural log per steradian). The
    sampler integrates noise -> data with ``steps`` steps of ``solver`` and carries
    d log p / d gamma = -div v with the same tableau, so log p is exact up to the solver's
    discretisation (second order for midpoint/Heun), with no randomness beyond the samples.
    ``precision="bf16"`` runs the network's matrix products (JVPs included) in bfloat16.
    """
    if model.geometry is not SPHERE:
        raise ValueError(f"path log-densities need a model on S^2, not {model.family!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    method = SOLVERS[solver]
    x0 = model._prepare_noise(emb, num_samples, noise, generator)
    gammas = model.sampling_levels(steps, emb)
    levels = method.levels(gammas)
    field = GuidedField(model.network, emb, levels, precision=precision)
    with torch.no_grad():
        x, delta = method.integrate(
            _path_field(model, field, levels), x0, gammas, SPHERE, with_log_density=True
        )
    return x, model.base_log_prob(x0) + delta


def integration_grid(schedule, steps: int, t_end: float = 1.0, spacing: str = "mixed"):
    """Times 0 = t_0 < ... < t_steps = t_end for the fixed-step solver, (steps + 1,) float64.

    "t": uniform in t. "gamma": uniform in the signal level (equal increments of the network's
    time input; default of the flow families, best in an earlier benchmark). "mixed": uniform in
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
