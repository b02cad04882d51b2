"""Tests for globeflow.data.embedding_store: round trip, parts, metadata, resume, streaming."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from globeflow.data.embedding_store import (
    EmbeddingWriter,
    iter_embedding_batches,
    read_embeddings,
    store_parts,
)


def _rows(n: int, dim: int, start: int = 0):
    g = torch.Generator().manual_seed(start)
    ids = [f"img/{i:04d}.jpg" for i in range(start, start + n)]
    emb = torch.randn(n, dim, generator=g)
    latlon = [(float(i % 90), float(-i % 180)) if i % 3 else None for i in range(start, start + n)]
    authors = [f"a{i % 4}" if i % 5 else None for i in range(start, start + n)]
    return ids, emb, latlon, authors


def test_round_trip_parts_and_schema(tmp_path: Path) -> None:
    store = tmp_path / "emb.parquet"
    ids, emb, latlon, authors = _rows(25, 8)
    with EmbeddingWriter(store, "toy", 8, chunk_size=10) as w:
        w.add(ids, emb, paths=[f"/abs/{i}" for i in ids], latlon=latlon, authors=authors)
    parts = [p.name for p in store_parts(store)]
    token = parts[0][-16:-8]  # the writer's own: part-SESSION-RANK-CHUNK-TOKEN.parquet
    assert parts == [f"part-00000-000-0000{k}-{token}.parquet" for k in range(3)]
    assert sorted(p.name for p in store.iterdir()) == parts
    schema = pq.read_schema(store / parts[0])
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[8]"
    assert schema.metadata[b"globeflow.encoder"] == b"toy"
    t = read_embeddings(store)
    assert t.ids == ids and t.encoder_name == "toy" and t.dim == 8 and len(t) == 25
    assert t.paths[3] == "/abs/img/0003.jpg"
    assert t.embeddings.dtype == torch.float32 and torch.equal(t.embeddings, emb)
    assert t.latlon.dtype == torch.float64 and t.latlon.shape == (25, 2)
    assert math.isnan(t.latlon[0, 0]) and math.isnan(t.latlon[3, 1])
    assert t.latlon[1].tolist() == [1.0, 179.0]
    assert t.authors[0] == "" and t.authors[1] == "a1"


def test_resume_appends_and_reports_done(tmp_path: Path) -> None:
    store = tmp_path / "e.parquet"
    ids, emb, _, _ = _rows(6, 4)
    w = EmbeddingWriter(store, "toy", 4, chunk_size=100)
    w.add(ids[:3], emb[:3])
    w.flush()
    # simulate a crash mid-write: a stale temp file must be ignored and cleaned up
    (store / ".tmp-part-00001.parquet").write_bytes(b"half a file")
    w2 = EmbeddingWriter(store, "toy", 4)
    done = w2.done_ids()
    assert len(done) == 3 and done.contains(ids).tolist() == [True] * 3 + [False] * 3
    assert ids[0] in done and "other" not in done and 7 not in done
    assert not list(store.glob(".tmp-*"))
    todo = [i for i, x in enumerate(ids) if x not in done]
    w2.add([ids[i] for i in todo], emb[todo])
    w2.close()
    t = read_embeddings(store)
    assert sorted(t.ids) == sorted(ids) and len(set(t.ids)) == 6
    assert torch.equal(t.embeddings[t.ids.index(ids[4])], emb[4])


def test_mismatched_encoder_refused(tmp_path: Path) -> None:
    store = tmp_path / "e.parquet"
    with EmbeddingWriter(store, "toy", 4) as w:
        w.add(["a"], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="toy"):
        EmbeddingWriter(store, "other", 4)
    with pytest.raises(ValueError, match="dim"):
        EmbeddingWriter(store, "toy", 5)
    w = EmbeddingWriter(store, "toy", 4)
    with pytest.raises(ValueError, match="dim"):
        w.add(["b"], torch.zeros(1, 3))


def test_streaming_batches_cover_everything(tmp_path: Path) -> None:
    store = tmp_path / "e.parquet"
    ids, emb, latlon, _ = _rows(50, 3)
    with EmbeddingWriter(store, "toy", 3, chunk_size=20, row_group_size=7) as w:
        w.add(ids, emb, latlon=latlon)
    batches = list(iter_embedding_batches(store, batch_size=7))
    assert all(len(b) <= 7 for b in batches)
    assert [i for b in batches for i in b.ids] == ids
    assert torch.equal(torch.cat([b.embeddings for b in batches]), emb)
    assert batches[0].encoder_name == "toy"


def test_missing_store_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_embeddings(tmp_path / "nothing.parquet")


def test_a_store_holds_one_embedding_dtype(tmp_path: Path) -> None:
    store = tmp_path / "h.parquet"
    with EmbeddingWriter(store, "toy", 4, dtype="float16") as w:
        w.add(["a"], torch.full((1, 4), 1 / 3))
    with EmbeddingWriter(store, "toy", 4) as w:  # resumes in the store's own dtype
        assert w.dtype == "float16"
        w.add(["b"], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="holds float16 embeddings"):
        EmbeddingWriter(store, "toy", 4, dtype="float32")
    t = read_embeddings(store)
    assert t.ids == ["a", "b"] and t.embeddings[0, 0] == torch.tensor(1 / 3).half().float()


def test_a_csv_given_as_a_store_says_what_makes_one(tmp_path):
    from globeflow.data.embedding_store import read_embeddings as read_store

    table = tmp_path / "photos.csv"
    table.write_text("image,lat,lon\na.jpg,1,2\n")
    with pytest.raises(FileNotFoundError) as info:
        read_store(table)
    assert str(info.value) == (
        f"{table}: a CSV file, not an embedding store (a folder of part-*.parquet); "
        f"`globeflow embed {table} -o NAME.parquet` makes one from photos it lists"
    )


# ---- two writers, one store; repeated ids; durable renames; the save deadline (issue 23) ------


def _two_writers_sharing(store: Path) -> list[str]:
    """Two writers on one store at once (no lock, e.g. a file system without flock): both start
    before either writes, so they take the same session; ids 4-7 are written by both."""
    ids, emb, latlon, _ = _rows(12, 4)
    a = EmbeddingWriter(store, "toy", 4, chunk_size=3)
    b = EmbeddingWriter(store, "toy", 4, chunk_size=3)
    a.add(ids[:8], emb[:8], latlon=latlon[:8])
    b.add(ids[4:], emb[4:], latlon=latlon[4:])
    a.close()
    b.close()
    return ids


def test_two_writers_sharing_a_store_keep_every_part(tmp_path: Path) -> None:
    store = tmp_path / "shared.parquet"
    _two_writers_sharing(store)
    parts = store_parts(store)
    # Each writer's parts are its own (3 + 3 parts, none replaced by the other's).
    assert len(parts) == 6 and len({p.name[-16:-8] for p in parts}) == 2
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == 16


def test_a_store_with_repeated_ids_is_read_once_per_id_and_said(tmp_path: Path) -> None:
    from globeflow.data.embedding_store import RepeatedIdsWarning
    from globeflow.data.embedding_stream import list_row_groups, read_group_table

    store = tmp_path / "shared.parquet"
    ids = _two_writers_sharing(store)
    with pytest.warns(RepeatedIdsWarning, match="4 rows repeat an id"):
        table = read_embeddings(store)
    assert sorted(table.ids) == ids and len(table) == 12
    streamed = [i for b in iter_embedding_batches(store, batch_size=2) for i in b.ids]
    assert streamed == table.ids
    groups, _, _ = list_row_groups(store)
    grouped = [i for g in groups for i in read_group_table(g, ["id"]).column("id").to_pylist()]
    assert grouped == table.ids and sum(g.rows for g in groups) == 12


def test_a_committed_rename_is_made_durable(tmp_path: Path, monkeypatch) -> None:
    import os
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with EmbeddingWriter(tmp_path / "d.parquet", "toy", 4) as w:
        w.add(["a"], torch.zeros(1, 4))
    assert events == ["file", "rename", "dir"]


def test_rows_are_committed_within_the_interval_without_another_add(tmp_path: Path) -> None:
    """The deadline runs from a background thread: rows wait at most max_unsaved_seconds even
    when no further rows come (the next batch is still being computed)."""
    import time

    import pyarrow as pa

    from globeflow.answers.result_store import RowWriter

    store = tmp_path / "e.parquet"
    w = EmbeddingWriter(store, "toy", 4, chunk_size=1000, max_unsaved_seconds=0.3)
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)])
    rows = RowWriter(tmp_path / "rows", {"a": 1}, schema, max_unsaved_seconds=0.3)
    w.add(["a", "b"], torch.zeros(2, 4))
    rows.add_rows([{"id": "a"}])
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not (store_parts(store) and store_parts(rows.path)):
        time.sleep(0.05)
    assert len(read_embeddings(store)) == 2 and len(store_parts(tmp_path / "rows")) == 1
    w.close()
    rows.close()
    assert len(store_parts(store)) == 1  # nothing left to commit at close
