"""The train job: batches, validation outputs and exact resume after a kill (the optimiser pieces:
test_optim.py; rows from a store: test_train_inputs.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _interrupt import interrupted_at_step
from safetensors.torch import load_file, save_file

from globeflow.core.checkpoints import load_model
from globeflow.data.embedding_store import store_parts
from globeflow.jobs import training
from globeflow.jobs.training import (
    BatchOrder,
    TrainConfig,
    assemble_batch,
    build_model,
    split_rows,
    train,
)

REPO = Path(__file__).resolve().parents[1]
CENTERS = [[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second intra-op thread only adds contention on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(n: int = 400, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four city clusters; the embedding is a noisy one-hot of the cluster."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(len(CENTERS), (n,), generator=g)
    latlon = torch.tensor(CENTERS, dtype=torch.float64)[label]
    latlon = latlon + 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(label, len(CENTERS)).float()
    emb = onehot.repeat(1, dim // len(CENTERS)) + 0.1 * torch.randn(n, dim, generator=g)
    cut = n * 4 // 5
    return {
        "emb": emb[:cut],
        "latlon": latlon[:cut],
        "val_emb": emb[cut:],
        "val_latlon": latlon[cut:],
        "prior": latlon[:100] + 5.0 * torch.randn(100, 2, generator=g, dtype=torch.float64),
    }


RUN = dict(
    family="rfm",
    dim=32,
    depth=2,
    batch_size=64,
    max_steps=40,
    warmup_steps=5,
    lr=3e-3,
    ema_decay=0.99,
    val_every=10,
    checkpoint_every=5,
    log_every=5,
    val_geo_rows=48,
    prior_fraction=0.25,
)


def run_config(**changes) -> TrainConfig:
    data = synthetic()
    return TrainConfig(**{**RUN, **changes}, prior_latlon=data["prior"])


def run(out: Path, config: TrainConfig, **kwargs) -> training.TrainResult:
    d = synthetic()
    return train(
        config, d["emb"], d["latlon"], d["val_emb"], d["val_latlon"], out, progress=False, **kwargs
    )


def metric_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "time"} for m in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the configuration that the resume tests interrupt."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    run(out, run_config(), encoder="synthetic-encoder")
    return out


# ---- pieces ----------------------------------------------------------------------------------
def test_condition_dropout_rate(monkeypatch):
    model = build_model(TrainConfig(dim=16, depth=1, cond_drop_prob=0.2), cond_dim=4)
    seen = []
    forward = model.network.forward

    def spy(y, gamma, emb):
        seen.append(emb)
        return forward(y, gamma, emb)

    monkeypatch.setattr(model.network, "forward", spy)
    n = 5000
    x0 = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
    model.loss(x0, torch.ones(n, 4), generator=torch.Generator().manual_seed(0))
    dropped = float((seen[0].abs().sum(1) == 0).float().mean())
    assert abs(dropped - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)


def test_prior_mixing_fraction():
    config = TrainConfig(batch_size=64, prior_fraction=0.25, prior_latlon=torch.zeros(10, 2))
    assert config.prior_rows == 16
    assert TrainConfig(family="vmf", **{"prior_fraction": 0.25}).prior_rows == 0
    d = synthetic()
    x0 = training.to_unit(d["latlon"])
    prior = training.to_unit(d["prior"])
    order = BatchOrder(len(x0), config.batch_size - config.prior_rows, seed=0)
    bx, be = assemble_batch(
        x0, d["emb"], order.indices(3), prior, config.prior_rows, torch.Generator().manual_seed(1)
    )
    assert bx.shape == (64, 3) and be.shape == (64, 8)
    null = be.abs().sum(1) == 0
    assert int(null.sum()) == 16 and bool(null[-16:].all())
    # Every null row is one of the prior locations.
    gap = (bx[null][:, None, :] - prior[None]).abs().sum(-1).min(1).values
    assert bool((gap == 0).all())


def test_batch_order_is_a_pure_function_of_the_step():
    order = BatchOrder(10, 4, seed=3)
    stream = torch.cat([order.indices(s) for s in range(5)])  # 20 rows = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=3).indices(3), order.indices(3))
    assert order.position(3) == (1, 2)


def test_split_rows_by_author_keeps_authors_apart():
    authors = [f"a{i % 20}" for i in range(200)] + [""] * 10
    tr, va = split_rows(authors, len(authors), 0.15, seed=0)
    assert len(tr) + len(va) == 210 and set(tr.tolist()).isdisjoint(va.tolist())
    assert {authors[i] for i in tr.tolist() if authors[i]}.isdisjoint(
        {authors[i] for i in va.tolist() if authors[i]}
    )
    tr2, va2 = split_rows(None, 100, 0.2, seed=0)
    assert len(va2) == 20 and len(tr2) == 80


def test_the_pieces_stay_importable_from_the_training_module():
    from globeflow.jobs import optim, train_config, train_data, validation

    for name in training.__all__:
        assert getattr(training, name) is not None, name
    assert training.Lamb is optim.Lamb and training.update_ema is optim.update_ema
    assert training.TrainConfig is train_config.TrainConfig
    assert training.FAMILIES is train_config.FAMILIES
    assert training.split_rows is train_data.split_rows
    assert training.validate is validation.validate


# ---- whole runs ------------------------------------------------------------------------------
def test_training_writes_models_metrics_and_log(reference: Path):
    lines = metric_lines(reference)
    assert [m["step"] for m in lines] == [10, 20, 30, 40]
    for m in lines:
        assert {"train_loss", "lr", "val_loss", "val_geoscore", "val_median_km"} <= set(m)
        assert 0 < m["val_geoscore"] <= 5000 and math.isfinite(m["val_loss"])
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]
    best = load_model(reference / "best")
    final = load_model(reference / "final")
    assert final.metadata["encoder"] == "synthetic-encoder"
    assert final.metadata["training"]["family"] == "rfm"
    assert final.metadata["data"]["train"]["rows"] == 320
    assert final.metadata["validation"]["step"] == 40
    assert best.metadata["validation"]["val_geoscore"] == max(m["val_geoscore"] for m in lines)
    assert "step 5 loss" in (reference / "train_log.txt").read_text()


def test_resume_after_sigkill_is_exact(reference: Path, tmp_path: Path):
    d = synthetic()
    data_file = tmp_path / "data.safetensors"
    save_file({k: v.contiguous() for k, v in d.items()}, str(data_file))
    out = tmp_path / "run"
    code = (
        "import json, sys, time, torch\n"
        "torch.set_num_threads(1)\n"
        "from safetensors.torch import load_file\n"
        "from globeflow.jobs import training\n"
        "from globeflow.core.families import RiemannianFlowMatching as M\n"
        "d = load_file(sys.argv[1])\n"
        "loss = M.loss\n"
        # Slow each step down so that the kill lands in the middle of the run.
        "M.loss = lambda self, *a, **k: (time.sleep(0.04), loss(self, *a, **k))[1]\n"
        "config = training.TrainConfig(**json.loads(sys.argv[3]), prior_latlon=d['prior'])\n"
        "training.train(config, d['emb'], d['latlon'], d['val_emb'], d['val_latlon'],\n"
        "               sys.argv[2], progress=False, encoder='synthetic-encoder')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data_file), str(out), json.dumps(RUN)], env=env
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(state.read_text())["step"] >= 15:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        time.sleep(0.07)  # land between checkpoints, mid-step
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    assert not (out / "final").exists()

    result = run(out, run_config(), encoder="synthetic-encoder")
    assert result.steps == 40
    got = load_file(str(out / "final" / "model.safetensors"))
    want = load_file(str(reference / "final" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert metric_lines(out) == metric_lines(reference)


def test_resume_after_an_exception_is_exact_with_lamb(tmp_path: Path, monkeypatch):
    config = run_config(optimizer="lamb", max_steps=24, val_every=8, checkpoint_every=6)
    reference = run(tmp_path / "ref", config)

    with interrupted_at_step(monkeypatch, 17):
        run(tmp_path / "run", config)
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["step"] == 12
    result = run(tmp_path / "run", config)
    assert result.steps == 24
    got = load_file(str(tmp_path / "run/final/model.safetensors"))
    want = load_file(str(reference.final_dir / "model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert metric_lines(tmp_path / "run") == metric_lines(tmp_path / "ref")

    with pytest.raises(ValueError, match="different config"):
        run(tmp_path / "run", run_config(optimizer="lamb", max_steps=24, lr=1e-2))


def test_uniform_baseline_needs_no_optimiser(tmp_path: Path):
    result = run(tmp_path, TrainConfig(family="uniform", max_steps=10, val_geo_rows=16))
    assert result.steps == 10 and result.best_dir is not None
    assert load_model(result.final_dir).family == "uniform"


def test_train_from_embeddings(tmp_path: Path, monkeypatch):
    from globeflow.data import embedding_store

    d = synthetic()
    n = len(d["emb"])
    latlon = d["latlon"].clone()
    latlon[:7] = float("nan")
    table = embedding_store.EmbeddingTable(
        ids=[str(i) for i in range(n)],
        paths=[f"img{i}.jpg" for i in range(n)],
        latlon=latlon,
        authors=[f"author{i % 25}" for i in range(n)],
        embeddings=d["emb"],
        encoder_name="synthetic-encoder",
    )
    monkeypatch.setattr(embedding_store, "read_embeddings", lambda path: table)
    prior = tmp_path / "prior.csv"
    prior.write_text("ID,LAT,LON\n1,10.0,20.0\n2,-5.5,100.25\n3,,\n4,95,0\n")
    result = training.train_from_embeddings(
        "store", "flow", tmp_path / "out", prior_locations=prior, prior_fraction=0.25,
        dim=16, depth=1, batch_size=32, max_steps=6, warmup_steps=2, val_every=3,
        checkpoint_every=3, val_geo_rows=16, progress=False,
    )  # fmt: skip
    meta = load_model(result.final_dir).metadata
    assert meta["encoder"] == "synthetic-encoder"
    assert meta["data"]["prior_points"] == 2
    assert meta["validation_split"].startswith("author-grouped")
    rows = meta["data"]["train"]["rows"] + meta["data"]["val"]["rows"]
    assert rows == n - 7
    assert "dropped 7 of 320 rows" in (tmp_path / "out" / "train_log.txt").read_text()
    with pytest.raises(TypeError, match="unknown training option"):
        training.train_from_embeddings("store", "flow", tmp_path / "x", no_such_option=1)


# ---- bad inputs and stale inputs (the CLI) ---------------------------------------------------
TINY = ["--dim", "16", "--depth", "1", "--batch-size", "32", "--max-steps", "4"]
TINY += ["--warmup-steps", "1", "--val-every", "2", "--checkpoint-every", "2", "--no-progress"]


def write_store(path: Path, n: int = 120, dim: int = 8, **edits) -> Path:
    from globeflow.data.embedding_store import EmbeddingWriter

    d = synthetic(n=n, dim=dim)
    emb, latlon = d["emb"].clone(), d["latlon"].clone()
    if "nan_embedding_rows" in edits:
        emb[edits["nan_embedding_rows"]] = float("nan")
    if edits.get("no_coordinates"):
        latlon[:] = float("nan")
    authors = edits.get("authors", [f"author{i % 12}" for i in range(len(emb))])
    with EmbeddingWriter(path, "synthetic-encoder", dim, chunk_size=50) as w:
        w.add([f"img{i}" for i in range(len(emb))], emb, latlon=latlon, authors=authors)
    return path


def cli_train(*args: str):
    from typer.testing import CliRunner

    from globeflow.apps.cli import app

    return CliRunner().invoke(app, ["train", *args])


def assert_clean_error(result, *phrases: str) -> None:
    """Exit status 2 and one line `error: ...` naming the problem; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_bad_train_inputs_are_one_line_errors(tmp_path: Path):
    good = write_store(tmp_path / "good.parquet")
    mixed = write_store(tmp_path / "mixed.parquet")
    other = write_store(tmp_path / "other.parquet", dim=4)
    store_parts(other)[0].rename(mixed / "part-00009.parquet")  # another dim among the parts
    nan = write_store(tmp_path / "nan.parquet", nan_embedding_rows=[3, 7])
    nowhere = write_store(tmp_path / "nowhere.parquet", no_coordinates=True)
    table = tmp_path / "photos.csv"
    table.write_text("image,lat,lon\na.jpg,1,2\n")
    out = ["-o", str(tmp_path / "run")]
    cases = [
        ([str(mixed)], ["mixed embeddings", "part-00009.parquet", "dim 4"]),
        ([str(tmp_path / "missing.parquet")], ["missing.parquet", "no such embedding store"]),
        ([str(nan)], ["nan.parquet", "2 row(s) have non-finite embeddings", "img3"]),
        ([str(nowhere)], ["nowhere.parquet", "none of its 96 rows has usable coordinates"]),
        ([str(table)], ["photos.csv: a CSV file, not an embedding store", "`globeflow embed"]),
        ([str(good), "--prior-fraction", "1.5"], ["--prior-fraction 1.5", "--prior-locations"]),
        ([str(good), "--warmup-steps", "9"], ["--warmup-steps 9", "at most --max-steps (4)"]),
        ([str(good), "--precision", "fp16"], ["--precision fp16: must be one of fp32, bf16"]),
        ([str(good), "-o", str(good)], ["--output", "good.parquet: is also an input"]),
        ([str(good), "--val-split", "1.5"], ["--val-split", "(0, 1)", "1.5"]),
        ([str(good), "--val-split", "banana"], ["--val-split 'banana'"]),
        ([str(good), "--lr", "nan"], ["lr must be a number", "nan"]),
        ([str(good), "--batch-size", "0"], ["batch_size must be", "got 0"]),
        ([str(good), "--optimizer", "sgd"], ["optimizer must be", "sgd"]),
        ([str(good), "--device", "banana"], ["--device 'banana'"]),
        ([str(good), "--prior-locations", str(tmp_path / "no.csv")], ["no.csv", "no such"]),
    ]
    for args, phrases in cases:
        result = cli_train(*out, *TINY, "--embeddings", *args)  # later options win
        assert_clean_error(result, *phrases)
        assert not (tmp_path / "run" / "final").exists(), args  # refused before any work
    # another config into an existing run directory
    assert cli_train("--embeddings", str(good), *out, *TINY).exit_code == 0
    result = cli_train("--embeddings", str(good), *out, *TINY, "--lr", "0.01")
    assert_clean_error(result, "different config", "lr", "--restart")


