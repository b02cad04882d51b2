"""Where the command line writes: output paths checked before any work, one name per photo.

An output is refused before any work when its folder cannot take new files (tried, not only
asked of the permission bits: root may write anywhere by them, but not into /proc), when it is
one of the inputs (``predict photo.jpg --json photo.jpg`` would replace the photo), or when it
lies inside an embedding store that is read.

Photo labels are paths relative to the folder all inputs share (``a/photo.jpg``), so that rows of
the table and map files of same-named photos in different folders stay apart and lead back to
their input.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from globeflow.data.embedding_store import store_parts
from globeflow.data.file_names import printable_path

__all__ = [
    "OutputPathError",
    "check_output_paths",
    "photo_labels",
    "map_file_names",
    "with_map_names",
]


class OutputPathError(ValueError):
    """An output path that cannot be written as asked (the message names option and path)."""


def _existing_ancestor(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path(path.absolute().anchor)


def _check_creatable(path: Path, option: str) -> None:
    """The folders above ``path`` exist or can be created, and the nearest one is writable."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: {ancestor} is not writable")
    _try_creating_in(ancestor, path, option)


def _try_creating_in(folder: Path, path: Path, option: str) -> None:
    """Create and remove a file in ``folder``: the permission bits do not tell for root, nor
    for /proc, /sys or a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".globeflow-probe-")
    except OSError as exc:
        raise OutputPathError(
            f"{option} {path}: cannot create files in {folder} ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _check_file(path: Path, option: str) -> None:
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: the file is not writable")
    _check_creatable(path, option)


def _check_folder(path: Path, option: str) -> None:
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path}: is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: the folder is not writable")
        _try_creating_in(path, path, option)
        return
    _check_creatable(path, option)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _Inputs:
    """What is read, indexed once (a folder of 100,000 photos is 100,000 inputs): resolved
    paths, file identities (hard links, bind mounts) and the embedding stores among them."""

    def __init__(self, reads: Sequence[str | os.PathLike]) -> None:
        paths = [Path(p) for p in reads]
        self.resolved = {p.resolve() for p in paths}
        self.identities = {i for i in map(_identity, paths) if i is not None}
        self.stores = {p.resolve(): p for p in paths if p.is_dir() and store_parts(p)}

    def check(self, path: Path, option: str) -> None:
        """``path`` is no input and lies in no embedding store that is read."""
        resolved = path.resolve()
        identity = _identity(path)
        if resolved in self.resolved or (identity is not None and identity in self.identities):
            raise OutputPathError(
                f"{option} {printable_path(path)}: is also an input; writing it would replace "
                "what is read"
            )
        store = next((self.stores[p] for p in resolved.parents if p in self.stores), None)
        if store is not None:
            raise OutputPathError(
                f"{option} {printable_path(path)}: inside the embedding store "
                f"{printable_path(store)} that is read; write elsewhere"
            )


def check_output_paths(
    files: Mapping[str, Path | None] | None = None,
    folders: Mapping[str, Path | None] | None = None,
    reads: Sequence[str | os.PathLike] = (),
) -> None:
    """Raise :class:`OutputPathError` unless every given output can be written.

    ``files`` and ``folders`` map an option name (``"--json"``) to its path (``None``: not
    asked for). Two options may not name the same path, nor one of ``reads`` (the inputs:
    files, folders, embedding stores), nor a path inside an embedding store among ``reads``.
    """
    seen: dict[Path, str] = {}
    inputs = _Inputs(reads)
    for kind, paths in (("file", files or {}), ("folder", folders or {})):
        for option, path in paths.items():
            if path is None:
                continue
            inputs.check(path, option)
            (_check_file if kind == "file" else _check_folder)(path, option)
            key = path.absolute()
            if key in seen:
                raise OutputPathError(f"{seen[key]} and {option} both write to {path}")
            seen[key] = option


def photo_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One unique label per photo: its path relative to the folder all photos share, with
    ``" (2)"``, ``" (3)"`` ... after repeats of the same path."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    if not absolute:
        return []
    try:
        root = Path(os.path.commonpath([p.parent for p in absolute]))
    except ValueError:  # no shared folder (different drives): keep the full paths
        root = None
    labels, counts = [], {}
    for p in absolute:  # names that are not UTF-8: \xNN (globeflow.data.file_names)
        label = printable_path((p.relative_to(root) if root else p).as_posix())
        counts[label] = counts.get(label, 0) + 1
        labels.append(label if counts[label] == 1 else f"{label} ({counts[label]})")
    return labels


_UNSAFE = re.compile(r"[^\w.\- ()]")


def map_file_names(labels: Sequence[str]) -> list[str]:
    """A PNG file name per label (``a/photo.jpg`` -> ``a__photo.jpg.png``), unique even on
    case-insensitive file systems."""
    names, taken = [], set()
    for label in labels:
        stem = _UNSAFE.sub("_", label.replace("/", "__"))
        name, n = f"{stem}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.lower())
        names.append(name)
    return names


def with_map_names(results: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """The results, each located one with ``"map"``: its map file's name in the map folder
    (same-named photos in different folders get different files)."""
    return [
        {**r, "map": name} if r.get("ok") else r for r, name in zip(results, names, strict=True)
    ]
