"""Noise schedules: the signal level gamma(t) and its time derivative.

Time runs from t = 0 (data) to t = 1 (pure noise). The *signal level* gamma(t) is 1 at data and
0 at noise; the paper's noise level is kappa(t) = 1 - gamma(t). The published PLONK networks take
gamma as their time input, so every generative family here is written in terms of gamma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GAMMA_MIN = 1e-9
"""Clamp of the signal level, as in the published checkpoints (avoids 0/0 in DDIM at t = 1)."""


class Schedule:
    """Base class: subclasses give ``signal_level(t)`` and ``signal_level_derivative(t)``."""

    name: str = "schedule"

    def signal_level(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t) in [GAMMA_MIN, 1], same shape as t."""
        raise NotImplementedError

    def signal_level_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """d gamma / d t (non-positive), same shape as t."""
        raise NotImplementedError

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """kappa(t) = 1 - gamma(t), the paper's notation."""
        return 1.0 - self.signal_level(t)

    def to_config(self) -> dict:
        return {"name": self.name}


@dataclass
class SigmoidSchedule(Schedule):
    """The paper's skewed sigmoid schedule (section 3.4), with alpha = -3, beta = 7 by default.

    In the published code's form (start = -beta, end = -alpha):
    ``gamma(t) = (s(end) - s(start + t (end - start))) / (s(end) - s(start))`` with ``s`` the
    sigmoid of its argument divided by ``tau``. This equals the paper's kappa with the time axis
    reversed, ``gamma(t) = kappa_paper(1 - t)``, and reproduces the published checkpoints.
    """

    alpha: float = -3.0
    beta: float = 7.0
    tau: float = 1.0
    name: str = "sigmoid"

    @property
    def start(self) -> float:
        return -self.beta

    @property
    def end(self) -> float:
        return -self.alpha

    def _sig(self, x: torch.Tensor | float) -> torch.Tensor:
        return torch.sigmoid(torch.as_tensor(x, dtype=torch.float64) / self.tau)

    def signal_level(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        s_start, s_end = self._sig(self.start), self._sig(self.end)
        x = self.start + t.to(torch.float64) * (self.end - self.start)
        gamma = (s_end - self._sig(x)) / (s_end - s_start)
        return gamma.clamp(GAMMA_MIN, 1.0).to(_float_dtype(t))

    def signal_level_derivative(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        s_start, s_end = self._sig(self.start), self._sig(self.end)
        s = self._sig(self.start + t.to(torch.float64) * (self.end - self.start))
        d = -s * (1 - s) * (self.end - self.start) / self.tau / (s_end - s_start)
        return d.to(_float_dtype(t))

    def to_config(self) -> dict:
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta, "tau": self.tau}


@dataclass
class LinearSchedule(Schedule):
    """gamma(t) = 1 - t."""

    name: str = "linear"

    def signal_level(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return (1.0 - t).clamp(GAMMA_MIN, 1.0).to(_float_dtype(t))

    def signal_level_derivative(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return torch.full_like(t, -1.0, dtype=_float_dtype(t))


@dataclass
class CosineSchedule(Schedule):
    """gamma(t) = cos^2(pi t / 2) (Nichol & Dhariwal's cosine schedule without offset)."""

    name: str = "cosine"

    def signal_level(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return (torch.cos(t * math.pi / 2) ** 2).clamp(GAMMA_MIN, 1.0).to(_float_dtype(t))

    def signal_level_derivative(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return (-math.pi / 2 * torch.sin(t * math.pi)).to(_float_dtype(t))


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


SCHEDULES = {"sigmoid": SigmoidSchedule, "linear": LinearSchedule, "cosine": CosineSchedule}


def schedule_from_config(config: dict | None) -> Schedule:
    """Build a schedule from ``{"name": ..., **params}``; None gives the published default."""
    if not config:
        return SigmoidSchedule()
    params = dict(config)
    name = params.pop("name", "sigmoid")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[name](**params)


def time_grid(num_steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform time grid from t = 1 (noise) to t = 0 (data): (num_steps + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
