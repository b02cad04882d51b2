"""Answers at archive scale: one random stream per photo, so that a photo's answer is the same
bit for bit alone, in any batch, in the server's concurrent batches and on any rank."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from globeflow.answers.result_store import SettingsMismatchError, read_results
from globeflow.apps import pipeline
from globeflow.apps.cli import app
from globeflow.apps.pipeline import Locator
from globeflow.apps.server import create_app
from globeflow.core.checkpoints import save_model
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.families.baselines import VonMisesFisher
from globeflow.core.network import Denoiser
from globeflow.core.random_streams import photo_seed
from globeflow.data.embedding_store import EmbeddingWriter, store_parts
from globeflow.data.encoders import get_encoder
from globeflow.jobs import evaluation
from globeflow.jobs.evaluation import evaluate
from globeflow.jobs.evaluation_rows import ROW_SCHEMA
from globeflow.jobs.locate import locate_archive


class ColourEncoder:
    """6-d embedding of a photo: the mean colour of its left and right halves (per image, so
    an image's embedding does not depend on its batch)."""

    name, dim = "colour-halves", 6

    def embed(self, images, batch_size: int | None = None) -> torch.Tensor:
        halves = [np.asarray(img.convert("RGB").resize((2, 1)), dtype=np.float32) for img in images]
        return torch.from_numpy(np.stack(halves)).reshape(len(images), 6) / 255.0


def toy_locator(family: str = "rfm") -> Locator:
    torch.manual_seed(0)
    if family == "vmf":
        model = VonMisesFisher(cond_dim=6, hidden=16, depth=1)
    else:
        model = RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=6))
    return Locator(model, ColourEncoder(), model_name="toy")


def _answer(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "settings"}


def test_photo_seed_is_stable_and_separates_photos_and_seeds():
    # a fixed value: the same in every process (Python's hash() is salted per process)
    assert photo_seed(0, "a/photo.jpg") == photo_seed(0, "a/photo.jpg") == 7018910361584855354
    seeds = {photo_seed(s, p) for s in (0, 1) for p in ("a.jpg", "b.jpg", "é.jpg")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    "family,settings",
    [
        ("rfm", {"guidance": 2.0}),
        ("rfm", {"guidance": 0.0}),  # one pass gives samples and densities
        ("rfm", {"guidance": 2.0, "precision": "fp32", "solver": "euler"}),
        ("vmf", {}),  # a baseline draws inside sample(): one call per photo
    ],
)
def test_answer_is_bitwise_the_same_alone_and_in_any_batch(monkeypatch, family, settings):
    loc = toy_locator(family)
    monkeypatch.setattr(pipeline, "ROWS_PER_SOLVE", 96)  # three photos of 32 samples per solve
    emb = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    ids = [f"photo{i}.jpg" for i in range(7)]
    kw = dict(num_samples=32, steps=4, localizability_samples=16, seed=11, **settings)
    batch = loc.locate_embeddings(emb, photo_ids=ids, **kw)
    order = [5, 2, 6, 0, 3, 1, 4]
    shuffled = loc.locate_embeddings(emb[order], photo_ids=[ids[i] for i in order], **kw)
    for i in (0, 4, 6):
        alone = loc.locate_embeddings(emb[i : i + 1], photo_ids=ids[i : i + 1], **kw)[0]
        assert _answer(alone) == _answer(batch[i])
    for j, i in enumerate(order):
        assert _answer(shuffled[j]) == _answer(batch[i])
    # The stream is the photo's: another id or seed gives other samples.
    other = loc.locate_embeddings(emb[:1], photo_ids=["renamed.jpg"], **kw)[0]
    assert other["samples"] != batch[0]["samples"]
    reseeded = loc.locate_embeddings(emb[:1], photo_ids=ids[:1], **{**kw, "seed": 12})[0]
    assert reseeded["samples"] != batch[0]["samples"]


