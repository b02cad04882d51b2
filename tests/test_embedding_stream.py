"""Streaming an embedding store: row groups per rank and epoch, bounded shuffle, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _interrupt import interrupted_at_step
from safetensors.torch import load_file

from globeflow.data.embedding_store import EmbeddingWriter, read_embeddings, store_fingerprint
from globeflow.data.embedding_stream import (
    RowStream,
    ShuffleBuffer,
    epoch_share,
    hold_out,
    list_row_groups,
    read_located_rows,
    shuffled_rows,
)
from globeflow.jobs import training


def write_store(path: Path, n: int = 300, dim: int = 6, dtype: str = "float32", nan_every=0):
    """Rows whose embedding's first value is the row number (so rows can be told apart)."""
    emb = torch.randn(n, dim, generator=torch.Generator().manual_seed(1))
    emb[:, 0] = torch.arange(n, dtype=torch.float32)
    latlon = torch.stack([torch.linspace(-60, 60, n), torch.linspace(-170, 170, n)], 1).double()
    if nan_every:
        latlon[::nan_every] = float("nan")
    with EmbeddingWriter(path, "toy", dim, chunk_size=64, row_group_size=16, dtype=dtype) as w:
        w.add(
            [f"r{i}" for i in range(n)], emb, latlon=latlon, authors=[f"a{i % 9}" for i in range(n)]
        )
    return path


def row_numbers(block) -> list[int]:
    return [int(x) for x in block[0][:, 0].tolist()]


def test_float16_store_round_trip(tmp_path):
    store = write_store(tmp_path / "h.parquet", n=40, dtype="float16")
    table = read_embeddings(store)
    want = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    want[:, 0] = torch.arange(40, dtype=torch.float32)
    assert table.embeddings.dtype == torch.float32
    assert torch.equal(table.embeddings, want.half().float())
    groups, encoder, dim = list_row_groups(store)
    assert (encoder, dim) == ("toy", 6) and sum(g.rows for g in groups) == 40


def test_epoch_shares_are_disjoint_cover_the_store_and_change_every_epoch(tmp_path):
    groups, _, _ = list_row_groups(write_store(tmp_path / "s.parquet"))
    assert len(groups) == 4 * 4 + 3  # 4 parts of 64 rows (4 groups of 16), one of 44 (3)
    for epoch in range(3):
        shares = [epoch_share(groups, epoch, seed=0, rank=r, world_size=3) for r in range(3)]
        flat = [g for s in shares for g in s]
        assert len(flat) == len(set(flat)) == len(groups)
    assert epoch_share(groups, 0, 0) != epoch_share(groups, 1, 0)
    assert epoch_share(groups, 4, 7, 1, 2) == epoch_share(groups, 4, 7, 1, 2)


def test_shuffle_buffer_is_bounded_and_emits_every_row_once():
    buffer = ShuffleBuffer(50, torch.Generator().manual_seed(0))
    out = []
    for start in range(0, 400, 30):
        rows = torch.arange(start, min(400, start + 30))[:, None]
        for block in buffer.push(rows):
            out += block[0][:, 0].tolist()
        assert buffer.size <= 50
    for block in buffer.drain(block_rows=7):
        assert len(block[0]) <= 7
        out += block[0][:, 0].tolist()
    assert buffer.size == 0 and list(buffer.drain()) == []
    assert sorted(out) == list(range(400))
    # shuffled: far from the input order
    assert sum(a < b for a, b in zip(out, out[1:])) < 0.75 * len(out)
    assert all(v < i + 50 + 30 for i, v in enumerate(out))  # never before it was pushed


def test_every_epoch_streams_each_row_of_the_rank_share_once(tmp_path):
    store = write_store(tmp_path / "s.parquet", nan_every=7)
    groups, _, dim = list_row_groups(store)

    def share(epoch: int, rank: int) -> list[int]:
        mine = epoch_share(groups, epoch, seed=3, rank=rank, world_size=2)
        return sorted(i for g in mine for i in row_numbers(read_located_rows(g, dim)))

    assert set(share(0, 0)).isdisjoint(share(0, 1))
    assert sorted(share(0, 0) + share(0, 1)) == [i for i in range(300) if i % 7]  # located
    for rank in range(2):
        stream = shuffled_rows(groups, dim, seed=3, buffer_rows=40, rank=rank, world_size=2)
        sizes = [len(share(0, rank)), len(share(1, rank))]
        rows: list[int] = []
        while len(rows) < sum(sizes):
            rows += row_numbers(next(stream))
        first, second = rows[: sizes[0]], rows[sizes[0] : sum(sizes)]
        assert sorted(first) == share(0, rank) and sorted(second) == share(1, rank)
        assert first != sorted(first)  # shuffled within the epoch


def test_non_finite_embeddings_are_named(tmp_path):
    store = tmp_path / "bad.parquet"
    emb = torch.zeros(20, 4)
    emb[5, 2] = float("nan")
    with EmbeddingWriter(store, "toy", 4, row_group_size=10) as w:
        w.add([str(i) for i in range(20)], emb, latlon=torch.zeros(20, 2))
    groups, _, dim = list_row_groups(store)
    with pytest.raises(ValueError, match=r"part-00000-000-00000-\w{8}.parquet: 1 row\(s\) of row"):
        for _ in zip(range(10), shuffled_rows(groups, dim, 0, 8)):
            pass


def test_row_stream_skip_then_take_equals_take():
    def blocks():
        for start in range(0, 1000, 37):
            yield (torch.arange(start, start + 37),)

    whole = RowStream(blocks()).take(300)[0]
    skipping = RowStream(blocks())
    skipping.skip(123)
    assert torch.equal(skipping.take(177)[0], whole[123:])


