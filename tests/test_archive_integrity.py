"""Archives that cannot collide, answers that cannot drift (issue 23): one job per output folder,
the save interval kept while a batch computes, resume on the settings the answers were made
with, stores with repeated ids read once per id."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_archive import (
    _KILLED_RUN,
    CLI_SETTINGS,
    SETTINGS,
    ColourEncoder,
    toy_locator,
    write_store,
)
from test_cli_checks import _save_tiny
from test_run_lock import ENV, HOLD
from typer.testing import CliRunner

from globeflow.answers.result_store import ResultWriter, SettingsMismatchError, read_results
from globeflow.apps.cli import app
from globeflow.core.sampler_settings import DEFAULT_SAMPLER
from globeflow.data.embedding_store import EmbeddingWriter, RepeatedIdsWarning, store_parts
from globeflow.data.encoders import get_encoder
from globeflow.jobs.locate import locate_archive

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("model"))


# ---- one job per output folder (item 1) --------------------------------------------------------


def _jobs(tmp_path: Path, model: Path) -> dict[str, list]:
    """A predict --out, evaluate -o and embed -o command, each on its own output folder."""
    dim = get_encoder("efficientnet-lite0").dim
    store = write_store(tmp_path / "emb.parquet", 6, dim, "efficientnet-lite0")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (90 * i, 40, 200)).save(photos / f"{i}.jpg")
    quick = ["--num-samples", "32", "--steps", "2", "--no-progress"]
    return {
        "predict": ["predict", "--embeddings", store, "--model", model, *quick, "--out"],
        "evaluate": ["evaluate", store, "--model", model, *quick, "--hpd-samples", "0", "-o"],
        "embed": ["embed", photos, "--encoder", "efficientnet-lite0", "--no-progress", "-o"],
    }


@pytest.mark.parametrize("command", ["predict", "evaluate", "embed"])
def test_a_second_job_on_an_output_folder_is_refused_naming_the_holder(
    tmp_path, tiny_model, command
):
    args = _jobs(tmp_path, tiny_model)[command]
    out = tmp_path / "out"
    out.mkdir()
    # The holder's part in flight: a second run must not take it for a dead writer's leftover.
    in_flight = out / "rows" if command == "evaluate" else out
    in_flight.mkdir(exist_ok=True)
    (in_flight / ".tmp-part-00000-000-00000-0badcafe.parquet").write_bytes(b"being written")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = CliRunner().invoke(app, [str(a) for a in [*args, out]])
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait()
    assert busy.exit_code == 2, busy.output
    assert f"in use by PID {holder.pid} on {socket.gethostname()}" in busy.output
    assert (in_flight / ".tmp-part-00000-000-00000-0badcafe.parquet").exists()
    assert not store_parts(in_flight)
    again = CliRunner().invoke(app, [str(a) for a in [*args, out]])
    assert again.exit_code == 0, again.output
    assert store_parts(in_flight) and not list(in_flight.glob(".tmp-*"))  # the holder is dead


def test_answers_written_by_two_runs_at_once_are_read_once_per_id(tmp_path):
    """Answer folders written before they were locked (or on a file system without locks):
    both runs' parts survive, and readers and a resume take each id once."""
    out = tmp_path / "answers"
    loc = toy_locator()
    settings = {"fingerprint": "the same run"}
    first, second = ResultWriter(out, settings), ResultWriter(out, settings)
    ids = [f"img{i:03d}" for i in range(10)]
    emb = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    answers = loc.locate_embeddings(emb, photo_ids=ids, **SETTINGS)
    first.add(ids[:6], answers[:6])
    second.add(ids[3:8], answers[3:8])
    first.close()
    second.close()
    with pytest.warns(RepeatedIdsWarning, match="3 rows repeat an id"):
        table = read_results(out)
    assert sorted(table.column("id").to_pylist()) == ids[:8]
    assert len(store_parts(out)) == 2  # one part each: neither replaced the other


def test_a_store_with_repeated_ids_is_answered_once_per_id(tmp_path):
    store = tmp_path / "emb.parquet"
    write_store(store, 9)
    with EmbeddingWriter(store, ColourEncoder.name, 6) as again:  # 3 rows stored twice
        again.add(["img002", "img005", "img007"], torch.zeros(3, 6))
    with pytest.warns(RepeatedIdsWarning):
        report = locate_archive(toy_locator(), SETTINGS, embeddings=store,
                                output=tmp_path / "a", batch_size=4, progress=False)  # fmt: skip
    assert (report.total, report.located) == (9, 9)
    answered = read_results(tmp_path / "a").column("id").to_pylist()
    assert answered == [f"img{i:03d}" for i in range(9)]


