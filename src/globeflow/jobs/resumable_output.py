"""Opening a folder of result parts that a job writes and a rerun resumes (``predict --out``,
``evaluate``'s rows), the same way on every rank of a ``torchrun`` job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from globeflow.answers.result_store import RowWriter, remove_results
from globeflow.data.id_index import IdIndex
from globeflow.jobs.distributed import Placement, on_main_first

Writer = TypeVar("Writer", bound=RowWriter)


def open_resumable_writer(
    folder: Path, place: Placement, overwrite: bool, make_writer: Callable[..., Writer]
) -> tuple[Writer, IdIndex]:
    """The writer of ``folder`` on every rank, and the ids of the rows already committed there.

    ``make_writer(rank=..., clean_stale=...)`` opens the writer (which records or checks the
    settings). Rank 0 goes first: it clears the folder on ``overwrite``, removes the parts a
    killed run left half-written, and its refusal (other settings) is raised on every rank; the
    ranks wait for each other before any writes a new part.
    """

    def make(main: bool) -> Writer:
        if main and overwrite and folder.is_dir():
            remove_results(folder)
        return make_writer(rank=place.rank if place.distributed else None, clean_stale=main)

    writer = on_main_first(place, make)
    done = writer.done_ids()
    place.barrier()  # every rank has listed the stored parts before any writes a new one
    return writer, done
