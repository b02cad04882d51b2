"""predict / evaluate / embed on bad input: one-line errors before any work, exit codes, names.

Exit codes: 2 for a bad option, path or model (nothing was done), 1 when the work itself gave
nothing usable (every photo failed, nothing to evaluate, non-finite model output).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _photos import make_unreadable
from PIL import Image
from typer.testing import CliRunner

import globeflow as gf
from globeflow.apps import pipeline
from globeflow.apps.cli import app
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Denoiser
from globeflow.data.encoders import get_encoder

ENCODER = "efficientnet-lite0"


def _save_tiny(path, metadata=None, scale_output=None):
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=get_encoder(ENCODER).dim))
    if scale_output is not None:  # finite weights whose outputs overflow float32
        with torch.no_grad():
            model.network.final_linear.weight.fill_(scale_output)
            model.network.final_linear.bias.fill_(scale_output)
    gf.save_model(model, path, metadata={"encoder": ENCODER, **(metadata or {})})
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("model"), {"recommended_guidance": 0.5})


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(pipeline.Locator, "from_pretrained", refuse)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, code, *needles):
    """The command failed with ``code`` and one line naming every needle (no traceback)."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- item 6, 7, 8: option values -------------------------------------------------------------

PREDICT_BAD = [
    (["--guidance", "nan"], "--guidance nan: must be a finite number in [-1, 10]"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number in [-1, 10]"),
    (["--guidance", "1e9"], "--guidance 1000000000.0: must be a finite number in [-1, 10]"),
    (["--num-samples", "100000000"], "--num-samples 100000000: must be an integer in [16, 4096]"),
    (["--num-samples", "3"], "--num-samples 3: must be an integer in [16, 4096]"),
    (["--region-radius-km", "0"], "--region-radius-km 0.0: must be a finite number in (0, "),
    (["--region-radius-km", "-100"], "--region-radius-km -100.0: must be"),
    (["--region-radius-km", "nan"], "--region-radius-km nan: must be"),
    (["--steps", "0"], "--steps 0: must be an integer in [1, 256]"),
    (["--top-k", "0"], "--top-k 0: must be an integer in [1, 100]"),
    (
        ["--solver", "rk45"],
        "--solver rk45: must be one of data-2m, ddim, euler, heun, lagged-midpoint, midpoint",
    ),
    (["--precision", "fp16"], "--precision fp16: must be one of fp32, bf16"),
    (["--localizability-samples", "-1"], "--localizability-samples -1: must be an integer in"),
    (["--fusion-proposals", "10"], "--fusion-proposals 10: must be an integer in [64, 65536]"),
    (["--noise", "halton"], "--noise halton: must be one of iid, sobol"),
]


@pytest.mark.parametrize(("args", "message"), PREDICT_BAD)
def test_predict_refuses_bad_settings_before_loading(photo, no_model_loading, args, message):
    _one_line_error(_run("predict", photo, *args), 2, message)


EVALUATE_BAD = [
    (["--guidance", "nan"], "--guidance nan: must be a finite number in [-1, 10]"),
    (["--num-samples", "100000000"], "--num-samples 100000000: must be an integer in [16, 4096]"),
    (["--hpd-samples", "5000"], "--hpd-samples 5000: must be an integer in [0, 4096]"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer in [1, 4096]"),
    (["--steps", "-1"], "--steps -1: must be"),
    (["--limit", "0"], "--limit 0: must be an integer >= 1"),
]


@pytest.mark.parametrize(("args", "message"), EVALUATE_BAD)
def test_evaluate_refuses_bad_settings_before_loading(tmp_path, no_model_loading, args, message):
    (tmp_path / "d.csv").write_text("IMG_ID,LAT,LON\n")
    _one_line_error(_run("evaluate", tmp_path / "d.csv", "-o", tmp_path / "r", *args), 2, message)


def test_a_models_recommended_guidance_is_checked_with_the_same_range(tmp_path, photo):
    model = _save_tiny(tmp_path / "m", {"recommended_guidance": 50.0})
    _one_line_error(
        _run("predict", photo, "--model", model, "--no-progress"),
        2,
        str(model),
        "recommended_guidance 50.0",
        "[-1, 10]",
        "--guidance",
    )
    # An explicit --guidance in range overrides the model's recommendation.
    ok = _run("predict", photo, "--model", model, "--guidance", "1", "--num-samples", "16",
              "--steps", "2", "--no-progress")  # fmt: skip
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("noise", ["iid", "sobol"])
def test_noise_sets_the_answers_initial_states(tmp_path, photo, tiny_model, noise):
    out = tmp_path / "a.json"
    ok = _run("predict", photo, "--model", tiny_model, "--noise", noise, "--num-samples", "64",
              "--steps", "2", "--no-progress", "--json", out)  # fmt: skip
    assert ok.exit_code == 0, ok.output
    (answer,) = json.loads(out.read_text())["results"]
    assert answer["settings"]["noise"] == answer["monte_carlo"]["noise"] == noise


def test_a_solver_the_models_family_lacks_is_refused(photo, tiny_model):
    result = _run("predict", photo, "--model", tiny_model, "--solver", "ddim", "--no-progress")
    _one_line_error(result, 2, "--solver ddim: a rfm model takes euler, midpoint, heun")


def test_non_finite_model_output_is_an_error_naming_the_model(tmp_path, photo):
    model = _save_tiny(tmp_path / "overflow", scale_output=1e30)
    _one_line_error(
        _run(
            "predict",
            photo,
            "--model",
            model,
            "--num-samples",
            "16",
            "--steps",
            "2",
            "--no-progress",
        ),  # fmt: skip
        1,
        str(model),
        "NaN or inf",
    )


# ---- item 9: outputs checked first -----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "target", "problem"),
    [
        ("--json", "dir", "is a folder"),
        ("--csv", "dir", "is a folder"),
        ("--geojson", "dir", "is a folder"),
        ("--json", "under-file", "is a file, not a folder"),
        ("--map", "file", "is a file, not a folder"),
    ],
)
def test_predict_checks_output_paths_before_any_work(
    tmp_path, photo, no_model_loading, option, target, problem
):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    path = {"dir": tmp_path / "dir", "file": tmp_path / "file"}.get(target)
    path = path or tmp_path / "file" / "r.json"
    csv_path = tmp_path / "out.csv"
    args = ["--csv", csv_path] if option != "--csv" else []
    result = _run("predict", photo, option, path, *args)
    _one_line_error(result, 2, f"{option} {path}", problem)
    assert not csv_path.exists()


def test_two_outputs_to_one_file_are_refused(tmp_path, photo, no_model_loading):
    out = tmp_path / "r.out"
    _one_line_error(_run("predict", photo, "--json", out, "--csv", out), 2, "--json", "--csv")


def test_evaluate_checks_its_report_folder_first(tmp_path, no_model_loading):
    (tmp_path / "d.csv").write_text("IMG_ID,LAT,LON\n")
    (tmp_path / "taken").write_text("x")
    result = _run("evaluate", tmp_path / "d.csv", "-o", tmp_path / "taken")
    _one_line_error(result, 2, f"--output {tmp_path / 'taken'}", "is a file, not a folder")


# ---- item 3: encoders ------------------------------------------------------------------------


def test_unknown_encoder_option_in_predict_and_embed(tmp_path, photo, tiny_model):
    result = _run("predict", photo, "--model", tiny_model, "--encoder", "banana")
    _one_line_error(result, 2, "--encoder banana", "unknown encoder 'banana'", ENCODER)
    result = _run("embed", photo, "-o", tmp_path / "e.parquet", "--encoder", "banana")
    _one_line_error(result, 2, "--encoder banana", "unknown encoder 'banana'")
    assert not (tmp_path / "e.parquet").exists()


def test_unknown_encoder_named_by_a_model(tmp_path, photo):
    model = tmp_path / "m"
    gf.save_model(RiemannianFlowMatching(Denoiser(dim=8, depth=1, cond_dim=4)), model,
                  metadata={"encoder": "banana"})  # fmt: skip
    result = _run("predict", photo, "--model", model)
    _one_line_error(result, 2, str(model), "'banana'", "--encoder")


# ---- item 1 (through the CLI) and 15 -----------------------------------------------------------


def test_corrupt_model_is_one_line_in_predict_and_evaluate(tmp_path, photo, tiny_model):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((tiny_model / "config.json").read_text())
    (model / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:99])
    _one_line_error(_run("predict", photo, "--model", model), 2, str(model), "truncated")
    (tmp_path / "d.csv").write_text("IMG_ID,LAT,LON\nphoto.jpg,1,2\n")
    result = _run("evaluate", tmp_path / "d.csv", "--model", model, "-o", tmp_path / "r")
    _one_line_error(result, 2, str(model), "truncated")


