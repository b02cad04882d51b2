"""Interrupt a training run in this process at a chosen step (a Ctrl-C as the job sees it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from globeflow.jobs import training


@contextlib.contextmanager
def interrupted_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Within the block, the ``step``-th EMA update (1-based) raises KeyboardInterrupt, so the
    run stops after its optimiser update of that step and before anything else of it."""
    calls = {"n": 0}
    real = training.update_ema

    def update(*args):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(training, "update_ema", update)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(training, "update_ema", real)
