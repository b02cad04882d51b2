"""Trained confident testbeds: RFMs trained by ``globeflow train`` on synthetic patterns whose
true posterior is known (globeflow.data.synthetic), and how close each gets to its truth.

    python benchmarks/run.py testbeds_build [-p only=NAME] [-p root=/work/testbeds]
    python benchmarks/run.py testbeds_report [-p only=NAME] [-p root=/work/testbeds]

``testbeds_build`` is the recipe (fixed seeds): the patterns, a training store and a small
validation store under ROOT/_data, then each model through the real ``globeflow train`` CLI in a
subprocess (what users run; a killed build resumes where it stopped). Each testbed lands in
ROOT/NAME/ as soon as it is trained:

    model/               the trained model (config.json + model.safetensors; gf.load_model)
    heldout.pt           held-out embeddings: embeddings (M, D), pattern (M,), latlon (M, 2)
    patterns.json        the truth, readable (cities, centres, weights, scale, kappa)
    patterns.safetensors codes, centres, weights, scale_km (data.synthetic.load_patterns)
    run/                 the training run (log, metrics, resumable checkpoint)
    report_samples.pt    the report's model samples (cached per cell and guidance)

``testbeds_report`` samples held-out embeddings with the authors' sampler (Euler, 250 steps,
fp32) at guidance 0 and 2 and compares them with exact samples of the true posterior, per scale and
modality, through ``_testbeds.posterior_metrics`` (testbeds served by
``_testbeds.trained_testbeds``); JSON in docs/results/testbeds.json and a table.
``max_steps=N`` trains a testbed longer (the run resumes); ``cached_only=true`` reports the cells
already sampled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine  # noqa: E402
from _registry import experiment  # noqa: E402

from globeflow.core.sampler_settings import AUTHORS_SAMPLER  # noqa: E402
from globeflow.data import synthetic  # noqa: E402

ROOT = Path(os.environ.get("GLOBEFLOW_TESTBEDS", "/work/testbeds"))
DATA = "_data"
COND_DIM = 1024
TRAIN_ROWS = 100_000
HELDOUT_PER_PATTERN = 8
NOISE_STD = 0.1
SEEDS = {"patterns": 0, "train": 1, "heldout": 2, "val": 3}

# Training recipes. Budget on the project's shared 2-core CPU: ~10 min for the small model,
# <= ~45 min for the published width (dim 512, depth 12, cond_dim 1024: 36M parameters).
SMALL_RECIPE = {
    "dim": 256,
    "depth": 4,
    "batch_size": 512,
    "lr": 1e-3,
    "max_steps": 3000,
    "warmup_steps": 200,
    "ema_decay": 0.998,
    "val_every": 750,
    "checkpoint_every": 250,
}
TESTBEDS: dict[str, dict] = {
    "syn-small": SMALL_RECIPE,
    # The R^3 families on the small recipe: what their own sampler step (Euler / DDIM) gives at
    # predict's step count against 250 steps (benchmarks/confident.py).
    "syn-small-flow": {"family": "flow", **SMALL_RECIPE},
    "syn-small-diffusion": {"family": "diffusion", **SMALL_RECIPE},
    "syn-published": {
        "dim": 512,
        "depth": 12,
        "batch_size": 128,
        "lr": 5e-4,
        "max_steps": 2400,
        "warmup_steps": 200,
        "ema_decay": 0.995,
        "val_every": 1200,
        "checkpoint_every": 500,
    },
}


# ---- build ---------------------------------------------------------------------------------
def build_data(root: Path) -> Path:
    """Patterns, training store and validation store under root/_data (kept when present)."""
    data = root / DATA
    patterns = synthetic.make_patterns(COND_DIM, seed=SEEDS["patterns"])
    if (data / synthetic.PATTERNS_JSON).is_file():
        saved = synthetic.load_patterns(data)
        if not torch.equal(saved.codes, patterns.codes):
            raise SystemExit(f"{data}: patterns differ from this recipe; remove the folder")
    synthetic.save_patterns(patterns, data)
    for name, rows, seed in (
        ("train", TRAIN_ROWS, SEEDS["train"]),
        ("val", 2 * len(patterns), SEEDS["val"]),
    ):
        store = data / f"{name}.parquet"
        if not store.exists():
            tmp = data / f"{name}.parquet.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            synthetic.write_store(tmp, patterns, rows, seed=seed, noise_std=NOISE_STD)
            tmp.rename(store)
    heldout = data / "heldout.pt"
    if not heldout.is_file():
        synthetic.save_heldout(
            synthetic.make_heldout(patterns, HELDOUT_PER_PATTERN, SEEDS["heldout"], NOISE_STD),
            heldout,
        )
    return data


def train_command(name: str, data: Path, run: Path, max_steps: int | None = None) -> list[str]:
    """The ``globeflow train`` command line of a testbed (``max_steps``: train longer than the
    recipe; the run resumes where it stopped)."""
    r = {**TESTBEDS[name], **({"max_steps": max_steps} if max_steps else {})}
    return [
        sys.executable, "-m", "globeflow.apps.cli", "train",
        "--embeddings", str(data / "train.parquet"),
        "--val-split", str(data / "val.parquet"),
        "--output", str(run),
        "--dim", str(r["dim"]), "--depth", str(r["depth"]),
        "--batch-size", str(r["batch_size"]), "--lr", str(r["lr"]),
        "--max-steps", str(r["max_steps"]), "--warmup-steps", str(r["warmup_steps"]),
        "--ema-decay", str(r["ema_decay"]),
        "--val-every", str(r["val_every"]), "--checkpoint-every", str(r["checkpoint_every"]),
        "--seed", "0", "--no-progress", "--family", r.get("family", "rfm"),
    ]  # fmt: skip


def build_one(name: str, root: Path, data: Path, max_steps: int | None = None) -> Path:
    """Train (or resume) one testbed and publish it in root/NAME."""
    out = root / name
    run = out / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = ["nice", "-n", "5", *train_command(name, data, run, max_steps)]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, env=env)
    model, tmp, old = out / "model", out / "model.tmp", out / "model.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(run / "final", tmp)
    if model.exists():  # readers see the old model or the new one, never a half-copied one
        model.rename(old)
    tmp.rename(model)
    shutil.rmtree(old, ignore_errors=True)
    for f in (synthetic.PATTERNS_JSON, synthetic.PATTERNS_TENSORS, "heldout.pt"):
        shutil.copy2(data / f, out / f)
    recipe = {**TESTBEDS[name], **({"max_steps": max_steps} if max_steps else {})}
    info = {"name": name, "recipe": recipe, "command": cmd[3:], "seconds": time.time()
            - start, "machine": machine()}  # fmt: skip
    (out / "testbed.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{name}: model in {model} ({time.time() - start:.0f} s)", flush=True)
    return out


def build(names: list[str], root: Path, max_steps: int | None = None) -> None:
    data = build_data(root)
    for name in names:
        build_one(name, root, data, max_steps)


# ---- report --------------------------------------------------------------------------------
THRESHOLDS_KM = (1.0, 25.0, 200.0)
GUIDANCES = (0.0, 2.0)
# Held-out embeddings per pattern and samples per embedding (Euler 250 costs 250 network
# evaluations per sample and guidance doubles them; the published width is ~8x the small).
RESULTS = REPO / "docs" / "results" / "testbeds.json"
"""Where the report's results live (updated per testbed)."""
REPORT_SIZE = {
    "syn-small": (1, 128, 128),
    "syn-small-flow": (1, 128, 128),
    "syn-small-diffusion": (1, 128, 128),
    "syn-published": (1, 32, 16),
}
"""Per testbed: held-out embeddings per pattern, samples at guidance 0, samples at guidance 2
(what the shared CPU allowed: Euler 250 on the published width ran at ~7 GFLOP/s, load 12)."""


