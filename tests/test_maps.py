"""Offline world maps: bundled coastline data and PNG rendering."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.transforms import Bbox
from PIL import Image

from globeflow.answers.label_placement import overlap_area, place_labels
from globeflow.answers.maps import draw_map, load_borders, load_coastlines, render_map


def test_coastline_data_is_sane() -> None:
    lines = load_coastlines()
    assert len(lines) > 200
    pts = np.concatenate(lines)
    assert len(pts) > 5000
    assert pts.shape[1] == 2
    assert np.all(np.abs(pts[:, 0]) <= 180.0)
    assert np.all(np.abs(pts[:, 1]) <= 90.0)
    # every continent is there: points on both hemispheres, east and west
    assert pts[:, 0].min() < -150 and pts[:, 0].max() > 150
    assert pts[:, 1].min() < -60 and pts[:, 1].max() > 70
    assert all(len(line) >= 2 for line in lines)
    assert len(load_borders()) > 50


def test_render_map_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal([48.8, 2.3], [3.0, 4.0], size=(200, 2))
    lat = np.linspace(-88.5, 88.5, 60)
    lon = np.linspace(-178.5, 178.5, 120)
    logd = -(((lat[:, None] - 48.8) / 10) ** 2) - ((lon[None, :] - 2.3) / 10) ** 2
    density = {"lat": lat.tolist(), "lon": lon.tolist(), "log_density": logd.tolist()}
    regions = [
        {"lat": 48.8, "lon": 2.3, "probability": 0.7, "place": {"city": "Paris", "country": "FR"}},
        {"lat": 51.5, "lon": -0.1, "probability": 0.2},
    ]
    out = render_map(
        tmp_path / "map.png",
        samples,
        density=density,
        best_guess=(48.8, 2.3),
        truth=(45.76, 4.84),
        regions=regions,
        title="photo.jpg",
        width_px=800,
        dpi=100,
    )
    with Image.open(out) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert 700 <= w <= 900 and 350 <= h <= 500
        arr = np.asarray(img.convert("RGB"), dtype=np.int32)
    assert arr.std() > 10  # not a blank image
    assert (tmp_path / "map.png").stat().st_size > 10_000


def test_render_map_minimal(tmp_path) -> None:
    out = render_map(tmp_path / "m.png", np.zeros((0, 2)), width_px=400, dpi=100)
    with Image.open(out) as img:
        assert img.size[0] == 400


EAST_ASIA = [  # five regions within ~2,000 km, as for a photo from Japan or Korea
    (35.7, 139.7, 0.40, "Tokyo", "Japan"),
    (37.5, 127.0, 0.20, "Seoul", "South Korea"),
    (31.2, 121.5, 0.15, "Shanghai", "China"),
    (34.7, 135.5, 0.10, "Osaka", "Japan"),
    (39.9, 116.4, 0.05, "Beijing", "China"),
]


def _east_asia_map(**kwargs):
    regions = [
        {"lat": lat, "lon": lon, "probability": p, "place": {"city": c, "country": k}}
        for lat, lon, p, c, k in EAST_ASIA
    ]
    samples = np.random.default_rng(0).normal([35.0, 130.0], [4.0, 7.0], size=(300, 2))
    return draw_map(
        samples, best_guess=(37.3, 127.3), truth=(35.6, 139.6), regions=regions, **kwargs
    )


def labelled(ax, gid: str) -> list:
    """The texts of one kind on a map: region-label, town-label, admin1-label or caption."""
    return [t for t in ax.texts if t.get_gid() == gid]


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _marker_extent(fig, lat: float, lon: float, area_pt2: float) -> Bbox:
    x, y = fig.axes[0].transData.transform((lon, lat))
    half = np.sqrt(area_pt2) / 2 * fig.dpi / 72
    return Bbox.from_extents(x - half, y - half, x + half, y + half)


def test_region_labels_cover_no_label_marker_or_legend() -> None:
    fig = _east_asia_map()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = labelled(ax, "region-label")
    labels = [t.get_bbox_patch().get_window_extent(renderer) for t in texts]
    assert len(labels) == 5
    for i in range(5):
        for j in range(i):
            assert _overlap(labels[i], labels[j]) == 0, (texts[i].get_text(), j)
    avoid = [_marker_extent(fig, 37.3, 127.3, 160), _marker_extent(fig, 35.6, 139.6, 90)]
    avoid += [_marker_extent(fig, lat, lon, 40) for lat, lon, *_ in EAST_ASIA]
    avoid.append(ax.get_legend().get_window_extent(renderer))
    for text, box in zip(texts, labels):
        assert all(_overlap(box, a) == 0 for a in avoid), text.get_text()
        assert ax.get_window_extent(renderer).contains(box.x0, box.y0)
    # label 2 sat under the best-guess star before; now it is next to its own circle
    seoul = ax.transData.transform((127.0, 37.5))
    assert np.hypot(labels[1].x0 - seoul[0], labels[1].y0 - seoul[1]) < 100


def test_label_placement_is_deterministic() -> None:
    first = [t.get_position() for t in _east_asia_map().axes[0].texts]
    again = [t.get_position() for t in _east_asia_map().axes[0].texts]
    assert len(first) > 5  # the region labels and the base map's names
    assert first == again


def test_legend_explains_shading_and_dots() -> None:
    lat = np.linspace(-88.5, 88.5, 60)
    lon = np.linspace(-178.5, 178.5, 120)
    density = {"lat": lat, "lon": lon, "log_density": -((lat[:, None] / 20) ** 2) + 0 * lon}
    fig = draw_map(np.zeros((50, 2)), density=density)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("density" in t for t in texts)
    assert "50 samples" in texts
    assert draw_map(None).axes[0].get_legend() is None  # nothing to explain


def test_place_labels_separates_labels_on_one_anchor() -> None:
    anchors = [(100.0, 100.0)] * 6
    sizes = [(80.0, 12.0)] * 6
    star = (90.0, 90.0, 110.0, 110.0)
    boxes = place_labels(anchors, sizes, [star], (0.0, 0.0, 400.0, 200.0))
    for i, a in enumerate(boxes):
        assert overlap_area(a, star) == 0
        assert 0 <= a[0] and a[2] <= 400 and 0 <= a[1] and a[3] <= 200
        assert all(overlap_area(a, b) == 0 for b in boxes[:i])
    # the first label takes the first free spot: right of the anchor, centred on it
    assert boxes[0][0] > 110 and boxes[0][1] == pytest.approx(94.0)


def test_map_names_regions_as_the_table_does() -> None:
    regions = [
        {"lat": 35.7, "lon": 139.7, "probability": 0.5, "radius_km": 500.0, "label": "Japan",
         "place": {"city": "Shinjuku", "region": "Tokyo", "country": "Japan"}},
        {"lat": 37.5, "lon": 127.0, "probability": 0.3, "radius_km": 500.0,
         "place": {"city": "Seoul", "region": "Seoul", "country": "South Korea"}},
    ]  # fmt: skip
    fig = draw_map(np.zeros((0, 2)), regions=regions)
    texts = [t.get_text() for t in labelled(fig.axes[0], "region-label")]
    # the pipeline's label where there is one, else the same rule (a 500 km region: its country)
    assert texts == ["1. Japan 50%", "2. South Korea 30%"]


# ---- the offline base map at the map's scale -------------------------------------------------

MILLAU = (44.098, 3.078)


def _inside_ring(lat: float, lon: float, ring: np.ndarray) -> bool:
    """Even-odd rule for one ring (K, 2) [lon, lat]."""
    x, y = ring[:, 0], ring[:, 1]
    crosses = (y[:-1] > lat) != (y[1:] > lat)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x[:-1] + (lat - y[:-1]) * (x[1:] - x[:-1]) / (y[1:] - y[:-1])
    return bool(np.sum(crosses & (lon < at)) % 2)


def test_basemap_layers_hold_city_scale_detail() -> None:
    from globeflow.answers.basemap import admin1_in, country_rings, lines_in, places_in

    provence = (43.0, 44.0, 4.5, 6.0)
    coast = lines_in("coastlines", provence)
    points = np.concatenate(coast)
    # the Marseille coast at 1:10m: hundreds of points, none more than ~0.5 degree apart
    assert len(points) > 300
    assert max(np.abs(np.diff(line, axis=0)).max() for line in coast) < 0.5
    assert lines_in("admin1", provence) and lines_in("borders", (43.5, 44.5, 6.5, 8.0))
    towns = [p.name for p in places_in(provence, limit=5)]
    assert towns[0] == "Marseille" and "Toulon" in towns
    assert "Provence-Alpes-Cote d'Azur" in [r.name for r in admin1_in(provence)]
    france = country_rings("FR")
    assert any(_inside_ring(48.85, 2.35, ring) for ring in france)
    assert not any(_inside_ring(51.5, -0.12, ring) for ring in france)  # London
    assert country_rings("XX") == []


def test_small_windows_list_villages_and_wide_ones_only_towns() -> None:
    from globeflow.answers.basemap import places_in

    small = places_in((44.06, 44.14, 3.0, 3.12), limit=20)
    assert small[0].name == "Millau" and small[0].population > 15000
    villages = [p for p in small if p.population is None]
    assert villages and all(44.06 <= p.lat <= 44.14 and 3.0 <= p.lon <= 3.12 for p in villages)
    wide = places_in((40.0, 50.0, -5.0, 10.0), limit=50)
    assert all(p.population and p.population >= 15000 for p in wide)
    populations = [p.population for p in wide]
    assert populations == sorted(populations, reverse=True)


def test_windows_across_the_antimeridian_get_their_context_turned_into_them() -> None:
    from globeflow.answers.basemap import lines_in, places_in

    window = (-19.0, -15.0, 177.0, 183.0)  # Fiji, across 180
    points = np.concatenate(lines_in("coastlines", window))
    assert points[:, 0].min() >= 177.0 - 10 and points[:, 0].max() > 180.0
    towns = places_in(window)
    assert towns and all(177.0 <= t.lon <= 183.0 for t in towns)


def test_a_two_km_answer_shows_which_town_it_is_in() -> None:
    """Zoomed to a 2-km answer at the edge of Millau, the map names Millau and the villages
    around, draws their built-up disks, and a caption names the region and country; no name
    covers another, a marker, the legend or a region's label."""
    rng = np.random.default_rng(1)
    guess = (44.095, 3.065)
    samples = rng.normal(guess, [0.006, 0.008], size=(400, 2))
    regions = [{"lat": guess[0], "lon": guess[1], "probability": 0.9, "radius_km": 1.0,
                "label": "Millau, Occitanie, France"}]  # fmt: skip
    fig = draw_map(samples, best_guess=guess, regions=regions, truth=MILLAU)
    ax = fig.axes[0]
    assert ax.get_ylim()[1] - ax.get_ylim()[0] < 0.1  # a window of a few km
    towns = [t.get_text() for t in labelled(ax, "town-label")]
    assert "Millau" in towns and len(towns) >= 2
    caption = labelled(ax, "caption")[0].get_text()
    assert "France" in caption and "Pyrenees" in caption
    assert any(p.get_gid() is None and type(p).__name__ == "Ellipse" for p in ax.patches)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    names = [t.get_window_extent(renderer) for t in labelled(ax, "town-label")]
    taken = [t.get_bbox_patch().get_window_extent(renderer) for t in labelled(ax, "region-label")]
    taken += [ax.get_legend().get_window_extent(renderer)]
    taken += [_marker_extent(fig, *guess, 160), _marker_extent(fig, *MILLAU, 90)]
    for i, box in enumerate(names):
        assert all(_overlap(box, other) == 0 for other in names[:i] + taken)
        assert ax.get_window_extent(renderer).contains(box.x0, box.y0)


def test_a_world_map_keeps_the_light_outlines() -> None:
    fig = draw_map(np.random.default_rng(0).uniform([-60, -180], [60, 180], (300, 2)))
    ax = fig.axes[0]
    assert not labelled(ax, "town-label") and not labelled(ax, "caption")
    assert len(ax.collections) >= 2  # coastlines and borders of assets/world_coastlines.json
