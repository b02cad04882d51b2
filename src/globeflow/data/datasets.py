"""Readers for geolocation benchmarks in their published layouts, as streams of :class:`GeoRecord`.

Supported layouts (``open_dataset`` picks one from the files it finds):

- ``osv5m``: OpenStreetView-5M metadata, CSV or parquet with ``id, latitude, longitude`` and
  optional ``country, region, sub-region, city``; images at ``images/**/<id>.jpg``.
- ``latlon_csv``: YFCC4k / im2gps3k / MP-16 style CSV, image column ``IMG_ID`` / ``image`` (or
  ``id``, ``image_id``, ``file_name``, ``filename``, ``path``) and ``LAT``/``LON`` or
  ``lat``/``lon`` (any case, or ``latitude``/``longitude``); optional ``author``.
- ``inat``: iNat21 COCO-style JSON (``images`` with ``id, file_name, latitude, longitude``).
- ``exif_folder``: a folder of photos carrying EXIF GPS tags.
- ``webdataset``: ``*.tar`` shards with ``<key>.jpg`` + ``<key>.json`` (``lat``/``lon``).
- ``embeddings``: files written by ``globeflow embed`` (parquet with an ``embedding`` column).

Everything streams: CSVs row by row, parquet by record batch, tars member by member, so
datasets larger than memory can be iterated. Coordinates are degrees (lat, lon).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from globeflow.data.coordinates import NO_COORDINATES, CoordinateError, parse_latlon
from globeflow.data.file_names import list_image_files, printable_path
from globeflow.data.images import load_image, load_image_bytes, read_exif_gps

__all__ = [
    "GeoRecord",
    "Dataset",
    "IMAGE_EXTENSIONS",
    "open_dataset",
    "read_osv5m",
    "read_latlon_csv",
    "read_inat",
    "read_exif_folder",
    "read_webdataset",
    "read_embeddings",
    "iter_parquet",
    "author_split",
    "exif_gps",
    "load_record_image",
    "detect_kind",
    "LAT_COLUMNS",
    "LON_COLUMNS",
    "pick_column",
    "coordinate_columns",
    "Skipped",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".heic", ".heif")


@dataclass(frozen=True)
class GeoRecord:
    """One geotagged example.

    ``path`` is the image file (``"shard.tar::key.jpg"`` for WebDataset members, whose bytes are
    in ``image_bytes``); ``embedding`` is set for precomputed-embedding datasets.
    """

    id: str
    lat: float
    lon: float
    path: str | None = None
    country: str | None = None
    region: str | None = None
    subregion: str | None = None
    city: str | None = None
    author: str | None = None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    image_bytes: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def latlon(self) -> tuple[float, float]:
        """(lat, lon) degrees."""
        return (self.lat, self.lon)

    def labels(self) -> dict[str, str] | None:
        """The dataset's own administrative labels (country / region / subregion / city), or
        None when it has none."""
        d = {
            "country": self.country or "",
            "region": self.region or "",
            "subregion": self.subregion or "",
            "city": self.city or "",
        }
        return d if any(d.values()) else None


class Skipped(dict):
    """Records left out, counted by reason (``{"no coordinates": 3}``); ``rows`` holds the
    first :attr:`MAX_ROWS` of them as (record id or file, reason in detail)."""

    MAX_ROWS = 1000

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []


class Dataset:
    """A re-iterable stream of :class:`GeoRecord`.

    ``skipped`` counts records left out during the latest iteration, by reason (for example
    ``"no coordinates"``, ``"latitude outside [-90, 90]"``), and lists the first of them row by
    row (:class:`Skipped`); it is complete once iteration has finished. ``size`` is the number
    of entries (rows, images, photos) the source holds, records and skipped ones together, when
    known without reading it through (None for tar shards).
    """

    def __init__(
        self,
        kind: str,
        path: Path,
        factory: Callable[[Skipped], Iterator[GeoRecord]],
        size: Callable[[], int | None] | None = None,
    ) -> None:
        self.kind = kind
        self.path = path
        self._factory = factory
        self._size = size
        self.skipped: Skipped = Skipped()

    def __iter__(self) -> Iterator[GeoRecord]:
        self.skipped = Skipped()
        return self._factory(self.skipped)

    @property
    def size(self) -> int | None:
        return self._size() if self._size is not None else None

    def __repr__(self) -> str:
        return f"Dataset(kind={self.kind!r}, path={str(self.path)!r})"


def _skip(counter: dict[str, int], reason: str, row: str | None = None, detail: str = "") -> None:
    counter[reason] = counter.get(reason, 0) + 1
    rows = getattr(counter, "rows", None)
    if row is not None and rows is not None and len(rows) < Skipped.MAX_ROWS:
        rows.append((printable_path(row), detail or reason))


def _coordinates(
    lat: Any, lon: Any, skipped: dict[str, int], row: str
) -> tuple[float, float] | None:
    """(lat, lon) of a record, or None after counting it in ``skipped`` with the reason."""
    try:
        got = parse_latlon(lat, lon)
    except CoordinateError as exc:
        _skip(skipped, exc.kind, row, str(exc))
        return None
    if got is None:
        _skip(skipped, NO_COORDINATES, row)
    return got


def _str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip()
    return s or None


# ---- column detection ----------------------------------------------------------------------

_ID_COLUMNS = ("img_id", "image", "id", "image_id", "file_name", "filename", "path", "key")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")


def pick_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` (lower case) among ``columns``, matched ignoring case and
    surrounding spaces, spelled as in ``columns``; None when none is there."""
    lower = {c.strip().lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def coordinate_columns(
    columns: Sequence[str], source: str | os.PathLike
) -> tuple[str, str] | tuple[None, None]:
    """The (latitude, longitude) columns of a table, or (None, None) when it has neither;
    a ``ValueError`` naming ``source`` when it has one without the other."""
    lat_col, lon_col = pick_column(columns, LAT_COLUMNS), pick_column(columns, LON_COLUMNS)
    if (lat_col is None) != (lon_col is None):
        have, lack = (
            (f"a latitude column {lat_col!r}", "longitude column (lon, lng, long, longitude)")
            if lon_col is None
            else (f"a longitude column {lon_col!r}", "latitude column (lat, latitude)")
        )
        raise ValueError(
            f"{printable_path(source)}: {have} but no {lack}; give both, or neither "
            "(coordinates from EXIF)"
        )
    return lat_col, lon_col  # type: ignore[return-value]


def _require(columns: Sequence[str], source: Path) -> tuple[str, str, str]:
    id_col = pick_column(columns, _ID_COLUMNS)
    lat_col = pick_column(columns, LAT_COLUMNS)
    lon_col = pick_column(columns, LON_COLUMNS)
    missing = [
        name
        for name, col in (
            ("an image id column (IMG_ID, image, id, ...)", id_col),
            ("a latitude column (LAT, lat, latitude)", lat_col),
            ("a longitude column (LON, lon, longitude)", lon_col),
        )
        if col is None
    ]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}; columns are {list(columns)}")
    return id_col, lat_col, lon_col  # type: ignore[return-value]


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def iter_parquet(
    path: str | Path, columns: Sequence[str] | None = None, batch_size: int = 65536
) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file as dicts, one record batch (within row groups) in memory at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
        cols = batch.to_pydict()
        names = list(cols)
        for values in zip(*(cols[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


def _iter_table(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".parquet":
        yield from iter_parquet(path)
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _table_rows(path: Path) -> int:
    """Rows of a metadata table (parquet: from its footer; CSV: one pass, no parsing of
    values)."""
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _columns(path: Path) -> list[str]:
    return _parquet_columns(path) if path.suffix.lower() == ".parquet" else _csv_header(path)


# ---- image lookup --------------------------------------------------------------------------


class _ImageIndex:
    """Finds ``<id>.<ext>`` anywhere under a folder (OSV-5M shards images in subfolders)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._by_stem: dict[str, str] | None = None

    def find(self, image_id: str) -> str | None:
        if self.root is None or not self.root.is_dir():
            return None
        direct = self.root / image_id
        if direct.suffix.lower() in IMAGE_EXTENSIONS and direct.is_file():
            return str(direct)
        for ext in (".jpg", ".jpeg", ".png"):
            cand = self.root / f"{image_id}{ext}"
            if cand.is_file():
                return str(cand)
        if self._by_stem is None:
            self._by_stem = {}
            for dirpath, _, files in os.walk(self.root):
                for name in files:
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in IMAGE_EXTENSIONS:
                        self._by_stem.setdefault(stem, os.path.join(dirpath, name))
                        self._by_stem.setdefault(name, os.path.join(dirpath, name))
        key = os.path.basename(image_id)
        return self._by_stem.get(key) or self._by_stem.get(os.path.splitext(key)[0])


def _default_image_root(meta: Path) -> Path | None:
    for cand in (meta.parent / "images", meta.parent):
        if cand.is_dir():
            return cand
    return None


# ---- readers -------------------------------------------------------------------------------


def read_osv5m(path: str | Path, images_dir: str | Path | None = None) -> Dataset:
    """OSV-5M metadata (``train.csv`` / ``test.csv`` or parquet) with images under ``images/``.

    Args:
        path: the metadata file, or the dataset folder holding it.
        images_dir: image folder (default: ``images/`` next to the metadata).
    """
    meta = _find_metadata(Path(path), ("test", "train"))
    cols = _columns(meta)
    missing = [c for c in ("id", "latitude", "longitude") if pick_column(cols, (c,)) is None]
    if missing:
        raise ValueError(f"{meta}: OSV-5M metadata needs columns {missing}; found {cols}")
    index = _ImageIndex(Path(images_dir) if images_dir else _default_image_root(meta))
    names = {
        k: pick_column(cols, (k,)) for k in ("id", "latitude", "longitude", "country", "region")
    }
    names["subregion"] = pick_column(cols, ("sub-region", "sub_region", "subregion"))
    names["city"] = pick_column(cols, ("city",))
    names["author"] = pick_column(cols, ("author", "sequence", "creator_username", "user"))

    def gen(skipped: dict[str, int]) -> Iterator[GeoRecord]:
        for row in _iter_table(meta):
            rid = str(row[names["id"]])
            latlon = _coordinates(row[names["latitude"]], row[names["longitude"]], skipped, rid)
            if latlon is None:
                continue
            yield GeoRecord(
                id=rid,
                lat=latlon[0],
                lon=latlon[1],
                path=index.find(rid),
                country=_str(row.get(names["country"])) if names["country"] else None,
                region=_str(row.get(names["region"])) if names["region"] else None,
                subregion=_str(row.get(names["subregion"])) if names["subregion"] else None,
                city=_str(row.get(names["city"])) if names["city"] else None,
                author=_str(row.get(names["author"])) if names["author"] else None,
            )

    return Dataset("osv5m", meta, gen, lambda: _table_rows(meta))


def read_latlon_csv(path: str | Path, images_dir: str | Path | None = None) -> Dataset:
    """YFCC4k / im2gps3k / MP-16 style CSV (also any CSV or parquet with id, lat, lon columns).

    Args:
        path: the CSV (or parquet) file.
        images_dir: folder the image ids are relative to (default: ``images/`` next to the file,
            else the file's folder).
    """
    meta = Path(path)
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: no such file")
    cols = _columns(meta)
    id_col, lat_col, lon_col = _require(cols, meta)
    author_col = pick_column(cols, ("author", "user", "owner", "user_id", "author_id"))
    label_cols = {
        "country": pick_column(cols, ("country",)),
        "region": pick_column(cols, ("region",)),
        "subregion": pick_column(cols, ("sub-region", "subregion", "sub_region")),
        "city": pick_column(cols, ("city",)),
    }
    index = _ImageIndex(Path(images_dir) if images_dir else _default_image_root(meta))

    def gen(skipped: dict[str, int]) -> Iterator[GeoRecord]:
        for row in _iter_table(meta):
            rid = str(row[id_col])
            latlon = _coordinates(row[lat_col], row[lon_col], skipped, rid)
            if latlon is None:
                continue
            labels = {k: (_str(row.get(c)) if c else None) for k, c in label_cols.items()}
            yield GeoRecord(
                id=rid,
                lat=latlon[0],
                lon=latlon[1],
                path=index.find(rid),
                author=_str(row.get(author_col)) if author_col else None,
                **labels,
            )

    return Dataset("latlon_csv", meta, gen, lambda: _table_rows(meta))


def read_inat(path: str | Path, images_dir: str | Path | None = None) -> Dataset:
    """iNat21 COCO-style JSON; images without coordinates are skipped and counted.

    Args:
        path: the JSON file (e.g. ``val.json``).
        images_dir: root the ``file_name`` entries are relative to (default: the JSON's folder).
    """
    meta = Path(path)
    with open(meta, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{meta}: not a COCO-style iNat file (no 'images' list)")
    root = Path(images_dir) if images_dir else meta.parent
    images = doc["images"]

    def gen(skipped: dict[str, int]) -> Iterator[GeoRecord]:
        for entry in images:
            name = entry.get("file_name")
            rid = str(entry.get("id", name))
            latlon = _coordinates(entry.get("latitude"), entry.get("longitude"), skipped, rid)
            if latlon is None:
                continue
            yield GeoRecord(
                id=rid,
                lat=latlon[0],
                lon=latlon[1],
                path=str(root / name) if name else None,
                author=_str(entry.get("rights_holder")),
            )

    return Dataset("inat", meta, gen, lambda: len(images))


def _rational(x: Any) -> float:
    if isinstance(x, tuple) and len(x) == 2:
        return float(x[0]) / float(x[1]) if float(x[1]) else math.nan
    return float(x)


def exif_gps(image_path: str | Path) -> tuple[float, float] | None:
    """(lat, lon) degrees from a photo's EXIF GPS tags, or None when absent or unreadable."""
    return read_exif_gps(image_path)  # in range, or None


def read_exif_folder(path: str | Path) -> Dataset:
    """Photos under a folder (recursively), located by their EXIF GPS; others skipped, counted."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")

    def gen(skipped: dict[str, int]) -> Iterator[GeoRecord]:
        files, problems = list_image_files(root, IMAGE_EXTENSIONS)
        for where, why in problems:
            _skip(skipped, "folder not readable", where, why)
        for p in files:
            rid = printable_path(p.relative_to(root))
            got = exif_gps(p)
            if got is None:
                _skip(skipped, "no EXIF GPS", rid)
                continue
            yield GeoRecord(id=rid, lat=got[0], lon=got[1], path=str(p))

    return Dataset(
        "exif_folder", root, gen, lambda: len(list_image_files(root, IMAGE_EXTENSIONS)[0])
    )


def _tar_shards(path: Path) -> list[Path]:
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ValueError(f"{path}: no *.tar shards")
        return shards
    return [path]


def read_webdataset(path: str | Path) -> Dataset:
    """WebDataset shards (a ``.tar`` or a folder of them): ``<key>.jpg`` + ``<key>.json``.

    Members are read sequentially (tar streaming mode), so shards can be arbitrarily large; the
    JSON holds ``lat``/``lon`` (or ``latitude``/``longitude``) and optional labels/author.
    """
    root = Path(path)
    shards = _tar_shards(root)

    def flush(key: str, group: dict[str, Any], shard: Path, skipped: dict[str, int]):
        meta = group.get("json")
        image_name = next((n for n in group if "." + n in IMAGE_EXTENSIONS), None)
        if meta is None or image_name is None:
            _skip(skipped, "incomplete sample")
            return None
        rid = str(meta.get("id", key))
        lat, lon = meta.get("lat", meta.get("latitude")), meta.get("lon", meta.get("longitude"))
        latlon = _coordinates(lat, lon, skipped, rid)
        if latlon is None:
            return None
        return GeoRecord(
            id=rid,
            lat=latlon[0],
            lon=latlon[1],
            path=f"{shard}::{key}.{image_name}",
            country=_str(meta.get("country")),
            region=_str(meta.get("region")),
            subregion=_str(meta.get("sub-region", meta.get("subregion"))),
            city=_str(meta.get("city")),
            author=_str(meta.get("author")),
            image_bytes=group[image_name],
        )

    def gen(skipped: dict[str, int]) -> Iterator[GeoRecord]:
        for shard in shards:
            with tarfile.open(shard, mode="r|*") as tf:
                key, group = None, {}
                for member in tf:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    prefix = os.path.dirname(member.name)
                    stem, _, ext = base.partition(".")
                    this_key = f"{prefix}/{stem}" if prefix else stem
                    if this_key != key and key is not None:
                        rec = flush(key, group, shard, skipped)
                        if rec is not None:
                            yield rec
                        group = {}
                    key = this_key
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                    ext = ext.lower()
                    if ext == "json":
                        try:
                            group["json"] = json.loads(data)
                        except json.JSONDecodeError:
                            group["json"] = {}
                    else:
                        group[ext] = data
                if key is not None:
                    rec = flush(key, group, shard, skipped)
                    if rec is not None:
                        yield rec

    return Dataset("webdataset", root, gen)


def _embedding_column(cols: Sequence[str]) -> str | None:
    return pick_column(cols, ("embedding", "embeddings", "emb"))


def read_embeddings(path: str | Path, batch_size: int = 65536) -> Dataset:
    """Precomputed embeddings from ``globeflow embed`` (an embedding store), streamed by row
    groups so that stores larger than memory can be evaluated."""
    from globeflow.data.embedding_store import iter_embedding_batches

    root = Path(path)

    def gen(skipped: dict[str, int]) -> Iterator[GeoRecord]:
        for batch in iter_embedding_batches(root, batch_size):
            latlon = batch.latlon.numpy()
            embs = batch.embeddings.numpy()
            for i, rid in enumerate(batch.ids):
                got = _coordinates(float(latlon[i, 0]), float(latlon[i, 1]), skipped, str(rid))
                if got is None:
                    continue
                yield GeoRecord(
                    id=str(rid),
                    lat=got[0],
                    lon=got[1],
                    path=batch.paths[i] or None,
                    author=_str(batch.authors[i]),
                    embedding=embs[i],
                )

    def size() -> int:
        from globeflow.data.embedding_store import store_parts

        return sum(_parquet_rows(part) for part in store_parts(root))

    return Dataset("embeddings", root, gen, size)


# ---- auto-detection ------------------------------------------------------------------------

_READERS: dict[str, Callable[..., Dataset]] = {
    "osv5m": read_osv5m,
    "latlon_csv": read_latlon_csv,
    "yfcc4k": read_latlon_csv,
    "im2gps3k": read_latlon_csv,
    "mp16": read_latlon_csv,
    "csv": read_latlon_csv,
    "inat": read_inat,
    "inat21": read_inat,
    "exif_folder": read_exif_folder,
    "folder": read_exif_folder,
    "webdataset": read_webdataset,
    "embeddings": read_embeddings,
}


def _find_metadata(path: Path, preferred_stems: Sequence[str] = ()) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    tables = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".parquet"))
    if not tables:
        raise FileNotFoundError(f"{path}: no metadata file (*.csv or *.parquet) in this folder")
    for stem in preferred_stems:
        for t in tables:
            if t.stem.lower() == stem:
                return t
    return tables[0]


def _kind_of_table(path: Path) -> str:
    cols = _columns(path)
    lower = {c.strip().lower() for c in cols}
    if path.suffix.lower() == ".parquet" and _embedding_column(cols):
        return "embeddings"
    if {"id", "latitude", "longitude"} <= lower:
        return "osv5m"
    _require(cols, path)  # raises a clear error naming what is missing
    return "latlon_csv"


def detect_kind(path: str | Path) -> str:
    """Name of the reader ``open_dataset`` would use for ``path``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".tar":
            return "webdataset"
        if suffix == ".json":
            return "inat"
        if suffix in (".csv", ".parquet"):
            return _kind_of_table(p)
        raise ValueError(f"{p}: unknown dataset file type {suffix!r} (.csv, .parquet, .json, .tar)")
    if any(p.glob("*.tar")):
        return "webdataset"
    parquet_parts = sorted(p.glob("*.parquet"))
    if parquet_parts and _embedding_column(_parquet_columns(parquet_parts[0])):
        return "embeddings"
    tables = sorted(q for q in p.iterdir() if q.suffix.lower() in (".csv", ".parquet"))
    if tables:
        return _kind_of_table(_find_metadata(p, ("test", "train", "locations")))
    jsons = sorted(p.glob("*.json"))
    if jsons:
        return "inat"
    if any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.rglob("*")):
        return "exif_folder"
    raise ValueError(
        f"{p}: cannot tell the dataset layout: no *.tar shards, metadata table (*.csv/*.parquet), "
        "COCO JSON or images found"
    )


def open_dataset(path: str | Path, kind: str | None = None, **kwargs: Any) -> Dataset:
    """Open a dataset, picking the reader from its layout unless ``kind`` names one.

    Kinds: osv5m, latlon_csv (aliases yfcc4k, im2gps3k, mp16, csv), inat (inat21), exif_folder
    (folder), webdataset, embeddings. Extra keyword arguments go to the reader (e.g.
    ``images_dir``).
    """
    p = Path(path)
    kind = (kind or detect_kind(p)).lower()
    if kind not in _READERS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {sorted(_READERS)}")
    if kind in ("latlon_csv", "yfcc4k", "im2gps3k", "mp16", "csv") and p.is_dir():
        p = _find_metadata(p, ("test", "locations", "train"))
    if kind in ("inat", "inat21") and p.is_dir():
        jsons = sorted(p.glob("*.json"))
        if not jsons:
            raise FileNotFoundError(f"{p}: no COCO JSON file in this folder")
        p = jsons[0]
    return _READERS[kind](p, **kwargs)


# ---- splits --------------------------------------------------------------------------------


def author_split(
    records: Iterable[GeoRecord], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[GeoRecord], list[GeoRecord]]:
    """Split records into (train, val) so that no author has photos on both sides.

    Authors are shuffled with ``seed`` and moved to validation until it holds at least
    ``val_fraction`` of the records. Records without an author form their own group each.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    groups: dict[str, list[GeoRecord]] = {}
    for r in records:
        key = f"author:{r.author}" if r.author else f"record:{r.id}"
        groups.setdefault(key, []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    total = sum(len(g) for g in groups.values())
    target = val_fraction * total
    val_keys: set[str] = set()
    n_val = 0
    for k in keys:
        if n_val >= target:
            break
        val_keys.add(k)
        n_val += len(groups[k])
    train = [r for k in sorted(groups) if k not in val_keys for r in groups[k]]
    val = [r for k in sorted(groups) if k in val_keys for r in groups[k]]
    return train, val


def load_record_image(record: GeoRecord) -> Any:
    """The record's photo as an RGB PIL image (raises ``ImageLoadError`` naming the file)."""
    if record.image_bytes is not None:
        return load_image_bytes(record.image_bytes, record.path or record.id)
    if record.path is None:
        raise FileNotFoundError(f"record {record.id}: no image file found")
    return load_image(record.path)
