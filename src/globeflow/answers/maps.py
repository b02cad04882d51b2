"""PNG maps (equirectangular) drawn with offline Natural Earth and GeoNames context.

A map shows the window that holds the answer (:func:`globeflow.answers.zoom.answer_extent`), with
a scale bar, a world inset that marks the window and the base map at the window's scale
(:mod:`globeflow.answers.map_context`: borders, admin-1 regions, towns and their names), or the
whole world when the answer spreads over it. World outlines live in
``assets/world_coastlines.json`` (``scripts/build_coastlines.py``), the base map in
``assets/basemap/`` (``scripts/build_basemap.py``); nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from globeflow.answers.geocode import format_km, region_label
from globeflow.answers.map_context import draw_context, label_towns
from globeflow.answers.zoom import KM_PER_DEG, answer_extent

__all__ = [
    "COASTLINES_ASSET",
    "coastlines_path",
    "draw_map",
    "load_borders",
    "load_coastlines",
    "render_map",
]

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


_DENSITY_RGB = (0.85, 0.15, 0.1)
_SAMPLE_COLOR = "#1f4e9c"
_REGION_MARKER_PT2 = 40.0
_STAR_PT2 = 160.0
_CROSS_PT2 = 90.0


def render_map(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> str:
    """Write the PNG map of :func:`draw_map` (same arguments after ``path``) and return its
    path."""
    fig = draw_map(*args, **kwargs)
    fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return str(path)


def draw_map(
    samples_latlon: Any = None,
    density: dict | None = None,
    best_guess: tuple[float, float] | None = None,
    truth: tuple[float, float] | None = None,
    regions: Sequence[dict] | None = None,
    title: str | None = None,
    width_px: int = 1600,
    dpi: int = 160,
    extent: tuple[float, float, float, float] | str | None = "auto",
):
    """A map of an answer (matplotlib ``Figure`` with an Agg canvas, equirectangular).

    Args:
        samples_latlon: (N, 2) ``[lat, lon]`` degrees (array, tensor or nested list), drawn as dots.
        density: ``{"lat": (H,), "lon": (W,), "log_density": (H, W)}`` grid, drawn as a
            translucent heatmap (normalised to its own maximum).
        best_guess: ``(lat, lon)``, drawn as a star.
        truth: ``(lat, lon)``, drawn as a cross (e.g. EXIF GPS).
        regions: dicts with ``lat``, ``lon``, ``probability`` (and optional ``place``), circled
            and labelled; labels avoid each other, the markers and the legend.
        title: text above the map.
        width_px, dpi: output size; the height follows the 2:1 aspect of the projection.
        extent: the window (lat0, lat1, lon0, lon1) degrees to show (lon1 may pass 180), e.g.
            a result's ``map_extent``; "auto" (default) the window that holds the samples, the
            best guess and the main regions; None the whole world. A window shows a scale bar
            and a world inset marking where it lies.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe enough

    width_in = width_px / dpi
    fig = Figure(figsize=(width_in, width_in / 2 + (0.25 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 if not title else (width_in / 2) / fig.get_figheight()))
    pts = _as_latlon(samples_latlon)
    regions = [dict(r) for r in regions or []]
    if isinstance(extent, str):
        extent = answer_extent(pts, best_guess, regions)
    # Longitudes turned by whole turns into the window, so that one crossing 180 draws whole.
    lon0 = extent[2] if extent is not None else -180.0
    pts = pts.copy()
    pts[:, 1] = _into(pts[:, 1], lon0)
    for r in regions:
        r["lon"] = float(_into(float(r["lon"]), lon0))
    best_guess = (best_guess[0], float(_into(best_guess[1], lon0))) if best_guess else None
    truth = (truth[0], float(_into(truth[1], lon0))) if truth else None
    _draw_background(ax, extent)
    if density is not None:
        _draw_density(ax, density)
    towns: list = []
    obstacles = []
    if extent is None:
        _draw_outlines(ax, None)
    else:
        towns, caption = draw_context(ax, extent)
        obstacles.append(caption)
    if len(pts):
        ax.scatter(pts[:, 1], pts[:, 0], s=2.0, color=_SAMPLE_COLOR, alpha=0.5, lw=0, zorder=4)
    _draw_markers(ax, regions, best_guess, truth)
    if extent is not None:
        _draw_region_radii(ax, regions)
    legend = _draw_legend(ax, len(pts), density is not None, bool(regions), best_guess, truth)
    if extent is not None:
        obstacles.append(_draw_scale_bar(ax, extent))
        obstacles.append(_draw_world_inset(fig, ax, extent, pts, best_guess, truth))
    taken = _draw_region_labels(ax, regions, best_guess, truth, legend, obstacles)
    label_towns(ax, towns, taken)
    if title:
        fig.suptitle(title, fontsize=9, y=0.995, va="top")
    return fig


def _draw_markers(ax, regions: list[dict], best_guess, truth) -> None:
    """Circles at the regions' centres, a star at the best guess, a cross at the truth."""
    for region in regions:
        ax.scatter([float(region["lon"])], [float(region["lat"])], s=_REGION_MARKER_PT2,
                   facecolor="none", edgecolor="#111", lw=0.8, zorder=5)  # fmt: skip
    if best_guess is not None:
        ax.scatter([best_guess[1]], [best_guess[0]], marker="*", s=_STAR_PT2, color="#f5b700",
                   edgecolor="#222", lw=0.7, zorder=7)  # fmt: skip
    if truth is not None:
        ax.scatter([truth[1]], [truth[0]], marker="X", s=_CROSS_PT2, color="#17a34a",
                   edgecolor="white", lw=0.7, zorder=8)  # fmt: skip


def _as_latlon(samples_latlon: Any) -> np.ndarray:
    if samples_latlon is None:
        return np.zeros((0, 2))
    if hasattr(samples_latlon, "detach"):
        samples_latlon = samples_latlon.detach().cpu()
    return np.asarray(samples_latlon, dtype=np.float64).reshape(-1, 2)


def _into(lon, lon0: float):
    """Longitudes (scalar or array) turned by whole turns into [lon0, lon0 + 360)."""
    return (np.asarray(lon, dtype=np.float64) - lon0) % 360.0 + lon0


def _nice(value: float) -> float:
    """The largest 1, 2 or 5 times a power of ten not above ``value`` (> 0)."""
    power = 10.0 ** np.floor(np.log10(value))
    return max(m * power for m in (1.0, 2.0, 5.0) if m * power <= value)


def _draw_background(ax, extent: tuple | None) -> None:
    """Sea, graticule and limits: the whole world (extent None) or the window, drawn true to
    scale at its middle latitude."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    lat0, lat1, lon0, lon1 = extent if extent is not None else (-90.0, 90.0, -180.0, 180.0)
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    ax.set_aspect(1.0 / np.cos(np.radians((lat0 + lat1) / 2)) if extent is not None else "equal")
    ax.set_axis_off()
    ax.add_patch(Rectangle((lon0, lat0), lon1 - lon0, lat1 - lat0, color="#eaf2f8", zorder=0))
    step = 30.0 if extent is None else _nice((lat1 - lat0) / 3)
    lons = np.arange(np.ceil(lon0 / step) * step, lon1, step)
    lats = np.arange(np.ceil(lat0 / step) * step, lat1, step)
    grid = [[(x, lat0), (x, lat1)] for x in lons if extent is not None or abs(x) < 180]
    grid += [[(lon0, y), (lon1, y)] for y in lats if extent is not None or abs(y) < 90]
    ax.add_collection(LineCollection(grid, colors="#d4e0ea", linewidths=0.4, zorder=1))


def _draw_density(ax, density: dict) -> None:
    lat = np.asarray(density["lat"], dtype=np.float64)
    lon = np.asarray(density["lon"], dtype=np.float64)
    logd = np.asarray(density["log_density"], dtype=np.float64)
    rel = np.exp(logd - np.nanmax(logd))
    rgba = np.zeros(rel.shape + (4,))
    rgba[..., :3] = _DENSITY_RGB
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


@lru_cache(maxsize=1)
def _outline_segments() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return load_coastlines(), load_borders()


def _draw_outlines(ax, extent: tuple | None = None, scale: float = 1.0) -> None:
    # One collection per kind: hundreds of separate lines made every map take ~0.5 s longer.
    from matplotlib.collections import LineCollection

    coast, borders = _outline_segments()
    turns = [0.0, 360.0] if extent is not None and extent[3] > 180.0 else [0.0]
    for turn in turns:
        shift = np.array([turn, 0.0])
        ax.add_collection(
            LineCollection(
                [c + shift for c in coast], colors="#3b4a59", linewidths=0.5 * scale, zorder=3
            )
        )
        ax.add_collection(
            LineCollection(
                [b + shift for b in borders], colors="#8a99a8", linewidths=0.3 * scale, zorder=3
            )
        )


def _draw_region_radii(ax, regions: list[dict]) -> None:
    """A dashed circle of each region's ``radius_km`` (an ellipse in degrees: the window is
    true to scale), on a zoomed map where it shows."""
    from matplotlib.patches import Ellipse

    for region in regions:
        radius_km = float(region.get("radius_km") or 0.0)
        lat = float(region["lat"])
        height = 2 * radius_km / KM_PER_DEG
        width = height / max(np.cos(np.radians(lat)), 1e-3)
        ax.add_patch(
            Ellipse((float(region["lon"]), lat), width, height, fill=False, ls=(0, (3, 2)),
                    edgecolor="#111", lw=0.6, alpha=0.7, zorder=5)
        )  # fmt: skip


def _draw_scale_bar(ax, extent: tuple) -> tuple:
    """A bar of a round length (about a fifth of the window) in the lower right; returns its
    display box (with its label), for the labels to avoid."""
    lat0, lat1, lon0, lon1 = extent
    width_km = (lon1 - lon0) * KM_PER_DEG * np.cos(np.radians((lat0 + lat1) / 2))
    bar_km = _nice(width_km / 5)
    frac = bar_km / width_km
    x1, y = 0.97, 0.05
    ax.plot([x1 - frac, x1], [y, y], color="#222", lw=2.0, transform=ax.transAxes, zorder=9)
    ax.plot([x1 - frac, x1], [y, y], color="white", lw=0.8, transform=ax.transAxes, zorder=9)
    fig = ax.figure
    x_fig, y_fig = fig.transFigure.inverted().transform(ax.transAxes.transform((x1 - frac / 2, y)))
    text = fig.text(
        x_fig, y_fig + 0.012, format_km(bar_km), ha="center", va="bottom", fontsize=6, zorder=9
    )
    renderer = fig.canvas.get_renderer()
    box = text.get_window_extent(renderer)
    left, bottom = ax.transAxes.transform((x1 - frac, y))
    right = ax.transAxes.transform((x1, y))[0]
    return (min(left, box.x0) - 2, bottom - 4, max(right, box.x1) + 2, box.y1 + 2)


def _draw_world_inset(fig, ax, extent: tuple, pts, best_guess, truth) -> tuple:
    """A small world map in the upper right corner with the window outlined (and the true
    location, which may lie outside the window); returns its display box."""
    from matplotlib.patches import Rectangle

    box = ax.get_position()
    width = 0.2
    height = width * fig.get_figwidth() / fig.get_figheight() / 2
    inset = fig.add_axes((box.x1 - width - 0.005, box.y1 - height - 0.01, width, height))
    _draw_background(inset, None)
    _draw_outlines(inset, None, scale=0.6)
    for patch in inset.patches:
        patch.set_edgecolor("#3b4a59")
        patch.set_linewidth(0.6)
    world = pts.copy()
    world[:, 1] = (world[:, 1] + 180.0) % 360.0 - 180.0
    if len(world):
        inset.scatter(world[:, 1], world[:, 0], s=0.5, color=_SAMPLE_COLOR, lw=0, zorder=4)
    lat0, lat1, lon0, lon1 = extent
    # at least a few points wide, so that a street-sized window still shows
    grow = max(0.0, 6.0 - (lon1 - lon0)) / 2, max(0.0, 6.0 - (lat1 - lat0)) / 2
    for turn in (0.0, -360.0):
        inset.add_patch(
            Rectangle(
                (lon0 - grow[0] + turn, lat0 - grow[1]),
                lon1 - lon0 + 2 * grow[0],
                lat1 - lat0 + 2 * grow[1],
                fill=False,
                edgecolor="#d62718",
                lw=1.0,
                zorder=6,
            )
        )
    if truth is not None:
        lon = (truth[1] + 180.0) % 360.0 - 180.0
        inset.scatter([lon], [truth[0]], marker="X", s=18, color="#17a34a", lw=0.3, zorder=7)
    return tuple(inset.get_window_extent(fig.canvas.get_renderer()).extents)


def _draw_legend(ax, n_samples: int, has_density: bool, has_regions: bool, best_guess, truth):
    """A legend for whatever the map shows (``None`` when it shows nothing to explain)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    if has_density:
        handles.append(
            Patch(color=(*_DENSITY_RGB, 0.55), label="probability density (darker: more likely)")
        )
    marker = {"ls": "", "xdata": [], "ydata": []}
    if n_samples:
        handles.append(
            Line2D(**marker, marker="o", ms=2.5, color=_SAMPLE_COLOR, label=f"{n_samples} samples")
        )
    if has_regions:
        handles.append(
            Line2D(**marker, marker="o", ms=5, mfc="none", mec="#111", label="top regions")
        )
    if best_guess is not None:
        handles.append(
            Line2D(**marker, marker="*", ms=10, color="#f5b700", mec="#222", label="best guess")
        )
    if truth is not None:
        handles.append(
            Line2D(**marker, marker="X", ms=8, color="#17a34a", mec="white", label="true location")
        )
    if not handles:
        return None
    return ax.legend(handles=handles, loc="lower left", fontsize=6, framealpha=0.85)


