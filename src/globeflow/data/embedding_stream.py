"""Stream an embedding store larger than memory in shuffled order.

The unit of reading is a parquet row group. Every epoch the row groups are permuted (a pure
function of the seed and the epoch) and dealt round-robin to the processes of a job, so each
process reads a disjoint share; each process passes its rows through a bounded shuffle buffer
(:class:`ShuffleBuffer`) whose randomness is a pure function of (seed, epoch, rank). Memory is
bounded by the buffer plus one row group, whatever the size of the store; the order of the rows a
process sees is a pure function of (seed, rank, number of processes), which is what lets a
killed run resume by replaying its stream up to where it stopped.

Rows without coordinates are skipped; a non-finite embedding is an error naming its part.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from globeflow.data.coordinates import valid_latlon_mask
from globeflow.data.embedding_store import store_meta, store_parts, store_repeats

__all__ = [
    "RowGroup",
    "RowStream",
    "ShuffleBuffer",
    "derived_seed",
    "epoch_share",
    "hold_out",
    "list_row_groups",
    "read_group_table",
    "read_located_rows",
    "shuffled_rows",
]


@dataclass(frozen=True)
class RowGroup:
    """One parquet row group of a store (or some of its rows): the unit of streaming reads."""

    part: Path
    index: int
    rows: int
    only: tuple[int, ...] | None = None
    """The rows of the group that belong here (positions in the group), None: all of them."""


def read_group_table(group: RowGroup, columns: list[str]):
    """The pyarrow table of ``columns`` of the group's rows."""
    table = pq.ParquetFile(group.part).read_row_group(group.index, columns=columns)
    return table if group.only is None else table.take(pa.array(group.only, pa.int64()))


def list_row_groups(store: str | os.PathLike[str]) -> tuple[list[RowGroup], str, int]:
    """(row groups in store order, encoder name, dim), from the parquet footers (and one pass
    over the ids: the rows that repeat an earlier row's id are left out of their groups)."""
    parts = store_parts(store)
    encoder, dim = store_meta(parts, Path(store))
    repeats = store_repeats(store, parts)
    groups = []
    for k, part in enumerate(parts):
        meta = pq.ParquetFile(part).metadata
        first = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            left_out = repeats.get(k, np.empty(0, np.int64))
            left_out = left_out[(left_out >= first) & (left_out < first + n)] - first
            if len(left_out):
                rows = tuple(sorted(set(range(n)) - set(left_out.tolist())))
                if rows:  # a group of repeats only is left out whole
                    groups.append(RowGroup(part, i, len(rows), rows))
            else:
                groups.append(RowGroup(part, i, n))
            first += n
    return groups, encoder, dim


def derived_seed(*keys: object) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (e.g. (seed, "epoch", 3)), so that
    random draws depend on where a run is, not on how it got there (exact resume)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*keys))


def hold_out(
    groups: list[RowGroup], max_rows: int, seed: int
) -> tuple[list[RowGroup], list[RowGroup]]:
    """(kept, held out): whole row groups chosen at random (``seed``) until they hold at least
    ``max_rows`` rows (or all but one group). A split that needs no pass over the data.

    A store of one row group has no group to spare: then ``max_rows`` rows chosen at random
    inside it are held out (every group keeps at least one row for training)."""
    if len(groups) == 1 and max_rows > 0:
        return _hold_out_rows(groups, max_rows, seed)
    order = torch.randperm(len(groups), generator=_generator(seed, "hold-out")).tolist()
    held, rows = set(), 0
    for i in order[: max(0, len(groups) - 1)]:
        if rows >= max_rows:
            break
        held.add(i)
        rows += groups[i].rows
    kept = [g for i, g in enumerate(groups) if i not in held]
    return kept, [g for i, g in enumerate(groups) if i in held]


def _hold_out_rows(
    groups: list[RowGroup], max_rows: int, seed: int
) -> tuple[list[RowGroup], list[RowGroup]]:
    """(kept, held out) views of the groups: rows drawn inside each group (``seed``, the part's
    name and the group's index), in proportion to the groups' sizes."""
    total = sum(g.rows for g in groups)
    kept, held = [], []
    for g in groups:
        k = min(g.rows - 1, math.ceil(max_rows * g.rows / max(total, 1)))
        order = torch.randperm(g.rows, generator=_generator(seed, "hold-out", g.part.name, g.index))
        rows = g.only if g.only is not None else range(g.rows)  # the group's rows, in order
        rest = tuple(sorted(rows[i] for i in order[k:].tolist()))
        kept.append(RowGroup(g.part, g.index, len(rest), rest))
        if k > 0:
            taken = tuple(sorted(rows[i] for i in order[:k].tolist()))
            held.append(RowGroup(g.part, g.index, k, taken))
    return kept, held