def test_predict_says_when_a_store_repeats_ids(tmp_path, tiny_model):
    dim = get_encoder("efficientnet-lite0").dim
    store = write_store(tmp_path / "emb.parquet", 5, dim, "efficientnet-lite0")
    with EmbeddingWriter(store, "efficientnet-lite0", dim) as again:
        again.add(["img001", "img003"], torch.zeros(2, dim))
    args = ["predict", "--embeddings", store, "--model", tiny_model, *CLI_SETTINGS,
            "--out", tmp_path / "a", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "2 rows repeat an id stored before" in result.output
    assert "located 5 photos" in result.output


# ---- the save interval while a batch computes (item 2) -----------------------------------------


def test_kill_9_during_a_long_batch_keeps_the_answers_of_the_save_interval(tmp_path):
    """The first batch's answers are committed 0.5 s after they are made, while the second
    batch still computes: kill -9 then loses only the batch in progress."""
    store = write_store(tmp_path / "emb.parquet", 9)
    out = tmp_path / "killed"
    # killed 3 s into the second batch, answers committed 0.5 s after they are made
    args = [sys.executable, "-c", _KILLED_RUN, str(store), str(out), str(HERE), "2", "0.5", "3"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert read_results(out).column("id").to_pylist() == ["img000", "img001", "img002"]


# ---- resume on the settings the answers were made with (item 4) ---------------------------------


def test_resume_takes_spelled_out_defaults_for_the_defaults(tmp_path):
    out = tmp_path / "answers"
    quick = {"steps": 2, "localizability_samples": 16, "seed": 5}  # num_samples etc. defaulted
    locate_archive(toy_locator(), quick, embeddings=write_store(tmp_path / "a.parquet", 3),
                   output=out, progress=False)  # fmt: skip
    loc = toy_locator()
    recipe = loc.sampler
    spelled = {**quick, "num_samples": recipe.num_samples, "precision": recipe.precision,
               "solver": recipe.solver, "top_k": 5}  # fmt: skip
    bigger = write_store(tmp_path / "b.parquet", 5)
    again = locate_archive(loc, spelled, embeddings=bigger, output=out, progress=False)
    assert (again.skipped_existing, again.located) == (3, 2)
    with pytest.raises(SettingsMismatchError, match="steps 2 there, 3 now"):
        locate_archive(loc, {**quick, "steps": 3}, embeddings=bigger, output=out, progress=False)


def test_the_cli_resumes_with_spelled_out_defaults_and_refuses_jsonl_added_later(
    tmp_path,
    tiny_model,
):
    dim = get_encoder("efficientnet-lite0").dim
    store = write_store(tmp_path / "emb.parquet", 4, dim, "efficientnet-lite0")
    out = tmp_path / "answers"
    common = ["predict", "--embeddings", store, "--model", tiny_model, "--out", out,
              "--num-samples", "32", "--localizability-samples", "16", "--no-progress"]  # fmt: skip
    first = CliRunner().invoke(app, [str(a) for a in [*common, "--steps", "2"]])
    assert first.exit_code == 0, first.output
    precision = DEFAULT_SAMPLER.resolved_precision("cpu")  # as the archive records it
    spelled = [
        *common,
        "--steps",
        "2",
        "--precision",
        precision,
        "--solver",
        DEFAULT_SAMPLER.solver,
    ]
    again = CliRunner().invoke(app, [str(a) for a in spelled])
    assert again.exit_code == 0, again.output
    assert "0 photos" in again.output and "4 already answered" in again.output
    with_jsonl = CliRunner().invoke(app, [str(a) for a in [*spelled, "--jsonl"]])
    assert with_jsonl.exit_code == 2
    assert "jsonl False there, True now" in with_jsonl.output


# ---- batch independence from photos (item 5): up to float rounding, as the README says ---------


def test_a_photo_alone_and_among_others_agrees_up_to_the_encoders_rounding():
    """The encoder's batched convolutions round a photo's embedding differently among others
    (measured: up to 1e-7 with the bundled encoder); from there the answer is a function of the
    embedding, so alone and among six agree to float rounding, and bit for bit when the same
    embedding is given."""
    from globeflow.apps.pipeline import Locator

    locator = Locator.from_pretrained()
    photos = sorted((HERE.parent / "examples").glob("*.jpg"))
    images = [Image.open(p).convert("RGB") for p in photos]
    images.append(images[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # six photos
    names = [p.name for p in photos] + ["flipped.jpg"]
    together = locator.encoder.embed(images)
    kw = dict(num_samples=64, steps=4, localizability_samples=16)
    among = locator.locate_images(list(zip(names, images)), photo_ids=names, **kw)
    batch = locator.locate_embeddings(together, photo_ids=names, **kw)
    for i in (0, 2, 4):
        alone_emb = locator.encoder.embed(images[i : i + 1])
        assert (alone_emb[0] - together[i]).abs().max() < 1e-5
        [alone] = locator.locate_images([(names[i], images[i])], photo_ids=names[i : i + 1], **kw)
        for key in ("lat", "lon"):
            assert abs(alone["best_guess"][key] - among[i]["best_guess"][key]) < 1e-3
        [same] = locator.locate_embeddings(together[i : i + 1], photo_ids=names[i : i + 1], **kw)
        assert same["samples"] == batch[i]["samples"]
        assert same["best_guess"] == batch[i]["best_guess"]
