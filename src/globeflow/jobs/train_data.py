"""What the ``train`` job learns from: batches (in memory or streamed), splits, fingerprints.

A batch is a pure function of the step (and, when streaming, of the rank and the number of
processes): rows, prior locations and the loss's random draws all come from generators seeded
by (seed, step, ...). That is what makes a resumed run continue exactly where it stopped.

- :class:`InMemoryRows`: every process holds the rows; batch s is the slice [s n, (s + 1) n) of
  an endless stream of per-epoch permutations, assembled identically on every process, and each
  process computes the loss of its own contiguous share of it. The result does not depend on
  the number of processes (up to float rounding).
- :class:`StreamedRows`: each process streams its share of the store's row groups through a
  bounded shuffle buffer (:mod:`globeflow.data.embedding_stream`); memory stays bounded whatever
  the store's size; the order depends on the number of processes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch

from globeflow.core.sphere import latlon_to_unit
from globeflow.data.coordinates import (
    NO_COORDINATES,
    CoordinateError,
    counts_text,
    invalid_latlon_counts,
    parse_latlon,
    valid_latlon_mask,
)
from globeflow.data.datasets import LAT_COLUMNS, LON_COLUMNS, pick_column
from globeflow.data.embedding_store import (
    EmbeddingWriter,
    iter_embedding_batches,
    store_dtype,
    store_fingerprint,
)
from globeflow.data.embedding_stream import (
    RowGroup,
    RowStream,
    derived_seed,
    read_group_table,
    read_located_rows,
    shuffled_rows,
)
from globeflow.jobs.distributed import Placement, rank_slice

__all__ = [
    "Batch",
    "BatchOrder",
    "BatchRecipe",
    "InMemoryRows",
    "StreamedRows",
    "ValidationRows",
    "assemble_batch",
    "exclude_authors",
    "read_prior_locations",
    "run_data_fingerprint",
    "split_rows",
    "tensor_fingerprint",
]


def to_unit(latlon: torch.Tensor) -> torch.Tensor:
    """(N, 2) degrees -> (N, 3) float32 unit vectors (converted in float64)."""
    return latlon_to_unit(torch.as_tensor(latlon, dtype=torch.float64)).to(torch.float32)


@dataclass
class Batch:
    """One process's part of one training step.

    ``x0`` (n, 3) unit vectors and ``emb`` (n, D) float32; ``rows`` the slice of them whose loss
    this process computes (None: all), the random draws being made for all n rows; ``weight``
    this process's share of the global batch times the number of processes (DDP averages the
    processes' gradients, so the weighted local means average to the global mean); ``seed`` of
    the loss's random draws.
    """

    x0: torch.Tensor
    emb: torch.Tensor
    rows: slice | None
    weight: float
    seed: int


@dataclass(frozen=True)
class BatchRecipe:
    """How every global batch is made: ``batch_size`` rows, the last ``prior_rows`` of them
    prior locations drawn from ``prior_x0`` ((M, 3) unit vectors; None: no prior rows) under the
    null condition; ``seed`` of the row order and of every random draw."""

    batch_size: int
    prior_x0: torch.Tensor | None
    prior_rows: int
    seed: int


class BatchOrder:
    """Which training rows make up each batch.

    The rows form an endless stream of per-epoch permutations (epoch e shuffled with a generator
    seeded by (seed, e)); batch s is the slice [s * n, (s + 1) * n) of that stream. The data
    order is therefore a pure function of the step, which is what makes resume exact.
    """

    def __init__(self, num_rows: int, rows_per_batch: int, seed: int):
        if num_rows < 1:
            raise ValueError("no training rows")
        self.num_rows, self.rows_per_batch, self.seed = num_rows, rows_per_batch, seed
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_rows, generator=g))
        return self._cached[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset within the epoch) where batch ``step`` starts."""
        return divmod(step * self.rows_per_batch, self.num_rows)

    def indices(self, step: int) -> torch.Tensor:
        start, stop = step * self.rows_per_batch, (step + 1) * self.rows_per_batch
        pieces = []
        while start < stop:
            epoch, offset = divmod(start, self.num_rows)
            take = min(stop - start, self.num_rows - offset)
            pieces.append(self.permutation(epoch)[offset : offset + take])
            start += take
        return torch.cat(pieces)


