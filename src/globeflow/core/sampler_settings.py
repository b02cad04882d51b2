"""How an answer is sampled: one settings object for predict, serve, evaluate, Locator and the
benchmarks, so that accuracy tables measure exactly what users run.

The defaults were chosen by measurement on every testbed (benchmarks/confident.py,
docs/defaults.md): the cheapest setting within noise of the authors' sampler (Euler on their
grid, 250 steps, fp32) from 1-km multimodal answers to the diffuse bundled model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from globeflow.core.guidance import PRECISIONS
from globeflow.core.likelihood import LOCALIZABILITY_BULK_STEPS, LOCALIZABILITY_SOLVER
from globeflow.core.precision import fastest_precision
from globeflow.core.time_grids import GRIDS

AUTO = "auto"
"""Precision "auto": bf16 where the device runs it natively, else fp32."""


@dataclass(frozen=True)
class SamplerSettings:
    """A complete sampling recipe.

    ``solver``: a solver name (:mod:`globeflow.core.solvers`, or the family's published step);
    ``grid``: a time grid of :mod:`globeflow.core.time_grids` (None: the solver's own);
    ``steps``: solver steps; ``precision``: "fp32", "bf16" or "auto"; ``num_samples``: samples
    per photo; ``guidance``: classifier-free guidance scale (None: the model's recommended one);
    ``localizability_*``: the unguided samples, (bulk) steps and solver of the localizability
    estimate; a sharp posterior adds steps at the data end (:mod:`globeflow.core.likelihood`).
    """

    solver: str = "data-2m"
    grid: str | None = "published"
    steps: int = 24
    precision: str = "fp32"
    num_samples: int = 1024
    guidance: float | None = None
    localizability_samples: int = 128
    localizability_steps: int = LOCALIZABILITY_BULK_STEPS
    localizability_solver: str = LOCALIZABILITY_SOLVER

    def __post_init__(self) -> None:
        if self.grid is not None and self.grid not in GRIDS:
            raise ValueError(f"unknown time grid {self.grid!r}; choose from {GRIDS}")
        if self.precision != AUTO and self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {PRECISIONS}")
        if self.steps < 1 or self.num_samples < 1 or self.localizability_steps < 1:
            raise ValueError("steps, num_samples and localizability_steps must be >= 1")

    def with_overrides(self, **overrides: object) -> SamplerSettings:
        """A copy with the given fields replaced; None values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def resolved_precision(self, device: str | torch.device) -> str:
        """The precision to run on ``device`` ("auto" resolved)."""
        return fastest_precision(device) if self.precision == AUTO else self.precision

    def describe(self) -> dict:
        """The settings as a JSON-ready dict, plus a short ``label``."""
        return {**dataclasses.asdict(self), "label": self.label()}

    def label(self) -> str:
        """E.g. "data-2m/published/16/auto/1024"."""
        grid = self.grid or "own"
        return f"{self.solver}/{grid}/{self.steps}/{self.precision}/{self.num_samples}"


DEFAULT_SAMPLER = SamplerSettings()
"""What ``predict``, ``serve``, ``evaluate`` and ``Locator`` use unless told otherwise."""

AUTHORS_SAMPLER = SamplerSettings(solver="euler", grid="published", steps=250, precision="fp32")
"""The authors' pipeline default: their Euler step on their grid, 250 steps, float32 (the
reference of benchmarks/confident.py and the default of ``PlonkPipeline.__call__``)."""


def solver_for(model, solver: str) -> str | None:
    """``solver`` where ``model``'s family has it, else the family's own default (the published
    step; the R^3 families have no data-2m); None for models without solvers (baselines)."""
    solvers = getattr(model, "solvers", ())
    if solver in solvers:
        return solver
    return getattr(model, "default_solver", None) if solvers else None


def sampling_arguments(model, settings: SamplerSettings) -> dict:
    """Keyword arguments of ``model.sample`` for ``settings``: solver, grid (only with the
    solver it was chosen for) and precision resolved for the model and its device."""
    solver = solver_for(model, settings.solver)
    if solver is None:
        return {}
    grid = settings.grid if solver == settings.solver else None
    device = getattr(model, "device", torch.device("cpu"))
    return {"solver": solver, "grid": grid, "precision": settings.resolved_precision(device)}
