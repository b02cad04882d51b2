"""End to end: an im2gps3k-style CSV of tiny JPEGs, a fake encoder, fake models."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from _analytic_field import two_poles_model
from PIL import Image

from globeflow.core.sphere import sample_uniform_sphere, unit_to_latlon
from globeflow.jobs.evaluation import evaluate, summary_from_predictions_csv

TRUTHS = [
    ("paris.jpg", 48.8566, 2.3522),
    ("tokyo.jpg", 35.6762, 139.6503),
    ("nyc.jpg", 40.7128, -74.0060),
    ("sydney.jpg", -33.8688, 151.2093),
    ("cairo.jpg", 30.0444, 31.2357),
    ("lima.jpg", -12.0464, -77.0428),
]
OFFSETS_DEG = [0.0, 0.05, 0.5, 2.0, 8.0, 30.0]  # latitude offset of every sample, per image


class FakeEncoder:
    """Embeds a tiny photo as its mean colour, which the fixture sets to encode the image index."""

    def embed(self, images):
        return torch.tensor([[im.getpixel((0, 0))[0] / 10.0, 0.0] for im in images])


class OffsetModel:
    """Samples are the truth shifted north by a known offset; density uniform on the sphere."""

    draws_initial_noise = False  # it draws inside sample(), as the baselines do

    def __init__(self):
        self.calls = []

    def _truth(self, emb):
        idx = emb[:, 0].round().long()
        lat = torch.tensor([TRUTHS[i][1] + OFFSETS_DEG[i] for i in idx])
        lon = torch.tensor([TRUTHS[i][2] for i in idx])
        return torch.stack([lat, lon], -1)

    def sample(self, emb, num_samples=64, steps=32, guidance=0.0, generator=None):
        self.calls.append(("sample", guidance))
        return self._truth(emb)[:, None, :].expand(-1, num_samples, -1).clone()

    def log_prob(self, latlon, emb):
        return torch.full(latlon.shape[:2], -math.log(4 * math.pi))

    def localizability(self, emb, num_samples=64, generator=None):
        return torch.full((emb.shape[0],), -math.log2(4 * math.pi))


class UniformModel:
    draws_initial_noise = False

    def sample(self, emb, num_samples=64, steps=32, guidance=0.0, generator=None):
        x = sample_uniform_sphere((emb.shape[0], num_samples), generator=generator)
        return unit_to_latlon(x)

    def log_prob(self, latlon, emb):
        return torch.full(latlon.shape[:2], -math.log(4 * math.pi))

    def localizability(self, emb, num_samples=64, generator=None):
        return torch.full((emb.shape[0],), -math.log2(4 * math.pi))


@pytest.fixture()
def im2gps_csv(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with open(tmp_path / "im2gps3k_places365.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["IMG_ID", "LAT", "LON", "author"])
        for i, (name, lat, lon) in enumerate(TRUTHS):
            Image.new("RGB", (16, 12), (i * 10, 50, 50)).save(images / name, "JPEG", quality=100)
            w.writerow([name, lat, lon, f"author{i}"])
        w.writerow(["broken.jpg", 0.0, 0.0, "x"])
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    return tmp_path / "im2gps3k_places365.csv"


def _assert_summaries_equal(written: dict, recomputed: dict) -> None:
    for key, value in recomputed.items():
        if value is None:
            assert written[key] is None, key
        else:
            assert written[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_end_to_end_offset_model(im2gps_csv, tmp_path):
    model = OffsetModel()
    model.metadata = {"recommended_guidance": 2.0}  # the guess at 2, the density at 0
    report = evaluate(
        model,
        im2gps_csv,
        encoder=FakeEncoder(),
        num_samples=8,
        hpd_samples=16,
        batch_size=4,
        progress=False,
    )
    assert len(report.rows) == len(TRUTHS)
    assert [e["id"] for e in report.errors] == ["broken.jpg"]
    s = report.summary
    errors = [r["error_km"] for r in report.rows]
    expected_km = [off * math.pi * 6371.0 / 180.0 for off in OFFSETS_DEG]
    assert errors == pytest.approx(expected_km, abs=1e-2)
    assert s["acc@1km"] == pytest.approx(100 / 6)
    assert s["acc@25km"] == pytest.approx(200 / 6)
    assert s["acc@2500km"] == pytest.approx(500 / 6)
    assert s["nll_bpd"] == pytest.approx(math.log2(4 * math.pi) / 3)
    assert s["localizability_bits"] == pytest.approx(-math.log2(4 * math.pi))
    assert s["hpd50_coverage"] == 1.0  # constant density: nothing is denser than the truth
    assert report.rows[0]["true_country_code"] == "FR"
    assert report.rows[0]["pred_city"] == "Paris"
    assert s["country_acc"] >= 100 * 3 / 6  # the three nearest predictions stay in the country
    assert ("sample", 2.0) in model.calls and ("sample", 0.0) in model.calls

    out = tmp_path / "out"
    paths = report.write(out)
    for p in paths.values():
        assert p.exists()
    written = json.loads(paths["summary_json"].read_text())
    assert written["errors"][0]["id"] == "broken.jpg"
    _assert_summaries_equal(written, summary_from_predictions_csv(paths["predictions"]))
    assert "| GeoScore |" in paths["summary_md"].read_text()


def test_end_to_end_uniform_model_on_embeddings(tmp_path):
    class Embeddings:
        ids = [f"im{i}" for i in range(40)]
        latlon = unit_to_latlon(
            sample_uniform_sphere((40,), generator=torch.Generator().manual_seed(0))
        )
        embeddings = torch.zeros(40, 3)

    report = evaluate(UniformModel(), Embeddings(), num_samples=16, hpd_samples=8, progress=False)
    assert report.summary["n"] == 40
    assert report.summary["precision"] is not None
    paths = report.write(tmp_path)
    _assert_summaries_equal(
        json.loads(paths["summary_json"].read_text()),
        summary_from_predictions_csv(paths["predictions"]),
    )


def test_rows_do_not_depend_on_the_batch_size_when_hpd_points_are_chunked():
    """Issue 23 item 5: with B x hpd samples above the likelihood's chunk of 8,192 points the
    HPD samples are scored in chunks cut by the batch (batch 1: one chunk per photo, batch 3:
    two), and a grid chosen per chunk (as from the stiffness of a chunk's first points) made
    the rows depend on the batch. A field with two stiffness floors among one photo's samples
    (a strong pull to the north pole, about 8% of the samples, a weaker one to the south):
    the rows, HPD mass and localizability included, must be the same bit for bit."""
    model = two_poles_model(north=8.0, south=6.0, split=0.84)

    class Embeddings:
        ids = [f"im{i}" for i in range(3)]
        latlon = model.sample(torch.zeros(1, 2), 3, generator=torch.Generator().manual_seed(9))[0]
        embeddings = torch.zeros(3, 2, dtype=torch.float64)

    kw = dict(num_samples=16, localizability_samples=16, hpd_samples=4096, progress=False)
    one = evaluate(model, Embeddings(), batch_size=1, **kw).table
    three = evaluate(model, Embeddings(), batch_size=3, **kw).table
    assert one.column("hpd_mass").to_pylist() == three.column("hpd_mass").to_pylist()
    assert one.equals(three)


def test_missing_encoder_is_a_clear_error(im2gps_csv):
    with pytest.raises(ValueError, match="encoder"):
        evaluate(OffsetModel(), im2gps_csv, progress=False)


def test_progress_counts_photos_out_of_the_dataset_and_skipped_rows_are_listed(
    im2gps_csv, tmp_path, capsys
):
    with open(im2gps_csv, "a", newline="") as f:
        csv.writer(f).writerow(["far.jpg", 200.0, 0.0, "y"])  # 8 rows: 6 good, 1 broken, 1 bad
    report = evaluate(OffsetModel(), im2gps_csv, encoder=FakeEncoder(), num_samples=8,
                      hpd_samples=0, batch_size=4)  # fmt: skip
    err = capsys.readouterr().err
    assert "8/8" in err and "photo" in err and "batch" not in err
    written = json.loads(report.write(tmp_path / "out")["summary_json"].read_text())
    assert written["skipped"] == {"latitude outside [-90, 90]": 1}
    assert written["skipped_rows"] == [
        {"id": "far.jpg", "reason": "latitude 200 outside [-90, 90]"}
    ]
    evaluate(OffsetModel(), im2gps_csv, encoder=FakeEncoder(), num_samples=8, hpd_samples=0,
             batch_size=4, limit=3)  # fmt: skip
    assert "3/3" in capsys.readouterr().err


def test_accuracy_rows_of_the_markdown_say_percent(im2gps_csv):
    report = evaluate(OffsetModel(), im2gps_csv, encoder=FakeEncoder(), num_samples=8,
                      hpd_samples=0, progress=False)  # fmt: skip
    text = report.to_markdown()
    assert "| acc@1km (%) | 16.67 |" in text and "| acc@2500km (%) | 83.33 |" in text


def test_file_names_that_are_not_utf8_are_escaped_in_the_report(tmp_path):
    import os

    from globeflow.data.datasets import GeoRecord

    good = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    Image.new("RGB", (16, 12), (0, 50, 50)).save(good, "JPEG", quality=100)
    broken = tmp_path / os.fsdecode(b"bad\xff.jpg")
    broken.write_bytes(b"not a jpeg")
    records = [
        GeoRecord(id=os.fsdecode(b"caf\xe9"), lat=48.8566, lon=2.3522, path=str(good)),
        GeoRecord(id="broken", lat=0.0, lon=0.0, path=str(broken)),
    ]
    report = evaluate(OffsetModel(), records, encoder=FakeEncoder(), num_samples=8,
                      hpd_samples=0, progress=False)  # fmt: skip
    paths = report.write(tmp_path / "out")
    text = paths["predictions"].read_text(encoding="utf-8")
    assert "caf\\xe9" in text and str(tmp_path / "caf\\xe9.jpg") in text
    errors = json.loads(paths["summary_json"].read_text())["errors"]
    assert errors[0]["path"] == str(tmp_path / "bad\\xff.jpg")
    assert "bad\\xff.jpg" in errors[0]["error"]