def epoch_share(
    groups: list[RowGroup], epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[RowGroup]:
    """This rank's row groups for ``epoch``: the epoch's permutation dealt round-robin."""
    order = torch.randperm(len(groups), generator=_generator(seed, "epoch", epoch)).tolist()
    return [groups[i] for i in order[rank::world_size]]


def read_located_rows(group: RowGroup, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of one row group that have coordinates: (embeddings (n, dim) in the store's
    dtype, lat/lon (n, 2) float64 degrees)."""
    table = read_group_table(group, ["lat", "lon", "embedding"])
    values = table.column("embedding").combine_chunks().values
    emb = values.to_numpy(zero_copy_only=False).reshape(len(table), dim)
    lat = table.column("lat").to_numpy(zero_copy_only=False).astype(np.float64)
    lon = table.column("lon").to_numpy(zero_copy_only=False).astype(np.float64)
    latlon = np.stack([lat, lon], axis=1)
    keep = valid_latlon_mask(latlon)
    if not keep.all():
        emb, latlon = emb[keep], latlon[keep]
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb).all(axis=1)).sum())
        raise ValueError(
            f"{group.part}: {bad} row(s) of row group {group.index} have non-finite "
            "embeddings; re-embed those photos or drop them"
        )
    if not emb.flags.writeable:  # a view of arrow's buffer; torch wants memory it may own
        emb = emb.copy()
    return torch.from_numpy(np.ascontiguousarray(emb)), torch.from_numpy(latlon)


class ShuffleBuffer:
    """A bounded shuffle: holds up to ``capacity`` rows; each incoming row takes the slot of a
    uniformly chosen resident row, which leaves (a vectorised reservoir shuffle, one random
    permutation per incoming block). :meth:`drain` empties the buffer in random order.
    Memory: ``capacity`` rows of each column, allocated at the first :meth:`push`."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"shuffle buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.size = 0
        self._cols: list[torch.Tensor] | None = None

    def push(self, *cols: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        """Add rows (each column (n, ...)); yields the rows they displace."""
        if self._cols is None:
            self._cols = [torch.empty((self.capacity, *c.shape[1:]), dtype=c.dtype) for c in cols]
        n, start = len(cols[0]), 0
        take = min(self.capacity - self.size, n)
        for buf, c in zip(self._cols, cols):
            buf[self.size : self.size + take] = c[:take]
        self.size += take
        start = take
        while start < n:
            stop = min(n, start + self.capacity)
            slots = torch.randperm(self.capacity, generator=self.generator)[: stop - start]
            out = tuple(buf[slots] for buf in self._cols)
            for buf, c in zip(self._cols, cols):
                buf[slots] = c[start:stop]
            start = stop
            yield out

    def drain(self, block_rows: int = 4096) -> Iterator[tuple[torch.Tensor, ...]]:
        """Every resident row, in random order, in blocks of at most ``block_rows`` rows (so
        that no second copy of the whole buffer is ever made)."""
        if not self.size or self._cols is None:
            return
        order = torch.randperm(self.size, generator=self.generator)
        for start in range(0, self.size, block_rows):
            rows = order[start : start + block_rows]
            yield tuple(buf[rows] for buf in self._cols)
        self.size = 0


def shuffled_rows(
    groups: list[RowGroup],
    dim: int,
    seed: int,
    buffer_rows: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless blocks of (embeddings, lat/lon) rows: epoch after epoch, this rank's share of
    the row groups through a shuffle buffer of ``buffer_rows`` rows, emptied at each epoch's
    end (so an epoch holds each of this rank's rows exactly once)."""
    if len(groups) < world_size:
        raise ValueError(
            f"the store has {len(groups)} row group(s), fewer than the {world_size} processes; "
            "write it with smaller row groups or use fewer processes"
        )
    epoch = 0
    while True:
        buffer = ShuffleBuffer(buffer_rows, _generator(seed, "buffer", epoch, rank))
        seen = 0
        for group in epoch_share(groups, epoch, seed, rank, world_size):
            emb, latlon = read_located_rows(group, dim)
            seen += len(emb)
            if len(emb):
                yield from buffer.push(emb, latlon)
        yield from buffer.drain()  # type: ignore[misc]
        if not seen:
            raise ValueError(f"rank {rank}: no rows with coordinates in its share of the store")
        epoch += 1


class RowStream:
    """Takes exact numbers of rows from an iterator of row blocks."""

    def __init__(self, blocks: Iterator[tuple[torch.Tensor, ...]]) -> None:
        self._blocks = blocks
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._held = 0

    def _fill(self, n: int) -> None:
        while self._held < n:
            block = next(self._blocks)
            self._pending.append(block)
            self._held += len(block[0])

    def take(self, n: int) -> tuple[torch.Tensor, ...]:
        """The next ``n`` rows, as one tensor per column."""
        self._fill(n)
        cols = [torch.cat(c) if len(c) > 1 else c[0] for c in zip(*self._pending)]
        out = tuple(c[:n] for c in cols)
        rest = tuple(c[n:] for c in cols)
        self._held -= n
        self._pending = [rest] if self._held else []
        return out

    def skip(self, n: int) -> None:
        """Drop the next ``n`` rows (replay after a resume) without concatenating them."""
        while n > 0:
            self._fill(1)
            first = self._pending[0]
            k = len(first[0])
            if k <= n:
                self._pending.pop(0)
                self._held -= k
                n -= k
            else:
                self._pending[0] = tuple(c[n:] for c in first)
                self._held -= n
                n = 0