def test_stale_inputs_are_refused_or_rebuilt(tmp_path: Path):
    store = write_store(tmp_path / "store.parquet")
    run = tmp_path / "run"
    assert cli_train("--embeddings", str(store), "-o", str(run), *TINY).exit_code == 0
    # a finished run asked to train on different data does not report the old model as done
    changed = write_store(tmp_path / "changed.parquet", n=140)
    result = cli_train("--embeddings", str(changed), "-o", str(run), *TINY)
    assert_clean_error(result, "different data", "--restart")
    # nor does a run resumed (more steps) with a different store carry on
    result = cli_train("--embeddings", str(changed), "-o", str(run), *TINY, "--max-steps", "6")
    assert_clean_error(result, "different data")
    restarted = cli_train("--embeddings", str(changed), "-o", str(run), *TINY, "--restart")
    assert restarted.exit_code == 0, restarted.output
    data = load_model(run / "final").metadata["data"]
    assert data["train"]["rows"] + data["val"]["rows"] == 112  # the new store's rows

    # --exclude-authors: a second run with another list rebuilds the filtered copy
    leave_out = tmp_path / "authors.txt"
    leave_out.write_text("author1\n")
    ex = tmp_path / "ex"
    args = ["--embeddings", str(store), "-o", str(ex), "--exclude-authors", str(leave_out)]
    assert cli_train(*args, *TINY).exit_code == 0
    first = read_embeddings_rows(ex / "train-embeddings.parquet")
    leave_out.write_text("author1\nauthor2\nauthor3\n")
    result = cli_train(*args, *TINY)
    assert_clean_error(result, "different data")  # the filtered data changed under the run
    second = read_embeddings_rows(ex / "train-embeddings.parquet")
    assert first == 88 and second == 72  # 8 rows per author; rebuilt, not reused
    assert "rebuilding" in (ex / "train_log.txt").read_text()


