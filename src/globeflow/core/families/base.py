"""The one interface every generative family implements, plus the shared denoising machinery.

Internally everything works on unit vectors (B, N, 3); the public methods speak degrees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from globeflow.core.errors import NonFiniteOutputError
from globeflow.core.guidance import GuidedField, GuidedVelocity
from globeflow.core.likelihood import log_prob_ode, sample_with_log_density
from globeflow.core.localizability import (
    two_level_localizability,
    two_level_sizes,
    uses_two_levels,
)
from globeflow.core.log_density_settings import DEFAULT_LOG_DENSITY, LogDensitySettings
from globeflow.core.network import Denoiser
from globeflow.core.parallel import cpu_workers, map_on_cores, split_evenly
from globeflow.core.sampler_settings import SamplerSettings, resolve
from globeflow.core.schedules import Schedule, SigmoidSchedule, schedule_from_config
from globeflow.core.solvers import EUCLIDEAN, SOLVERS, SPHERE, Geometry
from globeflow.core.sphere import KM2_PER_SR, LOG_UNIFORM_DENSITY, latlon_to_unit, unit_to_latlon
from globeflow.core.time_grids import sampling_grid


class GeoModel(nn.Module):
    """A conditional distribution p(location | embedding) on the sphere.

    Subclasses implement :meth:`loss`, :meth:`sample_unit` and :meth:`log_prob_unit`.
    """

    family: str = "base"
    density_space: str = "sphere"
    """"sphere": log_prob is a density per steradian on S^2; "euclidean": the paper's density
    in R^3."""

    cond_dim: int

    training_options: ClassVar[dict[str, str]] = {}
    """Constructor arguments a closed-form family takes from the training config, as {argument:
    ``TrainConfig`` field} (``jobs/train_config.build_model``: ``cls(cond_dim, **those)``);
    the denoising families are built from their network instead."""

    draws_initial_noise: bool = False
    """Whether :meth:`sample_unit` starts from initial states (B, N, 3) that
    :meth:`initial_noise` draws and ``noise=`` takes (the denoising families): callers then draw
    each photo's states from its own random stream and solve the batch at once. The others
    (the closed-form baselines) draw inside :meth:`sample_unit`, so callers call them once per
    photo with its own generator."""

    def loss(
        self, x0: torch.Tensor, emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training loss (scalar) for unit vectors x0 (B, 3) and embeddings emb (B, D)."""
        raise NotImplementedError

    def initial_noise(
        self, batch: int, num_samples: int, generator: torch.Generator | None, like: torch.Tensor
    ) -> torch.Tensor:
        """The sampler's initial states (batch, num_samples, 3) on ``like``'s device and dtype:
        unit vectors on S^2 or standard Gaussians in R^3 (only where
        :attr:`draws_initial_noise`)."""
        raise NotImplementedError(f"the {self.family!r} family draws no initial states")

    def base_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Natural log density (...,) of the noise distribution at x (..., 3), where the
        likelihood ODE ends: per steradian on S^2, in R^3 for the R^3 families."""
        raise NotImplementedError(f"the {self.family!r} family has no noise distribution")

    def sample_unit(
        self,
        emb: torch.Tensor,
        recipe: SamplerSettings,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples on S^2, (B, recipe.num_samples, 3), for embeddings emb (B, D) with a
        resolved recipe (:func:`~globeflow.core.sampler_settings.resolve`)."""
        raise NotImplementedError

    def log_prob_unit(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        steps: int | None = None,
        precision: str | None = None,
    ) -> torch.Tensor:
        """Natural log density at unit vectors x (B, M, 3) given emb (B, D) -> (B, M);
        ``precision`` of a solve (None: the likelihood's default)."""
        raise NotImplementedError

    # ---- public API in degrees -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @torch.no_grad()
    def sample(
        self,
        emb: torch.Tensor,
        num_samples: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        settings: SamplerSettings | None = None,
        solver: str | None = None,
        precision: str | None = None,
        grid: str | None = None,
    ) -> torch.Tensor:
        """Sample locations: emb (B, D) -> (B, num_samples, 2) degrees (lat, lon).

        The recipe is ``settings`` (default: the model's own, :func:`~globeflow.core.
        sampler_settings.model_recipe`, what ``predict`` runs) with the keyword settings that
        are given; ``guidance`` None is the model's recommended one (:func:`~globeflow.core.
        sampler_settings.resolve` says how a solver given alone is run). ``noise`` is the initial
        state (B, N, 3): unit vectors for the sphere model, standard Gaussians for the R^3
        families. ``guidance`` is the classifier-free guidance scale w. ``solver``,
        ``precision`` (``"fp32"``/``"bf16"``/``"auto"``) and ``grid``: see
        :meth:`DenoisingModel.sample_raw`.
        """
        recipe = resolve(
            self, settings, num_samples=num_samples, steps=steps, guidance=guidance,
            solver=solver, precision=precision, grid=grid,
        )  # fmt: skip
        emb = self.prepare_embeddings(emb)
        x = self.sample_unit(emb, recipe, noise, generator)
        # Projected to the sphere, NaN would become the north pole and pass for an answer.
        bad = ~torch.isfinite(x).flatten(1).all(dim=1)
        if bad.any():
            raise NonFiniteOutputError(
                f"the model's samples hold NaN or inf values for {int(bad.sum())} of "
                f"{len(bad)} inputs (check its weights, the guidance and the embeddings)"
            )
        return unit_to_latlon(x)

    def log_prob(
        self,
        latlon: torch.Tensor,
        emb: torch.Tensor,
        steps: int | None = None,
        precision: str | None = None,
    ) -> torch.Tensor:
        """log p(latlon | emb): latlon (B, M, 2) degrees, emb (B, D) -> (B, M) natural log.

        A density per steradian on S^2 (``density_space == "sphere"``), or for the R^3 families
        the paper's density in R^3 evaluated at the points. ``precision``: of the likelihood
        ODE (None: :func:`~globeflow.core.likelihood.log_prob_ode`'s default, bf16 below signal
        level 0.4 where bf16 is native; "fp32" for values that do not depend on the batch).
        """
        emb = self.prepare_embeddings(emb)
        if latlon.dim() == 2:
            latlon = latlon[:, None, :]
        x = latlon_to_unit(latlon.to(emb.dtype))
        return self.log_prob_unit(x, emb, steps=steps, precision=precision)

    @torch.no_grad()
    def sample_with_log_density(
        self,
        emb: torch.Tensor,
        num_samples: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        settings: SamplerSettings | None = None,
        density: LogDensitySettings | None = None,
        **shorthands: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unguided samples (B, N, 3) and the model's natural log-density at each (B, N).

        The samples follow the recipe ``settings`` (default: the model's own, :func:`~globeflow.
        core.sampler_settings.model_recipe`) at its ``localizability_*`` fields, ``num_samples``
        and ``steps`` (None: the recipe's) replacing ``localizability_samples`` and
        ``localizability_steps``; ``density`` (default: :data:`~globeflow.core.
        log_density_settings.DEFAULT_LOG_DENSITY`) says how they are scored. ``noise`` (B, N, 3)
        is the initial state (default: drawn from ``generator``). Keyword shorthands:
        ``solver`` and ``precision`` (the recipe's ``localizability_solver`` and
        ``localizability_precision``), ``method``, ``likelihood_steps`` and ``stiff``
        (``density``'s fields).
        """
        recipe, density = self.log_density_recipe(
            settings, density, num_samples, steps, **shorthands
        )
        return self.sample_unit_with_log_density(emb, recipe, density, noise, generator)

    def log_density_recipe(
        self,
        settings: SamplerSettings | None = None,
        density: LogDensitySettings | None = None,
        num_samples: int | None = None,
        steps: int | None = None,
        *,
        solver: str | None = None,
        precision: str | None = None,
        **density_fields: object,
    ) -> tuple[SamplerSettings, LogDensitySettings]:
        """The resolved recipe and density settings of :meth:`sample_with_log_density`."""
        recipe = resolve(
            self, settings, localizability_precision=precision, localizability_solver=solver,
            localizability_samples=num_samples or None, localizability_steps=steps or None,
        )  # fmt: skip
        return recipe, (density or DEFAULT_LOG_DENSITY).with_overrides(**density_fields)

    def sample_unit_with_log_density(
        self,
        emb: torch.Tensor,
        recipe: SamplerSettings,
        density: LogDensitySettings,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample_with_log_density` with resolved settings. Generic version: sample with
        the recipe at guidance 0, ``localizability_samples`` samples and
        ``localizability_steps`` steps, then evaluate :meth:`log_prob_unit` at the samples
        (``density.likelihood_steps`` steps)."""
        sampling = dataclasses.replace(
            recipe, guidance=0.0, num_samples=recipe.localizability_samples,
            steps=recipe.localizability_steps, precision=recipe.localizability_precision,
        )  # fmt: skip
        x = self.sample_unit(emb, sampling, noise, generator)
        return x, self.log_prob_unit(x, emb, steps=density.likelihood_steps)

    @torch.no_grad()
    def localizability(
        self,
        emb: torch.Tensor,
        num_samples: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        return_stderr: bool = False,
        **estimator: object,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Negative entropy E_p[log2 p(y|c)] in bits (B,), by Monte Carlo over model samples.

        Sampled without guidance, so that the samples follow the density being scored;
        ``num_samples`` and ``steps`` default to the recipe's (``settings=``, default the
        model's own, :func:`~globeflow.core.sampler_settings.model_recipe`)
        ``localizability_samples`` and ``localizability_steps``, and the estimate is the
        recipe's ``localizability_estimator`` (``estimator=`` "plain" or "two-level" to choose;
        :mod:`globeflow.core.localizability`): two levels where they apply and the density
        settings are the default ones, without ``noise``. With ``return_stderr`` also the Monte
        Carlo standard error (B,) in bits. Extra keyword arguments go to
        :meth:`sample_with_log_density` (estimator options, ``settings``).
        """
        emb = self.prepare_embeddings(emb)
        settings, kind = estimator.pop("settings", None), estimator.pop("estimator", None)
        if kind is not None:
            settings = resolve(self, settings, localizability_estimator=kind)
        noise, density = estimator.pop("noise", None), estimator.pop("density", None)
        recipe, density = self.log_density_recipe(
            settings, density, num_samples, steps, **estimator
        )
        if noise is None and density == DEFAULT_LOG_DENSITY and uses_two_levels(self, recipe):
            coarse = two_level_sizes(recipe.localizability_samples)[1]
            x0 = self.prepare_noise(emb, coarse, None, generator)
            bits, se, _ = two_level_localizability(self, emb, x0, recipe)
            mean, stderr = (v.to(device=emb.device, dtype=emb.dtype) for v in (bits, se))
        else:
            _, log_p = self.sample_unit_with_log_density(emb, recipe, density, noise, generator)
            bits = log_p / math.log(2.0)
            mean = bits.mean(-1)
            n = bits.shape[-1]
            stderr = bits.std(-1) / math.sqrt(n) if n > 1 else mean * 0
        return (mean, stderr) if return_stderr else mean

    def prepare_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        emb = torch.as_tensor(emb)
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2 or emb.shape[-1] != self.cond_dim:
            raise ValueError(
                f"expected embeddings of shape (B, {self.cond_dim}), got {tuple(emb.shape)}"
            )
        p = next(self.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        return emb.to(device=self.device, dtype=dtype)

    def config_dict(self) -> dict:
        """Constructor arguments, saved to config.json (with ``"family"``)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> GeoModel:
        """An untrained model from a dict :meth:`config_dict` wrote (extra keys such as
        ``"format"`` and ``"metadata"`` are ignored)."""
        raise NotImplementedError


def effective_area_km2(localizability_bits: torch.Tensor) -> torch.Tensor:
    """Effective area 2^H steradians in km^2, with H = -localizability the entropy in bits."""
    return torch.exp2(-localizability_bits) * KM2_PER_SR


UNIFORM_LOCALIZABILITY_BITS = LOG_UNIFORM_DENSITY / math.log(2.0)
"""Localizability of the uniform density over the globe, 1 / (4 pi) per steradian: -3.65 bits.
Every density on the sphere scores at least this much in expectation (the difference is its
KL divergence from uniform), so localizability minus this is >= 0 bits up to Monte Carlo error;
each bit above it halves the effective area, 2^-bits x 4 pi x R^2 = 5.1e8 km^2 x 2^-bits."""


class _SolverNames:
    """``family.solvers`` (on the class or a model): :meth:`DenoisingModel.solver_names`."""

    def __get__(self, model: object, family: type[DenoisingModel]) -> tuple[str, ...]:
        return family.solver_names()


def drop_condition(
    emb: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Classifier-free guidance training: replace each row by the null condition (zeros) with
    probability drop_prob."""
    if drop_prob <= 0:
        return emb
    keep = torch.rand(emb.shape[0], 1, generator=generator, device=emb.device) >= drop_prob
    return emb * keep.to(emb.dtype)


class DenoisingModel(GeoModel):
    """Shared machinery of the three network-based families (diffusion, flow, RFM).

    Each subclass defines the noising path (:meth:`loss`), the base distribution, the velocity
    d x / d gamma of its probability-flow ODE (:meth:`velocity_from_output`) and its default
    sampler step.
    """

    def __init__(
        self,
        network: Denoiser,
        schedule: Schedule | None = None,
        cond_drop_prob: float = 0.1,
    ):
        super().__init__()
        self.network = network
        self.schedule = schedule or SigmoidSchedule()
        self.cond_drop_prob = cond_drop_prob

    @property
    def cond_dim(self) -> int:  # type: ignore[override]
        return self.network.cond_dim

    def config_dict(self) -> dict:
        return {
            "family": self.family,
            "network": dict(self.network.config),
            "schedule": self.schedule.to_config(),
            "cond_drop_prob": self.cond_drop_prob,
        }

    @classmethod
    def from_config(cls, config: dict) -> DenoisingModel:
        return cls(
            Denoiser(**config["network"]),
            schedule=schedule_from_config(config.get("schedule")),
            cond_drop_prob=config.get("cond_drop_prob", 0.1),
        )

    # ---- training ---------------------------------------------------------------------------
    def loss(
        self,
        x0: torch.Tensor,
        emb: torch.Tensor,
        generator: torch.Generator | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Mean squared error between the network output at a random point of the noising path
        and the family's regression target; x0 (B, 3) unit vectors, emb (B, D).

        ``rows``: the mean over these rows only, with the random draws made for the whole
        batch, so that a batch split across processes gets the draws it gets in one process."""
        t = self.sample_training_time(x0.shape[0], generator, x0.device)
        gamma = self.schedule.signal_level(t).to(x0.dtype)
        eps = self.training_noise(x0, generator)
        x_t, target = self.noising_path(x0, eps, gamma)
        emb = drop_condition(emb, self.cond_drop_prob, generator)
        if rows is not None:
            x_t, gamma, emb, target = x_t[rows], gamma[rows], emb[rows], target[rows]
        out = self.network(x_t, gamma, emb)
        return ((out - target) ** 2).sum(-1).mean()

    def training_noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Noise endpoints for x0 (B, 3): standard Gaussians (R^3 families)."""
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    def noising_path(
        self, x0: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_gamma, regression target) for data x0, noise eps (B, 3), signal level gamma (B,)."""
        raise NotImplementedError

    def sample_training_time(
        self, batch: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """t ~ U[0, 1], (B,)."""
        return torch.rand(batch, generator=generator, device=device)

    # ---- family-specific pieces ---------------------------------------------------------------
    draws_initial_noise = True

    def velocity_from_output(
        self, x: torch.Tensor, out: torch.Tensor, gamma: torch.Tensor
    ) -> torch.Tensor:
        """d x / d gamma of the probability-flow ODE, from the network output at (x, gamma)."""
        raise NotImplementedError

    def divergence_from_output(
        self, x: torch.Tensor, out: torch.Tensor, trace: torch.Tensor, gamma: torch.Tensor
    ) -> torch.Tensor:
        """Divergence (B, N) in R^3 of :meth:`velocity_from_output` at x (B, N, 3), given the
        trace (B, N) of the network output's Jacobian there. Default: the velocity is the
        output, so its divergence is that trace. (On S^2 the likelihood takes the Riemannian
        divergence of the tangent projection instead, :func:`~globeflow.core.likelihood.
        field_and_divergence`.)"""
        return trace

    likelihood_end_level: float | None = None
    """The signal level where the likelihood ODE stops and the base density is scored; None:
    the schedule's end, t = 1."""
    likelihood_spacing: str = "gamma"
    """The time grid of the R^3 likelihood's RK4 steps
    (:func:`~globeflow.core.likelihood.integration_grid`)."""
    runs_ode_solvers: bool = True
    """Whether the solvers of :data:`~globeflow.core.solvers.SOLVERS` integrate this family's
    probability-flow ODE (else it samples with its published step only)."""

    def sampler_step(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        gamma_now: torch.Tensor,
        gamma_next: torch.Tensor,
    ) -> torch.Tensor:
        """The published sampler's step from gamma_now to gamma_next (Euler / DDIM)."""
        raise NotImplementedError

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map the sampler's final state to S^2 (identity for the sphere model)."""
        raise NotImplementedError

    geometry: Geometry = EUCLIDEAN
    """Where the ODE lives: S^2 (Lie-group solvers) or R^3."""

    # ---- sampling ---------------------------------------------------------------------------
    def prepare_noise(
        self,
        emb: torch.Tensor,
        num_samples: int,
        noise: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if noise is None:
            return self.initial_noise(emb.shape[0], num_samples, generator, emb)
        noise = torch.as_tensor(noise).to(device=emb.device, dtype=emb.dtype)
        if noise.dim() == 2:
            noise = noise[:, None, :]
        if noise.shape[0] != emb.shape[0] or noise.shape[-1] != 3:
            raise ValueError(
                f"noise must have shape (B={emb.shape[0]}, N, 3), got {tuple(noise.shape)}"
            )
        return noise

    def check_solver(self, solver: str | None) -> str:
        """The solver name to use (default: the published sampler), validated."""
        solver = solver or self.default_solver
        if solver not in self.solvers:
            raise ValueError(
                f"unknown solver {solver!r} for {self.family}; choose from {self.solvers}"
            )
        return solver

    def sampling_levels(
        self, steps: int, like: torch.Tensor, published: bool = False, grid: str | None = None
    ) -> torch.Tensor:
        """Signal levels of the sampler's time grid, noise to data: (steps + 1,).

        ``grid``: a name of :mod:`globeflow.core.time_grids` (``"published"``: the authors'
        grid, uniform in t through the schedule; ``"quadratic"``: gamma_k = 1 - (1 - k / S)^2;
        ``"log-width"``: even in log(1 - gamma) at the stiff end). Default: ``"published"`` with
        ``published``, else ``"quadratic"`` (the Runge-Kutta solvers' grid).
        """
        grid = grid or ("published" if published else "quadratic")
        return sampling_grid(grid, self.schedule, steps).to(like.device, like.dtype)

    @torch.no_grad()
    def sample_raw(
        self,
        emb: torch.Tensor,
        recipe: SamplerSettings,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run the sampler of a resolved recipe (:func:`~globeflow.core.sampler_settings.
        resolve`) and return its final state before :meth:`finalize`, (B, N, 3).

        ``recipe.solver``: the published step (``"euler"``; ``"ddim"`` for diffusion) or a
        solver of :mod:`globeflow.core.solvers`: ``"midpoint"``, ``"heun"`` (second order, two
        network evaluations per step), ``"lagged-midpoint"`` (second order, one evaluation per
        step) or, on S^2, ``"data-2m"`` (second order, one evaluation per step, exact at the
        stiff end). ``recipe.precision``: ``"fp32"`` or ``"bf16"``. ``recipe.grid``: the time
        grid (:mod:`globeflow.core.time_grids`); None: the solver's own (``"published"`` for the
        published step). On a CPU the samples are split across the cores, one worker thread each
        (:mod:`globeflow.core.parallel`).
        """
        steps, guidance, precision, grid = (
            recipe.steps,
            recipe.guidance,
            recipe.precision,
            recipe.grid,
        )
        x = self.prepare_noise(emb, recipe.num_samples, noise, generator)
        solver = self.check_solver(recipe.solver)
        workers = cpu_workers(x.device, x.shape[1])
        if workers > 1:  # each sample's path depends on its own initial state alone
            parts = split_evenly(x.shape[1], workers)
            return torch.cat(
                map_on_cores(lambda part: self.sample_raw(emb, recipe, x[:, part]), parts, workers),
                dim=1,
            )
        if solver not in SOLVERS or solver == self.published_solver:
            gammas = self.sampling_levels(steps, emb, grid=grid or "published")
            field = GuidedField(self.network, emb, gammas[:-1], guidance, precision)
            for i in range(steps):
                x = self.sampler_step(x, field.output(x, i), gammas[i], gammas[i + 1])
            return x
        method = SOLVERS[solver]
        gammas = self.sampling_levels(steps, emb, grid=grid or method.grid)
        levels = method.levels(gammas)
        field = GuidedField(self.network, emb, levels, guidance, precision)

        def branches(z: torch.Tensor, node: int):
            cond, null = field.branches(z, node)
            level = levels[node]
            v_null = None if null is None else self.velocity_from_output(z, null, level)
            return self.velocity_from_output(z, cond, level), v_null

        x, _ = method.integrate(GuidedVelocity(branches, guidance), x, gammas, self.geometry)
        return x

    def sample_unit(
        self,
        emb: torch.Tensor,
        recipe: SamplerSettings,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.finalize(self.sample_raw(emb, recipe, noise, generator))

    def log_prob_unit(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        steps: int | None = None,
        precision: str | None = None,
    ) -> torch.Tensor:
        return log_prob_ode(self, x, emb, steps=steps, precision=precision)

    def sample_unit_with_log_density(self, emb, recipe, density, noise=None, generator=None):
        """``density.method="path"`` (default on S^2): one pass of the recipe's
        ``localizability_steps`` ``localizability_solver`` steps that carries the log-density
        along the sampling path (:func:`~globeflow.core.likelihood.sample_with_log_density`,
        with ``density.stiff`` and ``density.divergence``). ``"ode"`` (default in R^3, where
        samples are projected onto S^2 after the solve): sample, then solve the likelihood ODE
        at every sample."""

        method = density.method or ("path" if self.geometry is SPHERE else "ode")
        if method == "ode":
            return super().sample_unit_with_log_density(emb, recipe, density, noise, generator)
        return sample_with_log_density(
            self, emb, recipe.localizability_samples, recipe.localizability_steps,
            recipe.localizability_solver, generator, noise, recipe.localizability_precision,
            stiff=density.stiff, divergence=density.divergence,
        )  # fmt: skip

    published_solver: str = "euler"
    """The authors' sampler step (:meth:`sampler_step`)."""
    default_solver: str = "euler"

    @classmethod
    def solver_names(cls) -> tuple[str, ...]:
        """The published step, then every solver of :data:`~globeflow.core.solvers.SOLVERS` that
        runs on the family's geometry (none where :attr:`runs_ode_solvers` is False); read when
        asked, so that solvers registered later count."""
        ode = [name for name, s in SOLVERS.items() if cls.geometry in s.geometries]
        return tuple(dict.fromkeys([cls.published_solver, *(ode if cls.runs_ode_solvers else [])]))

    solvers = _SolverNames()
