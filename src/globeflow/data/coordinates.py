"""One validation of coordinates for every reader (datasets, embed, train, evaluate).

Coordinates are degrees: latitude in [-90, 90], longitude in [-180, 180], both finite. A value
that is missing (empty, ``None``, or a float NaN, which is how stores and parquet tables write
"unknown") means "no coordinates"; text that is not a number, ``"nan"``/``"inf"`` written out,
a value out of range, or one coordinate without the other is an error with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "NO_COORDINATES",
    "CoordinateError",
    "parse_latlon",
    "valid_latlon_mask",
    "invalid_latlon_counts",
    "counts_text",
]

NO_COORDINATES = "no coordinates"
"""The reason (and skip-count key) for a row with neither coordinate."""

_RANGES = {"latitude": 90.0, "longitude": 180.0}


class CoordinateError(ValueError):
    """Coordinates that cannot be used. ``kind`` is a short reason to count rows by
    ("latitude outside [-90, 90]"); ``str(err)`` says which value ("latitude 200 outside
    [-90, 90]")."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(detail)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def _number(value: Any, name: str) -> float:
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise CoordinateError(
            "coordinates not numbers", f"{name} {value!r} is not a number"
        ) from None
    if not math.isfinite(x):
        raise CoordinateError("coordinates not finite", f"{name} {value!r} is not finite")
    bound = _RANGES[name]
    if not -bound <= x <= bound:
        interval = f"[{-bound:g}, {bound:g}]"
        raise CoordinateError(f"{name} outside {interval}", f"{name} {x:g} outside {interval}")
    return x


def parse_latlon(lat: Any, lon: Any) -> tuple[float, float] | None:
    """(lat, lon) degrees from two values as read (text, numbers or None); None when both are
    missing. Raises :class:`CoordinateError` naming the value and the problem."""
    lat_missing, lon_missing = _missing(lat), _missing(lon)
    if lat_missing and lon_missing:
        return None
    if lat_missing or lon_missing:
        given, absent = ("longitude", "latitude") if lat_missing else ("latitude", "longitude")
        raise CoordinateError(f"{given} without {absent}", f"{given} given without {absent}")
    return _number(lat, "latitude"), _number(lon, "longitude")


def valid_latlon_mask(latlon: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of ``latlon`` (N, 2) degrees that are finite and in range."""
    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(latlon).all(axis=1)
            & (np.abs(latlon[:, 0]) <= _RANGES["latitude"])
            & (np.abs(latlon[:, 1]) <= _RANGES["longitude"])
        )


def invalid_latlon_counts(latlon: np.ndarray) -> dict[str, int]:
    """Rows of ``latlon`` (N, 2) degrees that :func:`valid_latlon_mask` rejects, counted by the
    reason :func:`parse_latlon` gives (NaN stands for a missing value, as stores write it);
    vectorised, for stores of millions of rows."""
    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    lat, lon = latlon[:, 0], latlon[:, 1]
    lat_nan, lon_nan = np.isnan(lat), np.isnan(lon)
    with np.errstate(invalid="ignore"):
        # the parser's order: missing values, then the latitude, then the longitude
        conditions = [
            lat_nan & lon_nan,
            lon_nan,
            lat_nan,
            ~np.isfinite(lat),
            np.abs(lat) > _RANGES["latitude"],
            ~np.isfinite(lon),
            np.abs(lon) > _RANGES["longitude"],
        ]
    kinds = [
        NO_COORDINATES,
        "latitude without longitude",
        "longitude without latitude",
        "coordinates not finite",
        "latitude outside [-90, 90]",
        "coordinates not finite",
        "longitude outside [-180, 180]",
    ]
    counts: dict[str, int] = {}
    taken = np.zeros(len(latlon), dtype=bool)
    for condition, kind in zip(conditions, kinds, strict=True):
        hit = condition & ~taken
        if hit.any():
            counts[kind] = counts.get(kind, 0) + int(hit.sum())
        taken |= hit
    return counts


def counts_text(counts: Mapping[str, int]) -> str:
    """``{"no coordinates": 3, ...}`` -> "3 no coordinates, ..." (largest first)."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
