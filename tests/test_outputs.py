"""Per-photo labels and map names stay unique and lead back to the input."""

from __future__ import annotations

import pytest

from globeflow.apps.outputs import (
    OutputPathError,
    check_output_paths,
    map_file_names,
    photo_labels,
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
