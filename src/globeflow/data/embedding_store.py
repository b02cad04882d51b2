"""Columnar embedding files: a directory ``NAME.parquet/`` of parquet parts.

Each part has columns ``id`` (string, unique per image), ``path`` (string), ``lat``/``lon``
(float64 degrees, NaN when unknown), ``author`` (string, may be empty) and ``embedding``
(fixed_size_list<float32 or float16>[dim]); file-level metadata records the encoder name and dim.
Parts are written to a temporary name, made durable and renamed (and the directory made durable
after the rename), so an interrupted job never leaves a half-written part, and a rerun can skip
the ids already stored (:meth:`EmbeddingWriter.done_ids`).

Part names sort in the order their rows were written and are unique per writer whatever
happens: ``part-SESSION-RANK-CHUNK-TOKEN.parquet`` (the writer's session, one more than any
stored; its rank in a ``torchrun`` job, 000 alone; its chunk; and a random token of the
writer). The jobs that write a store lock it for one job at a time
(:mod:`globeflow.jobs.run_lock`); the token keeps two writers that share a directory anyway
from replacing each other's parts. Names of earlier versions (``part-NNNNN``,
``part-SESSION-RANK-CHUNK``) are still read.

A store in which an id repeats (two jobs wrote it at once, before stores were locked) is read
de-duplicated: each id's first row (in part order) is used, the others are left out, and a
:class:`RepeatedIdsWarning` says how many.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from globeflow.data.coordinates import valid_latlon_mask
from globeflow.data.id_index import IdIndex

__all__ = [
    "EmbeddingTable",
    "EmbeddingWriter",
    "FlushDeadline",
    "RepeatedIdsWarning",
    "commit_part",
    "part_name",
    "replace_durably",
    "start_parts",
    "store_repeats",
    "without_rows",
    "iter_embedding_batches",
    "located_ids",
    "read_embeddings",
    "store_dtype",
    "store_fingerprint",
    "store_parts",
]

_PART_RE = re.compile(r"^part-(\d{5,})(?:-(\d{3,})-(\d{5,}))?(?:-([0-9a-f]{8,}))?\.parquet$")
_META_ENCODER = b"globeflow.encoder"
_META_DIM = b"globeflow.dim"
_EMBEDDING_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def _schema(dim: int, encoder_name: str, dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string()),
            pa.field("lat", pa.float64()),
            pa.field("lon", pa.float64()),
            pa.field("author", pa.string()),
            pa.field("embedding", pa.list_(_EMBEDDING_TYPES[dtype], dim)),
        ],
        metadata={_META_ENCODER: encoder_name.encode(), _META_DIM: str(dim).encode()},
    )


def _part_key(part: Path) -> tuple[int, int, int, str]:
    """(session, rank, chunk, token) of a part's name: the order its rows were written in."""
    session, rank, chunk, token = _PART_RE.match(part.name).groups()
    return int(session), int(rank or 0), int(chunk or 0), token or ""


