"""The streaming ``predict`` job: photos or an embedding store in, answers on disk as they come.

Answers go to a directory of parquet parts (:mod:`globeflow.answers.result_store`), committed
every ``chunk_size`` rows and within ``max_unsaved_seconds`` of being answered (from a
background thread, while the next batch computes), so memory stays bounded whatever the number
of photos and a kill loses the batch in progress and at most that interval of answers. One job
at a time writes a directory (:mod:`globeflow.jobs.run_lock`: a second is refused, naming the
holder). A rerun skips the ids already answered (an index of 16 bytes per stored answer; a store
input is listed as one byte per row); answers made with other settings (defaults filled in) are
refused. Photos that cannot be read are listed in ``_errors.csv`` and retried by a rerun.

Under ``torchrun`` the processes split the photos still to answer into contiguous runs of whole
batches (the batches one process would form, so that an encoder sees the same batches), each
writes its own parts, and the parts read back in name order row for row as one process writes
them. Each photo's answer comes from its own random stream (seed, photo id), so it does not
depend on its batch or rank either.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from globeflow.answers.decode import attach_truth
from globeflow.answers.result_store import ResultWriter, check_resolved
from globeflow.data.coordinates import valid_latlon_mask
from globeflow.data.embedding_store import iter_embedding_batches, store_parts, store_repeats
from globeflow.data.id_index import IdIndex
from globeflow.jobs.distributed import (
    Placement,
    join_process_group,
    leave_process_group,
    rank_slice,
)
from globeflow.jobs.embed import (
    ERRORS_NAME,
    ImageItem,
    collect_inputs,
    loaded_batches,
    write_errors,
)
from globeflow.jobs.resumable_output import open_resumable_writer
from globeflow.jobs.run_lock import run_lock

__all__ = ["LocateReport", "locate_archive", "model_fingerprint"]

OnResults = Callable[[Sequence[str], Sequence[dict]], None]


@dataclass
class LocateReport:
    """Outcome of :func:`locate_archive`; ``errors``: (path, reason) per photo not located."""

    output: Path | None
    total: int = 0
    located: int = 0
    skipped_existing: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    answers: list[dict] | None = field(default_factory=list)
    """The answers (failures included) in input order, over every process, when the run gave
    at most ``keep_answers`` of them (None: more)."""

    @property
    def photos_per_second(self) -> float:
        return self.located / self.seconds if self.seconds > 0 else 0.0

    def merged(self, others: Sequence[LocateReport]) -> LocateReport:
        """This rank's report plus the located/failed photos of the other ranks (the input
        listing and the already-answered count are the same on every rank)."""
        out = LocateReport(self.output, self.total, skipped_existing=self.skipped_existing)
        for r in (self, *others):
            out.located += r.located
            out.failed += r.failed
            out.errors += r.errors
            out.seconds = max(out.seconds, r.seconds)
            out.interrupted |= r.interrupted
            if out.answers is not None:  # ranks hold consecutive runs of the input
                out.answers = None if r.answers is None else out.answers + r.answers
        return out


def model_fingerprint(model) -> str:
    """A short hash of a model's weights (state dict, in order): a changed checkpoint behind
    the same path or hub id is another model."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def locate_archive(
    locator,
    settings: dict,
    *,
    photos: Sequence[str | Path] | None = None,
    embeddings: str | Path | None = None,
    output: str | Path | None = None,
    batch_size: int = 32,
    keep_samples: int = 0,
    jsonl: bool = False,
    chunk_size: int = 1024,
    max_unsaved_seconds: float = 30.0,
    overwrite: bool = False,
    progress: bool = True,
    decode_workers: int = 0,
    on_results: OnResults | None = None,
    place: Placement | None = None,
    keep_answers: int = 0,
) -> LocateReport:
    """Locate ``photos`` (files, folders, lists, CSVs as ``globeflow embed`` reads them) or the
    rows of the embedding store ``embeddings`` with ``locator`` (a
    :class:`~globeflow.apps.pipeline.Locator`).

    Args:
        settings: keyword arguments of ``locator.locate_embeddings`` (num_samples, guidance,
            steps, solver, precision, localizability_samples, top_k, region_radius_km, seed).
        output: answers directory (created, or resumed: ids already answered are skipped); None
            writes nothing (``on_results`` gets the answers).
        batch_size: photos per encoder and model call.
        keep_samples: samples stored per photo (0: none; they are 1024 pairs per photo).
        jsonl: also write each part as JSON Lines (the full result dicts); part of the
            settings (a folder holds JSON Lines for every part or for none).
        chunk_size, max_unsaved_seconds: commit a part every this many rows, and the answers
            within this many seconds of being answered.
        overwrite: delete the answers already in ``output`` first (else other settings there
            are refused with :class:`~globeflow.answers.result_store.SettingsMismatchError`).
        on_results: called with (ids, results) after each batch, failures included (as
            ``{"image", "ok": False, "error"}``), on every rank.
        place: this process's place in a ``torchrun`` job (default: from the environment).
        keep_answers: keep the answers in the report (``answers``, gathered from every rank in
            input order) when there are at most this many.

    Returns:
        The :class:`LocateReport` (merged over the processes). Ctrl-C ends the run early with
        what was located committed and ``interrupted`` set. ``output`` in use by another job:
        :class:`~globeflow.jobs.run_lock.RunDirectoryBusy` (a ValueError naming its holder).
    """
    own = place is None
    place = place or join_process_group("cpu")  # gloo: only barriers and small objects
    args = (locator, settings, photos, embeddings, output, batch_size, keep_samples, jsonl,
            chunk_size, max_unsaved_seconds, overwrite, progress, decode_workers, on_results,
            place, keep_answers)  # fmt: skip
    try:
        if output is None:
            return _locate_placed(*args)
        Path(output).mkdir(parents=True, exist_ok=True)
        with run_lock(Path(output), place.is_main, place.broadcast):
            return _locate_placed(*args)
    finally:
        if own:
            leave_process_group(place)


