"""The ``globeflow`` command line: embed, train, predict, evaluate, serve.

Each command is a thin wrapper over a library function; heavy imports happen inside commands so
that ``globeflow --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path

import typer

from globeflow.core.sampler_settings import (
    AUTO,
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    EVALUATE_BATCH_SIZE,
    GRIDS,
    PRECISIONS,
)

PIPED_COLUMNS = 140
"""Width of help and tables written to a pipe or a log, where rich would take 80 columns."""

_FAMILY_HELP = "Family of a PLONK checkpoint (rfm, flow, diffusion); default: its config or name."
_ENCODER_PATH_HELP = "Hub id or local directory for hub encoders."
_SEED_HELP = "Random seed (same seed, same answers)."
_PROGRESS_HELP = "Show progress bars on stderr."
_DEVICE_DEFAULT = "auto"
_DEVICE_HELP = "auto, cpu, cuda or cuda:N (the network and the hub encoders; auto: a GPU if any)."
SMALL_RUN_PHOTOS = 1000
"""Most photos for --json/--csv/--geojson/--map (every answer in memory; --out streams)."""


def _piped_columns() -> int | None:
    """PIPED_COLUMNS when stdout is not a terminal and COLUMNS does not set a width, else None
    (rich measures the terminal)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return None
    return PIPED_COLUMNS