def store_parts(path: str | os.PathLike[str]) -> list[Path]:
    """The committed parts of a store, in the order their rows were written."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted((p for p in path.iterdir() if _PART_RE.match(p.name)), key=_part_key)


def start_parts(path: Path, clean_stale: bool) -> tuple[list[Path], int]:
    """Create the directory ``path`` of parts if needed, remove the temporary files of killed
    writers (``clean_stale``: one process of a job only, while it holds the directory's lock, so
    that no live writer's file is taken), and return its committed parts and the session number
    of a new writer (one more than any stored)."""
    path.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        for stale in path.glob(".tmp-*"):  # leftovers of a killed writer
            stale.unlink(missing_ok=True)
    existing = store_parts(path)
    session = 1 + max((_part_key(p)[0] for p in existing), default=-1)
    return existing, session


def writer_token() -> str:
    """A new writer's random token (8 hex digits): its part names are its own."""
    return secrets.token_hex(4)


def part_name(session: int, chunk: int, rank: int | None, token: str) -> str:
    """Name of a writer's ``chunk``-th part: ``part-SESSION-RANK-CHUNK-TOKEN`` (rank 0 for one
    process; names sort in write order, and ``token`` makes them the writer's own)."""
    return f"part-{session:05d}-{rank or 0:03d}-{chunk:05d}-{token}.parquet"


def _sync_directory(path: Path) -> None:
    """Make a rename in the directory ``path`` durable (where directories can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: no directory handles; its renames are durable on return
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename itself happened
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """Publish the written file ``tmp`` as ``final``: its bytes made durable, renamed, and the
    rename made durable (a crash leaves the old file or the new one, never half of one)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _sync_directory(final.parent)


def commit_part(table: pa.Table, final: Path, **write_options) -> None:
    """Write ``table`` as the parquet file ``final`` atomically: to a temporary name, made
    durable, then renamed, so that a killed writer never leaves half a part."""
    tmp = final.with_name(f".tmp-{final.name}")
    pq.write_table(table, tmp, **write_options)
    replace_durably(tmp, final)


class RepeatedIdsWarning(UserWarning):
    """A store in which some ids repeat: it is read de-duplicated (each id's first row)."""


_repeats_seen: dict[str, tuple[tuple, dict[int, np.ndarray]]] = {}


def store_repeats(path: str | os.PathLike[str], parts: Sequence[Path] | None = None) -> dict:
    """{part number: positions inside that part of its rows whose id an earlier row of the
    store already has}; empty for a store of unique ids. One pass over the id column
    (:class:`~globeflow.data.id_index.IdIndex`), remembered per process while the parts stay
    the same; warns (:class:`RepeatedIdsWarning`) when some ids repeat."""
    parts = store_parts(path) if parts is None else list(parts)
    state = tuple((p.name, *_size_and_time(p)) for p in parts)
    key = str(Path(path).resolve())
    seen = _repeats_seen.get(key)
    if seen is not None and seen[0] == state:
        return seen[1]
    index = IdIndex.of_parts(parts)
    repeats = {i: r for i in range(len(parts)) if len(r := index.repeated_in(i))}
    if repeats:
        warnings.warn(
            f"{path}: {len(index.repeated)} rows repeat an id stored before them (two jobs "
            f"wrote here at once?); each id's first row is used",
            RepeatedIdsWarning,
            stacklevel=3,
        )
    _repeats_seen[key] = (state, repeats)
    return repeats


def _size_and_time(part: Path) -> tuple[int, int]:
    st = part.stat()
    return st.st_size, st.st_mtime_ns


def store_fingerprint(path: str | os.PathLike[str]) -> str:
    """A short hash that changes when the store's content does: each part's place in the
    order (its name less the writer's random token), size and parquet footer (row counts,
    per-column-chunk sizes and statistics). Reads footers only, so it costs milliseconds even
    for stores of millions of rows."""
    h = hashlib.sha256()
    for part in store_parts(path):
        meta = pq.ParquetFile(part).metadata
        name = part.name.replace(f"-{_part_key(part)[3]}.", ".")  # the same as before tokens
        h.update(f"{name}:{part.stat().st_size}:{meta.num_rows}:".encode())
        for rg in range(meta.num_row_groups):
            h.update(str(meta.row_group(rg).to_dict()).encode())
    return h.hexdigest()[:16]


def located_ids(path: str | os.PathLike[str]) -> IdIndex:
    """The ids of the stored rows with usable coordinates (finite, in range); reads only those
    columns."""

    def located(batch: pa.RecordBatch) -> np.ndarray:
        lat = batch.column("lat").to_numpy(zero_copy_only=False)
        lon = batch.column("lon").to_numpy(zero_copy_only=False)
        return valid_latlon_mask(np.stack([lat, lon], 1))

    return IdIndex.of_parts(store_parts(path), ("id", "lat", "lon"), located)


class FlushDeadline:
    """Commits a writer's buffered rows from a daemon thread once the oldest of them has waited
    ``seconds``, so that what is done is saved within that interval even while the next batch
    is still being computed (a kill then loses the batch in progress and at most ``seconds`` of
    finished work). The writer holds :attr:`lock` while it touches its buffer, calls
    :meth:`arm` when the buffer gets its first row, :meth:`disarm` when it is flushed, and
    :meth:`close` at the end; an error of a background flush is raised by :meth:`check`."""

    def __init__(self, flush: Callable[[], object], seconds: float) -> None:
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._flush, self.seconds = flush, float(seconds)
        self._due: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None

    def arm(self) -> None:
        """Start the clock for the oldest buffered row (a no-op while it runs)."""
        with self.lock:
            if self._due is not None or self._closed or not math.isfinite(self.seconds):
                return
            self._due = time.monotonic() + self.seconds
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="globeflow-save-deadline", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def disarm(self) -> None:
        with self.lock:
            self._due = None

    def overdue(self) -> bool:
        """Whether the oldest buffered row has waited its interval (checked by the writer as
        rows come, too: the thread only adds the commits that no new row would trigger)."""
        return self._due is not None and time.monotonic() >= self._due

    def check(self) -> None:
        """Raise the error of a flush that failed in the background, if any."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        # Woken by arm() as the clock starts; commits when a whole interval then passes with
        # the same deadline armed (a flush or close in between wakes it or disarms it).
        with self.lock:
            while not self._closed:
                if self._due is None:
                    self._wake.wait()
                    continue
                due = self._due
                if self._wake.wait(self.seconds) or self._due != due or self._closed:
                    continue
                try:
                    self._flush()
                except BaseException as exc:  # noqa: BLE001 - raised in the writer's thread
                    self._error, self._due = exc, None


@dataclass
class EmbeddingTable:
    """In-memory embeddings. ``latlon`` (N, 2) float64 degrees (NaN = unknown),
    ``embeddings`` (N, dim) float32."""

    ids: list[str]
    paths: list[str]
    latlon: torch.Tensor
    authors: list[str]
    embeddings: torch.Tensor
    encoder_name: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


class EmbeddingWriter:
    """Append embeddings to ``path`` (a ``NAME.parquet/`` directory), one part per flush.

    Rows are buffered and written as a new part every ``chunk_size`` rows, once the oldest
    unsaved row has waited ``max_unsaved_seconds`` (from a background thread: a kill loses at
    most that much of the rows added, whatever the chunk size and however long the caller takes
    to add more; :class:`FlushDeadline`), and on :meth:`close`. An existing store must have the
    same encoder name and dim.

    Several processes of one job may write one store: each passes its ``rank``, all construct
    their writers before any of them adds rows, and only rank 0 removes the temporary files of
    killed writers (``clean_stale``). Jobs hold the store's lock while they write it
    (:mod:`globeflow.jobs.run_lock`).
    ``dtype``: "float32" or "float16" for the embedding column (default: the store's own, else
    float32); a store holds one dtype.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        encoder_name: str,
        dim: int,
        chunk_size: int = 4096,
        row_group_size: int = 1024,
        max_unsaved_seconds: float = 60.0,
        rank: int | None = None,
        clean_stale: bool = True,
        dtype: str | None = None,
    ) -> None:
        if dtype is not None and dtype not in _EMBEDDING_TYPES:
            raise ValueError(f"dtype must be one of {sorted(_EMBEDDING_TYPES)}, got {dtype!r}")
        self.path = Path(path)
        self.encoder_name = encoder_name
        self.dim = int(dim)
        self.chunk_size = int(chunk_size)
        self.row_group_size = int(row_group_size)
        self.max_unsaved_seconds = float(max_unsaved_seconds)
        self.rank = rank
        existing, self._session = start_parts(self.path, clean_stale)
        self._token = writer_token()
        stored = _part_dtype(existing[0]) if existing else None
        if dtype is not None and stored is not None and stored != dtype:
            raise ValueError(f"{self.path} holds {stored} embeddings; cannot append {dtype} ones")
        self.dtype = dtype or stored or "float32"
        self.schema = _schema(self.dim, encoder_name, self.dtype)
        if existing:
            enc, d = _part_meta(existing[0])
            if enc != encoder_name or d != self.dim:
                raise ValueError(
                    f"{self.path} holds embeddings of encoder {enc!r} (dim {d}); "
                    f"cannot append {encoder_name!r} (dim {self.dim})"
                )
        self._chunk = 0
        self._buf: dict[str, list] = {k: [] for k in ("id", "path", "lat", "lon", "author")}
        self._emb: list[np.ndarray] = []
        self._deadline = FlushDeadline(self.flush, self.max_unsaved_seconds)
        self.rows_written = 0

    def done_ids(self) -> IdIndex:
        """The ids already stored in committed parts (``id in index``; 16 bytes per id)."""
        return IdIndex.of_parts(store_parts(self.path))

    def add(
        self,
        ids: Sequence[str],
        embeddings: torch.Tensor | np.ndarray,
        paths: Sequence[str] | None = None,
        latlon: Sequence[tuple[float, float] | None] | np.ndarray | torch.Tensor | None = None,
        authors: Sequence[str | None] | None = None,
    ) -> None:
        """Buffer rows. ``embeddings`` (n, dim); ``latlon`` (n, 2) degrees or per-row None."""
        self._deadline.check()
        with self._deadline.lock:
            self._add(ids, embeddings, paths, latlon, authors)

    def _add(self, ids, embeddings, paths, latlon, authors) -> None:
        n = len(ids)
        emb = (
            embeddings.detach().cpu().numpy()
            if isinstance(embeddings, torch.Tensor)
            else embeddings
        )
        emb = np.asarray(emb, dtype=np.float32).reshape(n, -1)
        if emb.shape[1] != self.dim:
            raise ValueError(f"embedding dim {emb.shape[1]} != store dim {self.dim}")
        if latlon is None:
            latlon = [None] * n
        elif isinstance(latlon, torch.Tensor):
            latlon = latlon.detach().cpu().numpy()
        start = 0
        for i in range(n):
            if len(self._buf["id"]) >= self.chunk_size:
                self._emb.append(emb[start:i])
                start = i
                self.flush()
            ll = latlon[i]
            lat, lon = (math.nan, math.nan) if ll is None else (float(ll[0]), float(ll[1]))
            self._buf["id"].append(str(ids[i]))
            self._buf["path"].append(str(paths[i]) if paths is not None else str(ids[i]))
            self._buf["lat"].append(lat)
            self._buf["lon"].append(lon)
            self._buf["author"].append((authors[i] or "") if authors is not None else "")
        self._emb.append(emb[start:])
        if self._buf["id"]:
            self._deadline.arm()
        full = len(self._buf["id"]) >= self.chunk_size
        if full or self.max_unsaved_seconds <= 0 or self._deadline.overdue():
            self.flush()

    def flush(self) -> Path | None:
        """Write buffered rows as one new part (atomic rename). Returns the part path."""
        with self._deadline.lock:
            return self._flush()

    def _flush(self) -> Path | None:
        n = len(self._buf["id"])
        self._deadline.disarm()
        if n == 0:
            return None
        emb = np.concatenate(self._emb).astype(self.dtype, copy=False)
        flat = pa.array(emb.reshape(-1), type=_EMBEDDING_TYPES[self.dtype])
        table = pa.Table.from_arrays(
            [
                pa.array(self._buf["id"], pa.string()),
                pa.array(self._buf["path"], pa.string()),
                pa.array(self._buf["lat"], pa.float64()),
                pa.array(self._buf["lon"], pa.float64()),
                pa.array(self._buf["author"], pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, self.dim),
            ],
            schema=self.schema,
        )
        final = self.path / part_name(self._session, self._chunk, self.rank, self._token)
        # No dictionary encoding for embeddings: float16 values (65,536 of them) would all fit
        # in one dictionary, and decoding dictionary indices reads ~5x slower than plain values.
        commit_part(table, final, row_group_size=self.row_group_size, use_dictionary=["author"])
        self._chunk += 1
        self.rows_written += n
        self._buf = {k: [] for k in self._buf}
        self._emb = []
        return final

    def close(self) -> None:
        self._deadline.close()
        self._deadline.check()
        self.flush()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an exception keep what was complete (the buffer was embedded fine) for resume
        self.close()


