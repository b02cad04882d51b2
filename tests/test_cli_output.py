"""What the command line prints: the predict table, the scale of localizability, region names
at the scale of their radius, help texts, and the result example in docs/ARCHITECTURE.md."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import typer
from PIL import Image
from test_cli_checks import _save_tiny as save_tiny_model
from typer.testing import CliRunner

from globeflow.answers.geocode import format_km, region_label, reverse_geocode
from globeflow.answers.zoom import osm_zoom
from globeflow.apps.cli import app
from globeflow.apps.cli._common import PIPED_COLUMNS
from globeflow.apps.pipeline import Locator
from globeflow.core.families import (
    UNIFORM_LOCALIZABILITY_BITS,
    FlowMatching,
    effective_area_km2,
)
from globeflow.core.families.baselines import UniformSphere
from globeflow.core.network import Denoiser
from globeflow.core.sphere import EARTH_RADIUS_KM

EARTH_AREA_KM2 = 4 * math.pi * EARTH_RADIUS_KM**2
DOCS = Path(__file__).resolve().parents[1] / "docs"
WIDE = {"COLUMNS": "250"}
"""A terminal wide enough that no cell wraps, so that each table row is one line."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


# ---- the predict table ------------------------------------------------------------------------


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table (cells between the │ borders, stripped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def test_predict_table_columns_carry_what_their_headers_say(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photos / "a.jpg")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(photos / "b.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        ["predict", str(photos), "--model", str(tiny_model), "--num-samples", "64", "--steps",
         "2", "--region-radius-km", "800", "--json", str(out), "--no-progress"],
        env=WIDE,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())["results"]}

    # The failed photo is listed apart, on stderr, with its reason; the table has the others.
    assert "broken.jpg" not in result.stdout
    assert "1 of 3 photos could not be read" in result.stderr
    assert re.search(r"broken\.jpg: \w", result.stderr), result.stderr
    for words in (
        "top region",
        "(radius 800 km)",
        "error vs EXIF",
        "(km)",
        "localizability",
        "(bits vs uniform)",
        "localizability: bits above a uniform guess over the globe",
    ):
        assert words in result.stdout, words  # fmt: skip
    rows = {row[0]: row for row in _table_rows(result.stdout)}
    assert set(rows) == {"a.jpg", "b.jpg"}
    for name, row in rows.items():
        r = results[name]
        top = r["regions"][0]
        # an 800 km region is named at that scale: by its country when it holds the nearest
        # town, else by the way to that town
        assert top["radius_km"] == 800.0 and top["label"] == region_label(top["place"], 800.0)
        if top["place"]["distance_km"] <= 800.0:
            assert top["label"] == top["place"]["country"] != ""
        assert row[3] == f"{top['label']} ({top['probability']:.0%})"
        bits = r["localizability_vs_uniform_bits"]
        assert bits == pytest.approx(r["localizability_bits"] - UNIFORM_LOCALIZABILITY_BITS)
        assert row[4].startswith(f"{bits:.1f} (") and row[4].endswith("km²)")
        assert row[5] == "-"  # no EXIF GPS: no error, and never an error message


def _predict_one(photo: Path, model: Path, num_samples: int) -> tuple:
    """``predict`` of one photo: the CLI's result and the photo's JSON result."""
    out = photo.with_suffix(".json")
    result = CliRunner().invoke(
        app,
        ["predict", str(photo), "--model", str(model), "--num-samples", str(num_samples),
         "--steps", "2", "--json", str(out), "--no-progress"],
        env=WIDE,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (r,) = json.loads(out.read_text())["results"]
    return result, r


def test_by_default_regions_come_at_the_answers_scale_with_an_osm_link(tmp_path, tiny_model):
    photo = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    result, r = _predict_one(photo, tiny_model, 64)
    assert r["settings"]["region_radius_km"] is None
    top = r["regions"][0]
    assert top["share_within_radius"] == 0.9 and 0 < top["radius_km"] < 20_100
    assert "(probability, 90% radius)" in result.stdout
    (row,) = _table_rows(result.stdout)
    assert row[2] == r["best_guess"]["label"]
    assert row[3] == f"{top['label']} ({top['probability']:.0%}, {format_km(top['radius_km'])})"
    assert f"a.jpg: {r['osm_url']}" in result.stdout
    assert r["osm_url"].startswith("https://www.openstreetmap.org/?mlat=")


def test_error_column_holds_kilometres(tmp_path, tiny_model):
    photo = tmp_path / "gps.jpg"
    Image.new("RGB", (64, 48), (90, 160, 30)).save(photo, exif=_gps(48.0, 2.0))
    result, r = _predict_one(photo, tiny_model, 16)
    (row,) = _table_rows(result.stdout)
    assert row[5] == f"{r['error_km']:.0f}"


def _gps(lat: float, lon: float) -> Image.Exif:
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (lat, 0.0, 0.0), 3: "E", 4: (lon, 0.0, 0.0)}
    return exif


