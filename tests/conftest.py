"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent."""

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


@pytest.fixture
def plonk_compat() -> Path:
    if not (PLONK_COMPAT / "tiny" / "vectors.json").is_file():
        pytest.skip(f"PLONK compat files not found at {PLONK_COMPAT}")
    return PLONK_COMPAT
