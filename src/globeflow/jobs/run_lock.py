"""One job per run directory, and no worker outliving its launcher.

:func:`locked_run_directory` is how a job enters its run directory: process group joined,
directory made and locked, launcher watched.

:func:`run_lock` holds an exclusive ``flock`` on ``<run>/.lock`` for the whole run. The kernel
drops the lock when the holding process ends, however it ends (``kill -9`` included), so a lock
file left by a dead process is stale by construction and is simply taken over. The file names
the holder (PID and host, and the ``torchrun`` launcher's PID) so that a second job can say who
uses the directory. Under ``torchrun`` rank 0 holds the lock for the whole job and every rank
learns whether it got it.

:func:`exit_with_launcher` makes a ``torchrun`` worker stop when its launcher dies: a daemon
thread watches the parent PID and, when the launcher is gone, sends this process SIGTERM (the
training job checkpoints and stops at the next step boundary, see
:mod:`globeflow.jobs.stop_signals`) and ends it outright after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from globeflow.jobs.distributed import Placement, join_process_group, leave_process_group

__all__ = [
    "LOCK_NAME",
    "RunDirectoryBusy",
    "exit_with_launcher",
    "locked_run_directory",
    "run_lock",
]

LOCK_NAME = ".lock"
ORPHAN_GRACE_S = 60.0
"""Seconds an orphaned worker gets to checkpoint and stop after SIGTERM before it is ended."""


_watching = False


class RunDirectoryBusy(ValueError):
    """The run directory is locked by another live job."""


def _holder(path: Path) -> str:
    """'PID N on HOST' (and its launcher) as written by the lock's holder."""
    try:
        info = json.loads(path.read_text())
        text = f"PID {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (the lock file names no holder)"
    if info.get("launcher_pid"):
        text += f" (torchrun launcher PID {int(info['launcher_pid'])})"
    return text


def _launcher_pid() -> int | None:
    """The ``torchrun`` launcher's PID when this process is one of its workers."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


@contextlib.contextmanager
def _flock(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): run unlocked
        yield
        return
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(
                f"{directory} is in use by {_holder(path)}; wait for that run to finish, stop it, "
                "or choose another output directory"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "launcher_pid": _launcher_pid()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


@contextlib.contextmanager
def run_lock(directory: Path, is_main: bool = True, share: Callable | None = None) -> Iterator:
    """Hold the run directory's lock for the block: on rank 0 only (``is_main``), the outcome
    handed to every rank by ``share`` (e.g. ``Placement.broadcast``) so that all ranks raise
    :class:`RunDirectoryBusy` together when another job holds it."""
    share = share or (lambda value: value)
    with contextlib.ExitStack() as stack:
        problem = None
        if is_main:
            try:
                stack.enter_context(_flock(Path(directory)))
            except RunDirectoryBusy as exc:
                problem = str(exc)
        problem = share(problem)
        if problem:
            raise RunDirectoryBusy(problem)
        yield


@contextlib.contextmanager
def locked_run_directory(
    out_dir: str | os.PathLike[str], device: str | None = "auto"
) -> Iterator[tuple[Path, Placement]]:
    """(run directory, placement) for a job's block: the process group joined (and left after
    it), the directory made and locked against a second job, torchrun workers bound to their
    launcher's life."""
    place = join_process_group(device)
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        exit_with_launcher()
        with run_lock(out, place.is_main, place.broadcast):
            yield out, place
    finally:
        leave_process_group(place)


def exit_with_launcher(grace_s: float = ORPHAN_GRACE_S, poll_s: float = 0.5) -> bool:
    """Under ``torchrun``: watch the launcher from a daemon thread; once it is gone, SIGTERM
    this process and, ``grace_s`` later, end it (exit status 143). Returns whether it watches."""
    global _watching
    launcher = _launcher_pid()
    if launcher is None or launcher <= 1 or _watching:
        return _watching
    _watching = True

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="globeflow-launcher-watch", daemon=True).start()
    return True
