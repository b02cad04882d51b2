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
    labels = [t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts]
    assert len(labels) == 5
    for i in range(5):
        for j in range(i):
            assert _overlap(labels[i], labels[j]) == 0, (ax.texts[i].get_text(), j)
    avoid = [_marker_extent(fig, 37.3, 127.3, 160), _marker_extent(fig, 35.6, 139.6, 90)]
    avoid += [_marker_extent(fig, lat, lon, 40) for lat, lon, *_ in EAST_ASIA]
    avoid.append(ax.get_legend().get_window_extent(renderer))
    for text, box in zip(ax.texts, labels):
        assert all(_overlap(box, a) == 0 for a in avoid), text.get_text()
        assert ax.get_window_extent(renderer).contains(box.x0, box.y0)
    # label 2 sat under the best-guess star before; now it is next to its own circle
    seoul = ax.transData.transform((127.0, 37.5))
    assert np.hypot(labels[1].x0 - seoul[0], labels[1].y0 - seoul[1]) < 100


def test_label_placement_is_deterministic() -> None:
    first = [t.get_position() for t in _east_asia_map().axes[0].texts]
    again = [t.get_position() for t in _east_asia_map().axes[0].texts]
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
    texts = [t.get_text() for t in fig.axes[0].texts]
    # the pipeline's label where there is one, else the same rule (a 500 km region: its country)
    assert texts == ["1. Japan 50%", "2. South Korea 30%"]
