"""The bundled default model against the two trivial baselines on its author-split validation set.

Baselines: (a) always answering the single best fixed location (the training location with the
highest mean GeoScore over the training set), (b) sampling from the MP-16 location prior (the
best guess of prior samples, i.e. the same decoding as the model but without the image).

Prints a table and JSON: GeoScore, median km, accuracy at 25/200/750/2500 km.

    python benchmarks/default_model.py --model src/globeflow/default_model \
        --embeddings runs/default-rfm/train-embeddings.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from globeflow import load_model
from globeflow.answers.decode import best_guess, expected_geoscore
from globeflow.data.embedding_store import read_embeddings
from globeflow.jobs.metrics import distance_metrics
from globeflow.jobs.training import read_prior_locations, split_rows

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (25, 200, 750, 2500)


def best_fixed_location(train_latlon: torch.Tensor) -> torch.Tensor:
    """The training location maximising the mean GeoScore over the training locations, (2,)."""
    scores = expected_geoscore(train_latlon[None].double(), train_latlon[None].double())[0]
    return train_latlon[int(scores.argmax())]


def prior_guesses(prior: torch.Tensor, n: int, num_samples: int, seed: int) -> torch.Tensor:
    """Best guesses from num_samples draws of the prior for each of n images, (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(prior), (n, num_samples), generator=g)
    return best_guess(prior[idx].double())


def model_guesses(model, emb, num_samples, steps, guidance, seed, batch=64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(emb), batch):
        samples = model.sample(emb[i : i + batch], num_samples, steps, guidance, generator=g)
        out.append(best_guess(samples))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(REPO / "src/globeflow/default_model"))
    p.add_argument("--embeddings", default=str(REPO / "runs/default-rfm/train-embeddings.parquet"))
    p.add_argument(
        "--prior", default=str(REPO.parent / "shared/data/mp16-locations-100k/locations.csv")
    )
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for path in (args.embeddings, args.prior):
        if not Path(path).exists():
            print(f"skipping: {path} not found (needs ../shared/data and `globeflow embed`)")
            return 0
    torch.set_num_threads(1)
    table = read_embeddings(args.embeddings)
    tr, va = split_rows(table.authors, len(table.ids), args.val_fraction, args.seed)
    truth = table.latlon[va]
    rows: dict[str, dict] = {}

    fixed = best_fixed_location(table.latlon[tr])
    rows["best fixed location"] = distance_metrics(
        fixed[None].expand(len(va), 2).numpy(), truth.numpy(), THRESHOLDS
    )
    prior = read_prior_locations(args.prior).double()
    rows["MP-16 prior samples"] = distance_metrics(
        prior_guesses(prior, len(va), args.num_samples, args.seed).numpy(),
        truth.numpy(),
        THRESHOLDS,
    )
    model = load_model(args.model)
    emb = table.embeddings[va]
    for w in args.guidance:
        guesses = model_guesses(model, emb, args.num_samples, args.steps, w, args.seed)
        rows[f"globeflow default (guidance {w:g})"] = distance_metrics(
            guesses.numpy(), truth.numpy(), THRESHOLDS
        )

    keys = ["geoscore", "median_km"] + [f"acc@{t}km" for t in THRESHOLDS]
    print(f"validation: {len(va)} photos by held-out authors; train: {len(tr)}")
    print(f"{'method':36s} " + " ".join(f"{k:>11s}" for k in keys))
    for name, r in rows.items():
        print(f"{name:36s} " + " ".join(f"{r[k]:11.1f}" for k in keys))
    report = {
        "n_val": len(va),
        "n_train": len(tr),
        "fixed_location": fixed.tolist(),
        "results": {k: {m: float(np.asarray(v)) for m, v in r.items()} for k, r in rows.items()},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