def _marker_box(ax, lat: float, lon: float, area_pt2: float) -> tuple:
    """Display-pixel box of a scatter marker of ``area_pt2`` (points^2) at (lat, lon)."""
    x, y = ax.transData.transform((lon, lat))
    half = np.sqrt(area_pt2) / 2 * ax.figure.dpi / 72
    return (x - half, y - half, x + half, y + half)


def _draw_region_labels(
    ax, regions: list[dict], best_guess, truth, legend, boxes: Sequence[tuple] = ()
) -> list[tuple]:
    """Label each region (rank, place, probability) where it covers no other label, marker,
    the legend or ``boxes`` (display pixels: scale bar, inset); a thin line joins a label pushed
    away from its circle. Returns the boxes now taken (those, the markers and the labels)."""
    from globeflow.answers.label_placement import place_labels

    renderer = ax.figure.canvas.get_renderer()
    obstacles = [_marker_box(ax, r["lat"], r["lon"], _REGION_MARKER_PT2) for r in regions]
    if best_guess is not None:
        obstacles.append(_marker_box(ax, best_guess[0], best_guess[1], _STAR_PT2))
    if truth is not None:
        obstacles.append(_marker_box(ax, truth[0], truth[1], _CROSS_PT2))
    if legend is not None:
        obstacles.append(tuple(legend.get_window_extent(renderer).extents))
    obstacles += list(boxes)
    if not regions:
        return obstacles
    texts, anchors, sizes = [], [], []
    fontsize = 6
    pad_px = 0.15 * fontsize * ax.figure.dpi / 72 + 1.0  # the label's rounded box, + 1 px
    for i, region in enumerate(regions):
        radius_km = region.get("radius_km", 0.0)
        name = region.get("label") or region_label(region.get("place"), radius_km)
        label = f"{i + 1}. {name} {100 * region['probability']:.0f}%"
        text = ax.text(
            0,
            0,
            label.replace("  ", " ").strip(),
            fontsize=fontsize,
            zorder=6,
            ha="left",
            va="bottom",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            gid="region-label",
        )
        extent = text.get_window_extent(renderer)
        texts.append(text)
        anchors.append(tuple(ax.transData.transform((region["lon"], region["lat"]))))
        sizes.append((extent.width + 2 * pad_px, extent.height + 2 * pad_px))
    bounds = tuple(ax.get_window_extent(renderer).extents)
    gap = np.sqrt(_REGION_MARKER_PT2) / 2 * ax.figure.dpi / 72 + 2.0
    to_data = ax.transData.inverted()
    placed = place_labels(anchors, sizes, obstacles, bounds, gap=gap)
    for text, anchor, box in zip(texts, anchors, placed):
        text.set_position(to_data.transform((box[0] + pad_px, box[1] + pad_px)))
        nearest = (min(max(anchor[0], box[0]), box[2]), min(max(anchor[1], box[1]), box[3]))
        if np.hypot(nearest[0] - anchor[0], nearest[1] - anchor[1]) > 2 * gap:
            ax.plot(
                *zip(to_data.transform(anchor), to_data.transform(nearest)),
                color="#111",
                lw=0.6,
                zorder=5,
            )
    return obstacles + placed