def resolved_settings(locator, settings: dict) -> dict:
    """The settings that decide the answers, every default filled in (``--num-samples 1024``
    spelled out is the default), as the locator resolves them; the model is named by its
    weights (:func:`model_fingerprint`), not by where it lies."""
    options = {k: v for k, v in settings.items() if k != "top_k"}
    resolve = getattr(locator, "answer_settings", None)
    resolved = resolve(**options) if resolve is not None else dict(options)
    resolved.pop("model", None)
    top_k = inspect.signature(type(locator).locate_embeddings).parameters.get("top_k")
    default = top_k.default if top_k is not None else None
    return {**resolved, "top_k": settings.get("top_k", default)}


def _open_writer(
    output, settings, place, overwrite, locator, **options
) -> tuple[ResultWriter, IdIndex]:
    """The answers' writer on every rank and the ids already answered
    (:func:`~globeflow.jobs.resumable_output.open_resumable_writer`: rank 0 checks the settings,
    and clears the folder on ``overwrite``, first)."""
    weights = {"model_weights": model_fingerprint(locator.model), "encoder": locator.encoder_name,
               "keep_samples": options["keep_samples"]}  # fmt: skip
    fingerprint = {**resolved_settings(locator, settings), **weights, "jsonl": options["jsonl"]}
    legacy = {**settings, **weights}  # as earlier versions recorded them
    make = functools.partial(ResultWriter, output, fingerprint, legacy=[legacy], **options)
    return open_resumable_writer(Path(output), place, overwrite, make)


@dataclass
class _Todo:
    """What this run answers: photos (``items``, ``todo`` their positions) or the rows of a
    store (``todo_rows``: one flag per store row, 1 byte each, whatever the number of rows)."""

    items: list[ImageItem]
    todo: list[int]
    todo_rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.todo) if self.todo_rows is None else int(self.todo_rows.sum())


def _listing(photos, embeddings, report: LocateReport) -> list[ImageItem]:
    """Every photo of a photo input, in order (ids unique; an input that is not found is an
    error of the report); a store input is checked here and flagged by :func:`_todo`."""
    if embeddings is not None:
        if not store_parts(embeddings):
            raise FileNotFoundError(f"{embeddings}: no embedding parts (part-*.parquet) there")
        return []
    return collect_inputs(photos or [], errors=report.errors)