def _part_dtype(part: Path) -> str:
    value_type = pq.read_schema(part).field("embedding").type.value_type
    return next(name for name, t in _EMBEDDING_TYPES.items() if t == value_type)


def store_dtype(path: str | os.PathLike[str]) -> str:
    """The embedding column's dtype ("float32" or "float16") of a store (a store holds one)."""
    p = Path(path)
    parts = store_parts(p)
    if not parts:
        raise FileNotFoundError(_not_a_store(p))
    return _part_dtype(parts[0])


def _part_meta(part: Path) -> tuple[str, int]:
    meta = pq.read_schema(part).metadata or {}
    return meta.get(_META_ENCODER, b"").decode(), int(meta.get(_META_DIM, b"0"))


def _not_a_store(path: Path) -> str:
    """Why ``path`` is no embedding store, and what makes one."""
    if not path.exists():
        return f"{path}: no such embedding store"
    if path.is_file():
        kind = {".csv": "a CSV file", ".parquet": "a parquet file"}.get(
            path.suffix.lower(), "a file"
        )
        return (
            f"{path}: {kind}, not an embedding store (a folder of part-*.parquet); "
            f"`globeflow embed {path} -o NAME.parquet` makes one from photos it lists"
        )
    return f"{path}: no embedding parts (part-*.parquet) in this folder"


