"""The API side of fusion and regions: /v1/locate-together and the ``within`` field."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_webapp_fusion_e2e import FusingFakeLocator  # noqa: E402

from globeflow.apps.server import create_app


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 130, 140)).save(buf, "JPEG")
    return buf.getvalue()


def _files(*names: str) -> list:
    return [("file", (name, _jpeg(), "image/jpeg")) for name in names]


def test_within_reaches_the_locator_and_bad_regions_are_422(tmp_path) -> None:
    locator = FusingFakeLocator()
    with TestClient(create_app(locator)) as client:
        ok = client.post("/v1/locate", files=_files("a.jpg"), data={"within": "35,-10,60,30"})
        assert ok.status_code == 200
        assert ok.json()["results"][0]["mass_inside"]["region"]["kind"] == "bbox"
        polygon = {"type": "Polygon", "coordinates": [[[0, 40], [10, 40], [10, 50], [0, 40]]]}
        ok = client.post("/v1/locate", files=_files("a.jpg"), data={"within": json.dumps(polygon)})
        assert ok.json()["results"][0]["mass_inside"]["region"]["kind"] == "polygon"
        secret = tmp_path / "region.geojson"
        secret.write_text(json.dumps(polygon))
        for bad, message in (
            (str(secret), "not a region"),  # never a server-side file
            ("60,0,40,10", "latitudes"),
            ("{not json", "not valid GeoJSON"),
            ("QQ", "QQ"),
        ):
            response = client.post("/v1/locate", files=_files("a.jpg"), data={"within": bad})
            assert response.status_code == 422, bad
            assert response.json()["detail"].startswith("within:") and message in str(
                response.json()["detail"]
            )
    assert locator.regions == ["35,-10,60,30", "GeoJSON (1 polygon)"]


def test_locate_together_answers_once_and_lists_bad_files() -> None:
    locator = FusingFakeLocator()
    with TestClient(create_app(locator)) as client:
        files = [*_files("a.jpg", "b.jpg"), ("file", ("bad.jpg", b"nope", "image/jpeg"))]
        response = client.post("/v1/locate-together", files=files, data={"within": "FR"})
        assert response.status_code == 200
        result = response.json()["result"]
        assert result["photos"] == ["a.jpg", "b.jpg"]
        assert [s["image"] for s in result["skipped"]] == ["bad.jpg"]
        assert result["mass_inside"]["region"]["description"] == "France (FR)"
        one = client.post("/v1/locate-together", files=_files("a.jpg"))
        assert one.status_code == 422 and "at least two" in one.json()["detail"]
