"""Geolocation metrics (PLONK paper, section 4): haversine errors, GeoScore, accuracy at distance
thresholds, administrative accuracy, NLL in bits per dimension, precision / recall / density /
coverage on the sphere, and calibration of highest-density regions.

All functions are pure and vectorised. Inputs may be torch tensors, numpy arrays or nested
sequences; coordinates are degrees in (lat, lon) order; distances are kilometres on a sphere of
radius :data:`globeflow.core.sphere.EARTH_RADIUS_KM`. Computations run in float64 so that summaries
are reproducible from written CSVs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from globeflow.core.sphere import EARTH_RADIUS_KM, latlon_to_unit

__all__ = [
    "GEOSCORE_SCALE_KM",
    "DEFAULT_THRESHOLDS_KM",
    "geoscore",
    "haversine_km_np",
    "distance_metrics",
    "nll_bits_per_dim",
    "prdc",
    "hpd_mass",
    "hpd_coverage",
    "ReliabilityCurve",
    "reliability_curve",
    "plot_reliability",
    "admin_accuracy",
    "sliced_wasserstein_km",
]

GEOSCORE_SCALE_KM = 1492.7
"""GeoGuessr-style score decay length: GeoScore = 5000 exp(-d / 1492.7 km)."""
DEFAULT_THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
"""Street, city, region, country, continent scales."""

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any] | float


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _latlon(x: ArrayLike, name: str) -> np.ndarray:
    arr = _np64(x)
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected (N, 2) degrees (lat, lon), got shape {arr.shape}")
    return arr


def geoscore(km: ArrayLike) -> ArrayLike:
    """GeoScore 5000 exp(-km / 1492.7) of distances in km (same type and shape as the input)."""
    if isinstance(km, torch.Tensor):
        return 5000.0 * torch.exp(-km / GEOSCORE_SCALE_KM)
    out = 5000.0 * np.exp(-_np64(km) / GEOSCORE_SCALE_KM)
    return float(out) if np.ndim(out) == 0 else out


def haversine_km_np(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Great-circle distance in km between (..., 2) degree coordinates, float64, broadcasting.

    Same distance as the haversine formula, evaluated in the atan2 (Vincenty) form that stays
    accurate from coincident to antipodal points.
    """
    a, b = np.radians(_np64(a)), np.radians(_np64(b))
    lat1, lat2, dlon = a[..., 0], b[..., 0], b[..., 1] - a[..., 1]
    s1, c1, s2, c2 = np.sin(lat1), np.cos(lat1), np.sin(lat2), np.cos(lat2)
    cross = np.hypot(c2 * np.sin(dlon), c1 * s2 - s1 * c2 * np.cos(dlon))
    return EARTH_RADIUS_KM * np.arctan2(cross, s1 * s2 + c1 * c2 * np.cos(dlon))


def threshold_key(km: float) -> str:
    """Summary key of an accuracy threshold: 1 -> "acc@1km", 2.5 -> "acc@2.5km"."""
    return f"acc@{km:g}km"


def distance_metrics(
    pred_latlon: ArrayLike,
    true_latlon: ArrayLike,
    thresholds_km: Sequence[float] = DEFAULT_THRESHOLDS_KM,
) -> dict[str, float]:
    """Distance-based geolocation metrics of N predictions.

    Args:
        pred_latlon: (N, 2) predicted degrees.
        true_latlon: (N, 2) true degrees.
        thresholds_km: accuracy thresholds; a prediction counts when error <= threshold.

    Returns:
        ``{"n", "mean_km", "median_km", "geoscore", "acc@<t>km" (percent) ...}``.
    """
    pred, true = _latlon(pred_latlon, "pred_latlon"), _latlon(true_latlon, "true_latlon")
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} shapes differ")
    return distance_metrics_from_km(haversine_km_np(pred, true), thresholds_km)


