"""Answers of a large run on disk: a directory of parquet parts, appended to as photos are
located, optionally with a JSON Lines file per part.

One row per located photo: ``id`` (the photo's id: its path, or its id in an embedding store),
the flat columns of :data:`globeflow.answers.export.CSV_FIELDS` (best guess, place, top region,
localizability, EXIF truth and error), ``localizability_stderr_bits``, ``regions`` (the top
regions as JSON) and ``samples`` (the first ``keep_samples`` samples, (lat, lon) degrees; empty
unless asked for). Parts are committed atomically (:func:`~globeflow.data.embedding_store.
commit_part`) and named as the embedding store's (``part-SESSION-RANK-CHUNK-TOKEN.parquet``:
unique per writer), so a killed run leaves whole parts only and a rerun skips the ids already
stored (:class:`~globeflow.data.id_index.IdIndex`: 16 bytes per stored id). ``settings.json``
records the settings the answers were made with; a run with other settings is refused.

Readers de-duplicate: a directory in which an id repeats (two runs wrote it at once, before
answer folders were locked) is read with each id's first row (in part order) and a
:class:`~globeflow.data.embedding_store.RepeatedIdsWarning`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from globeflow.answers.export import CSV_FIELDS, result_to_row
from globeflow.data.embedding_store import (
    FlushDeadline,
    commit_part,
    part_name,
    replace_durably,
    start_parts,
    store_parts,
    store_repeats,
    without_rows,
    writer_token,
)
from globeflow.data.id_index import IdIndex

__all__ = [
    "SETTINGS_NAME",
    "ResultWriter",
    "RowWriter",
    "SettingsMismatchError",
    "check_resolved",
    "iter_results",
    "read_results",
    "settings_fingerprint",
]

SETTINGS_NAME = "settings.json"
_TEXT = {
    "image", "error", "city", "region", "country", "country_code", "top_region", "place_label",
    "osm_url", "map",
}  # fmt: skip


def _schema() -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False)]
    for name in CSV_FIELDS:
        kind = pa.string() if name in _TEXT else pa.bool_() if name == "ok" else pa.float64()
        fields.append(pa.field(name, kind))
    fields += [
        pa.field("localizability_stderr_bits", pa.float64()),
        pa.field("regions", pa.string()),
        pa.field("samples", pa.list_(pa.list_(pa.float32(), 2))),
    ]
    return pa.schema(fields)


SCHEMA = _schema()


def settings_fingerprint(settings: dict) -> str:
    """A short hash of the settings that decide the answers (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SettingsMismatchError(ValueError):
    """An output directory that holds answers made with other settings."""


def _row(photo_id: str, result: dict, keep_samples: int) -> dict:
    flat = result_to_row(result)
    row = {"id": photo_id}
    for name in CSV_FIELDS:
        value = flat[name]
        row[name] = None if value == "" and name not in _TEXT else value
    stderr = result.get("localizability_stderr_bits")
    row["localizability_stderr_bits"] = stderr
    row["regions"] = json.dumps(result.get("regions", []), ensure_ascii=False)
    row["samples"] = [list(s) for s in result.get("samples", [])[:keep_samples]]
    return row


def _json_line(photo_id: str, result: dict, keep_samples: int) -> str:
    kept = {k: v for k, v in result.items() if k not in ("samples", "density")}
    if keep_samples > 0:
        kept["samples"] = result.get("samples", [])[:keep_samples]
    return json.dumps({"id": photo_id, **kept}, ensure_ascii=False)


class RowWriter:
    """Append rows (dicts of ``schema``'s columns) to the directory ``path``, one part per flush.

    Rows are buffered and committed once ``chunk_size`` rows wait, once the oldest unsaved row
    has waited ``max_unsaved_seconds`` (from a background thread, even while the caller computes
    its next rows: a kill loses at most that much of the rows added), and on :meth:`close`.
    ``settings`` are recorded in (or checked against) ``settings.json``; ``legacy``: the same
    settings as earlier versions recorded them (accepted too). ``rank``/``clean_stale``: as
    :class:`~globeflow.data.embedding_store.EmbeddingWriter` (several processes of one job,
    one directory). Lines given to :meth:`add_rows` go to a JSON Lines file per part, written
    before the parquet part that commits them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: dict,
        schema: pa.Schema,
        chunk_size: int = 1024,
        max_unsaved_seconds: float = 30.0,
        rank: int | None = None,
        clean_stale: bool = True,
        legacy: Sequence[dict] = (),
    ) -> None:
        self.path = Path(path)
        self.schema = schema
        self.chunk_size = int(chunk_size)
        self.max_unsaved_seconds = float(max_unsaved_seconds)
        self.rank = rank
        check_settings(self.path, settings, legacy)
        _, self._session = start_parts(self.path, clean_stale)
        if clean_stale:  # a JSON Lines file whose parquet part was never committed
            for orphan in self.path.glob("part-*.jsonl"):
                if not orphan.with_suffix(".parquet").exists():
                    orphan.unlink(missing_ok=True)
        self._token = writer_token()
        self.fingerprint = settings_fingerprint(settings)
        self._chunk = 0
        self._rows: list[dict] = []
        self._lines: list[str] = []
        self._deadline = FlushDeadline(self.flush, self.max_unsaved_seconds)
        self.rows_written = 0

    @property
    def buffered(self) -> int:
        """Rows added and not yet committed."""
        return len(self._rows)

    def done_ids(self) -> IdIndex:
        """The ids of the rows already in committed parts (``id in index``; 16 bytes per id)."""
        return IdIndex.of_parts(store_parts(self.path))

    def add_rows(self, rows: Sequence[dict], lines: Sequence[str] = ()) -> None:
        """Buffer rows (and their JSON lines); commit a part when one is due."""
        self._deadline.check()
        with self._deadline.lock:
            self._rows += rows
            self._lines += lines
            if self._rows:
                self._deadline.arm()
            full = len(self._rows) >= self.chunk_size
            if full or self.max_unsaved_seconds <= 0 or self._deadline.overdue():
                self.flush()

    def flush(self) -> Path | None:
        """Commit the buffered rows as one new part; returns its path (None when empty)."""
        with self._deadline.lock:
            self._deadline.disarm()
            if not self._rows:
                return None
            final = self.path / part_name(self._session, self._chunk, self.rank, self._token)
            if self._lines:
                lines = final.with_suffix(".jsonl")
                tmp = lines.with_name(f".tmp-{lines.name}")
                tmp.write_text("\n".join(self._lines) + "\n", encoding="utf-8", errors="replace")
                replace_durably(tmp, lines)
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
            metadata = {b"globeflow.settings": self.fingerprint.encode()}
            commit_part(table.replace_schema_metadata(metadata), final)
            self._chunk += 1
            self.rows_written += len(self._rows)
            self._rows, self._lines = [], []
            return final

    def close(self) -> None:
        self._deadline.close()
        self._deadline.check()
        self.flush()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()  # the buffered rows are complete: keep them for resume


class ResultWriter(RowWriter):
    """:class:`RowWriter` of located results (the module's columns); ``keep_samples`` samples
    kept per photo, ``jsonl``: a JSON Lines file per part with the full result dicts."""

    def __init__(self, path, settings: dict, keep_samples: int = 0, jsonl: bool = False, **kw):
        super().__init__(path, settings, SCHEMA, **kw)
        self.keep_samples = int(keep_samples)
        self.jsonl = jsonl

    def add(self, photo_ids: Sequence[str], results: Sequence[dict]) -> None:
        """Buffer the results of located photos (``ok`` results; ids in the same order)."""
        pairs = list(zip(photo_ids, results, strict=True))
        rows = [_row(i, r, self.keep_samples) for i, r in pairs]
        lines = [_json_line(i, r, self.keep_samples) for i, r in pairs] if self.jsonl else ()
        self.add_rows(rows, lines)


def check_settings(path: Path, settings: dict, legacy: Sequence[dict] = ()) -> None:
    """Record ``settings`` in ``path/settings.json``, or check that the answers already there
    were made with the same ones (:class:`SettingsMismatchError` naming what differs).
    ``legacy``: the same settings as an earlier version recorded them (also accepted)."""
    manifest = path / SETTINGS_NAME
    if manifest.exists():
        stored = json.loads(manifest.read_text(encoding="utf-8"))
        candidates = [settings, *legacy]
        if stored.get("fingerprint") in {settings_fingerprint(c) for c in candidates}:
            return
        old = stored.get("settings", {})
        now = max(candidates, key=lambda c: len(set(c) & set(old)))  # the record's own form
        raise SettingsMismatchError(
            f"{path}: holds answers made with other settings ({_differences(old, now)}); give "
            "another output folder, or --overwrite to replace them"
        )
    if store_parts(path):
        raise SettingsMismatchError(f"{path}: holds parts but no {SETTINGS_NAME}; not ours?")
    path.mkdir(parents=True, exist_ok=True)
    _write_manifest(manifest, {"fingerprint": settings_fingerprint(settings), "settings": settings})


def _differences(old: dict, now: dict) -> str:
    """The first three keys whose values differ, as "key OLD there, NEW now"."""
    diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} there, {now.get(k)!r} now" for k in diff[:3])


def _write_manifest(manifest: Path, record: dict) -> None:
    tmp = manifest.with_name(f".tmp-{manifest.name}")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    replace_durably(tmp, manifest)


def check_resolved(path: Path, resolved: dict, record: bool) -> None:
    """Check the settings an answer reports (defaults filled in: ``result["settings"]``)
    against those recorded in ``path/settings.json`` by the first answers there, and record
    them when none are (``record``: one process of a job). Catches a version with other
    defaults resuming the answers of an older one (the options alone look the same)."""
    manifest = path / SETTINGS_NAME
    stored = json.loads(manifest.read_text(encoding="utf-8"))
    before = stored.get("resolved")
    if before is None:
        if record:
            _write_manifest(manifest, {**stored, "resolved": resolved})
        return
    before = json.loads(json.dumps(before))
    now = json.loads(json.dumps(resolved, default=str))
    if before != now:
        raise SettingsMismatchError(
            f"{path}: holds answers made with other settings ({_differences(before, now)}); "
            "give another output folder, or --overwrite to replace them"
        )


def remove_results(path: Path) -> None:
    """Delete the answers in ``path`` (parts, JSON Lines, settings, error list): --overwrite."""
    for part in store_parts(path):
        part.unlink()
    for name in [*path.glob("part-*.jsonl"), path / SETTINGS_NAME, path / "_errors.csv"]:
        Path(name).unlink(missing_ok=True)


def iter_results(path: str | os.PathLike[str], batch_size: int = 4096) -> Iterator[pa.Table]:
    """The stored rows in the order they were written (each id once), a table of at most
    ``batch_size`` rows at a time (memory bounded whatever the number of rows)."""
    parts = store_parts(path)
    repeats = store_repeats(path, parts)
    for k, part in enumerate(parts):
        first = 0
        for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_size):
            table = pa.Table.from_batches([batch])
            if k in repeats:
                rows = repeats[k][(repeats[k] >= first) & (repeats[k] < first + len(table))]
                table = without_rows(table, rows - first)
            first += batch.num_rows
            if len(table):
                yield table


def read_results(
    path: str | os.PathLike[str], sort_by_id: bool = False, schema: pa.Schema = SCHEMA
) -> pa.Table:
    """All stored rows as one table, each id once (``schema``: the writer's; for an empty
    folder); ``sort_by_id``: in id order, which is the same for a resumed, a sharded and an
    uninterrupted run."""
    parts = store_parts(path)
    repeats = store_repeats(path, parts)
    tables = [without_rows(pq.read_table(p), repeats.get(k)) for k, p in enumerate(parts)]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.replace_schema_metadata(None)
    return table.sort_by("id") if sort_by_id else table


def row_result(row: dict) -> dict:
    """A stored row back as a result dict (the fields the terminal table shows)."""

    def number(name: str) -> float | None:
        value = row.get(name)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    place = {k: row[k] or "" for k in ("city", "region", "country", "country_code")}
    exif = None if number("exif_lat") is None else {"lat": row["exif_lat"], "lon": row["exif_lon"]}
    return {
        "image": row["image"],
        "ok": row["ok"],
        "error": row["error"] or None,
        "best_guess": {"lat": row["lat"], "lon": row["lon"], "place": place},
        "regions": json.loads(row["regions"] or "[]"),
        "localizability_bits": number("localizability_bits"),
        "localizability_vs_uniform_bits": number("localizability_vs_uniform_bits"),
        "localizability_stderr_bits": number("localizability_stderr_bits"),
        "effective_area_km2": number("effective_area_km2"),
        "samples": row.get("samples") or [],
        "exif_gps": exif,
        "error_km": number("error_km"),
    }
