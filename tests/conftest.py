"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent, and fail
when CI=true (CI has it: a missing copy there is an error, not a reason to test less)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLOBEFLOW_SHARED", REPO.parent / "shared"))
PLONK_COMPAT = SHARED / "compat" / "plonk"

# The test models are tiny: one intra-op thread is as fast, and it cannot be starved by
# oversubscription when other jobs share the two cores (two threads were >10x slower then).
torch.set_num_threads(1)
# ... and the command line's automatic thread policy leaves it so (it defers to this variable).
os.environ["OMP_NUM_THREADS"] = "1"


def require_shared(path: Path, what: str) -> None:
    """Skip (fail under CI=true) when ``path`` of ../shared is missing."""
    if path.exists():
        return
    message = f"{what} not found at {path} (set GLOBEFLOW_SHARED to the shared folder)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true: tests that need ../shared fail instead of skipping")
    pytest.skip(message)


@pytest.fixture
def plonk_compat() -> Path:
    require_shared(PLONK_COMPAT / "tiny" / "vectors.json", "PLONK compat files")
    return PLONK_COMPAT
