"""Riemannian flow matching on S^2 (paper section 3.2).

Noise is uniform on S^2; x_t lies on the geodesic from the data point x0 (gamma = 1) to the noise
point eps (gamma = 0); the network predicts the velocity d x_t / d gamma, a tangent vector at x_t.
"""

from __future__ import annotations

import torch

from globeflow.core.families.base import DenoisingModel
from globeflow.core.solvers import SPHERE
from globeflow.core.sphere import (
    LOG_UNIFORM_DENSITY,
    angle_between,
    project_to_sphere,
    project_to_tangent,
    sample_uniform_sphere,
)


def geodesic_point_and_velocity(
    x0: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point x_gamma on the geodesic eps -> x0 and its velocity d x / d gamma.

    x0, eps: (..., 3) unit vectors; gamma: (...,) signal level. With d the angle between x0 and
    eps, u the unit tangent at x0 towards eps and theta = (1 - gamma) d:
    x = cos(theta) x0 + sin(theta) u and dx/dgamma = d (sin(theta) x0 - cos(theta) u).
    Written this way (rather than via log maps at x_t) it is stable at both ends of the path.
    """
    d = angle_between(x0, eps)[..., None]
    direction = project_to_tangent(x0, eps)
    u = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    theta = (1.0 - gamma)[..., None] * d
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    x = project_to_sphere(cos_t * x0 + sin_t * u)
    velocity = d * (sin_t * x0 - cos_t * u)
    return x, velocity


class RiemannianFlowMatching(DenoisingModel):
    """RFM on S^2. The published ``PLONK_*`` checkpoints are of this family."""

    family = "rfm"
    density_space = "sphere"
    geometry = SPHERE

    def training_noise(self, x0, generator):
        return sample_uniform_sphere(
            (x0.shape[0],), generator=generator, device=x0.device, dtype=x0.dtype
        )

    def noising_path(self, x0, eps, gamma):
        # The loss is the ambient squared error = tangent-metric error + the normal component of
        # the output, which keeps the raw output tangent (the published Euler step uses it
        # unprojected).
        return geodesic_point_and_velocity(x0, eps, gamma)

    def initial_noise(self, batch, num_samples, generator, like):
        return sample_uniform_sphere(
            (batch, num_samples), generator=generator, device=like.device, dtype=like.dtype
        )

    def velocity_from_output(self, x, out, gamma):
        return project_to_tangent(x, out)

    def sampler_step(self, x, out, gamma_now, gamma_next):
        return project_to_sphere(x + (gamma_next - gamma_now) * out)

    def finalize(self, x):
        return project_to_sphere(x)

    def base_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform density on S^2 per steradian, (...,)."""
        return torch.full(x.shape[:-1], LOG_UNIFORM_DENSITY, dtype=x.dtype, device=x.device)
