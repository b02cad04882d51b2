"""The web page with a street-scale answer, in a real headless browser: the real pipeline after
sampling (regions, names, map window, OpenStreetMap link, formatting) behind a model whose
posterior is two sharp modes in Paris (tests/_fake_locator.py ``SharpModel``).

Skips like tests/test_webapp_e2e.py when Playwright or Chromium is missing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import SHARP_MODES, sharp_locator  # noqa: E402
from test_webapp_e2e import _photo, _start_server, browser  # noqa: E402, F401

UNIT_KM = {"m": 1e-3, "km": 1.0}


@pytest.fixture(scope="module")
def sharp_url():
    url, server, thread = _start_server(sharp_locator())
    yield url
    server.should_exit = True
    thread.join(10)


def _ink(page, the_map) -> dict:
    """Red (density) and blue (samples) pixels of the map, from a screenshot of it."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(the_map.screenshot())).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = int(((r > 200) & (g < 170) & (b < 170)).sum())
    blue = int(((b > r + 20) & (b > g + 20)).sum())
    return {"red": red, "blue": blue, "n": int(r.size)}


def _km(text: str) -> float:
    value, unit = re.search(r"([\d.,]+) (k?m)\b", text).groups()
    return float(value.replace(",", "")) * UNIT_KM[unit]


def test_a_street_scale_answer_is_shown_at_its_scale(browser, sharp_url, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(sharp_url + "/")
    page.wait_for_selector("text=Model: sharp-stub")
    page.set_input_files("[data-testid=file-input]", str(_photo(tmp_path / "street.jpg")))
    card = page.locator("[data-testid=result-card]").first
    page.wait_for_function(
        "document.querySelector('[data-testid=result-card]')?.dataset.state === 'done'",
        timeout=60_000,
    )
    page.screenshot(path=str(tmp_path / "sharp.png"), full_page=True)
    with page.expect_download() as dl:
        card.locator("[data-testid=download-json]").click()
    result = json.loads(Path(dl.value.path()).read_text())

    # two regions, one per mode, with their masses and radii of a few hundred metres
    regions = result["regions"]
    assert len(regions) == len(SHARP_MODES)
    names = card.locator("[data-testid=region-name]").all_inner_texts()
    extents = card.locator("[data-testid=region-extent]").all_inner_texts()
    for region, name, extent, (_, sd_km, weight) in zip(regions, names, extents, SHARP_MODES):
        assert region["probability"] == pytest.approx(weight, abs=0.06)
        assert region["radius_km"] == pytest.approx(2.146 * sd_km, rel=0.25)
        assert region["label"] in name  # named at street scale: "1.1 km NW of Paris, ..."
        assert re.search(r"\b(of|Paris)\b", region["label"])
        assert "90% within" in extent
        assert _km(extent.split("within")[1]) == pytest.approx(region["radius_km"], rel=0.06)
    assert (
        card.locator("[data-testid=best-guess]")
        .inner_text()
        .strip()
        .endswith(result["best_guess"]["label"])
    )

    # localizability on the CLI's scale, labelled, at ~28 bits; the area below 1 km2 in m2
    bits = result["localizability_vs_uniform_bits"]
    assert bits > 25
    assert (
        f"{bits:.1f} bits vs uniform" in card.locator("[data-testid=localizability]").inner_text()
    )
    km2 = result["effective_area_km2"]
    assert km2 < 1.0
    area = card.locator("[data-testid=effective-area]").inner_text()
    value = float(re.search(r"([\d,]+) m²", area).group(1).replace(",", ""))
    assert value == pytest.approx(km2 * 1e6, rel=0.05)

    # the OpenStreetMap link at the best guess, zoomed to streets
    href = card.locator("[data-testid=osm-link]").get_attribute("href")
    assert href == result["osm_url"]
    zoom, lat, lon = re.search(r"#map=(\d+)/([-\d.]+)/([-\d.]+)$", href).groups()
    assert int(zoom) >= 15
    assert float(lat) == pytest.approx(result["best_guess"]["lat"], abs=1e-4)
    assert float(lon) == pytest.approx(result["best_guess"]["lon"], abs=1e-4)

    # the map opens on the window holding the answer (a few km), not the world
    lat0, lat1, lon0, lon1 = result["map_extent"]
    assert 0.03 < lat1 - lat0 < 0.1  # 3 to 11 km tall
    zoom_button = card.locator("[data-testid=zoom-toggle]")
    assert zoom_button.is_visible() and zoom_button.inner_text() == "Show whole world"
    # zoomed in, the density and the samples cover many pixels of the map (a world map would
    # show a dot of a few pixels: 8 km are 0.2 px of a 1280 px world)
    the_map = card.locator("[data-testid=map]")
    stats = _ink(page, the_map)
    assert stats["red"] > 100 and stats["blue"] > 100, stats
    assert not errors, errors
    page.close()
