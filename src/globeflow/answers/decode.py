"""Answers from samples: best guess, top regions, sample-based density.

All functions take model samples in degrees, (B, N, 2) or (N, 2), and are pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from globeflow.core.sphere import EARTH_RADIUS_KM, haversine_km, latlon_grid, latlon_to_unit
from globeflow.core.vmf import vmf_log_normalizer

GEOSCORE_SCALE_KM = 1492.7
GEOSCORE_MAX = 5000.0


def pairwise_km(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Great-circle distances (..., N, M) in km between points a (..., N, 2) and b (..., M, 2),
    computed in ``dtype``.

    As 2 atan2(|u_a - u_b|, |u_a + u_b|) of the unit vectors rather than the arccos of their
    dot product: arccos loses half the digits near 0 (2 km in float32), this form keeps float32
    within metres at every distance, which lets the decoders below run in float32 (4x faster).
    """
    ua, ub = latlon_to_unit(a.to(dtype)), latlon_to_unit(b.to(dtype))
    ua, ub = ua[..., :, None, :], ub[..., None, :, :]
    angle = 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))
    return angle * EARTH_RADIUS_KM


def geoscores(
    candidates: torch.Tensor, samples: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """GeoScore (0-5000) of each candidate (..., C, 2) against each sample (..., N, 2) ->
    (..., C, N)."""
    km = pairwise_km(candidates, samples, dtype)
    return GEOSCORE_MAX * torch.exp(-km / GEOSCORE_SCALE_KM)


def expected_geoscore(
    candidates: torch.Tensor, samples: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Mean GeoScore of each candidate (..., C, 2) against samples (..., N, 2) -> (..., C)."""
    return geoscores(candidates, samples, dtype).mean(-1)


def self_expected_geoscore(samples: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean GeoScore of every sample (B, N, 2) against all of them -> (B, N), float32.

    What ``expected_geoscore(samples, samples)`` gives, from one matrix product per chunk: the
    cosines u.v in float64 make 1 - u.v exact to ~1e-16 (0.1 m of distance near 0 km, where the
    float32 cosine loses 2 km), and the rest (half chord, angle, exponential) runs in float32.
    About 4x faster than the per-pair vector differences of :func:`pairwise_km` at 1,024
    samples; near antipodes the angle is within ~2 km, where a GeoScore is ~0.
    """
    u = latlon_to_unit(samples.double())
    scale = -EARTH_RADIUS_KM / GEOSCORE_SCALE_KM
    scores = []
    for i in range(0, u.shape[-2], chunk):
        cos = u[..., i : i + chunk, :] @ u.transpose(-1, -2)
        half_chord = ((1.0 - cos) * 0.5).clamp(0.0, 1.0).float().sqrt()
        scores.append(torch.exp(torch.asin(half_chord) * (2.0 * scale)).mean(-1))
    return GEOSCORE_MAX * torch.cat(scores, dim=-1)


def best_guess(samples: torch.Tensor) -> torch.Tensor:
    """The sample that maximises the expected GeoScore under the samples: (B, N, 2) -> (B, 2).

    Maximising expected GeoScore (rather than taking one random sample, or the spherical mean,
    which can fall in the ocean between two modes) is the Bayes decision for the GeoScore metric
    when the samples stand for the predictive distribution.
    """
    squeeze = samples.dim() == 2
    if squeeze:
        samples = samples[None]
    idx = self_expected_geoscore(samples).argmax(-1)
    out = samples[torch.arange(samples.shape[0]), idx]
    return out[0] if squeeze else out


REGION_CREDIBILITY = 0.9
"""Share of an adaptive region's samples that lie within its ``radius_km``."""
PERSISTENCE_SDS = 3.0
"""Two modes stay apart only when the lighter peak rises above their saddle by more than this
many standard errors of the log-density estimate (the noise guard of a small sample)."""
PERSISTENCE_NATS = 1.0
"""...and by more than this in log-density (a peak e = 2.7 times its saddle): a fixed
prominence, so that more samples, whose estimate is less noisy, do not split what fewer join
(issue 22). At 256 samples the noise guard alone would split guided 200-km places into
sub-modes that 1,024 samples join (docs/defaults.md, "Regions that do not follow the sample
count")."""
REGION_NEIGHBOUR_SHARE = 1 / 8
"""Share of the samples whose neighbourhood sets the region finder's density: its density at
a sample is read from the cap that holds this share of them. A share, not a count, so that
the modes it resolves do not depend on how many samples an answer drew (32 of 256, 128 of
1,024); the sample count sets only the noise of the estimate. Issue 22: the sqrt(N)
neighbourhood before it split at 1,024 samples what it joined at 256, so an answer's regions
followed its sample count (docs/defaults.md, "Regions that do not follow the sample count")."""
REGION_GRAPH_NEIGHBOURS = 16
"""Nearest neighbours each sample links to in the region finder's graph (its quick shift and
its saddles). Fewer than the density's neighbourhood, so that a separate cluster of more
samples than this links only to itself and stays a region of its own, however wide the
density's cap."""
MAX_REGION_NEIGHBOURS = 256
"""Largest neighbourhood of the region finder's density (2,048 samples at
:data:`REGION_NEIGHBOUR_SHARE`). Beyond it the scale shrinks as more samples are drawn."""
MIN_REGION_SEPARATION_KM = 1.0
"""Modes whose peaks lie closer than this are one region: the paper's finest accuracy level
(street, 1 km). Guided sampling (w > 0) condenses a sharp place into several clusters metres
apart, each a mode of the samples; the answer reports the place once. A fixed scale, so the
decomposition below it does not follow the sample count (issue 22)."""
CHUNK_ROWS = 1024
"""Rows of the (rows x N) distance blocks: 16 MB of float32 per 1024 rows of 4096 samples."""


@dataclass
class Region:
    """A place that holds a share of the model's samples.

    ``probability`` is the share of samples in the region (see :func:`top_regions`);
    ``radius_km`` the radius around (lat, lon) that holds ``share_within_radius`` of them;
    ``spread_km`` the median distance of the region's samples to its centre; ``members`` which
    of the samples it holds, (N,) bool (not part of the answer's JSON).
    """

    lat: float
    lon: float
    probability: float
    radius_km: float
    spread_km: float
    share_within_radius: float = 1.0
    members: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "lat": self.lat,
            "lon": self.lon,
            "probability": self.probability,
            "radius_km": self.radius_km,
            "spread_km": self.spread_km,
            "share_within_radius": self.share_within_radius,
        }


MIN_REGION_PROBABILITY = 0.01
"""Regions holding a smaller share of the samples are not reported."""


def top_regions(
    samples: torch.Tensor,
    k: int = 5,
    radius_km: float | None = None,
    min_probability: float = MIN_REGION_PROBABILITY,
    credibility: float = REGION_CREDIBILITY,
    min_separation_km: float = MIN_REGION_SEPARATION_KM,
) -> list[Region]:
    """Up to k regions of samples (N, 2) degrees, most probable first, at the samples' own scale.

    Adaptive (``radius_km`` None): the modes of the samples, found by :func:`mode_labels` at the
    scale of each neighbourhood (0.1 km to thousands of km in one answer). A region's
    ``probability`` is its mode's share of the samples, its centre the sample at its peak, its
    ``radius_km`` the distance from the centre within which ``credibility`` of them lie. Modes
    whose peaks are closer than ``min_separation_km`` are one region (the clusters a few metres
    apart that guidance condenses a sharp place into).

    Fixed (``radius_km`` given): greedy discs; repeatedly the sample with the most unclaimed
    samples within ``radius_km`` becomes a centre and claims them (``probability``: that share).

    Probabilities are disjoint sample shares; regions below ``min_probability`` are left out.
    """
    samples = samples.reshape(-1, 2)
    if radius_km is not None:
        return _fixed_radius_regions(samples, k, radius_km, min_probability)
    n = samples.shape[0]
    labels = mode_labels(samples, min_separation_km=min_separation_km)
    modes, counts = labels.unique(return_counts=True)
    regions: list[Region] = []
    for i in counts.argsort(descending=True, stable=True)[:k].tolist():
        if float(counts[i]) / n < min_probability:
            break
        mask = labels == modes[i]
        members = samples[mask]
        centre = members[_mode_centre(members)]
        km = pairwise_km(centre[None], members)[0]
        regions.append(
            Region(
                lat=float(centre[0]),
                lon=float(centre[1]),
                probability=float(counts[i]) / n,
                radius_km=float(km.quantile(credibility)),
                spread_km=float(km.median()),
                share_within_radius=credibility,
                members=mask,
            )
        )
    return regions


def _mode_centre(members: torch.Tensor, keep: float = REGION_CREDIBILITY, rounds: int = 4) -> int:
    """Index of the member (M, 2) degrees nearest the centre of a mode's samples.

    The densest sample by the k-NN estimate wanders on a flat-topped mode (by up to half its
    width). The mean of the members nearest the current centre (a share ``keep`` of them,
    starting from all) does not, and trimming the farthest keeps a tail from pulling it; the
    nearest member stands for it, so that a centre is always where samples are.
    """
    u = latlon_to_unit(members.double())
    centre = torch.nn.functional.normalize(u.mean(0), dim=0)
    for _ in range(rounds):
        chord2 = ((u - centre) ** 2).sum(-1)
        window = chord2 <= chord2.quantile(keep)
        centre = torch.nn.functional.normalize(u[window].mean(0), dim=0)
    return int(((u - centre) ** 2).sum(-1).argmin())


def _chords(u: torch.Tensor, rows: slice) -> torch.Tensor:
    """Chords (unit sphere) between the unit vectors u[rows] and all of u (N, 3): (R, N).

    From coordinate differences, not from the Gram matrix: 2 - 2 cos cancels (to 2 km in
    float32), differences keep float32 within ~1e-7 (0.6 m, the resolution of float32 latitudes)
    at every distance, at half the time of float64 Gram matrices.
    """
    return torch.cdist(u[rows], u, compute_mode="donot_use_mm_for_euclid_dist")


def default_neighbours(n: int) -> int:
    """Neighbours that set a density map's local bandwidth for n samples: sqrt(n), 3 to 64."""
    return min(64, max(3, round(math.sqrt(n))))


def region_neighbours(n: int) -> int:
    """Neighbours that set the region finder's local scale for n samples: the share
    :data:`REGION_NEIGHBOUR_SHARE` of them, 3 to :data:`MAX_REGION_NEIGHBOURS`."""
    return min(MAX_REGION_NEIGHBOURS, max(3, round(n * REGION_NEIGHBOUR_SHARE)))


def persistence_threshold(k: int) -> float:
    """The prominence (nats of log-density) a mode needs over its saddle to stay apart, for a
    k-nearest-neighbour estimate: :data:`PERSISTENCE_SDS` of its standard errors (1 / sqrt(k))
    and at least :data:`PERSISTENCE_NATS`."""
    return max(PERSISTENCE_NATS, PERSISTENCE_SDS / math.sqrt(k))


def nearest_neighbours(samples: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared chord (unit sphere) to each sample's k-th nearest other sample (N,) float64,
    and the indices of its k + 1 nearest samples, nearest first (N, k + 1): itself first,
    except among duplicates. ``samples`` (N, 2) degrees, k < N."""
    u = latlon_to_unit(samples.double()).float()
    kth, idx = [], []
    for i in range(0, samples.shape[0], CHUNK_ROWS):
        chord, nearest = _chords(u, slice(i, i + CHUNK_ROWS)).topk(k + 1, largest=False)
        kth.append(chord[:, k].double() ** 2)
        idx.append(nearest)
    return torch.cat(kth), torch.cat(idx)


def mode_labels(
    samples: torch.Tensor,
    neighbours: int | None = None,
    min_separation_km: float = MIN_REGION_SEPARATION_KM,
) -> torch.Tensor:
    """The mode each sample (N, 2) degrees belongs to, as the index of that mode's densest sample
    (N,) int64.

    The density at each sample is read from the cap reaching its ``neighbours``-th nearest sample
    (default :func:`region_neighbours`: an eighth of the samples), so the scale follows the
    samples: a 1 km mode and a 1000 km one in the same answer are each seen at their own width,
    and the scale is a share of the mass, not a count, so the decomposition does not follow the
    number of samples. Each sample joins its nearest denser neighbour among its
    :data:`REGION_GRAPH_NEIGHBOURS` nearest (quick shift on the k-nearest-neighbour graph); the
    modes found so are then merged along the graph's edges, highest saddle first, where the
    lighter peak rises above the saddle joining them by less than
    :func:`persistence_threshold` (a fixed prominence, raised for small samples to
    :data:`PERSISTENCE_SDS` standard errors of the estimate): the persistence rule of ToMATo
    (Chazal et al., 2013), which keeps the noise of the estimate from splitting one mode.
    Last, a mode whose peak lies within ``min_separation_km`` of a denser mode's peak joins it
    (:data:`MIN_REGION_SEPARATION_KM`; 0 keeps every mode).
    """
    n = samples.shape[0]
    if n < 3:
        return torch.zeros(n, dtype=torch.long)
    k = min(neighbours or region_neighbours(n), n - 1)
    kth_chord2, neighbour_idx = nearest_neighbours(samples, k)
    neighbour_idx = neighbour_idx[:, : min(k, REGION_GRAPH_NEIGHBOURS) + 1]
    # log density up to a constant: -log of the cap area 2 pi (1 - cos r) = pi chord^2.
    log_density = -kth_chord2.clamp_min(1e-30).log()
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(-log_density, stable=True)] = torch.arange(n)
    denser = rank[neighbour_idx] < rank[:, None]
    first = torch.where(denser.any(-1), denser.float().argmax(-1), -1)
    parent = torch.where(
        first >= 0, neighbour_idx.gather(1, first.clamp_min(0)[:, None])[:, 0], torch.arange(n)
    )
    labels = _roots(parent)
    labels = _merge_modes(labels, neighbour_idx, log_density, persistence_threshold(k))
    return _merge_close_peaks(samples, labels, log_density, min_separation_km)


def _merge_close_peaks(
    samples: torch.Tensor, labels: torch.Tensor, log_density: torch.Tensor, separation_km: float
) -> torch.Tensor:
    """Each mode of ``labels`` (N,) whose peak (its label, a sample of ``samples`` (N, 2)
    degrees) lies within ``separation_km`` of a denser kept peak joins the nearest such; the
    modes are visited densest peak first, so a region never reaches further than that from its
    own peak by merging. No kNN edge is needed between them: clusters a few metres apart share
    none."""
    peaks = labels.unique()
    if separation_km <= 0 or peaks.numel() < 2:
        return labels
    peaks = peaks[log_density[peaks].argsort(descending=True, stable=True)]
    km = pairwise_km(samples[peaks].double(), samples[peaks].double())
    target = peaks.clone()
    kept: list[int] = []
    for i in range(peaks.numel()):
        if kept:
            near = km[i, kept]
            j = int(near.argmin())
            if float(near[j]) < separation_km:
                target[i] = peaks[kept[j]]
                continue
        kept.append(i)
    if len(kept) == peaks.numel():
        return labels
    lookup = torch.empty(int(peaks.max()) + 1, dtype=torch.long)
    lookup[peaks] = target
    return lookup[labels]


def _roots(parent: torch.Tensor) -> torch.Tensor:
    """The root of each node of a forest given by ``parent`` (N,), roots their own parent.

    Pointer jumping: log2(depth) rounds."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand


def _merge_modes(
    labels: torch.Tensor, neighbour_idx: torch.Tensor, log_density: torch.Tensor, persistence: float
) -> torch.Tensor:
    """Merge the modes of ``labels`` (N,) along the k-NN edges ``neighbour_idx`` (N, k + 1): the
    saddle of two modes is the highest edge between them, an edge as high as its lower end."""
    a = labels[:, None].expand_as(neighbour_idx).reshape(-1)
    b = labels[neighbour_idx].reshape(-1)
    height = torch.minimum(log_density[:, None], log_density[neighbour_idx]).reshape(-1)
    across = a != b
    if not across.any():
        return labels
    n = labels.shape[0]
    pair = torch.minimum(a, b)[across] * n + torch.maximum(a, b)[across]
    pairs, where = pair.unique(return_inverse=True)
    saddle = torch.full((len(pairs),), -math.inf, dtype=height.dtype)
    saddle = saddle.scatter_reduce(0, where, height[across], "amax")
    root = {int(m): int(m) for m in labels.unique()}

    def find(m: int) -> int:
        while root[m] != m:
            m = root[m]
        return m

    for i in saddle.argsort(descending=True).tolist():
        ra, rb = find(int(pairs[i]) // n), find(int(pairs[i]) % n)
        if ra == rb:
            continue
        low, high = (ra, rb) if log_density[ra] < log_density[rb] else (rb, ra)
        if log_density[low] - saddle[i] < persistence:
            root[low] = high
    final = {m: find(m) for m in root}
    return torch.tensor([final[m] for m in labels.tolist()])


def _fixed_radius_regions(
    samples: torch.Tensor, k: int, radius_km: float, min_probability: float
) -> list[Region]:
    n = samples.shape[0]
    u = latlon_to_unit(samples.double()).float()
    chord = 2.0 * math.sin(min(radius_km / EARTH_RADIUS_KM, math.pi) / 2.0)
    blocks = range(0, n, CHUNK_ROWS)
    near = torch.cat([_chords(u, slice(i, i + CHUNK_ROWS)) <= chord for i in blocks])
    unclaimed = torch.ones(n, dtype=torch.bool)
    regions: list[Region] = []
    while len(regions) < k and unclaimed.any():
        counts = (near & unclaimed[None, :]).sum(-1).masked_fill(~unclaimed, -1)
        centre = int(counts.argmax())
        members = near[centre] & unclaimed
        share = float(members.sum()) / n
        if share < min_probability:
            break
        regions.append(
            Region(
                lat=float(samples[centre, 0]),
                lon=float(samples[centre, 1]),
                probability=share,
                radius_km=radius_km,
                spread_km=float(pairwise_km(samples[centre, None], samples[members])[0].median()),
                members=members,
            )
        )
        unclaimed &= ~members
    return regions


def sample_density_grid(
    samples: torch.Tensor,
    n_lat: int = 90,
    n_lon: int = 180,
    bandwidth_deg: float | None = None,
    extent: tuple[float, float, float, float] | None = None,
) -> dict:
    """Kernel density estimate of samples (N, 2) on a lat/lon grid, per steradian.

    Von Mises-Fisher kernels (normalised on S^2) of concentration 1/bandwidth^2 (radians). By
    default each sample's bandwidth is the distance to its k-th nearest sample (k of
    :func:`default_neighbours`; an adaptive estimate, Abramson's square-root law, so a 1 km mode
    stays 1 km wide beside a 1000 km one), floored at one grid cell; ``bandwidth_deg`` fixes
    one for all. The grid covers the globe, or the window ``extent`` = (lat0, lat1, lon0, lon1)
    degrees (e.g. :func:`globeflow.answers.zoom.credible_extent`; lon1 may exceed 180). Returns
    ``{"lat": (H,), "lon": (W,), "log_density": (H, W)}`` lists and the median
    ``bandwidth_deg``.
    """
    if extent is None:
        grid, _ = latlon_grid(n_lat, n_lon)
        dtype = torch.float32
    else:
        lat0, lat1, lon0, lon1 = extent
        lat_c = lat0 + (torch.arange(n_lat, dtype=torch.float64) + 0.5) * (lat1 - lat0) / n_lat
        lon_c = lon0 + (torch.arange(n_lon, dtype=torch.float64) + 0.5) * (lon1 - lon0) / n_lon
        grid = torch.stack(torch.meshgrid(lat_c, lon_c, indexing="ij"), -1).reshape(-1, 2)
        # cells of metres: the cosines need float64 (float32 rounding costs kappa * 6e-8 nats)
        dtype = torch.float64
    cell = math.radians(float(grid[n_lon, 0] - grid[0, 0]) if n_lat > 1 else 180.0 / n_lat)
    n = samples.shape[0]
    if bandwidth_deg is not None:
        bandwidth = torch.full((n,), math.radians(bandwidth_deg), dtype=torch.float64)
    elif n > 1:
        kth_chord2, _ = nearest_neighbours(samples, min(default_neighbours(n), n - 1))
        bandwidth = 2.0 * torch.asin(kth_chord2.sqrt() / 2.0).clamp_min(cell)
    else:
        bandwidth = torch.full((n,), cell, dtype=torch.float64)
    kappa = 1.0 / bandwidth**2
    log_norm = vmf_log_normalizer(kappa)
    # float32 for the global (grid x samples) kernels: kappa <= 1 / (one grid cell)^2, so the
    # rounding of the cosines costs at most ~1e-4 nats, at a fraction of float64's time.
    units = latlon_to_unit(samples.double()).to(dtype)
    g = latlon_to_unit(grid).to(dtype)
    kappa, log_norm = kappa.to(dtype), log_norm.to(dtype)
    log_density = torch.cat(
        [
            torch.logsumexp((g[i : i + CHUNK_ROWS] @ units.T - 1.0) * kappa + log_norm, dim=-1)
            for i in range(0, g.shape[0], CHUNK_ROWS)
        ]
    ).double() - math.log(n)
    lat = grid[:, 0].reshape(n_lat, n_lon)[:, 0]
    lon = grid[:, 1].reshape(n_lat, n_lon)[0]
    return {
        "lat": lat.tolist(),
        "lon": lon.tolist(),
        "log_density": log_density.reshape(n_lat, n_lon).float().tolist(),
        "kind": "kde",
        "bandwidth_deg": math.degrees(float(bandwidth.median())),
    }


def attach_truth(result: dict, truth: tuple[float, float] | None) -> None:
    """Set ``exif_gps`` and ``error_km`` (great-circle km from the best guess) of a result from
    the photo's known location (lat, lon) degrees, or None."""
    if truth is None or not result.get("best_guess"):
        result["exif_gps"], result["error_km"] = None, None
        return
    lat, lon = truth
    guess = torch.tensor([result["best_guess"]["lat"], result["best_guess"]["lon"]])
    km = float(haversine_km(guess, torch.tensor([lat, lon], dtype=guess.dtype)))
    result["exif_gps"] = {"lat": lat, "lon": lon}
    result["error_km"] = km