def test_without_ids_the_embedding_names_the_stream():
    loc = toy_locator()
    emb = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    kw = dict(num_samples=32, steps=2, localizability_samples=8)
    batch = loc.locate_embeddings(emb, **kw)
    alone = loc.locate_embeddings(emb[2:], **kw)[0]
    assert _answer(alone) == _answer(batch[2])


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (64, 48), colour)
    img.paste((255 - colour[0], 90, 30), (0, 0, 32, 48))
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_server_answer_does_not_depend_on_other_users_traffic():
    loc = toy_locator()
    photos = {f"p{i}.jpg": _jpeg((40 * i, 200 - 30 * i, 120)) for i in range(6)}
    params = {"num_samples": 32, "steps": 2}
    with TestClient(create_app(loc, max_batch=8)) as client:

        def post(names: list[str]) -> list[dict]:
            files = [("file", (n, photos[n], "image/jpeg")) for n in names]
            r = client.post("/v1/locate", files=files, params=params)
            assert r.status_code == 200, r.text
            return r.json()["results"]

        alone = post(["p0.jpg"])[0]
        worker = client.app.state.worker
        batches_before = worker.batches_run
        # Concurrent requests: the worker batches their photos together.
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(post, [["p1.jpg", "p0.jpg"], ["p2.jpg", "p3.jpg"], ["p4.jpg", "p5.jpg"]])
            )
        assert worker.batches_run - batches_before < 3 * 2  # some photos shared a model call
        assert _answer(answers[0][1]) == _answer(alone)
        assert answers[0][1]["samples"] != answers[0][0]["samples"]


# ---- the streaming job: resume, refusal, store input, torchrun ---------------------------------

SETTINGS = dict(num_samples=32, steps=2, localizability_samples=16, seed=5)


def write_store(path: Path, n: int, dim: int = 6, encoder: str = ColourEncoder.name) -> Path:
    g = torch.Generator().manual_seed(1)
    latlon = torch.stack(
        [torch.rand(n, generator=g) * 120 - 60, torch.rand(n, generator=g) * 300 - 150], 1
    )
    latlon[::4] = float("nan")  # some rows without coordinates
    with EmbeddingWriter(path, encoder, dim, chunk_size=7, row_group_size=3) as w:
        w.add(
            [f"img{i:03d}" for i in range(n)],
            torch.randn(n, dim, generator=g),
            latlon=latlon.double(),
        )
    return path


def test_store_rows_are_answered_once_and_a_rerun_skips_them(tmp_path):
    store = write_store(tmp_path / "emb.parquet", 23)
    out = tmp_path / "answers"
    first = locate_archive(toy_locator(), SETTINGS, embeddings=store, output=out, batch_size=4,
                           chunk_size=5, progress=False)  # fmt: skip
    assert (first.located, first.skipped_existing, first.failed) == (23, 0, 0)
    table = read_results(out)
    assert table.column("id").to_pylist() == [f"img{i:03d}" for i in range(23)]
    # a part is committed once it holds 5 rows: after whole batches of 4
    assert [pq.ParquetFile(p).metadata.num_rows for p in store_parts(out)] == [8, 8, 7]
    again = locate_archive(toy_locator(), SETTINGS, embeddings=store, output=out, batch_size=4,
                           progress=False)  # fmt: skip
    assert (again.located, again.skipped_existing) == (0, 23)
    assert read_results(out).equals(table)
    # Truth from the store: error_km where it has coordinates, none where it has not.
    errors = table.column("error_km").to_pylist()
    assert errors[0] is None and all(e >= 0 for e in errors[1:4])


def test_other_settings_on_existing_answers_are_refused_in_one_line(tmp_path):
    store = write_store(tmp_path / "emb.parquet", 6)
    out = tmp_path / "answers"
    locate_archive(toy_locator(), SETTINGS, embeddings=store, output=out, progress=False)
    with pytest.raises(SettingsMismatchError, match=r"seed 5 there, 6 now.*--overwrite"):
        locate_archive(toy_locator(), {**SETTINGS, "seed": 6}, embeddings=store, output=out,
                       progress=False)  # fmt: skip
    other_model = toy_locator()
    with torch.no_grad():
        next(other_model.model.parameters()).add_(1e-3)
    with pytest.raises(SettingsMismatchError, match="model_weights"):
        locate_archive(other_model, SETTINGS, embeddings=store, output=out, progress=False)
    done = locate_archive(toy_locator(), {**SETTINGS, "seed": 6}, embeddings=store, output=out,
                          overwrite=True, progress=False)  # fmt: skip
    assert done.located == 6 and len(read_results(out)) == 6


_KILLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[3])
from test_archive import SETTINGS, toy_locator
from globeflow.jobs import evaluation
from globeflow.jobs.evaluation import evaluate
from globeflow.jobs.evaluation_rows import ROW_SCHEMA
from globeflow.jobs.locate import locate_archive
locator = toy_locator()
real, calls = locator.locate_embeddings, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[4]):
        time.sleep(float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)  # a long batch
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
    return real(*args, **kwargs)
locator.locate_embeddings = dying
locate_archive(locator, SETTINGS, embeddings=sys.argv[1], output=sys.argv[2], batch_size=3,
               max_unsaved_seconds=float(sys.argv[5]), progress=False)
"""


@pytest.mark.parametrize("save_every_s,kept", [(0.0, 12), (3600.0, 0)])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, save_every_s, kept):
    """kill -9 in the 5th batch: with commits after every batch the 4 batches before it are
    kept; with a long save interval (and 1,024-row parts) nothing is, and nothing is broken."""
    store = write_store(tmp_path / "emb.parquet", 20)
    out = tmp_path / "killed"
    args = [sys.executable, "-c", _KILLED_RUN, str(store), str(out), str(Path(__file__).parent),
            "5", str(save_every_s)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(read_results(out)) == kept
    resumed = locate_archive(toy_locator(), SETTINGS, embeddings=store, output=out, batch_size=3,
                             progress=False)  # fmt: skip
    assert (resumed.skipped_existing, resumed.located) == (kept, 20 - kept)
    whole = tmp_path / "whole"
    locate_archive(toy_locator(), SETTINGS, embeddings=store, output=whole, batch_size=7,
                   progress=False)  # fmt: skip
    a, b = read_results(out, sort_by_id=True), read_results(whole, sort_by_id=True)
    assert a.column("id").to_pylist() == [f"img{i:03d}" for i in range(20)]  # none lost or twice
    assert a.equals(b)


# ---- the command line: photos or a store, one process or two --------------------------------

BIN = Path(sys.executable).parent
CLI_SETTINGS = ["--num-samples", "32", "--steps", "2", "--localizability-samples", "16"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    dim = get_encoder("efficientnet-lite0").dim
    path = tmp_path_factory.mktemp("model")
    save_model(RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=dim)), path,
               metadata={"encoder": "efficientnet-lite0"})  # fmt: skip
    return path


def _cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _torchrun(*args) -> str:
    """``torchrun --standalone --nproc_per_node 2 --no-python globeflow ARGS``; its stdout."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
           str(BIN / "globeflow"), *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_store_input_gives_the_answers_of_photo_input(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 48), (50 * i, 200 - 40 * i, 90)).save(photos / f"{i}.jpg")
    (photos / "broken.jpg").write_bytes(b"not a photo")
    store = tmp_path / "emb.parquet"
    _cli("embed", photos, "-o", store, "--encoder", "efficientnet-lite0", "--no-progress")
    common = ["--model", tiny_model, *CLI_SETTINGS, "--no-progress"]
    _cli("predict", photos, "--out", tmp_path / "from_photos", *common)
    out = _cli("predict", "--embeddings", store, "--out", tmp_path / "from_store", *common)
    assert "located 5 photos" in out
    a, b = read_results(tmp_path / "from_photos"), read_results(tmp_path / "from_store")
    assert a.column("id").to_pylist() == [f"{i}.jpg" for i in range(5)]
    assert a.equals(b)