def assemble_batch(
    x0: torch.Tensor,
    emb: torch.Tensor,
    rows: torch.Tensor | slice,
    prior_x0: torch.Tensor | None,
    prior_rows: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows ``rows`` plus ``prior_rows`` prior locations drawn with replacement under
    the null (all-zero) embedding: -> (x0 (B, 3), emb (B, D))."""
    bx, be = x0[rows], emb[rows]
    if prior_rows == 0 or prior_x0 is None:
        return bx, be
    pick = torch.randint(len(prior_x0), (prior_rows,), generator=generator)
    null = torch.zeros(prior_rows, emb.shape[1], dtype=emb.dtype)
    return torch.cat([bx, prior_x0[pick]]), torch.cat([be, null])


def _prior_share(batch_size: int, prior_rows: int, share: slice) -> int:
    """Prior rows inside ``share`` of a global batch whose last ``prior_rows`` rows are prior."""
    return max(0, share.stop - max(share.start, batch_size - prior_rows))


def nonfinite_rows(values: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of (N, D) ``values`` holding a NaN or an infinity. One fast pass when
    there are none: a finite total proves every value finite (a total that overflows only sends
    the check down the exact, slower path)."""
    if bool(torch.isfinite(values.sum())):
        return torch.zeros(0, dtype=torch.long)
    return (~torch.isfinite(values).all(dim=1)).nonzero().flatten()


def tensor_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A short hash of the tensors' shapes, dtypes and bytes (None counts as absent)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        a = t.detach().cpu().contiguous()
        h.update(f"{tuple(a.shape)}:{a.dtype};".encode())
        h.update(a.view(torch.uint8).numpy() if a.numel() else b"")
    return h.hexdigest()[:16]


def _stats(latlon: torch.Tensor, dim: int, emb: torch.Tensor | None = None) -> dict:
    return {
        "rows": int(len(latlon)),
        "embedding_dim": int(dim),
        "embedding_mean_norm": (
            float(emb.norm(dim=1).mean()) if emb is not None and len(emb) else None
        ),
        "lat_range": [float(latlon[:, 0].min()), float(latlon[:, 0].max())] if len(latlon) else [],
        "lon_range": [float(latlon[:, 1].min()), float(latlon[:, 1].max())] if len(latlon) else [],
    }


class InMemoryRows:
    """Training rows held in memory (embeddings (N, D), lat/lon (N, 2) degrees)."""

    def __init__(
        self,
        emb: torch.Tensor,
        latlon: torch.Tensor,
        recipe: BatchRecipe,
        fingerprint: str | None = None,
    ) -> None:
        self.emb = torch.as_tensor(emb, dtype=torch.float32)
        self.latlon = torch.as_tensor(latlon, dtype=torch.float64)
        if self.emb.dim() != 2 or self.latlon.shape != (len(self.emb), 2):
            raise ValueError("train_emb must be (N, D) and train_latlon (N, 2)")
        if not torch.isfinite(self.latlon).all():
            raise ValueError("train_latlon holds non-finite coordinates; drop those rows first")
        bad = len(nonfinite_rows(self.emb))
        if bad:
            raise ValueError(f"{bad} training row(s) have non-finite embeddings; drop them first")
        self.x0 = to_unit(self.latlon)
        self.recipe = recipe
        self.order = BatchOrder(len(self.x0), recipe.batch_size - recipe.prior_rows, recipe.seed)
        self._fingerprint = fingerprint

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def stats(self) -> dict:
        return _stats(self.latlon, self.dim, self.emb)

    def fingerprint(self) -> str:
        """The one given (e.g. of the store the rows come from), else a hash of the rows
        (about 2 s per GB)."""
        return self._fingerprint or tensor_fingerprint(self.emb, self.latlon)

    def batches(self, start_step: int, place: Placement) -> Iterator[Batch]:
        """Batches from ``start_step`` on: the global batch, and this process's rows of it."""
        recipe, rows, weight = self.recipe, None, 1.0
        if place.distributed:
            rows = rank_slice(recipe.batch_size, place.rank, place.world_size)
            weight = (rows.stop - rows.start) * place.world_size / recipe.batch_size
        for step in count(start_step):
            g = torch.Generator().manual_seed(derived_seed(recipe.seed, "batch", step))
            x0, emb = assemble_batch(
                self.x0, self.emb, self.order.indices(step), recipe.prior_x0, recipe.prior_rows, g
            )
            yield Batch(x0, emb, rows, weight, derived_seed(recipe.seed, "loss", step))


class StreamedRows:
    """Training rows streamed from an embedding store's row groups (see module doc)."""

    def __init__(
        self,
        groups: list[RowGroup],
        dim: int,
        recipe: BatchRecipe,
        buffer_rows: int,
        store_fingerprint: str,
    ) -> None:
        if not groups:
            raise ValueError("no row groups left to train on")
        self.groups, self._dim = groups, dim
        self.recipe, self.buffer_rows = recipe, buffer_rows
        self._store_fingerprint = store_fingerprint
        self._stats: dict | None = None

    @property
    def dim(self) -> int:
        return self._dim

    def stats(self) -> dict:
        """Row count, coordinate ranges and the rows left out by reason (``dropped``), from one
        pass over the lat/lon columns."""
        if self._stats is None:
            rows, lo, hi = 0, np.full(2, np.inf), np.full(2, -np.inf)
            dropped: dict[str, int] = {}
            for g in self.groups:
                t = read_group_table(g, ["lat", "lon"])
                ll = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in ("lat", "lon")])
                for kind, n in invalid_latlon_counts(ll.T).items():
                    dropped[kind] = dropped.get(kind, 0) + n
                ll = ll[:, valid_latlon_mask(ll.T)]
                rows += ll.shape[1]
                if ll.shape[1]:
                    lo, hi = np.minimum(lo, ll.min(axis=1)), np.maximum(hi, ll.max(axis=1))
            if rows == 0:
                raise ValueError("no rows with coordinates to train on")
            self._stats = {
                "rows": rows,
                "embedding_dim": self.dim,
                "embedding_mean_norm": None,
                "lat_range": [float(lo[0]), float(hi[0])],
                "lon_range": [float(lo[1]), float(hi[1])],
                "row_groups": len(self.groups),
                "streamed": True,
                "dropped": dropped,
            }
        return self._stats

    def fingerprint(self) -> str:
        # A group split into training and validation rows also carries its training row count.
        units = [
            (g.part.name, g.index) + (() if g.only is None else (g.rows,)) for g in self.groups
        ]
        return hashlib.sha256(f"{self._store_fingerprint}:{units}".encode()).hexdigest()[:16]

    def batches(self, start_step: int, place: Placement) -> Iterator[Batch]:
        """This process's rows of each step from ``start_step`` on (its stream is replayed
        up to that step first, reading but not converting the skipped rows)."""
        recipe = self.recipe
        share = rank_slice(recipe.batch_size, place.rank, place.world_size)
        prior = _prior_share(recipe.batch_size, recipe.prior_rows, share)
        data_rows = share.stop - share.start - prior
        weight = (share.stop - share.start) * place.world_size / recipe.batch_size
        stream = RowStream(
            shuffled_rows(
                self.groups, self.dim, recipe.seed, self.buffer_rows, place.rank, place.world_size
            )
        )
        stream.skip(start_step * data_rows)
        for step in count(start_step):
            emb, latlon = stream.take(data_rows)
            g = torch.Generator().manual_seed(derived_seed(recipe.seed, "batch", step, place.rank))
            x0, emb = assemble_batch(
                to_unit(latlon), emb.to(torch.float32), slice(None), recipe.prior_x0, prior, g
            )
            seed = derived_seed(recipe.seed, "loss", step, place.rank)
            yield Batch(x0, emb, None, weight, seed)


