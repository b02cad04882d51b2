"""What the user already knows: a region R that the answer must lie in.

Three kinds, parsed by :func:`parse_region` from what users type:

- a bounding box ``"lat0,lon0,lat1,lon1"`` (degrees, south-west then north-east corner; a box
  with lon0 > lon1 crosses the antimeridian);
- an ISO 3166-1 alpha-2 country code (``"FR"``): a point is inside the country's bundled
  Natural Earth polygons (``assets/basemap/countries.json``, even-odd rule over its rings, all
  points at once); a country those polygons lack falls back to the offline reverse geocoder
  (the nearest GeoNames place of >= 1,000 people is in that country);
- a GeoJSON file or object (Polygon, MultiPolygon, Feature, FeatureCollection): even-odd rule,
  holes included, with straight edges in the lon/lat plane as RFC 7946 defines them, whatever
  their width: ``[-20, 0], [170, 0], ...`` spans 190 degrees of longitude eastwards from -20,
  and a ring may run along a pole (``[-180, 60], [180, 60], [180, 90], [-180, 90]`` is the cap
  north of 60 degrees). A polygon across the antimeridian is cut in two (a MultiPolygon, as RFC
  7946 asks) or continues past 180 (``[170, -20], [190, -20], ...``): a point counts at its
  longitude and 360 degrees either side. Positions outside latitude [-90, 90] or longitude
  [-540, 540], and rings that enclose no area, are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from globeflow.answers.geocode import country_name, reverse_geocode

_BBOX_LIKE = re.compile(r"^[\s\d.,+\-eE]+$")
"""What is meant as a box: numbers and commas only (then it must be four good numbers)."""
_EDGE_CHUNK = 1024


class RegionError(ValueError):
    """A region the user gave that cannot be used (one line naming it and the problem)."""


@dataclass(frozen=True)
class Region:
    """A region of the globe: ``contains(latlon (M, 2) degrees) -> (M,) bool``."""

    kind: str
    description: str
    contains: Callable[[torch.Tensor], torch.Tensor]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "description": self.description}


def parse_region(spec: str | os.PathLike | dict | Sequence[float]) -> Region:
    """A :class:`Region` from a bbox string or 4 numbers, a country code, a GeoJSON path or a
    GeoJSON dict; :class:`RegionError` naming the input otherwise."""
    if isinstance(spec, dict):
        return polygon_region(spec, "GeoJSON")
    if isinstance(spec, (list, tuple)):
        return bbox_region(*_box_numbers(list(spec), ",".join(map(str, spec))))
    text = str(spec)
    if _BBOX_LIKE.match(text) and "," in text:
        return bbox_region(*_box_numbers(text.split(","), text.strip()))
    if re.fullmatch(r"[A-Za-z]{2}", text.strip()):
        return country_region(text.strip())
    path = Path(text)
    if path.is_file():
        try:
            geojson = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegionError(f"{path}: not a readable GeoJSON file ({exc})") from None
        return polygon_region(geojson, str(path))
    raise RegionError(
        f"{text}: not a region; give lat0,lon0,lat1,lon1 (degrees), an ISO country code such as "
        "FR, or a GeoJSON file"
    )


def _box_numbers(fields: list, text: str) -> list[float]:
    """The four numbers of a box ``lat0,lon0,lat1,lon1``, or a :class:`RegionError` naming the
    field that is not a finite number."""
    if len(fields) != 4:
        raise RegionError(
            f"bounding box {text}: {len(fields)} numbers; give four, lat0,lon0,lat1,lon1 "
            "(degrees, south-west corner first)"
        )
    numbers = []
    for field in fields:
        try:
            value = float(str(field).strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RegionError(
                f"bounding box {text}: {str(field).strip()!r} is not a number of degrees; give "
                "lat0,lon0,lat1,lon1 (south-west corner first)"
            )
        numbers.append(value)
    return numbers


def bbox_region(lat0: float, lon0: float, lat1: float, lon1: float) -> Region:
    """South-west (lat0, lon0) to north-east (lat1, lon1); lon0 > lon1 crosses the antimeridian."""
    if not (-90.0 <= lat0 < lat1 <= 90.0):
        raise RegionError(
            f"bounding box {lat0},{lon0},{lat1},{lon1}: latitudes must satisfy "
            "-90 <= lat0 < lat1 <= 90 (south-west corner first)"
        )
    if not (-180.0 <= lon0 <= 180.0 and -180.0 <= lon1 <= 180.0) or lon0 == lon1:
        raise RegionError(
            f"bounding box {lat0},{lon0},{lat1},{lon1}: longitudes must lie in [-180, 180] and "
            "differ (lon0 > lon1 for a box across the antimeridian)"
        )

    def contains(latlon: torch.Tensor) -> torch.Tensor:
        lat, lon = latlon[..., 0], _wrap(latlon[..., 1])
        in_lon = (lon >= lon0) & (lon <= lon1) if lon0 < lon1 else (lon >= lon0) | (lon <= lon1)
        return (lat >= lat0) & (lat <= lat1) & in_lon

    return Region("bbox", f"{lat0:g},{lon0:g},{lat1:g},{lon1:g}", contains)


def country_region(code: str) -> Region:
    """Points inside the country ``code`` (ISO alpha-2): its bundled polygons, tested for all
    points at once; for a country without polygons, points whose nearest GeoNames populated
    place lies in it."""
    from globeflow.answers.basemap import country_rings

    code = code.upper()
    name = country_name(code)
    if name == code:
        raise RegionError(f"{code}: not an ISO 3166-1 alpha-2 country code known to GeoNames")
    rings = [torch.from_numpy(r).double() for r in country_rings(code)]
    rings = [torch.cat([r, r[:1]]) if not torch.equal(r[0], r[-1]) else r for r in rings]
    if rings:
        boxes = [(r[:, 1].min(), r[:, 1].max(), r[:, 0].min(), r[:, 0].max()) for r in rings]

        def contains(latlon: torch.Tensor) -> torch.Tensor:
            flat = latlon.reshape(-1, 2).double()
            lat, lon = flat[:, 0], _wrap(flat[:, 1])
            crossings = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
            for ring, (lat0, lat1, lon0, lon1) in zip(rings, boxes, strict=True):
                # even-odd over all the country's rings; only points in a ring's box can be in it
                near = (lat >= lat0) & (lat <= lat1) & (lon >= lon0) & (lon <= lon1)
                if bool(near.any()):
                    hits = _ray_crossings(lon[near], lat[near], ring.to(flat.device))
                    crossings[near] += hits
            return (crossings % 2 == 1).reshape(latlon.shape[:-1])

        return Region("country", f"{name} ({code})", contains)

    def geocoded(latlon: torch.Tensor) -> torch.Tensor:
        flat = latlon.reshape(-1, 2).double()
        places = reverse_geocode(flat.cpu())
        inside = torch.tensor([p.country_code == code for p in places], dtype=torch.bool)
        return inside.to(latlon.device).reshape(latlon.shape[:-1])

    return Region("country", f"{name} ({code})", geocoded)

    return Region("country", f"{name} ({code})", contains)


def polygon_region(geojson: dict, source: str) -> Region:
    """Points inside any polygon of a GeoJSON object (even-odd rule per polygon)."""
    polygons = _polygons(geojson, source)
    if not polygons:
        raise RegionError(f"{source}: no Polygon or MultiPolygon geometry found")
    rings = [[_ring(ring, source) for ring in polygon] for polygon in polygons]

    def contains(latlon: torch.Tensor) -> torch.Tensor:
        flat = latlon.reshape(-1, 2).double()
        inside = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
        for polygon in rings:
            inside |= _inside_polygon(flat, [r.to(flat.device) for r in polygon])
        return inside.reshape(latlon.shape[:-1])

    count = len(polygons)
    return Region("polygon", f"{source} ({count} polygon{'s' if count > 1 else ''})", contains)


def _wrap(lon: torch.Tensor) -> torch.Tensor:
    return torch.remainder(lon + 180.0, 360.0) - 180.0


def _polygons(obj: dict, source: str) -> list[list]:
    """Every polygon (a list of rings of [lon, lat] positions) in a GeoJSON object."""
    if not isinstance(obj, dict):
        raise RegionError(f"{source}: expected a GeoJSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return [p for f in obj.get("features") or [] for p in _polygons(f, source)]
    if kind == "Feature":
        return _polygons(obj.get("geometry") or {}, source) if obj.get("geometry") else []
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries") or [] for p in _polygons(g, source)]
    if kind == "Polygon":
        return [obj.get("coordinates") or []]
    if kind == "MultiPolygon":
        return list(obj.get("coordinates") or [])
    return []


def _ring(ring: list, source: str) -> torch.Tensor:
    """A ring as (V, 2) [lon, lat] degrees, closed; :class:`RegionError` for positions that are
    not [lon, lat] within range, fewer than 4 of them, or a ring that encloses no area."""
    try:
        xy = torch.tensor([[float(p[0]), float(p[1])] for p in ring], dtype=torch.float64)
    except (TypeError, ValueError, IndexError):
        raise RegionError(
            f"{source}: a polygon ring holds positions that are not [lon, lat]"
        ) from None
    if xy.shape[0] < 4:
        raise RegionError(f"{source}: a polygon ring has fewer than 4 positions")
    if not bool(torch.isfinite(xy).all()):
        raise RegionError(f"{source}: a polygon ring holds a position that is not a number")
    lon, lat = xy[:, 0], xy[:, 1]
    if bool((lat.abs() > 90.0).any()):
        worst = float(lat[lat.abs().argmax()])
        raise RegionError(
            f"{source}: a polygon ring has latitude {worst:g}, outside [-90, 90] (GeoJSON "
            "positions are [lon, lat])"
        )
    if bool((lon.abs() > 540.0).any()):
        raise RegionError(f"{source}: a polygon ring has a longitude outside [-540, 540]")
    if not torch.equal(xy[0], xy[-1]):  # close an open ring
        xy = torch.cat([xy, xy[:1]])
    doubled_area = (xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]).sum()
    if abs(float(doubled_area)) < 1e-12:
        raise RegionError(
            f"{source}: a polygon ring encloses no area (its positions lie on one line, e.g. "
            "a circle of latitude: a cap around a pole runs along the pole, [lon, 90])"
        )
    return xy


def _inside_polygon(latlon: torch.Tensor, rings: list[torch.Tensor]) -> torch.Tensor:
    """Even-odd rule over all rings of one polygon, for points (M, 2); each point is tried at
    lon and lon +- 360 to meet rings that continue beyond [-180, 180]."""
    inside = torch.zeros(latlon.shape[0], dtype=torch.bool, device=latlon.device)
    for shift in (0.0, 360.0, -360.0):
        crossings = torch.zeros(latlon.shape[0], dtype=torch.long, device=latlon.device)
        x, y = _wrap(latlon[:, 1]) + shift, latlon[:, 0]
        for ring in rings:
            crossings += _ray_crossings(x, y, ring)
        inside |= crossings % 2 == 1
    return inside


def _ray_crossings(x: torch.Tensor, y: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """How many edges of ``ring`` (V, 2) a ray from each (x, y) towards +x crosses: (M,)."""
    total = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    a, b = ring[:-1], ring[1:]
    for i in range(0, a.shape[0], _EDGE_CHUNK):
        ax, ay = a[i : i + _EDGE_CHUNK, 0], a[i : i + _EDGE_CHUNK, 1]
        bx, by = b[i : i + _EDGE_CHUNK, 0], b[i : i + _EDGE_CHUNK, 1]
        spans = (ay[None] > y[:, None]) != (by[None] > y[:, None])
        dy = torch.where(by == ay, torch.ones_like(by), by - ay)
        x_at = ax[None] + (y[:, None] - ay[None]) * (bx - ax)[None] / dy[None]
        total += (spans & (x[:, None] < x_at)).sum(1)
    return total
