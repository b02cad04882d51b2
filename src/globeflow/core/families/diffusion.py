"""Diffusion in R^3 (paper section 3.1): x_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps.

The network predicts eps (DDPM loss); sampling uses DDIM with the predicted x0 clamped to
[-1, 1] (and the noise re-derived from the clamped x0), and the result is projected onto
S^2. Likelihoods use the probability-flow ODE.
"""

from __future__ import annotations

import torch

from globeflow.core.families.base import DenoisingModel
from globeflow.core.families.flow import gaussian_log_prob
from globeflow.core.sphere import project_to_sphere


class Diffusion(DenoisingModel):
    """DDPM/DDIM in R^3 (``PLONK_*_diffusion`` checkpoints)."""

    family = "diffusion"
    density_space = "euclidean"
    published_solver = "ddim"
    default_solver = "ddim"
    # Only the published DDIM step: the eps-parameterised probability-flow velocity is singular
    # at the noise end (gamma = 0), where every ODE solver starts.
    runs_ode_solvers = False
    likelihood_end_level = 1e-5
    """The ODE is singular at gamma = 0; the likelihood integrates it down to this signal level
    and scores it there under the standard normal (the marginal is N(sqrt(gamma) x0,
    (1 - gamma) I))."""
    likelihood_spacing = "mixed-log"

    def noising_path(self, x0, eps, gamma):
        g = gamma[:, None]
        return g.sqrt() * x0 + (1 - g).sqrt() * eps, eps

    def initial_noise(self, batch, num_samples, generator, like):
        return torch.randn(
            (batch, num_samples, 3), generator=generator, device=like.device, dtype=like.dtype
        )

    def velocity_from_output(self, x, out, gamma):
        # x = sqrt(g) x0 + sqrt(1-g) eps  =>  dx/dg = x0 / (2 sqrt g) - eps / (2 sqrt(1-g)),
        # with x0 = (x - sqrt(1-g) eps) / sqrt(g).
        s1 = (1 - gamma).clamp_min(1e-12).sqrt()
        return (x - s1 * out) / (2 * gamma) - out / (2 * s1)

    def divergence_from_output(self, x, out, trace, gamma):
        # v = (x - s1 eps)/(2g) - eps/(2 s1): div v = 3/(2g) - (s1/(2g) + 1/(2 s1)) tr(J_eps)
        s1 = (1 - gamma).clamp_min(1e-12).sqrt()
        return 3.0 / (2 * gamma) - (s1 / (2 * gamma) + 1 / (2 * s1)) * trace

    def sampler_step(self, x, out, gamma_now, gamma_next):
        s_now, n_now = gamma_now.sqrt(), (1 - gamma_now).sqrt()
        x0 = ((x - n_now * out) / s_now).clamp(-1.0, 1.0)
        # The noise is re-derived from the clamped x0, as the published sampler does.
        eps = (x - s_now * x0) / n_now.clamp_min(1e-12)
        return gamma_next.sqrt() * x0 + (1 - gamma_next).sqrt() * eps

    def finalize(self, x):
        return project_to_sphere(x)

    def base_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(x)
