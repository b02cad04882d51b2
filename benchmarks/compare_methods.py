"""Every method of the paper's Tables 1 and 2, trained on the same embeddings with the same budget.

Methods: Diffusion R^3, Flow matching R^3, RFM S^2 (one network size for all three), vMF,
vMF mixture, uniform on S^2, plus two references without a density: cosine k-NN retrieval over
the training embeddings (the answer is the neighbour location with the highest summed GeoScore
to the other k neighbours) and the best fixed location (the training location with the highest
mean GeoScore over the training set).

Protocol: author-grouped split ``split_rows(authors, n, 0.15, seed)``; every trained method gets
the same number of optimiser steps at the same batch size, learning rate and schedule; the final
EMA weights are evaluated (no model selection, since the validation photos are the test set
here). Point prediction: best guess of ``num_samples`` samples drawn with guidance
``guidance`` (paper: 2). Densities: guidance 0, exact likelihood ODE (16 RK4 steps) for the
denoising families; HPD calibration and localizability from ``hpd_samples`` samples per image.

Table 1: GeoScore, mean / median km, accuracy within 25 / 200 / 750 / 2500 km, country / region /
city accuracy (offline reverse geocoding of prediction and truth).
Table 2: NLL (bits/dim), localizability (bits), precision / recall / density / coverage of one
unguided sample per image against the true locations (k = 3), and the share of truths inside the
50 % / 90 % highest-density regions.

    python benchmarks/run.py compare_methods [-p embeddings=runs/im2gps3k-train.parquet]
        [-p steps=2000] [-p batch_size=256] [-p dim=256] [-p depth=4] [-p num_samples=64]
        [-p out_md=results.md]

Exits 0 with a message when the embeddings file is absent.
"""

from __future__ import annotations

import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _registry import experiment

from globeflow.core.sampler_settings import DEFAULT_GUIDANCE

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS_KM = (25, 200, 750, 2500)

GENERATIVE = (("diffusion", "Diffusion R^3"), ("flow", "Flow matching R^3"), ("rfm", "RFM S^2"))
BASELINES = (("vmf", "vMF"), ("vmf-mixture", "vMF mixture"), ("uniform", "Uniform"))
KNN_NAME = "k-NN retrieval"
FIXED_NAME = "Best fixed location"

TABLE1 = (
    ("geoscore", "GeoScore", 0),
    ("mean_km", "mean km", 0),
    ("median_km", "median km", 0),
    *((f"acc@{t}km", f"{t} km %", 1) for t in THRESHOLDS_KM),
    ("country_acc", "country %", 1),
    ("region_acc", "region %", 1),
    ("city_acc", "city %", 1),
)
TABLE2 = (
    ("nll_bpd", "NLL bits/dim", 2),
    ("nll_bpd_median", "median NLL", 2),
    ("localizability_bits", "localizability bits", 2),
    ("sample_precision", "precision", 2),
    ("sample_recall", "recall", 2),
    ("sample_density", "density", 2),
    ("sample_coverage", "coverage", 2),
    ("hpd50_coverage", "in 50% HPD", 2),
    ("hpd90_coverage", "in 90% HPD", 2),
)


@dataclass(frozen=True)
class Protocol:
    """The run's settings (see :func:`compare_methods`, whose parameters they are)."""

    embeddings: str
    val_fraction: float
    seed: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    dim: int
    depth: int
    num_samples: int
    sample_steps: int
    guidance: float
    hpd_samples: int
    knn_k: int
    limit: int | None
    methods: str | None
    work_dir: str | None
    out_md: str | None


