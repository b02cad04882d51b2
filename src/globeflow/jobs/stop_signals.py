"""Stop a training run cleanly on SIGTERM (a cluster's pre-emption) or SIGINT (Ctrl-C).

While :class:`StopRequests` is installed, the signals only record that a stop was asked for;
the training loop asks :class:`StopAgreement` after every step whether to stop, checkpoints
and raises :class:`TrainingStopped` (exit status 128 + signal: 143, 130). Under ``torchrun``
every rank must stop at the same step, since the checkpoint and the collectives need them all:
the ranks combine their requests with an all-reduce (maximum) on a CPU process group, started
after one step and read after the next, so that no step waits for it. A second Ctrl-C stops at
once (KeyboardInterrupt), as a user pressing it twice expects.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["StopAgreement", "StopRequests", "TrainingStopped"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """A run stopped by a signal after saving a checkpoint at a step boundary."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped at step {step} with a checkpoint "
            f"in {checkpoint}; run the same command again to resume"
        )


class StopRequests:
    """Context manager recording SIGTERM / SIGINT instead of dying (main thread only; in other
    threads, where Python cannot install handlers, signals keep their usual effect)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class StopAgreement:
    """The signal every rank stops for (0: go on), the same on every rank at the same step."""

    def __init__(self, requests: StopRequests, distributed: bool) -> None:
        self.requests = requests
        self.distributed = distributed
        self._group = None
        if distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # CPU tensors: no device sync
        self._pending: tuple[torch.Tensor, object] | None = None

    def check(self) -> int:
        """Called by every rank after every step."""
        if not self.distributed:
            return self.requests.signum
        agreed = 0
        if self._pending is not None:
            flag, work = self._pending
            work.wait()
            agreed = int(flag)
        flag = torch.tensor(self.requests.signum, dtype=torch.int64)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (flag, work)
        return agreed

    def close(self) -> None:
        """Wait for the last all-reduce (every rank started the same ones)."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
