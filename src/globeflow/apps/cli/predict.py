"""``globeflow predict``: where was each photo taken? Its options are checked here; the
streaming run is :mod:`globeflow.apps.cli.predict_run`, the in-memory one (``--within``,
``--same-place``) is below, and both show their answers with
:mod:`globeflow.apps.cli.predict_output`.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from globeflow.apps.cli._common import (
    DEVICE_DEFAULT,
    SMALL_RUN_PHOTOS,
    DeviceOption,
    EncoderPathOption,
    FamilyOption,
    ModelOption,
    ProgressOption,
    SeedOption,
    check_options,
    check_outputs,
    fail,
    fail_no_photos,
    load_locator,
    resolved_guidance,
)
from globeflow.apps.cli.predict_output import (
    report_region_and_fusion,
    report_unreadable,
    show_answers,
)
from globeflow.apps.cli.predict_run import check_small_run, run_predict
from globeflow.core.sampler_settings import (
    AUTO,
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    GRIDS,
    MIXED_BF16_BELOW,
    PRECISIONS,
)
from globeflow.data.file_names import find_photos, holds_photo


def predict(
    photos: list[Path] = typer.Argument(
        None,
        help="Photos, folders of photos (recursive), text files of paths, or CSVs with an image "
        "column (as `globeflow embed` reads them).",
    ),
    embeddings: Path = typer.Option(
        None, help="Locate the rows of an embedding store (`globeflow embed`) instead of photos."
    ),
    model: ModelOption = None,
    family: FamilyOption = None,
    encoder: str = typer.Option(None, help="Override the encoder named by the model."),
    encoder_path: EncoderPathOption = None,
    num_samples: int = typer.Option(
        None,
        help=f"Most samples per photo, 16 to 4096 (default: {DEFAULT_SAMPLER.num_samples}, see "
        "docs/defaults.md).",
    ),
    first_samples: int = typer.Option(
        None,
        help=f"Samples of the first draw (default: {DEFAULT_SAMPLER.first_samples}); more, up "
        "to --num-samples, only for photos whose best guess or region probabilities are not yet "
        "within the Monte Carlo tolerances. 0: all --num-samples at once.",
    ),
    noise: str = typer.Option(
        None,
        help="Initial states of the answer's samples: sobol (scrambled Sobol nets, the default "
        "on RFM models: the same answer with smaller Monte Carlo errors, so fewer samples) or "
        "iid (independent draws, as the authors draw; the R^3 families always).",
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
        f"{DEFAULT_SAMPLER.solver} steps, or the recipe the model recommends: the bundled "
        "model's, docs/defaults.md).",
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
        help=f"{', '.join(PRECISIONS)}, mixed (bf16 up to signal level {MIXED_BF16_BELOW}, "
        f"fp32 at the data end), or {AUTO} (bf16); mixed and {AUTO} run fp32 where the CPU/GPU "
        f"lacks native bf16. Default: {DEFAULT_SAMPLER.precision} (bf16 to the end moves sharp "
        "answers by ~1 km, docs/defaults.md).",
    ),
    localizability_samples: int = typer.Option(
        None,
        help="Samples for the localizability estimate, 0 to 4096 (0: skip; default "
        f"{DEFAULT_SAMPLER.localizability_samples}). With N of them it is as precise as N "
        "samples of the full pass: a coarser pass on N + N/4, corrected by the full one on N/4 "
        "(docs/defaults.md).",
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
    device: DeviceOption = DEVICE_DEFAULT,
    seed: SeedOption = 0,
    progress: ProgressOption = True,
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
    # Imported here: the settings table imports torch (instant --help).
    from globeflow.apps.settings import LOCATE_LIMITS

    if (photos is None) == (embeddings is None):
        fail("give photos or --embeddings STORE (one of them)")
    for p in photos or [embeddings]:
        if not p.exists():
            fail(f"{p}: no such file or folder")
    check_options(
        LOCATE_LIMITS,
        num_samples=num_samples,
        first_samples=first_samples,
        noise=noise,
        guidance=guidance,
        steps=steps,
        solver=solver,
        grid=grid,
        precision=precision,
        localizability_samples=localizability_samples,
        top_k=top_k,
        region_radius_km=region_radius_km,
        fusion_proposals=fusion_proposals,
    )
    small_outputs = {"--json": json_out, "--csv": csv_out, "--geojson": geojson_out}
    needs_out = {"--jsonl": jsonl, "--keep-samples": keep_samples, "--overwrite": overwrite,
                 "--save-every-s": save_every_s is not None}  # fmt: skip
    if out is None and (given := [name for name, value in needs_out.items() if value]):
        fail(f"{given[0]} goes with --out DIR (the answers folder)")
    asked = [name for name, path in {**small_outputs, "--map": map_dir}.items() if path]
    if asked and os.environ.get("WORLD_SIZE", "1") != "1":
        fail(f"{asked[0]} needs one process; under torchrun use --out")
    if photos and all(p.is_dir() for p in photos):
        _refuse_folders_without_photos(photos)
    in_memory = same_place or within is not None
    if in_memory and (embeddings is not None or out is not None):
        option = "--same-place" if same_place else "--within"
        fail(f"{option} answers photos in memory: give photos, without --embeddings or --out")
    check_small_run(asked or (["--same-place"] if in_memory else []), photos, embeddings)
    region = _parse_within(within)
    reads = [*(photos or []), *([embeddings] if embeddings is not None else [])]
    if asked:  # a photo found inside an input folder is an input too
        reads += _listed_photos(photos or [])
    check_outputs(files=small_outputs, folders={"--map": map_dir, "--out": out}, reads=reads)
    locator = load_locator(model, encoder, family, encoder_path, device)
    samples = num_samples or locator.sampler.num_samples
    if keep_samples > samples:
        fail(f"--keep-samples {keep_samples}: must be at most --num-samples ({samples})")
    settings = dict(
        num_samples=num_samples,
        first_samples=first_samples,
        noise=noise,
        guidance=resolved_guidance(guidance, locator, LOCATE_LIMITS),
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
    from globeflow.data.images import IMAGE_EXTENSIONS  # imported here: PIL (instant --help)

    if not any(holds_photo(f, IMAGE_EXTENSIONS) for f in folders):
        fail_no_photos(folders)


def _listed_photos(inputs: list[Path]) -> list[Path]:
    """The photo files of the inputs (folders searched), for the output-path check."""
    from globeflow.data.images import IMAGE_EXTENSIONS  # imported here: PIL (instant --help)

    try:
        return find_photos(inputs, IMAGE_EXTENSIONS)[0]
    except (ValueError, OSError):
        return []  # nothing to protect; the run itself reports the inputs


UNFUSED_SETTINGS = ("guidance", "localizability_samples", "grid", "first_samples", "noise")
"""predict's settings that a fused answer does not take."""


