"""End to end, as users run it: cold ``globeflow`` processes at default settings.

- ``embed`` (encoder only) and ``predict`` (encoder + model + answers) on the same photos,
  photos/s each and the ratio (target: predict >= 50% of embed);
- ``serve`` at concurrency 8 (one photo per request, ``requests`` in all): requests/s and p50
  latency (target: >= 4x the 0.53 req/s of globeflow before this work);
- ``globeflow --help`` wall time (target < 0.5 s);
- with ``baseline_ref=REF`` the same commands of an older globeflow (a git ref of this
  repository, checked out to a temporary worktree and run from its source tree with this
  environment) in the same run, interleaved, for in-run ratios.
- ``output=out`` times ``predict --out DIR`` (the archive job) instead of ``--json FILE``.
- ``busy`` adds a scenario with one CPU-bound process running beside (as on a shared 2-core
  machine).

Photos: the bundled model's validation photos from ../shared/data (``photos`` of them),
else the example photos repeated.

    python benchmarks/run.py throughput -p baseline_ref=17e6921 -p busy=true
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    busy_process,
    free_port,
    loadavg,
    print_table,
    start_server,
    validation_photos,
)
from _registry import experiment


def photo_folder(n: int, root: Path) -> Path:
    """A folder of n photos (copied)."""
    folder = root / "photos"
    folder.mkdir()
    sources = [p for p, _, _ in validation_photos()] or sorted((REPO / "examples").glob("*.jpg"))
    for i in range(n):
        src = sources[i % len(sources)]
        shutil.copy(src, folder / f"{i:04d}_{src.name}")
    return folder


class Globeflow:
    """Runs a globeflow checkout's command line (this one, or an older source tree)."""

    def __init__(self, name: str, src: Path | None = None):
        self.name, self.src = name, src
        self.env = dict(os.environ)
        if src is not None:
            self.env["PYTHONPATH"] = str(src)

    @property
    def module(self) -> str:
        old_layout = self.src is not None and (self.src / "globeflow" / "cli.py").exists()
        return "globeflow.cli" if old_layout else "globeflow.apps.cli"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", self.module, *args]

    def run(self, *args: str) -> float:
        start = time.perf_counter()
        subprocess.run(self.command(*args), env=self.env, check=True, capture_output=True)
        return time.perf_counter() - start


@contextlib.contextmanager
def server(gf: Globeflow, work: Path):
    """The URL of ``globeflow serve`` from ``gf`` on a free loopback port, stopped on exit."""
    port = free_port()
    log = work / f"{gf.name.replace(' ', '-')}-serve.log"
    proc = start_server(gf.command("serve", "--port", str(port)), port, gf.env, log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def serve_load(url: str, photos: list[Path], concurrency: int) -> dict:
    import httpx

    def one(path: Path) -> float:
        start = time.perf_counter()
        with httpx.Client(timeout=600) as client:
            r = client.post(f"{url}/v1/locate", files={"file": (path.name, path.read_bytes())})
        r.raise_for_status()
        return time.perf_counter() - start

    one(photos[0])  # warm-up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, photos))
    wall = time.perf_counter() - start
    return {"req_per_s": len(photos) / wall, "p50_s": statistics.median(latencies)}


def measure(
    gf: Globeflow, folder: Path, work: Path, requests: int, concurrency: int, output: str
) -> dict:
    photos = sorted(folder.iterdir())
    n = len(photos)
    store = work / f"{gf.name}-emb.parquet"
    shutil.rmtree(store, ignore_errors=True)
    embed_s = gf.run("embed", str(folder), "-o", str(store), "--no-progress")
    answers = work / f"{gf.name}-answers"
    shutil.rmtree(answers, ignore_errors=True)
    where = ["--out", str(answers)] if output == "out" else ["--json", f"{answers}.json"]
    predict_s = gf.run("predict", str(folder), *where, "--no-progress")
    help_s = statistics.median(gf.run("--help") for _ in range(5))
    with server(gf, work) as url:
        served = serve_load(url, photos[:requests], concurrency)
    return {
        "embed_photos_per_s": n / embed_s,
        "predict_photos_per_s": n / predict_s,
        "predict_over_embed": embed_s / predict_s,
        "serve_req_per_s": served["req_per_s"],
        "serve_p50_s": served["p50_s"],
        "help_s": help_s,
    }


@experiment(
    "throughput", quick={"photos": 2, "requests": 2, "concurrency": 2}, default=True, threads=None
)
def throughput(
    *,
    photos: int = 64,
    requests: int = 32,
    concurrency: int = 8,
    baseline_ref: str | None = None,
    busy: bool = False,
    output: str = "json",
) -> dict:
    """Options (see the module docstring for the rest):

    - ``baseline_ref``: git ref of an older globeflow
    - ``busy``: also measure beside a busy process
    - ``output``: ``predict --json FILE`` ("json") or the archive job ``predict --out DIR``
      ("out")
    """
    if output not in ("json", "out"):
        raise ValueError(f"output={output!r}: json or out")
    report = {"runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = photo_folder(photos, work)
        versions = [Globeflow("current")]
        if baseline_ref:
            tree = work / "baseline"
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(REPO),
                    "worktree",
                    "add",
                    "--detach",
                    str(tree),
                    baseline_ref,
                ],
                check=True,
                capture_output=True,
            )
            versions.append(Globeflow(f"baseline {baseline_ref}", tree / "src"))
        scenarios = ["idle"] + (["busy"] if busy else [])
        try:
            for scenario in scenarios:
                ctx = busy_process() if scenario == "busy" else contextlib.nullcontext()
                with ctx:
                    for gf in versions:
                        row = measure(gf, folder, work, requests, concurrency, output)
                        row.update(version=gf.name, scenario=scenario, load=loadavg()[0])
                        report["runs"].append(row)
                        print(row, flush=True)
        finally:
            if baseline_ref:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                    capture_output=True,
                )
    columns = ["scenario", "version", "embed_photos_per_s", "predict_photos_per_s"]
    columns += ["predict_over_embed", "serve_req_per_s", "serve_p50_s", "help_s", "load"]
    print_table(report["runs"], columns)
    report["load_average_after"] = loadavg()
    return report
