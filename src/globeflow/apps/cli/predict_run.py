"""What ``globeflow predict`` does once its options are checked: run the streaming locate job
(:mod:`globeflow.jobs.locate`) and report to the terminal.

Memory stays bounded whatever the number of photos: answers go to ``--out`` as they come, and
the terminal keeps only the first :data:`TABLE_PHOTOS` answers, for the per-photo table of a
small run. ``--json``/``--csv``/``--geojson``/``--map`` hold every answer with its samples in
memory and are refused above :data:`~globeflow.apps.cli._common.SMALL_RUN_PHOTOS` photos
(before any work); ``--out`` is the archive's output.
"""

from __future__ import annotations

from pathlib import Path

import typer

import globeflow.apps.cli._common as common
from globeflow.apps.cli._common import fail, fail_no_photos, is_main_process
from globeflow.apps.cli.predict_output import show_answers

TABLE_PHOTOS = 50
"""Runs of at most this many photos print a table of the answers; larger ones a summary."""
LISTED_ERRORS = 20
"""Unreadable photos listed on the terminal (all of them are in ``--out``'s _errors.csv)."""


def _count_inputs(photos, embeddings) -> int:
    """How many photos the input holds (a store: from its parts' footers)."""
    # Imported here: pyarrow and the job modules (torch) load only when predict runs.
    import pyarrow.parquet as pq

    from globeflow.data.embedding_store import store_parts
    from globeflow.jobs.embed import collect_inputs

    if embeddings is not None:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in store_parts(embeddings))
    return len(collect_inputs(photos))


def check_small_run(asked: list[str], photos, embeddings) -> None:
    """Refuse the in-memory outputs (``asked``: their option names) for a large input."""
    limit = common.SMALL_RUN_PHOTOS  # looked up when called: tests lower it
    if asked and (n := _count_inputs(photos, embeddings)) > limit:
        fail(
            f"{asked[0]} holds every answer in memory: at most {limit} photos, "
            f"here {n}; use --out DIR (parquet parts, resumable) for larger runs"
        )


def run_predict(
    locator,
    settings: dict,
    *,
    photos,
    embeddings,
    out: Path | None,
    jsonl: bool,
    keep_samples: int,
    overwrite: bool,
    small_outputs: dict,
    map_dir: Path | None,
    batch_size: int,
    save_every_s: float,
    decode_workers: int,
    progress: bool,
) -> None:
    """Locate, stream to ``out``, print the table or a summary; exits as ``predict`` says."""
    # Imported here: the locate job and torch load only when predict runs (instant --help).
    from globeflow.core.families import NonFiniteOutputError
    from globeflow.jobs.locate import locate_archive

    asked = [name for name, path in {**small_outputs, "--map": map_dir}.items() if path]
    # The answers of every process (torchrun) come back to rank 0, for the table or outputs.
    keep = common.SMALL_RUN_PHOTOS if asked else TABLE_PHOTOS
    try:
        report = locate_archive(
            locator, settings, photos=photos, embeddings=embeddings, output=out,
            batch_size=batch_size, keep_samples=keep_samples, jsonl=jsonl,
            max_unsaved_seconds=save_every_s, overwrite=overwrite, progress=progress,
            decode_workers=decode_workers, keep_answers=keep,
        )  # fmt: skip
    except NonFiniteOutputError as exc:
        fail(f"{locator.model_name}: {exc}", code=1)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if report.interrupted:
        where = f"; {out} holds the answers so far: rerun the same command to resume" if out else ""
        typer.secho(f"interrupted after {report.located} photos{where}", err=True, fg="yellow")
        raise typer.Exit(130)
    if not is_main_process():
        return
    if report.total == 0 and photos:
        fail_no_photos(photos)
    _report(locator, report, report.answers or [], small_outputs, map_dir, progress)


def _report(locator, report, kept, small_outputs, map_dir, progress) -> None:
    """The table (small runs) or a summary, the small outputs, the unreadable photos."""
    # Imported here: apps.outputs imports torch (instant --help).
    from globeflow.apps.outputs import photo_labels

    labels = photo_labels([r["image"] for r in kept])
    title = f"globeflow ({locator.model_name}, {locator.encoder_name})"
    radius = kept[0].get("settings", {}).get("region_radius_km") if kept else None
    kept = show_answers(title, kept, labels, radius, small_outputs, map_dir, progress)
    if report.errors:
        typer.echo(f"{report.failed} of {report.total} photos could not be read:", err=True)
    for path, reason in report.errors[:LISTED_ERRORS]:
        typer.echo(f"  {reason if path in reason else f'{path}: {reason}'}", err=True)
    if len(report.errors) > LISTED_ERRORS:
        listed = f" (all in {report.output / '_errors.csv'})" if report.output else ""
        typer.echo(f"  ... {len(report.errors) - LISTED_ERRORS} more{listed}", err=True)
    if report.output is not None or not kept:
        typer.echo(
            f"located {report.located} photos ({report.photos_per_second:.2f}/s), "
            f"{report.skipped_existing} already answered, {report.failed} could not be read"
            + (f" -> {report.output}" if report.output else "; not saved (give --out DIR)")
        )
    if report.located + report.skipped_existing == 0:
        fail(f"none of the {report.failed} photos could be read (listed above)", code=1)