def test_torchrun_two_processes_write_the_answers_of_one(tmp_path, tiny_model):
    store = write_store(tmp_path / "emb.parquet", 17, get_encoder("efficientnet-lite0").dim,
                        "efficientnet-lite0")  # fmt: skip
    args = ["predict", "--embeddings", store, "--model", tiny_model, *CLI_SETTINGS,
            "--batch-size", "3", "--no-progress"]  # fmt: skip
    _cli(*args, "--out", tmp_path / "one")
    printed = _torchrun(*args, "--out", tmp_path / "two")
    assert "located 17 photos" in printed
    # the table holds every photo, not only rank 0's (issue 23, item 6)
    table = [line for line in printed.splitlines() if line.startswith("│ img")]
    assert [line.split()[1] for line in table] == [f"img{i:03d}" for i in range(17)]
    ranks = {p.name.split("-")[2] for p in store_parts(tmp_path / "two")}
    assert ranks == {"000", "001"}  # each rank wrote its own parts
    one, two = read_results(tmp_path / "one"), read_results(tmp_path / "two")
    assert one.column("id").to_pylist() == [f"img{i:03d}" for i in range(17)]
    assert two.equals(one)  # the same rows, bit for bit, in the same order


# ---- evaluate: rows streamed, resumed, sharded -------------------------------------------------


def _summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    summary["settings"].pop("seconds")
    return summary


def test_evaluate_resumed_after_an_interrupt_reports_the_uninterrupted_summary(
    tmp_path, monkeypatch
):
    store = write_store(tmp_path / "emb.parquet", 30)
    loc = toy_locator()
    kw = dict(num_samples=32, steps=2, hpd_samples=16, batch_size=4, progress=False)
    whole = evaluate(loc.model, store, output=tmp_path / "whole", **kw)
    assert whole.summary["n"] == 22  # rows without coordinates are left out
    calls = []
    real = evaluation._batch_rows

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_batch_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(loc.model, store, output=tmp_path / "resumed", **kw)
    monkeypatch.setattr(evaluation, "_batch_rows", real)
    assert len(read_results(tmp_path / "resumed" / "rows", schema=ROW_SCHEMA)) == 8
    # Another batch size cuts the work otherwise, not the rows (issue 23, item 4).
    resumed = evaluate(loc.model, store, output=tmp_path / "resumed", **{**kw, "batch_size": 5})
    assert resumed.table.equals(whole.table)
    assert resumed.summary == whole.summary
    with pytest.raises(SettingsMismatchError, match="seed"):
        evaluate(loc.model, store, output=tmp_path / "resumed", **{**kw, "seed": 1})


def test_evaluate_under_torchrun_equals_one_process(tmp_path, tiny_model):
    dim = get_encoder("efficientnet-lite0").dim
    store = write_store(tmp_path / "emb.parquet", 26, dim, "efficientnet-lite0")
    args = ["evaluate", store, "--model", tiny_model, "--num-samples", "32", "--steps", "2",
            "--hpd-samples", "16", "--batch-size", "3", "--no-progress"]  # fmt: skip
    _cli(*args, "-o", tmp_path / "one")
    _torchrun(*args, "-o", tmp_path / "two")
    ranks = {p.name.split("-")[2] for p in store_parts(tmp_path / "two" / "rows")}
    assert ranks == {"000", "001"}
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "predictions.csv").read_text() == (two / "predictions.csv").read_text()
    assert _summary(one) == _summary(two)
    assert _summary(one)["n"] == 19


# ---- --device on predict, evaluate and serve (issue 18, item 6) -------------------------------


