"""The default thread policy (chosen values for given cores and load, never timings) and the
command line's ``--threads`` option."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from globeflow.apps import threads as policy
from globeflow.apps.cli import app


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "usable, busy, expected",
    [
        (2, 0.0, 2),  # idle 2-core machine: both cores
        (2, 0.4, 2),  # a light job: our thread on its core still runs >= 60% of the time
        (2, 0.6, 1),  # past half a core, a second thread would wait for the slower one
        (2, 1.0, 1),  # one CPU-bound process beside us: the other core only
        (2, 1.9, 1),
        (2, 7.0, 1),  # never fewer than one thread
        (1, 0.0, 1),
        (16, 0.0, 16),
        (16, 3.2, 13),  # 12.8 free cores: the thirteenth is 80% free
        (16, 3.6, 12),  # 12.4 free: the thirteenth only 40%
        (2, None, 2),  # load unknown (no /proc/stat): torch's own default, one per core
    ],
)
def test_choose_threads(usable, busy, expected):
    assert policy.choose_threads(usable, busy) == expected


def test_thread_request_zero_is_automatic_and_negative_is_an_error():
    assert policy.parse_thread_request(None) is None
    assert policy.parse_thread_request(0) is None
    assert policy.parse_thread_request(3) == 3
    with pytest.raises(policy.ThreadRequestError, match=r"--threads -3: .*1 or more.*0 for auto"):
        policy.parse_thread_request(-3)


STAT_BEFORE = """cpu  300 0 100 800 20 0 0 0 0 0
cpu0 200 0 50 350 10 0 0 0 0 0
cpu1 100 0 50 450 10 0 0 0 0 0
intr 12345 0 0
ctxt 999
procs_running 3
"""
STAT_AFTER = """cpu  400 0 110 890 20 0 0 0 0 0
cpu0 290 0 55 355 10 0 0 0 0 0
cpu1 110 0 55 535 10 0 0 0 0 0
intr 12399 0 0
procs_running 2
"""


def test_cpu_ticks_reads_busy_and_total_per_core_set():
    # busy = user + nice + system + irq + softirq + steal; idle = idle + iowait
    assert policy.cpu_ticks(STAT_BEFORE) == (400, 1220)
    assert policy.cpu_ticks(STAT_BEFORE, {0}) == (250, 610)
    assert policy.cpu_ticks(STAT_BEFORE, {1}) == (150, 610)


def test_busy_cpus_between_leaves_out_our_own_cpu_time():
    before, after = policy.cpu_ticks(STAT_BEFORE), policy.cpu_ticks(STAT_AFTER)
    # core 0 busy 95 of 100 ticks, core 1 busy 15 of 100: 1.1 cores busy in all
    assert policy.busy_cpus_between(before, after, 2, own_cpu_s=0.0, wall_s=1.0) == pytest.approx(
        1.1
    )
    # of which we used 0.5 s per second ourselves
    assert policy.busy_cpus_between(before, after, 2, own_cpu_s=0.5, wall_s=1.0) == pytest.approx(
        0.6
    )
    assert policy.busy_cpus_between(before, after, 2, own_cpu_s=5.0, wall_s=1.0) == 0.0
    assert policy.busy_cpus_between(before, before, 2, own_cpu_s=0.0, wall_s=1.0) == 0.0


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_measure_busy_cpus_on_this_machine_is_a_core_count():
    busy = policy.measure_busy_cpus(window_s=0.05)
    assert busy is not None and 0.0 <= busy <= len(os.sched_getaffinity(0))


def test_usable_cpus_respects_a_cgroup_quota(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(policy, "CGROUP_CPU_MAX", cpu_max)
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")
    assert policy.usable_cpus() == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: still one thread
    assert policy.usable_cpus() == 1


def test_explicit_count_and_environment_win_over_the_policy(monkeypatch, restore_threads):
    monkeypatch.setattr(policy, "measure_busy_cpus", lambda: pytest.fail("must not measure"))
    choice = policy.apply_thread_policy(3, environ={"OMP_NUM_THREADS": "1"})
    assert (choice.threads, choice.source) == (3, "--threads")
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    choice = policy.apply_thread_policy(None, environ={"OMP_NUM_THREADS": "2"})
    assert (choice.threads, choice.source) == (None, "OMP_NUM_THREADS")
    assert torch.get_num_threads() == 1  # left to torch, which read the variable at start


@pytest.mark.parametrize("busy, expected", [(0.0, 2), (1.0, 1)])
def test_automatic_choice_sets_torch_threads(monkeypatch, restore_threads, busy, expected):
    monkeypatch.setattr(policy, "usable_cpus", lambda: 2)
    monkeypatch.setattr(policy, "measure_busy_cpus", lambda: busy)
    choice = policy.apply_thread_policy(None, environ={})
    assert (choice.threads, choice.source, choice.busy_cpus) == (expected, "automatic", busy)
    assert torch.get_num_threads() == expected


def _fresh_python(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()


def test_automatic_choice_before_torch_is_imported_sets_only_the_environment():
    out = _fresh_python(
        "import os, sys\n"
        "from globeflow.apps.threads import apply_thread_policy\n"
        "choice = apply_thread_policy(None)\n"
        "assert 'torch' not in sys.modules\n"
        "print(choice.threads, os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'])\n"
        "import torch\n"
        "print(torch.get_num_threads())\n"
    )
    assert out[1:3] == [out[0], "PASSIVE"] and out[3] == out[0]


def test_explicit_count_in_a_fresh_process_is_exact_and_waits_passively():
    # More threads than cores: torch would cap OMP_NUM_THREADS, the request is honoured anyway.
    out = _fresh_python(
        "import os\n"
        "from globeflow.apps.threads import apply_thread_policy\n"
        "apply_thread_policy(os.cpu_count() + 1)\n"
        "import torch\n"
        "print(torch.get_num_threads() - os.cpu_count(), os.environ['OMP_WAIT_POLICY'])\n"
    )
    assert out == ["1", "PASSIVE"]


def test_cli_negative_threads_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["--threads", "-3", "predict", str(tmp_path / "a.jpg")])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # a clean exit, no traceback
    assert result.output.strip().splitlines() == [
        "error: --threads -3: must be a number of threads (1 or more), or 0 for automatic"
    ]


@pytest.mark.parametrize("argv, expected", [(["--threads", "0"], 1), (["--threads", "2"], 2)])
def test_cli_threads_zero_is_automatic_and_n_is_n(
    monkeypatch, restore_threads, tmp_path, argv, expected
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(policy, "usable_cpus", lambda: 2)
    monkeypatch.setattr(policy, "measure_busy_cpus", lambda: 1.0)  # one core taken elsewhere
    torch.set_num_threads(3)
    result = CliRunner().invoke(app, [*argv, "predict", str(tmp_path / "missing.jpg")])
    assert result.exit_code == 2 and "no such file" in result.output  # the command still ran
    assert torch.get_num_threads() == expected
