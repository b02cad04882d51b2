"""The offline base map: what lies around an answer, without a network.

Bundled in ``assets/basemap/`` (built by ``scripts/build_basemap.py``; sizes in docs/maps.md):
Natural Earth 1:10m coastlines, country borders and admin-1 boundaries (``lines.json``) and
country polygons (``countries.json``), GeoNames towns of >= 15,000 people with their populations
(``places.json``) and a label point per admin-1 region (``admin1.json``). Windows at most
:data:`SMALL_WINDOW_DEG` tall also list every GeoNames place of >= 1,000 people that the reverse
geocoder names answers after, so a 2-km answer shows the village it is in.

Windows are ``(lat0, lat1, lon0, lon1)`` degrees as :func:`globeflow.answers.zoom.credible_extent`
returns them (``lon1`` may exceed 180); what is returned lies in the window's longitudes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from importlib import resources
from itertools import chain
from pathlib import Path

import numpy as np

__all__ = [
    "BASEMAP_FILES",
    "LINE_KINDS",
    "MapPlace",
    "SMALL_WINDOW_DEG",
    "admin1_in",
    "basemap_path",
    "built_up_radius_km",
    "country_rings",
    "decode_lines",
    "lines_in",
    "places_in",
]

BASEMAP_FILES = ("lines.json", "countries.json", "places.json", "admin1.json")
LINE_KINDS = ("coastlines", "borders", "admin1")
SMALL_WINDOW_DEG = 1.0
"""Windows at most this tall (about 110 km) list the towns of >= 1,000 people too."""
BUILT_UP_PEOPLE_PER_KM2 = 3000.0
"""Density that turns a town's population into the area of its built-up disk (a rough figure
for towns and city districts; GeoNames lists a city's districts as places of their own)."""

Window = tuple[float, float, float, float]


@dataclass(frozen=True)
class MapPlace:
    """A named point to label: a town (population None when GeoNames' table has none) or an
    admin-1 region's label point. ``lon`` lies in the window's longitudes."""

    name: str
    lat: float
    lon: float
    country_code: str
    population: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def basemap_path(name: str) -> Path:
    """Filesystem path of a bundled base-map file (one of :data:`BASEMAP_FILES`)."""
    if name not in BASEMAP_FILES:
        raise ValueError(f"{name}: not a base-map file (one of {', '.join(BASEMAP_FILES)})")
    return Path(str(resources.files("globeflow") / "assets" / "basemap" / name))


@cache
def _asset(name: str) -> dict:
    with open(basemap_path(name), encoding="utf-8") as fh:
        return json.load(fh)


