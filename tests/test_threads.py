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
    "affinity, cpu_max, expected",
    [
        (2, None, 2),  # no cgroup limit: every core we may run on
        (2, "max 100000", 2),
        (16, "200000 100000", 2),  # a 2-CPU quota on a 16-core host: torch would start 16
        (16, "150000 100000", 2),  # 1.5 CPUs: the second thread still gets half a core
        (2, "50000 100000", 1),  # half a CPU: never fewer than one thread
        (1, "400000 100000", 1),  # the quota cannot add cores the affinity does not give
        (4, "garbage", 4),
        (4, "100000 0", 4),
    ],
)
def test_cpus_allowed(affinity, cpu_max, expected):
    assert policy.cpus_allowed(affinity, cpu_max) == expected


def test_thread_request_zero_is_automatic_and_negative_is_an_error():
    assert policy.parse_thread_request(None) is None
    assert policy.parse_thread_request(0) is None
    assert policy.parse_thread_request(3) == 3
    with pytest.raises(policy.ThreadRequestError, match=r"--threads -3: .*1 or more.*0 for auto"):
        policy.parse_thread_request(-3)


def test_usable_cpus_reads_this_process_affinity_and_quota(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(policy, "CGROUP_CPU_MAX", cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert policy.usable_cpus() == affinity  # no such file: no quota
    cpu_max.write_text("50000 100000\n")
    assert policy.usable_cpus() == 1


def test_explicit_count_and_environment_win_over_the_policy(restore_threads):
    choice = policy.apply_thread_policy(3, environ={"OMP_NUM_THREADS": "1"})
    assert (choice.threads, choice.source) == (3, "--threads")
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    choice = policy.apply_thread_policy(None, environ={"OMP_NUM_THREADS": "2"})
    assert (choice.threads, choice.source) == (None, "OMP_NUM_THREADS")
    assert torch.get_num_threads() == 1  # left to torch, which read the variable at start


def test_automatic_choice_is_one_thread_per_usable_core(monkeypatch, restore_threads):
    monkeypatch.setattr(policy, "usable_cpus", lambda: 2)
    torch.set_num_threads(1)
    choice = policy.apply_thread_policy(None, environ={})
    assert (choice.threads, choice.source) == (2, "automatic")
    assert torch.get_num_threads() == 2


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


@pytest.mark.parametrize("argv, expected", [(["--threads", "0"], 2), (["--threads", "1"], 1)])
def test_cli_threads_zero_is_automatic_and_n_is_n(
    monkeypatch, restore_threads, tmp_path, argv, expected
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(policy, "usable_cpus", lambda: 2)
    torch.set_num_threads(3)
    result = CliRunner().invoke(app, [*argv, "predict", str(tmp_path / "missing.jpg")])
    assert result.exit_code == 2 and "no such file" in result.output  # the command still ran
    assert torch.get_num_threads() == expected


def test_narrow_network_answers_on_one_thread_only_under_the_automatic_policy(
    monkeypatch, restore_threads
):
    monkeypatch.setattr(policy, "usable_cpus", lambda: 2)
    monkeypatch.setattr(policy, "_automatic", False)
    policy.apply_thread_policy(None, environ={})
    narrow, published = policy.SMALL_NETWORK_WIDTH // 2, 512
    assert policy.threads_for_network(narrow, 2) == 1
    assert policy.threads_for_network(published, 2) == 2
    with policy.network_threads(narrow):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # restored after the block

    policy.apply_thread_policy(2, environ={})  # the user's count is never changed
    assert policy.threads_for_network(narrow, 2) == 2
    policy.apply_thread_policy(None, environ={"OMP_NUM_THREADS": "2"})
    assert policy.threads_for_network(narrow, 2) == 2


def test_pipeline_answers_a_narrow_model_on_one_thread(monkeypatch, restore_threads):
    from globeflow.apps.pipeline import Locator

    seen = []
    locator = Locator.from_pretrained()
    draw = locator._draw
    monkeypatch.setattr(
        locator, "_draw", lambda *a: (seen.append(torch.get_num_threads()), draw(*a))[1]
    )
    monkeypatch.setattr(policy, "_automatic", True)
    torch.set_num_threads(2)
    emb = torch.nn.functional.normalize(torch.randn(1, locator.model.cond_dim), dim=-1)
    locator.locate_embeddings(emb, 16, steps=2, localizability_samples=8)
    assert locator.model.network.config["dim"] < policy.SMALL_NETWORK_WIDTH
    assert seen == [1] and torch.get_num_threads() == 2


def test_baseline_models_without_a_network_answer_under_the_policy(monkeypatch, restore_threads):
    from globeflow.apps.pipeline import Locator
    from globeflow.core.families.baselines import UniformSphere

    monkeypatch.setattr(policy, "_automatic", True)
    torch.set_num_threads(2)
    encoder = Locator.from_pretrained().encoder
    locator = Locator(UniformSphere(cond_dim=encoder.dim), encoder)
    assert policy.threads_for_network(None, 2) == 2
    emb = torch.randn(2, encoder.dim)
    results = locator.locate_embeddings(emb, 16, localizability_samples=4)
    assert len(results) == 2 and torch.get_num_threads() == 2
