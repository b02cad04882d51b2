"""The resume index: which ids a folder of parts holds, in 16 bytes per id (issue 23, item 3)."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from globeflow.data.id_index import IdIndex


def test_membership_matches_a_set_on_random_ids(tmp_path):
    rng = random.Random(0)
    stored = [f"dir{rng.randrange(50)}/img{rng.randrange(10**9)}.jpg" for _ in range(5000)]
    stored += ["", "é/ü.jpg", "caf\\xe9.jpg"]  # empty, non-ASCII, an escaped non-UTF-8 byte
    parts = []
    for k in range(0, len(stored), 1000):
        parts.append(tmp_path / f"part-{k:05d}.parquet")
        pq.write_table(pa.table({"id": stored[k : k + 1000]}), parts[-1])
    index = IdIndex.of_parts(parts)
    queries = stored[::7] + [f"other{i}" for i in range(3000)] + ["dir1/img"]
    expected = [q in set(stored) for q in queries]
    assert index.contains(queries).tolist() == expected
    assert len(index) == len(set(stored)) and len(index.repeated) == 0
    assert stored[3] in index and "other0" not in index and 3 not in index


def test_repeated_ids_are_the_later_rows_in_reading_order(tmp_path):
    parts = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(pa.table({"id": ["x", "y", "x", "z"]}), parts[0])
    pq.write_table(pa.table({"id": ["y", "w", "z", "x"]}), parts[1])
    index = IdIndex.of_parts(parts)
    assert index.repeated.tolist() == [2, 4, 6, 7]  # the first x, y and z are kept
    assert index.repeated_in(0).tolist() == [2] and index.repeated_in(1).tolist() == [0, 2, 3]
    assert len(index) == 4


def test_ids_whose_first_hashes_collide_are_told_apart(monkeypatch):
    from globeflow.data import id_index

    hashes = {"a": (7, 1), "b": (7, 2), "c": (7, 3), "d": (7, 4), "e": (8, 2)}

    def crafted(ids):  # three stored ids share their first hash
        pairs = np.array([hashes[i] for i in ids], dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    monkeypatch.setattr(id_index, "id_hashes", crafted)
    index = IdIndex(*crafted(["c", "a", "b", "a"]))
    assert index.repeated.tolist() == [3] and len(index) == 3
    assert index.contains(["a", "b", "c", "d", "e"]).tolist() == [True, True, True, False, False]