def distance_metrics_from_km(
    km: ArrayLike, thresholds_km: Sequence[float] = DEFAULT_THRESHOLDS_KM
) -> dict[str, float]:
    """:func:`distance_metrics` from precomputed errors km (N,)."""
    d = _np64(km).reshape(-1)
    n = d.shape[0]
    out: dict[str, float] = {"n": n}
    if n == 0:
        out.update(mean_km=math.nan, median_km=math.nan, geoscore=math.nan)
        out.update({threshold_key(t): math.nan for t in thresholds_km})
        return out
    out["mean_km"] = float(d.mean())
    out["median_km"] = float(np.median(d))
    out["geoscore"] = float(geoscore(d).mean())
    for t in thresholds_km:
        out[threshold_key(t)] = float(100.0 * (d <= t).mean())
    return out


def nll_bits_per_dim(log_prob_nats: ArrayLike) -> float:
    """Paper's NLL: mean over images of -log2 p(x_i | c_i) / 3, from natural-log densities (N,)."""
    lp = _np64(log_prob_nats).reshape(-1)
    if lp.size == 0:
        return math.nan
    return float((-lp / math.log(2.0) / 3.0).mean())


# ---- precision / recall / density / coverage ------------------------------------------------


def _chunk_rows(n_cols: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_cols))


def _knn_cos(x: torch.Tensor, k: int, max_elements: int) -> torch.Tensor:
    """Cosine of the angle from each unit vector to its k-th nearest other vector of the set."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"PRDC needs more than k={k} points per set, got {n}")
    step = _chunk_rows(n, max_elements)
    out = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, step):
        sim = x[i : i + step] @ x.T
        # the point itself comes first (largest cosine), so index k is its k-th neighbour;
        # duplicates of the point count as neighbours, as in the reference code.
        out[i : i + step] = torch.topk(sim, k + 1, dim=1, largest=True).values[:, k]
    return out


def prdc(
    real: ArrayLike, fake: ArrayLike, k: int = 3, max_elements: int = 2**24
) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., ICML 2020) with haversine distance.

    Each real point x_i has the ball of radius r_k(x_i) = distance to its k-th nearest real
    neighbour; likewise r_k(y_j) for fake points. With closed balls (a point on the boundary is
    inside, which keeps duplicated coordinates meaningful):

    - precision = share of fakes inside at least one real ball;
    - recall = share of reals inside at least one fake ball;
    - density = (1 / kM) * sum over fakes of the number of real balls containing it;
    - coverage = share of real balls containing at least one fake.

    Args:
        real: (N, 2) degrees, e.g. true locations.
        fake: (M, 2) degrees, e.g. predictions or model samples.
        k: neighbourhood size.
        max_elements: pairwise distances held at once (bounds memory, 8 bytes each).

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` as fractions (density may exceed 1).
    """
    real_np, fake_np = _latlon(real, "real"), _latlon(fake, "fake")
    n, m = real_np.shape[0], fake_np.shape[0]
    # Great-circle distance is monotone decreasing in the cosine of the angle, so balls and
    # neighbours are computed on dot products (one matmul per chunk). float64 resolves distances
    # down to about a metre on Earth, far below any geolocation scale.
    xr, xf = latlon_to_unit(torch.tensor(real_np)), latlon_to_unit(torch.tensor(fake_np))
    c_real = _knn_cos(xr, k, max_elements)
    c_fake = _knn_cos(xf, k, max_elements)

    fake_in_real = torch.zeros(m, dtype=torch.bool)
    fake_count = torch.zeros(m, dtype=torch.float64)
    real_in_fake = torch.zeros(n, dtype=torch.bool)
    real_covered = torch.zeros(n, dtype=torch.bool)
    step = _chunk_rows(n, max_elements)
    for j in range(0, m, step):
        sim = xf[j : j + step] @ xr.T  # (chunk of fakes, N reals)
        inside_real = sim >= c_real[None, :]
        fake_in_real[j : j + step] = inside_real.any(1)
        fake_count[j : j + step] = inside_real.sum(1).to(torch.float64)
        real_covered |= inside_real.any(0)
        real_in_fake |= (sim >= c_fake[j : j + step, None]).any(0)
    return {
        "precision": float(fake_in_real.to(torch.float64).mean()),
        "recall": float(real_in_fake.to(torch.float64).mean()),
        "density": float(fake_count.sum() / (k * m)),
        "coverage": float(real_covered.to(torch.float64).mean()),
    }


