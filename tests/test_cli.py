"""End-to-end command-line tests on tiny models and synthetic photos (no ../shared needed)."""

import csv
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import globeflow as gf
from globeflow.apps.cli import app
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Denoiser
from globeflow.data.encoders import get_encoder

ENCODER = "efficientnet-lite0"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=get_encoder(ENCODER).dim))
    path = tmp_path_factory.mktemp("model")
    gf.save_model(model, path, metadata={"encoder": ENCODER})
    return path


def _photo(path, color, gps=None):
    img = Image.new("RGB", (64, 48), color)
    exif = img.getexif()
    if gps is not None:
        lat, lon = gps
        exif[0x8825] = {
            1: "N" if lat >= 0 else "S",
            2: (abs(lat), 0.0, 0.0),
            3: "E" if lon >= 0 else "W",
            4: (abs(lon), 0.0, 0.0),
        }
    img.save(path, exif=exif)
    return path


def test_predict_writes_every_output_and_reports_bad_files(tmp_path, tiny_model_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.jpg", (200, 30, 30), gps=(48.0, 2.0))
    _photo(photos / "b.png", (20, 90, 200))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(photos),
            "--model",
            str(tiny_model_dir),
            "--num-samples",
            "32",
            "--steps",
            "4",
            "--json",
            str(out / "r.json"),
            "--csv",
            str(out / "r.csv"),
            "--geojson",
            str(out / "r.geojson"),
            "--map",
            str(out / "maps"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "r.json").read_text())["results"]
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in results}
    assert set(by_name) == {"a.jpg", "b.png", "broken.jpg"}
    assert not by_name["broken.jpg"]["ok"] and "broken.jpg" in by_name["broken.jpg"]["error"]
    a = by_name["a.jpg"]
    assert a["ok"] and len(a["samples"]) == 32 and a["regions"]
    assert abs(sum(r["probability"] for r in a["regions"])) <= 1.0 + 1e-9
    assert a["exif_gps"] == {"lat": 48.0, "lon": 2.0} and a["error_km"] >= 0
    assert a["localizability_bits"] is not None and a["effective_area_km2"] > 0
    assert a["best_guess"]["place"]["country_code"]
    rows = list(csv.DictReader((out / "r.csv").open()))
    assert len(rows) == 3
    geo = json.loads((out / "r.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    assert {f["properties"]["kind"] for f in geo["features"]} >= {
        "best_guess",
        "region",
        "exif_gps",
    }
    assert (out / "maps" / "a.jpg.png").stat().st_size > 10_000
    assert "could not be read" in result.output


def test_predict_missing_file_is_a_clear_error(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "nope.jpg"), "--model", str(tiny_model_dir)]
    )
    assert result.exit_code == 2
    assert "nope.jpg" in result.output and "no such file" in result.output


def test_evaluate_on_an_im2gps_style_csv(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    images.mkdir()
    truth = [(48.85, 2.35), (35.68, 139.69), (-33.87, 151.21), (40.71, -74.0)]
    with (tmp_path / "test.csv").open("w") as f:
        f.write("IMG_ID,LAT,LON\n")
        for i, (lat, lon) in enumerate(truth):
            _photo(images / f"{i}.jpg", (40 * i, 100, 200 - 40 * i))
            f.write(f"{i}.jpg,{lat},{lon}\n")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "test.csv"),
            "--model",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--num-samples",
            "16",
            "--steps",
            "4",
            "--hpd-samples",
            "8",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    from globeflow.jobs.evaluation import summary_from_predictions_csv

    summary = json.loads((out / "summary.json").read_text())
    recomputed = summary_from_predictions_csv(out / "predictions.csv")
    assert len(recomputed) > 10
    for key, value in recomputed.items():
        if value is None:
            assert summary[key] is None, key
        else:
            assert summary[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert (out / "summary.md").exists() and (out / "reliability.png").exists()


def test_predict_shows_progress_while_drawing_maps(tmp_path, tiny_model_dir):
    for i, color in enumerate([(200, 30, 30), (20, 90, 200), (40, 160, 60)]):
        _photo(tmp_path / f"p{i}.jpg", color)
    args = ["predict", str(tmp_path), "--model", str(tiny_model_dir), "--num-samples", "16"]
    args += ["--steps", "2", "--map", str(tmp_path / "maps")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "drawing maps" in result.output and "3/3" in result.output
