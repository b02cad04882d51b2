"""The ``train`` job's rows from an embedding store: the rows with usable coordinates, split into
training and validation rows (by author, a random fraction, or a second store), the training
rows held in memory or streamed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from globeflow.data import embedding_store
from globeflow.data.coordinates import counts_text, invalid_latlon_counts, valid_latlon_mask
from globeflow.data.embedding_stream import hold_out, list_row_groups
from globeflow.jobs.train_config import TrainConfig
from globeflow.jobs.train_data import (
    BatchRecipe,
    InMemoryRows,
    StreamedRows,
    ValidationRows,
    nonfinite_rows,
    read_group_rows,
    split_rows,
    to_unit,
)

__all__ = [
    "TrainInputs",
    "ValidationSplit",
    "batch_recipe",
    "in_memory_inputs",
    "located_rows",
    "streamed_inputs",
    "validation_rows",
]

Say = Callable[[str], None]


@dataclass(frozen=True)
class ValidationSplit:
    """How the validation rows are chosen: ``kind`` "author" (an author-grouped split of
    ``fraction`` of the authors, random when the store has no authors), "fraction" (a random
    split of ``fraction`` of the rows) or "store" (every row of the store at ``store``)."""

    kind: str
    fraction: float | None
    store: Path

    @classmethod
    def parse(cls, val_split: str | float, val_fraction: float) -> ValidationSplit:
        """From the job's options ``val_split`` and ``val_fraction``; a clear error else."""
        if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
            raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction!r}")
        split = str(val_split)
        if split == "author":
            return cls("author", float(val_fraction), Path(split))
        try:
            fraction = float(split)
        except ValueError:
            if not Path(split).exists():
                raise ValueError(
                    f"--val-split {split!r}: not 'author', a fraction in (0, 1), or an existing "
                    "embedding store"
                ) from None
            return cls("store", None, Path(split))
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"--val-split must be a fraction in (0, 1), got {split}")
        return cls("fraction", fraction, Path(split))


@dataclass
class TrainInputs:
    """What a run learns from and is validated on (None: no validation rows), the encoder of
    the embeddings and ``how`` the validation rows were chosen (for the log)."""

    data: InMemoryRows | StreamedRows
    val: ValidationRows | None
    encoder: str
    how: str


def batch_recipe(config: TrainConfig) -> BatchRecipe:
    """How the run's batches are made: its batch size, prior locations and seed."""
    prior_x0 = to_unit(config.prior_latlon) if config.prior_rows else None
    return BatchRecipe(config.batch_size, prior_x0, config.prior_rows, config.seed)


def validation_rows(
    emb: torch.Tensor, latlon: torch.Tensor, config: TrainConfig
) -> ValidationRows | None:
    """The rows the run validates on, from (N, D) embeddings and (N, 2) degrees (None: N = 0)."""
    if not len(emb):
        return None
    return ValidationRows.select(emb, latlon, config.val_rows, config.seed)


def located_rows(table, name: str, say: Say):
    """Rows with usable coordinates: (embeddings, lat/lon, authors); the others are dropped
    with their reasons said; clear errors for unusable data."""
    keep = torch.from_numpy(valid_latlon_mask(table.latlon.numpy()))
    dropped = int((~keep).sum())
    reasons = counts_text(invalid_latlon_counts(table.latlon.numpy())) if dropped else ""
    if dropped == len(keep):
        raise ValueError(f"{name}: none of its {len(keep)} rows has usable coordinates ({reasons})")
    if dropped:
        say(f"{name}: dropped {dropped} of {len(keep)} rows ({reasons})")
        idx = keep.nonzero().flatten()
        emb, latlon, authors = (
            table.embeddings[idx],
            table.latlon[idx],
            [table.authors[i] for i in idx.tolist()],
        )
    else:  # the table's own rows: no copy of the embeddings
        idx, emb, latlon, authors = None, table.embeddings, table.latlon, table.authors
    bad = nonfinite_rows(emb)
    if len(bad):
        first = table.ids[int(bad[0]) if idx is None else int(idx[bad[0]])]
        raise ValueError(
            f"{name}: {len(bad)} row(s) have non-finite embeddings (first: {first!r}); "
            "re-embed those photos or drop them"
        )
    return emb, latlon, authors


def _validation_store(
    path: Path, dim: int, say: Say, encoder: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The located rows of a second store: (embeddings, lat/lon, description); a warning when
    its encoder is not ``encoder`` (None: not checked)."""
    val_table = embedding_store.read_embeddings(path)
    if val_table.dim != dim:
        raise ValueError(f"{path}: embedding dim {val_table.dim} != {dim}")
    if encoder is not None and val_table.encoder_name != encoder:
        say(f"warning: validation encoder {val_table.encoder_name} != {encoder}")
    val_emb, val_latlon, _ = located_rows(val_table, str(path), say)
    return val_emb, val_latlon, f"validation store {path}"


def in_memory_inputs(
    store: Path, split: ValidationSplit, config: TrainConfig, say: Say
) -> TrainInputs:
    """The store's rows in memory, split into training and validation rows."""
    table = embedding_store.read_embeddings(store)
    emb, latlon, authors = located_rows(table, str(store), say)
    encoder, dim = table.encoder_name, table.dim
    del table  # its embeddings live on in ``emb`` only where no row was dropped
    # The training rows are a function of the store, the split and the seed (in the config):
    # fingerprinting those costs milliseconds, hashing the rows seconds per GB.
    source = f"{embedding_store.store_fingerprint(store)}:{split.kind}:{split.fraction}"
    if split.kind == "store":
        val_emb, val_latlon, how = _validation_store(split.store, dim, say, encoder)
    else:
        grouped = split.kind == "author" and len({a for a in authors if a}) >= 2
        tr, va = split_rows(authors if grouped else None, len(emb), split.fraction, config.seed)
        val_emb, val_latlon = emb[va], latlon[va]
        emb, latlon = emb[tr], latlon[tr]
        how = f"{'author-grouped' if grouped else 'random'} split, fraction {split.fraction}"
    if len(emb) == 0:
        raise ValueError(f"{store}: no training rows left after the validation split")
    data = InMemoryRows(emb, latlon, batch_recipe(config), source)
    return TrainInputs(data, validation_rows(val_emb, val_latlon, config), encoder, how)


def streamed_inputs(
    store: Path, split: ValidationSplit, config: TrainConfig, buffer_rows: int, say: Say
) -> TrainInputs:
    """The store's training rows streamed through a shuffle buffer of ``buffer_rows`` rows;
    the validation rows (held-out row groups, or a second store) in memory."""
    groups, encoder, dim = list_row_groups(store)
    if split.kind == "store":
        val_emb, val_latlon, how = _validation_store(split.store, dim, say)
    else:
        total = sum(g.rows for g in groups)
        needed = min(config.val_rows, math.ceil(split.fraction * total))
        groups, held = hold_out(groups, needed, config.seed)
        val_emb, val_latlon = read_group_rows(held, dim)
        if any(g.only is not None for g in held):
            how = (
                f"{len(val_emb)} rows with coordinates held out inside the store's only row "
                "group (too few row groups to hold whole ones out; not split by author)"
            )
        else:
            how = (
                f"{len(held)} held-out row groups ({len(val_emb)} rows with coordinates; a "
                "streamed store is split by row group, not by author)"
            )
    fingerprint = embedding_store.store_fingerprint(store)
    data = StreamedRows(groups, dim, batch_recipe(config), buffer_rows, fingerprint)
    return TrainInputs(data, validation_rows(val_emb, val_latlon, config), encoder, how)
