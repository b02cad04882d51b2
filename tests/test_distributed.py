"""Training and embedding under torchrun: 2 gloo processes on the CPU against one process.

What two processes must reproduce: with the same global batch and seed, DDP training ends within
float tolerance of the one-process run. The ranks assemble the same global batch, draw the
loss's random numbers for the whole batch and each computes the loss of its half; DDP averages
the two half-batch gradients. The only difference from one process is the float32 summation
order of the per-row gradients (two half means averaged by the all-reduce instead of one mean),
about 1e-7 relative per step. Adam divides each gradient coordinate by its running RMS, so a
rounding-level change to a coordinate whose gradient is nearly zero can move that weight by a
sizeable fraction of lr in one step: measured, the largest weight difference after 30 steps at
lr 3e-3 is 1.5e-6 (weights of order 1). The tests run 12 steps and allow 2e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from globeflow.data.embedding_store import EmbeddingWriter, read_embeddings
from globeflow.jobs.distributed import Placement, Prefetcher, rank_slice, resolve_device
from globeflow.jobs.training import Runtime, train_from_embeddings

BIN = Path(sys.executable).parent
WEIGHT_ATOL = 2e-5
CENTERS = [[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]]
RUN = dict(
    dim=32,
    depth=2,
    batch_size=64,
    max_steps=12,
    warmup_steps=12,  # every step warms up: its lr does not depend on max_steps (resume test)
    lr=3e-3,
    val_every=6,
    checkpoint_every=6,
)


def torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N --no-python globeflow ARGS`` (the README's)."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python"]
    cmd += [str(BIN / "globeflow"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def cli_options(store: Path, prior: Path, **changes) -> list[str]:
    opts = {**RUN, **changes}
    args = ["train", "--embeddings", str(store), "--prior-locations", str(prior), "--no-progress"]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def write_store(path: Path, n: int = 400, dim: int = 8) -> Path:
    g = torch.Generator().manual_seed(0)
    label = torch.randint(len(CENTERS), (n,), generator=g)
    latlon = torch.tensor(CENTERS, dtype=torch.float64)[label]
    latlon = latlon + 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(label, len(CENTERS)).float()
    emb = onehot.repeat(1, dim // len(CENTERS)) + 0.1 * torch.randn(n, dim, generator=g)
    with EmbeddingWriter(path, "synthetic", dim, chunk_size=100, row_group_size=25) as w:
        w.add(
            [f"img{i}" for i in range(n)],
            emb,
            latlon=latlon,
            authors=[f"a{i % 30}" for i in range(n)],
        )
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    prior = root / "prior.csv"
    prior.write_text("LAT,LON\n10,20\n-5,100\n30,-60\n60,10\n")
    return {"store": write_store(root / "store.parquet"), "prior": prior, "root": root}


def train_here(inputs: dict[str, Path], out: Path, **changes):
    """The same run as :func:`cli_options` describes, in this process (one process)."""
    opts = {**RUN, **changes}
    return train_from_embeddings(
        inputs["store"],
        "rfm",
        out,
        prior_locations=inputs["prior"],
        progress=False,
        runtime=Runtime(device="cpu"),
        **opts,
    )


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    train_here(inputs, out)
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_model(got: Path, want: Path) -> None:
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, worst
    ours = [json.loads(x) for x in (got / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(x) for x in (want / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    for m, n in zip(ours, theirs):
        assert m["train_loss"] == pytest.approx(n["train_loss"], rel=1e-5)


# ---- pieces ------------------------------------------------------------------------------------
def test_rank_slices_split_a_batch_into_contiguous_near_equal_shares():
    for n, world in [(64, 2), (10, 3), (7, 4), (3, 5)]:
        shares = [rank_slice(n, r, world) for r in range(world)]
        assert [i for s in shares for i in range(n)[s]] == list(range(n))
        sizes = [s.stop - s.start for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_needs_no_process_group():
    place = Placement()
    assert not place.distributed and place.is_main
    assert place.broadcast("x") == "x" and place.gather(3) == [3]
    t = torch.tensor(2.0)
    assert place.sum(t) is t


def test_device_errors_are_clear():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="banana"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="precision"):
        Runtime(precision="fp8")


def test_prefetcher_keeps_order_and_passes_on_errors():
    def items():
        for i in range(5):
            yield (torch.full((2,), float(i)),)
        raise KeyError("broken reader")

    fetch = Prefetcher(items(), torch.device("cpu"), depth=2)
    got = [float(next(fetch)[0][0]) for _ in range(5)]
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(KeyError, match="broken reader"):
        next(fetch)
    fetch.close()


def test_bf16_autocast_trains_on_the_cpu(inputs, one_process, tmp_path):
    """bf16 autocast runs the network's matrix products in bfloat16 (8 mantissa bits): the
    model learns the same thing, to within what those roundings allow."""
    result = train_from_embeddings(
        inputs["store"], "rfm", tmp_path, prior_locations=inputs["prior"], progress=False,
        runtime=Runtime(device="cpu", precision="bf16"), **RUN,
    )  # fmt: skip
    fp32 = json.loads((one_process / "metrics.jsonl").read_text().splitlines()[-1])
    assert result.final_metrics["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.05)
    a, b = weights(tmp_path), weights(one_process)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 was really used
    assert all(a[k].dtype == torch.float32 for k in a)  # weights stay float32


# ---- 2 gloo processes ----------------------------------------------------------------------------
def test_two_processes_train_the_model_of_one(inputs, one_process, tmp_path):
    done = torchrun(*cli_options(inputs["store"], inputs["prior"]), "-o", str(tmp_path))
    assert done.stdout.count("done: 12 steps") == 1  # rank 0 alone reports
    assert_same_model(tmp_path, one_process)
    log = (tmp_path / "train_log.txt").read_text()
    assert log.count(" validation {") == 2  # validation and logs on rank 0 only


def test_resume_with_another_number_of_processes(inputs, one_process, tmp_path):
    """6 steps in one process, killed (max_steps reached), then 6 more in two processes: the
    model of one uninterrupted process. The lr of a step does not depend on max_steps here."""
    train_here(inputs, tmp_path, max_steps=6)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1
    torchrun(*cli_options(inputs["store"], inputs["prior"]), "-o", str(tmp_path))
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["world_size"] == 2
    assert "resumed from" in (tmp_path / "train_log.txt").read_text()
    assert_same_model(tmp_path, one_process)


def test_two_processes_embed_the_store_of_one(tmp_path):
    """Each rank embeds its own whole batches and writes its own parts; the store reads back
    row for row (and bit for bit) as one process writes it; a second run skips what is done."""
    from PIL import Image

    photos, first = tmp_path / "photos", tmp_path / "first"
    for folder, count in ((photos, 13), (first, 5)):  # same ids (names in the folder)
        folder.mkdir()
        for i in range(count):
            colour = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
            Image.new("RGB", (40, 30), colour).save(folder / f"p{i:02d}.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    args = ["--encoder", "efficientnet-lite0", "--batch-size", "3", "--no-progress"]
    # a first 2-process run over 5 photos, then all of them: the second run resumes
    torchrun("embed", str(first), "-o", str(tmp_path / "two.parquet"), *args)
    done = torchrun("embed", str(photos), "-o", str(tmp_path / "two.parquet"), *args)
    assert "embedded 8 new, 5 already done, 1 failed" in done.stdout
    parts = sorted(p.name for p in (tmp_path / "two.parquet").glob("part-*"))
    assert len(parts) == 4 and parts[0].startswith("part-00000-000-")
    errors = (tmp_path / "two.parquet" / "_errors.csv").read_text().splitlines()
    assert len(errors) == 2 and "broken.jpg" in errors[1]

    from globeflow.data.encoders import get_encoder
    from globeflow.jobs.embed import embed_images

    encoder = get_encoder("efficientnet-lite0")
    for source in (first, photos):  # one process, the same two runs
        embed_images([source], encoder, tmp_path / "one.parquet", batch_size=3, progress=False)
    one, two = read_embeddings(tmp_path / "one.parquet"), read_embeddings(tmp_path / "two.parquet")
    assert two.ids == one.ids and two.paths == one.paths
    assert torch.equal(two.embeddings, one.embeddings)