def _model_samples(
    bed, guidance: float, num_samples: int, cache: dict, cache_path: Path
) -> torch.Tensor:
    """The authors' sampler on a testbed's photos, (P, N, 2) float64; cached by settings (the
    cache file is rewritten after each new cell, so a killed report resumes)."""
    key = f"{bed.name}|{guidance:g}|{len(bed.emb)}|{num_samples}"
    if key not in cache:
        g = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        samples = bed.model.sample(
            bed.emb, num_samples, guidance=guidance, generator=g, settings=AUTHORS_SAMPLER
        )
        cache[key] = samples.double()
        cache[key + "|seconds"] = torch.tensor(time.perf_counter() - start)
        torch.save(cache, cache_path)
    return cache[key]


def mode_mass_tv(bed, samples: torch.Tensor) -> float:
    """Mean total variation between the share of samples nearest each true city and the true
    weights (0 = right mass per mode)."""
    patterns, idx = bed.notes["patterns"], bed.notes["pattern_idx"]
    mode, _ = synthetic.mode_of(patterns, idx, samples)
    share = torch.nn.functional.one_hot(mode, synthetic.MAX_MODES).double().mean(1)
    return float(0.5 * (share - patterns.weights[idx]).abs().sum(-1).mean())


def bed_metrics(bed, samples: torch.Tensor, num_samples: int) -> dict:
    """The shared posterior metrics for the model and, as the reference, for exact samples;
    the sliced-Wasserstein floor at this sample size; mass per mode."""
    from _testbeds import nearest_place_km, posterior_metrics

    from globeflow.answers.decode import best_guess
    from globeflow.jobs.metrics import sliced_wasserstein_km

    g = torch.Generator().manual_seed(2)
    truth, again = bed.truth(num_samples, g), bed.truth(num_samples, g)
    out = {"model": posterior_metrics(samples, truth, bed.places, bed.true_location, THRESHOLDS_KM)}
    out["exact"] = posterior_metrics(again, truth, bed.places, bed.true_location, THRESHOLDS_KM)
    for who, s in (("model", samples), ("exact", again)):
        guess = best_guess(s)[:, None]
        out[who]["guess_to_city_km"] = float(nearest_place_km(guess, bed.places).median())
        if bed.notes["modes"] > 1:
            out[who]["mode_mass_tv"] = mode_mass_tv(bed, s)
    out["sw_floor_km"] = float(sliced_wasserstein_km(again, truth).mean())
    return out


