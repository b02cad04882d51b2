"""Deterministic placement of map labels that overlap neither each other nor given obstacles.

Boxes are ``(x0, y0, x1, y1)`` in display pixels (y up). Labels are placed one at a time, in the
order given (most important first): each tries positions around its anchor, ring by ring
outwards, and takes the first that overlaps nothing already there and stays inside the bounds;
when none is free it takes the position with the least overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Box", "overlap_area", "place_labels"]

Box = tuple[float, float, float, float]

# Directions tried on every ring, as unit steps (dx, dy): right first, as a reader expects.
_DIRECTIONS = ((1, 0), (1, 1), (1, -1), (-1, 0), (-1, 1), (-1, -1), (0, 1), (0, -1))


def overlap_area(a: Box, b: Box) -> float:
    """Area (px^2) shared by two boxes; 0 when they only touch or are apart."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _outside_area(box: Box, bounds: Box) -> float:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return area - overlap_area(box, bounds)


def _start(centre: float, size: float, direction: int, d: float) -> float:
    """Lower edge, along one axis, of a label ``d`` px from ``centre`` in ``direction``."""
    if direction > 0:
        return centre + d
    if direction < 0:
        return centre - d - size
    return centre - size / 2


def _candidate(x: float, y: float, w: float, h: float, dx: int, dy: int, d: float) -> Box:
    """The w x h box whose side (or corner) towards (x, y) lies ``d`` px away in (dx, dy)."""
    x0, y0 = _start(x, w, dx, d), _start(y, h, dy, d)
    return (x0, y0, x0 + w, y0 + h)


def place_labels(
    anchors: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    obstacles: Sequence[Box],
    bounds: Box,
    gap: float = 4.0,
    rings: int = 12,
) -> list[Box]:
    """A box for each label, near its anchor.

    Args:
        anchors: (x, y) px the labels belong to (e.g. region markers).
        sizes: (width, height) px of each label.
        obstacles: boxes no label may cover (markers, a legend).
        bounds: box every label must stay inside (the map).
        gap: px between an anchor and the nearest side of its label on the first ring; ring
            ``k`` lies ``gap + k * height`` px away.
        rings: how far out to search.

    Returns:
        One box per label, in the order given.
    """
    placed: list[Box] = []
    for (x, y), (w, h) in zip(anchors, sizes, strict=True):
        best, best_cost = None, float("inf")
        for ring in range(rings):
            d = gap + ring * h
            for dx, dy in _DIRECTIONS:
                box = _candidate(x, y, w, h, dx, dy, d)
                cost = sum(overlap_area(box, o) for o in (*obstacles, *placed))
                cost += 10.0 * _outside_area(box, bounds)
                if cost < best_cost:
                    best, best_cost = box, cost
                if cost == 0.0:
                    break
            if best_cost == 0.0:
                break
        placed.append(best)
    return placed
