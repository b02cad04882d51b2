"""The ``globeflow`` command line: embed, train, predict, evaluate, serve.

This module builds the app and registers one module per command; each command is a thin
wrapper over a library function, and heavy imports happen inside commands so that
``globeflow --help`` is instant. Shared pieces live in :mod:`globeflow.apps.cli._common`.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from globeflow.apps.cli import embed, evaluate, predict, serve, train
from globeflow.apps.cli._common import Command, CommandGroup, fail, piped_columns
from globeflow.apps.threads import ThreadRequestError, apply_thread_policy

__all__ = ["app", "main"]

app = typer.Typer(
    cls=CommandGroup,
    help="globeflow: where on Earth was this photo taken? A probability distribution over the "
    "globe from a frozen image encoder and a flow-matching model on the sphere (PLONK).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _configure(
    threads: int = typer.Option(
        None,
        help="CPU threads for torch. Default (or 0): automatic, one per usable core, waiting "
        "passively (never spinning, which is several times slower on a shared CPU); "
        "OMP_NUM_THREADS also overrides it.",
    ),
) -> None:
    try:
        apply_thread_policy(threads)
    except ThreadRequestError as exc:
        fail(str(exc))
    warnings.showwarning = _show_warning


_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """globeflow's own warnings (e.g. a store whose ids repeat) as one line on stderr; others as
    Python shows them."""
    if category.__module__.startswith("globeflow."):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


for _command in (embed.embed, train.train, predict.predict, evaluate.evaluate, serve.serve):
    app.command(cls=Command)(_command)


def main() -> None:  # pragma: no cover
    columns = piped_columns()
    if columns is not None:  # typer reads it when it first draws help or a usage error
        os.environ.setdefault("TERMINAL_WIDTH", str(columns))
    sys.exit(app())
