"""What a zoomed PNG map shows around the answer: the offline base map at the map's scale.

Borders and coastlines at Natural Earth's 1:10m detail, admin-1 boundaries and names, towns as
built-up disks and dots with their names (:mod:`globeflow.answers.basemap`), and a caption
naming the admin-1 region and country at the window's middle, so that a 2-km answer shows which
town it is in. Labels go where they cover no label, marker or legend; a town label that finds no
free place is left out rather than drawn over something.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from globeflow.answers.basemap import (
    SMALL_WINDOW_DEG,
    MapPlace,
    admin1_in,
    built_up_radius_km,
    lines_in,
    places_in,
)
from globeflow.answers.label_placement import overlap_area, place_labels
from globeflow.answers.zoom import KM_PER_DEG

__all__ = ["ADMIN1_MAX_DEG", "MAX_TOWNS", "draw_context", "label_towns"]

ADMIN1_MAX_DEG = 30.0
"""Windows at most this tall show admin-1 boundaries and names."""
MAX_TOWNS = 14
"""Most towns named on one map."""
_TOWN_COLOR = "#2b2f36"
_BUILT_UP = "#efd9b4"


def draw_context(ax, window: tuple[float, float, float, float]) -> tuple[list[MapPlace], tuple]:
    """Draw the base map of a zoomed window on ``ax`` (data coordinates lon, lat); returns the
    towns to label (most important first, see :func:`label_towns`) and the caption's display
    box, for labels to avoid."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Ellipse

    lat0, lat1, lon0, lon1 = window
    height = lat1 - lat0
    towns = places_in(window, limit=MAX_TOWNS * 3)
    cos_lat = max(np.cos(np.radians((lat0 + lat1) / 2)), 1e-3)
    for town in towns:
        radius_deg = built_up_radius_km(town.population) / KM_PER_DEG
        if radius_deg > 0.002 * height:  # disks smaller than a dot are left to the dot
            ax.add_patch(
                Ellipse((town.lon, town.lat), 2 * radius_deg / cos_lat, 2 * radius_deg,
                        color=_BUILT_UP, alpha=0.8, lw=0, zorder=1.5)
            )  # fmt: skip
    styles = {
        "admin1": {"colors": "#9aa6b2", "linewidths": 0.45, "linestyles": (0, (3, 2))},
        "borders": {"colors": "#6f7f8f", "linewidths": 0.8},
        "coastlines": {"colors": "#3b4a59", "linewidths": 0.6},
    }
    for kind, style in styles.items():
        if kind == "admin1" and height > ADMIN1_MAX_DEG:
            continue
        ax.add_collection(LineCollection(lines_in(kind, window), zorder=3, **style))
    if height <= ADMIN1_MAX_DEG:
        for region in admin1_in(window)[:8]:
            ax.text(region.lon, region.lat, region.name, fontsize=6.5, color="#7b8794",
                    style="italic", ha="center", va="center", zorder=3.2, clip_on=True,
                    gid="admin1-label")  # fmt: skip
    shown = [t for t in towns if t.population or height <= SMALL_WINDOW_DEG][:MAX_TOWNS]
    if shown:
        ax.scatter([t.lon for t in shown], [t.lat for t in shown], s=6, color=_TOWN_COLOR,
                   lw=0, zorder=3.5)  # fmt: skip
    return shown, _caption(ax, window)


def _caption(ax, window: tuple[float, float, float, float]) -> tuple:
    """'Region, Country' of the window's middle in the upper left; returns its display box."""
    from globeflow.answers.geocode import reverse_geocode

    lat0, lat1, lon0, lon1 = window
    mid = ((lat0 + lat1) / 2.0, ((lon0 + lon1) / 2.0 + 180.0) % 360.0 - 180.0)
    place = reverse_geocode(np.array([mid]))[0]
    text = ", ".join(dict.fromkeys(p for p in (place.region, place.country) if p))
    if not text:
        return (0.0, 0.0, 0.0, 0.0)
    artist = ax.text(0.012, 0.975, text, transform=ax.transAxes, fontsize=6.5, ha="left",
                     va="top", zorder=9, color="#1c2430", gid="caption",
                     bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#c5cfd9",
                           "lw": 0.5, "alpha": 0.9})  # fmt: skip
    box = artist.get_window_extent(ax.figure.canvas.get_renderer())
    return (box.x0 - 3, box.y0 - 3, box.x1 + 3, box.y1 + 3)


def label_towns(ax, towns: Sequence[MapPlace], obstacles: Sequence[tuple]) -> list[str]:
    """Name the towns next to their dots where the name covers no obstacle (display-pixel
    boxes) and no other name; returns the names drawn."""
    if not towns:
        return []
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    bounds = tuple(ax.get_window_extent(renderer).extents)
    texts, anchors, sizes = [], [], []
    for town in towns:
        text = ax.text(0, 0, town.name, fontsize=5.5, color=_TOWN_COLOR, ha="left",
                       va="bottom", zorder=5.5, gid="town-label")  # fmt: skip
        extent = text.get_window_extent(renderer)
        texts.append(text)
        anchors.append(tuple(ax.transData.transform((town.lon, town.lat))))
        sizes.append((extent.width + 2.0, extent.height + 2.0))
    dots = [(x - 3, y - 3, x + 3, y + 3) for x, y in anchors]
    blocked = list(obstacles) + dots
    to_data = ax.transData.inverted()
    drawn: list[str] = []
    placed: list[tuple] = []
    for text, anchor, size, town in zip(texts, anchors, sizes, towns):
        box = place_labels([anchor], [size], blocked + placed, bounds, gap=3.0, rings=2)[0]
        inside = bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1]
        free = inside and box[3] <= bounds[3]
        free = free and all(overlap_area(box, o) == 0 for o in blocked + placed)
        if not free:
            text.remove()
            continue
        text.set_position(to_data.transform((box[0] + 1.0, box[1] + 1.0)))
        placed.append(box)
        drawn.append(town.name)
    return drawn
