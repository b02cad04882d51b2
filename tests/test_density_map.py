"""The adaptive exact-density map: exact where it matters, interpolated within tolerance."""

from __future__ import annotations

import math

import torch
from _analytic_field import exact_log_density

from globeflow.answers.density_map import adaptive_log_density_grid, grid_axes
from globeflow.core.sphere import latlon_to_unit, unit_to_latlon

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


def _sharp_three_city_target(rms_km: float):
    from globeflow.core.exact_field import MixtureTarget, kernel_width_for_rms_km

    atoms = torch.tensor([[48.85, 2.35], [-1.29, 36.82], [35.68, 139.65]], dtype=f64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=f64)
    return MixtureTarget.from_latlon(atoms, weights, kernel_width_for_rms_km(rms_km))


def test_zoom_patches_resolve_sharp_peaks_and_keep_the_mass():
    """Three 2-km peaks (closed-form density) on a 1-degree map: the global grid alone misses
    them (its mass is far from 1); the zoom patches started from samples reach <= 1 km cells,
    find each peak's maximum and bring the total mass within 1% of 1."""
    from globeflow.answers.density_map import _mass, refine_peaks
    from globeflow.core.exact_field import mixture_log_density, sample_mixture

    target = _sharp_three_city_target(2.0)

    def log_density(x):  # a 1e-9 uniform floor: the kernels have compact support (-inf)
        sharp = mixture_log_density(
            x[None], target.atoms[None], target.weights.log()[None], torch.tensor([target.width])
        )[0]
        return torch.logaddexp(sharp, torch.full_like(sharp, math.log(1e-9 / (4 * math.pi))))

    g = torch.Generator().manual_seed(0)
    samples = unit_to_latlon(sample_mixture(target.atoms, target.weights, target.width, 200, g))
    grid = adaptive_log_density_grid(log_density, 1.0, 0.1, sample_latlon=samples)
    out = refine_peaks(log_density, grid, 1.0, samples)
    coarse_mass = float(_mass(out["log_density"], out["lat"], 1.0).sum())
    assert abs(coarse_mass - 1) > 0.3  # the 1-degree grid alone cannot integrate 2-km peaks
    assert out["finest_cell_km"] <= 1.0
    assert abs(out["mass"] - 1.0) < 0.01
    # Each peak's maximum (at its atom) is found to within the kernel's curvature over a cell.
    peak = log_density(target.atoms)
    finest = [p for p in out["patches"] if p["cell_km"] <= 1.0]
    assert len(finest) == 3
    found = sorted(float(p["log_density"].max()) for p in finest)
    assert max(abs(a - b) for a, b in zip(found, sorted(peak.tolist()))) < 0.1


def test_model_density_map_without_samples_resolves_a_sharp_peak():
    """The README call (no samples): samples are drawn inside, so a 2-km peak (exact RFM field,
    its likelihood ODE) is found to <= 1 km cells, at its closed-form height. (Its mass is not
    checked here: outside the kernel's compact support the exact field's ODE values are not a
    density; the mass is checked on a closed form above.)"""
    from globeflow.answers.density_map import model_log_density_map
    from globeflow.core.exact_field import (
        MixtureTarget,
        exact_rfm_model,
        kernel_width_for_rms_km,
    )

    atom = torch.tensor([[35.68, 139.65]], dtype=f64)
    target = MixtureTarget.from_latlon(atom, width=kernel_width_for_rms_km(2.0))
    model = exact_rfm_model([target])
    emb = torch.ones(1, 1, dtype=f64)
    # A 6-degree grid solved in one pass and 8 bulk steps keep the exact field's cost low.
    out = model_log_density_map(model, emb, 6.0, steps=8, precision="fp32", coarse_stride=1)
    peak = model.network.target_log_density(target.atoms[None], torch.tensor([0]))
    assert out["finest_cell_km"] <= 1.0
    finest = max(out["patches"], key=lambda p: -p["cell_km"])
    assert abs(float(finest["log_density"].max()) - float(peak)) < 0.1
