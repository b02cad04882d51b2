"""File names as text, and listing the photos of a folder without stopping at what cannot be read.

**One rule for file names in every output** (CSV, JSON, GeoJSON, maps, the embedding store,
error lists, messages): a name is written as its UTF-8 text, and each byte that is not valid
UTF-8 (a ``café.jpg`` made on a Latin-1 system, which Python holds as a surrogate escape) is
written as ``\\xNN`` (``caf\\xe9.jpg``). The rule is a function of the name alone, so the ids an
embedding store keeps for such files are the same on every run and ``embed`` resumes past them.
(A name that already holds the four characters ``\\xe9`` reads the same; both stay usable.)

:func:`list_image_files` walks a folder with ``os.walk`` so that sub-folders that cannot be read
are reported instead of silently left out, and keeps files of other types than regular files
(named pipes, sockets, devices) that carry an image extension: loading them fails with a clear
reason (see :func:`globeflow.data.images.load_image`) instead of blocking on a pipe.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

__all__ = ["printable", "printable_path", "printable_tree", "list_image_files", "find_photos"]


def printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes) written as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that do not stand for bytes: \\udXXX
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def printable_path(path: str | bytes | os.PathLike) -> str:
    """A file name as text by the rule of this module."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return printable(name)


def printable_tree(value: Any) -> Any:
    """``value`` with every string inside dicts, lists and tuples made :func:`printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_tree(v) for v in value]
    return value


def _walk_problem(exc: OSError) -> tuple[str, str]:
    where = printable_path(exc.filename) if exc.filename is not None else "?"
    return where, f"cannot read folder ({exc.strerror or exc}); its photos are left out"


def list_image_files(
    folder: str | os.PathLike, extensions: Collection[str], recursive: bool = True
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under ``folder`` whose suffix (lower case) is in ``extensions``, sorted, and the
    (folder, reason) of each sub-folder that could not be read. Links to folders are not
    followed (as :meth:`Path.rglob`)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(
        folder, onerror=lambda exc: problems.append(_walk_problem(exc))
    ):
        base = Path(dirpath)
        files += [base / n for n in filenames if os.path.splitext(n)[1].lower() in extensions]
        if not recursive:
            dirnames.clear()
    return sorted(files), problems


def holds_photo(folder: str | os.PathLike, extensions: Collection[str]) -> bool:
    """Whether any file under ``folder`` has a suffix in ``extensions`` (stops at the first)."""
    for _, _, filenames in os.walk(folder):
        if any(os.path.splitext(n)[1].lower() in extensions for n in filenames):
            return True
    return False


def find_photos(
    inputs: Sequence[str | os.PathLike], extensions: Collection[str]
) -> tuple[list[Path], list[tuple[str, str]]]:
    """The photos of ``inputs`` (files as given, folders searched recursively for
    ``extensions``) and the (folder, reason) of each sub-folder that could not be read.
    Raises ``FileNotFoundError`` naming an input that does not exist, and ``ValueError``
    naming the inputs when they hold no photo at all."""
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found, unreadable = list_image_files(p, extensions)
            paths += found
            problems += unreadable
        elif os.path.lexists(p):
            paths.append(p)
        else:
            raise FileNotFoundError(f"{printable_path(p)}: no such file or folder")
    if not paths:
        where = ", ".join(printable_path(p) for p in inputs)
        looked = ", ".join(sorted(extensions))
        if problems:
            looked += f"; {len(problems)} folder(s) could not be read, first {problems[0][0]}"
        raise ValueError(f"no photos found in {where} (looked for {looked})")
    return paths, problems
