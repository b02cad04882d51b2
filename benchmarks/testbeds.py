"""Trained confident testbeds: RFMs trained by ``globeflow train`` on synthetic patterns whose
true posterior is known (globeflow.data.synthetic), and how close each gets to its truth.

    python benchmarks/testbeds.py build [--only NAME] [--root /work/testbeds]
    python benchmarks/testbeds.py report [--only NAME] [--root /work/testbeds]

``build`` is the recipe (fixed seeds): the patterns, a training store and a small validation
store under ROOT/_data, then each model through the real ``globeflow train`` CLI in a
subprocess (what users run; a killed build resumes where it stopped). Each testbed lands in
ROOT/NAME/ as soon as it is trained:

    model/               the trained model (config.json + model.safetensors; gf.load_model)
    heldout.pt           held-out embeddings: embeddings (M, D), pattern (M,), latlon (M, 2)
    patterns.json        the truth, readable (cities, centres, weights, scale, kappa)
    patterns.safetensors codes, centres, weights, scale_km (data.synthetic.load_patterns)
    run/                 the training run (log, metrics, resumable checkpoint)

``report`` samples every held-out embedding with the authors' sampler (Euler, 250 steps, fp32)
at guidance 0 and 2 and compares with exact samples of the true posterior, per scale and
modality; JSON in docs/results/testbeds.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine  # noqa: E402

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
TESTBEDS: dict[str, dict] = {
    "syn-small": {
        "dim": 256,
        "depth": 4,
        "batch_size": 512,
        "lr": 1e-3,
        "max_steps": 3000,
        "warmup_steps": 200,
        "ema_decay": 0.998,
        "val_every": 750,
        "checkpoint_every": 250,
    },
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


def train_command(name: str, data: Path, run: Path) -> list[str]:
    """The ``globeflow train`` command line of a testbed."""
    r = TESTBEDS[name]
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
        "--seed", "0", "--no-progress",
    ]  # fmt: skip


def build_one(name: str, root: Path, data: Path) -> Path:
    """Train (or resume) one testbed and publish it in root/NAME."""
    out = root / name
    run = out / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = ["nice", "-n", "5", *train_command(name, data, run)]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, env=env)
    model = out / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(run / "final", model)
    for f in (synthetic.PATTERNS_JSON, synthetic.PATTERNS_TENSORS, "heldout.pt"):
        shutil.copy2(data / f, out / f)
    info = {"name": name, "recipe": TESTBEDS[name], "command": cmd[3:], "seconds": time.time()
            - start, "machine": machine()}  # fmt: skip
    (out / "testbed.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{name}: model in {model} ({time.time() - start:.0f} s)", flush=True)
    return out


def build(names: list[str], root: Path) -> None:
    data = build_data(root)
    for name in names:
        build_one(name, root, data)


# ---- report --------------------------------------------------------------------------------
THRESHOLDS_KM = (1.0, 25.0, 200.0)
GUIDANCES = (0.0, 2.0)
AUTHORS_SAMPLER = {"solver": "euler", "steps": 250, "precision": "fp32"}
# Held-out embeddings per pattern and samples per embedding (Euler 250 costs 250 network
# evaluations per sample and guidance doubles them; the published width is 11x the small).
REPORT_SIZE = {"syn-small": (2, 128), "syn-published": (1, 64)}


def posterior_metrics(
    patterns: synthetic.SyntheticPatterns,
    pattern_idx: torch.Tensor,
    model_samples: torch.Tensor,
    exact_samples: torch.Tensor,
    exact_again: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per held-out embedding (M,) metrics of model samples against the truth; all (M, N, 2).

    ``exact_again``: a second exact sample set, for the noise floor of the sliced Wasserstein
    distance at this sample size."""
    from globeflow.answers.decode import best_guess
    from globeflow.jobs.metrics import sliced_wasserstein_km

    out = {
        "sw_km": sliced_wasserstein_km(model_samples, exact_samples),
        "sw_floor_km": sliced_wasserstein_km(exact_again, exact_samples),
    }
    for who, samples in (("model", model_samples), ("exact", exact_samples)):
        mode, km = synthetic.mode_of(patterns, pattern_idx, samples)
        for t in THRESHOLDS_KM:
            out[f"{who}_within_{t:g}km"] = (km <= t).double().mean(-1)
        out[f"{who}_median_miss_km"] = km.median(-1).values
        _, guess_km = synthetic.mode_of(patterns, pattern_idx, best_guess(samples)[:, None])
        out[f"{who}_best_guess_km"] = guess_km[:, 0]
        share = torch.nn.functional.one_hot(mode, synthetic.MAX_MODES).double().mean(1)
        # Total variation between the mass per mode and the true weights.
        out[f"{who}_mode_mass_tv"] = 0.5 * (share - patterns.weights[pattern_idx]).abs().sum(-1)
        out[f"{who}_mode_mass"] = share
    return out