def decode_lines(encoded: list[list[int]], scale: float) -> list[np.ndarray]:
    """Polylines (K, 2) ``[lon, lat]`` degrees from the flat integer form ``[lon0, lat0,
    dlon1, dlat1, ...]`` in units of ``1 / scale`` degree."""
    if not encoded:
        return []
    lengths = np.array([len(flat) // 2 for flat in encoded])
    steps = np.fromiter(chain.from_iterable(encoded), dtype=np.int64).reshape(-1, 2)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = np.cumsum(steps, axis=0)  # one running sum, restarted at each line's first point
    before = np.repeat(total[starts] - steps[starts], lengths, axis=0)
    return np.split((total - before) / scale, np.cumsum(lengths)[:-1])


@cache
def _line_layer(kind: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The polylines of one kind and their boxes (L, 4): lon0, lat0, lon1, lat1."""
    if kind not in LINE_KINDS:
        raise ValueError(f"{kind}: not a line layer (one of {', '.join(LINE_KINDS)})")
    data = _asset("lines.json")
    lines = decode_lines(data[kind], data["scale"])
    if not lines:
        return lines, np.zeros((0, 4))
    points = np.concatenate(lines)
    starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])[:-1]])
    boxes = np.concatenate(
        [np.minimum.reduceat(points, starts), np.maximum.reduceat(points, starts)], axis=1
    )
    return lines, boxes


def _turns(window: Window | None) -> list[float]:
    """Whole turns (degrees) that bring [-180, 180] longitudes into the window's."""
    if window is None:
        return [0.0]
    _, _, lon0, lon1 = window
    return [t for t in (-360.0, 0.0, 360.0) if lon0 <= 180.0 + t and lon1 >= -180.0 + t]


def lines_in(kind: str, window: Window | None = None) -> list[np.ndarray]:
    """Polylines (K, 2) ``[lon, lat]`` of ``kind`` (coastlines, borders, admin1) that meet the
    window (all of them for None), turned into its longitudes."""
    lines, boxes = _line_layer(kind)
    if window is None:
        return list(lines)
    lat0, lat1, lon0, lon1 = window
    out = []
    for turn in _turns(window):
        meets = (
            (boxes[:, 0] + turn <= lon1)
            & (boxes[:, 2] + turn >= lon0)
            & (boxes[:, 1] <= lat1)
            & (boxes[:, 3] >= lat0)
        )
        shift = np.array([turn, 0.0])
        out += [lines[i] + shift for i in np.flatnonzero(meets)]
    return out


def country_rings(code: str) -> list[np.ndarray]:
    """Outer and inner rings (K, 2) ``[lon, lat]`` of a country by ISO alpha-2 code ([] when
    the bundled polygons have none)."""
    data = _asset("countries.json")
    entry = data["countries"].get(code.upper())
    return decode_lines(entry["rings"], data["scale"]) if entry else []


def _inside(lat: np.ndarray, lon: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the points inside the window and their longitudes turned into it."""
    lat0, lat1, lon0, lon1 = window
    turned = (lon - lon0) % 360.0 + lon0
    return (lat >= lat0) & (lat <= lat1) & (turned <= lon1), turned


@lru_cache(maxsize=1)
def _towns() -> tuple[np.ndarray, np.ndarray, list[str], list[str], np.ndarray]:
    data = _asset("places.json")
    scale = data["scale"]
    lat = np.asarray(data["lat"], dtype=np.float64) / scale
    lon = np.asarray(data["lon"], dtype=np.float64) / scale
    return lat, lon, data["name"], data["country_code"], np.asarray(data["population"])


def places_in(window: Window, limit: int = 40) -> list[MapPlace]:
    """The towns inside the window, most populous first, at most ``limit``; in a window at
    most :data:`SMALL_WINDOW_DEG` tall, then GeoNames' smaller places nearest its middle."""
    lat, lon, names, codes, population = _towns()
    mask, turned = _inside(lat, lon, window)
    index = np.flatnonzero(mask)[:limit]  # the file is sorted by population
    places = [
        MapPlace(names[i], float(lat[i]), float(turned[i]), codes[i], int(population[i]))
        for i in index
    ]
    lat0, lat1, lon0, lon1 = window
    if len(places) < limit and lat1 - lat0 <= SMALL_WINDOW_DEG:
        from globeflow.answers.geocode import gazetteer

        latlon, g_names, _, g_codes = gazetteer()
        mask, turned = _inside(latlon[:, 0], latlon[:, 1], window)
        index = np.flatnonzero(mask)
        mid_lat, mid_lon = (lat0 + lat1) / 2.0, (lon0 + lon1) / 2.0
        cos_mid = math.cos(math.radians(mid_lat))
        dist = np.hypot(latlon[index, 0] - mid_lat, (turned[index] - mid_lon) * cos_mid)
        known = {(p.name, round(p.lat, 1), round(p.lon, 1)) for p in places}
        for i in index[np.argsort(dist, kind="stable")]:
            key = (g_names[i], round(float(latlon[i, 0]), 1), round(float(turned[i]), 1))
            if key in known:
                continue
            places.append(MapPlace(g_names[i], float(latlon[i, 0]), float(turned[i]), g_codes[i]))
            if len(places) >= limit:
                break
    return places


def admin1_in(window: Window) -> list[MapPlace]:
    """Label points of the admin-1 regions (states, provinces) inside the window, those with
    the most places first."""
    data = _asset("admin1.json")
    scale = data["scale"]
    lat = np.asarray(data["lat"], dtype=np.float64) / scale
    lon = np.asarray(data["lon"], dtype=np.float64) / scale
    mask, turned = _inside(lat, lon, window)
    index = sorted(np.flatnonzero(mask), key=lambda i: -data["places"][i])
    return [
        MapPlace(data["name"][i], float(lat[i]), float(turned[i]), data["country_code"][i])
        for i in index
    ]


def built_up_radius_km(population: int | None) -> float:
    """Radius (km) of a disk of :data:`BUILT_UP_PEOPLE_PER_KM2` holding ``population`` people:
    the drawn extent of a town (0 when its population is unknown)."""
    if not population or population <= 0:
        return 0.0
    return math.sqrt(population / (math.pi * BUILT_UP_PEOPLE_PER_KM2))