def _todo(items, embeddings, done: IdIndex | None, report: LocateReport) -> _Todo:
    """Which of the input is still to answer: not in ``done``; a store row that repeats an
    earlier row's id is answered once. Sets ``report.total`` and ``skipped_existing``."""
    if embeddings is None:
        answered = np.zeros(len(items), bool)
        for start in range(0, len(items) if done is not None else 0, 65536):
            chunk = items[start : start + 65536]
            answered[start : start + len(chunk)] = done.contains([it.id for it in chunk])
        report.total = len(items) + len(report.errors)
        report.skipped_existing = int(answered.sum())
        return _Todo(items, np.flatnonzero(~answered).tolist())
    parts = store_parts(embeddings)
    repeats = store_repeats(embeddings, parts)
    flags = []
    for k, part in enumerate(parts):
        part_flags = [np.zeros(0, bool)]
        for batch in pq.ParquetFile(part).iter_batches(65536, columns=["id"]):
            ids = batch.column("id").to_pylist()
            part_flags.append(~done.contains(ids) if done is not None else np.ones(len(ids), bool))
        part_flags = np.concatenate(part_flags)
        part_flags[repeats.get(k, [])] = False
        flags.append(part_flags)
    todo_rows = np.concatenate(flags) if flags else np.zeros(0, bool)
    report.total = len(todo_rows) - sum(len(r) for r in repeats.values())
    report.skipped_existing = report.total - int(todo_rows.sum())
    return _Todo([], [], todo_rows)


def _locate_placed(
    locator, settings, photos, embeddings, output, batch_size, keep_samples, jsonl, chunk_size,
    max_unsaved_seconds, overwrite, progress, decode_workers, on_results, place, keep_answers,
) -> LocateReport:  # fmt: skip
    started = time.perf_counter()
    report = LocateReport(output=Path(output) if output is not None else None)
    items = _listing(photos, embeddings, report)
    input_errors = len(report.errors)
    writer, done = None, None
    if output is not None:
        writer, done = _open_writer(
            output, settings, place, overwrite, locator=locator, chunk_size=chunk_size,
            max_unsaved_seconds=max_unsaved_seconds, keep_samples=keep_samples, jsonl=jsonl,
        )  # fmt: skip
    listing = _todo(items, embeddings, done, report)
    share = rank_slice(math.ceil(len(listing) / batch_size), place.rank, place.world_size)
    mine = slice(share.start * batch_size, share.stop * batch_size)  # of the photos to answer
    if not place.is_main:  # every rank listed the input: its errors are reported by rank 0
        report.errors, input_errors = [], 0
    count = len(range(len(listing))[mine])
    bar = _bar(count, progress and place.is_main, locator)
    batches = _batches(locator, listing, mine, embeddings, batch_size, decode_workers, settings)
    try:
        for ids, results in batches:
            ok = [(i, r) for i, r in zip(ids, results, strict=True) if r.get("ok")]
            report.located += len(ok)
            for r in results:
                if not r.get("ok"):
                    report.failed += 1
                    report.errors.append((r["image"], r["error"]))
            if writer is not None and ok:
                if not writer.rows_written and not writer.buffered:  # this run's first answers
                    check_resolved(writer.path, ok[0][1]["settings"], record=place.is_main)
                writer.add(*zip(*ok, strict=True))
            if on_results is not None:
                on_results(ids, results)
            if report.answers is not None:
                kept = report.answers + list(results)
                report.answers = kept if len(kept) <= keep_answers else None
            if bar is not None:
                bar.update(len(ids))
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - started
    report.failed += input_errors
    if place.distributed and not report.interrupted:
        reports = place.gather(report)
        report = reports[0].merged(reports[1:])
    if report.answers is not None and len(report.answers) > keep_answers:
        report.answers = None
    if output is not None and place.is_main:
        write_errors(Path(output) / ERRORS_NAME, report.errors)
    return report


def _bar(total: int, show: bool, locator):
    if not show:
        return None
    return tqdm(total=total, unit="photo", desc=f"locating ({locator.model_name})", smoothing=0.1)


