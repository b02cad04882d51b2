"""PNG world maps (equirectangular) drawn with offline Natural Earth coastlines.

The outlines live in ``assets/world_coastlines.json`` (built by ``scripts/build_coastlines.py``);
nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

__all__ = ["COASTLINES_ASSET", "coastlines_path", "load_coastlines", "load_borders", "render_map"]

COASTLINES_ASSET = "world_coastlines.json"


def coastlines_path() -> str:
    """Filesystem path of the bundled coastline JSON."""
    return str(resources.files("globeflow") / "assets" / COASTLINES_ASSET)


@lru_cache(maxsize=1)
def _load_asset() -> dict[str, Any]:
    with open(coastlines_path(), encoding="utf-8") as fh:
        return json.load(fh)


def load_coastlines() -> list[np.ndarray]:
    """Coastline polylines, each an (K, 2) float array of ``[lon, lat]`` degrees."""
    return [np.asarray(line, dtype=np.float64) for line in _load_asset()["coastlines"]]


def load_borders() -> list[np.ndarray]:
    """Land borders between countries, each an (K, 2) float array of ``[lon, lat]`` degrees."""
    return [np.asarray(line, dtype=np.float64) for line in _load_asset().get("borders", [])]


def _place_label(place: dict | None) -> str:
    if not place:
        return ""
    parts = [place.get("city") or "", place.get("country") or place.get("country_code") or ""]
    return ", ".join(p for p in parts if p)


def render_map(
    path: str | os.PathLike[str],
    samples_latlon: Any = None,
    density: dict | None = None,
    best_guess: tuple[float, float] | None = None,
    truth: tuple[float, float] | None = None,
    regions: Sequence[dict] | None = None,
    title: str | None = None,
    width_px: int = 1600,
    dpi: int = 160,
) -> str:
    """Write a PNG world map and return its path.

    Args:
        path: output PNG file.
        samples_latlon: (N, 2) ``[lat, lon]`` degrees (array, tensor or nested list), drawn as dots.
        density: ``{"lat": (H,), "lon": (W,), "log_density": (H, W)}`` grid, drawn as a
            translucent heatmap (normalised to its own maximum).
        best_guess: ``(lat, lon)``, drawn as a star.
        truth: ``(lat, lon)``, drawn as a cross (e.g. EXIF GPS).
        regions: dicts with ``lat``, ``lon``, ``probability`` (and optional ``place``), labelled.
        title: text above the map.
        width_px, dpi: output size; the height follows the 2:1 aspect of the projection.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe enough
    from matplotlib.patches import Rectangle

    width_in = width_px / dpi
    fig = Figure(figsize=(width_in, width_in / 2 + (0.25 if title else 0.0)), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 if not title else (width_in / 2) / fig.get_figheight()))
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.add_patch(Rectangle((-180, -90), 360, 180, color="#eaf2f8", zorder=0))
    for lon in range(-150, 181, 30):
        ax.plot([lon, lon], [-90, 90], color="#d4e0ea", lw=0.4, zorder=1)
    for lat in range(-60, 61, 30):
        ax.plot([-180, 180], [lat, lat], color="#d4e0ea", lw=0.4, zorder=1)

    if density is not None:
        lat = np.asarray(density["lat"], dtype=np.float64)
        lon = np.asarray(density["lon"], dtype=np.float64)
        logd = np.asarray(density["log_density"], dtype=np.float64)
        rel = np.exp(logd - np.nanmax(logd))
        rgba = np.zeros(rel.shape + (4,))
        rgba[..., 0], rgba[..., 1], rgba[..., 2] = 0.85, 0.15, 0.1
        # sqrt keeps the tails visible without swamping the mode.
        rgba[..., 3] = 0.75 * np.sqrt(np.clip(rel, 0.0, 1.0))
        dlat = abs(lat[1] - lat[0]) / 2 if len(lat) > 1 else 0.5
        dlon = abs(lon[1] - lon[0]) / 2 if len(lon) > 1 else 0.5
        origin = "lower" if len(lat) < 2 or lat[1] > lat[0] else "upper"
        ax.imshow(
            rgba,
            extent=(lon.min() - dlon, lon.max() + dlon, lat.min() - dlat, lat.max() + dlat),
            origin=origin,
            interpolation="bilinear",
            zorder=2,
            aspect="auto",
        )

    for line in load_coastlines():
        ax.plot(line[:, 0], line[:, 1], color="#3b4a59", lw=0.5, zorder=3)
    for line in load_borders():
        ax.plot(line[:, 0], line[:, 1], color="#8a99a8", lw=0.3, zorder=3)

    if samples_latlon is not None:
        pts = np.asarray(
            samples_latlon.detach().cpu() if hasattr(samples_latlon, "detach") else samples_latlon,
            dtype=np.float64,
        ).reshape(-1, 2)
        if len(pts):
            ax.scatter(pts[:, 1], pts[:, 0], s=2.0, color="#1f4e9c", alpha=0.5, lw=0, zorder=4)

    for i, region in enumerate(regions or []):
        rlat, rlon = float(region["lat"]), float(region["lon"])
        ax.scatter([rlon], [rlat], s=40, facecolor="none", edgecolor="#111", lw=0.8, zorder=5)
        label = f"{i + 1}. {_place_label(region.get('place'))} {100 * region['probability']:.0f}%"
        ax.annotate(
            label.replace("  ", " ").strip(),
            (rlon, rlat),
            xytext=(5, 4 + 9 * (i % 2)),
            textcoords="offset points",
            fontsize=6,
            zorder=6,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
        )
    if best_guess is not None:
        ax.scatter(
            [best_guess[1]],
            [best_guess[0]],
            marker="*",
            s=160,
            color="#f5b700",
            edgecolor="#222",
            lw=0.7,
            zorder=7,
            label="best guess",
        )
    if truth is not None:
        ax.scatter(
            [truth[1]],
            [truth[0]],
            marker="X",
            s=90,
            color="#17a34a",
            edgecolor="white",
            lw=0.7,
            zorder=8,
            label="true location",
        )
    if best_guess is not None or truth is not None:
        ax.legend(loc="lower left", fontsize=6, framealpha=0.8)
    if title:
        fig.suptitle(title, fontsize=9, y=0.995, va="top")
    fig.savefig(path, dpi=dpi, facecolor="white")
    return str(path)
