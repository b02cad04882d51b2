"""Which ids a directory of parquet parts holds, in 16 bytes per id: what resume and the readers'
de-duplication need at archive scale.

A Python set of 10^8 id strings takes ~10 GB. :class:`IdIndex` keeps two 64-bit hashes per id
instead (Python's own string hash, keyed SipHash, of the id and of the id with a NUL appended:
128 bits, so that 10^8 stored ids and 10^8 queries take one id for another with a probability
of about 10^-22), sorted once, and answers membership for a whole batch of ids with a binary
search. Building it streams the parts' id column batch by batch: the ids are never all held as
strings, and building peaks at about 40 bytes per id, while the hashes are sorted.

The hashes are salted per process (``PYTHONHASHSEED``): an index lives in the process that
built it and is never written down.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["IdIndex", "id_hashes"]

READ_ROWS = 65536
"""Rows of the id column read (and hashed) at a time."""


def id_hashes(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The two 64-bit hashes of each id: (n,) int64 and (n,) int64."""
    n = len(ids)
    first = np.fromiter(map(hash, ids), dtype=np.int64, count=n)
    second = np.fromiter((hash(i + "\0") for i in ids), dtype=np.int64, count=n)
    return first, second


class IdIndex:
    """The ids of some rows, for membership queries (``in``, :meth:`contains`).

    ``repeated``: the positions (in reading order, (k,) int64, ascending) of the rows whose id
    an earlier row already had; ``offsets``: where each part's rows start in that order (a part
    of an index built by :meth:`of_parts`)."""

    def __init__(
        self, first: np.ndarray, second: np.ndarray, offsets: Sequence[int] = (0,)
    ) -> None:
        n = first.shape[0]
        order = np.lexsort((second, first))  # stable: a repeated id's earliest row comes first
        self._first, self._second = first[order], second[order]
        same = (self._first[1:] == self._first[:-1]) & (self._second[1:] == self._second[:-1])
        self.repeated = np.sort(order[1:][same])
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.rows = n

    def __len__(self) -> int:
        """The number of distinct ids."""
        return self.rows - len(self.repeated)

    def __contains__(self, photo_id: object) -> bool:
        return isinstance(photo_id, str) and bool(self.contains([photo_id])[0])

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """(n,) bool: whether each of ``ids`` is in the index."""
        first, second = id_hashes(ids)
        left = np.searchsorted(self._first, first, "left")
        right = np.searchsorted(self._first, first, "right")
        found = np.zeros(len(ids), dtype=bool)
        one = right - left == 1  # almost always; several only when the first hashes collide
        found[one] = self._second[left[one]] == second[one]
        for k in np.flatnonzero(right - left > 1):
            found[k] = bool((self._second[left[k] : right[k]] == second[k]).any())
        return found

    def repeated_in(self, part: int) -> np.ndarray:
        """Positions inside the ``part``-th part of its rows that repeat an earlier row's id."""
        lo = self.offsets[part]
        hi = self.offsets[part + 1] if part + 1 < len(self.offsets) else self.rows
        inside = self.repeated[(self.repeated >= lo) & (self.repeated < hi)]
        return inside - lo

    @classmethod
    def of_parts(
        cls,
        parts: Sequence[str | os.PathLike[str]],
        columns: Sequence[str] = ("id",),
        keep: Callable[[pa.RecordBatch], np.ndarray] | None = None,
    ) -> IdIndex:
        """The index of the ``id`` column of parquet ``parts``, in order; ``keep(batch)`` (of
        ``columns``): only the rows it marks (then :meth:`repeated_in` counts kept rows)."""
        total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        first, second = np.empty(total, np.int64), np.empty(total, np.int64)
        offsets, at = [], 0
        for part in parts:
            offsets.append(at)
            for batch in pq.ParquetFile(Path(part)).iter_batches(READ_ROWS, columns=list(columns)):
                ids = batch.column("id").to_pylist()
                if keep is not None:
                    ids = [i for i, k in zip(ids, keep(batch), strict=True) if k]
                first[at : at + len(ids)], second[at : at + len(ids)] = id_hashes(ids)
                at += len(ids)
        return cls(first[:at], second[:at], offsets or (0,))
