"""The page's interactive map in a real headless browser (Playwright + Chromium): zoom and pan
by mouse and keyboard, layer toggles, a sharp answer opening on its region and the table's rows
zooming to theirs, the offline base map when tiles are unreachable and tiles from a local tile
server when they are reachable. GLOBEFLOW_SCREENSHOT=1 saves the sharp answer's page as
docs/screenshot.png (the README's screenshot).

Skips like tests/test_webapp_e2e.py when Playwright or Chromium is missing. No test reaches the
network: tiles come from a server on loopback, or from a loopback port nothing listens on.
"""

from __future__ import annotations

import io
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import LOUVRE, SHARP_MODES, FakeLocator  # noqa: E402
from _live_server import free_port  # noqa: E402
from test_webapp_e2e import (  # noqa: E402, F401 (fixtures)
    REPO,
    _photo,
    _screenshot_path,
    _start_server,
    browser,
    server_url,
)
from test_webapp_sharp import sharp_url  # noqa: E402, F401 (fixture)

TILE_RGB = (255, 0, 255)  # a colour no other layer of the page uses
UI_WAIT_MS = 30_000
"""How long a step of the page may take: generous, because CI shares its CPU (a 10-s wait once
timed out in a full run that passes alone in 4 s)."""


def _open(browser, url: str, photo: Path, errors: list[str]):  # noqa: F811
    # reduced motion: the page then moves the map without animations, so that each step of a
    # test starts where the last one ended
    page = browser.new_page(viewport={"width": 1280, "height": 900}, reduced_motion="reduce")
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.set_input_files("[data-testid=file-input]", str(photo))
    page.wait_for_function(
        "document.querySelector('[data-testid=result-card]')?.dataset.state === 'done'",
        timeout=60_000,
    )
    the_map = page.locator("[data-testid=result-card] [data-testid=map]").first
    the_map.locator(".leaflet-tile-loaded").first.wait_for(timeout=20_000)
    return page, the_map


def _view(the_map) -> dict:
    """Zoom, centre and bounds once the map has finished moving (a key pressed during Leaflet's
    zoom animation is dropped, as a person's would be)."""
    the_map.page.wait_for_function(
        "e => { const m = e.globeflowMap.map;"
        " return !m._animatingZoom && !(m._panAnim && m._panAnim._inProgress); }",
        arg=the_map.element_handle(),
    )
    return the_map.evaluate(
        """e => { const m = e.globeflowMap.map, c = m.getCenter(), b = m.getBounds();
                  return {zoom: m.getZoom(), lat: c.lat, lon: c.lng, south: b.getSouth(),
                          north: b.getNorth(), west: b.getWest(), east: b.getEast()}; }"""
    )


def _on(the_map, layer: str) -> bool:
    return the_map.evaluate(
        "(e, name) => e.globeflowMap.map.hasLayer(e.globeflowMap.overlays[name])", layer
    )


def test_zoom_pan_and_layer_toggles_by_mouse_and_keyboard(browser, server_url, tmp_path):  # noqa: F811
    errors: list[str] = []
    page, the_map = _open(browser, server_url, _photo(tmp_path / "a.jpg"), errors)
    start = _view(the_map)
    assert start["zoom"] == 1  # no map_extent in the fake's answer: the whole world

    # the zoom buttons, by mouse and by keyboard
    the_map.locator(".leaflet-control-zoom-in").click()
    assert _view(the_map)["zoom"] == 2
    the_map.locator(".leaflet-control-zoom-out").focus()
    page.keyboard.press("Enter")
    assert _view(the_map)["zoom"] == 1
    # the map itself takes the keyboard: + zooms in, arrows pan
    assert "leaflet-container" in the_map.get_attribute("class")
    the_map.focus()
    page.keyboard.press("Equal")  # "=" is the unshifted "+" key Leaflet listens to
    before = _view(the_map)
    assert before["zoom"] == 2
    page.keyboard.press("ArrowRight")
    page.wait_for_timeout(400)
    assert _view(the_map)["lon"] > before["lon"] + 1

    # dragging pans
    box = the_map.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    before = _view(the_map)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 150, y + 60, steps=8)
    page.mouse.up()
    after = _view(the_map)
    assert after["lon"] > before["lon"] + 5 and after["lat"] > before["lat"] + 1

    # the layers control: opened with Enter, its check boxes toggled with the space bar
    toggle = the_map.locator(".leaflet-control-layers-toggle")
    toggle.focus()
    page.keyboard.press("Enter")
    control = the_map.locator(".leaflet-control-layers")
    assert "leaflet-control-layers-expanded" in control.get_attribute("class")
    labels = control.locator(".leaflet-control-layers-overlays label").all_inner_texts()
    assert [t.strip() for t in labels] == [
        "Probability density", "Samples (1024)", "Top regions", "Best guess",
    ]  # fmt: skip
    samples = control.locator("label", has_text="Samples").locator("input")
    _past_leaflet_click_guard(page)
    samples.focus()
    page.keyboard.press("Space")
    assert not _on(the_map, "Samples (1024)")
    assert the_map.locator(".gf-region").count() == 3
    # by mouse: Leaflet ignores a click in the instant the pointer enters the control (it
    # opens it), so the pointer rests on it first, as a person's does
    control.hover()
    page.wait_for_timeout(100)
    control.locator("label", has_text="Top regions").locator("input").uncheck()
    assert the_map.locator(".gf-region").count() == 0 and not _on(the_map, "Top regions")
    control.locator("label", has_text="Best guess").locator("input").uncheck()
    assert the_map.locator(".gf-star").count() == 0
    density_tiles = the_map.locator(".leaflet-gf-density-pane canvas")
    assert density_tiles.count() > 0
    control.locator("label", has_text="Probability density").locator("input").uncheck()
    assert density_tiles.count() == 0
    control.locator("label", has_text="Top regions").locator("input").check()
    assert the_map.locator(".gf-region").count() == 3
    # one base layer only: the offline map (this server was started with --tiles none)
    bases = control.locator(".leaflet-control-layers-base label").all_inner_texts()
    assert [t.strip() for t in bases] == ["Offline map"]

    # "Show whole world" and back
    zoom = page.locator("[data-testid=zoom-toggle]").first
    assert zoom.is_hidden()  # the answer already spans the world
    assert not errors, errors
    page.close()