def report_one(
    name: str,
    root: Path,
    per_pattern: int,
    sample_counts: tuple[int, int],
    cached_only: bool = False,
) -> dict:
    from _testbeds import trained_testbeds

    beds = trained_testbeds(name, root, per_pattern)
    cache_path = root / name / "report_samples.pt"
    cache = torch.load(cache_path, weights_only=True) if cache_path.is_file() else {}
    result = {"name": name, "embeddings_per_pattern": per_pattern,
              "sampler": AUTHORS_SAMPLER.describe(), "config": beds[0].model.config_dict(),
              "guidance": {}}  # fmt: skip
    for guidance, num_samples in zip(GUIDANCES, sample_counts, strict=True):
        cells, seconds = {}, 0.0
        for bed in beds:
            if cached_only and f"{bed.name}|{guidance:g}|{len(bed.emb)}|{num_samples}" not in cache:
                continue
            samples = _model_samples(bed, guidance, num_samples, cache, cache_path)
            key = f"{bed.name}|{guidance:g}|{len(bed.emb)}|{num_samples}|seconds"
            seconds += float(cache[key])
            cells[bed.name.removeprefix(name + "-")] = {
                "scale_km": bed.scale_km, "photos": len(bed.emb),
                **bed_metrics(bed, samples, num_samples),
            }  # fmt: skip
        result["guidance"][f"{guidance:g}"] = {
            "samples": num_samples, "sampling_seconds": seconds, "cells": cells
        }  # fmt: skip
    return result


_COLUMNS = (
    ("miss km", "miss_median_km"),
    *((f"<={t:g} km", f"within_{t:g}_km") for t in THRESHOLDS_KM),
    ("guess-city km", "guess_to_city_km"),
    ("guess err km", "guess_error_km"),
    ("mode TV", "mode_mass_tv"),
)


def _table(result: dict) -> str:
    """Markdown tables, one per guidance; cells read "model / exact samples"."""
    heads = ["regime", "SW km", "SW floor"] + [h for h, _ in _COLUMNS]
    lines = []
    for g, res in result["guidance"].items():
        lines.append(
            f"\n{result['name']}, guidance {g}: Euler 250 fp32, {res['samples']} samples, "
            f"{result['embeddings_per_pattern']} held-out embedding(s) per pattern "
            f"({res['sampling_seconds']:.0f} s sampling); model / exact samples"
        )
        lines.append("| " + " | ".join(heads) + " |")
        lines.append("|---" * len(heads) + "|")
        for cell, m in res["cells"].items():
            vals = [f"{m['model']['sw_km']:.3g}", f"{m['sw_floor_km']:.3g}"]
            for _, key in _COLUMNS:
                if key not in m["model"]:
                    vals.append("-")
                    continue
                a, b = m["model"][key], m["exact"][key]
                pct = key.startswith("within")
                vals.append(f"{100 * a:.0f}% / {100 * b:.0f}%" if pct else f"{a:.3g} / {b:.3g}")
            lines.append(f"| {cell} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(
    names: list[str],
    root: Path,
    size: tuple[int, int, int] | None = None,
    cached_only: bool = False,
    path: Path = RESULTS,
) -> dict:
    """Report each testbed of ``names``, updating the JSON at ``path``; all it holds."""
    saved = json.loads(path.read_text()) if path.is_file() else {"testbeds": {}}
    for name in names:
        per_pattern, *samples = size or REPORT_SIZE[name]
        result = report_one(name, root, per_pattern, tuple(samples), cached_only)
        result["machine"] = machine(gemm_seconds=0.1)
        saved["testbeds"][name] = result
        print(_table(result), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"\nJSON: {path}")
    return saved


@experiment("testbeds_build", quick=None, threads=None)
def testbeds_build(*, only: str = "", root: Path = ROOT, max_steps: int | None = None) -> dict:
    """Build the trained testbeds (``only``: comma-separated names, "": all) under ``root``;
    ``max_steps``: train longer than the recipe (the run resumes)."""
    names = only.split(",") if only else list(TESTBEDS)
    build(names, root, max_steps)
    return {"built": names, "root": str(root)}


@experiment(
    "testbeds_report",
    quick={
        "only": "syn-small",
        "per_pattern": 1,
        "samples": 4,
        "results": Path(tempfile.gettempdir()) / "globeflow-testbeds-quick.json",
    },
    threads=None,
)
def testbeds_report(
    *,
    only: str = "",
    root: Path = ROOT,
    per_pattern: int | None = None,
    samples: int | None = None,
    cached_only: bool = False,
    results: Path = RESULTS,
) -> dict:
    """The authors' sampler against the truth on each built testbed (``only``: comma-separated
    names, "": all); ``per_pattern`` x ``samples`` overrides :data:`REPORT_SIZE`;
    ``cached_only``: only the cells already sampled; ``results``: the JSON updated per testbed."""
    names = only.split(",") if only else list(TESTBEDS)
    size = (per_pattern, samples, samples) if per_pattern and samples else None
    return report(names, root, size, cached_only, results)
