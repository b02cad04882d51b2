"""What several benchmarks share: machine facts, trained models and validation embeddings.

Benchmarks print a table and JSON; they need ``../shared/data`` for the trained-model parts and
say so (skipping those parts) when it is absent.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLOBEFLOW_SHARED", REPO.parent / "shared"))
IM2GPS = SHARED / "data" / "im2gps3k-train"
MP16 = SHARED / "data" / "mp16-locations-100k" / "locations.csv"
CACHE = REPO / "out" / "bench" / "cache"


def machine(gemm_seconds: float = 0.5) -> dict:
    """The facts a reader needs next to a timing: CPU (and its model name), threads, load, torch
    version and the matrix-product rates measured now (:func:`gemm_rates`, ``gemm_seconds`` per
    kernel and precision)."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": loadavg(),
        "gemm_gflops": gemm_rates(gemm_seconds),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device = torch.device("cpu")):
    """(result, seconds) of fn()."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages (empty where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    cmd: list[str], port: int, env: dict[str, str], log: Path, timeout_s: float = 300.0
) -> subprocess.Popen:
    """Start ``cmd`` (a ``globeflow serve`` command line listening on loopback ``port``) with
    environment ``env``, its stderr in ``log``; returned once /v1/health answers 200. Raises
    RuntimeError (with the log's tail) when the server exits first or is not up in ``timeout_s``.
    """
    import httpx

    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),  # a pipe nobody reads would block the server when full
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server did not start within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def uptime() -> str:
    """The ``uptime`` line (load averages as the docs quote them), or "" without the command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return ""


GEMM_SHAPE = (512, 512, 2048)
"""(rows, inner, cols) of the rate measurement: the first linear layer of a dim-512 AdaLN block
on 512 rows (256 guided samples), the products that dominate sampling and likelihoods of the
published-size network. (At 4096 rows the float32 output no longer fits the cache and oneDNN's
rate drops by 30%.)"""


def _linear_runner(dtype: torch.dtype, kernel: str):
    """A no-argument function running one (rows, inner) x (inner, cols) product, or None when
    the kernel is not available here. "matmul": torch.matmul (MKL on CPU); "onednn": oneDNN on
    a weight packed once (globeflow.core.packed_linear, what the network uses at inference)."""
    rows, inner, cols = GEMM_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=g).to(dtype)
    layer = torch.nn.Linear(inner, cols, bias=False)
    if kernel == "matmul":
        w_t = layer.weight.detach().to(dtype).T.contiguous()
        out = torch.empty(rows, cols, dtype=dtype)
        return lambda: torch.matmul(x, w_t, out=out)
    try:
        from globeflow.core.packed_linear import linear, pack
    except ImportError:
        return None
    packed = pack(layer, dtype)
    return (lambda: linear(x, packed)) if packed.packed else None


