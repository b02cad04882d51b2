"""``globeflow evaluate``: every metric of the paper on a dataset (resumable rows, a summary)."""

from __future__ import annotations

from pathlib import Path

import typer

from globeflow.apps.cli._common import (
    DEVICE_DEFAULT,
    DeviceOption,
    EncoderPathOption,
    FamilyOption,
    ModelOption,
    ProgressOption,
    SeedOption,
    check_options,
    check_outputs,
    fail,
    is_main_process,
    load_locator,
    resolved_guidance,
)
from globeflow.core.sampler_settings import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, EVALUATE_BATCH_SIZE


def evaluate(
    data: Path = typer.Argument(
        ...,
        help="Dataset: CSV (im2gps/YFCC/MP-16/OSV-5M), iNat JSON, "
        "image folder with EXIF GPS, WebDataset tars, or embeddings.",
    ),
    model: ModelOption = None,
    family: FamilyOption = None,
    encoder: str = typer.Option(None, help="Encoder for image datasets (default: the model's)."),
    encoder_path: EncoderPathOption = None,
    output: Path = typer.Option(..., "--output", "-o", help="Report directory."),
    kind: str = typer.Option(None, help="Force the dataset reader (osv5m, latlon-csv, inat, ...)."),
    num_samples: int = typer.Option(
        None,
        help="Samples per image for the best guess (16 to 4096; default: predict's, "
        f"{DEFAULT_SAMPLER.num_samples}).",
    ),
    guidance: float = typer.Option(
        None,
        help="Guidance for point prediction, -1 to 10 (default: the model's recommended value, "
        f"else {DEFAULT_GUIDANCE:g} as in the paper).",
    ),
    steps: int = typer.Option(
        None, help="Sampler steps (1 to 256; default: predict's sampler, docs/defaults.md)."
    ),
    hpd_samples: int = typer.Option(
        None,
        help="Unguided samples per image for calibration (0 to 4096; 0: off; default "
        f"{DEFAULT_SAMPLER.localizability_samples}).",
    ),
    batch_size: int = typer.Option(EVALUATE_BATCH_SIZE, help="Images per model call (1 to 4096)."),
    seed: SeedOption = 0,
    limit: int = typer.Option(None, help="Evaluate only the first N records."),
    overwrite: bool = typer.Option(
        False, help="Replace the rows of an evaluation with other settings in --output."
    ),
    device: DeviceOption = DEVICE_DEFAULT,
    progress: ProgressOption = True,
) -> None:
    """Every metric of the paper (+ calibration): per-image CSV and a summary (JSON, markdown).

    Per-image rows are written to OUTPUT/rows as they come; rerunning the same command resumes,
    and the summary is computed from the stored rows. Several processes (GPUs, nodes): torchrun
    --standalone --nproc_per_node N --no-python globeflow evaluate ...
    Exits 1 when no record could be evaluated, 2 on a bad option, path, dataset or model, 130
    when interrupted (the rows so far are kept)."""
    # Imported here: the model, the datasets and torch load only when the command runs.
    from globeflow.apps.settings import EVALUATE_LIMITS
    from globeflow.core.families import NonFiniteOutputError
    from globeflow.data.datasets import open_dataset
    from globeflow.jobs.evaluation import evaluate as run_evaluation
    from globeflow.jobs.run_lock import run_lock

    check_options(
        EVALUATE_LIMITS,
        num_samples=num_samples,
        guidance=guidance,
        steps=steps,
        hpd_samples=hpd_samples,
        batch_size=batch_size,
        limit=limit,
    )
    check_outputs(folders={"--output": output}, reads=[data])
    try:
        dataset = open_dataset(data, kind=kind)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    locator = load_locator(model, encoder, family, encoder_path, device)
    try:
        report = run_evaluation(
            locator.model,
            dataset,
            encoder=locator.encoder,
            num_samples=num_samples,
            guidance=resolved_guidance(guidance, locator, EVALUATE_LIMITS),
            steps=steps,
            hpd_samples=hpd_samples,
            batch_size=batch_size,
            seed=seed,
            limit=limit,
            progress=progress,
            model_name=locator.model_name,
            output=output,
            overwrite=overwrite,
        )
    except NonFiniteOutputError as exc:
        fail(f"{locator.model_name}: {exc}", code=1)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.secho(
            f"interrupted; {output}/rows holds the rows so far: rerun the same command to resume",
            err=True,
            fg="yellow",
        )
        raise typer.Exit(130) from None
    if not is_main_process():
        return
    try:  # the report folder stays locked while its files are written
        with run_lock(output):
            report.write(output)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if report.summary["n"] == 0:
        fail(f"{data}: nothing to evaluate; {report.why_empty()}; report in {output}", code=1)
    typer.echo(report.to_markdown())
