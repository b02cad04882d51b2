"""The page's "same place" switch and region filter in a real headless browser, against a fake
locator (tests/_fake_locator.py) that records what the server passed it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import FakeLocator  # noqa: E402
from test_webapp_e2e import _photo, _start_server, browser  # noqa: E402, F401 (fixture)


class FusingFakeLocator(FakeLocator):
    """FakeLocator plus ``within`` and ``locate_together``; photos named sydney* disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.regions: list[str] = []

    def locate_images(self, images, within=None, **kwargs):
        results = super().locate_images(images, **kwargs)
        if within is not None:
            self.regions.append(within.description)
            for r in results:
                r["mass_inside"] = _mass(within)
        return results

    def locate_together(self, images, num_samples=None, within=None):
        names = [name for name, _ in images]
        self.regions.append(f"together: {within.description if within else None}")
        label = f"same place: {', '.join(names)}"
        if any(name.startswith("sydney") for name in names):
            return {
                "image": label,
                "ok": False,
                "error": "the photos disagree: the model finds one place 1e+04 times less likely "
                "than unrelated places (least consistent: sydney.jpg); locate them separately",
                "photos": names,
                "disagreement": {"least_consistent_photo": "sydney.jpg"},
            }
        result = self._one(label, num_samples or 512, 0.0, None, None, True)
        result.update(photos=names, effective_sample_size=321.0, disagreement=None)
        result["fusion"] = {"log_bayes_factor_same_place": 2.3, "proposals": 2048}
        if any(name.startswith("far") for name in names):  # a Bayes factor below 1, answered
            result["fusion"].update(log_bayes_factor_same_place=-1.2, different_places=True)
            result["warning"] = (
                "the photos look like different places (one place 3.32 times less likely than "
                "unrelated places; least consistent: far.jpg); the fused answer assumes they "
                "show one place"
            )
        if within is not None:
            result["mass_inside"] = _mass(within)
        return result


def _mass(region) -> dict:
    return {"probability": 0.42, "stderr": 0.03, "upper_95": 0.48, "region": region.to_dict()}


def test_same_place_switch_and_region_filter(browser, tmp_path) -> None:  # noqa: F811
    locator = FusingFakeLocator()
    url, server, thread = _start_server(locator)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.fill("[data-testid=within]", "FR")
        page.check("[data-testid=same-place]")
        photos = [str(_photo(tmp_path / name)) for name in ("front.jpg", "side.jpg")]
        page.set_input_files("[data-testid=file-input]", photos)
        fused = page.locator("[data-testid=fused-card]")
        fused.wait_for(timeout=20_000)
        page.wait_for_function(
            "document.querySelector('[data-testid=fused-card]').dataset.state === 'done'",
            timeout=20_000,
        )
        assert fused.locator("[data-testid=file-name]").inner_text() == "Same place: 2 photos"
        assert "Paris" in fused.locator("[data-testid=best-guess]").inner_text()
        assert "effective sample size 321" in fused.locator("[data-testid=settings]").inner_text()
        mass = fused.locator("[data-testid=mass-inside]").inner_text()
        assert "42%" in mass and "France (FR)" in mass
        # the fused answer's map: the region it was limited to and each photo's best guess
        fused_map = fused.locator("[data-testid=map]")
        layers = fused_map.evaluate("e => Object.keys(e.globeflowMap.overlays)")
        assert "Only-inside region" in layers and "Each photo's best guess" in layers
        france = fused_map.evaluate(
            """e => { const b = e.globeflowMap.overlays['Only-inside region'].getBounds();
                      return [b.getSouth(), b.getNorth(), b.getWest(), b.getEast()]; }"""
        )  # France's polygons, overseas departments included: Paris inside
        assert france[0] < 48.85 < france[1] and france[2] < 2.35 < france[3]
        photos = fused_map.evaluate(
            'e => e.globeflowMap.overlays["Each photo\'s best guess"].getLayers().length'
        )
        assert photos == 2
        single = page.locator("[data-testid=result-card]").first
        assert "France (FR)" in single.locator("[data-testid=mass-inside]").inner_text()
        assert locator.regions.count("France (FR)") == 2
        assert locator.regions[-1] == "together: France (FR)"
        assert page.locator("[data-testid=result-card]").count() == 2

        page.uncheck("[data-testid=same-place]")  # the switch off: no fused answer
        assert fused.count() == 0

        page.click("#clear")
        page.fill("[data-testid=within]", "")
        page.check("[data-testid=same-place]")
        disagreeing = [str(_photo(tmp_path / name)) for name in ("paris.jpg", "sydney.jpg")]
        page.set_input_files("[data-testid=file-input]", disagreeing)
        error = page.locator("[data-testid=fused-card] [data-testid=error]")
        error.wait_for(state="visible", timeout=20_000)
        text = error.inner_text()
        assert "disagree" in text and "sydney.jpg" in text
        assert page.locator("[data-testid=fused-card] .card-body").is_hidden()
        assert locator.regions[-1] == "together: None"

        page.click("#clear")
        apart = [str(_photo(tmp_path / name)) for name in ("paris.jpg", "far.jpg")]
        page.set_input_files("[data-testid=file-input]", apart)
        warning = page.locator("[data-testid=fused-card] [data-testid=fused-warning]")
        warning.wait_for(state="visible", timeout=20_000)
        assert "look like different places" in warning.inner_text()
        assert page.locator("[data-testid=fused-card] [data-testid=best-guess]").is_visible()
        assert not errors, errors
        page.close()
    finally:
        server.should_exit = True
        thread.join(10)
