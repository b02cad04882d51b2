"""The ``embed`` job: photos -> embeddings + coordinates in a parquet embedding store.

Inputs may be image files, folders (recursive), text files listing one path per line, or CSV
files with an image column (``image``/``path``/``filename``/``IMG_ID``, any case) and optional
``lat``/``lon`` (also ``latitude``/``longitude``, any case) and ``author`` columns. Missing
coordinates are read from EXIF GPS. Already stored ids are skipped (resume); rows are committed
every ``chunk_size`` rows and within ``max_unsaved_seconds`` of being embedded, so a kill loses
little. One job at a time writes a store (:mod:`globeflow.jobs.run_lock`: a second is refused,
naming the holder). Unreadable files are counted and listed in ``_errors.csv`` inside the store;
they never stop the job.

Under ``torchrun`` the processes split the remaining photos into contiguous runs of whole
batches (the same batches one process would form), each writes its own parts, and rank 0 writes
the merged error list: the store then reads back row for row as one process would write it.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from globeflow.core.guidance import check_precision
from globeflow.data.coordinates import CoordinateError, parse_latlon
from globeflow.data.datasets import coordinate_columns, pick_column
from globeflow.data.embedding_store import EmbeddingWriter, located_ids
from globeflow.data.encoders import Encoder
from globeflow.data.file_names import list_image_files, printable_path
from globeflow.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image, read_exif_gps
from globeflow.jobs.distributed import (
    Placement,
    autocast,
    join_process_group,
    leave_process_group,
    rank_slice,
)
from globeflow.jobs.run_lock import run_lock

__all__ = ["ERRORS_NAME", "EmbedReport", "ImageItem", "collect_inputs", "embed_images"]

ERRORS_NAME = "_errors.csv"
"""The error list, inside the store (``_``: parquet dataset readers skip it)."""

_IMAGE_COLS = ("image", "path", "filename", "file", "img_id", "image_path")
_AUTHOR_COLS = ("author", "user", "owner")


@dataclass
class ImageItem:
    """One photo to embed: stable ``id``, file ``path``, optional known (lat, lon) degrees."""

    id: str
    path: Path
    latlon: tuple[float, float] | None = None
    author: str = ""


@dataclass
class EmbedReport:
    """Outcome of :func:`embed_images`. ``errors``: (path, reason) per file that failed."""

    output: Path
    total: int = 0
    embedded: int = 0
    skipped_existing: int = 0
    failed: int = 0
    with_location: int = 0
    """Inputs stored with coordinates: embedded now or already in the store."""
    from_exif: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    input_errors: int = 0
    """How many of ``errors`` (the first ones) come from listing the inputs."""

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors_path(self) -> Path:
        return self.output / ERRORS_NAME

    def merged(self, others: Sequence[EmbedReport]) -> EmbedReport:
        """This rank's report plus the photo work of the other ranks' reports (the input
        listing, its errors and the already-stored count are the same on every rank)."""
        out = EmbedReport(self.output, self.total, skipped_existing=self.skipped_existing)
        out.input_errors = out.failed = self.input_errors
        out.errors = list(self.errors[: self.input_errors])
        for r in (self, *others):
            out.embedded += r.embedded
            out.failed += r.failed - r.input_errors
            out.with_location += r.with_location
            out.from_exif += r.from_exif
            out.seconds = max(out.seconds, r.seconds)
            out.errors += r.errors[r.input_errors :]
        return out


def _read_csv(csv_path: Path, errors: list[tuple[str, str]]) -> list[ImageItem]:
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        img_col = pick_column(header, _IMAGE_COLS)
        if img_col is None:
            errors.append((str(csv_path), f"CSV has no image column (one of {_IMAGE_COLS})"))
            return []
        lat_col, lon_col = coordinate_columns(header, csv_path)
        author_col = pick_column(header, _AUTHOR_COLS)
        base, images_dir = csv_path.parent, csv_path.parent / "images"
        items = []
        for line, row in enumerate(reader, 2):
            name = (row.get(img_col) or "").strip()
            if not name:
                continue
            p = Path(name)
            if not p.is_absolute():
                p = base / name
                if not p.exists() and (images_dir / name).exists():
                    p = images_dir / name
            try:
                latlon = parse_latlon(row.get(lat_col), row.get(lon_col)) if lat_col else None
            except CoordinateError as exc:  # not embedded: a rerun after the fix picks it up
                errors.append((f"{printable_path(csv_path)} line {line} ({name})", str(exc)))
                continue
            author = (row.get(author_col) or "").strip() if author_col else ""
            items.append(ImageItem(id=name, path=p, latlon=latlon, author=author))
        return items


def _scan_folder(folder: Path, recursive: bool, errors: list[tuple[str, str]]) -> list[ImageItem]:
    files, problems = list_image_files(folder, IMAGE_EXTENSIONS, recursive)
    errors += problems
    return [ImageItem(id=printable_path(p.relative_to(folder).as_posix()), path=p) for p in files]


def collect_inputs(
    inputs: Iterable[str | os.PathLike[str]],
    recursive: bool = True,
    errors: list[tuple[str, str]] | None = None,
) -> list[ImageItem]:
    """Expand inputs into unique :class:`ImageItem`s (first occurrence of an id wins).

    Ids: path relative to the folder for folder inputs, the CSV's own image value for CSV
    rows, and the path as given for files and list entries; file names that are not UTF-8 are
    escaped (:mod:`globeflow.data.file_names`), the same way on every run. Sub-folders that
    cannot be read and CSV rows with unusable coordinates go to ``errors``.
    """
    errors = errors if errors is not None else []
    items: list[ImageItem] = []
    for raw in inputs:
        p = Path(raw)
        suffix = p.suffix.lower()
        if p.is_dir():
            items += _scan_folder(p, recursive, errors)
        elif not p.exists():
            errors.append((printable_path(p), "input not found"))
        elif suffix == ".csv":
            items += _read_csv(p, errors)
        elif suffix in (".txt", ".lst", ".list"):
            # undecodable bytes stay file names that open (surrogate escapes)
            for line in p.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    q = q if q.is_absolute() else p.parent / q
                    items.append(ImageItem(id=printable_path(line), path=q))
        else:
            items.append(ImageItem(id=printable_path(raw), path=p))
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.id not in seen:
            seen.add(item.id)
            unique.append(item)
    return unique


def write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows((printable_path(where), printable_path(why)) for where, why in errors)
    os.replace(tmp, path)


def embed_images(
    inputs: Sequence[str | os.PathLike[str]],
    encoder: Encoder,
    output: str | os.PathLike[str],
    batch_size: int = 32,
    progress: bool = True,
    recursive: bool = True,
    chunk_size: int = 4096,
    exif_gps: bool = True,
    max_unsaved_seconds: float = 60.0,
    precision: str = "fp32",
    place: Placement | None = None,
    dtype: str | None = None,
    decode_workers: int = 0,
) -> EmbedReport:
    """Embed every photo in ``inputs`` with ``encoder`` into the store ``output``.

    Args:
        inputs: image files, folders, text lists of paths, or CSV files (see module doc).
        encoder: a frozen :class:`~globeflow.data.encoders.Encoder`; its ``name``/``dim`` are
            stored.
        output: ``NAME.parquet`` directory; created or resumed (existing ids are skipped).
        batch_size: images per encoder forward pass.
        progress: show a tqdm progress bar (rank 0).
        recursive: descend into sub-folders of folder inputs.
        chunk_size: rows per parquet part.
        exif_gps: read coordinates from EXIF when the input gives none.
        max_unsaved_seconds: commit buffered rows once the oldest has waited this long, so an
            interrupted run loses at most this much work (or ``chunk_size`` rows).
        precision: "fp32", or "bf16" autocast for the encoder's forward pass.
        place: this process's place in a ``torchrun`` job (default: read from the
            environment; one process without it).
        dtype: "float32" or "float16" (half the size on disk and in streaming buffers) for the
            stored embeddings (default: the store's own, else float32).
        decode_workers: threads that decode photos ahead of the encoder (0: inline). A GPU
            encoder outruns one decoding thread (see docs/scaling.md).

    Returns:
        :class:`EmbedReport` (merged over the processes, complete on rank 0); its ``errors``
        are also written to ``_errors.csv`` inside ``output``. lat/lon of photos without any
        known location are stored as NaN. ``output`` in use by another job:
        :class:`~globeflow.jobs.run_lock.RunDirectoryBusy` (a ValueError naming its holder).
    """
    check_precision(precision)  # a clear error for an unknown precision, before any file
    own = place is None
    place = place or join_process_group("cpu")  # gloo: only barriers and small objects
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
        with run_lock(Path(output), place.is_main, place.broadcast):
            return _embed_placed(
                inputs, encoder, Path(output), batch_size, progress, recursive, chunk_size,
                exif_gps, max_unsaved_seconds, precision, place, dtype, decode_workers,
            )  # fmt: skip
    finally:
        if own:
            leave_process_group(place)


def _embed_placed(
    inputs, encoder, out, batch_size, progress, recursive, chunk_size, exif_gps,
    max_unsaved_seconds, precision, place, dtype, decode_workers,
) -> EmbedReport:  # fmt: skip
    """:func:`embed_images` on this process of the job."""
    report = EmbedReport(output=out)
    t0 = time.perf_counter()
    items = collect_inputs(inputs, recursive=recursive, errors=report.errors)
    report.total = len(items)
    report.failed = report.input_errors = len(report.errors)
    writer = EmbeddingWriter(
        out,
        encoder.name,
        encoder.dim,
        chunk_size=chunk_size,
        max_unsaved_seconds=max_unsaved_seconds,
        rank=place.rank if place.distributed else None,
        clean_stale=place.is_main,
        dtype=dtype,
    )
    done = writer.done_ids()
    place.barrier()  # every process has listed the stored parts before any writes a new one
    stored = done.contains([it.id for it in items]) if len(done) else np.zeros(len(items), bool)
    todo = [it for it, have in zip(items, stored, strict=True) if not have]
    report.skipped_existing = len(items) - len(todo)
    if report.skipped_existing and place.is_main:  # once: the ranks' reports are summed
        already = [it.id for it, have in zip(items, stored, strict=True) if have]
        report.with_location = int(located_ids(out).contains(already).sum())
    share = rank_slice(math.ceil(len(todo) / batch_size), place.rank, place.world_size)
    mine = todo[share.start * batch_size : share.stop * batch_size]

    bar = None
    if progress and place.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="img", desc=f"embed ({encoder.name})")
    device = getattr(encoder, "device", torch.device("cpu"))
    finished = False
    batches = (mine[i : i + batch_size] for i in range(0, len(mine), batch_size))
    try:
        for loaded in loaded_batches(batches, exif_gps, decode_workers):
            with autocast(torch.device(device), precision):
                _embed_batch(loaded, encoder, writer, report)
            if bar is not None:
                bar.update(len(loaded))
        finished = True
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - t0
        if not finished and place.is_main:  # interrupted: keep what this process knows
            write_errors(report.errors_path, report.errors)
    if place.distributed:
        reports = place.gather(report)
        report = reports[0].merged(reports[1:])
    if place.is_main:
        write_errors(report.errors_path, report.errors)
    return report


@dataclass
class _Loaded:
    """One photo after loading: the image (None when unreadable), its coordinates, the reason
    it failed, and whether the coordinates came from EXIF."""

    item: ImageItem
    image: object | None
    latlon: tuple[float, float] | None
    error: str | None
    from_exif: bool


def _load_one(item: ImageItem, exif_gps: bool) -> _Loaded:
    try:
        img = load_image(item.path)
    except ImageLoadError as exc:
        return _Loaded(item, None, None, exc.reason, False)
    latlon, from_exif = item.latlon, False
    if latlon is None and exif_gps:
        latlon = read_exif_gps(item.path)
        from_exif = latlon is not None
    return _Loaded(item, img, latlon, None, from_exif)


def loaded_batches(
    batches: Iterable[list[ImageItem]], exif_gps: bool, workers: int
) -> Iterator[list[_Loaded]]:
    """Each batch's photos loaded, in order: inline, or decoded by ``workers`` threads up to two
    batches ahead of the encoder (PIL releases the GIL while it decodes)."""
    if workers <= 0:
        for batch in batches:
            yield [_load_one(it, exif_gps) for it in batch]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[list[Future]] = deque()
        for batch in batches:
            pending.append([pool.submit(_load_one, it, exif_gps) for it in batch])
            if len(pending) > 2:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


def _embed_batch(
    loaded: list[_Loaded], encoder: Encoder, writer: EmbeddingWriter, report: EmbedReport
) -> None:
    """Embed and buffer one loaded batch; unreadable photos and encoder failures are reported."""
    good = [x for x in loaded if x.image is not None]
    for x in loaded:
        if x.image is None:
            report.errors.append((printable_path(x.item.path), x.error))
            report.failed += 1
    report.from_exif += sum(x.from_exif for x in good)
    if not good:
        return
    try:
        emb = encoder.embed([x.image for x in good], batch_size=len(good))
    except Exception as exc:  # noqa: BLE001 - report the batch, keep going
        for x in good:
            report.errors.append((printable_path(x.item.path), f"encoder failed: {exc}"))
        report.failed += len(good)
        return
    writer.add(
        [x.item.id for x in good],
        emb,
        paths=[printable_path(x.item.path) for x in good],
        latlon=[x.latlon for x in good],
        authors=[x.item.author for x in good],
    )
    report.embedded += len(good)
    report.with_location += sum(x.latlon is not None for x in good)
