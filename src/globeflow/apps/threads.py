"""How many CPU threads torch gets, and how they wait: the default policy behind ``--threads``.

Why a policy: torch starts one OpenMP thread per core, and those threads spin while they wait
for each other. On a 2-core machine where another CPU-bound process runs, the thread that shares
a core with it reaches every barrier late while the other burns its core spinning; the forward +
JVP pass of a small network took 135 ms with 2 threads against 17 ms with 1. Idle, 2 threads
make the published-size network about 1.8x faster. So the default is:

* threads = the usable cores that are at least half idle right now (sampled from /proc/stat over
  :data:`SAMPLE_WINDOW_S`, this process's own CPU time left out), at least 1;
* OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, when torch is not imported yet and
  the user has not chosen), so that a process that starts competing later costs us its share of
  the CPU rather than a spinning barrier.

``benchmarks/threads.py`` measures the policy against every fixed thread count, idle and beside a
CPU-bound process (docs/benchmarks.md). ``--threads N`` (N >= 1) and ``OMP_NUM_THREADS`` always
win over the policy; ``--threads 0`` means "automatic", as does leaving the option out.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_WINDOW_S = 0.1
"""How long the CPU use of other processes is sampled (s). /proc/stat counts in 10 ms ticks,
so 0.1 s on 2 cores resolves about 0.1 busy core."""

BUSY_FRACTION_PER_THREAD = 0.5
"""A core counts as free when less than this fraction of it is busy: a thread sharing a core
with a process that takes a fraction f of it runs at 1 - f, and two threads beat one only while
(1 - f) > 1/2."""

PROC_STAT = Path("/proc/stat")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


class ThreadRequestError(ValueError):
    """A ``--threads`` value that is not a thread count."""


@dataclass(frozen=True)
class ThreadChoice:
    """What was decided, and from what."""

    threads: int | None
    """Intra-op threads set; None when ``OMP_NUM_THREADS`` holds something torch will parse."""
    source: str
    """"--threads", "OMP_NUM_THREADS" or "automatic"."""
    usable_cpus: int
    busy_cpus: float | None = None
    """Cores busy with other processes when the automatic choice was made (None: not measured)."""


def parse_thread_request(value: int | None) -> int | None:
    """``--threads`` value -> a thread count, or None for the automatic policy (None or 0)."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise ThreadRequestError(
            f"--threads {value}: must be a number of threads (1 or more), or 0 for automatic"
        )
    return value


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def cpu_ticks(stat_text: str, cpus: set[int] | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks since boot from the text of /proc/stat, summed over the given
    cores (all "cpuN" lines when None). Idle time is idle + iowait; everything else, steal
    included, is time these cores were not available to us."""
    busy = total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in rest.split()[:8]]
        idle = ticks[3] + ticks[4]
        total += sum(ticks)
        busy += sum(ticks) - idle
    return busy, total


def busy_cpus_between(
    before: tuple[int, int],
    after: tuple[int, int],
    num_cpus: int,
    own_cpu_s: float,
    wall_s: float,
) -> float:
    """Cores kept busy by *other* processes between two :func:`cpu_ticks` readings.

    ``own_cpu_s``: this process's CPU seconds over the same ``wall_s`` seconds.
    """
    d_busy, d_total = after[0] - before[0], after[1] - before[1]
    if d_total <= 0:
        return 0.0
    busy_all = num_cpus * d_busy / d_total
    return min(float(num_cpus), max(0.0, busy_all - own_cpu_s / max(wall_s, 1e-9)))


def measure_busy_cpus(window_s: float = SAMPLE_WINDOW_S) -> float | None:
    """Cores busy with other processes, sampled over ``window_s`` seconds (None off Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        before = cpu_ticks(PROC_STAT.read_text(), cpus)
        own0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        after = cpu_ticks(PROC_STAT.read_text(), cpus)
        own1, wall1 = time.process_time(), time.perf_counter()
    except (OSError, AttributeError, ValueError):
        return None
    return busy_cpus_between(before, after, len(cpus), own1 - own0, wall1 - wall0)


def choose_threads(usable: int, busy: float | None) -> int:
    """Threads for ``usable`` cores of which ``busy`` are taken by other processes.

    One thread per core that is at least half free, and at least one. Unknown load (None):
    one thread per usable core, as torch would choose.
    """
    if busy is None:
        return max(1, usable)
    free = usable - busy
    return max(1, min(usable, math.floor(free + (1.0 - BUSY_FRACTION_PER_THREAD))))


def apply_thread_policy(
    requested: int | None = None, environ: dict[str, str] | None = None
) -> ThreadChoice:
    """Decide and set torch's intra-op threads (see the module docstring); returns the choice.

    Before torch is imported the automatic choice only sets environment variables
    (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``), so that the command line does not pay for
    importing torch here; afterwards, or for an explicit count, it calls
    ``torch.set_num_threads`` too (once torch is imported the wait policy can no longer change).
    """
    environ = os.environ if environ is None else environ
    count = parse_thread_request(requested)
    cpus = usable_cpus()
    if count is not None:
        choice = ThreadChoice(count, "--threads", cpus)
    elif environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(None, "OMP_NUM_THREADS", cpus)
    else:
        busy = measure_busy_cpus()
        choice = ThreadChoice(choose_threads(cpus, busy), "automatic", cpus, busy)
    if "torch" not in sys.modules:
        environ["OMP_NUM_THREADS"] = str(choice.threads)
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules or choice.source == "--threads":
        # torch caps the variable at the core count; an explicit count is honoured exactly.
        import torch

        torch.set_num_threads(choice.threads)
    return choice
