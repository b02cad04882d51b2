"""Run the benchmarks: one command for every experiment of benchmarks/.

    python benchmarks/run.py --list                       # the experiments and their parameters
    python benchmarks/run.py                              # the default set (``make bench``), hours
    python benchmarks/run.py --quick                      # every experiment, tiny, minutes
    python benchmarks/run.py confident -p guidances=0,2 -p samples=256
    python benchmarks/run.py --only 'localizability' --threads 2

The machine (CPU model, threads, load average, measured fp32/bf16 GEMM rates) is recorded once
per run; each experiment prints its tables and writes ``OUT/NAME.json`` with its parameters,
the machine, its seconds and its report. ``-p key=value`` sets a parameter of every selected
experiment that has it, ``-p NAME.key=value`` of experiment NAME only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch
from _common import machine, print_table
from _registry import Experiment, Skipped, discover

TORCH_THREADS = torch.get_num_threads()
"""torch's own thread count in this process (one per core): for experiments that set none."""


def parse_params(pairs: list[str], selected: list[Experiment]) -> dict[str, dict]:
    """{experiment name: {parameter: value}} from ``key=value`` / ``NAME.key=value`` pairs;
    raises ValueError for a key no selected experiment has."""
    out: dict[str, dict] = {e.name: {} for e in selected}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--param takes key=value, not {pair!r}")
        target, _, key = key.rpartition(".")
        key = key.replace("-", "_")
        takers = [e for e in selected if (not target or e.name == target) and key in e.parameters()]
        if not takers:
            raise ValueError(f"no selected experiment takes parameter {pair.partition('=')[0]!r}")
        for e in takers:
            out[e.name][key] = e.coerce(key, text)
    return out


def select(
    registry: dict[str, Experiment], names: list[str], only: str | None, quick: bool
) -> list[Experiment]:
    """The experiments named, else: with ``quick`` every one that has a smoke run, with ``only``
    all, else the default set; filtered by the ``only`` regular expression."""
    for name in names:
        if name not in registry:
            raise ValueError(f"unknown experiment {name!r}; see --list")
        if quick and registry[name].quick is None:
            raise ValueError(f"experiment {name!r} has no --quick run")
    chosen = [registry[n] for n in names] if names else list(registry.values())
    if not names and quick:
        chosen = [e for e in chosen if e.quick is not None]
    elif not names and only is None:
        chosen = [e for e in chosen if e.default]
    if only is not None:
        chosen = [e for e in chosen if re.search(only, e.name)]
    return chosen


def show(value: object) -> str:
    """A parameter value as it is typed after ``-p key=``."""
    return str(value) if isinstance(value, Path) else repr(value)


def list_experiments(registry: dict[str, Experiment]) -> None:
    """A table of the experiments, then each one's parameters and defaults."""
    rows = [
        {
            "experiment": e.name,
            "default set": "yes" if e.default else "",
            "quick": "yes" if e.quick is not None else "no",
            "threads": e.threads or "torch's",
            "what": e.summary,
        }
        for e in registry.values()
    ]
    print_table(rows, ["experiment", "default set", "quick", "threads", "what"])
    for e in registry.values():
        quick = e.defaults(quick=True)
        params = ", ".join(
            f"{k}={show(v)}" + (f" (quick {show(quick[k])})" if k in (e.quick or {}) else "")
            for k, v in e.defaults().items()
        )
        print(f"\n{e.name}: {params}")


def run_one(
    e: Experiment, params: dict, quick: bool, threads: int | None, out: Path, host: dict
) -> dict:
    """Run experiment ``e`` and write OUT/NAME.json; its summary row."""
    values = {**e.defaults(quick=quick), **params}
    if threads is not None and "threads" in values:
        values["threads"] = threads
    torch.set_num_threads(threads or values.get("threads") or e.threads or TORCH_THREADS)
    print(f"\n## {e.name}\n", flush=True)
    start = time.perf_counter()
    try:
        report, status = e.run(**values), "ok"
    except Skipped as why:
        print(f"skipped: {why}")
        report, status = {"skipped": str(why)}, "skipped"
    except Exception:  # one failing experiment must not lose the others' results
        traceback.print_exc()
        report, status = {"error": traceback.format_exc()}, "failed"
    seconds = time.perf_counter() - start
    record = {
        "experiment": e.name,
        "status": status,
        "quick": quick,
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in values.items()},
        "machine": host,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "result": report,
    }
    path = out / f"{e.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    return {"experiment": e.name, "status": status, "seconds": seconds, "json": str(path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("names", nargs="*", help="experiments to run (default: the default set)")
    ap.add_argument("--only", default=None, help="regular expression on experiment names")
    ap.add_argument(
        "-p", "--param", action="append", default=[], help="key=value or NAME.key=value"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of minutes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: each one's)")
    ap.add_argument("--out", type=Path, default=Path("out/bench"), help="folder of the JSON files")
    ap.add_argument("--list", action="store_true", help="list the experiments and their parameters")
    args = ap.parse_args(argv)

    registry = discover()
    if args.list:
        list_experiments(registry)
        return 0
    try:
        selected = select(registry, args.names, args.only, args.quick)
        params = parse_params(args.param, selected)
    except ValueError as err:
        ap.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    host = machine(gemm_seconds=0.05 if args.quick else 0.5)
    print(json.dumps(host))
    rows = [run_one(e, params[e.name], args.quick, args.threads, args.out, host) for e in selected]
    print()
    print_table(rows, ["experiment", "status", "seconds", "json"])
    return int(any(r["status"] != "ok" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