def test_a_loaded_and_saved_model_still_predicts(tmp_path, photo, tiny_model):
    gf.save_model(gf.load_model(tiny_model), tmp_path / "copy")
    out = tmp_path / "r.json"
    result = _run("predict", photo, "--model", tmp_path / "copy", "--num-samples", "16",
                  "--steps", "2", "--json", out, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads(out.read_text())["results"][0]["settings"]
    assert settings["encoder"] == ENCODER and settings["guidance"] == 0.5


# ---- item 10: unique, traceable names ----------------------------------------------------------


def test_same_named_photos_get_distinct_rows_and_maps(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for sub, color in (("a", (200, 30, 30)), ("b", (30, 200, 30))):
        (photos / sub).mkdir(parents=True)
        Image.new("RGB", (64, 48), color).save(photos / sub / "photo.jpg")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(photos / "photo.png")
    maps = tmp_path / "maps"
    result = _run("predict", photos, "--model", tiny_model, "--num-samples", "16", "--steps",
                  "2", "--map", maps, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in maps.iterdir()) == [
        "a__photo.jpg.png",
        "b__photo.jpg.png",
        "photo.png.png",
    ]
    for label in ("a/photo.jpg", "b/photo.jpg", "photo.png"):
        assert sum(f" {label} " in line for line in result.output.splitlines()) == 1, label


# ---- item 16: exit codes and evaluate's report -------------------------------------------------


def test_predict_fails_when_every_photo_failed(tmp_path, tiny_model):
    (tmp_path / "a.jpg").write_bytes(b"not a photo")
    (tmp_path / "b.jpg").write_bytes(b"")
    result = _run("predict", tmp_path / "a.jpg", tmp_path / "b.jpg", "--model", tiny_model,
                  "--no-progress")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "none of the 2 photos could be read" in result.output


def test_evaluate_explains_an_empty_result(tmp_path, tiny_model):
    folder = tmp_path / "no-gps"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (90 * i, 50, 50)).save(folder / f"{i}.jpg")
    result = _run("evaluate", folder, "--model", tiny_model, "-o", tmp_path / "r",
                  "--no-progress")  # fmt: skip
    _one_line_error(result, 1, str(folder), "2 skipped (no EXIF GPS)")


def test_evaluate_names_the_model_and_uses_its_recommended_guidance(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["IMG_ID,LAT,LON"]
    for i, (lat, lon) in enumerate([(48.85, 2.35), (35.68, 139.69)]):
        Image.new("RGB", (64, 48), (60 * i, 100, 200)).save(images / f"{i}.jpg")
        rows.append(f"{i}.jpg,{lat},{lon}")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "report"
    result = _run("evaluate", tmp_path / "test.csv", "--model", tiny_model, "-o", out,
                  "--num-samples", "16", "--steps", "2", "--hpd-samples", "0",
                  "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["model"] == str(tiny_model)
    assert settings["encoder"] == ENCODER
    assert settings["guidance"] == 0.5


def test_evaluate_keeps_every_good_record_of_a_mixed_batch(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["IMG_ID,LAT,LON"]
    for i, (lat, lon) in enumerate([(48.85, 2.35), (35.68, 139.69), (-33.87, 151.21)]):
        Image.new("RGB", (64, 48), (60 * i, 100, 200)).save(images / f"{i}.jpg")
        rows.append(f"{i}.jpg,{lat},{lon}")
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows += ["bad.jpg,1.0,2.0", "missing.jpg,3.0,4.0"]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "report"
    result = _run("evaluate", tmp_path / "test.csv", "--model", tiny_model, "-o", out,
                  "--num-samples", "16", "--steps", "2", "--hpd-samples", "0",
                  "--batch-size", "2", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["n_errors"] == 2
    errors = {e["id"]: e for e in summary["errors"]}
    assert sorted(errors) == ["bad.jpg", "missing.jpg"]
    assert errors["bad.jpg"]["path"].endswith("bad.jpg") and errors["missing.jpg"]["path"] == ""
    assert "no image file found" in errors["missing.jpg"]["error"]
    predicted = (out / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in predicted) == ["0.jpg", "1.jpg", "2.jpg"]


# ---- issue 18: hardening, round 2 ----------------------------------------------------------------


def test_an_output_that_is_an_input_is_refused_before_work(tmp_path, photo, no_model_loading):
    """``predict paris.jpg --json paris.jpg`` used to replace the photo with the JSON."""
    before = photo.read_bytes()
    _one_line_error(_run("predict", photo, "--json", photo), 2, f"--json {photo}", "also an input")
    result = _run("predict", tmp_path, "--csv", photo)  # found in the folder
    _one_line_error(result, 2, f"--csv {photo}", "also an input")
    result = _run("predict", tmp_path, "--map", tmp_path)
    _one_line_error(result, 2, f"--map {tmp_path}", "also an input")
    assert photo.read_bytes() == before
    line = _one_line_error(_run("embed", photo, "-o", photo), 2, f"--output {photo}")
    assert "Errno" not in line
    line = _one_line_error(_run("embed", tmp_path, "-o", photo), 2, "is a file, not a folder")
    assert "Errno" not in line
    store = tmp_path / "emb.parquet"
    from globeflow.data.embedding_store import EmbeddingWriter, store_parts

    with EmbeddingWriter(store, "fake", 2) as writer:
        writer.add(["a"], torch.zeros(1, 2), latlon=torch.tensor([[1.0, 2.0]]))
    result = _run("evaluate", store, "-o", store / "report")
    _one_line_error(result, 2, "--output", "inside the embedding store", str(store))
    _one_line_error(_run("evaluate", store, "-o", store), 2, "also an input")
    assert [p.name for p in store.iterdir()] == [p.name for p in store_parts(store)]  # untouched
    assert len(store_parts(store)) == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_where_no_file_can_be_created_is_refused_before_work(photo, no_model_loading):
    """root passes every permission check, yet /proc takes no new file: tried, not assumed."""
    result = _run("predict", photo, "--json", "/proc/globeflow-x.json")
    _one_line_error(result, 2, "--json /proc/globeflow-x.json", "cannot create files in /proc")


def test_fp16_is_refused_with_one_message_everywhere(tmp_path, photo, no_model_loading):
    expected = "error: --precision fp16: must be one of fp32, bf16"
    for args, extra in (
        (("predict", photo), ", mixed, auto"),  # predict alone also takes "mixed" and "auto"
        (("embed", photo, "-o", tmp_path / "e.parquet"), ""),
        (("train", "--embeddings", tmp_path / "e.parquet", "-o", tmp_path / "run"), ""),
    ):
        said = _one_line_error(_run(*args, "--precision", "fp16"), 2)
        assert said == expected + extra, args
    assert not (tmp_path / "e.parquet").exists() and not (tmp_path / "run").exists()


def test_predict_names_the_folder_without_photos(tmp_path, no_model_loading):
    (tmp_path / "emptydir").mkdir()
    result = _run("predict", tmp_path / "emptydir")
    _one_line_error(result, 2, f"no photos found in {tmp_path / 'emptydir'}", ".jpg")


def _finishes(call, seconds: float = 120.0):
    """``call()`` in a thread; fails the test if it is still running after ``seconds``."""
    import threading

    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("value", call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "blocked"
    return out["value"]


def test_predict_goes_on_past_a_named_pipe_and_an_unreadable_folder(
    tmp_path, photo, tiny_model, monkeypatch
):
    """The pipe blocked predict forever; the folder was left out without a word. Tests run as
    root, whom permission bits do not stop: its listing is made to fail as for a user."""
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    locked = tmp_path / "locked"
    locked.mkdir()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(locked / "hidden.jpg")
    make_unreadable(monkeypatch, str(locked))
    out = tmp_path / "r.csv"
    args = ["--model", tiny_model, "--num-samples", "16", "--steps", "2", "--no-progress"]
    result = _finishes(lambda: _run("predict", tmp_path, *args, "--csv", out))
    assert result.exit_code == 0, result.output
    assert f"{locked}: cannot read folder (Permission denied)" in result.output
    assert "pipe.jpg: is a named pipe, not an image file" in result.output
    rows = {r["image"]: r for r in csv.DictReader(out.open())}
    assert rows[str(photo)]["ok"] == "True" and rows[str(tmp_path / "pipe.jpg")]["ok"] == "False"


def test_names_that_are_not_utf8_reach_every_predict_output(tmp_path, tiny_model):
    """One rule everywhere: each undecodable byte as \\xNN; the map of each photo named in the
    CSV, JSON and GeoJSON, also for same-named photos in different folders."""
    import os

    photos = tmp_path / "photos"
    for sub in ("a", "b"):
        (photos / sub).mkdir(parents=True)
        Image.new("RGB", (64, 48), (200, 30, 30)).save(photos / sub / "photo.jpg")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(photos / os.fsdecode(b"caf\xe9.jpg"))
    (photos / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"not a photo")
    out = {ext: tmp_path / f"r.{ext}" for ext in ("csv", "json", "geojson")}
    result = _run("predict", photos, "--model", tiny_model, "--num-samples", "16", "--steps",
                  "2", "--csv", out["csv"], "--json", out["json"], "--geojson", out["geojson"],
                  "--map", tmp_path / "maps", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    escaped = str(photos / "caf\\xe9.jpg")
    rows = {r["image"]: r for r in csv.DictReader(out["csv"].open(encoding="utf-8"))}
    assert rows[escaped]["map"] == "caf_xe9.jpg.png"
    assert rows[str(photos / "a" / "photo.jpg")]["map"] == "a__photo.jpg.png"
    assert rows[str(photos / "b" / "photo.jpg")]["map"] == "b__photo.jpg.png"
    assert "bad\\xff.jpg" in rows[str(photos / "bad\\xff.jpg")]["error"]
    results = json.loads(out["json"].read_text(encoding="utf-8"))["results"]
    assert {r["image"]: r.get("map") for r in results}[escaped] == "caf_xe9.jpg.png"
    features = json.loads(out["geojson"].read_text(encoding="utf-8"))["features"]
    assert any(f["properties"]["image"] == escaped for f in features)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "a__photo.jpg.png",
        "b__photo.jpg.png",
        "caf_xe9.jpg.png",
    ]