def store_meta(parts: list[Path], path: Path) -> tuple[str, int]:
    """(encoder name, dim) shared by every part; a clear error when the parts disagree."""
    if not parts:
        raise FileNotFoundError(_not_a_store(path))
    encoder, dim = _part_meta(parts[0])
    for part in parts[1:]:
        other = _part_meta(part)
        if other != (encoder, dim):
            raise ValueError(
                f"{path}: mixed embeddings: {parts[0].name} has {encoder!r} (dim {dim}) but "
                f"{part.name} has {other[0]!r} (dim {other[1]}); a store holds one encoder"
            )
    return encoder, dim


def _table_to_columns(table: pa.Table, dim: int) -> tuple:
    emb_col = table.column("embedding").combine_chunks()
    values = emb_col.values.to_numpy(zero_copy_only=False)
    # one writable float32 copy (arrow's buffer is read-only), converting float16 on the way
    emb = torch.from_numpy(np.array(values, dtype=np.float32).reshape(len(table), dim))
    lat = table.column("lat").to_numpy(zero_copy_only=False).astype(np.float64)
    lon = table.column("lon").to_numpy(zero_copy_only=False).astype(np.float64)
    latlon = (
        torch.from_numpy(np.stack([lat, lon], axis=1))
        if len(table)
        else torch.zeros(0, 2, dtype=torch.float64)
    )
    ids = table.column("id").to_pylist()
    paths = table.column("path").to_pylist()
    authors = [a or "" for a in table.column("author").to_pylist()]
    return ids, paths, latlon, authors, emb


