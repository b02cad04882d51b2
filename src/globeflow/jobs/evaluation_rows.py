"""``evaluate``'s per-image rows, batch by batch: kept in memory, or streamed to parquet parts
in the report folder (``rows/``) so that a long evaluation resumes and shards.

Each image's samples come from its own random stream (seed, record id). Under ``torchrun`` the
processes take the batches of the records still to evaluate in turn (batch j on rank
j mod N: the batches one process would form), each writes its own parts, and the summary is
computed from the stored rows in dataset order (column ``index``), so a resumed or sharded
evaluation reports what one uninterrupted process does. One evaluation at a time writes a
report folder (:mod:`globeflow.jobs.run_lock`: a second is refused, naming the holder); rows
are committed within ``max_unsaved_seconds`` of being computed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from globeflow.answers.result_store import RowWriter, read_results
from globeflow.core.random_streams import photo_generators
from globeflow.data.datasets import GeoRecord
from globeflow.data.file_names import printable
from globeflow.data.id_index import IdIndex
from globeflow.jobs.distributed import Placement
from globeflow.jobs.resumable_output import open_resumable_writer
from globeflow.jobs.run_lock import run_lock

__all__ = ["PREDICTION_COLUMNS", "ROWS_NAME", "ROW_SCHEMA", "evaluate_rows"]

ROWS_NAME = "rows"
"""The folder of row parts inside the report folder."""

PREDICTION_COLUMNS = (
    "id",
    "path",
    "true_lat",
    "true_lon",
    "pred_lat",
    "pred_lon",
    "error_km",
    "geoscore",
    "log_prob",
    "nll_bpd",
    "localizability",
    "hpd_mass",
    "in_hpd50",
    "in_hpd90",
    "sample_lat",
    "sample_lon",
    "pred_country",
    "pred_country_code",
    "pred_region",
    "pred_city",
    "true_country",
    "true_country_code",
    "true_region",
    "true_city",
)
"""An image's row, after its ``index`` in the dataset (also the columns of predictions.csv)."""

_TEXT_COLUMNS = {"id", "path"} | {
    f"{side}_{key}"
    for side in ("pred", "true")
    for key in ("country", "country_code", "region", "city")
}


def _row_schema() -> pa.Schema:
    fields = [pa.field("index", pa.int64())]
    for name in PREDICTION_COLUMNS:
        kind = pa.string() if name in _TEXT_COLUMNS else pa.float64()
        fields.append(pa.field(name, pa.bool_() if name.startswith("in_hpd") else kind))
    return pa.schema(fields)


ROW_SCHEMA = _row_schema()

BatchRows = Callable[[list[tuple[int, GeoRecord]], torch.Tensor, list[torch.Generator]], list[dict]]


def evaluate_rows(
    records: Iterable[GeoRecord],
    embed: Callable[[list[GeoRecord]], tuple[list[GeoRecord], torch.Tensor] | None],
    batch_rows: BatchRows,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    settings: dict[str, Any],
    output: str | Path | None = None,
    overwrite: bool = False,
    place: Placement | None = None,
    progress: bool | Any = True,
    max_unsaved_seconds: float = 30.0,
    legacy: Sequence[dict] = (),
) -> pa.Table:
    """Every record's row, in dataset order (a table of :data:`ROW_SCHEMA`).

    ``embed(records)`` gives the records it could embed and their embeddings (B, D) (or None);
    ``batch_rows(indexed records, embeddings, generators)`` their rows. ``progress``: a bar of
    this rank's records, or an object with tqdm's ``update(n)`` and ``close()``. With
    ``output`` the rows go to ``output/rows`` as they come (resumed when present; other
    ``settings`` refused unless ``overwrite``; ``legacy``: the same settings as earlier versions
    recorded them), and the table is read back from there.
    """
    place = place or Placement()
    lock = contextlib.nullcontext()
    if output is not None:  # one evaluation at a time in a report folder
        Path(output).mkdir(parents=True, exist_ok=True)
        lock = run_lock(Path(output), place.is_main, place.broadcast)
    with lock:
        return _evaluate_rows(
            records, embed, batch_size, batch_rows, seed, device, settings, output, overwrite,
            place, progress, max_unsaved_seconds, legacy,
        )  # fmt: skip


def _evaluate_rows(
    records, embed, batch_size, batch_rows, seed, device, settings, output, overwrite, place,
    progress, max_unsaved_seconds, legacy,
) -> pa.Table:  # fmt: skip
    """:func:`evaluate_rows` (holding the report folder's lock when there is one)."""
    writer, done = None, None
    if output is not None:
        folder = Path(output) / ROWS_NAME
        make = functools.partial(
            RowWriter, folder, settings, ROW_SCHEMA, max_unsaved_seconds=max_unsaved_seconds,
            legacy=legacy,
        )  # fmt: skip
        writer, done = open_resumable_writer(folder, place, overwrite, make)
    kept: list[dict] = []
    todo = _not_done(enumerate(records), done)
    bar = _bar(progress and place.is_main) if isinstance(progress, bool) else progress
    try:
        for j, batch in enumerate(_chunks(todo, batch_size)):
            if j % place.world_size != place.rank:
                continue
            got = embed([r for _, r in batch])
            if got is not None:
                index = {id(r): i for i, r in batch}
                kept_records, emb = got
                gens = photo_generators(seed, [r.id for r in kept_records], device)
                rows = batch_rows([(index[id(r)], r) for r in kept_records], emb, gens)
                writer.add_rows(rows) if writer is not None else kept.extend(rows)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    place.barrier()
    if writer is not None:
        return read_results(folder, schema=ROW_SCHEMA).sort_by("index")
    return pa.Table.from_pylist(kept, schema=ROW_SCHEMA).sort_by("index")


def _not_done(indexed: Iterator, done: IdIndex | None) -> Iterator:
    """The (index, record) pairs whose record id is not in ``done``, looked up in blocks."""
    for block in _chunks(indexed, 4096):
        have = done.contains([printable(r.id) for _, r in block]) if done else [False] * 4096
        yield from (pair for pair, stored in zip(block, have) if not stored)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _bar(show: bool):
    if not show:
        return None
    return tqdm(desc="evaluate", unit="image")


def table_columns(table: pa.Table) -> dict[str, np.ndarray | list]:
    """The rows' columns: float64 arrays (NaN for missing) and lists of strings."""
    out: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        if name in _TEXT_COLUMNS:
            out[name] = [v or "" for v in column.to_pylist()]
        else:
            values = column.to_pylist()
            out[name] = np.array([math.nan if v is None else float(v) for v in values])
    return out
