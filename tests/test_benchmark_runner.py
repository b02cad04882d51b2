"""The benchmark runner (benchmarks/run.py): every experiment is discovered, ``--list`` lists
them, and a tiny experiment runs end to end in ``--quick`` mode, writing its JSON with the
machine block."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run  # noqa: E402
from _registry import discover, experiment_modules  # noqa: E402


@pytest.fixture(scope="module")
def registry():
    return discover()


def test_every_experiment_module_registers_an_experiment_and_has_no_main(registry):
    modules = experiment_modules()
    assert modules, "no experiment modules found"
    registered = {e.module for e in registry.values()}
    assert set(modules) == registered
    for module in modules:
        text = (BENCHMARKS / f"{module}.py").read_text()
        assert "argparse" not in text, f"{module}.py parses its own command line"
        assert '__name__ == "__main__"' not in text, f"{module}.py has its own main"


def test_experiments_take_keyword_parameters_with_defaults(registry):
    assert {"confident", "vs_reference", "localizability", "density_map"} <= set(registry)
    for e in registry.values():
        for name, p in e.parameters().items():
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (e.name, name)
            assert p.default is not inspect.Parameter.empty, (e.name, name)
        assert set(e.quick or {}) <= set(e.parameters()), e.name
    assert any(e.default for e in registry.values())


def test_params_are_typed_from_the_signature(registry):
    confident, vs_ref = registry["confident"], registry["vs_reference"]
    params = run.parse_params(
        ["guidances=0,2", "samples=256", "timings=false", "vs_reference.sharp_guidance=2"],
        [confident, vs_ref],
    )
    assert params["confident"] == {"guidances": "0,2", "samples": 256, "timings": False}
    # "samples" sets every selected experiment that has it; "NAME.key" only NAME's
    assert params["vs_reference"] == {"samples": 256, "sharp_guidance": 2.0}
    with pytest.raises(ValueError):
        run.parse_params(["no_such_option=1"], [confident])


def test_list_names_every_experiment(registry, capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in registry:
        assert f"| {name} |" in out


def test_a_quick_experiment_writes_its_json_with_the_machine(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "likelihood_accuracy", "--quick",
         "--out", str(tmp_path), "-p", "points=2"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "likelihood_accuracy.json").read_text())
    assert record["status"] == "ok" and record["quick"] is True
    assert record["params"]["points"] == 2 and record["params"]["samples"] == 16
    machine = record["machine"]
    assert {"cpu_model", "cores", "torch_threads", "load_average"} <= set(machine)
    assert machine["gemm_gflops"]["float32"]["peak"] > 0
    assert record["result"]["rows"]
