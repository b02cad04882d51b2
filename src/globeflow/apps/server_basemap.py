"""The web API's part of the interactive map: where the page takes its base layers from.

``GET /v1/map`` says which raster tiles the page may try (``serve --tiles``; None: offline
only), ``GET /v1/basemap/{layer}`` serves the bundled offline base map
(:mod:`globeflow.answers.basemap`) and ``GET /v1/places`` the towns to label in a window. All of
it is local: the page draws a map of the whole world at city scale with no network at all.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse

__all__ = ["DEFAULT_TILES", "OSM_ATTRIBUTION", "add_basemap_routes", "parse_tiles"]

DEFAULT_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
"""OpenStreetMap's standard raster tiles (https://operations.osmfoundation.org/policies/tiles/)."""
OSM_ATTRIBUTION = (
    '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'
)
OFFLINE_ATTRIBUTION = "Made with Natural Earth · places: GeoNames (CC BY 4.0)"
MAX_PLACES = 200
_LAYERS = {"lines": "lines.json", "countries": "countries.json", "admin1": "admin1.json"}


def parse_tiles(value: str | None) -> str | None:
    """The tile URL template of ``serve --tiles``: an http(s) URL holding ``{z}``, ``{x}`` and
    ``{y}`` (and optionally ``{s}``), or None for "none" / empty (offline base map only);
    ``ValueError`` naming the value otherwise."""
    if value is None or value.strip().lower() in ("", "none", "off"):
        return None
    url = value.strip()
    if not re.match(r"^https?://[^\s/]+", url):
        raise ValueError(f"--tiles {value}: not an http(s) URL (or 'none' to stay offline)")
    missing = [p for p in ("{z}", "{x}", "{y}") if p not in url]
    if missing:
        raise ValueError(
            f"--tiles {value}: the URL template lacks {', '.join(missing)} "
            "(e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png)"
        )
    return url


def add_basemap_routes(app: FastAPI, tiles: str | None) -> None:
    """Register ``/v1/map``, ``/v1/basemap/{layer}`` and ``/v1/places`` on ``app``; ``tiles``
    as :func:`parse_tiles` reads it (``ValueError`` for a template it refuses)."""
    from globeflow.answers.basemap import basemap_path

    tiles = parse_tiles(tiles)

    @app.get("/v1/map", tags=["map"])
    async def map_config() -> dict:
        """The page's base layers: ``tiles`` (URL template and attribution, or None when the
        server was started with ``--tiles none``) and the offline layer's attribution. Tiles
        are taken to be OpenStreetMap's or a mirror's, so they carry its attribution."""
        return {
            "tiles": None if tiles is None else {"url": tiles, "attribution": OSM_ATTRIBUTION},
            "offline_attribution": OFFLINE_ATTRIBUTION,
        }

    @app.get("/v1/basemap/{layer}", tags=["map"])
    async def basemap(layer: str) -> FileResponse:
        """A bundled offline base-map layer: ``lines`` (coastlines, borders, admin-1
        boundaries), ``countries`` (polygons) or ``admin1`` (label points); see
        scripts/build_basemap.py for the format."""
        if layer not in _LAYERS:
            raise HTTPException(404, f"{layer}: no such layer (one of {', '.join(_LAYERS)})")
        return FileResponse(
            basemap_path(_LAYERS[layer]),
            media_type="application/json",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    @app.get("/v1/places", tags=["map"])
    async def places(
        lat0: float = Query(..., ge=-90, le=90),
        lat1: float = Query(..., ge=-90, le=90),
        lon0: float = Query(..., ge=-540, le=540),
        lon1: float = Query(..., ge=-540, le=540),
        limit: int = Query(60, ge=1, le=MAX_PLACES),
    ) -> dict[str, Any]:
        """Towns inside the window (degrees; ``lon1`` may pass 180), most populous first,
        with the radius of their built-up disk; small windows add GeoNames' smaller places."""
        from starlette.concurrency import run_in_threadpool

        from globeflow.answers.basemap import built_up_radius_km, places_in

        if not (lat0 < lat1 and lon0 < lon1 and lon1 - lon0 <= 720):
            raise HTTPException(422, "need lat0 < lat1, lon0 < lon1 and at most 720 degrees wide")
        found = await run_in_threadpool(places_in, (lat0, lat1, lon0, lon1), limit)
        return {
            "places": [
                {**p.to_dict(), "built_up_radius_km": round(built_up_radius_km(p.population), 3)}
                for p in found
            ]
        }