class _FlagsWithoutType:
    """Help lists switches (``--progress/--no-progress``, ``--help``) without the ``<bool>``
    type typer gives them: they take no value."""

    def get_params(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Group(_FlagsWithoutType, typer.core.TyperGroup):
    pass


class _Command(_FlagsWithoutType, typer.core.TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    help="globeflow: where on Earth was this photo taken? A probability distribution over the "
    "globe from a frozen image encoder and a flow-matching model on the sphere (PLONK).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Family(str, Enum):
    rfm = "rfm"
    flow = "flow"
    diffusion = "diffusion"
    vmf = "vmf"
    vmf_mixture = "vmf-mixture"
    uniform = "uniform"


@app.callback()
def _configure(
    threads: int = typer.Option(
        None,
        help="CPU threads for torch. Default (or 0): automatic, one per usable core, waiting "
        "passively (never spinning, which is several times slower on a shared CPU); "
        "OMP_NUM_THREADS also overrides it.",
    ),
) -> None:
    from globeflow.apps.threads import ThreadRequestError, apply_thread_policy

    try:
        apply_thread_policy(threads)
    except ThreadRequestError as exc:
        _fail(str(exc))
    warnings.showwarning = _show_warning


_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """globeflow's own warnings (e.g. a store whose ids repeat) as one line on stderr; others as
    Python shows them."""
    if category.__module__.startswith("globeflow."):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr and exit: 2 for bad options, paths or models (nothing was done), 1
    when the work itself gave nothing usable."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _check_options(limits: dict, **values) -> None:
    """Fail naming the first option whose value ``limits`` does not allow."""
    from globeflow.apps.settings import SettingError, check_settings

    try:
        check_settings(values, limits)
    except SettingError as exc:
        _fail(f"--{exc.name.replace('_', '-')} {exc.value}: must be {exc.expected}")


def _check_outputs(files: dict | None = None, folders: dict | None = None, reads=()) -> None:
    from globeflow.apps.outputs import OutputPathError, check_output_paths

    try:
        check_output_paths(files, folders, reads)
    except OutputPathError as exc:
        _fail(str(exc))


def _load_locator(
    model: str | None,
    encoder: str | None,
    family: str | None,
    encoder_path: str | None,
    device: str = _DEVICE_DEFAULT,
):
    """The Locator on ``device`` (its encoder too where it takes a device), or a one-line
    failure naming the model, the encoder or the device."""
    from globeflow.apps.pipeline import Locator
    from globeflow.data.encoders import UnknownEncoderError
    from globeflow.jobs.distributed import resolve_device

    try:
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        return Locator.from_pretrained(
            model, encoder=encoder, family=family, encoder_path=encoder_path, device=str(dev),
            encoder_options={"device": dev},
        )  # fmt: skip
    except UnknownEncoderError as exc:
        if encoder is not None:
            _fail(f"--encoder {encoder}: {exc}")
        _fail(f"{model or 'the bundled model'}: its metadata names an {exc}; pass --encoder")
    except (ValueError, OSError) as exc:
        _fail(str(exc))


def _resolved_guidance(guidance: float | None, locator, limits: dict) -> float:
    """--guidance, else the model's recommendation, checked against the same range."""
    if guidance is not None:
        return guidance
    rule = limits["guidance"]
    if not rule.allows(locator.default_guidance):
        _fail(
            f"{locator.model_name}: recommended_guidance {locator.default_guidance} is not "
            f"{rule.describe()}; pass --guidance"
        )
    return locator.default_guidance


def _model_solver(solver: str | None, locator) -> str | None:
    """--solver, if the loaded model's family has it (each family has its own solvers)."""
    solvers = getattr(locator.model, "solvers", ())
    if solver is not None and solver not in solvers:
        _fail(
            f"--solver {solver}: a {locator.model.family} model takes "
            f"{', '.join(solvers) or 'no solver option'}"
        )
    return solver


@app.command(cls=_Command)
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
    encoder_path: str = typer.Option(None, help=_ENCODER_PATH_HELP),
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
    progress: bool = typer.Option(True, help=_PROGRESS_HELP),
) -> None:
    """Embed photos with a frozen encoder into a columnar file (resumable; bad files reported).

    Several processes (GPUs, nodes): torchrun --standalone --nproc_per_node N --no-python
    globeflow embed ...
    """
    from globeflow.data.encoders import UnknownEncoderError, encoder_options, get_encoder
    from globeflow.jobs.distributed import resolve_device
    from globeflow.jobs.embed import embed_images

    _check_outputs(folders={"--output": output}, reads=inputs)
    options = {"path": encoder_path} if encoder_path else {}
    try:
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        # "auto" means the best device the encoder can use: the offline ones run on the CPU.
        if device != "auto" or "device" in encoder_options(encoder):
            options["device"] = dev
        enc = get_encoder(encoder, **options)
    except UnknownEncoderError as exc:
        _fail(f"--encoder {encoder}: {exc}")
    except (ValueError, OSError) as exc:
        _fail(str(exc))
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
        _fail(str(exc))
    if not _is_main_process():
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


@app.command(cls=_Command)
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
    seed: int = typer.Option(0, help=_SEED_HELP),
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
    progress: bool = typer.Option(True, help=_PROGRESS_HELP),
) -> None:
    """Train a model on precomputed embeddings; killed runs resume exactly where they stopped.

    Several processes (GPUs, nodes): torchrun --standalone --nproc_per_node N --no-python
    globeflow train ...
    """
    from globeflow.apps.settings import check_train_options, default_warmup_steps
    from globeflow.jobs.training import Runtime, TrainingStopped, train_from_embeddings

    if warmup_steps is None:  # scaled to the run; only an explicit value can be refused
        warmup_steps = default_warmup_steps(max_steps)
    try:
        prior_fraction = check_train_options(
            max_steps, warmup_steps, prior_fraction, prior_locations
        )
    except ValueError as exc:
        _fail(str(exc))
    _check_outputs(folders={"--output": output}, reads=[embeddings])
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
        if _is_main_process():
            typer.echo(f"globeflow train: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if _is_main_process():
        typer.echo(f"done: {result}")


def _is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun job (they stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def _area_km2(km2: float) -> str:
    """An area to two significant figures: 510M km², 4.1M km², 38k km², 120 km², 1.5 km²,
    below 1 km² in m²: 470,000 m², 50 m²."""
    if km2 < 1.0:
        return f"{float(f'{km2 * 1e6:.2g}'):,.0f} m²"
    scale, unit = next(((s, u) for s, u in ((1e6, "M"), (1e3, "k")) if km2 >= s), (1.0, ""))
    return f"{float(f'{km2 / scale:.2g}'):g}{unit} km²"


def _region_cell(region: dict | None, fixed_radius: bool) -> str:
    """ "Name (probability)" for a fixed radius (the header says it), else "Name (probability,
    radius)"."""
    from globeflow.answers.decode import MIN_REGION_PROBABILITY
    from globeflow.answers.geocode import format_km

    if region is None:  # with a fixed radius: the samples are too spread for any disc of it
        return f"none holds {MIN_REGION_PROBABILITY:.0%}" if fixed_radius else "-"
    if fixed_radius:
        return f"{region['label']} ({region['probability']:.0%})"
    return f"{region['label']} ({region['probability']:.0%}, {format_km(region['radius_km'])})"


def _predict_rows(
    results: list[dict], labels: list[str], fixed_radius: bool = False
) -> list[list[str]]:
    """A table row per located photo (the photos that could not be read are listed apart)."""
    rows = []
    for r, name in zip(results, labels, strict=True):
        fusion = r.get("fusion") or {}
        if not r.get("ok"):
            if fusion:  # a refused fused answer says why in the table too
                rows.append([name, "-", f"no answer: {r.get('error')}", "-", "-", "-"])
            continue
        bg = r["best_guess"]
        place = bg["label"]
        if fusion.get("different_places"):
            place += "\n(the photos look like different places)"
        top = r["regions"][0] if r["regions"] else None
        bits, area = r.get("localizability_vs_uniform_bits"), r.get("effective_area_km2")
        rows.append(
            [
                name,
                f"{bg['lat']:.5f}, {bg['lon']:.5f}",
                place,
                _region_cell(top, fixed_radius),
                f"{bits:.1f} ({_area_km2(area)})" if bits is not None else "-",
                f"{r['error_km']:.0f}" if r.get("error_km") is not None else "-",
            ]
        )
    return rows


@app.command(cls=_Command)
def predict(
    photos: list[Path] = typer.Argument(
        None,
        help="Photos, folders of photos (recursive), text files of paths, or CSVs with an image "
        "column (as `globeflow embed` reads them).",
    ),
    embeddings: Path = typer.Option(
        None, help="Locate the rows of an embedding store (`globeflow embed`) instead of photos."
    ),
    model: str = typer.Option(None, help="Model directory or hub id (default: bundled model)."),
    family: str = typer.Option(None, help=_FAMILY_HELP),
    encoder: str = typer.Option(None, help="Override the encoder named by the model."),
    encoder_path: str = typer.Option(None, help=_ENCODER_PATH_HELP),
    num_samples: int = typer.Option(
        None,
        help=f"Samples per photo, 16 to 4096 (default: {DEFAULT_SAMPLER.num_samples}, see "
        "docs/defaults.md).",
    ),
    guidance: float = typer.Option(
        None,
        help="Classifier-free guidance scale, -1 to 10 (default: the model's recommended "
        f"value, else {DEFAULT_GUIDANCE:g} as in the paper; negative values lean on the "
        "unconditional prior).",
    ),
    steps: int = typer.Option(
        None,
        help=f"Solver steps, 1 to 256 (default: {DEFAULT_SAMPLER.steps} "
        f"{DEFAULT_SAMPLER.solver} steps).",
    ),
    solver: str = typer.Option(
        None,
        help=f"Default: {DEFAULT_SAMPLER.solver} (on RFM models; the R^3 families' own step "
        "where they lack it). data-2m (RFM: second order in the data prediction, one network "
        "evaluation per step, exact at the sharp end), lagged-midpoint (second order, one), "
        "midpoint or heun (second order, two), euler (the paper's sampler), ddim (diffusion). "
        "Alone it runs on the default grid.",
    ),
    grid: str = typer.Option(
        None,
        help=f"Time grid: {', '.join(GRIDS)} (default: {DEFAULT_SAMPLER.grid or 'its own'}, "
        "with any --solver).",
    ),
    precision: str = typer.Option(
        None,
        help=f"{', '.join(PRECISIONS)}, or {AUTO} (bf16 where the CPU/GPU runs it natively, "
        f"else fp32); default: {DEFAULT_SAMPLER.precision} (bf16 moves sharp answers by ~1 km, "
        "docs/defaults.md).",
    ),
    localizability_samples: int = typer.Option(
        None,
        help="Samples for the localizability estimate, 0 to 4096 (0: skip; default "
        f"{DEFAULT_SAMPLER.localizability_samples}).",
    ),
    top_k: int = typer.Option(5, help="Regions to report (1 to 100)."),
    region_radius_km: float = typer.Option(
        None,
        help="Fixed radius of a reported region (km, above 0, at most half the circumference; "
        "default: each region at the answer's own scale, with the radius holding 90% of it). "
        "Discs holding under 1% of the samples are not reported.",
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Answers folder for runs of any size: parquet parts written as photos are located "
        "(memory bounded); rerunning the same command resumes.",
    ),
    jsonl: bool = typer.Option(False, help="With --out: also a JSON Lines file per part."),
    keep_samples: int = typer.Option(
        0, min=0, help="With --out: samples stored per photo (0: none; at most --num-samples)."
    ),
    overwrite: bool = typer.Option(
        False, help="With --out: replace answers already there (made with other settings)."
    ),
    json_out: Path = typer.Option(
        None, "--json", help=f"Write all results as JSON (at most {SMALL_RUN_PHOTOS} photos)."
    ),
    csv_out: Path = typer.Option(None, "--csv", help="Write a CSV row per photo (same limit)."),
    geojson_out: Path = typer.Option(
        None, "--geojson", help="Write a GeoJSON FeatureCollection (same limit)."
    ),
    map_dir: Path = typer.Option(
        None, "--map", help="Write a PNG world map per photo here (same limit)."
    ),
    batch_size: int = typer.Option(32, min=1, help="Photos per encoder and model call."),
    save_every_s: float = typer.Option(
        None,
        min=0.0,
        help="With --out: commit answers within this many seconds of being answered (default "
        "30; a kill loses the batch in progress and at most this much).",
    ),
    decode_workers: int = typer.Option(
        0, min=0, help="Threads decoding photos ahead of the encoder (0: inline; GPUs want 4+)."
    ),
    device: str = typer.Option(_DEVICE_DEFAULT, help=_DEVICE_HELP),
    seed: int = typer.Option(0, help=_SEED_HELP),
    progress: bool = typer.Option(True, help=_PROGRESS_HELP),
    same_place: bool = typer.Option(
        False,
        "--same-place",
        help="The photos all show one place: add one fused answer, the exact product of their "
        "posteriors (refused, with the reason, when the photos disagree).",
    ),
    within: str = typer.Option(
        None,
        help="A region you know the photos are in: lat0,lon0,lat1,lon1 (degrees, south-west "
        "corner first), an ISO country code (FR) or a GeoJSON file. Answers come from the "
        "model's density inside it, with the mass it puts there.",
    ),
    fusion_proposals: int = typer.Option(
        None, help="Proposal points per round for --same-place, 64 to 65536 (default 1024)."
    ),
) -> None:
    """Where was each photo taken? Best guess, top regions, localizability, maps.

    Archives: --out DIR streams the answers to parquet parts and resumes when rerun; several
    processes (GPUs, nodes): torchrun --standalone --nproc_per_node N --no-python globeflow
    predict ... --out DIR. Exits 1 when no photo could be located, 2 on a bad option, path or
    model, 130 when interrupted (the answers so far are kept)."""
    from globeflow.apps.settings import LOCATE_LIMITS

    if (photos is None) == (embeddings is None):
        _fail("give photos or --embeddings STORE (one of them)")
    for p in photos or [embeddings]:
        if not p.exists():
            _fail(f"{p}: no such file or folder")
    _check_options(
        LOCATE_LIMITS,
        num_samples=num_samples,
        guidance=guidance,
        steps=steps,
        solver=solver,
        grid=grid,
        precision=precision,
        localizability_samples=localizability_samples,
        top_k=top_k,
        region_radius_km=region_radius_km,
    )
    small_outputs = {"--json": json_out, "--csv": csv_out, "--geojson": geojson_out}
    needs_out = {"--jsonl": jsonl, "--keep-samples": keep_samples, "--overwrite": overwrite,
                 "--save-every-s": save_every_s is not None}  # fmt: skip
    if out is None and (given := [name for name, value in needs_out.items() if value]):
        _fail(f"{given[0]} goes with --out DIR (the answers folder)")
    asked = [name for name, path in {**small_outputs, "--map": map_dir}.items() if path]
    if asked and os.environ.get("WORLD_SIZE", "1") != "1":
        _fail(f"{asked[0]} needs one process; under torchrun use --out")
    if photos and all(p.is_dir() for p in photos):
        _refuse_folders_without_photos(photos)
    in_memory = same_place or within is not None
    if in_memory and (embeddings is not None or out is not None):
        option = "--same-place" if same_place else "--within"
        _fail(f"{option} answers photos in memory: give photos, without --embeddings or --out")
    from globeflow.apps.predict_run import check_small_run, run_predict

    check_small_run(asked or (["--same-place"] if in_memory else []), photos, embeddings)
    region = _parse_within(within, fusion_proposals)
    reads = [*(photos or []), *([embeddings] if embeddings is not None else [])]
    if asked:  # a photo found inside an input folder is an input too
        reads += _listed_photos(photos or [])
    _check_outputs(files=small_outputs, folders={"--map": map_dir, "--out": out}, reads=reads)
    locator = _load_locator(model, encoder, family, encoder_path, device)
    samples = num_samples or locator.sampler.num_samples
    if keep_samples > samples:
        _fail(f"--keep-samples {keep_samples}: must be at most --num-samples ({samples})")
    settings = dict(
        num_samples=num_samples,
        guidance=_resolved_guidance(guidance, locator, LOCATE_LIMITS),
        steps=steps,
        solver=_model_solver(solver, locator),
        grid=grid,
        precision=precision,
        localizability_samples=localizability_samples,
        top_k=top_k,
        region_radius_km=region_radius_km,
        seed=seed,
    )
    if in_memory:
        _predict_in_memory(
            locator, photos, settings, small_outputs, map_dir, progress,
            same_place=same_place, region=region, fusion_proposals=fusion_proposals,
        )  # fmt: skip
        return
    run_predict(
        locator, settings, photos=photos, embeddings=embeddings, out=out, jsonl=jsonl,
        keep_samples=keep_samples, overwrite=overwrite, small_outputs=small_outputs,
        map_dir=map_dir, batch_size=batch_size,
        save_every_s=30.0 if save_every_s is None else save_every_s,
        decode_workers=decode_workers, progress=progress,
    )  # fmt: skip


def _refuse_folders_without_photos(folders: list[Path]) -> None:
    """One line naming the folders when none of them holds a photo (before any work)."""
    from globeflow.data.file_names import holds_photo, printable_path
    from globeflow.data.images import IMAGE_EXTENSIONS

    if not any(holds_photo(f, IMAGE_EXTENSIONS) for f in folders):
        where = ", ".join(printable_path(f) for f in folders)
        _fail(f"no photos found in {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")


def _listed_photos(inputs: list[Path]) -> list[Path]:
    """The photo files of the inputs (folders searched), for the output-path check."""
    from globeflow.data.file_names import find_photos
    from globeflow.data.images import IMAGE_EXTENSIONS

    try:
        return find_photos(inputs, IMAGE_EXTENSIONS)[0]
    except (ValueError, OSError):
        return []  # nothing to protect; the run itself reports the inputs


UNFUSED_SETTINGS = ("guidance", "localizability_samples", "grid")
"""predict's settings that a fused answer does not take."""


def _predict_in_memory(
    locator, photos, settings, small_outputs, map_dir, progress, *, same_place, region,
    fusion_proposals,
) -> None:  # fmt: skip
    """``predict --within`` / ``--same-place``: answers held in memory (small runs), the fused
    answer added to them; exits as ``predict`` says."""
    from globeflow.apps.outputs import map_file_names, photo_labels, with_map_names
    from globeflow.core.families import NonFiniteOutputError
    from globeflow.data.file_names import find_photos
    from globeflow.data.images import IMAGE_EXTENSIONS

    try:
        paths, unreadable = find_photos(photos, IMAGE_EXTENSIONS)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    for folder, reason in unreadable:
        typer.echo(f"skipped {folder}: {reason}", err=True)
    labels = photo_labels(paths)
    embedded: list = []  # each photo is embedded once, for its answer and the fused one
    try:
        results = locator.locate_paths(
            paths, progress=progress, with_density=False, within=region,
            embeddings_out=embedded if same_place else None, **settings,
        )  # fmt: skip
        if same_place:
            # fusion samples the model's own density (no guidance) with its own localizability
            fused = {k: v for k, v in settings.items() if k not in UNFUSED_SETTINGS}
            results, labels = _add_fused_answer(
                locator, paths, results, labels, dict(embedded), region, fusion_proposals,
                **fused,
            )  # fmt: skip
    except NonFiniteOutputError as exc:
        _fail(f"{locator.model_name}: {exc}", code=1)
    except ValueError as exc:  # a model that cannot fuse photos
        _fail(f"--same-place: {locator.model_name}: {exc}")
    located = any(r.get("ok") for r in results)
    if located:
        title = f"globeflow ({locator.model_name}, {locator.encoder_name})"
        _print_predict_table(results, labels, title, settings["region_radius_km"])
    names = map_file_names(labels)
    if map_dir:
        results = with_map_names(results, names)
    _write_predict_outputs(results, *small_outputs.values())
    if map_dir:
        _write_maps(results, labels, names, map_dir, progress)
    _report_region_and_fusion(results)
    failed = _report_unreadable(results)
    if not located and not failed:  # every answer refused: nothing inside --within
        _fail("no answer: every photo's answer was refused (reasons above)", code=1)
    if not located:
        _fail(f"none of the {failed} photos could be read (listed above)", code=1)


def _parse_within(within: str | None, fusion_proposals: int | None):
    """The --within region (None without it), or a one-line failure; checks --fusion-proposals."""
    from globeflow.answers.within import RegionError, parse_region

    if fusion_proposals is not None and not 64 <= fusion_proposals <= 65536:
        _fail(f"--fusion-proposals {fusion_proposals}: must be an integer from 64 to 65536")
    if within is None:
        return None
    try:
        return parse_region(within)
    except RegionError as exc:
        _fail(f"--within {exc}")


def _add_fused_answer(locator, paths, results, labels, embedded, region, proposals, **settings):
    """The per-photo results and labels followed by the photos' fused answer (--same-place),
    from the embeddings their own answers used (``embedded``: path -> embedding)."""
    import torch

    readable = [
        (str(p), label) for p, r, label in zip(paths, results, labels) if str(p) in embedded
    ]
    if len(readable) < 2:
        typer.echo("--same-place: fewer than 2 readable photos, nothing to fuse", err=True)
        return results, labels
    fused = locator.locate_together(
        torch.stack([embedded[p] for p, _ in readable]), names=[label for _, label in readable],
        within=region, proposals_per_round=proposals, **settings,
    )  # fmt: skip
    return [*results, fused], [*labels, "same place"]


def _percent(p: float) -> str:
    """A probability in percent, with at least two significant digits (0.0092%, 41.4%)."""
    return f"{p:.1%}" if p >= 0.01 or p == 0 else f"{100 * p:.2g}%"


def _report_region_and_fusion(results: list[dict]) -> None:
    """The mass inside --within per answer, and the fused answer's verdict (--same-place)."""
    for r in results:
        mass = r.get("mass_inside")
        if mass:
            typer.echo(
                f"{r['image']}: {_percent(mass['probability'])} ± {_percent(mass['stderr'])} of "
                f"the model's mass inside {mass['region']['description']}"
            )
        if "fusion" in r:
            fusion = r["fusion"]
            bf = fusion["log_bayes_factor_same_place"]
            typer.echo(
                f"{r['image']}: {fusion['product']} product (exponent {fusion['exponent']:g}); "
                f"effective sample size {r['effective_sample_size']:.0f}; log Bayes factor of one "
                f"place against unrelated places "
                + (f"{bf:.2f}" if bf is not None else "- (one distinct photo)")
            )
            if r.get("warning"):
                typer.secho(f"{r['image']}: {r['warning']}", fg=typer.colors.YELLOW, err=True)
        if r.get("error") and "effective_sample_size" in r:
            typer.secho(f"{r['image']}: {r['error']}", fg=typer.colors.YELLOW, err=True)


def _print_predict_table(
    results: list[dict], labels: list[str], title: str, region_radius_km: float | None
) -> None:
    from rich.console import Console
    from rich.table import Table

    from globeflow.core.families import UNIFORM_LOCALIZABILITY_BITS

    table = Table(
        title=title,
        caption="localizability: bits above a uniform guess over the globe (0: no clue; each "
        "bit halves the area), and the area the answer spreads over; -: not estimated, or a "
        f"density in R³ (see the JSON). Uniform is {UNIFORM_LOCALIZABILITY_BITS:.2f} bits on "
        "the scale of localizability_bits.",
        caption_justify="left",
    )
    table.add_column("photo", overflow="fold")
    table.add_column("best guess\n(lat, lon)", no_wrap=True)
    table.add_column("place")
    if region_radius_km is None:
        table.add_column("top region\n(probability, 90% radius)")
    else:
        table.add_column(f"top region\n(radius {region_radius_km:g} km)")
    table.add_column("localizability\n(bits vs uniform)", no_wrap=True)
    table.add_column("error vs EXIF\n(km)", no_wrap=True)
    for row in _predict_rows(results, labels, region_radius_km is not None):
        table.add_row(*row)
    console = Console(width=_piped_columns())
    console.print(table)
    # Full links below the table: a terminal or a log keeps them whole and clickable.
    console.print("OpenStreetMap at the best guess:", soft_wrap=True)
    for r, name in zip(results, labels, strict=True):
        if r.get("ok"):
            console.print(f"  {name}: {r['osm_url']}", soft_wrap=True, markup=False)


def _report_unreadable(results: list[dict]) -> int:
    """List the photos that could not be read on stderr, one line each; returns their count."""
    failed = [r for r in results if not r.get("ok") and "effective_sample_size" not in r]
    if failed:
        typer.echo(f"{len(failed)} of {len(results)} photos could not be read:", err=True)
    for r in failed:
        typer.echo(f"  {r['error']}", err=True)
    return len(failed)


def _write_predict_outputs(
    results: list[dict], json_out: Path | None, csv_out: Path | None, geojson_out: Path | None
) -> None:
    from globeflow.answers.export import results_to_csv, results_to_geojson, results_to_json

    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(results_to_json(results), encoding="utf-8")
    if csv_out:
        results_to_csv(results, csv_out)
    if geojson_out:
        geojson_out.parent.mkdir(parents=True, exist_ok=True)
        geojson_out.write_text(json.dumps(results_to_geojson(results), indent=1), encoding="utf-8")


def _write_maps(
    results: list[dict], labels: list[str], names: list[str], map_dir: Path, progress: bool
) -> None:
    """A PNG per located photo, named after its label (``a/photo.jpg`` -> a__photo.jpg.png)."""
    import torch
    from tqdm.auto import tqdm

    from globeflow.answers.decode import sample_density_grid
    from globeflow.answers.maps import render_map

    map_dir.mkdir(parents=True, exist_ok=True)
    rows = zip(results, labels, names, strict=True)
    located = [(r, label, name) for r, label, name in rows if r.get("ok")]
    for r, label, name in tqdm(located, desc="drawing maps", unit="map", disable=not progress):
        samples = torch.tensor(r["samples"])
        extent = r.get("map_extent")
        render_map(
            map_dir / name,
            samples,
            density=sample_density_grid(samples, extent=extent),
            extent=extent,
            best_guess=(r["best_guess"]["lat"], r["best_guess"]["lon"]),
            truth=(r["exif_gps"]["lat"], r["exif_gps"]["lon"]) if r.get("exif_gps") else None,
            regions=r["regions"],
            title=label,
        )


@app.command(cls=_Command)
def evaluate(
    data: Path = typer.Argument(
        ...,
        help="Dataset: CSV (im2gps/YFCC/MP-16/OSV-5M), iNat JSON, "
        "image folder with EXIF GPS, WebDataset tars, or embeddings.",
    ),
    model: str = typer.Option(None, help="Model directory or hub id (default: bundled model)."),
    family: str = typer.Option(None, help=_FAMILY_HELP),
    encoder: str = typer.Option(None, help="Encoder for image datasets (default: the model's)."),
    encoder_path: str = typer.Option(None, help=_ENCODER_PATH_HELP),
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
    seed: int = typer.Option(0, help=_SEED_HELP),
    limit: int = typer.Option(None, help="Evaluate only the first N records."),
    overwrite: bool = typer.Option(
        False, help="Replace the rows of an evaluation with other settings in --output."
    ),
    device: str = typer.Option(_DEVICE_DEFAULT, help=_DEVICE_HELP),
    progress: bool = typer.Option(True, help=_PROGRESS_HELP),
) -> None:
    """Every metric of the paper (+ calibration): per-image CSV and a summary (JSON, markdown).

    Per-image rows are written to OUTPUT/rows as they come; rerunning the same command resumes,
    and the summary is computed from the stored rows. Several processes (GPUs, nodes): torchrun
    --standalone --nproc_per_node N --no-python globeflow evaluate ...
    Exits 1 when no record could be evaluated, 2 on a bad option, path, dataset or model, 130
    when interrupted (the rows so far are kept)."""
    from globeflow.apps.settings import EVALUATE_LIMITS
    from globeflow.core.families import NonFiniteOutputError
    from globeflow.data.datasets import open_dataset
    from globeflow.jobs.evaluation import evaluate as run_evaluation
    from globeflow.jobs.run_lock import run_lock

    _check_options(
        EVALUATE_LIMITS,
        num_samples=num_samples,
        guidance=guidance,
        steps=steps,
        hpd_samples=hpd_samples,
        batch_size=batch_size,
        limit=limit,
    )
    _check_outputs(folders={"--output": output}, reads=[data])
    try:
        dataset = open_dataset(data, kind=kind)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    locator = _load_locator(model, encoder, family, encoder_path, device)
    try:
        report = run_evaluation(
            locator.model,
            dataset,
            encoder=locator.encoder,
            num_samples=num_samples,
            guidance=_resolved_guidance(guidance, locator, EVALUATE_LIMITS),
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
        _fail(f"{locator.model_name}: {exc}", code=1)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho(
            f"interrupted; {output}/rows holds the rows so far: rerun the same command to resume",
            err=True,
            fg="yellow",
        )
        raise typer.Exit(130) from None
    if not _is_main_process():
        return
    try:  # the report folder stays locked while its files are written
        with run_lock(output):
            report.write(output)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if report.summary["n"] == 0:
        _fail(f"{data}: nothing to evaluate; {report.why_empty()}; report in {output}", code=1)
    typer.echo(report.to_markdown())
    typer.echo(f"report written to {output}")


@app.command(cls=_Command)
def serve(
    model: str = typer.Option(None, help="Model directory or hub id (default: bundled model)."),
    family: str = typer.Option(None, help=_FAMILY_HELP),
    encoder: str = typer.Option(None, help="Override the encoder named by the model."),
    encoder_path: str = typer.Option(None, help=_ENCODER_PATH_HELP),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."
    ),
    port: int = typer.Option(8000, help="TCP port to listen on (1-65535)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload, in MB (> 0)."),
    device: str = typer.Option(_DEVICE_DEFAULT, help=_DEVICE_HELP),
    tiles: str = typer.Option(
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png",
        help="Map tiles the page shows when the browser reaches them ({z}/{x}/{y} URL "
        "template, OpenStreetMap attribution); 'none': only the bundled offline map.",
    ),
) -> None:
    """Start the local web app and JSON API (http://HOST:PORT)."""
    from globeflow.apps.server import SERVE_LIMITS, check_listen_address
    from globeflow.apps.server import serve as run_server
    from globeflow.apps.server_basemap import parse_tiles

    _check_options(SERVE_LIMITS, port=port, max_upload_mb=max_upload_mb)
    try:
        tile_url = parse_tiles(tiles)
    except ValueError as exc:
        _fail(str(exc))
    try:  # the address before the model: a busy port should not wait for the model to load
        check_listen_address(host, port)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    locator = _load_locator(model, encoder, family, encoder_path, device)
    run_server(locator, host=host, port=port, max_upload_mb=max_upload_mb, tiles=tile_url)


def main() -> None:  # pragma: no cover
    columns = _piped_columns()
    if columns is not None:  # typer reads it when it first draws help or a usage error
        os.environ.setdefault("TERMINAL_WIDTH", str(columns))
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
