"""Archive scale: ``globeflow predict --embeddings STORE --out DIR`` with the bundled model at its
default settings, on a synthetic embedding store.

Measured:

- cost per row and peak RSS against the number of rows (``sizes``): one process each; the
  per-row cost is the job's own time (model loading excluded) over the rows; peak RSS is the
  ``ru_maxrss`` of the predict process, which must not grow with the rows (answers go to parquet
  parts as they come, without their samples);
- photos/s for 1 and 2 processes (``torchrun --nproc_per_node 2``, gloo on the CPU) on the
  largest size;
- resident memory every few batches of one in-process run (``trace_rows`` rows with the
  bundled model, ``toy_rows`` with a tiny network whose rows cost milliseconds, so that the
  job's own memory is traced over tens of thousands of rows);
- kill -9 at a random point (seeded) of a run committing every ``--save-every-s`` seconds, then
  the same command again: no row lost or duplicated, and the answers equal those of the
  uninterrupted run (sorted by id), bit for bit.

The store (float16 embeddings named for the bundled model's encoder, coordinates uniform on the
sphere) is written by ``benchmarks/streaming.py``'s ``write_store`` to ``store``.

Usage: ``python benchmarks/run.py archive -p store=/tmp/globeflow-archive.parquet
[-p sizes=32,64,128]``. Run it alone (``flock /tmp/globeflow-bench.lock``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import loadavg, print_table
from _registry import experiment
from streaming import write_store

BIN = Path(sys.executable).parent
RSS_PROBE = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0\n"
    "print(json.dumps({'rc': done.returncode, 'rss_mib': rss, 'stdout': done.stdout,\n"
    "                  'stderr': done.stderr[-2000:]}))\n"
)
"""Runs a command in a fresh process and reports its peak RSS (the largest of its processes)."""


def predict_command(store: Path, out: Path, save_every_s: float) -> list[str]:
    """``globeflow predict`` on every row of ``store`` at the default settings."""
    return [str(BIN / "globeflow"), "predict", "--embeddings", str(store), "--out", str(out),
            "--no-progress", "--save-every-s", str(save_every_s)]  # fmt: skip


def measured(cmd: list[str], nproc: int = 1) -> dict:
    """Run ``cmd`` (under torchrun with ``nproc`` > 1); wall seconds, peak RSS, the job's rate."""
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python",
               *cmd]  # fmt: skip
    start = time.perf_counter()
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    wall = time.perf_counter() - start
    got = json.loads(probe.stdout)
    if got["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{got['stderr']}")
    # "located N photos (R/s), ..." : the job's own rate, model loading excluded
    line = next(x for x in got["stdout"].splitlines() if x.startswith("located "))
    located, rate = int(line.split()[1]), float(line.split("(")[1].split("/s")[0])
    return {
        "wall_s": wall,
        "peak_rss_mib": got["rss_mib"],
        "located": located,
        "photos_per_s": rate,
    }


def stores(base: Path, sizes: list[int], dim: int, encoder: str) -> dict[int, Path]:
    """A store per size (written once, reused while its row count matches)."""
    paths = {}
    for n in sizes:
        paths[n] = base.with_name(f"{base.stem}-{n}.parquet")
        write_store(paths[n], n, dim, part_rows=1024, group_rows=256, encoder=encoder)
    return paths


def kill_and_resume(
    store: Path, work: Path, rows: int, seed: int, reference: Path, run_s: float
) -> dict:
    """kill -9 a run at a random point (30% to 70% of ``run_s``, an uninterrupted run's
    seconds), rerun it, compare with ``reference``'s answers."""
    from globeflow.answers.result_store import read_results

    out = work / "killed"
    cmd = predict_command(store, out, save_every_s=2.0)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    delay = random.Random(seed).uniform(0.3, 0.7) * run_s
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(read_results(out)) if out.exists() else 0
    resumed = measured(cmd)
    a, b = read_results(out, sort_by_id=True), read_results(reference, sort_by_id=True)
    ids = a.column("id").to_pylist()
    return {
        "killed_after_s": round(delay, 2),
        "rows_kept_at_kill": kept,
        "rows_answered_on_resume": resumed["located"],
        "rows_total": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "missing": rows - len(set(ids)),
        "equal_to_uninterrupted": a.equals(b),
    }


