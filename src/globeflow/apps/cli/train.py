"""``globeflow train``: a model from precomputed embeddings (resumable)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from globeflow.apps.cli._common import (
    ProgressOption,
    SeedOption,
    check_outputs,
    fail,
    is_main_process,
)


class Family(str, Enum):
    rfm = "rfm"
    flow = "flow"
    diffusion = "diffusion"
    vmf = "vmf"
    vmf_mixture = "vmf-mixture"
    uniform = "uniform"


def train(
    embeddings: Path = typer.Option(..., help="Embedding store from `globeflow embed`."),
    family: Family = typer.Option(Family.rfm, help="Generative family or baseline."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory (resumes if present)."),
    val_split: str = typer.Option(
        "author", help="'author' (grouped split), a fraction, or a second embedding store."
    ),
    val_fraction: float = typer.Option(0.15, help="Share of authors/rows held out."),
    prior_locations: Path = typer.Option(
        None, help="CSV of extra unlabelled locations (LAT,LON) for the null-condition branch."
    ),
    prior_fraction: float = typer.Option(
        None, help="Share of each batch from --prior-locations (default 0.25)."
    ),
    dim: int = typer.Option(256, help="Width of the denoising network (a multiple of 8)."),
    depth: int = typer.Option(6, help="Residual blocks in the denoising network."),
    dropout: float = typer.Option(0.0, help="Dropout inside the MLP blocks."),
    weight_decay: float = typer.Option(0.05, help="Decoupled weight decay of the optimizer."),
    max_steps: int = typer.Option(20000, help="Optimizer steps in all."),
    batch_size: int = typer.Option(512, help="Rows per optimizer step (over all processes)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (after warmup; cosine decay)."),
    optimizer: str = typer.Option("adamw", help="adamw or lamb"),
    warmup_steps: int = typer.Option(
        None, help="Steps of linear learning-rate warmup (default: 500, at most --max-steps / 10)."
    ),
    ema_decay: float = typer.Option(0.999, help="Decay of the weight average that is saved."),
    cond_drop_prob: float = typer.Option(
        0.1, help="Share of rows trained unconditioned (for classifier-free guidance)."
    ),
    val_every: int = typer.Option(1000, help="Validate every N steps."),
    checkpoint_every: int = typer.Option(500, help="Save a resumable checkpoint every N steps."),
    seed: SeedOption = 0,
    exclude_authors: Path = typer.Option(
        None, help="Text file of author ids to leave out (e.g. held-out demo photos)."
    ),
    stream: bool = typer.Option(
        False,
        help="Stream the store row group by row group through a shuffle buffer instead of "
        "loading it (stores larger than memory).",
    ),
    shuffle_buffer_rows: int = typer.Option(65536, help="Rows in the streaming shuffle buffer."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (autocast forward passes)."),
    compile_network: bool = typer.Option(
        False, "--compile/--no-compile", help="Compile the network with torch.compile."
    ),
    resume: bool = typer.Option(
        True, "--resume/--restart", help="Resume a run found in --output, or start it afresh."
    ),
    progress: ProgressOption = True,
) -> None:
    """Train a model on precomputed embeddings; killed runs resume exactly where they stopped.

    Several processes (GPUs, nodes): torchrun --standalone --nproc_per_node N --no-python
    globeflow train ...
    """
    # Imported here: torch and the training loop load only when the command runs (instant --help).
    from globeflow.apps.settings import check_train_options, default_warmup_steps
    from globeflow.jobs.training import Runtime, TrainingStopped, train_from_embeddings

    if warmup_steps is None:  # scaled to the run; only an explicit value can be refused
        warmup_steps = default_warmup_steps(max_steps)
    try:
        prior_fraction = check_train_options(
            max_steps, warmup_steps, prior_fraction, prior_locations
        )
    except ValueError as exc:
        fail(str(exc))
    check_outputs(folders={"--output": output}, reads=[embeddings])
    try:
        result = train_from_embeddings(
            embeddings,
            family.value,
            output,
            val_split=val_split,
            val_fraction=val_fraction,
            prior_locations=prior_locations,
            prior_fraction=prior_fraction,
            progress=progress,
            resume=resume,
            exclude_authors=exclude_authors,
            stream=stream,
            shuffle_buffer_rows=shuffle_buffer_rows,
            runtime=Runtime(device=device, precision=precision, compile=compile_network),
            dim=dim,
            depth=depth,
            dropout=dropout,
            weight_decay=weight_decay,
            max_steps=max_steps,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            ema_decay=ema_decay,
            cond_drop_prob=cond_drop_prob,
            val_every=val_every,
            checkpoint_every=checkpoint_every,
            seed=seed,
        )
    except TrainingStopped as exc:  # SIGTERM / Ctrl-C: checkpointed, resumable
        if is_main_process():
            typer.echo(f"globeflow train: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if is_main_process():
        typer.echo(f"done: {result}")
