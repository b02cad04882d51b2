"""The web page in a real headless browser (Playwright + Chromium): exact assertions against a
fake locator, and one run of the real pipeline (bundled model + offline encoder).

Skips when Playwright or a Chromium executable is missing. Screenshots go to tmp; the README's
(docs/screenshot.png, a street-scale answer) is written by tests/test_webapp_map.py when
GLOBEFLOW_SCREENSHOT=1 (or GLOBEFLOW_SCREENSHOT=path.png).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, TiffImagePlugin

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import FakeLocator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = (
    os.environ.get("GLOBEFLOW_CHROMIUM", ""),
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    for cand in CHROMIUM_CANDIDATES:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright not installed (pip install playwright)"
    )
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium executable (apt-get install chromium, or set GLOBEFLOW_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _start_server(locator, tiles=None):
    """A live server; ``tiles`` None: the page's offline base map only (no network in tests)."""
    from _live_server import start_live_server

    from globeflow.apps.server import create_app

    port, server, thread = start_live_server(create_app(locator, tiles=tiles))
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def server_url():
    url, server, thread = _start_server(FakeLocator(delay_s=0.3))
    yield url
    server.should_exit = True
    thread.join(10)


def _photo(path: Path, gps: tuple[float, float] | None = None) -> Path:
    """A small synthetic 'street' photo: sky, buildings, road."""
    img = Image.new("RGB", (640, 427), (135, 185, 235))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 300, 640, 427), fill=(90, 90, 95))
    for i, x in enumerate(range(0, 640, 80)):
        h = 120 + (i * 37) % 110
        d.rectangle((x + 4, 300 - h, x + 74, 300), fill=(200 - i * 9, 170 - i * 5, 140 + i * 6))
        for wy in range(300 - h + 12, 290, 28):
            d.rectangle((x + 14, wy, x + 30, wy + 14), fill=(250, 240, 200))
            d.rectangle((x + 46, wy, x + 62, wy + 14), fill=(250, 240, 200))
    d.line((0, 380, 640, 380), fill=(240, 240, 240), width=4)
    kwargs = {}
    if gps is not None:
        exif = Image.Exif()
        ifd = exif.get_ifd(0x8825)

        def dms(v: float) -> tuple:
            v = abs(v)
            deg, mins = int(v), int((abs(v) - int(v)) * 60)
            sec = (v - deg - mins / 60) * 3600
            return tuple(
                TiffImagePlugin.IFDRational(Fraction(t).limit_denominator(10000))
                for t in (deg, mins, sec)
            )

        ifd[1], ifd[2] = ("N" if gps[0] >= 0 else "S"), dms(gps[0])
        ifd[3], ifd[4] = ("E" if gps[1] >= 0 else "W"), dms(gps[1])
        kwargs["exif"] = exif.tobytes()
    img.save(path, "JPEG", quality=88, **kwargs)
    return path


def _screenshot_path(tmp_path: Path, real: bool = False) -> Path:
    flag = os.environ.get("GLOBEFLOW_SCREENSHOT", "") if real else ""
    if flag.lower().endswith(".png"):
        return Path(flag)
    if flag and flag not in ("0", "false", "no"):
        return REPO / "docs" / "screenshot.png"
    return tmp_path / "screenshot.png"


