"""Benchmark the offline image encoders for geolocation by k-NN retrieval on im2gps3k-train.

Protocol: author-grouped split (hash of author -> 20 % validation), L2-normalised embeddings,
cosine k-NN against the training photos; the prediction is the neighbour whose location has the
largest similarity-weighted GeoScore to the other neighbours' locations (a weighted medoid).
Reported per option: embedding speed on this CPU (images/s, load + preprocess + forward),
validation mean GeoScore, median km and accuracy within 25/200/750/2500 km, plus the baseline
"always answer the training location with the highest mean GeoScore over training photos".

    python benchmarks/run.py encoders [-p data=../shared/data/im2gps3k-train] [-p cache=.cache/enc]
                                      [-p variants=lite0,lite1,lite2]

Embedding passes are cached per variant (all components, plain and mirrored), so re-runs and new
combinations are fast. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _registry import experiment

REPO = Path(__file__).resolve().parents[1]
EARTH_RADIUS_KM = 6371.0
THRESHOLDS_KM = (25, 200, 750, 2500)
COMPONENTS = ("stage3", "stage4", "stage5", "stage6", "stage7", "head", "probs")


def haversine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise great-circle distances (km) between (N, 2) and (M, 2) lat/lon degree arrays."""
    la, lo = np.radians(a[:, 0])[:, None], np.radians(a[:, 1])[:, None]
    lb, lob = np.radians(b[:, 0])[None, :], np.radians(b[:, 1])[None, :]
    h = np.sin((lb - la) / 2) ** 2 + np.cos(la) * np.cos(lb) * np.sin((lob - lo) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def geoscore(km: np.ndarray) -> np.ndarray:
    return 5000.0 * np.exp(-km / 1492.7)


def summarise(km: np.ndarray) -> dict[str, float]:
    out = {"geoscore": float(geoscore(km).mean()), "median_km": float(np.median(km))}
    for t in THRESHOLDS_KM:
        out[f"acc@{t}km"] = float((km <= t).mean())
    return out


def author_split(authors: list[str], val_frac: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask (N,), True = validation; every author lands wholly on one side."""

    def bucket(a: str) -> float:
        digest = hashlib.sha256(f"{seed}:{a}".encode()).hexdigest()
        return int(digest[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(a) < val_frac for a in authors])


def knn_predict(
    emb_val: np.ndarray, emb_train: np.ndarray, loc_train: np.ndarray, k: int = 10
) -> np.ndarray:
    """(Nv, 2) predicted lat/lon: similarity-weighted GeoScore medoid of the k nearest."""
    sims = emb_val @ emb_train.T
    idx = np.argpartition(-sims, kth=min(k, sims.shape[1] - 1), axis=1)[:, :k]
    preds = np.empty((emb_val.shape[0], 2))
    for i in range(emb_val.shape[0]):
        nb = idx[i]
        w = np.clip(sims[i, nb], 1e-6, None)
        cand = loc_train[nb]
        score = geoscore(haversine_matrix(cand, cand)) @ w
        preds[i] = cand[int(np.argmax(score))]
    return preds


def best_fixed_location(loc_train: np.ndarray) -> np.ndarray:
    """The training location with the highest mean GeoScore to all training locations."""
    score = geoscore(haversine_matrix(loc_train, loc_train)).mean(axis=1)
    return loc_train[int(np.argmax(score))]


def read_locations(data: Path) -> tuple[list[str], np.ndarray, list[str]]:
    names, locs, authors = [], [], []
    with open(data / "locations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            names.append(row["image"])
            locs.append((float(row["lat"]), float(row["lon"])))
            authors.append(row.get("author", ""))
    return names, np.asarray(locs, dtype=np.float64), authors


def embed_variant(
    variant: str, data: Path, names: list[str], cache: Path, flip: bool, batch_size: int
) -> dict:
    """Pooled components for every image (plain and, if flip, mirrored). Cached as .npz."""
    from globeflow.data.encoders import EfficientNetLiteEncoder
    from globeflow.data.images import ImageLoadError, load_image

    path = cache / f"{variant}{'_flip' if flip else ''}_{len(names)}.npz"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        arrays = dict(np.load(path))
        return {"arrays": arrays, **json.loads(meta_path.read_text())}
    enc = EfficientNetLiteEncoder(variant=variant, components=COMPONENTS)
    acc: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    n_done = 0
    for i in range(0, len(names), batch_size):
        imgs = []
        for n in names[i : i + batch_size]:
            try:
                imgs.append(load_image(data / "images" / n))
            except ImageLoadError:
                imgs.append(torch.zeros(1))  # keep row alignment; zero features below
        ok = [j for j, im in enumerate(imgs) if not isinstance(im, torch.Tensor)]
        x = torch.stack([enc.preprocess(imgs[j]) for j in ok])
        views = [("", x)] + ([("_flip", torch.flip(x, dims=[3]))] if flip else [])
        with torch.inference_mode():
            for suffix, xv in views:
                maps = enc.feature_maps(xv)
                for c, m in maps.items():
                    pooled = {"avg": m.mean(dim=(2, 3))} if m.dim() == 4 else {"vec": m}
                    if m.dim() == 4:
                        pooled["gem"] = m.clamp_min(1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
                    for pname, v in pooled.items():
                        full = np.zeros((len(imgs), v.shape[1]), np.float32)
                        full[ok] = v.numpy()
                        acc.setdefault(f"{c}_{pname}{suffix}", []).append(full)
        n_done += len(imgs)
        print(f"  {variant}: {n_done}/{len(names)}", end="\r", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    print(file=sys.stderr)
    arrays = {k: np.concatenate(v) for k, v in acc.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    meta = {"seconds": seconds, "n": len(names), "passes": 2 if flip else 1}
    meta_path.write_text(json.dumps(meta))
    return {"arrays": arrays, **meta}


def compose(arrays: dict[str, np.ndarray], parts: list[str], flip: bool) -> np.ndarray:
    """L2-normalise each part (mirrored view averaged in first), concatenate, renormalise."""
    out = []
    for p in parts:
        v = arrays[p] + arrays[p + "_flip"] if flip else arrays[p]
        if p.startswith("probs"):
            v = np.sqrt(np.clip(v / (2.0 if flip else 1.0), 0, None))  # Hellinger
        out.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
    z = np.concatenate(out, axis=1)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


OPTIONS = {  # name -> (components with pooling, flip)
    "final-avg": (["head_avg"], False),
    "final-gem": (["head_gem"], False),
    "probs(hellinger)": (["probs_vec"], False),
    "stage6-gem": (["stage6_gem"], False),
    "stage5-gem": (["stage5_gem"], False),
    "ms(4-7+head)-avg": (
        ["stage4_avg", "stage5_avg", "stage6_avg", "stage7_avg", "head_avg"],
        False,
    ),
    "ms(4-7+head)-gem": (
        ["stage4_gem", "stage5_gem", "stage6_gem", "stage7_gem", "head_gem"],
        False,
    ),
    "ms(4-7+head)-gem+flip": (
        ["stage4_gem", "stage5_gem", "stage6_gem", "stage7_gem", "head_gem"],
        True,
    ),
    "ms(3-7+head)-gem+flip": (
        ["stage3_gem", "stage4_gem", "stage5_gem", "stage6_gem", "stage7_gem", "head_gem"],
        True,
    ),
    "ms(5-7+head)+probs-gem+flip": (
        ["stage5_gem", "stage6_gem", "stage7_gem", "head_gem", "probs_vec"],
        True,
    ),
    "head-gem+probs+flip": (["head_gem", "probs_vec"], True),
}


@experiment(
    "encoders",
    quick={
        "cache": Path(tempfile.gettempdir()) / "globeflow-bench-encoders-quick",
        "variants": "lite0",
        "limit": 40,
        "no_flip": "lite0",
    },
    threads=None,
)
def encoders(
    *,
    data: Path = REPO.parent / "shared/data/im2gps3k-train",
    cache: Path = REPO / ".cache/bench_encoders",
    variants: str = "lite0,lite1,lite2",
    no_flip: str = "",
    k: int = 10,
    limit: int = 0,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``no_flip``: variants embedded without the mirrored view
    - ``limit``: use only the first N photos (smoke)
    """

    if not (data / "locations.csv").exists():
        print(f"skipping: im2gps3k data not found at {data} (pass -p data=DIR)")
        return {"skipped": f"{data} not found"}
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))

    names, locs, authors = read_locations(data)
    if limit:
        names, locs, authors = names[:limit], locs[:limit], authors[:limit]
    val = author_split(authors, seed=seed)
    train = ~val
    fixed = best_fixed_location(locs[train])
    base_km = haversine_matrix(locs[val], fixed[None, :])[:, 0]
    rows = [
        {
            "encoder": "baseline: fixed location",
            "dim": 0,
            "images_per_s": None,
            "location": [float(fixed[0]), float(fixed[1])],
            **summarise(base_km),
        }
    ]
    unflipped = set(filter(None, no_flip.split(",")))
    for variant in filter(None, variants.split(",")):
        flip = variant not in unflipped
        res = embed_variant(variant, data, names, cache, flip, batch_size)
        arrays = res["arrays"]
        # a single pass (no mirror) costs half of a 2-pass run; report per-option speed
        one_pass = res["n"] * res["passes"] / res["seconds"]
        for opt, (parts, use_flip) in OPTIONS.items():
            if use_flip and not flip:
                continue
            if any(p not in arrays for p in parts):
                continue
            z = compose(arrays, parts, use_flip)
            pred = knn_predict(z[val], z[train], locs[train], k=k)
            km = np.array(
                [haversine_matrix(p[None], t[None])[0, 0] for p, t in zip(pred, locs[val])]
            )
            rows.append(
                {
                    "encoder": f"efficientnet-{variant} {opt}",
                    "dim": int(z.shape[1]),
                    "images_per_s": one_pass / (2 if use_flip else 1),
                    **summarise(km),
                }
            )
    result = {
        "protocol": {
            "n_train": int(train.sum()),
            "n_val": int(val.sum()),
            "k": k,
            "split": "sha256(seed:author) < 0.2 -> validation",
            "threads": torch.get_num_threads(),
        },
        "results": rows,
    }
    header = (
        f"{'encoder':48s} {'dim':>5s} {'img/s':>6s} {'GeoScore':>8s} {'med km':>7s} "
        + " ".join(f"{'@' + str(t):>6s}" for t in THRESHOLDS_KM)
    )
    print(header)
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        accs = " ".join(f"{r[f'acc@{t}km']:6.3f}" for t in THRESHOLDS_KM)
        print(
            f"{r['encoder']:48s} {r['dim']:5d} {ips:>6s} {r['geoscore']:8.0f} "
            f"{r['median_km']:7.0f} {accs}"
        )
    return result
