"""The train job's rows from an embedding store: located rows, the validation split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from globeflow.data.embedding_store import EmbeddingTable
from globeflow.jobs.train_inputs import ValidationSplit, located_rows


def test_located_rows_share_the_table_when_none_is_dropped() -> None:
    emb = torch.randn(4, 3)
    latlon = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    table = EmbeddingTable(["a", "b", "c", "d"], [""] * 4, latlon, ["x"] * 4, emb, "toy")
    said: list[str] = []
    kept, kept_latlon, _ = located_rows(table, "store", said.append)
    assert kept.data_ptr() == emb.data_ptr() and said == []  # no copy of the embeddings
    latlon[1] = float("nan")
    kept, kept_latlon, authors = located_rows(table, "store", said.append)
    assert torch.equal(kept, emb[[0, 2, 3]]) and len(authors) == 3
    assert said == ["store: dropped 1 of 4 rows (1 no coordinates)"]
    latlon[2, 0], latlon[3, 1] = 200.0, 400.0  # stored by an older embed: never trained on
    said.clear()
    kept, kept_latlon, _ = located_rows(table, "store", said.append)
    assert torch.equal(kept, emb[[0]]) and torch.equal(kept_latlon, latlon[[0]])
    assert said == [
        "store: dropped 3 of 4 rows (1 no coordinates, 1 latitude outside [-90, 90], "
        "1 longitude outside [-180, 180])"
    ]


def test_validation_split_from_the_options(tmp_path: Path) -> None:
    assert ValidationSplit.parse("author", 0.15) == ValidationSplit("author", 0.15, Path("author"))
    assert ValidationSplit.parse(0.2, 0.15) == ValidationSplit("fraction", 0.2, Path("0.2"))
    store = tmp_path / "val.parquet"
    store.mkdir()
    assert ValidationSplit.parse(str(store), 0.15) == ValidationSplit("store", None, store)
    with pytest.raises(ValueError, match="not 'author', a fraction"):
        ValidationSplit.parse(str(tmp_path / "missing"), 0.15)
    with pytest.raises(ValueError, match="--val-split must be a fraction"):
        ValidationSplit.parse("1.5", 0.15)
    with pytest.raises(ValueError, match="--val-fraction must be in"):
        ValidationSplit.parse("author", 1.0)
