"""Flow matching in R^3 (paper section 3.2): x_t = gamma x0 + (1 - gamma) eps, eps ~ N(0, I).

The network predicts the velocity d x_t / d gamma = x0 - eps; samples are projected onto S^2 at
the end.
"""

from __future__ import annotations

import math

import torch

from globeflow.core.families.base import DenoisingModel
from globeflow.core.sphere import project_to_sphere


def gaussian_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Standard normal log density in R^3 at x (..., 3) -> (...,)."""
    return -0.5 * (x**2).sum(-1) - 1.5 * math.log(2 * math.pi)


class FlowMatching(DenoisingModel):
    """Flow matching in R^3 (``PLONK_*_flow`` checkpoints)."""

    family = "flow"
    density_space = "euclidean"

    def noising_path(self, x0, eps, gamma):
        g = gamma[:, None]
        return g * x0 + (1 - g) * eps, x0 - eps

    def initial_noise(self, batch, num_samples, generator, like):
        return torch.randn(
            (batch, num_samples, 3), generator=generator, device=like.device, dtype=like.dtype
        )

    def velocity_from_output(self, x, out, gamma):
        return out

    def sampler_step(self, x, out, gamma_now, gamma_next):
        return x + (gamma_next - gamma_now) * out

    def finalize(self, x):
        return project_to_sphere(x)

    def base_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(x)
