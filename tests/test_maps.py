"""Offline world maps: bundled coastline data and PNG rendering."""

from __future__ import annotations

import numpy as np
from PIL import Image

from globeflow.answers.maps import load_borders, load_coastlines, render_map


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
