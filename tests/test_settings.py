"""One set of limits for locate settings, shared by the command line and the server."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import FakeLocator  # noqa: E402

from globeflow.apps import server  # noqa: E402
from globeflow.apps.settings import (  # noqa: E402
    LOCATE_LIMITS,
    MAX_REGION_RADIUS_KM,
    Range,
    SettingError,
    check_settings,
)
from globeflow.core.sphere import EARTH_RADIUS_KM  # noqa: E402

BAD = {
    "guidance": [math.nan, math.inf, -math.inf, 1e9, 10.5, -1.5],
    "num_samples": [0, 15, 4097, 100_000_000, 64.5],
    "steps": [0, -3, 257],
    "top_k": [0, -1],
    "region_radius_km": [0.0, -100.0, math.nan, math.inf, MAX_REGION_RADIUS_KM + 1],
    "solver": ["rk45", "", 3],
    "precision": ["fp16", "BF16"],
    "localizability_samples": [-1, 4097],
}
GOOD = {
    "guidance": [-1.0, 0.0, 2.0, 10.0],
    "num_samples": [16, 512, 4096],
    "steps": [1, 32, 256],
    "top_k": [1, 5],
    "region_radius_km": [0.001, 500.0, MAX_REGION_RADIUS_KM],
    "solver": ["euler", "midpoint", "heun", "ddim"],
    "precision": ["fp32", "bf16"],
    "localizability_samples": [0, 128, 4096],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_value_is_named_with_its_allowed_range(name):
    for value in BAD[name]:
        with pytest.raises(SettingError) as info:
            check_settings({name: value})
        err = info.value
        assert (err.name, err.expected) == (name, LOCATE_LIMITS[name].describe())
        assert err.value is value or (value != value and err.value != err.value)  # NaN
        assert str(err) == f"{name} = {value!r}: must be {err.expected}"
    for value in GOOD[name]:
        check_settings({name: value})


def test_none_means_default_and_unknown_names_are_a_programming_error():
    check_settings({"guidance": None, "num_samples": None})
    with pytest.raises(KeyError):
        check_settings({"no_such_setting": 1})


def test_ranges_describe_themselves():
    assert Range(16, 4096, integer=True).describe() == "an integer in [16, 4096]"
    assert Range(0, 3.5, low_open=True).describe() == "a finite number in (0, 3.5]"
    # A region wider than half the globe's circumference covers all of it.
    assert MAX_REGION_RADIUS_KM == pytest.approx(math.pi * EARTH_RADIUS_KM)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def test_server_takes_its_limits_from_the_shared_table():
    locator = FakeLocator()
    with TestClient(server.create_app(locator)) as client:
        limits = client.get("/v1/health").json()["limits"]
        for name in ("num_samples", "guidance", "steps"):
            assert limits[name] == [LOCATE_LIMITS[name].low, LOCATE_LIMITS[name].high]
        for name in ("num_samples", "guidance"):
            rule = LOCATE_LIMITS[name]
            for value, status in ((rule.high, 200), (rule.high + 1, 422), (rule.low - 1, 422)):
                r = client.post(
                    "/v1/locate",
                    data={name: str(value)},
                    files={"file": ("a.jpg", _jpeg(), "image/jpeg")},
                )
                assert r.status_code == status, (name, value, r.text)


class _RecommendsTooMuch(FakeLocator):
    default_guidance = 50.0


def test_server_checks_the_models_default_guidance_too():
    with TestClient(server.create_app(_RecommendsTooMuch())) as client:
        r = client.post("/v1/locate", files={"file": ("a.jpg", _jpeg(), "image/jpeg")})
    assert r.status_code == 422
    assert r.json()["detail"] == f"guidance = 50.0: must be {LOCATE_LIMITS['guidance'].describe()}"
