"""A stand-in for the denoising network whose flow and density are known in closed form.

The field v(x) = a (e_z - z x) (the tangent part of a constant pull to the north pole, the same
at every signal level) moves the height z = x_3 by dz/dgamma = a (1 - z^2) and leaves the
longitude alone, so z(gamma) = tanh(a gamma + artanh z(0)). Pushing the uniform density on S^2
from gamma = 0 to 1 gives p(x) = (1 - z0^2) / (4 pi (1 - z^2)) with z0 = tanh(artanh z - a), and
its Riemannian divergence is -2 a z.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Conditioning


class NorthPull(nn.Module):
    """Implements the three methods of Denoiser that GuidedField uses."""

    def __init__(self, strength: float, cond_dim: int = 2):
        super().__init__()
        self.strength = strength
        self.config = {"cond_dim": cond_dim}
        self.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    @property
    def cond_dim(self) -> int:
        return self.config["cond_dim"]

    def condition_grid(self, emb: torch.Tensor, gammas: torch.Tensor) -> Conditioning:
        empty = torch.zeros(len(gammas), emb.shape[0], 1, 0, dtype=emb.dtype)
        return Conditioning(blocks=[], final=empty)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        ez = torch.zeros_like(y)
        ez[..., 2] = 1.0
        return self.strength * (ez - y[..., 2:3] * y)

    def forward_conditioned(self, y, cond, precision="fp32"):
        return self._out(y)

    def forward_with_jvp(self, y, tangents, cond, precision="fp32"):
        # d/dy [a (e_z - z y)] . u = -a (u_z y + z u)
        jvps = -self.strength * (tangents[..., 2:3] * y + y[..., 2:3] * tangents)
        return self._out(y), jvps


def north_pull_model(strength: float = 1.5) -> RiemannianFlowMatching:
    return RiemannianFlowMatching(NorthPull(strength)).double().eval()


def exact_height(z0: torch.Tensor, strength: float, gamma: float = 1.0) -> torch.Tensor:
    """Height after flowing from z0 at gamma = 0 to gamma."""
    return torch.tanh(strength * gamma + torch.atanh(z0))


def exact_log_density(z: torch.Tensor, strength: float) -> torch.Tensor:
    """log p per steradian at height z, at gamma = 1."""
    z0 = torch.tanh(torch.atanh(z) - strength)
    return torch.log1p(-(z0**2)) - math.log(4 * math.pi) - torch.log1p(-(z**2))


def exact_negative_entropy(strength: float, n: int = 200_000) -> float:
    """E_p[log p] in nats, by the change of variables z0 ~ U[-1, 1] (midpoint rule)."""
    z0 = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    z = exact_height(z0, strength)
    return float(exact_log_density(z, strength).mean())


class TwoPoles(NorthPull):
    """A pull to the nearer pole, of strength ``north`` around the north pole and ``south``
    around the south one, split at height ``split``: v = c(z) (e_z - z x), c(z) = (north +
    south) / 2 tanh((z - split) / 0.01) + (north - south) / 2 (the same at every level). Its
    divergence near a pole is about -2 c, so two strengths give two stiffness floors: a stiff
    field whose floors differ between the samples of one image, cheap to evaluate."""

    def __init__(self, north: float, south: float, split: float):
        super().__init__(0.0)
        self.north, self.south, self.split = north, south, split

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        z = y[..., 2:3]
        c = (self.north + self.south) / 2 * torch.tanh((z - self.split) / 0.01)
        ez = torch.zeros_like(y)
        ez[..., 2] = 1.0
        return (c + (self.north - self.south) / 2) * (ez - z * y)

    def forward_with_jvp(self, y, tangents, cond, precision="fp32"):
        jvps = torch.stack([torch.func.jvp(self._out, (y,), (t,))[1] for t in tangents])
        return self._out(y), jvps


def two_poles_model(north: float, south: float, split: float) -> RiemannianFlowMatching:
    return RiemannianFlowMatching(TwoPoles(north, south, split)).double().eval()