@dataclass
class ValidationRows:
    """The validation rows actually used, in their fixed order: the first ``val_loss_rows``
    score the loss, the first ``val_geo_rows`` the GeoScore of sampled best guesses."""

    x0: torch.Tensor
    emb: torch.Tensor
    latlon: torch.Tensor
    stats: dict
    fingerprint: str
    """Of the rows used (and the size of the set they were drawn from)."""

    @classmethod
    def select(cls, emb: torch.Tensor, latlon: torch.Tensor, needed: int, seed: int):
        """The first ``needed`` rows of a fixed permutation (``seed``) of the given rows."""
        emb = torch.as_tensor(emb, dtype=torch.float32)
        latlon = torch.as_tensor(latlon, dtype=torch.float64)
        bad = len(nonfinite_rows(emb))
        if bad:
            raise ValueError(f"{bad} validation row(s) have non-finite embeddings")
        fixed = torch.randperm(len(emb), generator=torch.Generator().manual_seed(seed))[:needed]
        return cls(
            to_unit(latlon[fixed]),
            emb[fixed],
            latlon[fixed],
            _stats(latlon, emb.shape[1], emb),
            f"{len(emb)}:{tensor_fingerprint(emb[fixed], latlon[fixed])}",
        )

    def to(self, device: torch.device) -> ValidationRows:
        return ValidationRows(
            self.x0.to(device),
            self.emb.to(device),
            self.latlon.to(device),
            self.stats,
            self.fingerprint,
        )


