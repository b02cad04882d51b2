"""Thread count against speed, idle and beside a CPU-bound process: does the default thread
policy (``globeflow.apps.threads``) stay within 1.2x of the best fixed thread count?

Workloads, each timed in a fresh subprocess so that the thread count and the OpenMP wait policy
take effect exactly as they do for the command line:

* ``bundled``: what ``predict`` does per photo after the encoder at its defaults
  (``Locator.locate_embeddings``: sampling, best guess, regions, localizability), bundled model;
* ``yfcc``: a random network of the published YFCC size (dim 512, depth 12, cond_dim 1024),
  sampling 256 x 32 steps, guidance 2.

Variants: ``N``: N threads with OpenMP's default wait (spinning; what ``torch.set_num_threads``
gave before the policy); ``N-passive``: N threads, ``OMP_WAIT_POLICY=PASSIVE``; ``N-spinK``: N
threads that spin K rounds before sleeping (``GOMP_SPINCOUNT=K``; only with ``variants``);
``policy``: what ``globeflow`` does without ``--threads`` (``apply_thread_policy`` before torch
is imported).

Scenarios: ``idle`` (nothing started by us; the load average says what else ran) and ``busy``:
one CPU-bound process (a pure Python loop) started before the variant's subprocess and stopped
after it.

Repetitions interleave every variant; each cell is the median over repetitions of the median of
``--runs`` timed runs after a warm-up.

Usage: ``python benchmarks/run.py threads [-p reps=3] [-p quick=true]``
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from contextlib import nullcontext

from _registry import experiment
from _worker import command

TARGET = 1.2
"""The policy may be at most this much slower than the best fixed variant (issue 8, item 6)."""
WORKLOADS = {
    "bundled": {"samples": None, "runs": 7},  # predict's defaults (Locator.locate_embeddings)
    "yfcc": {"samples": 256, "steps": 32, "guidance": 2.0, "runs": 3},
}
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


# ---- the worker (a fresh process per measurement) ---------------------------------------------
def measure(spec: dict) -> dict:
    """Set threads as the variant says, *then* import torch, and time the workload."""
    choice = None
    if spec["variant"] == "policy":
        from globeflow.apps.threads import apply_thread_policy

        choice = apply_thread_policy(None)
    else:
        count, _, wait = spec["variant"].partition("-")
        os.environ["OMP_NUM_THREADS"] = count
        if wait == "passive":
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        elif wait.startswith("spin"):  # N-spinK: spin K rounds, then sleep (GNU OpenMP)
            os.environ["GOMP_SPINCOUNT"] = wait[4:]

    import torch
    from _common import median_time, yfcc_size_model

    work = WORKLOADS[spec["workload"]]
    torch.manual_seed(0)
    n = spec.get("samples") or work["samples"]
    if spec["workload"] == "bundled":
        # What `predict` does per photo after the encoder, at its defaults.
        from globeflow.apps.pipeline import Locator

        locator = Locator.from_pretrained()
        emb = torch.nn.functional.normalize(torch.randn(1, locator.model.cond_dim), dim=-1)

        def answer():
            locator.locate_embeddings(emb, n, seed=0)

        from globeflow.apps.threads import threads_for_network

        width = locator.model.network.config["dim"]
        threads_in_effect = threads_for_network(width, torch.get_num_threads())
    else:
        model = yfcc_size_model()[0]
        emb = torch.nn.functional.normalize(torch.randn(1, model.cond_dim), dim=-1)

        def answer():
            model.sample(emb, n, work["steps"], guidance=work["guidance"])

        threads_in_effect = torch.get_num_threads()

    _, seconds = median_time(answer, spec.get("runs") or work["runs"])
    return {
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "threads": threads_in_effect,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "threads_source": None if choice is None else choice.source,
        "samples": n,
    }


def run_worker(spec: dict, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    proc = subprocess.run(
        [sys.executable, *command("threads", "measure", {"spec": spec})],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the benchmark ----------------------------------------------------------------------------
def default_variants(cpus: int) -> list[str]:
    counts = list(range(1, cpus + 1)) if cpus <= 4 else sorted({1, cpus // 2, cpus})
    return [str(k) for k in counts] + [f"{k}-passive" for k in counts if k > 1] + ["policy"]


def summarize(cells: dict) -> dict:
    """{variant: [per-rep results]} -> medians, the best fixed variant and the policy's ratio."""
    out = {}
    for name, results in cells.items():
        out[name] = {
            "median_seconds": statistics.median(r["median_seconds"] for r in results),
            "per_rep_seconds": [r["median_seconds"] for r in results],
            "threads": [r["threads"] for r in results],
        }
    fixed = {k: v["median_seconds"] for k, v in out.items() if k != "policy"}
    best = min(fixed, key=fixed.get)
    ratio = out["policy"]["median_seconds"] / fixed[best]
    return {
        "variants": out,
        "best_fixed": best,
        "policy_over_best": ratio,
        "target": TARGET,
        "target_met": ratio <= TARGET,
    }