def test_hold_out_takes_whole_groups_up_to_the_row_budget(tmp_path):
    groups, _, _ = list_row_groups(write_store(tmp_path / "s.parquet"))
    kept, held = hold_out(groups, 40, seed=0)
    assert set(kept).isdisjoint(held) and len(kept) + len(held) == len(groups)
    assert 40 <= sum(g.rows for g in held) < 40 + 16
    assert hold_out(groups, 40, seed=0) == (kept, held)


def test_store_fingerprint_follows_the_content(tmp_path):
    a = write_store(tmp_path / "a.parquet")
    b = write_store(tmp_path / "b.parquet")
    assert store_fingerprint(a) == store_fingerprint(b)  # same rows, same names
    c = write_store(tmp_path / "c.parquet", nan_every=5)
    assert store_fingerprint(c) != store_fingerprint(a)


# ---- streamed training ----------------------------------------------------------------------
RUN = dict(
    dim=16,
    depth=1,
    batch_size=40,
    max_steps=16,
    warmup_steps=2,
    val_every=4,
    checkpoint_every=4,
    val_loss_rows=48,
    val_geo_rows=16,
)


def streamed(store: Path, out: Path, **changes):
    return training.train_from_embeddings(
        store, "rfm", out, val_split=0.2, stream=True, shuffle_buffer_rows=50,
        progress=False, **{**RUN, **changes},
    )  # fmt: skip


def test_streamed_training_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    store = write_store(tmp_path / "s.parquet", nan_every=11)
    reference = streamed(store, tmp_path / "ref")
    meta = json.loads((reference.final_dir / "config.json").read_text())["metadata"]
    assert "held-out row groups" in meta["validation_split"]
    held = meta["data"]["val"]["rows"]
    assert meta["data"]["train"]["rows"] + held == 300 - len(range(0, 300, 11))
    assert 48 - 5 <= held < 48 + 16  # whole groups up to 48 stored rows, 1 in 11 unlocated

    with interrupted_at_step(monkeypatch, 11):
        streamed(store, tmp_path / "run")
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["step"] == 8
    assert streamed(store, tmp_path / "run").steps == 16  # replays 8 steps of the stream
    got = load_file(str(tmp_path / "run/final/model.safetensors"))
    want = load_file(str(reference.final_dir / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_streamed_training_refuses_a_changed_store(tmp_path):
    store = write_store(tmp_path / "s.parquet")
    streamed(store, tmp_path / "run", max_steps=4)
    with EmbeddingWriter(store, "toy", 6) as w:  # the store grows
        w.add(["extra"], np.zeros((1, 6), np.float32), latlon=[(1.0, 2.0)])
    with pytest.raises(ValueError, match="different data"):
        streamed(store, tmp_path / "run", max_steps=8)


def test_rows_with_unusable_coordinates_are_left_out_and_said(tmp_path, capsys):
    """A store written before coordinates were checked may hold lat 200 / lon 400: streamed
    training reads past them like rows without coordinates, and says how many and why."""
    n, dim = 64, 6
    emb = torch.randn(n, dim, generator=torch.Generator().manual_seed(1))
    emb[:, 0] = torch.arange(n, dtype=torch.float32)
    latlon = torch.stack([torch.linspace(-60, 60, n), torch.linspace(-170, 170, n)], 1).double()
    latlon[3, 0], latlon[9, 1], latlon[20] = 200.0, 400.0, float("nan")
    store = tmp_path / "s.parquet"
    with EmbeddingWriter(store, "toy", dim, chunk_size=64, row_group_size=16) as w:
        w.add([f"r{i}" for i in range(n)], emb, latlon=latlon)
    groups, _, _ = list_row_groups(store)
    assert 3 not in row_numbers(read_located_rows(groups[0], dim))
    clean = write_store(tmp_path / "val.parquet", n=40)  # every training group is counted
    training.train_from_embeddings(
        store, "rfm", tmp_path / "run", val_split=str(clean), stream=True, progress=False,
        shuffle_buffer_rows=50, **{**RUN, "max_steps": 2, "val_every": 2},
    )  # fmt: skip
    said = capsys.readouterr().err
    assert (
        f"{store}: rows left out: 1 latitude outside [-90, 90], 1 longitude outside "
        "[-180, 180], 1 no coordinates"
    ) in said


def test_a_store_of_one_row_group_holds_out_rows_inside_it(tmp_path):
    store = tmp_path / "one.parquet"
    emb = torch.randn(150, 6, generator=torch.Generator().manual_seed(1))
    emb[:, 0] = torch.arange(150, dtype=torch.float32)
    latlon = torch.stack([torch.linspace(-60, 60, 150), torch.linspace(-170, 170, 150)], 1)
    with EmbeddingWriter(store, "toy", 6, chunk_size=200, row_group_size=200) as w:
        w.add([f"r{i}" for i in range(150)], emb, latlon=latlon.double())
    groups, _, _ = list_row_groups(store)
    kept, held = hold_out(groups, 30, seed=0)
    assert len(groups) == 1 and hold_out(groups, 30, seed=0) == (kept, held)
    held_rows = set(row_numbers(read_located_rows(held[0], 6)))
    kept_rows = set(row_numbers(read_located_rows(kept[0], 6)))
    assert len(held_rows) == 30 and held_rows.isdisjoint(kept_rows)
    assert held_rows | kept_rows == set(range(150))

    result = streamed(store, tmp_path / "run", max_steps=4, val_every=2)
    meta = json.loads((result.final_dir / "config.json").read_text())["metadata"]
    assert "held out inside the store's only row group" in meta["validation_split"]
    assert (meta["data"]["train"]["rows"], meta["data"]["val"]["rows"]) == (120, 30)
    assert result.best_dir is not None
    assert f"final model {result.final_dir} (val_loss=" in str(result)
