"""The von Mises-Fisher distribution on S^2: density, mean resultant, concentration fit, sampler.

The vMF density with mean mu and concentration kappa is

    p(x) = kappa / (2 pi (1 - exp(-2 kappa))) * exp(kappa (mu.x - 1)),

the textbook kappa / (4 pi sinh kappa) exp(kappa mu.x) rewritten so that it neither overflows
for huge kappa nor loses precision for tiny kappa. Shared by the vMF baselines
(:mod:`globeflow.core.families.baselines`), fusion's kernels (:mod:`globeflow.core.fusion`), the
decoder and the synthetic testbeds.
"""

from __future__ import annotations

import math

import torch

from globeflow.core.sphere import project_to_sphere, tangent_basis

KAPPA_MIN = 1e-6
KAPPA_MAX = 1e7
"""Upper bound on concentrations: 1/sqrt(kappa) = 3e-4 rad, about 2 km on Earth."""

_LOG_2PI = math.log(2.0 * math.pi)


def vmf_log_normalizer(kappa: torch.Tensor) -> torch.Tensor:
    """log C(kappa), p(x) = C exp(kappa (mu.x - 1)) on S^2: log k - log 2pi - log(1 - e^-2k).

    kappa (...) -> (...), natural log per steradian.
    """
    return torch.log(kappa) - _LOG_2PI - torch.log(-torch.expm1(-2.0 * kappa))


def vmf_log_density(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """log vMF(x; mu, kappa) per steradian: x, mu (..., 3) unit vectors, kappa (...) -> (...)."""
    cos_minus_one = (x * mu).sum(-1) - 1.0
    return vmf_log_normalizer(kappa) + kappa * cos_minus_one


def vmf_mean_resultant(kappa: torch.Tensor) -> torch.Tensor:
    """A(kappa) = E[mu.x] = coth(kappa) - 1/kappa on S^2 (series for small kappa)."""
    kappa = torch.as_tensor(kappa)
    small = kappa < 1e-3
    safe = torch.where(small, torch.ones_like(kappa), kappa)
    # coth k - 1/k = (1 + e^-2k)/(1 - e^-2k) - 1/k, stable for large k.
    big = (1.0 + torch.exp(-2.0 * safe)) / (-torch.expm1(-2.0 * safe)) - 1.0 / safe
    return torch.where(small, kappa / 3.0 - kappa**3 / 45.0, big)


def vmf_kappa_from_resultant(rbar: torch.Tensor, kappa_max: float = KAPPA_MAX) -> torch.Tensor:
    """Solve A(kappa) = rbar exactly (Newton on S^2's A = coth k - 1/k), rbar in [0, 1).

    Starts from Banerjee et al. (2005)'s approximation rbar (3 - rbar^2) / (1 - rbar^2).
    For kappa > 30, A(kappa) = 1 - 1/kappa to within e^-60, so kappa = 1 / (1 - rbar) exactly.
    """
    rbar = rbar.to(torch.float64).clamp(0.0, 1.0 - 1e-15)
    one_minus = 1.0 - rbar
    kappa = (rbar * (3.0 - rbar**2) / (one_minus * (1.0 + rbar))).clamp(KAPPA_MIN, kappa_max)
    for _ in range(30):
        a = vmf_mean_resultant(kappa)
        sinh = torch.sinh(kappa.clamp(max=300.0))
        da = torch.where(kappa < 1e-3, 1.0 / 3.0 - kappa**2 / 15.0, 1.0 / kappa**2 - 1.0 / sinh**2)
        step = (a - rbar) / da.clamp_min(1e-300)
        kappa = (kappa - step).clamp(0.5 * kappa, 2.0 * kappa).clamp(KAPPA_MIN, kappa_max)
    large = 1.0 / one_minus
    return torch.where(large > 30.0, large, kappa).clamp(KAPPA_MIN, kappa_max)


def sample_vmf(
    mu: torch.Tensor, kappa: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exact vMF samples on S^2, one per (mu, kappa): mu (..., 3), kappa (...) -> (..., 3).

    Inverse CDF of w = mu.x: w = 1 + log(u + (1 - u) e^-2k) / k, written as
    1 + log1p((1 - u) expm1(-2k)) / k, which tends to the uniform 2u - 1 as k -> 0 and stays
    finite for huge k; then a uniform angle around mu.
    """
    dtype = mu.dtype
    mu = mu.to(torch.float64)
    kappa = kappa.to(torch.float64)
    shape = kappa.shape
    u = 1.0 - torch.rand(shape, generator=generator, dtype=torch.float64, device=mu.device)
    phi = torch.rand(shape, generator=generator, dtype=torch.float64, device=mu.device)
    phi = 2 * math.pi * phi
    one_minus_w = (-torch.log1p((1.0 - u) * torch.expm1(-2.0 * kappa)) / kappa).clamp(0.0, 2.0)
    w = 1.0 - one_minus_w
    radial = torch.sqrt((one_minus_w * (2.0 - one_minus_w)).clamp_min(0.0))
    mu = project_to_sphere(mu)
    e1, e2 = tangent_basis(mu)
    x = w[..., None] * mu + radial[..., None] * (
        torch.cos(phi)[..., None] * e1 + torch.sin(phi)[..., None] * e2
    )
    return project_to_sphere(x).to(dtype)
