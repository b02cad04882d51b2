"""Independent pieces of CPU work side by side, one Python thread per core, each running its
torch operations on one thread of its own.

Why: the command line runs torch's threads with ``OMP_WAIT_POLICY=PASSIVE`` (they sleep as soon
as they wait: what a shared CPU needs, :mod:`globeflow.apps.threads`), so every parallel region
starts by waking them. Where the regions are short (a likelihood solve of 64 points: 192 rows
per matrix product) the waking costs as much as the work: the YFCC-size network's exact
log-likelihood of 64 points took 2.18 s on 2 passive threads, 1.38 s on 2 spinning ones and
1.46 s as two halves of 32 points on one thread each, with the same values bit for bit (AMD
EPYC, 2 cores, idle). Halves on one thread each need no waking at all, and torch releases the
GIL inside its operations. The thread count set in a worker is that worker's own (OpenMP's
and MKL's per-thread settings): the caller's stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def cpu_workers(device: torch.device | str, items: int) -> int:
    """How many workers :func:`map_on_cores` should use for ``items`` independent pieces on
    ``device``: torch's intra-op thread count on a CPU (at most one per piece), else 1 (an
    accelerator runs its own parallelism)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), items))


def split_evenly(count: int, parts: int) -> list[slice]:
    """``count`` items as ``parts`` contiguous slices whose sizes differ by at most one (no
    empty slice)."""
    parts = max(1, min(parts, count))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def map_on_cores(function: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[function(item) for item in items]``, on ``workers`` Python threads when more than one,
    each running torch on one intra-op thread, in the caller's autograd mode; results in the
    order of ``items``. One worker (or one item): in the calling thread, as it is."""
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    grad = torch.is_grad_enabled()

    def run(item: T) -> R:
        torch.set_num_threads(1)  # this worker's own setting
        with torch.set_grad_enabled(grad):  # autograd mode is per thread
            return function(item)

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(run, items))
