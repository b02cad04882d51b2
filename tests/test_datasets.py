"""Dataset readers on tiny faithful fixtures of each published layout."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from globeflow.data.datasets import (
    GeoRecord,
    author_split,
    detect_kind,
    exif_gps,
    iter_parquet,
    load_record_image,
    open_dataset,
)

OSV_ROWS = [
    {"id": "101", "latitude": "48.85", "longitude": "2.35", "country": "FR",
     "region": "Ile-de-France", "sub-region": "Paris", "city": "Paris"},
    {"id": "102", "latitude": "35.68", "longitude": "139.65", "country": "JP",
     "region": "Tokyo", "sub-region": "", "city": "Tokyo"},
    {"id": "103", "latitude": "", "longitude": "", "country": "", "region": "",
     "sub-region": "", "city": ""},
]  # fmt: skip


def _jpeg(path: Path, color=(120, 30, 200), exif: Image.Exif | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (8, 6), color)
    im.save(path, "JPEG", **({"exif": exif} if exif is not None else {}))
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _osv_folder(tmp_path: Path) -> Path:
    root = tmp_path / "osv5m"
    root.mkdir()
    _write_csv(root / "test.csv", OSV_ROWS)
    _jpeg(root / "images" / "test" / "00" / "101.jpg")
    _jpeg(root / "images" / "test" / "01" / "102.jpg")
    return root


def _check_osv(ds) -> None:
    recs = list(ds)
    assert ds.kind == "osv5m"
    assert [r.id for r in recs] == ["101", "102"]
    assert ds.skipped == {"no coordinates": 1}
    assert recs[0].lat == pytest.approx(48.85) and recs[0].lon == pytest.approx(2.35)
    assert recs[0].country == "FR" and recs[0].subregion == "Paris" and recs[0].city == "Paris"
    assert recs[1].subregion is None
    assert recs[0].path.endswith("00/101.jpg") and recs[1].path.endswith("01/102.jpg")
    assert load_record_image(recs[0]).size == (8, 6)


def test_osv5m_csv(tmp_path):
    root = _osv_folder(tmp_path)
    assert detect_kind(root) == "osv5m"
    _check_osv(open_dataset(root))
    _check_osv(open_dataset(root / "test.csv"))


def test_osv5m_parquet(tmp_path):
    root = _osv_folder(tmp_path)
    (root / "test.csv").unlink()
    table = pa.table(
        {
            "id": [101, 102, 103],
            "latitude": [48.85, 35.68, None],
            "longitude": [2.35, 139.65, None],
            "country": ["FR", "JP", None],
            "region": ["Ile-de-France", "Tokyo", None],
            "sub-region": ["Paris", None, None],
            "city": ["Paris", "Tokyo", None],
        }
    )
    pq.write_table(table, root / "test.parquet", row_group_size=1)
    _check_osv(open_dataset(root))


def test_parquet_row_group_streaming(tmp_path):
    n = 1000
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"id": np.arange(n), "lat": np.linspace(-80, 80, n), "lon": np.zeros(n)}),
        path,
        row_group_size=100,
    )
    assert pq.ParquetFile(path).num_row_groups == 10
    rows = list(iter_parquet(path, columns=["id", "lat"], batch_size=64))
    assert len(rows) == n and rows[-1] == {"id": n - 1, "lat": 80.0}
    ds = open_dataset(path)
    assert ds.kind == "latlon_csv"
    it = iter(ds)
    first = next(it)  # lazily streamed: nothing else is read yet
    assert first.id == "0"
    assert sum(1 for _ in it) == n - 1


@pytest.mark.parametrize(
    ("id_col", "lat_col", "lon_col"), [("IMG_ID", "LAT", "LON"), ("image", "lat", "lon")]
)
def test_im2gps_style_csv(tmp_path, id_col, lat_col, lon_col):
    rows = [
        {id_col: "a_1.jpg", lat_col: "40.7", lon_col: "-74.0", "author": "alice"},
        {id_col: "b_2.jpg", lat_col: "51.5", lon_col: "-0.12", "author": "bob"},
        {id_col: "c_3.jpg", lat_col: "nan", lon_col: "3", "author": "carol"},
    ]
    csv_path = _write_csv(tmp_path / "im2gps3k_places365.csv", rows)
    _jpeg(tmp_path / "images" / "a_1.jpg")
    ds = open_dataset(csv_path)
    recs = list(ds)
    assert ds.kind == "latlon_csv"
    assert [(r.id, r.author) for r in recs] == [("a_1.jpg", "alice"), ("b_2.jpg", "bob")]
    assert recs[0].path == str(tmp_path / "images" / "a_1.jpg")
    assert recs[1].path is None  # listed but no image on disk
    assert ds.skipped == {"coordinates not finite": 1}  # "nan" written out: a reason, counted
    assert ds.skipped.rows == [("c_3.jpg", "latitude 'nan' is not finite")]
    assert recs[0].labels() is None


def test_csv_missing_columns_error_names_file(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", [{"image": "x.jpg", "lat": "1"}])
    with pytest.raises(ValueError, match=r"bad\.csv.*longitude"):
        open_dataset(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")


def test_inat_json(tmp_path):
    doc = {
        "info": {"year": 2021},
        "images": [
            {"id": 1, "file_name": "val/01_A/a.jpg", "latitude": 37.5, "longitude": -122.1,
             "rights_holder": "x"},
            {"id": 2, "file_name": "val/01_A/b.jpg", "latitude": None, "longitude": None},
            {"id": 3, "file_name": "val/02_P/c.jpg", "latitude": -33.9, "longitude": 151.2},
        ],
        "categories": [],
        "annotations": [],
    }  # fmt: skip
    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    ds = open_dataset(path)
    recs = list(ds)
    assert ds.kind == "inat"
    assert [r.id for r in recs] == ["1", "3"]
    assert ds.skipped == {"no coordinates": 1}
    assert recs[1].path == str(tmp_path / "val/02_P/c.jpg")
    assert recs[0].author == "x"


def _gps_exif(lat: float, lon: float) -> Image.Exif:
    def dms(x: float):
        x = abs(x)
        d = int(x)
        m = int((x - d) * 60)
        return (float(d), float(m), round((x - d - m / 60) * 3600, 4))

    exif = Image.Exif()
    exif[0x8825] = {
        1: "N" if lat >= 0 else "S",
        2: dms(lat),
        3: "E" if lon >= 0 else "W",
        4: dms(lon),
    }
    return exif


def test_exif_folder(tmp_path):
    root = tmp_path / "photos"
    _jpeg(root / "paris.jpg", exif=_gps_exif(48.8566, 2.3522))
    _jpeg(root / "sub" / "rio.jpg", exif=_gps_exif(-22.9068, -43.1729))
    _jpeg(root / "nogps.jpg")
    (root / "notes.txt").write_text("not an image")
    assert exif_gps(root / "sub" / "rio.jpg") == pytest.approx((-22.9068, -43.1729), abs=1e-4)
    ds = open_dataset(root)
    recs = list(ds)
    assert ds.kind == "exif_folder"
    assert sorted(r.id for r in recs) == ["paris.jpg", "sub/rio.jpg"]
    assert ds.skipped == {"no EXIF GPS": 1}


def test_webdataset_tar(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [("k0", 10.0, 20.0), ("k1", -5.0, 100.0), ("k2", None, None)]
    for s, chunk in enumerate((samples[:2], samples[2:])):
        with tarfile.open(shards / f"shard-{s:04d}.tar", "w") as tf:
            for key, lat, lon in chunk:
                buf = io.BytesIO()
                Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, "JPEG")
                meta = json.dumps({"lat": lat, "lon": lon, "author": f"a{key}"}).encode()
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    ds = open_dataset(shards)
    recs = list(ds)
    assert ds.kind == "webdataset"
    assert [(r.id, r.lat, r.lon, r.author) for r in recs] == [
        ("k0", 10.0, 20.0, "ak0"),
        ("k1", -5.0, 100.0, "ak1"),
    ]
    assert ds.skipped == {"no coordinates": 1}
    assert load_record_image(recs[1]).size == (4, 4)
    assert list(open_dataset(shards / "shard-0000.tar")) == recs


def test_embeddings_store(tmp_path):
    from globeflow.data.embedding_store import EmbeddingWriter

    store = tmp_path / "emb.parquet"
    with EmbeddingWriter(store, "fake", 3) as writer:
        writer.add(
            ["a", "b", "c"],
            torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]),
            paths=["a.jpg", "b.jpg", "c.jpg"],
            latlon=torch.tensor([[1.0, 3.0], [2.0, 4.0], [float("nan"), float("nan")]]),
            authors=["x", "y", "z"],
        )
    assert detect_kind(store) == "embeddings"
    ds = open_dataset(store)
    recs = list(ds)
    assert [r.id for r in recs] == ["a", "b"] and ds.skipped == {"no coordinates": 1}
    assert (recs[1].lat, recs[1].lon, recs[1].author) == (2.0, 4.0, "y")
    np.testing.assert_allclose(recs[1].embedding, [0.4, 0.5, 0.6], rtol=1e-6)


def test_author_split_keeps_authors_apart():
    rng = np.random.default_rng(0)
    recs = [
        GeoRecord(id=str(i), lat=0.0, lon=0.0, author=f"au{rng.integers(0, 30)}" if i % 7 else None)
        for i in range(300)
    ]
    train, val = author_split(recs, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == 300
    assert {r.id for r in train}.isdisjoint({r.id for r in val})
    authors_train = {r.author for r in train if r.author}
    authors_val = {r.author for r in val if r.author}
    assert authors_train.isdisjoint(authors_val)
    assert 0.15 <= len(val) / 300 <= 0.35
    assert author_split(recs, 0.2, seed=0) == (train, val)  # deterministic
    assert author_split(recs, 0.2, seed=1) != (train, val)


def test_every_reader_validates_coordinates_and_says_why(tmp_path):
    """lat 200 / lon 400, 'abc', 'inf', one coordinate alone: counted by reason and listed row
    by row, in a CSV, an iNat JSON and an embedding store alike."""
    from globeflow.data.embedding_store import EmbeddingWriter

    values = [("10", "20"), ("200", "0"), ("0", "400"), ("abc", "1"), ("inf", "1"), ("5", "")]
    expected = {
        "latitude outside [-90, 90]": 1,
        "longitude outside [-180, 180]": 1,
        "coordinates not numbers": 1,
        "coordinates not finite": 1,
        "latitude without longitude": 1,
    }
    rows = [{"image": f"r{i}.jpg", "lat": a, "lon": b} for i, (a, b) in enumerate(values)]
    ds = open_dataset(_write_csv(tmp_path / "t.csv", rows))
    assert [r.id for r in ds] == ["r0.jpg"] and ds.skipped == expected
    assert ds.size == 6
    assert ds.skipped.rows[:2] == [
        ("r1.jpg", "latitude 200 outside [-90, 90]"),
        ("r2.jpg", "longitude 400 outside [-180, 180]"),
    ]
    images = [
        {"id": i, "file_name": f"{i}.jpg", "latitude": a or None, "longitude": b or None}
        for i, (a, b) in enumerate(values)
    ]
    (tmp_path / "inat.json").write_text(json.dumps({"images": images}))
    ds = open_dataset(tmp_path / "inat.json")
    assert [r.id for r in ds] == ["0"] and ds.skipped == expected and ds.size == 6

    store = tmp_path / "emb.parquet"
    latlon = torch.tensor([[10.0, 20.0], [200.0, 0.0], [0.0, 400.0], [np.nan, np.nan]])
    with EmbeddingWriter(store, "fake", 2) as writer:
        writer.add(["a", "b", "c", "d"], torch.zeros(4, 2), latlon=latlon)
    ds = open_dataset(store)
    assert [r.id for r in ds] == ["a"] and ds.size == 4
    assert ds.skipped == {
        "latitude outside [-90, 90]": 1,
        "longitude outside [-180, 180]": 1,
        "no coordinates": 1,
    }


def test_exif_folder_with_a_name_that_is_not_utf8(tmp_path):
    import os

    name = os.fsdecode(b"caf\xe9.jpg")
    _jpeg(tmp_path / name, exif=_gps_exif(48.8566, 2.3522))
    _jpeg(tmp_path / "plain.jpg")
    ds = open_dataset(tmp_path)
    recs = list(ds)
    assert [r.id for r in recs] == ["caf\\xe9.jpg"]  # the id is text; the path still opens
    assert load_record_image(recs[0]).size == (8, 6)
    assert ds.skipped.rows == [("plain.jpg", "no EXIF GPS")] and ds.size == 2