# ---- calibration of highest-density regions ------------------------------------------------


def hpd_mass(log_prob_truth: ArrayLike, log_prob_samples: ArrayLike) -> np.ndarray:
    """Monte Carlo estimate of the probability mass denser than the truth, per image.

    The truth lies in the model's q-highest-density region iff this mass is <= q.

    Args:
        log_prob_truth: (N,) log density of each truth under its model distribution.
        log_prob_samples: (N, S) log densities of S samples drawn from that same distribution.

    Returns:
        (N,) fractions in [0, 1] of samples strictly denser than the truth.
    """
    lt = _np64(log_prob_truth).reshape(-1)
    ls = _np64(log_prob_samples)
    if ls.ndim != 2 or ls.shape[0] != lt.shape[0]:
        raise ValueError(f"log_prob_samples must be (N={lt.shape[0]}, S), got {ls.shape}")
    return (ls > lt[:, None]).mean(axis=1)


def _coverage_from_mass(mass: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float64)
    if mass.size == 0:
        return np.full(lv.shape, np.nan)
    return (mass[None, :] <= lv[:, None]).mean(axis=1)


def hpd_coverage(
    log_prob_truth: ArrayLike,
    log_prob_samples: ArrayLike,
    levels: Sequence[float] = (0.5, 0.9),
) -> np.ndarray:
    """Observed frequency of the truth inside the model's q-HPD region, for each level q.

    A calibrated model gives frequency ~ q. With S samples, a calibrated model's expected
    frequency is (floor(q S) + 1) / (S + 1) exactly.

    Args:
        log_prob_truth: (N,) natural log densities of the truths.
        log_prob_samples: (N, S) natural log densities of model samples.
        levels: nominal probability levels q in [0, 1].

    Returns:
        (len(levels),) observed frequencies in [0, 1].
    """
    return _coverage_from_mass(hpd_mass(log_prob_truth, log_prob_samples), levels)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Observed HPD coverage against nominal level."""

    levels: tuple[float, ...]
    observed: tuple[float, ...]
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"levels": list(self.levels), "observed": list(self.observed), "n": self.n}

    @property
    def calibration_error(self) -> float:
        """Mean absolute gap |observed - nominal| over the levels (0 = perfectly calibrated)."""
        if self.n == 0:
            return math.nan
        return float(np.mean(np.abs(np.array(self.observed) - np.array(self.levels))))


def reliability_curve_from_mass(mass: ArrayLike, num_levels: int = 21) -> ReliabilityCurve:
    """:func:`reliability_curve` from per-image :func:`hpd_mass` values (N,)."""
    m = _np64(mass).reshape(-1)
    m = m[np.isfinite(m)]
    levels = np.linspace(0.0, 1.0, num_levels)
    observed = _coverage_from_mass(m, levels)
    return ReliabilityCurve(
        tuple(float(x) for x in levels), tuple(float(x) for x in observed), int(m.size)
    )


def reliability_curve(
    log_prob_truth: ArrayLike, log_prob_samples: ArrayLike, num_levels: int = 21
) -> ReliabilityCurve:
    """HPD coverage on an even grid of ``num_levels`` levels from 0 to 1 (see hpd_coverage)."""
    return reliability_curve_from_mass(hpd_mass(log_prob_truth, log_prob_samples), num_levels)


def plot_reliability(curve: ReliabilityCurve, path: str | Path, title: str = "") -> Path:
    """Write a reliability diagram (observed vs nominal HPD coverage) as a PNG; returns the path."""
    from matplotlib.figure import Figure  # no pyplot: its own canvas, the user's backend kept

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="calibrated")
    ax.plot(curve.levels, curve.observed, "o-", color="C0", ms=3, label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal HPD level")
    ax.set_ylabel("observed frequency of truth inside")
    ax.set_title(title or f"Calibration (n = {curve.n})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---- administrative accuracy --------------------------------------------------------------


def _norm(s: object) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return ""
    return " ".join(str(s).strip().casefold().split())


_NAME_TO_CODE: dict[str, str] | None = None


def _country_key(place: Mapping[str, Any]) -> str:
    global _NAME_TO_CODE
    code = _norm(place.get("country_code"))
    if code:
        return code
    name = _norm(place.get("country"))
    if len(name) == 2:  # datasets such as OSV-5M store the ISO code in "country"
        return name
    if name:
        if _NAME_TO_CODE is None:
            from globeflow.answers.geocode import COUNTRY_NAMES

            _NAME_TO_CODE = {_norm(v): k.casefold() for k, v in COUNTRY_NAMES.items()}
        return _NAME_TO_CODE.get(name, name)
    return ""


def _as_mapping(place: Any) -> Mapping[str, Any]:
    if place is None:
        return {}
    if isinstance(place, Mapping):
        return place
    if hasattr(place, "to_dict"):
        return place.to_dict()
    return vars(place)


def admin_accuracy(pred_places: Sequence[Any], true_places: Sequence[Any]) -> dict[str, float]:
    """Percentage of predictions in the true country, region (admin1) and city.

    Places are :class:`globeflow.answers.geocode.Place` objects or dicts with keys country /
    country_code / region / city. Countries match by ISO code (names are mapped to codes).
    Region and city match within the same country (names compared case-insensitively), so that a
    "Springfield" in another country is not a hit. A truth without a label at some level is left
    out of that level's denominator.

    Returns:
        ``{"country_acc", "region_acc", "city_acc"}`` in percent, and the counts
        ``{"country_n", "region_n", "city_n"}``.
    """
    if len(pred_places) != len(true_places):
        raise ValueError(f"{len(pred_places)} predicted vs {len(true_places)} true places")
    hits = {"country": 0, "region": 0, "city": 0}
    counts = {"country": 0, "region": 0, "city": 0}
    for p_raw, t_raw in zip(pred_places, true_places, strict=True):
        p, t = _as_mapping(p_raw), _as_mapping(t_raw)
        pc, tc = _country_key(p), _country_key(t)
        same_country = pc == tc if tc else True
        if tc:
            counts["country"] += 1
            hits["country"] += same_country
        for level in ("region", "city"):
            tv = _norm(t.get(level))
            if tv:
                counts[level] += 1
                hits[level] += same_country and _norm(p.get(level)) == tv
    out: dict[str, float] = {}
    for level in ("country", "region", "city"):
        n = counts[level]
        out[f"{level}_acc"] = 100.0 * hits[level] / n if n else math.nan
        out[f"{level}_n"] = n
    return out


def sliced_wasserstein_km(
    a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0
) -> torch.Tensor:
    """Sliced 1-Wasserstein distance between equal-size sample sets on the sphere, in km.

    a, b: (..., N, 2) degrees. Each set is projected onto ``projections`` random directions of
    R^3 (unit vectors; a projection is 1-Lipschitz in chordal distance), the 1-D W1 distances are
    averaged and scaled by the Earth's radius: (...,). Zero iff the projected distributions agree
    on every sampled direction; bounded by the mean paired distance for any pairing.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(
        torch.randn(projections, 3, generator=g, dtype=torch.float64), dim=-1
    )
    pa = torch.sort(latlon_to_unit(a.double()) @ dirs.T, dim=-2).values
    pb = torch.sort(latlon_to_unit(b.double()) @ dirs.T, dim=-2).values
    return (pa - pb).abs().mean((-2, -1)) * EARTH_RADIUS_KM