def print_table(report: dict) -> None:
    print(f"\nload {report['loadavg_start']} -> {report['loadavg_end']}, busy = {report['busy']}")
    print("\n| workload | scenario | " + " | ".join(report["variants"]) + " | policy / best |")
    print("|---|---|" + "---|" * (len(report["variants"]) + 1))
    for key, cell in report["results"].items():
        workload, scenario = key.split("/")
        row = []
        for name in report["variants"]:
            v = cell["variants"][name]
            threads = "" if name != "policy" else f" ({'/'.join(map(str, v['threads']))} thr)"
            row.append(f"{v['median_seconds']:.2f} s{threads}")
        mark = "met" if cell["target_met"] else "NOT met"
        print(
            f"| {workload} | {scenario} | "
            + " | ".join(row)
            + f" | {cell['policy_over_best']:.2f}x"
            f" (best {cell['best_fixed']}; <= {TARGET}x {mark}) |"
        )


@experiment("threads", quick={"quick": True, "variants": "1,policy"}, default=True, threads=None)
def threads(
    *,
    reps: int = 3,
    workloads: str = ",".join(WORKLOADS),
    variants: str = "",
    quick: bool = False,
    timeout: float = 600.0,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``workloads``: comma-separated, of :data:`WORKLOADS`
    - ``variants``: comma-separated, e.g. 1,2,2-passive,2-spin10000,policy ("": every count,
      spinning and passive)
    - ``quick``: bundled model, 128 samples, 1 rep
    - ``timeout``: per measurement (s)
    """
    from _common import busy_process, loadavg, uptime

    chosen = ["bundled"] if quick else workloads.split(",")
    if quick:
        reps = 1
    from globeflow.apps.threads import usable_cpus

    cpus = usable_cpus()
    names = variants.split(",") if variants else default_variants(cpus)
    if "policy" not in names:
        names.append("policy")
    report = {
        "cpus": cpus,
        "busy": "one pure-Python loop",
        "variants": names,
        "workloads": {w: WORKLOADS[w] for w in chosen},
        "reps": reps,
        "loadavg_start": loadavg(),
        "uptime_start": uptime(),
    }
    cells: dict[str, dict[str, list]] = {}
    for rep in range(reps):
        for scenario in ("idle", "busy"):
            for workload in chosen:
                for name in names:
                    spec = {"workload": workload, "variant": name}
                    if quick:
                        spec.update(samples=128, runs=3)
                    with busy_process() if scenario == "busy" else nullcontext():
                        result = run_worker(spec, timeout)
                    cells.setdefault(f"{workload}/{scenario}", {}).setdefault(name, [])
                    cells[f"{workload}/{scenario}"][name].append(result)
                    print(
                        f"rep {rep} {scenario:4s} {workload:7s} {name:10s} "
                        f"{result['median_seconds']:8.2f} s  threads {result['threads']}"
                        f"  load {loadavg()}",
                        flush=True,
                    )
    report["results"] = {key: summarize(cell) for key, cell in cells.items()}
    report["loadavg_end"] = loadavg()
    report["uptime_end"] = uptime()
    print_table(report)
    return report
