"""Synthetic conditioning whose true posterior is known exactly.

A *pattern* stands for a kind of photo: a fixed embedding code (standard Gaussian entries,
length ``cond_dim``, drawn from a seeded generator) and a true posterior over the Earth, a
mixture of 1 or 3 von Mises-Fisher clusters centred on real cities. A cluster of scale ``s`` km
has concentration kappa = (R / s)^2 (R = 6371 km): near its centre the vMF is a 2-D Gaussian in
the tangent plane with standard deviation s km per axis, so the distance from the centre
follows a Rayleigh law of scale s (median 1.18 s).

A training row is its pattern's code plus Gaussian noise of ``noise_std`` per coordinate and a
location drawn from its pattern's mixture. Codes of different patterns lie about
sqrt(2 cond_dim) apart (45 for cond_dim 1024) against a noise of sqrt(cond_dim) * noise_std
(3.2 at the default 0.1), so the pattern of an embedding is certain (:func:`pattern_log_odds`)
and the true posterior given an embedding is its pattern's mixture.

Shapes: ``P`` patterns, ``K`` = 3 mode slots per pattern (unused slots have weight 0), ``D`` =
cond_dim. Locations are (lat, lon) degrees; densities are natural log per steradian.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from globeflow.core.sphere import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon
from globeflow.core.vmf import sample_vmf, vmf_log_density
from globeflow.data.embedding_store import EmbeddingWriter

__all__ = [
    "CITIES",
    "ENCODER_NAME",
    "MAX_MODES",
    "SCALES_KM",
    "SyntheticPatterns",
    "kappa_for_scale",
    "load_heldout",
    "load_patterns",
    "make_heldout",
    "make_patterns",
    "mode_of",
    "noisy_embeddings",
    "pattern_log_odds",
    "posterior_log_density",
    "sample_posterior",
    "save_heldout",
    "save_patterns",
    "write_store",
]

ENCODER_NAME = "synthetic-patterns"
SCALES_KM = (1.0, 5.0, 25.0, 200.0, 2000.0)
MAX_MODES = 3
UNEQUAL_WEIGHTS = (0.6, 0.3, 0.1)
PATTERNS_JSON = "patterns.json"
PATTERNS_TENSORS = "patterns.safetensors"

# Real cities, spread over every continent so that the clusters of a 3-mode pattern are
# thousands of km apart (each triple below is taken from different rows).
CITIES: tuple[tuple[str, float, float], ...] = (
    ("Paris", 48.8566, 2.3522),
    ("Tokyo", 35.6762, 139.6503),
    ("Sao Paulo", -23.5505, -46.6333),
    ("New York", 40.7128, -74.0060),
    ("Sydney", -33.8688, 151.2093),
    ("Cairo", 30.0444, 31.2357),
    ("Mumbai", 19.0760, 72.8777),
    ("Mexico City", 19.4326, -99.1332),
    ("Nairobi", -1.2921, 36.8219),
    ("Moscow", 55.7558, 37.6173),
    ("Lima", -12.0464, -77.0428),
    ("Beijing", 39.9042, 116.4074),
    ("Cape Town", -33.9249, 18.4241),
    ("Vancouver", 49.2827, -123.1207),
    ("Singapore", 1.3521, 103.8198),
    ("Reykjavik", 64.1466, -21.9426),
)
_CITY_INDEX = {name: i for i, (name, _, _) in enumerate(CITIES)}
# Triples of cities >= 5,000 km apart pairwise, for the 3-mode patterns.
_TRIPLES = (
    ("Paris", "Tokyo", "Sao Paulo"),
    ("New York", "Sydney", "Cairo"),
    ("Mumbai", "Mexico City", "Cape Town"),
    ("Moscow", "Lima", "Sydney"),
    ("Beijing", "Nairobi", "Vancouver"),
    ("Singapore", "Reykjavik", "Lima"),
)


def kappa_for_scale(scale_km: torch.Tensor | float) -> torch.Tensor:
    """vMF concentration whose per-axis spread is ``scale_km`` on Earth: (R / s)^2."""
    return (EARTH_RADIUS_KM / torch.as_tensor(scale_km, dtype=torch.float64)) ** 2


@dataclass
class SyntheticPatterns:
    """Patterns and their true posteriors.

    ``codes`` (P, D) float32; ``centres`` (P, K, 2) float64 degrees; ``weights`` (P, K) float64
    (rows sum to 1, 0 for unused slots); ``scale_km`` (P,) float64 (one scale per pattern);
    ``names`` P strings; ``cities`` P tuples of the cities of the used slots.
    """

    codes: torch.Tensor
    centres: torch.Tensor
    weights: torch.Tensor
    scale_km: torch.Tensor
    names: list[str]
    cities: list[tuple[str, ...]]
    seed: int

    def __len__(self) -> int:
        return len(self.names)

    @property
    def cond_dim(self) -> int:
        return int(self.codes.shape[1])

    @property
    def kappa(self) -> torch.Tensor:
        """(P,) float64 vMF concentration of every cluster of each pattern."""
        return kappa_for_scale(self.scale_km)

    @property
    def num_modes(self) -> torch.Tensor:
        """(P,) int64: 1 or 3."""
        return (self.weights > 0).sum(-1)

    def describe(self) -> list[dict]:
        """JSON-ready truth of each pattern (no codes)."""
        out = []
        for p, name in enumerate(self.names):
            k = int(self.num_modes[p])
            out.append(
                {
                    "index": p,
                    "name": name,
                    "scale_km": float(self.scale_km[p]),
                    "kappa": float(self.kappa[p]),
                    "modes": k,
                    "cities": list(self.cities[p]),
                    "centres": self.centres[p, :k].tolist(),
                    "weights": self.weights[p, :k].tolist(),
                }
            )
        return out


def make_patterns(
    cond_dim: int = 1024,
    seed: int = 0,
    scales_km: tuple[float, ...] = SCALES_KM,
    unimodal_per_scale: int = 2,
    multimodal_per_scale: int = 2,
) -> SyntheticPatterns:
    """Per scale: ``unimodal_per_scale`` one-city patterns and ``multimodal_per_scale`` 3-city
    patterns, alternately with equal weights and with weights 0.6 / 0.3 / 0.1. Same seed, same
    patterns (codes and cities)."""
    g = torch.Generator().manual_seed(seed)
    city_order = torch.randperm(len(CITIES), generator=g).tolist()
    triple_order = torch.randperm(len(_TRIPLES), generator=g).tolist()
    rows: list[tuple[str, float, tuple[str, ...], tuple[float, ...]]] = []
    uni, multi = 0, 0
    for scale in scales_km:
        for _ in range(unimodal_per_scale):
            city = CITIES[city_order[uni % len(CITIES)]][0]
            rows.append((f"{city} {scale:g} km", scale, (city,), (1.0,)))
            uni += 1
        for j in range(multimodal_per_scale):
            triple = _TRIPLES[triple_order[multi % len(_TRIPLES)]]
            weights = (1 / 3, 1 / 3, 1 / 3) if j % 2 == 0 else UNEQUAL_WEIGHTS
            kind = "equal" if j % 2 == 0 else "unequal"
            rows.append((f"{'/'.join(triple)} {scale:g} km {kind}", scale, triple, weights))
            multi += 1
    n = len(rows)
    centres = torch.zeros(n, MAX_MODES, 2, dtype=torch.float64)
    weights = torch.zeros(n, MAX_MODES, dtype=torch.float64)
    for p, (_, _, cities, w) in enumerate(rows):
        for k, city in enumerate(cities):
            _, lat, lon = CITIES[_CITY_INDEX[city]]
            centres[p, k] = torch.tensor([lat, lon], dtype=torch.float64)
            weights[p, k] = w[k]
        centres[p, len(cities) :] = centres[p, 0]  # unused slots: weight 0, any valid point
    codes = torch.randn(n, cond_dim, generator=g)
    return SyntheticPatterns(
        codes=codes,
        centres=centres,
        weights=weights / weights.sum(-1, keepdim=True),
        scale_km=torch.tensor([r[1] for r in rows], dtype=torch.float64),
        names=[r[0] for r in rows],
        cities=[r[2] for r in rows],
        seed=seed,
    )


def sample_posterior(
    patterns: SyntheticPatterns,
    pattern_idx: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact samples of the true posteriors: pattern_idx (M,) -> (M, num_samples, 2) degrees."""
    pattern_idx = torch.as_tensor(pattern_idx, dtype=torch.int64)
    w = patterns.weights[pattern_idx]  # (M, K)
    mode = torch.multinomial(w, num_samples, replacement=True, generator=generator)  # (M, N)
    mu = latlon_to_unit(patterns.centres[pattern_idx])  # (M, K, 3)
    mu = torch.gather(mu, 1, mode[..., None].expand(-1, -1, 3))  # (M, N, 3)
    kappa = patterns.kappa[pattern_idx][:, None].expand(-1, num_samples)
    return unit_to_latlon(sample_vmf(mu, kappa, generator=generator))


