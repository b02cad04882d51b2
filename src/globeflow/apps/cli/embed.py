"""``globeflow embed``: photos to an embedding store, with a frozen encoder."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from globeflow.apps.cli._common import (
    EncoderPathOption,
    ProgressOption,
    check_outputs,
    fail,
    is_main_process,
)


def embed(
    inputs: list[Path] = typer.Argument(
        ...,
        help="Image files, folders (recursive), text files of paths, or a CSV with an image "
        "column and optional lat/lon/author columns.",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Embedding store to write/extend (NAME.parquet directory)."
    ),
    encoder: str = typer.Option(None, help="Encoder name (default: the offline default)."),
    encoder_path: EncoderPathOption = None,
    batch_size: int = typer.Option(32, min=1, help="Photos per encoder call."),
    chunk_size: int = typer.Option(4096, min=1, help="Rows per parquet part (resume unit)."),
    recursive: bool = typer.Option(True, help="Descend into sub-folders."),
    exif_gps: bool = typer.Option(True, help="Read coordinates from EXIF GPS when none given."),
    save_every_s: float = typer.Option(
        60.0, min=0.0, help="Commit embedded rows at least this often (seconds), for resume."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (hub encoders)."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (autocast forward passes)."),
    dtype: str = typer.Option(
        None, help="Stored embeddings: float32 or float16 (half the size); default: the store's."
    ),
    decode_workers: int = typer.Option(
        0, min=0, help="Threads decoding photos ahead of the encoder (0: inline; GPUs want 4+)."
    ),
    progress: ProgressOption = True,
) -> None:
    """Embed photos with a frozen encoder into a columnar file (resumable; bad files reported).

    Several processes (GPUs, nodes): torchrun --standalone --nproc_per_node N --no-python
    globeflow embed ...
    """
    # Imported here: the encoders and torch load only when the command runs (instant --help).
    from globeflow.data.encoders import UnknownEncoderError, encoder_options, get_encoder
    from globeflow.jobs.distributed import resolve_device
    from globeflow.jobs.embed import embed_images

    check_outputs(folders={"--output": output}, reads=inputs)
    options = {"path": encoder_path} if encoder_path else {}
    try:
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        # "auto" means the best device the encoder can use: the offline ones run on the CPU.
        if device != "auto" or "device" in encoder_options(encoder):
            options["device"] = dev
        enc = get_encoder(encoder, **options)
    except UnknownEncoderError as exc:
        fail(f"--encoder {encoder}: {exc}")
    except (ValueError, OSError) as exc:
        fail(str(exc))
    try:
        report = embed_images(
            inputs,
            enc,
            output,
            batch_size=batch_size,
            progress=progress,
            recursive=recursive,
            chunk_size=chunk_size,
            exif_gps=exif_gps,
            max_unsaved_seconds=save_every_s,
            precision=precision,
            dtype=dtype,
            decode_workers=decode_workers,
        )
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if not is_main_process():
        return
    typer.echo(
        f"embedded {report.embedded} new, {report.skipped_existing} already done, "
        f"{report.failed} failed ({report.with_location} with coordinates) -> {output}"
    )
    for path, reason in report.errors[:20]:
        typer.echo(f"  skipped {path}: {reason}", err=True)
    if len(report.errors) > 20:
        typer.echo(f"  ... {len(report.errors) - 20} more in {report.errors_path}", err=True)
    if report.embedded + report.skipped_existing == 0:
        raise typer.Exit(1)
