"""Time grids of the samplers: the signal levels gamma_0 < ... < gamma_S = 1, noise to data.

- ``published``: the authors' grid, uniform in t through the schedule (dense at both ends).
- ``quadratic``: gamma_k = 1 - (1 - k / S)^2 from the schedule's noise level: steps shrink
  linearly towards the data, so the last steps have h / (1 - gamma) = 2 / (S - k) - 1 / (S - k)^2.
- ``log-width``: uniform in
  ``w(gamma) = gamma + log((1 - gamma_0) / (1 - gamma)) / log(1 / SMALLEST_WIDTH)`` up to
  1 - gamma = SMALLEST_WIDTH, then one last step to gamma = 1. The log term spaces the stiff end
  (where a sharp answer contracts with rate 1 / (1 - gamma)) evenly in log width down to about
  0.7 km; the linear term keeps steps in the diffuse start (where modes get their mass).
"""

from __future__ import annotations

import math

import torch

from globeflow.core.sampler_settings import GRIDS
from globeflow.core.schedules import Schedule, time_grid

SMALLEST_WIDTH = 1e-4
"""Smallest remaining noise level 1 - gamma that ``log-width`` resolves: a kernel of this width
has an RMS radius of 1.71e-4 rad ~ 1.1 km on the Earth (street to landmark scale)."""


def published_grid(schedule: Schedule, steps: int) -> torch.Tensor:
    """The authors' grid: gamma(t) at t uniform from 1 to 0, (steps + 1,) float64."""
    return schedule.signal_level(time_grid(steps, dtype=torch.float64)).double()


def quadratic_grid(schedule: Schedule, steps: int) -> torch.Tensor:
    """gamma_k = gamma_0 + (1 - gamma_0)(1 - (1 - k / S)^2), (steps + 1,) float64."""
    start = published_grid(schedule, 1)[0]
    fraction = 1.0 - (1.0 - torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)) ** 2
    return start + (1.0 - start) * fraction


def log_width_grid(schedule: Schedule, steps: int) -> torch.Tensor:
    """Uniform in gamma + log(s_0 / s) / log(1 / SMALLEST_WIDTH) (s = 1 - gamma) for the first
    ``steps - 1`` steps, down to s = SMALLEST_WIDTH, then the step to gamma = 1; (steps + 1,)."""
    start = float(published_grid(schedule, 1)[0])
    if steps == 1:
        return torch.tensor([start, 1.0], dtype=torch.float64)
    s_0, scale = 1.0 - start, math.log(1.0 / SMALLEST_WIDTH)

    def warp(s: torch.Tensor) -> torch.Tensor:
        return (1.0 - s) + torch.log(s_0 / s) / scale

    dense = torch.logspace(math.log10(s_0), math.log10(SMALLEST_WIDTH), 8193, dtype=torch.float64)
    w = warp(dense)
    targets = torch.linspace(float(w[0]), float(w[-1]), steps, dtype=torch.float64)
    idx = torch.searchsorted(w, targets).clamp(1, len(w) - 1)
    lo, hi = w[idx - 1], w[idx]
    frac = ((targets - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
    log_s = torch.lerp(dense[idx - 1].log(), dense[idx].log(), frac)
    levels = 1.0 - log_s.exp()
    levels[0], levels[-1] = start, 1.0 - SMALLEST_WIDTH
    return torch.cat([levels, torch.ones(1, dtype=torch.float64)])


GRID_FUNCTIONS = {
    "published": published_grid,
    "quadratic": quadratic_grid,
    "log-width": log_width_grid,
}


def sampling_grid(name: str, schedule: Schedule, steps: int) -> torch.Tensor:
    """The signal levels (steps + 1,) float64 of grid ``name`` (one of :data:`GRIDS`)."""
    if name not in GRID_FUNCTIONS:
        raise ValueError(f"unknown time grid {name!r}; choose from {GRIDS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return GRID_FUNCTIONS[name](schedule, steps)
