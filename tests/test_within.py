"""Regions that mean what they say (issue 23, items 7 and 9): GeoJSON edges straight in lon/lat
as RFC 7946 defines them, checked against matplotlib's point-in-polygon on random rings; boxes
and rings that cannot be meant refused in one line (exit 2 on the command line, 422 in the API).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from matplotlib.path import Path as PlanePath
from PIL import Image
from typer.testing import CliRunner

from globeflow.answers.within import RegionError, parse_region
from globeflow.apps import pipeline
from globeflow.apps.cli import app
from globeflow.apps.server import create_app

sys.path.insert(0, str(Path(__file__).parent))
from test_webapp_fusion_e2e import FusingFakeLocator  # noqa: E402

PARIS, TOKYO, MOSCOW, NEW_YORK = (48.85, 2.35), (35.68, 139.69), (55.75, 37.62), (40.71, -74.01)


def _polygon(*rings) -> dict:
    return {"type": "Polygon", "coordinates": [list(map(list, r)) for r in rings]}


def _inside(region, *points) -> list[bool]:
    return region.contains(torch.tensor(points, dtype=torch.float64)).tolist()


def test_an_edge_wider_than_180_degrees_runs_straight_in_lon_lat():
    wide = parse_region(_polygon([[-20, 0], [170, 0], [170, 70], [-20, 70], [-20, 0]]))
    assert _inside(wide, PARIS, TOKYO, MOSCOW, NEW_YORK) == [True, True, True, False]
    band = parse_region(_polygon([[-180, 0], [180, 0], [180, 60], [-180, 60], [-180, 0]]))
    assert _inside(band, PARIS, TOKYO, MOSCOW, NEW_YORK, (-10, 0)) == [True] * 4 + [False]
    cap = parse_region(_polygon([[-180, 60], [180, 60], [180, 90], [-180, 90], [-180, 60]]))
    assert _inside(cap, (89.9, 123.0), (61, -179.9), (59, 0), PARIS) == [True, True, False, False]


def _random_ring(rng: np.random.Generator) -> np.ndarray:
    """A simple (star-shaped) ring of [lon, lat]: vertices at sorted angles around a centre;
    some centres on the antimeridian or near a pole, so that vertices touch lon +-180 or lat
    +-90 (clipped there) and edges span more than 180 degrees of longitude."""
    n = int(rng.integers(3, 12))
    centre = np.array([rng.uniform(-180, 180), rng.uniform(-80, 80)])
    if rng.random() < 0.3:
        centre[0] = rng.choice([-180.0, 180.0])
    if rng.random() < 0.3:
        centre[1] = rng.choice([-85.0, 85.0])
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(5, 200, n)
    ring = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles) / 2], 1)
    ring[:, 0] = np.clip(ring[:, 0], -180, 180)
    ring[:, 1] = np.clip(ring[:, 1], -90, 90)
    return np.concatenate([ring, ring[:1]])


def test_random_rings_agree_with_a_reference_point_in_polygon():
    rng = np.random.default_rng(23)
    points = np.stack([rng.uniform(-90, 90, 4000), rng.uniform(-180, 180, 4000)], 1)
    checked = 0
    for _ in range(60):
        ring = _random_ring(rng)
        area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
        if abs(area) < 1e-6:
            continue
        reference = PlanePath(ring).contains_points(points[:, ::-1])  # (lon, lat) plane
        ours = parse_region(_polygon(ring.tolist())).contains(torch.tensor(points)).numpy()
        near_edge = _distance_to_edges(points[:, ::-1], ring) < 1e-9
        assert (ours == reference)[~near_edge].all()
        checked += int(reference.sum())
    assert checked > 1000  # the rings held points, not only empty space


def _distance_to_edges(xy: np.ndarray, ring: np.ndarray) -> np.ndarray:
    a, b = ring[:-1][None], ring[1:][None]
    ab = b - a
    t = np.clip(((xy[:, None] - a) * ab).sum(-1) / np.maximum((ab**2).sum(-1), 1e-300), 0, 1)
    return np.linalg.norm(xy[:, None] - (a + t[..., None] * ab), axis=-1).min(1)


@pytest.mark.parametrize(
    "ring,message",
    [
        ([[0, 0], [10, 0], [10, 95], [0, 95], [0, 0]], "latitude 95, outside [-90, 90]"),
        ([[0, 40], [10, 40], [20, 40], [0, 40]], "encloses no area"),
        ([[-180, 80], [0, 80], [180, 80], [-180, 80]], "encloses no area"),  # a circle of lat.
        ([[0, 0], [600, 0], [600, 10], [0, 0]], "longitude outside"),
        ([[0, 0], [10, 0], [10, "north"], [0, 0]], "not [lon, lat]"),
    ],
)
def test_rings_that_cannot_be_meant_are_refused(ring, message):
    with pytest.raises(RegionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_region(_polygon(ring))


def test_a_ring_across_the_antimeridian_continues_past_180():
    across = parse_region(_polygon([[170, -20], [190, -20], [190, -15], [170, -15], [170, -20]]))
    assert _inside(across, (-17.8, 178.0), (-17.8, -179.5), (-17.8, 0.0)) == [True, True, False]


@pytest.mark.parametrize(
    "box,message",
    [
        ("1.2.3,0,10,10", "'1.2.3' is not a number"),
        ("1,2,3", "3 numbers; give four"),
        ("1,2,3,4,5", "5 numbers"),
        ("10,0,,20", "'' is not a number"),
        ("1e999,0,10,10", "'1e999' is not a number"),
    ],
)
def test_a_malformed_box_is_one_line_with_exit_2_and_422(box, message, monkeypatch):
    with pytest.raises(RegionError, match=message):
        parse_region(box)
    monkeypatch.setattr(pipeline.Locator, "from_pretrained", None)  # refused before loading
    photo = Path(__file__).parents[1] / "examples" / "paris.jpg"
    result = CliRunner().invoke(app, ["predict", str(photo), "--within", box])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --within bounding box") and message in result.output
    assert result.output.count("\n") == 1
    with TestClient(create_app(FusingFakeLocator())) as client:
        files = [("file", ("a.jpg", _jpeg(), "image/jpeg"))]
        response = client.post("/v1/locate", files=files, data={"within": box})
        assert response.status_code == 422 and message in response.json()["detail"]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 130, 140)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_guidance_that_is_no_number_is_told_so(value):
    files = [("file", ("a.jpg", _jpeg(), "image/jpeg"))]
    with TestClient(create_app(FusingFakeLocator())) as client:
        for where in ("params", "data"):
            response = client.post("/v1/locate", files=files, **{where: {"guidance": value}})
            assert response.status_code == 422
            detail = response.json()["detail"]
            assert detail.startswith("guidance:") and "finite number" in detail, detail


def test_locate_together_names_the_unusable_files_in_words():
    with TestClient(create_app(FusingFakeLocator())) as client:
        files = [("file", ("a.jpg", _jpeg(), "image/jpeg")), ("file", ("b.jpg", b"no", "x"))]
        response = client.post("/v1/locate-together", files=files)
    detail = response.json()["detail"]
    assert response.status_code == 422 and detail.startswith("send at least two usable photos")
    assert "b.jpg: " in detail and "{" not in detail and "'ok'" not in detail
