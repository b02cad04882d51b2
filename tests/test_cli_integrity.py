"""Smaller promises of issue 23 (items 8, 10, 11): answers inside a region from too few samples
refused, masses printed with their digits, defaults that never refuse a valid command, options
that go with others, regions named at their scale and links zoomed to the answer."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _fusion_testbed as tb  # noqa: E402
from _fake_locator import sharp_locator  # noqa: E402
from test_cli_checks import _save_tiny  # noqa: E402
from test_fusion import _locator  # noqa: E402

from globeflow.apps import pipeline  # noqa: E402
from globeflow.apps.cli import app, predict_output  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_an_answer_from_too_few_samples_inside_the_region_is_refused():
    """A box holding under 1% of a 200-km answer near Paris: of the 2,048 draws the rejection
    sampler may take, about 15 fall inside; 1024 copies of them would look certain."""
    locator = _locator(tb.uniform_prior(), [tb.vmf((48.85, 2.35), 200.0)])
    [thin] = locator.locate_embeddings(torch.eye(1), num_samples=64, within="52.2,2,54,4")
    assert thin["ok"] is False and thin["effective_sample_size"] < 30
    assert "too few of the model's samples fall inside 52.2,2,54,4" in thin["error"]
    assert "effective sample size" in thin["error"]
    assert 0 < thin["mass_inside"]["probability"] < 0.02  # the mass is still reported
    [enough] = locator.locate_embeddings(torch.eye(1), num_samples=64, within="47,0,51,5")
    assert enough.get("ok", True) and enough["effective_sample_size"] >= 30


def test_the_mass_inside_is_printed_with_its_digits(capsys):
    region = {"description": "48.8,2.25,48.92,2.42"}
    results = [
        {"image": "a.jpg", "mass_inside": {"probability": 9.2e-5, "stderr": 5.3e-5,
                                           "region": region}},
        {"image": "b.jpg", "mass_inside": {"probability": 0.4137, "stderr": 0.012,
                                           "region": region}},
    ]  # fmt: skip
    predict_output.report_region_and_fusion(results)
    out = capsys.readouterr().out
    assert "a.jpg: 0.0092% ± 0.0053% of the model's mass inside" in out
    assert "b.jpg: 41.4% ± 1.2% of the model's mass" in out


def test_no_region_of_a_fixed_radius_says_why_and_the_link_keeps_the_answers_zoom():
    """Samples spread over ~30 km (a sharp answer): no 10-m disc holds 1% of them, so there is
    no region; the table says so and the link zooms to the answer, not to the whole world."""
    modes = [((48.85, 2.35), 30.0, 1.0)]
    [result] = sharp_locator(modes).locate_embeddings(
        torch.zeros(1, 4), num_samples=256, region_radius_km=0.01
    )
    assert result["regions"] == []
    zoom = int(re.search(r"#map=(\d+)/", result["osm_url"]).group(1))
    assert 7 <= zoom <= 11  # a window of some 100-200 km; zoom 1 would be the world
    row = predict_output._predict_rows([{**result, "ok": True}], ["a.jpg"], fixed_radius=True)[0]
    assert row[3] == "none holds 1%"


def test_a_region_wider_than_a_hemisphere_is_not_named_after_a_country():
    from globeflow.answers.geocode import GLOBE_SCALE_KM, region_label

    moscow = {"city": "Moscow", "region": "Moscow", "country": "Russia", "country_code": "RU",
              "distance_km": 3.0, "bearing_deg": 0.0}  # fmt: skip
    assert region_label(moscow, 10_513.0) == "most of the globe"
    assert region_label(moscow, 3_000.0) == "around Russia"
    assert 10_000 < GLOBE_SCALE_KM < 10_010  # a quarter of a great circle


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("model"))


def test_keep_samples_above_num_samples_is_refused(tmp_path, tiny_model):
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(photo)
    args = ["predict", str(photo), "--model", str(tiny_model), "--out", str(tmp_path / "a")]
    result = CliRunner().invoke(app, [*args, "--keep-samples", "2000"])
    assert result.exit_code == 2
    assert result.output == "error: --keep-samples 2000: must be at most --num-samples (1024)\n"
    result = CliRunner().invoke(app, [*args, "--keep-samples", "64", "--num-samples", "32"])
    assert result.exit_code == 2 and "at most --num-samples (32)" in result.output
    assert not (tmp_path / "a").exists()


def test_save_every_s_goes_with_out(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.Locator, "from_pretrained", None)  # refused before loading
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(photo)
    result = CliRunner().invoke(app, ["predict", str(photo), "--save-every-s", "5"])
    assert result.exit_code == 2
    assert result.output == "error: --save-every-s goes with --out DIR (the answers folder)\n"


def test_the_default_warmup_fits_a_short_run_and_an_explicit_one_is_checked(tmp_path, monkeypatch):
    from globeflow.jobs import training

    monkeypatch.chdir(tmp_path)
    seen = {}

    def train(*args, **kwargs):
        seen.update(kwargs)
        return "trained"

    monkeypatch.setattr(training, "train_from_embeddings", train)
    base = ["train", "--embeddings", "store.parquet", "-o", "run", "--no-progress"]
    short = CliRunner().invoke(app, [*base, "--max-steps", "60"])
    assert short.exit_code == 0, short.output
    assert seen["warmup_steps"] == 6 and seen["max_steps"] == 60
    CliRunner().invoke(app, base)
    assert seen["warmup_steps"] == 500  # the long-standing default for a 20,000-step run
    explicit = CliRunner().invoke(app, [*base, "--max-steps", "60", "--warmup-steps", "100"])
    assert explicit.exit_code == 2
    assert "--warmup-steps 100: must be at most --max-steps (60)" in explicit.output


def test_the_package_metadata_builds_without_deprecation_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
