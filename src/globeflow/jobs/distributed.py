"""Where a job runs: one process or many under ``torchrun``, on which device, in which precision.

``torchrun`` starts one process per device and tells each its place through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`join_process_group` reads them, picks the device (``cuda:LOCAL_RANK`` when CUDA is
available, else the CPU) and the backend (NCCL for CUDA devices, gloo for the CPU) and starts
``torch.distributed``. Without those variables the job runs in one process, no process group
exists and every collective helper here returns at once, so the single-process path pays nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

from globeflow.core.guidance import PRECISIONS, check_precision

__all__ = [
    "PRECISIONS",
    "Placement",
    "Prefetcher",
    "autocast",
    "join_process_group",
    "leave_process_group",
    "on_main_first",
    "rank_slice",
    "resolve_device",
    "to_device",
]


@dataclasses.dataclass(frozen=True)
class Placement:
    """This process's place in the job: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """True when :func:`join_process_group` started the process group (and must end it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, models, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable value)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over the ranks (a new tensor; ``value`` is left as it was)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or None): ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cuda``:
    ``cuda:LOCAL_RANK``; ``cpu``; or an explicit ``cuda:N``. A clear error for anything else."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(
            f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def join_process_group(device: str | None = "auto") -> Placement:
    """This process's :class:`Placement`; under ``torchrun`` (``WORLD_SIZE`` > 1) the process
    group is started here unless the caller already started one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return Placement(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Placement(rank, world, local_rank, dev, owns_group=owns)


def leave_process_group(place: Placement) -> None:
    """End the process group if :func:`join_process_group` started it."""
    if place.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def on_main_first(place: Placement, make):
    """``make(True)`` on rank 0, then ``make(False)`` on the other ranks; an error of rank 0's
    call (ValueError, OSError: a refused or unusable output) is raised on every rank instead of
    leaving them waiting. For work only one process may do first (check, clean, create)."""
    result, error = None, None
    if place.is_main:
        try:
            result = make(True)
        except (ValueError, OSError) as exc:
            error = exc
    error = place.broadcast(error)
    if error is not None:
        raise error
    return result if place.is_main else make(False)


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of ``range(n)``; the first ``n % world_size`` ranks get one
    more, so the shares differ by at most one and cover ``range(n)`` in rank order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``; nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Prefetcher:
    """Runs an iterator of tensor tuples (or objects with tensor fields) in a background thread,
    ``depth`` items ahead, and moves each item's tensors to ``device`` (through pinned memory
    with a non-blocking copy on CUDA). Exceptions of the producer are raised by ``next``.

    The order of the items is the iterator's: one producer thread, one consumer.
    """

    _DONE = object()

    def __init__(self, items: Iterator, device: torch.device, depth: int = 2) -> None:
        self._items = items
        self._device = device
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="prefetch")
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                self._put(_map_tensors(item, self._pin))
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._device.type == "cuda" else t

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return to_device(item, self._device)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def _map_tensors(item, fn):
    """``item`` with ``fn`` applied to each tensor field (a tuple, or a dataclass instance)."""
    if isinstance(item, torch.Tensor):
        return fn(item)
    if isinstance(item, tuple):
        return tuple(_map_tensors(x, fn) for x in item)
    if dataclasses.is_dataclass(item):
        changes = {
            f.name: fn(getattr(item, f.name))
            for f in dataclasses.fields(item)
            if isinstance(getattr(item, f.name), torch.Tensor)
        }
        return dataclasses.replace(item, **changes)
    return item


def to_device(item, device: torch.device):
    """``item`` (see :class:`Prefetcher`) with its tensors on ``device``."""
    if device.type == "cpu":
        return item
    return _map_tensors(item, lambda t: t.to(device, non_blocking=True))