def read_embeddings_rows(store: Path) -> int:
    from globeflow.data.embedding_store import read_embeddings

    return len(read_embeddings(store))


def test_nonfinite_rows_exact_also_when_the_total_overflows():
    from globeflow.jobs.train_data import nonfinite_rows

    x = torch.zeros(6, 3)
    assert nonfinite_rows(x).tolist() == []
    x[1, 2], x[4, 0] = float("nan"), float("-inf")
    assert nonfinite_rows(x).tolist() == [1, 4]
    big = torch.full((4, 2), 3e38)  # finite values whose float32 total overflows
    assert nonfinite_rows(big).tolist() == []


def test_exclude_authors_keeps_the_store_dtype(tmp_path: Path) -> None:
    from globeflow.data.embedding_store import EmbeddingWriter, read_embeddings, store_dtype
    from globeflow.jobs.train_data import exclude_authors

    store = tmp_path / "half.parquet"
    with EmbeddingWriter(store, "toy", 4, dtype="float16") as w:
        w.add(
            ["a", "b", "c"],
            torch.full((3, 4), 1 / 3),
            latlon=torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
            authors=["ann", "bob", "ann"],
        )
    leave_out = tmp_path / "authors.txt"
    leave_out.write_text("ann\n")
    copy = exclude_authors(store, leave_out, tmp_path / "copy.parquet", say=lambda _: None)
    assert store_dtype(copy) == "float16"
    kept = read_embeddings(copy)
    assert kept.ids == ["b"] and kept.authors == ["bob"]
    assert kept.embeddings[0, 0] == torch.tensor(1 / 3).half().float()


