"""The adaptive exact-density map: exact where it matters, interpolated within tolerance."""

from __future__ import annotations

import math

import torch
from _analytic_field import exact_log_density

from globeflow.answers.density_map import adaptive_log_density_grid, grid_axes
from globeflow.core.sphere import latlon_to_unit

f64 = torch.float64


def _full(log_density, resolution):
    lat, lon = grid_axes(resolution)
    grid = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1)
    return log_density(latlon_to_unit(grid.reshape(-1, 2))).reshape(len(lat), len(lon))


def north_pull(x):
    return exact_log_density(x[..., 2], 1.5)


def vmf(centre_latlon, kappa):
    mu = latlon_to_unit(torch.tensor(centre_latlon, dtype=f64))
    log_norm = math.log(kappa / (2 * math.pi * (1 - math.exp(-2 * kappa))))

    def log_density(x):
        return kappa * ((x @ mu) - 1) + log_norm

    return log_density


def test_smooth_density_within_tolerance_with_few_evaluations():
    out = adaptive_log_density_grid(north_pull, resolution_deg=2.0, tolerance=0.02)
    full = _full(north_pull, 2.0)
    assert out["log_density"].shape == full.shape == (90, 180)
    assert (out["log_density"][out["exact"]] == full[out["exact"]]).all()
    assert (out["log_density"] - full).abs().max() < 2 * 0.02
    assert out["evaluations"] == int(out["exact"].sum()) < 0.5 * full.numel()


def test_zero_tolerance_computes_every_node():
    out = adaptive_log_density_grid(north_pull, 4.0, tolerance=0.0, floor=math.inf)
    assert out["exact"].all()
    torch.testing.assert_close(out["log_density"], _full(north_pull, 4.0))


def test_a_narrow_peak_between_coarse_nodes_is_found_through_the_samples():
    # kappa 1e5: 0.18 degrees wide, 2 degrees from the nearest nodes of the first, global
    # refinement (4-degree spacing), where it is 61 nats below its maximum.
    # On a uniform background holding 90% of the mass, it is invisible from those nodes.
    centre = [12.5, 36.5]
    narrow = vmf(centre, 1e5)

    def peak(x):
        background = torch.full(x.shape[:-1], math.log(0.9 / (4 * math.pi)), dtype=f64)
        return torch.logaddexp(background, math.log(0.1) + narrow(x))

    full = _full(peak, 1.0)
    blind = adaptive_log_density_grid(peak, 1.0, tolerance=0.1)
    samples = torch.tensor([centre, [12.6, 36.4], [12.4, 36.55]], dtype=f64)
    seen = adaptive_log_density_grid(peak, 1.0, tolerance=0.1, sample_latlon=samples)
    i, j = divmod(int(full.argmax()), full.shape[1])
    assert seen["exact"][i, j] and seen["log_density"][i, j] == full[i, j]
    # Around the peak the map is exact; elsewhere it never overstates the density by much.
    window = (slice(i - 2, i + 3), slice(j - 2, j + 3))
    assert seen["exact"][window].all()
    assert seen["evaluations"] < 0.5 * full.numel()
    assert blind["log_density"].max() < full.max() - 5  # without samples it misses the peak
