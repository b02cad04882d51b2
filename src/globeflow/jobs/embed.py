"""The ``embed`` job: photos -> embeddings + coordinates in a parquet embedding store.

Inputs may be image files, folders (recursive), text files listing one path per line, or CSV
files with an image column (``image``/``path``/``filename``/``IMG_ID``, any case) and optional
``lat``/``lon`` (also ``latitude``/``longitude``, any case) and ``author`` columns. Missing
coordinates are read from EXIF GPS. Already stored ids are skipped (resume). Unreadable files
are counted and listed in ``errors.csv`` beside the output; they never stop the job.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from globeflow.data.embedding_store import EmbeddingWriter
from globeflow.data.encoders import Encoder
from globeflow.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image, read_exif_gps

__all__ = ["EmbedReport", "ImageItem", "collect_inputs", "embed_images"]

_IMAGE_COLS = ("image", "path", "filename", "file", "img_id", "image_path")
_LAT_COLS = ("lat", "latitude")
_LON_COLS = ("lon", "lng", "long", "longitude")
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
    from_exif: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def _find_col(header: Sequence[str], names: Sequence[str]) -> str | None:
    lower = {h.strip().lower(): h for h in header}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def _float_or_nan(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _read_csv(csv_path: Path, errors: list[tuple[str, str]]) -> list[ImageItem]:
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        img_col = _find_col(header, _IMAGE_COLS)
        if img_col is None:
            errors.append((str(csv_path), f"CSV has no image column (one of {_IMAGE_COLS})"))
            return []
        lat_col, lon_col = _find_col(header, _LAT_COLS), _find_col(header, _LON_COLS)
        author_col = _find_col(header, _AUTHOR_COLS)
        base, images_dir = csv_path.parent, csv_path.parent / "images"
        items = []
        for row in reader:
            name = (row.get(img_col) or "").strip()
            if not name:
                continue
            p = Path(name)
            if not p.is_absolute():
                p = base / name
                if not p.exists() and (images_dir / name).exists():
                    p = images_dir / name
            latlon = None
            if lat_col and lon_col:
                lat, lon = _float_or_nan(row.get(lat_col)), _float_or_nan(row.get(lon_col))
                if math.isfinite(lat) and math.isfinite(lon):
                    latlon = (lat, lon)
            author = (row.get(author_col) or "").strip() if author_col else ""
            items.append(ImageItem(id=name, path=p, latlon=latlon, author=author))
        return items


def _scan_folder(folder: Path, recursive: bool) -> list[ImageItem]:
    it = folder.rglob("*") if recursive else folder.glob("*")
    files = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [ImageItem(id=p.relative_to(folder).as_posix(), path=p) for p in files]


def collect_inputs(
    inputs: Iterable[str | os.PathLike[str]],
    recursive: bool = True,
    errors: list[tuple[str, str]] | None = None,
) -> list[ImageItem]:
    """Expand inputs into unique :class:`ImageItem`s (first occurrence of an id wins).

    Ids: path relative to the folder for folder inputs, the CSV's own image value for CSV
    rows, and the path as given for files and list entries.
    """
    errors = errors if errors is not None else []
    items: list[ImageItem] = []
    for raw in inputs:
        p = Path(raw)
        suffix = p.suffix.lower()
        if p.is_dir():
            items += _scan_folder(p, recursive)
        elif not p.exists():
            errors.append((str(p), "input not found"))
        elif suffix == ".csv":
            items += _read_csv(p, errors)
        elif suffix in (".txt", ".lst", ".list"):
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    q = q if q.is_absolute() else p.parent / q
                    items.append(ImageItem(id=line, path=q))
        else:
            items.append(ImageItem(id=str(raw), path=p))
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.id not in seen:
            seen.add(item.id)
            unique.append(item)
    return unique


def _write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows(errors)
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
) -> EmbedReport:
    """Embed every photo in ``inputs`` with ``encoder`` into the store ``output``.

    Args:
        inputs: image files, folders, text lists of paths, or CSV files (see module doc).
        encoder: a frozen :class:`~globeflow.data.encoders.Encoder`; its ``name``/``dim`` are
            stored.
        output: ``NAME.parquet`` directory; created or resumed (existing ids are skipped).
        batch_size: images per encoder forward pass.
        progress: show a tqdm progress bar.
        recursive: descend into sub-folders of folder inputs.
        chunk_size: rows per parquet part; a part is committed atomically, so an interrupted
            run loses at most the current chunk.
        exif_gps: read coordinates from EXIF when the input gives none.

    Returns:
        :class:`EmbedReport`; its ``errors`` are also written to ``errors.csv`` beside
        ``output``. lat/lon of photos without any known location are stored as NaN.
    """
    out = Path(output)
    report = EmbedReport(output=out)
    t0 = time.perf_counter()
    items = collect_inputs(inputs, recursive=recursive, errors=report.errors)
    report.total = len(items)
    writer = EmbeddingWriter(out, encoder.name, encoder.dim, chunk_size=chunk_size)
    done = writer.done_ids()
    todo = [it for it in items if it.id not in done]
    report.skipped_existing = len(items) - len(todo)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=f"embed ({encoder.name})")
        except ImportError:  # pragma: no cover - tqdm is a core dependency
            bar = None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            good, images, coords = [], [], []
            for it in batch:
                try:
                    img = load_image(it.path)
                except ImageLoadError as exc:
                    report.errors.append((str(it.path), exc.reason))
                    report.failed += 1
                    continue
                latlon = it.latlon
                if latlon is None and exif_gps:
                    latlon = read_exif_gps(it.path)
                    report.from_exif += latlon is not None
                good.append(it)
                images.append(img)
                coords.append(latlon)
            if images:
                try:
                    emb = encoder.embed(images, batch_size=len(images))
                except Exception as exc:  # noqa: BLE001 - report the batch, keep going
                    for it in good:
                        report.errors.append((str(it.path), f"encoder failed: {exc}"))
                    report.failed += len(good)
                else:
                    writer.add(
                        [it.id for it in good],
                        emb,
                        paths=[str(it.path) for it in good],
                        latlon=coords,
                        authors=[it.author for it in good],
                    )
                    report.embedded += len(good)
                    report.with_location += sum(c is not None for c in coords)
            if bar is not None:
                bar.update(len(batch))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - t0
        _write_errors(out.parent / "errors.csv", report.errors)
    return report
