"""The Makefile installs torch from the index it is given, and from pip's own index otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _setup_commands(tmp_path, *variables: str) -> list[str]:
    """The commands `make setup` would run for a fresh virtual environment (dry run)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), "setup", f"VENV={tmp_path / 'venv'}", *variables],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


def _torch_install(lines: list[str]) -> str:
    (line,) = [x for x in lines if "pip install" in x and "torch==" in x]
    return line


def test_torch_comes_from_the_given_index(tmp_path) -> None:
    commands = _setup_commands(tmp_path, f"TORCH_INDEX_URL={CPU_INDEX}")
    line = _torch_install(commands)
    assert f"--index-url {CPU_INDEX}" in line
    assert line.index("--index-url") < line.index("torch==2.13.0")
    package = [x for x in commands if "-e " in x]
    assert package and all("--index-url" not in x for x in package)  # the rest: pip's index


def test_without_an_index_pip_keeps_its_configuration(tmp_path) -> None:
    line = _torch_install(_setup_commands(tmp_path))
    assert "--index-url" not in line and "--extra-index-url" not in line
