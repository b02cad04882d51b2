"""The scale of an answer: the map window that holds it and an OpenStreetMap link at its zoom.

Pure functions of samples (N, 2) degrees and of radii in km; the PNG maps, the web page and the
result dicts all take their window from :func:`credible_extent`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from globeflow.core.sphere import EARTH_RADIUS_KM

__all__ = [
    "CREDIBLE_MASS",
    "MIN_EXTENT_KM",
    "answer_extent",
    "credible_extent",
    "extent_radius_km",
    "osm_url",
    "osm_zoom",
]

CREDIBLE_MASS = 0.95
"""Share of the samples a zoomed map window holds (in latitude and in longitude each)."""
MIN_EXTENT_KM = 4.0
"""Smallest height of a zoomed map window: a few streets around a sharp answer."""
PAD = 0.25
"""Margin added on each side of the credible box, as a share of its span."""
WORLD_FRACTION = 0.6
"""A window wider than this share of the world's longitudes (or taller than this share of its
latitudes) shows the whole world instead."""
KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180.0
OSM_VIEW_KM_AT_ZOOM_0 = 2 * math.pi * EARTH_RADIUS_KM * 4.7
"""Width (km) of a typical 1200-px browser window (4.7 tiles of 256 px) at OSM zoom 0, equator."""


def _shortest_arc(lon: torch.Tensor, mass: float) -> tuple[float, float]:
    """(start, end) degrees of the shortest arc of longitude holding ``mass`` of ``lon`` (N,);
    ``end`` may exceed 180 when the arc crosses the antimeridian."""
    ordered = (lon.double() + 180.0).remainder(360.0).sort().values - 180.0  # in [-180, 180)
    n = ordered.numel()
    m = max(1, math.ceil(mass * n))
    wrapped = torch.cat([ordered, ordered + 360.0])
    widths = wrapped[m - 1 : m - 1 + n] - ordered
    start = int(widths.argmin())
    return float(ordered[start]), float(ordered[start] + widths[start])


def credible_extent(
    samples: torch.Tensor,
    mass: float = CREDIBLE_MASS,
    aspect: float = 2.0,
    min_km: float = MIN_EXTENT_KM,
    include: Sequence[Sequence[float]] = (),
) -> tuple[float, float, float, float] | None:
    """The map window (lat0, lat1, lon0, lon1) degrees that holds an answer, or None for the
    whole world.

    The central ``mass`` of the latitudes and the shortest arc holding ``mass`` of the
    longitudes, padded by :data:`PAD` on each side, at least ``min_km`` tall, widened to
    ``aspect`` (width / height, in km at the window's middle latitude, which is how an
    equirectangular map drawn with that latitude's aspect shows it), and wide enough to hold
    the points ``include`` ((lat, lon) degrees, e.g. the best guess and the main regions).
    ``lon1`` may exceed 180 when the window crosses the antimeridian; ``lat0, lat1`` stay within
    [-90, 90].
    """
    samples = samples.reshape(-1, 2).double()
    tail = (1.0 - mass) / 2.0
    lat0, lat1 = (
        float(q) for q in samples[:, 0].quantile(torch.tensor([tail, 1.0 - tail]).double())
    )
    lon0, lon1 = _shortest_arc(samples[:, 1], mass)
    for lat, lon in include:
        # the point's longitude turned by whole turns to lie nearest the window's middle
        lon = (lon - (lon0 + lon1) / 2.0 + 180.0) % 360.0 - 180.0 + (lon0 + lon1) / 2.0
        lat0, lat1, lon0, lon1 = min(lat0, lat), max(lat1, lat), min(lon0, lon), max(lon1, lon)
    lat_pad, lon_pad = PAD * (lat1 - lat0), PAD * (lon1 - lon0)
    lat0, lat1, lon0, lon1 = lat0 - lat_pad, lat1 + lat_pad, lon0 - lon_pad, lon1 + lon_pad
    lat_mid, lon_mid = (lat0 + lat1) / 2.0, (lon0 + lon1) / 2.0
    cos_mid = max(math.cos(math.radians(lat_mid)), 0.05)
    height = max(lat1 - lat0, min_km / KM_PER_DEG, (lon1 - lon0) * cos_mid / aspect)
    width = height * aspect / cos_mid
    if height > 180.0 * WORLD_FRACTION or width > 360.0 * WORLD_FRACTION:
        return None
    lat0 = min(max(lat_mid - height / 2.0, -90.0), 90.0 - height)
    lon0 = (lon_mid - width / 2.0 + 180.0) % 360.0 - 180.0
    return lat0, lat0 + height, lon0, lon0 + width


def osm_zoom(radius_km: float, lat: float) -> int:
    """OpenStreetMap zoom level (1 to 18) at which a browser window spans about 4 radii (the
    region twice over) at latitude ``lat``."""
    width_km = 4.0 * max(radius_km, 0.05)
    zoom = math.log2(OSM_VIEW_KM_AT_ZOOM_0 * math.cos(math.radians(lat)) / width_km)
    return int(min(18, max(1, math.floor(zoom))))


def osm_url(lat: float, lon: float, radius_km: float) -> str:
    """Link to openstreetmap.org with a marker at (lat, lon), zoomed to a region of
    ``radius_km`` around it."""
    zoom = osm_zoom(radius_km, lat)
    return (
        f"https://www.openstreetmap.org/?mlat={lat:.5f}&mlon={lon:.5f}"
        f"#map={zoom}/{lat:.5f}/{lon:.5f}"
    )


def extent_radius_km(extent: Sequence[float] | None) -> float:
    """The radius (km) of an answer shown in the map window ``extent`` (lat0, lat1, lon0, lon1)
    degrees: a quarter of the window's larger side, so that :func:`osm_url` (four radii wide)
    opens on that window; half the circumference for the whole world (None)."""
    if extent is None:
        return math.pi * EARTH_RADIUS_KM
    lat0, lat1, lon0, lon1 = extent
    width = (lon1 - lon0) * KM_PER_DEG * math.cos(math.radians((lat0 + lat1) / 2.0))
    return max(width, (lat1 - lat0) * KM_PER_DEG) / 4.0


IN_VIEW_PROBABILITY = 0.05
"""Regions at least this probable stay inside a zoomed window, as does the best guess."""


def answer_extent(
    samples: torch.Tensor, best_guess: Sequence[float] | None = None, regions: Sequence = ()
) -> tuple[float, float, float, float] | None:
    """:func:`credible_extent` of samples (N, 2) degrees that also holds the best guess (lat,
    lon) and the regions (dicts or :class:`~globeflow.answers.decode.Region`) of at least
    :data:`IN_VIEW_PROBABILITY`; None for the whole world (or no samples)."""
    if samples is None or len(samples) == 0:
        return None

    def get(region, key: str) -> float:
        return float(region[key] if isinstance(region, dict) else getattr(region, key))

    points = [tuple(best_guess)] if best_guess is not None else []
    points += [
        (get(r, "lat"), get(r, "lon"))
        for r in regions
        if get(r, "probability") >= IN_VIEW_PROBABILITY
    ]
    return credible_extent(torch.as_tensor(samples), include=points)
