"""One validation of coordinates: range, finiteness, numbers, pairing; counted by reason."""

from __future__ import annotations

import math

import numpy as np
import pytest

from globeflow.data.coordinates import (
    CoordinateError,
    counts_text,
    invalid_latlon_counts,
    parse_latlon,
    valid_latlon_mask,
)


@pytest.mark.parametrize(
    ("lat", "lon", "expected"),
    [
        ("48.85", " 2.35 ", (48.85, 2.35)),
        (-90, 180, (-90.0, 180.0)),
        (90.0, -180.0, (90.0, -180.0)),
        ("", "", None),
        (None, None, None),
        (math.nan, math.nan, None),  # how stores and parquet write "unknown"
    ],
)
def test_usable_and_missing_coordinates(lat, lon, expected):
    assert parse_latlon(lat, lon) == expected


@pytest.mark.parametrize(
    ("lat", "lon", "kind", "detail"),
    [
        ("200", "2", "latitude outside [-90, 90]", "latitude 200 outside [-90, 90]"),
        (10, 400, "longitude outside [-180, 180]", "longitude 400 outside [-180, 180]"),
        (10, 180.5, "longitude outside [-180, 180]", "longitude 180.5 outside [-180, 180]"),
        ("abc", "2", "coordinates not numbers", "latitude 'abc' is not a number"),
        ("1", "nan", "coordinates not finite", "longitude 'nan' is not finite"),
        ("inf", "2", "coordinates not finite", "latitude 'inf' is not finite"),
        ("48.8", "", "latitude without longitude", "latitude given without longitude"),
        (None, 2.0, "longitude without latitude", "longitude given without latitude"),
    ],
)
def test_unusable_coordinates_say_why(lat, lon, kind, detail):
    with pytest.raises(CoordinateError) as info:
        parse_latlon(lat, lon)
    assert info.value.kind == kind and str(info.value) == detail


def test_the_mask_and_the_counts_agree_with_the_parser():
    latlon = np.array(
        [[48.8, 2.3], [np.nan, np.nan], [200.0, 0.0], [0.0, -400.0], [np.inf, 0.0], [1.0, np.nan]]
    )
    assert valid_latlon_mask(latlon).tolist() == [True, False, False, False, False, False]
    counts = invalid_latlon_counts(latlon)
    assert counts == {
        "no coordinates": 1,
        "latitude outside [-90, 90]": 1,
        "longitude outside [-180, 180]": 1,
        "coordinates not finite": 1,
        "latitude without longitude": 1,
    }
    assert counts_text({"a": 1, "b": 3}) == "3 b, 1 a"
    values = [np.nan, np.inf, -np.inf, 0.0, 90.0, 90.5, -200.0, 180.0, 400.0]
    grid = np.array([(a, b) for a in values for b in values])
    by_parser: dict[str, int] = {}
    for lat, lon in grid[~valid_latlon_mask(grid)]:
        try:
            kind = "no coordinates" if parse_latlon(lat, lon) is None else "valid"
        except CoordinateError as exc:
            kind = exc.kind
        by_parser[kind] = by_parser.get(kind, 0) + 1
    assert invalid_latlon_counts(grid) == by_parser
