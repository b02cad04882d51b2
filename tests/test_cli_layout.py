"""The layout of the command line (apps/cli/): the root builds the app and registers one module
per command; imports run one way, root -> command -> shared helpers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

CLI = Path(__file__).parents[1] / "src" / "globeflow" / "apps" / "cli"
COMMANDS = ("embed", "train", "predict", "evaluate", "serve")
ROOT = "globeflow.apps.cli"


def _imported(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (``from a import b``: both
    ``a`` and ``a.b``, which may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_modules_of_the_command_line_import_neither_the_root_nor_a_command():
    for path in sorted(CLI.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        imported = _imported(path)
        assert ROOT not in imported, path.name
        others = {f"{ROOT}.{name}" for name in COMMANDS if name != path.stem}
        assert not imported & others, (path.name, imported & others)


def test_the_root_registers_every_command():
    from globeflow.apps.cli import app

    assert [c.callback.__module__ for c in app.registered_commands] == [
        f"{ROOT}.{name}" for name in COMMANDS
    ]


def test_python_dash_m_runs_the_command_line():
    env = {**os.environ, "PYTHONPATH": str(CLI.parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", ROOT, "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"Usage: python -m {ROOT} [OPTIONS] COMMAND" in result.stdout
    for name in COMMANDS:
        assert name in result.stdout


def test_train_family_choices_are_the_registered_families():
    """The CLI keeps its choices torch-free (instant --help); they must be the registry's."""
    from globeflow.apps.cli.train import Family
    from globeflow.core.families import FAMILY_NAMES

    assert [f.value for f in Family] == list(FAMILY_NAMES)