SLOW_CLI = (
    "import sys, time, torch\n"
    "torch.set_num_threads(1)\n"
    "from globeflow.core.families import RiemannianFlowMatching as M\n"
    "from globeflow.apps.cli import main\n"
    "loss = M.loss\n"
    # Slow each step down so that the signal lands in the middle of the run.
    "M.loss = lambda self, *a, **k: (time.sleep(0.05), loss(self, *a, **k))[1]\n"
    "sys.argv = ['globeflow', 'train', *sys.argv[1:]]\n"
    "main()\n"
)


def test_sigterm_checkpoints_at_a_step_boundary_and_resumes_exactly(tmp_path: Path):
    store = write_store(tmp_path / "store.parquet")
    args = ["--embeddings", str(store), "--dim", "16", "--depth", "1", "--batch-size", "32"]
    args += ["--max-steps", "30", "--warmup-steps", "1", "--val-every", "10", "--no-progress"]
    args += ["--checkpoint-every", "1000"]  # no regular checkpoint before the end
    assert cli_train(*args, "-o", str(tmp_path / "ref")).exit_code == 0

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args, "-o", str(out)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text():
            break  # step 10 is validated
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 10 <= step < 30 and not (out / "final").exists()
    assert f"SIGTERM received: stopped at step {step} with a checkpoint in" in stderr

    resumed = cli_train(*args, "-o", str(out))
    assert resumed.exit_code == 0, resumed.output
    got = load_file(str(out / "final" / "model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert metric_lines(out) == metric_lines(tmp_path / "ref")


def test_stop_requests_record_signals_and_a_second_ctrl_c_stops_at_once():
    from globeflow.jobs.stop_signals import StopRequests, TrainingStopped

    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as requests:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert requests.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before
    assert TrainingStopped(signal.SIGINT, 3, Path("c")).exit_code == 130