def test_a_sharp_answer_opens_on_its_region_with_town_names(browser, sharp_url, tmp_path):  # noqa: F811
    errors: list[str] = []
    photo = REPO / "examples" / "paris.jpg"  # its EXIF GPS: the Arc de Triomphe
    photo = photo if photo.is_file() else _photo(tmp_path / "street.jpg")
    page, the_map = _open(browser, sharp_url, photo, errors)
    view = _view(the_map)
    assert view["zoom"] >= 12  # a window of a few km, not the world
    for (lat, lon), _, _ in SHARP_MODES:  # both modes in view
        assert view["south"] < lat < view["north"] and view["west"] < lon < view["east"]
    assert view["north"] - view["south"] < 0.15
    # the offline base map names the Paris districts around the answer
    page.wait_for_selector(".gf-town span", timeout=UI_WAIT_MS)
    towns = the_map.locator(".gf-town").all_inner_texts()
    assert any(t.startswith("Paris") for t in towns), towns
    assert "Natural Earth" in the_map.locator(".leaflet-control-attribution").inner_text()
    # GLOBEFLOW_SCREENSHOT=1: this page is the README's screenshot (docs/screenshot.png)
    out = _screenshot_path(tmp_path, real=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 50_000

    # a row of the table zooms the map to its region
    page.locator("[data-testid=region-row]").nth(1).click()
    zoomed = _view(the_map)
    assert zoomed["zoom"] > view["zoom"]
    assert zoomed["lat"] == pytest.approx(LOUVRE[0], abs=0.003)
    assert zoomed["lon"] == pytest.approx(LOUVRE[1], abs=0.004)
    # by keyboard too: the first region's name is a button
    page.locator("[data-testid=region-zoom]").first.focus()
    page.keyboard.press("Enter")
    first = _view(the_map)
    assert first["lat"] == pytest.approx(SHARP_MODES[0][0][0], abs=0.003)
    assert first["zoom"] > zoomed["zoom"]  # a smaller region, closer in

    # "Show whole world" and back to the answer's window
    toggle = page.locator("[data-testid=zoom-toggle]").first
    toggle.click()
    assert _view(the_map)["zoom"] <= 2 and toggle.inner_text() == "Zoom to answer"
    toggle.click()
    assert _view(the_map)["zoom"] == pytest.approx(view["zoom"])
    assert not errors, errors
    page.close()


class _Tiles(BaseHTTPRequestHandler):
    """Answers every /{z}/{x}/{y}.png with one magenta 256 px tile and counts the requests."""

    requests: list[str] = []
    png = b""

    def do_GET(self):  # noqa: N802 - the handler's API
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def tile_server():
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), TILE_RGB).save(buf, "PNG")
    _Tiles.png, _Tiles.requests = buf.getvalue(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Tiles)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(10)


def _magenta_share(the_map) -> float:
    import numpy as np

    rgb = np.asarray(Image.open(io.BytesIO(the_map.screenshot())).convert("RGB")).astype(int)
    close = np.abs(rgb - np.array(TILE_RGB)).sum(-1) < 60
    return float(close.mean())


