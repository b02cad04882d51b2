"""The bundled default model against the two trivial baselines on its author-split validation set.

Baselines: (a) always answering the single best fixed location (the training location with the
highest mean GeoScore over the training set), (b) sampling from the MP-16 location prior (the
best guess of prior samples, i.e. the same decoding as the model but without the image).

Prints a table and JSON: GeoScore, median km, accuracy at 25/200/750/2500 km.

    python benchmarks/run.py default_model -p model=src/globeflow/default_model \
        -p embeddings=runs/default-rfm/train-embeddings.parquet
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _registry import experiment

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


@experiment("default_model", quick={"num_samples": 8, "steps": 4, "guidance": "2"})
def default_model(
    *,
    model: str = str(REPO / "src/globeflow/default_model"),
    embeddings: str = str(REPO / "runs/default-rfm/train-embeddings.parquet"),
    prior: str = str(REPO.parent / "shared/data/mp16-locations-100k/locations.csv"),
    val_fraction: float = 0.15,
    seed: int = 0,
    num_samples: int = 512,
    steps: int = 32,
    guidance: str = "0,1,2,3",
) -> dict:
    """The model, the best fixed location and MP-16 prior samples on the validation photos.

    ``guidance``: comma-separated guidance scales of the model's rows."""
    for path in (embeddings, prior):
        if not Path(path).exists():
            print(f"skipping: {path} not found (needs ../shared/data and `globeflow embed`)")
            return {"skipped": f"{path} not found"}
    table = read_embeddings(embeddings)
    tr, va = split_rows(table.authors, len(table.ids), val_fraction, seed)
    truth = table.latlon[va]
    rows: dict[str, dict] = {}

    fixed = best_fixed_location(table.latlon[tr])
    rows["best fixed location"] = distance_metrics(
        fixed[None].expand(len(va), 2).numpy(), truth.numpy(), THRESHOLDS
    )
    prior_latlon = read_prior_locations(prior).double()
    rows["MP-16 prior samples"] = distance_metrics(
        prior_guesses(prior_latlon, len(va), num_samples, seed).numpy(),
        truth.numpy(),
        THRESHOLDS,
    )
    network = load_model(model)
    emb = table.embeddings[va]
    for w in (float(text) for text in guidance.split(",")):
        guesses = model_guesses(network, emb, num_samples, steps, w, seed)
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
    return report