# ---- references without a density --------------------------------------------------------------
def knn_predict(
    query: torch.Tensor, bank: torch.Tensor, bank_latlon: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-NN: -> (best guesses (Q, 2), neighbour locations (Q, k, 2)).

    The best guess is the neighbour location with the highest summed GeoScore to the k
    neighbours, i.e. :func:`globeflow.answers.decode.best_guess` over the neighbour locations.
    """
    from globeflow.answers.decode import best_guess

    q = torch.nn.functional.normalize(query.double(), dim=1)
    b = torch.nn.functional.normalize(bank.double(), dim=1)
    idx = (q @ b.T).topk(min(k, len(b)), dim=1).indices
    neighbours = bank_latlon.double()[idx]
    return best_guess(neighbours), neighbours


def best_fixed_location(latlon: torch.Tensor) -> torch.Tensor:
    """The training location with the highest mean GeoScore over the training locations, (2,)."""
    from globeflow.answers.decode import expected_geoscore

    ll = latlon.double()
    return ll[int(expected_geoscore(ll[None], ll[None])[0].argmax())]


def point_summary(truth: np.ndarray, pred: np.ndarray, sample: np.ndarray) -> dict:
    """Every summary metric for point predictions: the density columns are NaN (not defined)."""
    from globeflow.answers.geocode import reverse_geocode
    from globeflow.jobs.evaluation import summarize

    def places(ll: np.ndarray) -> list[dict]:
        keys = ("country", "country_code", "region", "city")
        return [{k: p.to_dict().get(k, "") for k in keys} for p in reverse_geocode(ll)]

    nan = np.full(len(truth), math.nan)
    return summarize(truth, pred, nan, nan, nan, sample, places(pred), places(truth), THRESHOLDS_KM)


# ---- trained methods ----------------------------------------------------------------------------
def train_and_evaluate(family: str, data: dict, spec: Protocol, work: Path) -> dict:
    """Train ``family`` for ``spec.steps`` steps, then run :func:`evaluate` on the held-out rows."""
    from globeflow.core.checkpoints import load_model
    from globeflow.jobs.evaluation import evaluate
    from globeflow.jobs.training import TrainConfig, train

    config = TrainConfig(
        family=family,
        dim=spec.dim,
        depth=spec.depth,
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        batch_size=spec.batch_size,
        max_steps=spec.steps,
        seed=spec.seed,
        val_every=max(1, spec.steps),
        checkpoint_every=max(1, spec.steps),
        log_every=max(1, spec.steps // 10),
    )
    t0 = time.perf_counter()
    # No validation set: the held-out rows are the test set, so no checkpoint is picked on them.
    result = train(
        config, data["train_emb"], data["train_latlon"], None, None, work / family, progress=False
    )
    train_s = time.perf_counter() - t0
    model = load_model(result.final_dir).eval()
    t0 = time.perf_counter()
    report = evaluate(
        model,
        data["val"],
        num_samples=spec.num_samples,
        guidance=spec.guidance,
        steps=spec.sample_steps,
        hpd_samples=spec.hpd_samples,
        batch_size=32,
        seed=spec.seed,
        limit=spec.limit,
        thresholds_km=THRESHOLDS_KM,
        progress=False,
    )
    out = dict(report.summary)
    # A handful of diverging likelihood ODE solves can dominate the mean; the median shows it.
    for key in ("nll_bpd", "localizability"):
        values = np.array([row[key] for row in report.rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[f"{key}_median"] = float(np.median(values)) if values.size else math.nan
    out["train_seconds"] = round(train_s, 1)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["final_train_loss"] = _last_train_loss(work / family)
    return out


def _last_train_loss(run_dir: Path) -> float | None:
    """Last logged training loss from train_log.txt (None if the format is not recognised)."""
    import re

    log = run_dir / "train_log.txt"
    if not log.exists():
        return None
    found = re.findall(r"loss[ =:]+(-?[0-9.]+(?:e-?[0-9]+)?)", log.read_text())
    return float(found[-1]) if found else None


# ---- formatting ---------------------------------------------------------------------------------
def _cell(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def markdown_table(results: dict[str, dict], columns: tuple) -> str:
    """One markdown table: a row per method, a column per (key, label, digits)."""
    lines = [
        "| method | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, r in results.items():
        cells = [_cell(r.get(key), digits) for key, _, digits in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _clean(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@experiment(
    "compare_methods",
    quick={
        "steps": 3,
        "batch_size": 16,
        "warmup_steps": 1,
        "dim": 16,
        "depth": 1,
        "num_samples": 4,
        "sample_steps": 2,
        "hpd_samples": 4,
        "limit": 8,
        "methods": "rfm",
    },
)
def compare_methods(
    *,
    embeddings: str = str(REPO / "runs/im2gps3k-train.parquet"),
    val_fraction: float = 0.15,
    seed: int = 0,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    warmup_steps: int = 200,
    dim: int = 256,
    depth: int = 4,
    num_samples: int = 64,
    sample_steps: int = 16,
    guidance: float = DEFAULT_GUIDANCE,
    hpd_samples: int = 32,
    knn_k: int = 10,
    limit: int | None = None,
    methods: str | None = None,
    work_dir: str | None = None,
    out_md: str | None = None,
) -> dict:
    """The paper's Tables 1 and 2 for every method (see the module docstring).

    - ``steps``: optimiser steps per trained method
    - ``dim``, ``depth``: width and blocks of the denoising network
    - ``num_samples``, ``sample_steps``: samples per image (best guess) and sampler steps
    - ``guidance``: guidance for point prediction
    - ``hpd_samples``: samples for HPD / localizability
    - ``limit``: evaluate at most this many images
    - ``methods``: comma-separated subset of family names
    - ``work_dir``: where training runs go (default: temp)
    - ``out_md``: also write the tables as markdown here
    """
    spec = Protocol(**locals())
    if not Path(spec.embeddings).exists():
        print(f"skipping: {spec.embeddings} not found (make it with `globeflow embed`)")
        return {"skipped": f"{spec.embeddings} not found"}
    from types import SimpleNamespace

    from globeflow.data.embedding_store import read_embeddings
    from globeflow.jobs.training import split_rows

    table = read_embeddings(spec.embeddings)
    n = len(table.ids)
    tr, va = split_rows(table.authors, n, spec.val_fraction, spec.seed)
    if spec.limit is not None:
        va = va[: spec.limit]
    emb = torch.as_tensor(table.embeddings, dtype=torch.float32)
    latlon = torch.as_tensor(table.latlon, dtype=torch.float64)
    data = {
        "train_emb": emb[tr],
        "train_latlon": latlon[tr],
        "val": SimpleNamespace(
            embeddings=emb[va].numpy(),
            latlon=latlon[va].numpy(),
            ids=[table.ids[i] for i in va.tolist()],
        ),
    }
    truth = latlon[va].numpy()
    wanted = set(spec.methods.split(",")) if spec.methods else None
    print(
        f"{table.encoder_name}: {n} photos, D={emb.shape[1]}; train {len(tr)}, "
        f"held-out {len(va)} (author-grouped, fraction {spec.val_fraction})",
        flush=True,
    )

    results: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare_methods_") as tmp:
        work = Path(spec.work_dir) if spec.work_dir else Path(tmp)
        for family, name in GENERATIVE + BASELINES:
            if wanted is not None and family not in wanted:
                continue
            print(f"[{time.perf_counter() - started:7.0f}s] {name}: training", flush=True)
            results[name] = train_and_evaluate(family, data, spec, work)
            r = results[name]
            print(
                f"[{time.perf_counter() - started:7.0f}s] {name}: GeoScore {r['geoscore']:.0f}, "
                f"median {r['median_km']:.0f} km, NLL {r['nll_bpd']:.3f} bits/dim "
                f"(train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s)",
                flush=True,
            )

    pred, neighbours = knn_predict(emb[va], emb[tr], latlon[tr], spec.knn_k)
    g = torch.Generator().manual_seed(spec.seed)
    pick = torch.randint(neighbours.shape[1], (len(va),), generator=g)
    # One neighbour location per image stands for a draw from k-NN's empirical distribution.
    sample = neighbours[torch.arange(len(va)), pick]
    results[KNN_NAME] = point_summary(truth, pred.numpy(), sample.numpy())
    fixed = best_fixed_location(latlon[tr])
    fixed_rows = np.repeat(fixed.numpy()[None], len(va), axis=0)
    results[FIXED_NAME] = point_summary(truth, fixed_rows, fixed_rows)
    elapsed = time.perf_counter() - started

    budget = (
        f"{spec.steps} steps at batch {spec.batch_size} for every trained method (AdamW, lr "
        f"{spec.lr:g}, {spec.warmup_steps} warmup steps then cosine, EMA, seed {spec.seed}); "
        f"denoising networks dim {spec.dim} depth {spec.depth}; vMF heads: MLP hidden 512, "
        f"depth 2. Evaluation: {spec.num_samples} samples x {spec.sample_steps} steps at "
        f"guidance {spec.guidance:g} for the best guess; guidance 0 densities; "
        f"{spec.hpd_samples} samples per image for HPD and localizability; k-NN k = "
        f"{spec.knn_k}."
    )
    md = "\n\n".join(
        [
            f"Held-out images: {len(va)} (train {len(tr)}); encoder {table.encoder_name}.",
            f"Budget: {budget}",
            "### Table 1: geolocation\n\n" + markdown_table(results, TABLE1),
            "### Table 2: predicted distributions (guidance 0)\n\n"
            + markdown_table(results, TABLE2),
        ]
    )
    print(md)
    report = {
        "embeddings": str(spec.embeddings),
        "encoder": table.encoder_name,
        "n_train": len(tr),
        "n_heldout": len(va),
        "settings": asdict(spec),
        "budget": budget,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
        "seconds": round(elapsed, 1),
        "fixed_location": fixed.tolist(),
        "results": _clean(results),
    }
    if spec.out_md:
        Path(spec.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.out_md).write_text(md + "\n")
    return report
