"""Per-photo labels and map names stay unique and lead back to the input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from globeflow.apps.outputs import (
    OutputPathError,
    check_output_paths,
    map_file_names,
    photo_labels,
    with_map_names,
)


def test_labels_are_paths_below_the_shared_folder(tmp_path):
    paths = [
        tmp_path / "x" / "a" / "p.jpg",
        tmp_path / "x" / "b" / "p.jpg",
        tmp_path / "x" / "p.png",
    ]
    assert photo_labels(paths) == ["a/p.jpg", "b/p.jpg", "p.png"]
    assert photo_labels([tmp_path / "only.jpg"]) == ["only.jpg"]
    assert photo_labels([]) == []


def test_repeated_inputs_are_numbered():
    assert photo_labels(["d/p.jpg", "d/p.jpg", "d/q.jpg", "d/p.jpg"]) == [
        "p.jpg",
        "p.jpg (2)",
        "q.jpg",
        "p.jpg (3)",
    ]


def test_map_names_are_unique_even_ignoring_case():
    labels = ["a/p.jpg", "a__p.jpg", "A.jpg", "a.jpg", "we:ird?.jpg"]
    names = map_file_names(labels)
    assert names == [
        "a__p.jpg.png",
        "a__p.jpg-2.png",
        "A.jpg.png",
        "a.jpg-2.png",
        "we_ird_.jpg.png",
    ]
    assert len({n.lower() for n in names}) == len(names)


def test_output_checks_accept_new_paths_and_refuse_clashes(tmp_path):
    check_output_paths(
        {"--json": tmp_path / "new" / "deeper" / "r.json"}, {"--map": tmp_path / "m"}
    )
    with pytest.raises(OutputPathError, match="--json and --map both write to"):
        check_output_paths({"--json": tmp_path / "same"}, {"--map": tmp_path / "same"})


def test_an_output_may_not_be_an_input_nor_inside_a_store_read(tmp_path):
    from globeflow.data.embedding_store import EmbeddingWriter

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    link = tmp_path / "link.jpg"
    link.symlink_to(photo)
    for out in (photo, link, tmp_path / "." / "photo.jpg"):
        with pytest.raises(OutputPathError, match="is also an input"):
            check_output_paths({"--json": out}, reads=[photo])
    store = tmp_path / "s.parquet"
    with EmbeddingWriter(store, "fake", 2) as writer:
        writer.add(["a"], torch.zeros(1, 2))
    with pytest.raises(OutputPathError, match="inside the embedding store"):
        check_output_paths(folders={"-o": store / "sub" / "report"}, reads=[store])
    photos = tmp_path / "photos"
    photos.mkdir()
    check_output_paths({"--json": photos / "r.json"}, reads=[photos])  # a folder of photos: fine


def test_with_map_names_says_which_map_belongs_to_which_photo():
    results = [{"image": "a/p.jpg", "ok": True}, {"image": "x.jpg", "ok": False}]
    named = with_map_names(results, ["a__p.jpg.png", "x.jpg.png"])
    assert named == [{"image": "a/p.jpg", "ok": True, "map": "a__p.jpg.png"}, results[1]]
    assert "map" not in results[0]  # the caller's results are left as they were


def test_labels_of_names_that_are_not_utf8_are_escaped(tmp_path):
    import os

    labels = photo_labels([tmp_path / os.fsdecode(b"caf\xe9.jpg"), tmp_path / "b.jpg"])
    assert labels == ["caf\\xe9.jpg", "b.jpg"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_folder_that_takes_no_new_file_is_refused_even_for_root():
    with pytest.raises(OutputPathError, match="--map /proc: cannot create files in /proc"):
        check_output_paths(folders={"--map": Path("/proc")})
    with pytest.raises(OutputPathError, match="cannot create files in /proc"):
        check_output_paths({"--json": Path("/proc/new-folder/r.json")})
