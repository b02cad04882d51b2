"""Streaming a store larger than a process should hold: read speed, training speed, peak RSS,
for 1 and 2 processes (torchrun, gloo on the CPU).

The store is synthetic: ``rows`` rows (default 1,000,000) of ``dim`` (1024) float16
embeddings drawn from a seeded normal, coordinates uniform on the sphere, in parts of 65,536 rows
with row groups of 4,096 rows (about 2 GiB for the defaults). It is written once to ``store``
(put it under /tmp, never in the repository) and reused while its row count and dim match.

Measured, for P = 1 and 2 processes (each process its own rank's share of the row groups):

- read: rows/s of the shuffled stream (``shuffled_rows``: row-group read, float16 decode,
  shuffle buffer of ``buffer_rows`` rows), over ``read_rows`` rows in total, and the peak
  RSS of each reading process;
- train: ``globeflow train --stream`` steady-state steps/s (between the first and the last
  validation, which are cheap here) of an RFM network (``net_dim``, ``net_depth``) at global
  batch ``batch_size``, and the peak RSS of each training process.

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of each worker at its end; "after
imports" is the same before any data is touched (torch and the package alone).

Usage: ``python benchmarks/run.py streaming -p store=/tmp/globeflow-stream-1m.parquet
[--quick]``. Run it alone (``flock /tmp/globeflow-bench.lock``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import loadavg
from _registry import experiment
from _worker import command

BIN = Path(sys.executable).parent


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---- the synthetic store ------------------------------------------------------------------------
def write_store(
    path: Path,
    rows: int,
    dim: int,
    part_rows: int = 65536,
    group_rows: int = 4096,
    encoder: str = "synthetic",
):
    """Write (or reuse) the synthetic float16 store (embeddings named as ``encoder``'s);
    returns (seconds, bytes on disk)."""
    import numpy as np

    from globeflow.data.embedding_store import EmbeddingWriter, store_parts
    from globeflow.data.embedding_stream import list_row_groups

    if store_parts(path):
        groups, _, have_dim = list_row_groups(path)
        if sum(g.rows for g in groups) == rows and have_dim == dim:
            return None, sum(p.stat().st_size for p in store_parts(path))
        shutil.rmtree(path)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    writer = EmbeddingWriter(
        path, encoder, dim, chunk_size=part_rows, row_group_size=group_rows, dtype="float16"
    )
    for first in range(0, rows, part_rows):
        n = min(part_rows, rows - first)
        emb = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
        xyz = rng.standard_normal((n, 3))
        xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
        latlon = np.stack(
            [np.degrees(np.arcsin(xyz[:, 2])), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))], 1
        )
        writer.add([f"r{i}" for i in range(first, first + n)], emb, latlon=latlon)
    writer.close()
    return time.perf_counter() - start, sum(p.stat().st_size for p in store_parts(path))


# ---- workers (one per rank, started by torchrun) -------------------------------------------
def worker_read(*, store: str, buffer_rows: int, threads: int, read_rows: int) -> dict:
    """One rank's read of its share of ``read_rows`` rows: rows, seconds, peak RSS."""
    from globeflow.data.embedding_stream import list_row_groups, shuffled_rows

    torch.set_num_threads(threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    after_imports = peak_rss_mib()
    groups, _, dim = list_row_groups(store)
    share = read_rows // world
    stream = shuffled_rows(groups, dim, 0, buffer_rows, rank, world)
    start, got = time.perf_counter(), 0
    while got < share:
        got += len(next(stream)[0])
    seconds = time.perf_counter() - start
    return {
        "rank": rank,
        "rows": got,
        "seconds": seconds,
        "rows_per_s": got / seconds,
        "rss_after_imports_mib": after_imports,
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_train(
    *,
    store: str,
    buffer_rows: int,
    threads: int,
    run_dir: str,
    steps: int,
    batch_size: int,
    net_dim: int,
    net_depth: int,
) -> dict:
    """One rank of ``globeflow train --stream``: steady-state steps/s (rank 0) and peak RSS."""
    from globeflow.jobs.training import Runtime, train_from_embeddings

    torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", 0))
    after_imports = peak_rss_mib()
    out = Path(run_dir)
    result = train_from_embeddings(
        store,
        "rfm",
        out,
        val_split=0.01,
        stream=True,
        shuffle_buffer_rows=buffer_rows,
        progress=False,
        resume=False,
        runtime=Runtime(device="cpu"),
        dim=net_dim,
        depth=net_depth,
        batch_size=batch_size,
        max_steps=steps,
        warmup_steps=10,
        val_every=steps // 4,
        checkpoint_every=steps,
        log_every=steps // 4,
        val_loss_rows=1024,
        val_geo_rows=32,
        val_num_samples=8,
        val_sample_steps=4,
    )
    report = {"rank": rank, "rss_after_imports_mib": after_imports, "peak_rss_mib": peak_rss_mib()}
    if rank == 0:
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        first, last = lines[0], lines[-1]
        report["steps_per_s"] = (last["step"] - first["step"]) / (last["time"] - first["time"])
        report["steps_timed"] = last["step"] - first["step"]
        report["final_val_loss"] = result.final_metrics.get("val_loss")
    return report


def run_workers(mode: str, nproc: int, threads: int, kwargs: dict) -> list[dict]:
    """Start ``nproc`` workers (``worker_<mode>(threads=threads, **kwargs)``) under torchrun;
    their JSON reports, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
        kwargs = {**kwargs, "threads": threads}
        cmd += command("streaming", f"worker_{mode}", kwargs, str(Path(tmp) / "{rank}.json"))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{mode} x{nproc} failed:\n{done.stdout}\n{done.stderr}")
        return [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(nproc)]


# ---- main --------------------------------------------------------------------------------------
@experiment(
    "streaming",
    quick={
        "store": Path(tempfile.gettempdir()) / "globeflow-stream-quick.parquet",
        "rows": 8192,
        "dim": 64,
        "read_rows": 8192,
        "buffer_rows": 1024,
        "steps": 8,
        "batch_size": 64,
        "net_dim": 16,
        "net_depth": 1,
        "procs": "1",
    },
)
def streaming(
    *,
    store: Path = Path("/tmp/globeflow-stream-1m.parquet"),
    rows: int = 1_000_000,
    dim: int = 1024,
    buffer_rows: int = 65536,
    read_rows: int = 1_000_000,
    batch_size: int = 1024,
    steps: int = 120,
    net_dim: int = 128,
    net_depth: int = 3,
    procs: str = "1,2",
    quick: bool = False,
    threads: int = 1,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``store``: where the synthetic store lives
    - ``read_rows``: rows read, all ranks
    - ``quick``: 100k rows, short runs (smoke test)
    - ``procs``: comma-separated process counts
    - ``threads``: torch threads of each process
    """
    if quick:
        rows, read_rows, steps = 100_000, 100_000, 40
    print(f"store {store}: {rows} rows x {dim} float16", flush=True)
    write_s, size = write_store(store, rows, dim)
    result = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "store": {
            "rows": rows,
            "dim": dim,
            "dtype": "float16",
            "bytes": size,
            "write_seconds": write_s,
        },
        "buffer_rows": buffer_rows,
        "read": {},
        "train": {},
    }
    counts = [int(p) for p in procs.split(",")]
    shared = {"store": str(store), "buffer_rows": buffer_rows}
    for nproc in counts:
        reports = run_workers("read", nproc, threads, {**shared, "read_rows": read_rows})
        total = sum(r["rows"] for r in reports)
        result["read"][nproc] = {
            "rows_per_s": total / max(r["seconds"] for r in reports),
            "per_rank": reports,
        }
        print(f"read x{nproc}: {result['read'][nproc]['rows_per_s']:.0f} rows/s", flush=True)
    with tempfile.TemporaryDirectory() as runs:
        for nproc in counts:
            run = {"run_dir": str(Path(runs) / f"run{nproc}"), "steps": steps}
            run |= {"batch_size": batch_size, "net_dim": net_dim, "net_depth": net_depth}
            reports = run_workers("train", nproc, threads, {**shared, **run})
            result["train"][nproc] = {
                "steps_per_s": reports[0]["steps_per_s"],
                "rows_per_s": reports[0]["steps_per_s"] * batch_size,
                "per_rank": reports,
            }
            print(f"train x{nproc}: {reports[0]['steps_per_s']:.2f} steps/s", flush=True)
    result["loadavg_end"] = loadavg()
    result["train_settings"] = {
        "net_dim": net_dim,
        "net_depth": net_depth,
        "batch_size": batch_size,
        "steps": steps,
        "threads_per_process": threads,
    }
    print_table(result)
    return result


def print_table(result: dict) -> None:
    gib = result["store"]["bytes"] / 2**30
    print(f"\nstore: {result['store']['rows']} x {result['store']['dim']} float16, {gib:.2f} GiB")
    print("| processes | read rows/s | peak RSS per reader (MiB) | train steps/s | train rows/s "
          "| peak RSS per trainer (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for nproc in result["read"]:
        read, train = result["read"][nproc], result["train"].get(nproc, {})
        rss_r = "/".join(f"{r['peak_rss_mib']:.0f}" for r in read["per_rank"])
        rss_t = "/".join(f"{r['peak_rss_mib']:.0f}" for r in train.get("per_rank", []))
        print(
            f"| {nproc} | {read['rows_per_s']:.0f} | {rss_r} | {train.get('steps_per_s', 0):.2f} "
            f"| {train.get('rows_per_s', 0):.0f} | {rss_t} |"
        )
    print(f"load average: start {result['loadavg_start']}, end {result['loadavg_end']}")