def run_data_fingerprint(
    data: InMemoryRows | StreamedRows, val: ValidationRows | None, prior_latlon: torch.Tensor | None
) -> str:
    """What a run learns from: training rows, validation rows and prior locations (M, 2)."""
    parts = (data.fingerprint(), val.fingerprint if val else "-", tensor_fingerprint(prior_latlon))
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def read_group_rows(groups: list[RowGroup], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All located rows of some row groups, in memory: (embeddings float32, lat/lon)."""
    parts = [read_located_rows(g, dim) for g in groups]
    if not parts:
        return torch.zeros(0, dim), torch.zeros(0, 2, dtype=torch.float64)
    return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts])


# ---- splits and side inputs -------------------------------------------------------------------
def split_rows(
    authors: list[str] | None, num_rows: int, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, val rows). Grouped by author when authors are known (no author on both
    sides, so the validation score is not inflated by near-duplicate photos of one
    photographer); rows without an author are their own group. Else a plain random split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    named = authors is not None and len({a for a in authors if a}) >= 2
    if not named:
        perm = torch.randperm(num_rows, generator=g)
        n_val = max(1, int(round(fraction * num_rows))) if num_rows > 1 else 0
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    keys = [a if a else f"\0row{i}" for i, a in enumerate(authors)]
    groups = sorted(set(keys))
    perm = torch.randperm(len(groups), generator=g).tolist()
    n_val = max(1, int(round(fraction * len(groups))))
    val_groups = {groups[i] for i in perm[:n_val]}
    is_val = torch.tensor([k in val_groups for k in keys], dtype=torch.bool)
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def read_prior_locations(path: str | os.PathLike) -> torch.Tensor:
    """(M, 2) degrees from a CSV with LAT/LON (or lat/lon, latitude/longitude) columns;
    rows with missing or unusable coordinates (:func:`~globeflow.data.coordinates.parse_latlon`)
    are skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such prior-locations file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        lat_col, lon_col = pick_column(columns, LAT_COLUMNS), pick_column(columns, LON_COLUMNS)
        if lat_col is None or lon_col is None:
            raise ValueError(f"{path}: need LAT and LON columns, found {reader.fieldnames}")
        rows, skipped = [], {}
        for row in reader:
            try:
                latlon = parse_latlon(row[lat_col], row[lon_col])
            except CoordinateError as exc:
                skipped[exc.kind] = skipped.get(exc.kind, 0) + 1
                continue
            if latlon is None:
                skipped[NO_COORDINATES] = skipped.get(NO_COORDINATES, 0) + 1
            else:
                rows.append(latlon)
    if not rows:
        raise ValueError(f"{path}: no valid coordinates ({counts_text(skipped) or 'no rows'})")
    return torch.tensor(rows, dtype=torch.float64)


def exclude_authors(
    store: str | os.PathLike,
    authors_file: str | os.PathLike,
    out: str | os.PathLike,
    say: Callable[[str], None] = print,
) -> Path:
    """A copy of ``store`` at ``out`` without the rows of the authors listed in
    ``authors_file`` (one per line), in the store's own embedding dtype. Streamed part by part
    (bounded memory). The copy records a fingerprint of its inputs and is reused only while
    they are unchanged."""
    authors_path = Path(authors_file)
    if not authors_path.is_file():
        raise FileNotFoundError(f"{authors_path}: no such authors file")
    drop = sorted({a.strip() for a in authors_path.read_text().splitlines() if a.strip()})
    source = {
        "store": str(Path(store).resolve()),
        "store_fingerprint": store_fingerprint(store),
        "authors": hashlib.sha256("\n".join(drop).encode()).hexdigest()[:16],
    }
    out = Path(out)
    marker = out / "_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    if out.exists():
        say(f"{out}: inputs changed since this filtered copy was made; rebuilding it")
        shutil.rmtree(out)
    kept = dropped = 0
    writer = None
    dropped_authors = set(drop)
    for batch in iter_embedding_batches(store):
        if writer is None:
            writer = EmbeddingWriter(
                out, batch.encoder_name, batch.dim, chunk_size=65536, dtype=store_dtype(store)
            )
        keep = [i for i, a in enumerate(batch.authors) if a not in dropped_authors]
        dropped += len(batch) - len(keep)
        kept += len(keep)
        writer.add(
            [batch.ids[i] for i in keep],
            batch.embeddings[keep],
            paths=[batch.paths[i] for i in keep],
            latlon=batch.latlon[keep],
            authors=[batch.authors[i] for i in keep],
        )
    if writer is not None:
        writer.close()
    marker.write_text(json.dumps(source, indent=1) + "\n")
    say(f"left out {dropped} rows by {len(drop)} authors ({kept} kept) -> {out}")
    return out