def posterior_log_density(
    patterns: SyntheticPatterns, pattern_idx: torch.Tensor, latlon: torch.Tensor
) -> torch.Tensor:
    """log p(y | pattern) per steradian, float64: pattern_idx (M,), latlon (M, N, 2) -> (M, N)."""
    pattern_idx = torch.as_tensor(pattern_idx, dtype=torch.int64)
    x = latlon_to_unit(latlon.to(torch.float64))[:, :, None, :]  # (M, N, 1, 3)
    mu = latlon_to_unit(patterns.centres[pattern_idx])[:, None]  # (M, 1, K, 3)
    kappa = patterns.kappa[pattern_idx][:, None, None]  # (M, 1, 1)
    log_w = torch.log(patterns.weights[pattern_idx])[:, None]  # (M, 1, K); -inf for unused
    return torch.logsumexp(log_w + vmf_log_density(x, mu, kappa), dim=-1)


def mode_of(
    patterns: SyntheticPatterns, pattern_idx: torch.Tensor, latlon: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest used centre of each point: pattern_idx (M,), latlon (M, N, 2) ->
    (mode index (M, N) int64, great-circle km to that centre (M, N) float64)."""
    pattern_idx = torch.as_tensor(pattern_idx, dtype=torch.int64)
    x = latlon_to_unit(latlon.to(torch.float64))[:, :, None, :]
    mu = latlon_to_unit(patterns.centres[pattern_idx])[:, None]
    # 2 atan2(|x - mu|, |x + mu|) keeps metre precision at every distance (arccos does not).
    angle = 2 * torch.atan2((x - mu).norm(dim=-1), (x + mu).norm(dim=-1))  # (M, N, K)
    angle = angle.masked_fill(patterns.weights[pattern_idx][:, None] <= 0, math.inf)
    best = angle.min(-1)
    return best.indices, best.values * EARTH_RADIUS_KM


def noisy_embeddings(
    patterns: SyntheticPatterns,
    pattern_idx: torch.Tensor,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Embeddings of photos of the given patterns: code + N(0, noise_std^2) per coordinate,
    (M,) -> (M, D) float32."""
    codes = patterns.codes[torch.as_tensor(pattern_idx, dtype=torch.int64)]
    return codes + noise_std * torch.randn(codes.shape, generator=generator)


def pattern_log_odds(
    patterns: SyntheticPatterns, emb: torch.Tensor, noise_std: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pattern of each embedding under the noise model (uniform prior over patterns):
    emb (M, D) -> (most likely pattern (M,) int64, log odds against the runner-up (M,) nats).

    Log odds of hundreds of nats mean the posterior given the embedding is, to all
    floating-point purposes, the most likely pattern's mixture."""
    d2 = torch.cdist(emb.double(), patterns.codes.double()) ** 2  # (M, P)
    log_lik = -d2 / (2 * noise_std**2)
    top = log_lik.topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


def _balanced_patterns(num_patterns: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n pattern indices, each pattern n / P times (+-1), in random order."""
    idx = torch.arange(n) % num_patterns
    return idx[torch.randperm(n, generator=generator)]


def write_store(
    path: str | os.PathLike[str],
    patterns: SyntheticPatterns,
    num_rows: int,
    seed: int = 1,
    noise_std: float = 0.1,
    chunk_rows: int = 8192,
    dtype: str = "float16",
) -> Path:
    """Write ``num_rows`` training rows (balanced over patterns) as an embedding store that
    ``globeflow train --embeddings`` reads. Ids are ``syn-<row>-p<pattern>``; no authors.
    Same seed, same rows. float16 halves the file; the noise (0.1) is 100x its rounding."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: the embedding store already exists")
    g = torch.Generator().manual_seed(seed)
    idx = _balanced_patterns(len(patterns), num_rows, g)
    writer = EmbeddingWriter(
        path, ENCODER_NAME, patterns.cond_dim, chunk_size=chunk_rows, dtype=dtype
    )
    with writer:
        for start in range(0, num_rows, chunk_rows):
            part = idx[start : start + chunk_rows]
            emb = noisy_embeddings(patterns, part, noise_std, g)
            latlon = sample_posterior(patterns, part, 1, g)[:, 0]
            ids = [f"syn-{start + i}-p{int(p)}" for i, p in enumerate(part)]
            writer.add(ids, emb, latlon=latlon)
    return path


def make_heldout(
    patterns: SyntheticPatterns, per_pattern: int, seed: int = 2, noise_std: float = 0.1
) -> dict[str, torch.Tensor]:
    """Fresh embeddings of every pattern (not in any training store): ``embeddings`` (M, D)
    float32, ``pattern`` (M,) int64, ``latlon`` (M, 2) one true-posterior draw per row."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(len(patterns)).repeat_interleave(per_pattern)
    emb = noisy_embeddings(patterns, idx, noise_std, g)
    latlon = sample_posterior(patterns, idx, 1, g)[:, 0]
    return {"embeddings": emb.float(), "pattern": idx, "latlon": latlon}


def save_heldout(heldout: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` of plain tensors (read back with weights_only=True)."""
    path = Path(path)
    torch.save({k: v.contiguous() for k, v in heldout.items()}, path)
    return path


def load_heldout(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_patterns(patterns: SyntheticPatterns, directory: str | os.PathLike[str]) -> Path:
    """``patterns.json`` (the truth, readable) and ``patterns.safetensors`` (codes, centres,
    weights, scales) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "codes": patterns.codes.contiguous(),
        "centres": patterns.centres.contiguous(),
        "weights": patterns.weights.contiguous(),
        "scale_km": patterns.scale_km.contiguous(),
    }
    save_file(tensors, str(directory / PATTERNS_TENSORS))
    meta = {"seed": patterns.seed, "cond_dim": patterns.cond_dim, "patterns": patterns.describe()}
    (directory / PATTERNS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def load_patterns(directory: str | os.PathLike[str]) -> SyntheticPatterns:
    directory = Path(directory)
    for name in (PATTERNS_JSON, PATTERNS_TENSORS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (build it with the testbeds)")
    meta = json.loads((directory / PATTERNS_JSON).read_text())
    t = load_file(str(directory / PATTERNS_TENSORS))
    return SyntheticPatterns(
        codes=t["codes"],
        centres=t["centres"],
        weights=t["weights"],
        scale_km=t["scale_km"],
        names=[p["name"] for p in meta["patterns"]],
        cities=[tuple(p["cities"]) for p in meta["patterns"]],
        seed=int(meta["seed"]),
    )