def _summarise(metrics: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, float]:
    """Medians of the km metrics, means of the shares, over the selected embeddings."""
    out = {}
    for key, v in metrics.items():
        if key.endswith("_mode_mass"):
            continue
        v = v[rows].double()
        out[key] = float(v.median() if key.endswith("km") else v.mean())
    return out


def report_one(name: str, root: Path, per_pattern: int, num_samples: int) -> dict:
    from globeflow.core.checkpoints import load_model

    out = root / name
    if not (out / "model").is_dir():
        raise SystemExit(f"{out / 'model'}: missing; run `python benchmarks/testbeds.py build`")
    model = load_model(out / "model")
    patterns = synthetic.load_patterns(out)
    held = synthetic.load_heldout(out / "heldout.pt")
    keep = torch.cat([(held["pattern"] == p).nonzero()[:per_pattern, 0] for p in
                      range(len(patterns))])  # fmt: skip
    emb, idx = held["embeddings"][keep], held["pattern"][keep]
    g = torch.Generator().manual_seed(0)
    exact = synthetic.sample_posterior(patterns, idx, num_samples, g)
    again = synthetic.sample_posterior(patterns, idx, num_samples, g)
    result = {"name": name, "embeddings": len(idx), "samples": num_samples, "sampler":
              AUTHORS_SAMPLER, "config": model.config_dict(), "guidance": {}}  # fmt: skip
    for guidance in GUIDANCES:
        torch.manual_seed(1)
        start = time.perf_counter()
        samples = torch.cat([
            model.sample(emb[i : i + 8], num_samples, guidance=guidance,
                         generator=torch.Generator().manual_seed(1 + i), **AUTHORS_SAMPLER)
            for i in range(0, len(emb), 8)
        ]).double()  # fmt: skip
        seconds = time.perf_counter() - start
        metrics = posterior_metrics(patterns, idx, samples, exact, again)
        cells = {}
        for scale in patterns.scale_km.unique().tolist():
            for modes in (1, 3):
                rows = (patterns.scale_km[idx] == scale) & (patterns.num_modes[idx] == modes)
                if rows.any():
                    cells[f"{scale:g} km x{modes}"] = _summarise(metrics, rows)
        per_pattern_mass = {
            patterns.names[p]: {
                "true": patterns.weights[p, : int(patterns.num_modes[p])].tolist(),
                "model": metrics["model_mode_mass"][idx == p].mean(0)[
                    : int(patterns.num_modes[p])].tolist(),
            }
            for p in range(len(patterns)) if int(patterns.num_modes[p]) > 1
        }  # fmt: skip
        result["guidance"][f"{guidance:g}"] = {
            "seconds": seconds,
            "cells": cells,
            "mode_mass": per_pattern_mass,
        }
    return result


def _table(result: dict) -> str:
    """Markdown tables, one per guidance: model value / exact-sample value where both exist."""
    pairs = [("miss km", "median_miss_km")] + [
        (f"<={t:g} km", f"within_{t:g}km") for t in THRESHOLDS_KM
    ]
    pairs += [("guess km", "best_guess_km"), ("mode TV", "mode_mass_tv")]
    heads = ["regime", "SW km", "SW floor"] + [h for h, _ in pairs]
    lines = []
    for g, res in result["guidance"].items():
        lines.append(
            f"\n{result['name']}, guidance {g} (Euler 250 fp32, {result['samples']} samples x "
            f"{result['embeddings']} embeddings, {res['seconds']:.0f} s); model / exact samples"
        )
        lines.append("| " + " | ".join(heads) + " |")
        lines.append("|---" * len(heads) + "|")
        for cell, m in res["cells"].items():
            vals = [f"{m['sw_km']:.3g}", f"{m['sw_floor_km']:.3g}"]
            for _, key in pairs:
                if key == "mode_mass_tv" and cell.endswith("x1"):
                    vals.append("-")
                    continue
                a, b = m[f"model_{key}"], m[f"exact_{key}"]
                pct = key.startswith("within")
                vals.append(f"{100 * a:.0f}% / {100 * b:.0f}%" if pct else f"{a:.3g} / {b:.3g}")
            lines.append(f"| {cell} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(names: list[str], root: Path, size: tuple[int, int] | None = None) -> None:
    path = REPO / "docs" / "results" / "testbeds.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"testbeds": {}}
    for name in names:
        per_pattern, num_samples = size or REPORT_SIZE[name]
        result = report_one(name, root, per_pattern, num_samples)
        result["machine"] = machine()
        saved["testbeds"][name] = result
        print(_table(result), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"\nJSON: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "report"])
    parser.add_argument("--only", action="append", choices=sorted(TESTBEDS))
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--per-pattern", type=int, help="held-out embeddings per pattern")
    parser.add_argument("--samples", type=int, help="samples per embedding")
    args = parser.parse_args(argv)
    names = args.only or list(TESTBEDS)
    if args.command == "build":
        build(names, args.root)
    else:
        size = (args.per_pattern, args.samples) if args.per_pattern and args.samples else None
        report(names, args.root, size)


if __name__ == "__main__":
    main()