@pytest.mark.parametrize("command", ["predict", "evaluate", "serve"])
def test_device_option_places_model_and_encoder(tmp_path, monkeypatch, command):
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(photo)
    args = {"predict": [photo], "evaluate": [tmp_path, "-o", tmp_path / "r"], "serve": []}
    seen = {}

    def from_pretrained(*_, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline.Locator, "from_pretrained", from_pretrained)
    result = CliRunner().invoke(app, [command, *map(str, args[command]), "--device", "cpu"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["device"] == "cpu" and seen["encoder_options"] == {"device": torch.device("cpu")}
    for bad, message in (("banana", "not a device"), ("meta", "only cpu and cuda")):
        result = CliRunner().invoke(app, [command, *map(str, args[command]), "--device", bad])
        assert result.exit_code == 2 and message in result.output, result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, [command, *map(str, args[command]), "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_ctrl_c_keeps_the_answers_so_far_and_exits_130(tmp_path, tiny_model, monkeypatch):
    store = write_store(tmp_path / "emb.parquet", 12, get_encoder("efficientnet-lite0").dim,
                        "efficientnet-lite0")  # fmt: skip
    real, calls = pipeline.Locator.locate_embeddings, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Locator, "locate_embeddings", interrupted)
    out = tmp_path / "answers"
    args = ["predict", "--embeddings", store, "--model", tiny_model, *CLI_SETTINGS,
            "--batch-size", "3", "--out", out, "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 130
    assert "interrupted after 6 photos" in result.output and "rerun" in result.output
    assert len(read_results(out)) == 6  # the buffered answers were committed
    monkeypatch.setattr(pipeline.Locator, "locate_embeddings", real)
    assert "located 6 photos" in _cli(*args) and len(read_results(out)) == 12


def test_small_run_outputs_are_refused_for_large_runs_before_any_work(tmp_path, monkeypatch):
    from globeflow.apps.cli import _common

    monkeypatch.setattr(_common, "SMALL_RUN_PHOTOS", 3)
    store = write_store(tmp_path / "emb.parquet", 5)
    monkeypatch.setattr(pipeline.Locator, "from_pretrained", None)  # refused before loading
    result = CliRunner().invoke(
        app, ["predict", "--embeddings", str(store), "--json", str(tmp_path / "a.json")]
    )
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert "--json holds every answer in memory: at most 3 photos, here 5; use --out" in (
        result.output
    )


@pytest.mark.parametrize("option", [["--jsonl"], ["--keep-samples", "5"], ["--overwrite"]])
def test_options_of_the_answers_folder_need_it(tmp_path, option, monkeypatch):
    monkeypatch.setattr(pipeline.Locator, "from_pretrained", None)  # refused before loading
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(photo)
    result = CliRunner().invoke(app, ["predict", str(photo), *option])
    assert result.exit_code == 2
    assert result.output == f"error: {option[0]} goes with --out DIR (the answers folder)\n"


def test_answers_with_other_defaults_are_refused(tmp_path, monkeypatch):
    """Options left to their defaults look the same in two versions with other defaults: the
    settings the first answers report (defaults filled in) are recorded and checked too."""
    out = tmp_path / "answers"
    kw = dict(num_samples=32, localizability_samples=16, seed=5)  # steps: the default
    locate_archive(toy_locator(), kw, embeddings=write_store(tmp_path / "a.parquet", 4),
                   output=out, progress=False)  # fmt: skip
    newer = toy_locator()  # a version whose default recipe takes one more step
    steps = newer.sampler.steps
    newer.sampler = dataclasses.replace(newer.sampler, steps=steps + 1)
    bigger = write_store(tmp_path / "b.parquet", 8)  # 4 more photos to answer
    with pytest.raises(SettingsMismatchError, match=f"steps {steps} there, {steps + 1} now"):
        locate_archive(newer, kw, embeddings=bigger, output=out, progress=False)
    assert len(read_results(out)) == 4  # nothing of the refused run was written


def test_batches_come_back_in_order_with_their_own_embeddings():
    """The next batch is encoded while this one is answered: each batch still gets the
    embeddings of its own readable images, in order (None where it has none)."""
    from types import SimpleNamespace

    from globeflow.jobs.locate import _encoded_ahead

    class Encoder:
        def embed(self, images):
            return torch.tensor([[float(i)] for i in images])

    def batch(*images):
        return [SimpleNamespace(image=i) for i in images]

    batches = [batch(1, None), batch(None), batch(2, 3)]
    out = list(_encoded_ahead(SimpleNamespace(encoder=Encoder()), iter(batches)))
    assert [b for b, _ in out] == batches
    assert out[0][1].tolist() == [[1.0]] and out[1][1] is None
    assert out[2][1].tolist() == [[2.0], [3.0]]
