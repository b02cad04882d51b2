"""Tests for the embed job: folders, CSV, EXIF GPS, bad files, resume after interruption."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from _photos import make_unreadable
from PIL import Image, TiffImagePlugin

from globeflow.data.embedding_store import read_embeddings
from globeflow.data.encoders import Encoder
from globeflow.jobs.embed import collect_inputs, embed_images


class MeanColourEncoder(Encoder):
    """Tiny deterministic encoder: mean RGB over a 2x2 grid of a 16x16 resize (dim 12)."""

    name = "mean-colour"
    dim = 12

    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise KeyboardInterrupt  # what a Ctrl-C / kill looks like to the job
        return torch.nn.functional.avg_pool2d(x, 8).flatten(1)


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def _make_photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"p{i:03d}.png"
        Image.new("RGB", (20, 12), _colour(i)).save(p)
        paths.append(p)
    return paths


def test_folder_with_good_and_corrupt(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _make_photos(photos, 5)
    _make_photos(photos / "sub", 2, start=10)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (photos / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out" / "emb.parquet"
    rep = embed_images([photos], MeanColourEncoder(), out, batch_size=3, progress=False)
    assert rep.total == 8 and rep.embedded == 7 and rep.failed == 1
    assert rep.errors[0][0].endswith("broken.jpg") and "truncated" in rep.errors[0][1]
    t = read_embeddings(out)
    assert sorted(t.ids) == sorted(
        [f"p{i:03d}.png" for i in range(5)] + ["sub/p010.png", "sub/p011.png"]
    )
    row = t.ids.index("sub/p011.png")
    expected = torch.tensor(_colour(11), dtype=torch.float32) / 255.0
    assert torch.allclose(t.embeddings[row].view(3, 4).mean(1), expected, atol=1e-5)
    assert t.encoder_name == "mean-colour" and torch.isnan(t.latlon).all()
    with open(out / "_errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["path"].endswith("broken.jpg")


def test_csv_input_with_coordinates_and_images_subfolder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _make_photos(data / "images", 3)
    with open(data / "locations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["IMG_ID", "AUTHOR", "LAT", "LON"])
        w.writerow(["p000.png", "ann", "48.85", "2.35"])
        w.writerow(["p001.png", "bob", "-33.9", "151.2"])
        w.writerow(["p002.png", "", "", ""])
        w.writerow(["missing.png", "x", "1", "2"])
    out = tmp_path / "emb.parquet"
    rep = embed_images([data / "locations.csv"], MeanColourEncoder(), out, progress=False)
    assert rep.embedded == 3 and rep.failed == 1 and rep.with_location == 2
    assert "missing.png" in rep.errors[0][0] and "not found" in rep.errors[0][1]
    t = read_embeddings(out)
    got = dict(zip(t.ids, t.latlon.tolist()))
    assert got["p000.png"] == [48.85, 2.35] and got["p001.png"] == [-33.9, 151.2]
    assert np.isnan(got["p002.png"]).all()
    assert dict(zip(t.ids, t.authors)) == {"p000.png": "ann", "p001.png": "bob", "p002.png": ""}


def test_rows_already_stored_count_in_with_location(tmp_path: Path) -> None:
    """A rerun reports the coordinates of every input in the store, not only of the new rows
    (it said "0 with coordinates" when every row had them)."""
    data = tmp_path / "data"
    _make_photos(data, 3)
    rows = {"p000.png": ("48.85", "2.35"), "p001.png": ("-33.9", "151.2"), "p002.png": ("", "")}

    def listing(names: list[str]) -> Path:
        path = data / f"{len(names)}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["IMG_ID", "LAT", "LON"])
            w.writerows([name, *rows[name]] for name in names)
        return path

    out, enc = tmp_path / "emb.parquet", MeanColourEncoder()
    first = embed_images([listing(["p000.png", "p002.png"])], enc, out, progress=False)
    assert (first.embedded, first.with_location) == (2, 1)
    again = embed_images([listing(["p000.png", "p002.png"])], enc, out, progress=False)
    assert (again.embedded, again.skipped_existing, again.with_location) == (0, 2, 1)
    more = embed_images([listing(list(rows))], enc, out, progress=False)
    assert (more.embedded, more.skipped_existing, more.with_location) == (1, 2, 2)


def test_exif_gps_used_when_no_coordinates(tmp_path: Path) -> None:
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    r = TiffImagePlugin.IFDRational
    gps.update(
        {
            1: "S",
            2: (r(Fraction(22)), r(Fraction(54)), r(Fraction(30))),
            3: "W",
            4: (r(Fraction(43)), r(Fraction(12)), r(Fraction(0))),
        }
    )
    img_path = tmp_path / "rio.jpg"
    Image.new("RGB", (10, 10), (0, 90, 200)).save(img_path, exif=exif.tobytes())
    lst = tmp_path / "list.txt"
    lst.write_text("rio.jpg\n# comment\n\n")
    rep = embed_images([lst], MeanColourEncoder(), tmp_path / "e.parquet", progress=False)
    assert rep.embedded == 1 and rep.from_exif == 1
    lat, lon = read_embeddings(tmp_path / "e.parquet").latlon[0].tolist()
    assert lat == pytest.approx(-(22 + 54 / 60 + 30 / 3600)) and lon == pytest.approx(-43.2)


def test_resume_after_interruption(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _make_photos(photos, 11)
    (photos / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "emb.parquet"
    # batches of 2, parts of 2 rows; die on the 4th forward pass (after 3 batches = 6 rows)
    with pytest.raises(KeyboardInterrupt):
        embed_images(
            [photos],
            MeanColourEncoder(fail_after_calls=3),
            out,
            batch_size=2,
            chunk_size=2,
            progress=False,
        )
    first = read_embeddings(out)
    assert 0 < len(first) < 11
    assert not list(out.glob(".tmp-*"))
    enc = MeanColourEncoder()
    rep = embed_images([photos], enc, out, batch_size=2, chunk_size=2, progress=False)
    assert rep.skipped_existing == len(first)
    assert rep.embedded == 11 - len(first)
    t = read_embeddings(out)
    assert len(t.ids) == len(set(t.ids)) == 11
    assert sorted(t.ids) == [f"p{i:03d}.png" for i in range(11)]
    # a third run has nothing to do except re-reporting the bad file
    rep3 = embed_images([photos], enc, out, batch_size=2, progress=False)
    assert rep3.embedded == 0 and rep3.skipped_existing == 11 and rep3.failed == 1


def test_collect_inputs_dedup_and_missing(tmp_path: Path) -> None:
    paths = _make_photos(tmp_path / "f", 2)
    errors: list[tuple[str, str]] = []
    items = collect_inputs([paths[0], paths[0], tmp_path / "nope"], errors=errors)
    assert [i.path for i in items] == [paths[0]]
    assert errors and errors[0][1] == "input not found"
    flat = collect_inputs([tmp_path], recursive=False)
    assert flat == []


def test_two_stores_in_one_folder_keep_their_own_error_lists(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _make_photos(photos, 2)
    (photos / "bad-a.png").write_bytes(b"garbage")
    other = tmp_path / "other"
    _make_photos(other, 1)
    (other / "bad-b.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    a = embed_images([photos], MeanColourEncoder(), out / "a.parquet", progress=False)
    b = embed_images(
        [other, tmp_path / "missing"], MeanColourEncoder(), out / "b.parquet", progress=False
    )
    assert a.failed == 1 and b.failed == 2  # "input not found" counts as a failure
    lists = {}
    for name in ("a", "b"):
        with open(out / f"{name}.parquet" / "_errors.csv", newline="") as fh:
            lists[name] = sorted(Path(r["path"]).name for r in csv.DictReader(fh))
    assert lists == {"a": ["bad-a.png"], "b": ["bad-b.png", "missing"]}
    assert len(read_embeddings(out / "a.parquet")) == 2  # the error list is not a part


def test_a_kill_before_the_first_part_keeps_rows_older_than_the_save_interval(
    tmp_path: Path,
) -> None:
    """kill -9 (no cleanup runs) with the default 4,096-row parts, 4 photos per batch and a slow
    encoder (12.5 s per batch on a simulated clock): rows are committed once they have waited
    60 s, so the kill loses at most that much work."""
    photos = tmp_path / "photos"
    _make_photos(photos, 40)
    out = tmp_path / "emb.parquet"
    code = (
        "import itertools, os, signal, sys, time\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from globeflow.jobs.embed import embed_images\n"
        "from test_embed import MeanColourEncoder\n"
        "clock = itertools.count(0.0, 12.5)\n"
        "time.monotonic = lambda: next(clock)\n"
        "class Dying(MeanColourEncoder):\n"
        "    def forward_batch(self, x):\n"
        "        if self.calls == 6:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return super().forward_batch(x)\n"
        "embed_images([sys.argv[1]], Dying(), sys.argv[2], batch_size=4, progress=False)\n"
    )
    args = [sys.executable, "-c", code, str(photos), str(out), str(Path(__file__).parent)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    kept = read_embeddings(out)
    assert len(kept) == 20  # 6 batches embedded; the first 5 committed at the 60 s mark
    rep = embed_images([photos], MeanColourEncoder(), out, batch_size=4, progress=False)
    assert rep.skipped_existing == 20 and rep.embedded == 20


def test_decode_workers_give_the_store_of_inline_decoding(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _make_photos(photos, 9)
    (photos / "bad.png").write_bytes(b"garbage")
    reports = {}
    for workers in (0, 3):
        out = tmp_path / f"w{workers}.parquet"
        reports[workers] = embed_images(
            [photos], MeanColourEncoder(), out, batch_size=4, progress=False,
            decode_workers=workers,
        )  # fmt: skip
    assert reports[0].errors == reports[3].errors and reports[3].embedded == 9
    a, b = read_embeddings(tmp_path / "w0.parquet"), read_embeddings(tmp_path / "w3.parquet")
    assert a.ids == b.ids and torch.equal(a.embeddings, b.embeddings)


def test_cli_embed_auto_device_keeps_a_cpu_only_encoder_on_the_cpu(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from globeflow.apps.cli import app
    from globeflow.jobs import distributed

    # A machine with a GPU: "auto" resolves to CUDA, which the offline encoder cannot use.
    monkeypatch.setattr(distributed, "resolve_device", lambda *a: torch.device("cuda"))
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(photo)
    runner = CliRunner()
    ok = runner.invoke(app, ["embed", str(photo), "-o", str(tmp_path / "a.parquet")])
    assert ok.exit_code == 0, ok.output
    explicit = runner.invoke(
        app, ["embed", str(photo), "-o", str(tmp_path / "b.parquet"), "--device", "cuda"]
    )
    assert explicit.exit_code == 2 and "runs on the CPU only" in explicit.output
    path = runner.invoke(
        app, ["embed", str(photo), "-o", str(tmp_path / "c.parquet"), "--encoder-path", "x"]
    )
    assert path.exit_code == 2 and "takes no path option" in path.output
    assert "Traceback" not in explicit.output + path.output


def test_names_that_are_not_utf8_are_stored_escaped_and_resume(tmp_path: Path) -> None:
    """An archive holding ``caf\\xe9.jpg`` (Latin-1) embeds every photo and its reruns skip them
    all: the store's id is the escaped name, the same on every run."""
    import os

    photos = tmp_path / "photos"
    _make_photos(photos, 2)
    latin1 = photos / os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (20, 12), _colour(7)).save(latin1)
    (photos / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    store = tmp_path / "emb.parquet"
    report = embed_images([photos], MeanColourEncoder(), store, progress=False)
    assert (report.embedded, report.failed) == (3, 1)
    table = read_embeddings(store)
    assert "caf\\xe9.png" in table.ids
    assert str(photos / "caf\\xe9.png") in table.paths
    with open(report.errors_path, encoding="utf-8") as fh:
        assert "bad\\xff.png" in fh.read()
    again = embed_images([photos], MeanColourEncoder(), store, progress=False)
    assert (again.embedded, again.skipped_existing, again.failed) == (0, 3, 1)


def test_a_named_pipe_and_an_unreadable_folder_are_reported(tmp_path: Path, monkeypatch) -> None:
    """The pipe would block a reader forever; the folder is made unreadable by making its
    listing fail (tests run as root, whom permission bits do not stop)."""
    import os

    photos = tmp_path / "photos"
    _make_photos(photos, 2)
    os.mkfifo(photos / "pipe.jpg")
    locked = photos / "locked"
    _make_photos(locked, 1)
    make_unreadable(monkeypatch, str(locked))
    report = embed_images([photos], MeanColourEncoder(), tmp_path / "e.parquet", progress=False)
    assert report.embedded == 2
    reasons = dict(report.errors)
    assert reasons[str(locked)].startswith("cannot read folder (Permission denied)")
    assert reasons[str(photos / "pipe.jpg")] == "is a named pipe, not an image file"


def test_csv_coordinates_are_validated_row_by_row(tmp_path: Path) -> None:
    """Rows with unusable coordinates are reported with the reason and not embedded (a rerun
    after the CSV is fixed embeds them); rows without any take EXIF or none."""
    photos = _make_photos(tmp_path, 6)
    rows = [("40.0", "10.0"), ("200", "10"), ("10", "400"), ("abc", "1"), ("", ""), ("5", "")]
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "lat", "lon"])
        w.writerows([(p.name, lat, lon) for p, (lat, lon) in zip(photos, rows, strict=True)])
    report = embed_images([tmp_path / "list.csv"], MeanColourEncoder(), tmp_path / "e.parquet")
    assert (report.embedded, report.with_location) == (2, 1)
    assert [reason for _, reason in report.errors] == [
        "latitude 200 outside [-90, 90]",
        "longitude 400 outside [-180, 180]",
        "latitude 'abc' is not a number",
        "latitude given without longitude",
    ]
    assert report.errors[0][0].endswith("list.csv line 3 (p001.png)")
    table = read_embeddings(tmp_path / "e.parquet")
    assert table.ids == ["p000.png", "p004.png"]
    assert table.latlon[0].tolist() == [40.0, 10.0]


def test_a_latitude_column_without_a_longitude_column_is_refused(tmp_path: Path) -> None:
    _make_photos(tmp_path, 1)
    (tmp_path / "list.csv").write_text("image,latitude\np000.png,48.8\n")
    with pytest.raises(ValueError, match=r"list\.csv: a latitude column 'latitude' but no lon"):
        embed_images([tmp_path / "list.csv"], MeanColourEncoder(), tmp_path / "e.parquet")
