"""Answers at their own scale: the map window, the OpenStreetMap zoom, names of street-sized and
remote regions, and distances and areas from metres to the globe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_regions import PARIS, _mixture

from globeflow.answers.geocode import format_km, region_label, reverse_geocode
from globeflow.answers.maps import draw_map
from globeflow.answers.zoom import (
    CREDIBLE_MASS,
    KM_PER_DEG,
    MIN_EXTENT_KM,
    PAD,
    answer_extent,
    credible_extent,
    osm_url,
    osm_zoom,
)
from globeflow.apps.cli.predict_output import _area_km2
from globeflow.core.sphere import EARTH_RADIUS_KM

Z975 = 1.959964  # the standard normal's 97.5% quantile
EARTH_KM2 = 4 * math.pi * EARTH_RADIUS_KM**2


def _inside(samples: torch.Tensor, extent) -> torch.Tensor:
    lat0, lat1, lon0, lon1 = extent
    lon = (samples[:, 1].double() - lon0) % 360.0 + lon0
    return (samples[:, 0] >= lat0) & (samples[:, 0] <= lat1) & (lon <= lon1)


def test_the_window_of_a_1_km_answer_is_a_few_km_and_true_to_scale():
    n, sigma = 1024, 1.0
    samples = _mixture([(PARIS, sigma, 1.0)], n, seed=0)
    extent = credible_extent(samples)
    lat0, lat1, lon0, lon1 = extent
    height_km = (lat1 - lat0) * KM_PER_DEG
    # the central 95% of a normal spans 2 * 1.96 sigma, padded on both sides; each end is a
    # sample quantile with standard error sqrt(p (1 - p) / n) / phi(z) sigma
    end_se = math.sqrt(0.025 * 0.975 / n) / (math.exp(-(Z975**2) / 2) / math.sqrt(2 * math.pi))
    expected = 2 * Z975 * sigma * (1 + 2 * PAD)
    assert height_km == pytest.approx(expected, abs=4 * math.sqrt(2) * end_se * (1 + 2 * PAD))
    # 2:1 in km at the middle latitude, like the map it is drawn on
    mid = math.radians((lat0 + lat1) / 2)
    assert (lon1 - lon0) * math.cos(mid) / (lat1 - lat0) == pytest.approx(2.0)
    assert _inside(samples, extent).float().mean() >= CREDIBLE_MASS**2


def test_a_100_m_answer_gets_the_smallest_window():
    extent = credible_extent(_mixture([(PARIS, 0.1, 1.0)], 512, seed=1))
    assert (extent[1] - extent[0]) * KM_PER_DEG == pytest.approx(MIN_EXTENT_KM)


def test_a_window_across_the_antimeridian_stays_small():
    samples = _mixture([((-16.5, 179.9), 20.0, 0.5), ((-16.6, -179.8), 20.0, 0.5)], 512, seed=2)
    lat0, lat1, lon0, lon1 = credible_extent(samples)
    assert lon0 < 180.0 < lon1 and lon1 - lon0 < 5.0
    assert _inside(samples, (lat0, lat1, lon0, lon1)).float().mean() >= CREDIBLE_MASS**2


def test_a_diffuse_answer_shows_the_world_and_main_regions_stay_in_view():
    g = torch.Generator().manual_seed(0)
    xyz = torch.nn.functional.normalize(torch.randn(512, 3, generator=g), dim=-1)
    diffuse = torch.stack(
        [torch.rad2deg(torch.asin(xyz[:, 2])), torch.rad2deg(torch.atan2(xyz[:, 1], xyz[:, 0]))], -1
    )
    assert credible_extent(diffuse) is None
    samples = _mixture([(PARIS, 1.0, 1.0)], 512, seed=3)
    far = {"lat": 48.0, "lon": 3.5, "probability": 0.2}  # ~90 km away
    rare = {"lat": 40.0, "lon": -3.0, "probability": 0.01}
    extent = answer_extent(samples, None, [far, rare])
    assert _inside(torch.tensor([[48.0, 3.5]]), extent).all()
    assert not _inside(torch.tensor([[40.0, -3.0]]), extent).any()


def test_osm_zoom_fits_the_radius():
    assert osm_zoom(0.1, 48.85) == 18 and osm_zoom(1.0, 48.85) == 14
    assert osm_zoom(25.0, 48.85) == 10 and osm_zoom(3000.0, 0.0) == 3
    assert osm_zoom(20_000.0, 0.0) == 1
    zooms = [osm_zoom(r, 30.0) for r in (0.2, 1, 5, 25, 200, 2000)]
    assert zooms == sorted(zooms, reverse=True)
    url = osm_url(48.85837, 2.29448, 0.3)
    assert (
        url == "https://www.openstreetmap.org/?mlat=48.85837&mlon=2.29448#map=16/48.85837/2.29448"
    )


@pytest.mark.parametrize(
    ("km", "text"),
    [(0.0123, "12 m"), (0.35, "350 m"), (1.234, "1.2 km"), (12.4, "12 km"), (1020.3, "1,020 km")],
)
def test_distances_from_metres_to_thousands_of_km(km, text):
    assert format_km(km) == text


@pytest.mark.parametrize(
    ("bits", "text"),
    [(0.0, "510M km²"), (7.0, "4M km²"), (20.0, "490 km²"), (25.0, "15 km²"), (28.0, "1.9 km²"),
     (30.0, "480,000 m²"), (40.0, "460 m²")],
)  # fmt: skip
def test_areas_up_to_40_bits_over_uniform(bits, text):
    assert _area_km2(EARTH_KM2 * 2.0**-bits) == text


def test_regions_are_named_at_street_scale_and_far_from_towns():
    yvoir, paris, southern_ocean = reverse_geocode(
        [[50.363, 4.914], [48.8566, 2.3522], [-50.0, 147.0]]
    )
    assert yvoir.city == "Yvoir" and yvoir.distance_km == pytest.approx(4.57, abs=0.01)
    # the town 4.6 km away is outside a 300 m region: the label says where from the town
    assert region_label(yvoir, 0.3) == "4.6 km NE of Yvoir, Wallonia, Belgium"
    assert region_label(yvoir, 10.0) == "Yvoir, Wallonia, Belgium"
    assert region_label(paris, 0.3) == "Paris, Ile-de-France, France"  # 430 m: within 1 km
    assert region_label(yvoir, 2000.0) == "around Belgium"
    # far from any town: never named as if it were the town
    label = region_label(southern_ocean, 20.0)
    assert label.startswith("open sea or wilderness, 760 km S of ") and "Australia" in label
    assert region_label(southern_ocean, 2000.0) == "around Australia"
    # results written before places carried their distance keep the old names
    old = {k: v for k, v in yvoir.to_dict().items() if k not in ("distance_km", "bearing_deg")}
    assert region_label(old, 0.3) == "Yvoir, Wallonia, Belgium"


def test_a_sharp_map_shows_its_window_with_a_scale_bar_and_a_world_inset():
    samples = _mixture([(PARIS, 0.5, 1.0)], 512, seed=4).numpy()
    regions = [{"lat": PARIS[0], "lon": PARIS[1], "probability": 0.97, "radius_km": 1.1,
                "label": "Paris, Ile-de-France, France"}]  # fmt: skip
    fig = draw_map(samples, best_guess=PARIS, truth=(45.76, 4.84), regions=regions)
    ax, inset = fig.axes
    extent = answer_extent(samples, PARIS, regions)
    assert ax.get_ylim() == pytest.approx(extent[:2]) and ax.get_xlim() == pytest.approx(extent[2:])
    assert inset.get_xlim() == (-180, 180)
    assert [t.get_text() for t in fig.texts] == ["1 km"]  # a fifth of the ~6 km wide window
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    first = next(t for t in ax.texts if t.get_gid() == "region-label")
    label = first.get_bbox_patch().get_window_extent(renderer)
    assert not label.overlaps(inset.get_window_extent(renderer))
    world = draw_map(np.random.default_rng(0).uniform([-60, -180], [60, 180], (300, 2)))
    assert len(world.axes) == 1 and world.axes[0].get_xlim() == (-180, 180)


def test_names_come_from_the_nearest_town_along_the_surface():
    # Off Taveuni (Fiji), across the antimeridian from the nearest town, Labasa (lon 179.4):
    # nearest in (lat, lon) degrees is a town of Wallis and Futuna, 300 km away.
    (by_degrees,) = reverse_geocode([[-16.48, -179.87]])
    (by_surface,) = reverse_geocode([[-16.48, -179.87]], great_circle=True)
    assert by_degrees.country == "Wallis and Futuna" and by_degrees.distance_km > 250
    assert by_surface.country == "Fiji" and by_surface.distance_km < 100
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300)], 1)
    surface = reverse_geocode(points, great_circle=True)
    degrees = reverse_geocode(points)
    assert all(s.distance_km <= d.distance_km + 1e-3 for s, d in zip(surface, degrees))


def test_the_density_of_a_zoomed_map_keeps_a_1_km_mode_beside_a_1000_km_one():
    from globeflow.answers.decode import sample_density_grid

    sigma_km, n = 1.0, 1024
    samples = _mixture([(PARIS, sigma_km, 0.5), ((-23.55, -46.63), 1000.0, 0.5)], n, seed=5)
    half = 6 * sigma_km / KM_PER_DEG
    extent = (PARIS[0] - half, PARIS[0] + half, PARIS[1] - 1.5 * half, PARIS[1] + 1.5 * half)
    grid = sample_density_grid(samples, n_lat=48, n_lon=72, extent=extent)
    density = np.exp(np.asarray(grid["log_density"]))
    # the peak of a Gaussian of weight 1/2 and sd sigma, per steradian, smoothed by kernels of
    # about the k-th neighbour distance (k = 32 of ~512: 0.35 sigma), i.e. 0.89 of it
    sigma_sr = sigma_km / EARTH_RADIUS_KM
    peak = 0.5 / (2 * math.pi * sigma_sr**2)
    assert 0.6 * peak < density.max() < 1.1 * peak
    # and the window holds the mode's mass (0.5, +-4 binomial standard errors, + 0.02 for the
    # kernels of the few samples that lie outside the window)
    cell_sr = (
        np.radians(2 * half / 48) * np.radians(3 * half / 72) * math.cos(math.radians(PARIS[0]))
    )
    assert density.sum() * cell_sr == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / n) + 0.02)


def test_an_answer_in_the_southern_ocean_is_not_named_after_a_town(tmp_path):
    from _fake_locator import sharp_locator
    from PIL import Image

    from globeflow.answers.export import CSV_FIELDS, results_to_csv, results_to_geojson

    locator = sharp_locator((((-50.0, 147.0), 20.0, 1.0),))
    (r,) = locator.locate_images([("sea.jpg", Image.new("RGB", (8, 8)))], num_samples=256)
    assert r["best_guess"]["label"].startswith("open sea or wilderness, ")
    # 20 km wide: the same words (the distance differs by the gap between guess and centre)
    place_words = r["best_guess"]["label"].split(" km ")[1]
    assert r["regions"][0]["label"].split(" km ")[1] == place_words
    assert r["best_guess"]["place"]["distance_km"] > 700
    # the CSV and GeoJSON carry the same names and the link
    path = results_to_csv([r], tmp_path / "r.csv")
    header, row = path.read_text().splitlines()
    assert header.split(",") == CSV_FIELDS and r["osm_url"] in row
    assert '"open sea or wilderness, ' in row
    (best, region) = results_to_geojson([r])["features"]
    assert best["properties"]["label"] == r["best_guess"]["label"]
    assert best["properties"]["osm_url"] == r["osm_url"]
    assert region["properties"]["share_within_radius"] == 0.9
