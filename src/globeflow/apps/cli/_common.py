"""What the ``globeflow`` commands share: failing in one line, the options several commands take
(as ``Annotated`` aliases), loading the model, checking options and output paths.

Imports run one way: the root (:mod:`globeflow.apps.cli`) -> a command module -> this module.
Heavy modules (torch, the model) are imported inside the functions that need them, so that
``globeflow --help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from globeflow.data.file_names import printable_path

PIPED_COLUMNS = 140
"""Width of help and tables written to a pipe or a log, where rich would take 80 columns."""
SMALL_RUN_PHOTOS = 1000
"""Most photos for --json/--csv/--geojson/--map (every answer in memory; --out streams)."""

FAMILY_HELP = "Family of a PLONK checkpoint (rfm, flow, diffusion); default: its config or name."
ENCODER_PATH_HELP = "Hub id or local directory for hub encoders."
SEED_HELP = "Random seed (same seed, same answers)."
PROGRESS_HELP = "Show progress bars on stderr."
DEVICE_DEFAULT = "auto"
DEVICE_HELP = "auto, cpu, cuda or cuda:N (the network and the hub encoders; auto: a GPU if any)."

ModelOption = Annotated[
    str | None, typer.Option(help="Model directory or hub id (default: bundled model).")
]
FamilyOption = Annotated[str | None, typer.Option(help=FAMILY_HELP)]
EncoderPathOption = Annotated[str | None, typer.Option(help=ENCODER_PATH_HELP)]
DeviceOption = Annotated[str, typer.Option(help=DEVICE_HELP)]
SeedOption = Annotated[int, typer.Option(help=SEED_HELP)]
ProgressOption = Annotated[bool, typer.Option(help=PROGRESS_HELP)]


def piped_columns() -> int | None:
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


class CommandGroup(_FlagsWithoutType, typer.core.TyperGroup):
    """The ``globeflow`` group (its help lists switches without a type)."""


class Command(_FlagsWithoutType, typer.core.TyperCommand):
    """A ``globeflow`` command (its help lists switches without a type)."""


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and exit: 2 for bad options, paths or models (nothing was done), 1
    when the work itself gave nothing usable."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def fail_no_photos(inputs) -> None:
    """Fail naming the inputs in which no photo was found, and the file endings looked for."""
    from globeflow.data.images import IMAGE_EXTENSIONS  # imported here: PIL (instant --help)

    where = ", ".join(printable_path(p) for p in inputs)
    fail(f"no photos found in {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")


def is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun job (they stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def check_options(limits: dict, **values) -> None:
    """Fail naming the first option whose value ``limits`` does not allow."""
    # Imported here: the settings table imports torch (instant --help).
    from globeflow.apps.settings import SettingError, check_settings

    try:
        check_settings(values, limits)
    except SettingError as exc:
        fail(f"--{exc.name.replace('_', '-')} {exc.value}: must be {exc.expected}")


def check_outputs(files: dict | None = None, folders: dict | None = None, reads=()) -> None:
    """Fail in one line when an output path would overwrite an input or cannot be written."""
    # Imported here: apps.outputs imports torch (instant --help).
    from globeflow.apps.outputs import OutputPathError, check_output_paths

    try:
        check_output_paths(files, folders, reads)
    except OutputPathError as exc:
        fail(str(exc))


def load_locator(
    model: str | None,
    encoder: str | None,
    family: str | None,
    encoder_path: str | None,
    device: str = DEVICE_DEFAULT,
):
    """The Locator on ``device`` (its encoder too where it takes a device), or a one-line
    failure naming the model, the encoder or the device."""
    # Imported here: the model, the encoders and torch load only when a command runs.
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
            fail(f"--encoder {encoder}: {exc}")
        fail(f"{model or 'the bundled model'}: its metadata names an {exc}; pass --encoder")
    except (ValueError, OSError) as exc:
        fail(str(exc))


def resolved_guidance(guidance: float | None, locator, limits: dict) -> float:
    """--guidance, else the model's recommendation, checked against the same range."""
    if guidance is not None:
        return guidance
    rule = limits["guidance"]
    if not rule.allows(locator.default_guidance):
        fail(
            f"{locator.model_name}: recommended_guidance {locator.default_guidance} is not "
            f"{rule.describe()}; pass --guidance"
        )
    return locator.default_guidance
