"""Geometry of the unit sphere S^2 embedded in R^3.

Conventions: latitude and longitude are in degrees, always in (lat, lon) order;
unit vectors are ``x = cos(lat) cos(lon), y = cos(lat) sin(lon), z = sin(lat)``.
Tensors carry points in their last dimension (``(..., 3)`` or ``(..., 2)``).
"""

from __future__ import annotations

import math

import torch

EARTH_RADIUS_KM = 6371.0
SPHERE_AREA_SR = 4.0 * math.pi
"""Total solid angle of S^2 in steradians."""
KM2_PER_SR = EARTH_RADIUS_KM**2
"""Square kilometres on Earth per steradian of solid angle."""
LOG_UNIFORM_DENSITY = -math.log(SPHERE_AREA_SR)
"""log of the uniform density on S^2, per steradian."""


def latlon_to_unit(latlon: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees (lat, lon) -> (..., 3) unit vectors."""
    lat, lon = torch.deg2rad(latlon[..., 0]), torch.deg2rad(latlon[..., 1])
    cos_lat = torch.cos(lat)
    return torch.stack([cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)], -1)


def unit_to_latlon(xyz: torch.Tensor) -> torch.Tensor:
    """(..., 3) vectors (normalised first) -> (..., 2) degrees; lat in [-90, 90],
    lon in (-180, 180]."""
    xyz = project_to_sphere(xyz)
    lat = torch.asin(xyz[..., 2].clamp(-1.0, 1.0))
    lon = torch.atan2(xyz[..., 1], xyz[..., 0])
    return torch.rad2deg(torch.stack([lat, lon], -1))


def project_to_sphere(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Radial projection of (..., 3) vectors onto S^2 (the zero vector maps to the north pole;
    vectors holding NaN or inf, or so large that their norm overflows, give NaN, so that callers
    can tell them from an answer)."""
    norm = x.norm(dim=-1, keepdim=True)
    # An overflowed norm would scale finite vectors to zero, and zero means the north pole.
    norm = norm.masked_fill(norm.isinf(), math.nan)
    north = torch.zeros_like(x)
    north[..., 2] = 1.0
    return torch.where(norm <= eps, north, x / norm.clamp_min(eps))


def project_to_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ambient vectors v (..., 3) onto the tangent space at x (..., 3)."""
    return v - (x * v).sum(-1, keepdim=True) * x


def angle_between(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Great-circle angle (radians) between unit vectors (..., 3); stable near 0 and pi."""
    cross = torch.linalg.cross(x, y, dim=-1).norm(dim=-1)
    dot = (x * y).sum(-1)
    return torch.atan2(cross, dot)


def haversine_km(latlon_a: torch.Tensor, latlon_b: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km between (..., 2) degree coordinates (broadcasting)."""
    lat1, lon1 = torch.deg2rad(latlon_a[..., 0]), torch.deg2rad(latlon_a[..., 1])
    lat2, lon2 = torch.deg2rad(latlon_b[..., 0]), torch.deg2rad(latlon_b[..., 1])
    h = (
        torch.sin((lat2 - lat1) / 2) ** 2
        + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(h.clamp(0.0, 1.0)))


def exp_map(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exponential map at x (..., 3) of tangent vectors v (..., 3): walk |v| radians along v."""
    norm = v.norm(dim=-1, keepdim=True)
    # sin(n)/n is 1 - n^2/6 near 0; the where keeps gradients finite at n = 0.
    safe = norm.clamp_min(1e-12)
    sinc = torch.where(norm > 1e-6, torch.sin(safe) / safe, 1.0 - norm**2 / 6.0)
    return project_to_sphere(torch.cos(norm) * x + sinc * v)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate points x (..., 3) by rotation vectors (..., 3): about the axis rotation / |rotation|
    by |rotation| radians (Rodrigues' formula). For a tangent v at unit x, rotate(x, x cross v)
    equals exp_map(x, v); a rotation vector is also valid at points other than the one it was
    computed at, which is what the Lie-group ODE solvers of :mod:`globeflow.core.solvers` use."""
    angle = rotation.norm(dim=-1, keepdim=True)
    safe = angle.clamp_min(1e-12)
    # sin(a)/a and (1 - cos(a))/a^2 with their series near 0.
    small = angle < 1e-4
    sinc = torch.where(small, 1.0 - angle**2 / 6.0, torch.sin(safe) / safe)
    cosc = torch.where(small, 0.5 - angle**2 / 24.0, (1.0 - torch.cos(safe)) / safe**2)
    cross = torch.linalg.cross(rotation, x, dim=-1)
    along = (rotation * x).sum(-1, keepdim=True) * rotation
    return project_to_sphere(x + sinc * cross + cosc * (along - angle**2 * x))


def log_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logarithmic map at x of y, both (..., 3) unit vectors: the tangent vector at x pointing to y
    with length the geodesic distance (radians). Undefined (returns an arbitrary finite vector of
    length pi) for antipodal points."""
    direction = project_to_tangent(x, y - x)
    norm = direction.norm(dim=-1, keepdim=True)
    angle = angle_between(x, y).unsqueeze(-1)
    unit = direction / norm.clamp_min(1e-12)
    return torch.where(norm > 1e-12, angle * unit, torch.zeros_like(direction))


def geodesic(x: torch.Tensor, y: torch.Tensor, fraction: torch.Tensor | float) -> torch.Tensor:
    """Point a fraction (..., 1 or scalar, 0 -> x, 1 -> y) of the way along the geodesic x -> y."""
    return exp_map(x, fraction * log_map(x, y))


def tangent_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (e1, e2), each (..., 3), of the tangent plane at unit x (..., 3)."""
    # Cross with whichever axis is least aligned with x: always well conditioned.
    axis = torch.zeros_like(x)
    idx = x.abs().argmin(dim=-1, keepdim=True)
    axis.scatter_(-1, idx, 1.0)
    e1 = torch.linalg.cross(x, axis, dim=-1)
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    e2 = torch.linalg.cross(x, e1, dim=-1)
    return e1, e2


def sample_uniform_sphere(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform samples on S^2 of shape (*shape, 3) (normalised Gaussians)."""
    g = torch.randn(*shape, 3, generator=generator, device=device, dtype=dtype)
    return project_to_sphere(g)


def sobol_sphere(
    count: int,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The first ``count`` points of a scrambled two-dimensional Sobol sequence on S^2, (count, 3).

    The map (u, v) -> (z = 1 - 2u, phi = 2 pi v) preserves area, so each point is uniform on
    the sphere (the scramble, seeded by ``seed``, randomizes every digit), while together they
    cover it more evenly than independent points: a randomized quasi-Monte Carlo design. A mean
    over the points of a function that is smooth on the sphere has far less variance than
    1 / count of the function's.
    """
    engine = torch.quasirandom.SobolEngine(2, scramble=True, seed=int(seed))
    u = engine.draw(count, dtype=torch.float64)
    z = 1.0 - 2.0 * u[:, 0]
    phi = 2.0 * math.pi * u[:, 1]
    r = (1.0 - z * z).clamp_min(0.0).sqrt()
    points = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)
    return points.to(device=device, dtype=dtype)


def area_element(lat_deg: torch.Tensor) -> torch.Tensor:
    """Solid angle per square radian of (lat, lon) at latitude lat (degrees): cos(lat).

    Integrating a density per steradian over a lat/lon grid: sum p * cos(lat) * dlat * dlon
    with dlat, dlon in radians.
    """
    return torch.cos(torch.deg2rad(lat_deg))


def latlon_grid(
    n_lat: int, n_lon: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centred lat/lon grid for quadrature over the sphere.

    Returns (latlon (n_lat*n_lon, 2) degrees, weights (n_lat*n_lon,) steradians); weights are the
    exact solid angles of the cells and sum to 4 pi.
    """
    lat_edges = torch.linspace(-90.0, 90.0, n_lat + 1, dtype=dtype)
    lon_edges = torch.linspace(-180.0, 180.0, n_lon + 1, dtype=dtype)
    lat_c = (lat_edges[1:] + lat_edges[:-1]) / 2
    lon_c = (lon_edges[1:] + lon_edges[:-1]) / 2
    band = torch.sin(torch.deg2rad(lat_edges[1:])) - torch.sin(torch.deg2rad(lat_edges[:-1]))
    dlon = torch.deg2rad(lon_edges[1:] - lon_edges[:-1])
    weights = band[:, None] * dlon[None, :]
    lat, lon = torch.meshgrid(lat_c, lon_c, indexing="ij")
    return torch.stack([lat.reshape(-1), lon.reshape(-1)], -1), weights.reshape(-1)


def steradians_to_km2(sr: torch.Tensor | float) -> torch.Tensor | float:
    """Convert solid angle (steradians) to area on Earth (km^2)."""
    return sr * KM2_PER_SR