def current_rss_mib() -> float:
    """Resident memory of this process now (MiB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_trace(store: Path, out: Path, every: int, toy: bool) -> list[dict]:
    """Locate every row of ``store`` in this process, recording the resident memory every
    ``every`` rows: the bundled model at its defaults, or (``toy``) a tiny network with 32
    samples, whose per-row cost is small enough to run tens of thousands of rows here."""
    import torch

    from globeflow.apps.pipeline import Locator
    from globeflow.apps.threads import apply_thread_policy
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser
    from globeflow.jobs.locate import locate_archive

    apply_thread_policy(None)  # as the command line does: waiting threads never spin
    locator = Locator.from_pretrained()
    settings = {}
    if toy:
        torch.manual_seed(0)
        net = Denoiser(dim=32, depth=2, cond_dim=locator.model.cond_dim)
        locator = Locator(RiemannianFlowMatching(net), locator.encoder, "toy")
        settings = {"num_samples": 32, "steps": 2, "localizability_samples": 16}
    trace, done = [], [0]
    start = time.perf_counter()

    def record(ids, results) -> None:
        before = done[0]
        done[0] += len(ids)
        if done[0] // every > before // every:
            trace.append({"rows": done[0], "rss_mib": round(current_rss_mib(), 1),
                          "s": round(time.perf_counter() - start, 1)})  # fmt: skip

    locate_archive(locator, settings, embeddings=store, output=out, batch_size=32,
                   progress=False, on_results=record)  # fmt: skip
    return trace


def process_runs(paths: dict[int, Path], work: Path, seed: int) -> tuple[list[dict], dict]:
    """One process per size, two processes on the largest, and the kill -9 and resume."""
    rows = []
    for n, store in paths.items():
        rows.append(
            {"rows": n, "processes": 1, **measured(predict_command(store, work / f"one-{n}", 30.0))}
        )
        print(rows[-1], flush=True)
    big = max(paths)
    got = measured(predict_command(paths[big], work / "two", 30.0), nproc=2)
    rows.append({"rows": big, "processes": 2, **got})
    print(rows[-1], flush=True)
    run_s = next(r["wall_s"] for r in rows if r["rows"] == big)
    return rows, kill_and_resume(paths[big], work, big, seed, work / f"one-{big}", run_s)


@experiment(
    "archive",
    quick={
        "store": Path(tempfile.gettempdir()) / "globeflow-archive-quick.parquet",
        "sizes": "",
        "trace_rows": 0,
        "toy_rows": 256,
    },
    threads=None,
)
def archive(
    *,
    store: Path = Path("/tmp/globeflow-archive.parquet"),
    sizes: str = "32,64,128",
    seed: int = 0,
    trace_rows: int = 512,
    toy_rows: int = 20000,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``sizes``: Store sizes run by one process, comma-separated ("": only the memory traces).
    - ``seed``: Seed of the kill's moment.
    - ``trace_rows``: Rows of the in-process memory trace with the bundled model.
    - ``toy_rows``: Rows of the memory trace with a tiny network (the job's own memory).
    """

    from globeflow.apps.pipeline import default_model_path

    meta = json.loads((default_model_path() / "config.json").read_text())
    dim, encoder = meta["network"]["cond_dim"], meta["metadata"]["encoder"]
    work = Path(tempfile.mkdtemp(prefix="globeflow-archive-"))
    rows, kill, traces = [], {}, {}
    try:
        counts = [int(n) for n in sizes.split(",") if n]
        if counts:
            rows, kill = process_runs(stores(store, counts, dim, encoder), work, seed)
        for name, n, toy in (("bundled", trace_rows, False), ("toy", toy_rows, True)):
            if n:
                path = stores(store, [n], dim, encoder)[n]
                traces[name] = rss_trace(path, work / f"trace-{name}", max(n // 16, 32), toy)
                print(name, traces[name], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "archive",
        "model": "bundled (default settings)",
        "embedding_dim": dim,
        "rows": rows,
        "kill_and_resume": kill,
        "rss_traces": traces,
        "loadavg": loadavg(),
    }
    print_table(rows, ["rows", "processes", "photos_per_s", "ms_per_row", "wall_s", "peak_rss_mib"])
    if kill:
        print_table([kill], list(kill))
    return report