def _predict_in_memory(
    locator, photos, settings, small_outputs, map_dir, progress, *, same_place, region,
    fusion_proposals,
) -> None:  # fmt: skip
    """``predict --within`` / ``--same-place``: answers held in memory (small runs), the fused
    answer added to them; exits as ``predict`` says."""
    # Imported here: apps.outputs and core.families import torch, data.images PIL.
    from globeflow.apps.outputs import photo_labels
    from globeflow.core.families import NonFiniteOutputError
    from globeflow.data.images import IMAGE_EXTENSIONS

    try:
        paths, unreadable = find_photos(photos, IMAGE_EXTENSIONS)
    except (ValueError, OSError) as exc:
        fail(str(exc))
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
        fail(f"{locator.model_name}: {exc}", code=1)
    except ValueError as exc:  # a model that cannot fuse photos
        fail(f"--same-place: {locator.model_name}: {exc}")
    located = any(r.get("ok") for r in results)
    title = f"globeflow ({locator.model_name}, {locator.encoder_name})"
    radius = settings["region_radius_km"]
    results = show_answers(title, results, labels, radius, small_outputs, map_dir, progress)
    report_region_and_fusion(results)
    failed = report_unreadable(results)
    if not located and not failed:  # every answer refused: nothing inside --within
        fail("no answer: every photo's answer was refused (reasons above)", code=1)
    if not located:
        fail(f"none of the {failed} photos could be read (listed above)", code=1)


def _parse_within(within: str | None):
    """The --within region (None without it), or a one-line failure."""
    # Imported here: answers.within imports torch (instant --help).
    from globeflow.answers.within import RegionError, parse_region

    if within is None:
        return None
    try:
        return parse_region(within)
    except RegionError as exc:
        fail(f"--within {exc}")


def _add_fused_answer(locator, paths, results, labels, embedded, region, proposals, **settings):
    """The per-photo results and labels followed by the photos' fused answer (--same-place),
    from the embeddings their own answers used (``embedded``: path -> embedding)."""
    import torch  # imported here: torch loads only when predict runs (instant --help)

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


def _model_solver(solver: str | None, locator) -> str | None:
    """--solver, if the loaded model's family has it (each family has its own solvers)."""
    solvers = getattr(locator.model, "solvers", ())
    if solver is not None and solver not in solvers:
        fail(
            f"--solver {solver}: a {locator.model.family} model takes "
            f"{', '.join(solvers) or 'no solver option'}"
        )
    return solver