def without_rows(table: pa.Table, rows: np.ndarray | None) -> pa.Table:
    """``table`` less the rows at positions ``rows`` (None: all kept)."""
    if rows is None or not len(rows):
        return table
    keep = np.ones(len(table), dtype=bool)
    keep[rows] = False
    return table.filter(pa.array(keep))


def read_embeddings(path: str | os.PathLike[str]) -> EmbeddingTable:
    """Load a whole store into memory (parts in order; each id once, see the module doc)."""
    p = Path(path)
    parts = store_parts(p)
    encoder, dim = store_meta(parts, p)
    repeats = store_repeats(p, parts)
    tables = [without_rows(pq.read_table(part), repeats.get(i)) for i, part in enumerate(parts)]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    ids, paths, latlon, authors, emb = _table_to_columns(table, dim)
    return EmbeddingTable(ids, paths, latlon, authors, emb, encoder)


def iter_embedding_batches(
    path: str | os.PathLike[str],
    batch_size: int = 65536,
    start: int = 0,
    stop: int | None = None,
    unique: bool = True,
) -> Iterator[EmbeddingTable]:
    """Stream a store as :class:`EmbeddingTable` batches of at most ``batch_size`` rows,
    reading one row group at a time (memory ~ batch_size * dim * 4 bytes).

    ``start``/``stop``: only the rows ``start <= i < stop`` of the store (in stored order,
    counting the rows that repeat an earlier id); row groups outside that range are not read.
    ``unique``: leave out the rows that repeat an earlier row's id (False: every row, for a
    caller that counts rows by their position in the store)."""
    p = Path(path)
    parts = store_parts(p)
    encoder, dim = store_meta(parts, p)
    repeats = store_repeats(p, parts) if unique else {}
    stop = math.inf if stop is None else stop
    offset = 0  # index of the row group's first row in the store
    for k, part in enumerate(parts):
        pf = pq.ParquetFile(part)
        part_start = offset
        for rg in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(rg).num_rows
            first, offset = offset, offset + rows
            if offset <= start or first >= stop:
                continue
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[rg]):
                at, first = first, first + batch.num_rows  # store index of the batch's row 0
                lo, hi = max(start - at, 0), min(batch.num_rows, stop - at)
                if hi > lo:
                    table = pa.Table.from_batches([batch.slice(lo, int(hi - lo))])
                    if k in repeats:
                        table = without_rows(table, _inside(repeats[k] + part_start - at, lo, hi))
                        if not len(table):
                            continue
                    ids, paths, latlon, authors, emb = _table_to_columns(table, dim)
                    yield EmbeddingTable(ids, paths, latlon, authors, emb, encoder)


def _inside(rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The positions ``lo <= r < hi`` of ``rows``, counted from ``lo``."""
    return rows[(rows >= lo) & (rows < hi)] - lo
