"""`predict --same-place` and `--within` end to end on a tiny model and synthetic photos."""

import json

import pytest
import torch
from PIL import Image
from test_cli import tiny_model_dir  # noqa: F401 (the same tiny model fixture)
from typer.testing import CliRunner

from globeflow.apps.cli import app

BOX = "-45,-100,75,120"


def test_same_place_and_within_write_the_fused_answer(tmp_path, tiny_model_dir):  # noqa: F811
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.jpg", (190, 40, 30))):
        Image.new("RGB", (64, 48), colour).save(photos / name)
    out = tmp_path / "out"
    args = ["predict", str(photos), "--model", str(tiny_model_dir), "--num-samples", "32"]
    args += ["--steps", "2", "--localizability-samples", "0", "--no-progress", "--same-place"]
    args += ["--within", BOX, "--fusion-proposals", "128", "--json", str(out / "r.json")]
    result = CliRunner().invoke(app, [*args, "--geojson", str(out / "r.geojson")])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "r.json").read_text())["results"]
    assert len(results) == 3
    fused = results[-1]
    assert fused["photos"] == ["a.jpg", "b.jpg"] and fused["image"] == "same place: a.jpg, b.jpg"
    assert fused["fusion"]["proposals"] >= 128 and fused["effective_sample_size"] > 0
    assert fused["mass_inside"]["region"]["kind"] == "bbox"
    for r in results:
        mass = r["mass_inside"]
        assert 0 < mass["probability"] < 1 and mass["stderr"] > 0
        lat, lon = torch.tensor(r["samples"]).T
        assert bool(((lat >= -45) & (lat <= 75) & (lon >= -100) & (lon <= 120)).all())
    assert f"mass inside {BOX}" in result.output
    assert "log Bayes factor of one place" in result.output
    features = json.loads((out / "r.geojson").read_text())["features"]
    assert any(f["properties"]["image"] == fused["image"] for f in features)


@pytest.mark.parametrize(
    ("within", "message"),
    [("50,0,40,10", "latitudes must satisfy"), ("atlantis", "not a region"), ("QQ", "QQ")],
)
def test_bad_within_is_one_clear_line(tmp_path, tiny_model_dir, within, message):  # noqa: F811
    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "a.jpg")
    args = ["predict", str(tmp_path / "a.jpg"), "--model", str(tiny_model_dir)]
    result = CliRunner().invoke(app, [*args, "--within", within])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --within") and message in lines[0]


def test_within_with_no_mass_inside_says_so(tmp_path, tiny_model_dir):  # noqa: F811
    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "a.jpg")
    args = ["predict", str(tmp_path / "a.jpg"), "--model", str(tiny_model_dir), "--no-progress"]
    args += ["--num-samples", "16", "--steps", "2", "--within", "10,10,10.001,10.001"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "the model puts no mass inside 10,10,10.001,10.001" in result.output
    assert "every photo's answer was refused" in result.output


def test_same_place_embeds_each_photo_once_and_says_when_photos_look_apart(
    tmp_path,
    tiny_model_dir,  # noqa: F811
    monkeypatch,
):
    """The fused answer reuses the embeddings of the photos' own answers, and a fused answer
    whose Bayes factor is below 1 says "the photos look like different places" in the table."""
    from globeflow.apps.pipeline import Locator

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.jpg", (30, 40, 190))):
        Image.new("RGB", (64, 48), colour).save(photos / name)
    embedded: list[int] = []
    real_from_pretrained = Locator.from_pretrained.__func__
    real_together = Locator.locate_together

    def from_pretrained(cls, *args, **kwargs):
        locator = real_from_pretrained(cls, *args, **kwargs)
        embed = locator.encoder.embed

        def counting(images):
            embedded.append(len(images))
            return embed(images)

        locator.encoder.embed = counting
        return locator

    def together(self, *args, **kwargs):
        result = real_together(self, *args, **kwargs)
        result["fusion"]["different_places"] = True  # as a far-apart pair reports it
        result["warning"] = "the photos look like different places (test)"
        return result

    monkeypatch.setattr(Locator, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(Locator, "locate_together", together)
    args = ["predict", str(photos), "--model", str(tiny_model_dir), "--num-samples", "32"]
    args += ["--steps", "2", "--localizability-samples", "0", "--no-progress", "--same-place"]
    args += ["--fusion-proposals", "128", "--json", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert sum(embedded) == 2, embedded  # two photos, each embedded once
    table = result.output.split("OpenStreetMap")[0]
    assert "the photos look like different places" in " ".join(table.split())
    fused = json.loads((tmp_path / "r.json").read_text())["results"][-1]
    assert fused["fusion"]["different_places"] is True