# ---- the scale of localizability --------------------------------------------------------------


class _Encoder:
    name, dim = "toy", 6


def test_a_uniform_answer_scores_zero_bits_over_the_whole_globe():
    bits = UniformSphere(cond_dim=6).localizability(torch.randn(2, 6), num_samples=16)
    assert torch.allclose(bits, torch.full_like(bits, UNIFORM_LOCALIZABILITY_BITS))
    assert UNIFORM_LOCALIZABILITY_BITS == pytest.approx(-3.65, abs=0.005)
    assert torch.allclose(effective_area_km2(bits), torch.full_like(bits, EARTH_AREA_KM2))


def test_each_bit_over_uniform_halves_the_area():
    bits = torch.tensor([-3.0, 0.0, 3.3, 10.0])
    gain = bits - UNIFORM_LOCALIZABILITY_BITS
    assert torch.allclose(effective_area_km2(bits), EARTH_AREA_KM2 * torch.exp2(-gain))


def test_no_uniform_comparison_for_a_density_in_r3():
    torch.manual_seed(0)
    locator = Locator(FlowMatching(Denoiser(dim=16, depth=1, cond_dim=6)), _Encoder(), "flow")
    (r,) = locator.locate_embeddings(torch.randn(1, 6), 16, steps=2, localizability_samples=8)
    assert r["localizability_bits"] is not None
    assert r["localizability_vs_uniform_bits"] is None


# ---- region names at the scale of their radius ------------------------------------------------


def test_region_names_fit_the_radius():
    # The nearest populated place to this centre is the village of Yvoir (Belgium).
    (place,) = reverse_geocode([[50.363, 4.914]])
    assert place.city == "Yvoir"
    assert region_label(place, 500.0) == "Belgium"
    assert region_label(place, 100.0) == f"{place.region}, Belgium"
    assert region_label(place, 10.0) == f"Yvoir, {place.region}, Belgium"
    assert region_label(None, 500.0) == ""


# ---- help ------------------------------------------------------------------------------------


def _every_command() -> list[tuple[str, click.Command]]:
    group = typer.main.get_command(app)
    return [("globeflow", group), *sorted(group.commands.items())]


def test_every_option_and_argument_has_help_text():
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in _every_command()
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert not missing, missing


def test_switches_show_no_bool_type():
    for name, _ in _every_command():
        args = ["--help"] if name == "globeflow" else [name, "--help"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, name
    result = CliRunner().invoke(app, ["train", "--help"])
    assert "--stream" in result.output and "--no-stream" in result.output


def test_help_piped_to_a_file_is_not_cut_at_80_columns():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    run = subprocess.run(
        [sys.executable, "-m", "globeflow.apps.cli", "train", "--help"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    widths = [len(line) for line in run.stdout.splitlines()]
    assert 80 < max(widths) <= PIPED_COLUMNS
    assert "…" not in run.stdout  # no option name cut short (was "--prior-locatio…")
    assert "--shuffle-buffer-rows" in run.stdout


# ---- the example in docs/ARCHITECTURE.md ------------------------------------------------------


def test_architecture_result_example_is_arithmetically_consistent():
    text = (DOCS / "ARCHITECTURE.md").read_text()
    example = text[text.index("## Result structure") :]
    example = example[example.index("```json") : example.index("```\n", 10)]

    def number(key: str) -> float:
        return float(re.search(rf'"{key}": (-?[0-9.e+-]+)', example).group(1))

    bits = number("localizability_bits")
    # the example's figures are rounded to two significant figures
    assert number("effective_area_km2") == pytest.approx(
        float(effective_area_km2(torch.tensor(bits))), rel=0.02
    )
    assert number("localizability_vs_uniform_bits") == pytest.approx(
        bits - UNIFORM_LOCALIZABILITY_BITS, abs=0.01
    )
    # adaptive regions (region_radius_km null): a 620 km region around Paris holding 90% of
    # its mode is named by its country, and so is the best guess that lies in it
    assert '"region_radius_km": null' in example and number("share_within_radius") == 0.9
    assert number("radius_km") == number("scale_km") == 620.0
    assert region_label({"country": "France", "distance_km": 0.4, "bearing_deg": 35.0}, 620.0) == (
        "France"
    )
    assert example.count('"label": "France"') == 2
    assert f"#map={osm_zoom(620.0, 48.85)}/48.85000/2.35000" in example