def _batches(locator, listing: _Todo, mine: slice, embeddings, batch_size, decode_workers,
             settings) -> Iterator:  # fmt: skip
    """(ids, results) per batch of this rank's photos (``mine``: of the photos to answer), in
    order."""
    if embeddings is not None:
        yield from _store_batches(locator, listing.todo_rows, mine, embeddings, batch_size,
                                  settings)  # fmt: skip
        return
    items, todo = listing.items, listing.todo[mine]
    chunks = ([items[i] for i in todo[s : s + batch_size]] for s in range(0, len(todo), batch_size))
    for loaded, emb in _encoded_ahead(locator, loaded_batches(chunks, True, decode_workers)):
        good = [x for x in loaded if x.image is not None]
        answers = iter(
            locator.locate_images(
                [(str(x.item.path), x.image) for x in good],
                exif_gps=[x.latlon for x in good],
                photo_ids=[x.item.id for x in good],
                with_density=False,
                embeddings=emb,
                **settings,
            )
        )
        results = [
            next(answers)
            if x.image is not None
            else {"image": str(x.item.path), "ok": False, "error": f"{x.item.path}: {x.error}"}
            for x in loaded
        ]
        yield [x.item.id for x in loaded], results


def _encoded_ahead(locator, batches: Iterator[list]) -> Iterator[tuple[list, torch.Tensor | None]]:
    """(loaded batch, its readable images' embeddings or None) per batch, in order, each
    batch encoded in a thread while the caller answers the one before: a narrow network's
    sampling is mostly Python work under the GIL and leaves part of the cores to the
    encoder's convolutions."""

    def done(loaded: list, encoding: Future | None) -> tuple[list, torch.Tensor | None]:
        return loaded, None if encoding is None else encoding.result()

    with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        pending: deque[tuple[list, Future | None]] = deque()
        for loaded in batches:
            images = [x.image for x in loaded if x.image is not None]
            pending.append((loaded, pool.submit(locator.encoder.embed, images) if images else None))
            if len(pending) > 1:  # one batch encoding ahead of the one answered
                yield done(*pending.popleft())
        while pending:
            yield done(*pending.popleft())


def _nth_flagged(flags: np.ndarray, n: int, chunk: int = 1 << 20) -> int:
    """The position of the ``n``-th (from 0) true flag, counted a chunk at a time."""
    seen = 0
    for start in range(0, len(flags), chunk):
        block = flags[start : start + chunk]
        count = int(np.count_nonzero(block))
        if seen + count > n:
            return start + int(np.flatnonzero(block)[n - seen])
        seen += count
    raise IndexError(f"{n} of {seen} flags")


def _store_batches(locator, todo_rows, mine: slice, embeddings, batch_size, settings) -> Iterator:
    """Batches of the flagged store rows of this rank's share, read row group by row group
    over their range only."""
    last = min(mine.stop, int(todo_rows.sum())) - 1
    if mine.start > last:
        return
    first, stop = _nth_flagged(todo_rows, mine.start), _nth_flagged(todo_rows, last) + 1
    pending: list = []  # (id, path, embedding row, truth)
    position = first
    for table in iter_embedding_batches(embeddings, 4096, first, stop, unique=False):
        if table.encoder_name != locator.encoder_name:
            raise ValueError(
                f"{embeddings}: embeddings of encoder {table.encoder_name!r}, but the model "
                f"takes {locator.encoder_name!r} ones"
            )
        usable = valid_latlon_mask(table.latlon.numpy())  # the one coordinate check
        for j in np.flatnonzero(todo_rows[position : position + len(table)]):
            truth = tuple(float(v) for v in table.latlon[j]) if usable[j] else None
            path = table.paths[j] or table.ids[j]
            pending.append((table.ids[j], path, table.embeddings[j], truth))
            if len(pending) == batch_size:
                yield _locate_rows(locator, pending, settings)
                pending = []
        position += len(table)
    if pending:
        yield _locate_rows(locator, pending, settings)


def _locate_rows(locator, rows: list, settings: dict) -> tuple[list[str], list[dict]]:
    """Answers for buffered store rows [(id, path, embedding (D,), truth or None)]."""
    ids = [r[0] for r in rows]
    emb = torch.stack([r[2] for r in rows])
    results = locator.locate_embeddings(emb, photo_ids=ids, with_density=False, **settings)
    for (_, path, _, truth), result in zip(rows, results, strict=True):
        attach_truth(result, truth)
        result.update({"image": path, "ok": True, "error": None})
    return ids, results