def _past_leaflet_click_guard(page) -> None:
    """Leaflet ignores clicks on a layers control it is expanding until a setTimeout(0) of its
    own has run, and Chromium runs input before timers: under load a Space pressed right after
    the control opened was swallowed (about once in three full CI=true runs). A timer queued now
    runs after Leaflet's."""
    page.evaluate("() => new Promise(done => setTimeout(done, 0))")


def test_tiles_from_a_reachable_tile_server(browser, tile_server, tmp_path):  # noqa: F811
    url, server, thread = _start_server(FakeLocator(), tiles=tile_server + "/{z}/{x}/{y}.png")
    try:
        errors: list[str] = []
        page, the_map = _open(browser, url, _photo(tmp_path / "a.jpg"), errors)
        page.wait_for_function(
            "e => e.dataset.tiles === 'loaded'", arg=the_map.element_handle(), timeout=UI_WAIT_MS
        )
        assert the_map.get_attribute("data-base") == "tiles"
        srcs = the_map.locator("img.leaflet-tile-loaded").evaluate_all("l => l.map(i => i.src)")
        assert srcs and all(s.startswith(tile_server + "/1/") for s in srcs)
        assert any(r.startswith("/1/") for r in _Tiles.requests)
        assert _magenta_share(the_map) > 0.3  # the tiles are what the map shows
        assert "OpenStreetMap" in the_map.locator(".leaflet-control-attribution").inner_text()
        assert page.locator("[data-testid=tiles-note]").first.is_hidden()
        # zooming in asks the server for the next zoom's tiles
        the_map.locator(".leaflet-control-zoom-in").click()
        the_map.locator("img.leaflet-tile-loaded[src*='/2/']").first.wait_for(timeout=UI_WAIT_MS)
        # the offline map is one click away in the layers control
        the_map.locator(".leaflet-control-layers-toggle").focus()
        page.keyboard.press("Enter")
        offline_choice = the_map.locator("label", has_text="Offline map").locator("input")
        offline_choice.wait_for(state="visible", timeout=UI_WAIT_MS)  # the control expands first
        _past_leaflet_click_guard(page)
        offline_choice.focus()
        page.keyboard.press("Space")
        # Leaflet switches layers in its change handler; wait for it rather than race it
        page.wait_for_function(
            "e => e.dataset.base === 'offline'", arg=the_map.element_handle(), timeout=UI_WAIT_MS
        )
        assert _magenta_share(the_map) < 0.01
        assert not errors, errors
        page.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_offline_map_when_tiles_are_unreachable(browser, tmp_path):  # noqa: F811
    dead = f"http://127.0.0.1:{free_port()}/{{z}}/{{x}}/{{y}}.png"  # nothing listens there
    url, server, thread = _start_server(FakeLocator(), tiles=dead)
    try:
        errors: list[str] = []
        page, the_map = _open(browser, url, _photo(tmp_path / "a.jpg"), errors)
        page.wait_for_function(
            "e => e.dataset.base === 'offline'", arg=the_map.element_handle(), timeout=UI_WAIT_MS
        )
        note = page.locator("[data-testid=tiles-note]").first
        note.wait_for(state="visible", timeout=5_000)
        assert "offline map" in note.inner_text()
        # the offline tiles are drawn: sea, land and outlines, no magenta, no broken images
        the_map.locator(".leaflet-tile-pane canvas.leaflet-tile-loaded").first.wait_for()
        assert the_map.locator(".leaflet-tile-pane img").count() == 0
        colours = the_map.evaluate(
            """e => { const seen = new Set();
                      for (const c of e.querySelectorAll('.leaflet-tile-pane canvas')) {
                        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        for (let i = 0; i < d.length; i += 4 * 13)
                          seen.add((d[i] >> 3) * 1024 + (d[i + 1] >> 3) * 32 + (d[i + 2] >> 3)); }
                      return seen.size; }"""
        )
        assert colours > 10
        assert "Natural Earth" in the_map.locator(".leaflet-control-attribution").inner_text()
        # the next answer on this page starts on the offline map at once
        page.set_input_files("[data-testid=file-input]", str(_photo(tmp_path / "b.jpg")))
        page.wait_for_function(
            "[...document.querySelectorAll('[data-testid=result-card]')]"
            ".every(c => c.dataset.state === 'done')",
            timeout=60_000,
        )
        second = page.locator("[data-testid=result-card] [data-testid=map]").first
        assert second.get_attribute("data-base") == "offline"
        assert not errors, errors
        page.close()
    finally:
        server.should_exit = True
        thread.join(10)
