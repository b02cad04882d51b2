"""File names that are not UTF-8 as text (one rule), and photo listings that report what they
cannot read instead of leaving it out silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _photos import make_unreadable

from globeflow.data.file_names import (
    find_photos,
    list_image_files,
    printable,
    printable_path,
    printable_tree,
)
from globeflow.data.images import IMAGE_EXTENSIONS

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # a name made on a Latin-1 system, as Python holds it


def test_undecodable_bytes_are_written_as_backslash_x():
    assert printable(LATIN1) == "caf\\xe9.jpg"
    assert printable_path(Path("a") / LATIN1) == "a/caf\\xe9.jpg"
    assert printable_path(b"caf\xe9.jpg") == "caf\\xe9.jpg"
    assert printable("café.jpg") == "café.jpg"  # valid UTF-8 stays as it is
    assert printable("\ud800") == "\\ud800"  # a lone surrogate that stands for no byte
    assert printable_tree({"image": LATIN1, "n": [1, (LATIN1,)]}) == {
        "image": "caf\\xe9.jpg",
        "n": [1, ["caf\\xe9.jpg"]],
    }
    printable_tree([LATIN1, "x"])[0].encode("utf-8")  # writable as UTF-8


def _tree(root: Path) -> None:
    (root / "sub" / "locked").mkdir(parents=True)
    for name in ("b.jpg", "sub/a.PNG", "sub/locked/c.jpg", "notes.txt"):
        (root / name).write_bytes(b"x")


def test_a_folder_that_cannot_be_read_is_reported(tmp_path, monkeypatch):
    """Tests run as root, where permission bits do not stop reads: the folder's listing is
    made to fail as it does for a user without read permission (os.walk's scandir)."""
    _tree(tmp_path)
    locked = str(tmp_path / "sub" / "locked")
    make_unreadable(monkeypatch, locked)
    files, problems = list_image_files(tmp_path, IMAGE_EXTENSIONS)
    assert files == [tmp_path / "b.jpg", tmp_path / "sub" / "a.PNG"]
    assert problems == [(locked, "cannot read folder (Permission denied); its photos are left out")]
    paths, problems = find_photos([tmp_path], IMAGE_EXTENSIONS)
    assert len(paths) == 2 and problems[0][0] == locked


def test_files_that_are_not_regular_are_listed_for_the_loader_to_refuse(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "top.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.jpg").write_bytes(b"x")
    assert list_image_files(tmp_path, IMAGE_EXTENSIONS, recursive=False)[0] == [
        tmp_path / "pipe.jpg",
        tmp_path / "top.jpg",
    ]


def test_find_photos_names_what_is_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg: no such file or folder"):
        find_photos([tmp_path / "nowhere.jpg"], IMAGE_EXTENSIONS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no photos found in .*empty \(looked for .*\.jpg"):
        find_photos([tmp_path / "empty"], IMAGE_EXTENSIONS)