def test_upload_shows_map_regions_and_best_guess(browser, server_url, tmp_path) -> None:
    from _fake_locator import _haversine_km

    from globeflow.data.images import read_exif_gps

    photo = REPO / "examples" / "paris.jpg"
    if not photo.is_file() or read_exif_gps(photo) is None:
        photo = _photo(tmp_path / "lyon-street.jpg", gps=(45.764, 4.8357))
    truth = read_exif_gps(photo)
    expected_km = _haversine_km((48.85, 2.35), truth)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server_url + "/")
    page.wait_for_selector("text=Model: fake-model")

    page.set_input_files("[data-testid=file-input]", str(photo))
    card = page.locator("[data-testid=result-card]").first
    card.locator("[data-testid=region-row]").first.wait_for(timeout=20_000)
    page.wait_for_function(
        "document.querySelector('[data-testid=result-card]').dataset.state === 'done'"
    )

    assert card.locator("[data-testid=file-name]").inner_text() == photo.name
    best = card.locator("[data-testid=best-guess]").inner_text()
    assert "Paris" in best and "France" in best
    assert "48.850° N" in card.locator("[data-testid=best-guess-coords]").inner_text()
    names = card.locator("[data-testid=region-name]").all_inner_texts()
    assert len(names) == 3
    assert "Paris" in names[0] and "New York City" in names[1] and "Lyon" in names[2]
    probs = card.locator("[data-testid=region-probability]").all_inner_texts()
    assert [p.strip() for p in probs] == ["55%", "30%", "15%"]
    # the CLI's scale, labelled (the raw localizability_bits of 3.31 is not shown)
    assert "7.0 bits vs uniform" in card.locator("[data-testid=localizability]").inner_text()
    assert "4.1 million km²" in card.locator("[data-testid=effective-area]").inner_text()
    assert (
        f"{abs(truth[0]):.3f}° {'N' if truth[0] >= 0 else 'S'}"
        in card.locator("[data-testid=truth]").inner_text()
    )
    shown = card.locator("[data-testid=error-km]").inner_text()
    value, unit = re.match(r"([\d.,]+) (k?m)\b", shown).groups()
    km = float(value.replace(",", "")) / (1000.0 if unit == "m" else 1.0)
    assert km == pytest.approx(expected_km, rel=0.05, abs=1.0)
    assert card.locator("[data-testid=spinner]").is_hidden()
    assert card.locator("[data-testid=error]").is_hidden()

    # the interactive map: the density, the three regions, the best guess and the truth
    the_map = card.locator("[data-testid=map]")
    assert the_map.is_visible()
    box = the_map.bounding_box()
    assert box["width"] >= 400 and abs(box["width"] - 2 * box["height"]) <= 3
    layers = the_map.evaluate("e => Object.keys(e.globeflowMap.overlays)")
    assert layers == ["Probability density", "Samples (1024)", "Top regions", "Best guess",
                      "True location (EXIF GPS)"]  # fmt: skip
    assert the_map.locator(".gf-region").count() == 3
    assert the_map.locator(".gf-star").count() == 1 and the_map.locator(".gf-truth").count() == 1
    assert the_map.get_attribute("data-base") == "offline"
    # an answer without a window (map_extent) is shown on the whole world: nothing to toggle
    assert card.locator("[data-testid=zoom-toggle]").is_hidden()

    # client-side downloads
    with page.expect_download() as dl:
        card.locator("[data-testid=download-geojson]").click()
    geo = Path(dl.value.path()).read_text()
    assert '"FeatureCollection"' in geo and '"exif_gps"' in geo
    assert dl.value.suggested_filename == f"{photo.stem}.geojson"
    with page.expect_download() as dl:
        card.locator("[data-testid=download-json]").click()
    assert '"best_guess"' in Path(dl.value.path()).read_text()

    out = _screenshot_path(tmp_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 20_000
    assert not errors, errors
    page.close()


def test_bad_file_shows_readable_error(browser, server_url, tmp_path) -> None:
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is not really a photo\n" * 10)
    page = browser.new_page(viewport={"width": 420, "height": 900})  # phone-sized layout
    page.goto(server_url + "/")
    page.set_input_files("[data-testid=file-input]", str(bad))
    err = page.locator("[data-testid=result-card] [data-testid=error]").first
    err.wait_for(state="visible", timeout=20_000)
    text = err.inner_text()
    assert text.startswith("holiday.jpg: ") and "422" not in text, text  # the reason, in words
    thumb = page.locator("[data-testid=result-card] [data-testid=thumbnail]").first
    thumb.wait_for(state="hidden", timeout=5_000)  # no broken-image icon
    # the page keeps working: a good photo after the bad one is located
    page.set_input_files("[data-testid=file-input]", str(_photo(tmp_path / "ok.jpg")))
    page.locator("[data-testid=result-card]").first.locator(
        "[data-testid=region-row]"
    ).first.wait_for(timeout=20_000)
    assert page.locator("[data-testid=result-card]").count() == 2
    page.close()


def test_real_pipeline_in_the_browser(browser, tmp_path) -> None:
    """The bundled model and encoder behind the page: an example photo goes in, a map, a best
    guess with a place name, regions with probabilities and the EXIF truth come out."""
    from globeflow.apps.pipeline import Locator, default_model_path
    from globeflow.data.images import read_exif_gps

    photo = REPO / "examples" / "paris.jpg"
    if not (default_model_path() / "model.safetensors").is_file() or not photo.is_file():
        pytest.skip("bundled model or examples/paris.jpg missing")
    url, server, thread = _start_server(Locator.from_pretrained())
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.set_input_files("[data-testid=file-input]", str(photo))
        card = page.locator("[data-testid=result-card]").first
        card.locator("[data-testid=region-row]").first.wait_for(timeout=120_000)
        page.wait_for_function(
            "document.querySelector('[data-testid=result-card]').dataset.state === 'done'",
            timeout=120_000,
        )
        assert re.search(r"[A-Za-z]", card.locator("[data-testid=best-guess]").inner_text())
        probs = [
            float(p.strip().rstrip("%"))
            for p in card.locator("[data-testid=region-probability]").all_inner_texts()
        ]
        assert probs and all(0 < p <= 100 for p in probs) and sum(probs) <= 100.5
        assert probs == sorted(probs, reverse=True)
        assert "bits vs uniform" in card.locator("[data-testid=localizability]").inner_text()
        osm = card.locator("[data-testid=osm-link]").get_attribute("href")
        assert osm.startswith("https://www.openstreetmap.org/?mlat=")
        lat, _ = read_exif_gps(photo)
        assert f"{abs(lat):.3f}" in card.locator("[data-testid=truth]").inner_text()
        assert re.search(r"\d", card.locator("[data-testid=error-km]").inner_text())
        out = _screenshot_path(tmp_path)
        page.screenshot(path=str(out), full_page=True)
        assert not errors, errors
        page.close()
    finally:
        server.should_exit = True
        thread.join(10)
