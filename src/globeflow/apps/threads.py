"""How many CPU threads torch gets, and how they wait: the default policy behind ``--threads``.

torch starts one OpenMP thread per core, and by default those threads spin while they wait for
each other. On a 2-core machine shared with other CPU-bound work, the thread that shares a core
with another process reaches every barrier late while the other burns its core spinning: the
forward + JVP pass of a small network took 135 ms with 2 threads against 17 ms with 1. Waiting
is what hurts, not the second thread. Measured with ``benchmarks/threads.py`` (docs/benchmarks.md),
idle and beside a CPU-bound process, on the bundled model and the published-size network:

* with anything else running, 2 spinning threads were 1.6-8x slower than the best setting
  (single runs up to 37x);
* 2 passive threads (they sleep at once) were the best setting or within 6% of it, except for
  the small bundled model on a nearly idle machine, where spinning is 1.5-1.9x faster (its
  parallel regions last about as long as a wake-up); no fixed setting is within 1.2x of the
  best both idle and busy for that model, and passive waiting bounds the loss;
* choosing 1 thread when cores looked busy (/proc/stat) lost 1.4-1.8x beside other processes
  (two threads get two shares of the CPU), so the load is not an input of the policy.

* a narrow network (the bundled one: width 128) answers a photo fastest on one thread, idle or
  busy: its parallel regions (and the best guess's and regions' small operations) last about as
  long as waking a sleeping thread, so passive waiting made ``predict``'s per-photo work up to
  3x slower than one thread, and spinning is what a shared CPU punishes.

So the default is one thread per usable core (the CPU affinity, capped by a cgroup CPU quota,
which torch itself ignores) with ``OMP_WAIT_POLICY=PASSIVE``, and one thread while a network
narrower than :data:`SMALL_NETWORK_WIDTH` answers (:func:`network_threads`), with photos
answered side by side on the cores instead (:func:`network_workers`). ``--threads N``
(N >= 1) and ``OMP_NUM_THREADS`` win over the thread count; ``--threads 0`` means "automatic",
as does leaving the option out. The wait policy applies whenever torch is not imported yet and
the user has not set ``OMP_WAIT_POLICY``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
WAIT_POLICY = "PASSIVE"
SMALL_NETWORK_WIDTH = 256
"""Networks narrower than this run on one thread under the automatic policy (module docstring);
the published networks (width 512) keep one thread per core."""

_automatic = False
"""Whether the last :func:`apply_thread_policy` chose the thread count itself."""


class ThreadRequestError(ValueError):
    """A ``--threads`` value that is not a thread count."""


@dataclass(frozen=True)
class ThreadChoice:
    """What was decided, and from what."""

    threads: int | None
    """Intra-op threads set; None when ``OMP_NUM_THREADS`` decides (torch reads it itself)."""
    source: str
    """"--threads", "OMP_NUM_THREADS" or "automatic"."""


def parse_thread_request(value: int | None) -> int | None:
    """``--threads`` value -> a thread count, or None for the automatic policy (None or 0)."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise ThreadRequestError(
            f"--threads {value}: must be a number of threads (1 or more), or 0 for automatic"
        )
    return value


def cpus_allowed(affinity: int, cpu_max: str | None) -> int:
    """Cores a process may use: ``affinity`` cores, capped by a cgroup v2 ``cpu.max`` quota
    ("QUOTA PERIOD" or "max PERIOD"; None without one), at least 1."""
    cpus = affinity
    if cpu_max:
        fields = cpu_max.split()
        if len(fields) >= 2 and fields[0] != "max":
            try:
                cpus = min(cpus, math.ceil(int(fields[0]) / int(fields[1])))
            except (ValueError, ZeroDivisionError):
                pass
    return max(1, cpus)


def usable_cpus() -> int:
    """:func:`cpus_allowed` for this process."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 1
    try:
        cpu_max = CGROUP_CPU_MAX.read_text()
    except OSError:
        cpu_max = None
    return cpus_allowed(affinity, cpu_max)


def apply_thread_policy(
    requested: int | None = None, environ: dict[str, str] | None = None
) -> ThreadChoice:
    """Decide and set torch's intra-op threads and wait policy (module docstring).

    Before torch is imported the automatic choice only sets environment variables
    (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``), so that the command line does not pay for
    importing torch here; afterwards, or for an explicit count, it calls
    ``torch.set_num_threads`` too (once torch is imported the wait policy can no longer change).
    """
    environ = os.environ if environ is None else environ
    count = parse_thread_request(requested)
    if count is None and environ.get("OMP_NUM_THREADS", "").strip():
        choice = ThreadChoice(None, "OMP_NUM_THREADS")
    elif count is None:
        choice = ThreadChoice(usable_cpus(), "automatic")
    else:
        choice = ThreadChoice(count, "--threads")
    if "torch" not in sys.modules:
        environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
        if choice.threads is not None:
            environ["OMP_NUM_THREADS"] = str(choice.threads)
    global _automatic
    _automatic = choice.source == "automatic"
    if choice.threads is not None and ("torch" in sys.modules or choice.source == "--threads"):
        # torch caps the variable at the core count; an explicit count is honoured exactly.
        import torch

        torch.set_num_threads(choice.threads)
    return choice


def threads_for_network(width: int | None, current: int) -> int:
    """Intra-op threads for answering with a network of this width, given ``current`` ones:
    one for a narrow network when the policy chose the count automatically, else ``current``
    (also for ``width`` None: no network, as in the baselines)."""
    narrow = width is not None and width < SMALL_NETWORK_WIDTH
    return 1 if _automatic and narrow else current


def network_workers(width: int | None) -> int:
    """How many photo chunks to answer side by side for a network of this width: for a narrow
    network under the automatic policy, one per thread the policy chose (each chunk then runs on
    one thread, :func:`network_threads`, so the cores a narrow network cannot share within one
    operation are shared across photos, :func:`globeflow.core.parallel.map_on_cores`); 1
    otherwise."""
    import torch

    narrow = width is not None and width < SMALL_NETWORK_WIDTH
    return max(1, torch.get_num_threads()) if _automatic and narrow else 1


@contextmanager
def network_threads(width: int | None) -> Iterator[None]:
    """Run the block with :func:`threads_for_network` threads, restoring the count after."""
    import torch

    before = torch.get_num_threads()
    wanted = threads_for_network(width, before)
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)
