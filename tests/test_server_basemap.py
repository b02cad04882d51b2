"""The web API's map routes: which tiles the page tries, the bundled offline base map and the
towns of a window (globeflow.apps.server_basemap)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import FakeLocator  # noqa: E402

from globeflow.apps.server import create_app  # noqa: E402
from globeflow.apps.server_basemap import DEFAULT_TILES, parse_tiles  # noqa: E402


def _client(**kwargs) -> TestClient:
    return TestClient(create_app(FakeLocator(), **kwargs))


def test_the_page_is_told_which_tiles_to_try() -> None:
    config = _client().get("/v1/map").json()
    assert config["tiles"]["url"] == DEFAULT_TILES
    assert "OpenStreetMap" in config["tiles"]["attribution"]
    assert "Natural Earth" in config["offline_attribution"]
    assert _client(tiles=None).get("/v1/map").json()["tiles"] is None
    assert _client(tiles="none").get("/v1/map").json()["tiles"] is None
    with pytest.raises(ValueError, match="lacks"):
        create_app(FakeLocator(), tiles="https://tiles.example/{z}.png")
    mirror = "http://127.0.0.1:9/{z}/{x}/{y}.png"
    assert _client(tiles=mirror).get("/v1/map").json()["tiles"]["url"] == mirror


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", None),
        ("", None),
        ("OFF", None),
        ("https://a.tile.example/{z}/{x}/{y}.png", "https://a.tile.example/{z}/{x}/{y}.png"),
    ],
)
def test_tile_settings(value, expected) -> None:
    assert parse_tiles(value) == expected


@pytest.mark.parametrize(
    "value", ["tile.openstreetmap.org/{z}/{x}/{y}.png", "https://x/{z}/{y}.png", "file:///{z}"]
)
def test_bad_tile_settings_name_the_value(value) -> None:
    with pytest.raises(ValueError, match="--tiles"):
        parse_tiles(value)


def test_offline_layers_are_served_from_the_package() -> None:
    client = _client()
    lines = client.get("/v1/basemap/lines")
    assert lines.status_code == 200 and lines.headers["content-type"] == "application/json"
    data = lines.json()
    assert data["scale"] == 1000 and {"coastlines", "borders", "admin1"} <= set(data)
    assert "FR" in client.get("/v1/basemap/countries").json()["countries"]
    assert len(client.get("/v1/basemap/admin1").json()["name"]) > 2000
    missing = client.get("/v1/basemap/places")  # served through /v1/places only
    assert missing.status_code == 404 and "lines" in missing.json()["detail"]


def test_places_of_a_window_come_with_their_built_up_extent() -> None:
    client = _client()
    near_millau = {"lat0": 44.06, "lat1": 44.14, "lon0": 3.0, "lon1": 3.12}
    places = client.get("/v1/places", params=near_millau).json()["places"]
    assert places[0]["name"] == "Millau" and places[0]["population"] > 15000
    assert places[0]["built_up_radius_km"] == pytest.approx(1.5, abs=0.5)
    assert any(p["population"] is None and p["built_up_radius_km"] == 0 for p in places)
    world = {"lat0": -85, "lat1": 85, "lon0": -180, "lon1": 180, "limit": 5}
    assert len(client.get("/v1/places", params=world).json()["places"]) == 5
    across = {"lat0": -19, "lat1": -15, "lon0": 177, "lon1": 183}  # Fiji, across 180
    lons = [p["lon"] for p in client.get("/v1/places", params=across).json()["places"]]
    assert lons and all(177 <= lon <= 183 for lon in lons)
    for bad in ({**near_millau, "lat0": 45.0}, {**near_millau, "limit": 100000}):
        assert client.get("/v1/places", params=bad).status_code == 422


def test_the_page_loads_the_vendored_map_library() -> None:
    client = _client()
    page = client.get("/").text
    for asset in ("/static/vendor/leaflet/leaflet.js", "/static/vendor/leaflet/leaflet.css",
                  "/static/map.js"):  # fmt: skip
        assert asset in page
        assert client.get(asset).status_code == 200
    assert "Leaflet 1.9.4" in client.get("/static/vendor/leaflet/leaflet.js").text[:200]
    assert "Redistribution and use" in client.get("/static/vendor/leaflet/LICENSE").text
    assert "cdn" not in page.lower() and "unpkg" not in page.lower()


def test_a_non_editable_install_carries_the_map() -> None:
    """The package-data globs of pyproject.toml hold every file the map needs."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

    repo = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = globs["package-data"]["globeflow"]
    package = repo / "src" / "globeflow"
    needed = [
        *(package / "apps" / "static" / "vendor" / "leaflet").rglob("*"),
        package / "apps" / "static" / "map.js",
        *(package / "assets" / "basemap").glob("*.json"),
    ]
    files = [p.relative_to(package).as_posix() for p in needed if p.is_file()]
    assert len(files) >= 12
    for name in files:
        assert any(fnmatch.fnmatch(name, p.replace("**/", "")) or fnmatch.fnmatch(name, p)
                   for p in patterns), name  # fmt: skip