def linear_gflops(dtype: torch.dtype, kernel: str = "matmul", seconds: float = 0.5) -> float | None:
    """Measured rate of the :data:`GEMM_SHAPE` product in GFLOP/s (2 FLOPs per multiply-add),
    median over ~``seconds`` of repetitions with the current thread count; None when the
    kernel is unavailable."""
    run = _linear_runner(dtype, kernel)
    if run is None:
        return None
    run()  # warm-up (lazy initialisation of the kernels)
    rows, inner, cols = GEMM_SHAPE
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        run()
        rates.append(2.0 * rows * inner * cols / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def gemm_rates(seconds: float = 0.5) -> dict[str, dict[str, float | None]]:
    """Matrix-product rates of this machine now (GFLOP/s), float32 and bfloat16, per kernel and
    the best of them ("peak")."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernels = {k: linear_gflops(dtype, k, seconds) for k in ("matmul", "onednn")}
        out[name] = {**kernels, "peak": max(v for v in kernels.values() if v is not None)}
    return out


def _linear_pointwise_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * x_shape[-1] * out_shape[-1]


def count_flops(fn) -> int:
    """FLOPs of the matrix products (mm, addmm, bmm, ..., oneDNN packed linears) that fn() runs,
    counted by torch's FlopCounterMode; elementwise work is not counted, so this is a lower bound
    on the work."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        extra[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
    # The counter sees the calling thread only: on one intra-op thread the work stays in it
    # (globeflow.core.parallel splits work across worker threads only where there are more).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FlopCounterMode(display=False, custom_mapping=extra) as counter:
            fn()
    finally:
        torch.set_num_threads(threads)
    return int(counter.get_total_flops())


def median_time(fn, reps: int = 3) -> tuple[float, list[float]]:
    """Median wall-clock seconds of fn() over reps runs (after one warm-up), and all runs."""
    fn()
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return sorted(runs)[len(runs) // 2], runs


def best_of_interleaved(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Each zero-argument callable of ``runs`` run ``repeats`` times, the variants interleaved
    (so that a machine's slow phase hits them alike): ({name: best seconds}, {name: the last
    run's value})."""
    best = dict.fromkeys(runs, math.inf)
    out = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            out[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, out


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A markdown table of the given columns (floats with 4 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")


def write_json(report: dict, out: str | None) -> None:
    """Print the report as JSON and write it to ``out`` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def validation_photos(val_fraction: float = 0.15, seed: int = 0) -> list[tuple[Path, float, float]]:
    """The bundled model's validation photos: im2gps3k-train minus the example photos' authors,
    split by author exactly as ``globeflow train`` did (``split_rows``), validation side.
    Empty when ../shared/data is absent."""
    from globeflow.jobs.training import split_rows

    csv_path = IM2GPS / "locations.csv"
    if not csv_path.exists():
        return []
    excluded = set((REPO / "examples" / "authors.txt").read_text().split())
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["author"] not in excluded]
    _, val = split_rows([r["author"] for r in rows], len(rows), val_fraction, seed)
    return [
        (IM2GPS / "images" / rows[i]["image"], float(rows[i]["lat"]), float(rows[i]["lon"]))
        for i in val.tolist()
    ]


def validation_embeddings(locator, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (V, D), truth (V, 2) degrees) of the validation photos under the locator's
    encoder, cached in out/bench/cache. Empty tensors when the data is absent."""
    from globeflow.data.images import load_image

    photos = validation_photos()[:limit]
    if not photos:
        return torch.zeros(0, locator.model.cond_dim), torch.zeros(0, 2)
    cache = CACHE / f"val-{locator.encoder.name}-{len(photos)}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        return data["emb"], data["truth"]
    embs = []
    for i in range(0, len(photos), 32):
        images = [load_image(p) for p, _, _ in photos[i : i + 32]]
        embs.append(locator.encoder.embed(images))
    emb = torch.cat(embs)
    truth = torch.tensor([[lat, lon] for _, lat, lon in photos], dtype=torch.float64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"emb": emb, "truth": truth}, cache)
    return emb, truth


def bundled_validation(limit: int | None = None):
    """(locator, embeddings (V, D), truth (V, 2) degrees): the bundled model and up to ``limit``
    of its validation photos (:func:`validation_embeddings`); None, saying so, when the data is
    absent."""
    from globeflow.apps.pipeline import Locator

    locator = Locator.from_pretrained()
    emb, truth = validation_embeddings(locator, limit=limit)
    if not len(emb):
        print(
            f"skipping the bundled model's validation photos: {IM2GPS / 'locations.csv'} not found"
        )
        return None
    return locator, emb, truth


def require_bundled_validation(limit: int | None = None):
    """:func:`bundled_validation`, or :class:`_registry.Skipped` when its data is absent."""
    from _registry import Skipped

    found = bundled_validation(limit)
    if found is None:
        raise Skipped("no validation photos of the bundled model")
    return found


def mp16_rfm(budget_s: float = 300.0):
    """An unconditional RFM trained on the MP-16 locations (benchmarks/density_mp16.py recipe,
    ``budget_s`` seconds), cached in out/bench/cache. None when the data is absent."""
    from density_mp16 import RfmRecipe, load_points, train_rfm

    from globeflow.core.checkpoints import load_model, save_model

    directory = CACHE / f"mp16-rfm-{int(budget_s)}s"
    if (directory / "config.json").exists():
        return load_model(directory)
    if not MP16.exists():
        return None
    print(f"training an unconditional MP-16 RFM for {budget_s:.0f} s (cached afterwards)")
    model, _ = train_rfm(load_points(MP16), RfmRecipe(budget_s=budget_s), [])
    save_model(model, directory)
    return model


def yfcc_size_model(seed: int = 0, dim: int = 512, depth: int = 12):
    """(model, emb (1, 1024)): an RFM with a random network of the published YFCC layout (dim
    512, depth 12, cond_dim 1024; 36M parameters; a smoke run may shrink ``dim`` and ``depth``),
    weights N(0, 0.02) as in the authors' ``make_yfcc_size.py``."""
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(seed)
    net = Denoiser(dim=dim, depth=depth, expansion=4, cond_dim=1024)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return RiemannianFlowMatching(net).eval(), torch.randn(1, 1024)


@contextlib.contextmanager
def busy_process():
    """One CPU-bound process running beside the measurement (a pure-Python loop)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def cpu_model() -> str:
    """The CPU's marketing name (lscpu "Model name", else /proc/cpuinfo "model name", else the
    platform's processor string): the fact a reader needs beside a speed ratio."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class EmbeddingsOnly:
    """An encoder stand-in for timing the answer part of ``Locator`` from embeddings: it has
    the name and dimension a ``Locator`` checks and refuses to embed images."""

    def __init__(self, dim: int, name: str = "embeddings-only"):
        self.dim, self.name = dim, name

    def embed(self, images, batch_size: int | None = None) -> torch.Tensor:
        raise RuntimeError("EmbeddingsOnly encodes no images: call locate_embeddings")


@contextlib.contextmanager
def stage_timers(targets: list[tuple[object, str, str]]):
    """Seconds spent in named functions while the block runs: ``targets`` are (owner, attribute,
    stage) triples; each ``owner.attribute`` that exists is wrapped for the block and restored
    after it. Yields {stage: seconds} (a stage called several times sums its calls)."""
    seconds: dict[str, float] = {}
    missing = object()
    saved = []

    def wrap(fn, stage):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start

        return timed_call

    for owner, attribute, stage in targets:
        if not hasattr(owner, attribute):
            continue
        saved.append((owner, attribute, vars(owner).get(attribute, missing)))
        setattr(owner, attribute, wrap(getattr(owner, attribute), stage))
    try:
        yield seconds
    finally:
        for owner, attribute, original in reversed(saved):
            if original is missing:
                delattr(owner, attribute)  # an instance attribute shadowing its class's method
            else:
                setattr(owner, attribute, original)
