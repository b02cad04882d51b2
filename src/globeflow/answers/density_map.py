"""The model's exact log-density on a global latitude/longitude grid, refined adaptively.

Solving the likelihood ODE at every node of a 1-degree grid (64,800 points) costs minutes for a
paper-size network, while a density map is smooth almost everywhere. So the map is built
coarse-to-fine (hierarchical refinement, as in adaptive sparse grids): exact log-densities on a
coarse grid; then, halving the spacing each level, the new nodes are predicted by interpolating
the coarser level, and computed exactly only inside cells where the previous level's prediction
missed by ``tolerance`` nats or more (the "surplus") or where the model's own samples fall
(so a narrow peak between coarse nodes is not lost). The first refinement is computed everywhere.
Around the peaks, nested zoom patches then refine the grid's cells down to <= 1 km
(:func:`refine_peaks`), and the map's total mass is the midpoint rule over the finest cells.
Nodes are cell centres, as in :func:`globeflow.core.sphere.latlon_grid`; longitude is periodic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from globeflow.answers.zoom import KM_PER_DEG
from globeflow.core.sphere import latlon_to_unit

LogDensity = Callable[[torch.Tensor], torch.Tensor]
"""log p at unit vectors (M, 3) -> (M,), natural log per steradian."""


def grid_axes(resolution_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre latitudes (H,) and longitudes (W,) in degrees of a global grid."""
    h, w = round(180 / resolution_deg), round(360 / resolution_deg)
    if abs(h * resolution_deg - 180) > 1e-9 or abs(w * resolution_deg - 360) > 1e-9:
        raise ValueError(f"resolution must divide 180 degrees, got {resolution_deg}")
    lat = -90 + resolution_deg * (torch.arange(h, dtype=torch.float64) + 0.5)
    lon = -180 + resolution_deg * (torch.arange(w, dtype=torch.float64) + 0.5)
    return lat, lon


def _lat_nodes(h: int, stride: int) -> torch.Tensor:
    """Latitude indices of the level with this stride (the last row always included)."""
    idx = torch.arange(0, h, stride)
    return idx if idx[-1] == h - 1 else torch.cat([idx, torch.tensor([h - 1])])


def _interp_axis(
    values: torch.Tensor, known: torch.Tensor, target: torch.Tensor, period: int | None
):
    """Linear interpolation along the last axis from indices ``known`` to ``target``."""
    if period is not None:  # wrap: append the first node one period later
        known = torch.cat([known, known[:1] + period])
        values = torch.cat([values, values[..., :1]], -1)
    pos = torch.searchsorted(known, target, right=True).clamp(1, len(known) - 1)
    lo, hi = known[pos - 1], known[pos]
    frac = ((target - lo) / (hi - lo)).to(values.dtype)
    return values[..., pos - 1] * (1 - frac) + values[..., pos] * frac


def _refine(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, stride: int, w: int
):
    """Interpolate a level (len(rows), len(cols)) onto the level of half the stride."""
    new_rows, new_cols = _lat_nodes(h, stride), torch.arange(0, w, stride)
    along_lon = _interp_axis(values, cols, new_cols, period=w)
    out = _interp_axis(along_lon.T, rows, new_rows, period=None).T
    return out, new_rows, new_cols


def adaptive_log_density_grid(
    log_density: LogDensity,
    resolution_deg: float = 1.0,
    tolerance: float = 0.1,
    coarse_stride: int = 8,
    sample_latlon: torch.Tensor | None = None,
    floor: float = 20.0,
) -> dict:
    """Log-density on the grid of ``resolution_deg`` degrees with exact values where needed.

    ``log_density`` evaluates exact values at unit vectors; ``sample_latlon`` (N, 2) degrees,
    optional, marks cells to compute exactly whatever the surplus. Surpluses count only where
    the density is within ``floor`` nats of the largest value found (e^-20 of the peak by
    default): far below it, errors are invisible on a map and do not trigger refinement.
    Returns ``{"lat": (H,), "lon": (W,), "log_density": (H, W), "exact": (H, W) bool,
    "evaluations": int, "max_surplus": per-level list}`` (tensors).
    """
    lat, lon = grid_axes(resolution_deg)
    h, w = len(lat), len(lon)
    if coarse_stride < 1 or coarse_stride & (coarse_stride - 1):
        raise ValueError(f"coarse stride must be a power of 2, got {coarse_stride}")
    grid_latlon = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1)
    sample_cells = _sample_cells(sample_latlon, resolution_deg, h, w)

    def exact(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        points = grid_latlon[rows, cols]
        return log_density(latlon_to_unit(points)).to(torch.float64)

    stride = coarse_stride
    rows, cols = _lat_nodes(h, stride), torch.arange(0, w, stride)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    values = exact(rr.reshape(-1), cc.reshape(-1)).reshape(len(rows), len(cols))
    is_exact = torch.ones_like(values, dtype=torch.bool)
    evaluations, surpluses = values.numel(), []
    flagged = None  # fine-grid mask of nodes whose surplus exceeded the tolerance
    while stride > 1:
        half = stride // 2
        predicted, new_rows, new_cols = _refine(values, rows, cols, h, half, w)
        was_exact = _embed_mask(is_exact, rows, cols, new_rows, new_cols)
        todo = ~was_exact
        if flagged is not None:  # the first refinement is checked everywhere
            # Cells of the previous level next to a large surplus, or holding samples.
            wanted = _dilate(flagged | sample_cells, stride)
            todo &= wanted[new_rows][:, new_cols]
        ri, ci = todo.nonzero(as_tuple=True)
        values, is_exact = predicted, was_exact.clone()
        flagged = torch.zeros(h, w, dtype=torch.bool)
        if len(ri):
            computed = exact(new_rows[ri], new_cols[ci])
            surplus = (computed - predicted[ri, ci]).abs()
            values[ri, ci] = computed
            is_exact[ri, ci] = True
            evaluations += len(ri)
            surpluses.append(float(surplus.max()))
            top = float(values[is_exact].max())
            relevant = torch.maximum(computed, predicted[ri, ci]) > top - floor
            big = (surplus >= tolerance) & relevant
            flagged[new_rows[ri[big]], new_cols[ci[big]]] = True
        else:
            surpluses.append(0.0)
        rows, cols, stride = new_rows, new_cols, half
    return {
        "lat": lat,
        "lon": lon,
        "log_density": values,
        "exact": is_exact,
        "evaluations": evaluations,
        "max_surplus": surpluses,
    }


def _embed_mask(mask, rows, cols, new_rows, new_cols) -> torch.Tensor:
    """Where the finer level's nodes coincide with nodes of ``mask`` (True there)."""
    out = torch.zeros(len(new_rows), len(new_cols), dtype=torch.bool)
    r = torch.searchsorted(new_rows, rows)
    c = torch.searchsorted(new_cols, cols)
    out[r[:, None], c[None, :]] = mask
    return out


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Cells within ``radius`` cells of a True cell (Chebyshev distance; periodic longitude)."""
    x = mask[None, None].float()
    x = torch.nn.functional.pad(x, (0, 0, radius, radius))
    x = torch.cat([x[..., -radius:], x, x[..., :radius]], -1)
    return torch.nn.functional.max_pool2d(x, 2 * radius + 1, stride=1)[0, 0] > 0


def _sample_cells(sample_latlon, resolution_deg, h, w) -> torch.Tensor:
    """Fine-grid cells holding at least one sample."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    if sample_latlon is None or len(sample_latlon) == 0:
        return mask
    i = ((sample_latlon[:, 0] + 90) / resolution_deg).long().clamp(0, h - 1)
    j = ((sample_latlon[:, 1] + 180) / resolution_deg).long().clamp(0, w - 1)
    mask[i, j] = True
    return mask


MAP_SAMPLES = 256
"""Model samples drawn inside :func:`model_log_density_map` when none are given."""
MAP_LIKELIHOOD_STEPS = 16
"""Bulk steps of the map's likelihood ODE (midpoint; sharp models add steps at the stiff end)."""
MAP_PRECISION = "bf16"
"""Precision of the map's likelihood solves: 16 midpoint steps in bf16 stay within ~0.05 nats
of a tight solve on the YFCC-size network, below the map's default tolerance."""
PEAK_CELL_KM = 1.0
"""Zoom patches refine until their cells are at most this size (north-south)."""
ZOOM_FACTOR = 6
"""Each zoom level splits a block of 3 x 3 of its parent's cells (more east-west away from the
equator, to keep it square in km) into cells ZOOM_FACTOR times smaller: (3 ZOOM_FACTOR)^2 =
324 exact values per level at the equator, 540 at 50 degrees."""
MAX_PEAKS = 3
PEAK_MIN_FRACTION = 0.05
"""A global cell starts a zoom chain if it holds this fraction of the samples (at most
MAX_PEAKS chains, on non-overlapping blocks, most samples first)."""
MAX_BLOCK_REACH = 4
"""A zoom block reaches at most this many parent cells north and south of its centre (1 when
the samples sit in the centre cell: 3 x 3 cells)."""


def _row_areas(lat_centres: torch.Tensor, cell_deg: float) -> torch.Tensor:
    """Steradians (h,) of one cell per row: cells of ``cell_deg`` degrees centred at the
    latitudes (clipped at the poles)."""
    lo = torch.deg2rad((lat_centres - cell_deg / 2).clamp(-90, 90))
    hi = torch.deg2rad((lat_centres + cell_deg / 2).clamp(-90, 90))
    return math.radians(cell_deg) * (torch.sin(hi) - torch.sin(lo))


def _mass(log_density: torch.Tensor, lat: torch.Tensor, cell_deg: float) -> torch.Tensor:
    """Midpoint-rule mass per cell (h, w) of a grid of log-densities per steradian."""
    return torch.exp(log_density) * _row_areas(lat, cell_deg)[:, None]


def _east_west_reach(lat_deg: float) -> int:
    """Cells east and west per cell north-south at this latitude (square blocks in km; at most
    8)."""
    return min(math.ceil(1.0 / max(math.cos(math.radians(lat_deg)), 1e-3)), 8)


def _block_reach(samples, lat_deg: float, lon_deg: float, cell_deg: float) -> tuple[int, int]:
    """Cells north-south and east-west of a block's centre (lat_deg, lon_deg): at least one,
    and enough to hold the samples near it (98th percentile of their offsets, within
    MAX_BLOCK_REACH parent cells), so that the finer level integrates the peak's mass rather
    than a coarse level around it."""
    north = 1
    if samples is not None and len(samples):
        d_lat = (samples[:, 0] - lat_deg).abs()
        d_lon = ((samples[:, 1] - lon_deg + 180) % 360 - 180).abs()
        d_lon = d_lon * math.cos(math.radians(lat_deg))  # in degrees of latitude
        near = torch.maximum(d_lat, d_lon) <= (MAX_BLOCK_REACH + 0.5) * cell_deg
        if near.sum() > 1:
            spread = float(torch.quantile(torch.maximum(d_lat, d_lon)[near], 0.98))
            north = min(max(math.ceil(spread / cell_deg - 0.5), 1), MAX_BLOCK_REACH)
    return north, min(north * _east_west_reach(lat_deg), 8 * MAX_BLOCK_REACH)


def _peak_cells(sample_latlon, lat, lon, cell_deg) -> list[tuple[int, int]]:
    """Global cells (row, col) holding the most samples, on non-overlapping 3 x 3 blocks."""
    if sample_latlon is None or len(sample_latlon) == 0:
        return []
    h, w = len(lat), len(lon)
    i = ((sample_latlon[:, 0] - lat[0]) / cell_deg + 0.5).long().clamp(0, h - 1)
    j = ((sample_latlon[:, 1] - lon[0]) / cell_deg + 0.5).long() % w
    counts = torch.zeros(h * w).index_add_(0, i * w + j, torch.ones(len(i))).reshape(h, w)
    peaks = []
    while len(peaks) < MAX_PEAKS:
        best = int(counts.argmax())
        if counts.view(-1)[best] < PEAK_MIN_FRACTION * len(sample_latlon):
            break
        r, c = divmod(best, w)
        peaks.append((r, c))
        # Blocks must not overlap (each reaches MAX_BLOCK_REACH rows, as many km east-west).
        north = 2 * MAX_BLOCK_REACH
        reach = min(north * _east_west_reach(float(lat[r])), w // 2)
        rows = slice(max(r - north, 0), r + north + 1)
        counts[rows, [(c + k) % w for k in range(-reach, reach + 1)]] = 0
    return peaks


def zoom_chain(
    log_density: LogDensity,
    lat: torch.Tensor,
    lon: torch.Tensor,
    values: torch.Tensor,
    cell_deg: float,
    centre: tuple[int, int],
    samples: torch.Tensor | None = None,
) -> list[dict]:
    """Nested patches around a peak: each splits the block of its parent's cells around
    the parent's centre cell (``centre`` on the global grid first, then the patch's cell with
    the most ``samples`` (N, 2) degrees, or its largest value where none fall inside; 3 cells
    north-south or as many as hold the samples, :func:`_block_reach`, and as many km
    east-west) into cells ZOOM_FACTOR times smaller, until they are <= PEAK_CELL_KM.

    Returns patches ``{"lat": (h,), "lon": (w,), "log_density": (h, w), "cell_deg",
    "cell_km", "mass", "replaced_mass"}``: the patch's mass and the mass of the parent cells
    it replaces (longitudes may run past +-180 inside a patch)."""
    patches = []
    while cell_deg * KM_PER_DEG > PEAK_CELL_KM:
        r, c = centre
        north, east = _block_reach(samples, float(lat[r]), float(lon[c % len(lon)]), cell_deg)
        rows = torch.arange(max(r - north, 0), min(r + north + 1, len(lat)))
        cols = torch.arange(c - east, c + east + 1)
        wrapped = cols % len(lon)
        replaced = _mass(values[rows][:, wrapped], lat[rows], cell_deg).sum()
        parent_lon = lon[c % len(lon)] + (cols - c).to(lon.dtype) * cell_deg  # unwrapped
        fine = cell_deg / ZOOM_FACTOR
        offsets = (torch.arange(ZOOM_FACTOR, dtype=lat.dtype) + 0.5) * fine - cell_deg / 2
        lat = (lat[rows][:, None] + offsets[None]).reshape(-1)
        lon = (parent_lon[:, None] + offsets[None]).reshape(-1)
        grid = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1)
        values = log_density(latlon_to_unit(grid.reshape(-1, 2))).to(torch.float64)
        values = values.reshape(len(lat), len(lon))
        cell_deg = fine
        patches.append(
            {
                "lat": lat,
                "lon": lon,
                "log_density": values,
                "cell_deg": cell_deg,
                "cell_km": cell_deg * KM_PER_DEG,
                "mass": float(_mass(values, lat, cell_deg).sum()),
                "replaced_mass": float(replaced),
            }
        )
        centre = _densest_cell(samples, lat, lon, cell_deg, values)
    return patches


def _densest_cell(samples, lat, lon, cell_deg, values) -> tuple[int, int]:
    """The patch cell (row, col) holding the most samples; its largest value if none do."""
    if samples is not None and len(samples):
        i = torch.floor((samples[:, 0] - lat[0]) / cell_deg + 0.5).long()
        j = torch.floor(((samples[:, 1] - lon[0] + cell_deg / 2) % 360) / cell_deg).long()
        inside = (i >= 0) & (i < len(lat)) & (j >= 0) & (j < len(lon))
        if inside.any():
            flat = (i * len(lon) + j)[inside]
            return divmod(int(torch.bincount(flat).argmax()), len(lon))
    return divmod(int(values.argmax()), len(lon))


def refine_peaks(log_density: LogDensity, grid: dict, resolution_deg: float, samples) -> dict:
    """Adds zoom patches (:func:`zoom_chain`) around the samples' peaks to a grid of
    :func:`adaptive_log_density_grid`, and the map's total mass (midpoint rule, each patch in
    place of the cells it covers): ``"patches"`` (list), ``"mass"`` (float),
    ``"finest_cell_km"``; ``"evaluations"`` then counts the patches' exact values too."""
    patches = []
    for centre in _peak_cells(samples, grid["lat"], grid["lon"], resolution_deg):
        patches += zoom_chain(
            log_density,
            grid["lat"],
            grid["lon"],
            grid["log_density"],
            resolution_deg,
            centre,
            samples,
        )
    mass = float(_mass(grid["log_density"], grid["lat"], resolution_deg).sum())
    mass += sum(p["mass"] - p["replaced_mass"] for p in patches)
    finest = min([p["cell_km"] for p in patches], default=resolution_deg * KM_PER_DEG)
    evaluations = grid["evaluations"] + sum(p["log_density"].numel() for p in patches)
    return {
        **grid,
        "patches": patches,
        "mass": mass,
        "finest_cell_km": finest,
        "evaluations": evaluations,
    }


def model_log_density_map(
    model,
    emb: torch.Tensor,
    resolution_deg: float = 1.0,
    tolerance: float = 0.1,
    steps: int = MAP_LIKELIHOOD_STEPS,
    precision: str = MAP_PRECISION,
    sample_latlon: torch.Tensor | None = None,
    coarse_stride: int = 16,
) -> dict:
    """:func:`adaptive_log_density_grid` of a model's exact log p(y | emb) for one embedding
    (D,) or (1, D), with ``steps`` bulk steps of the likelihood ODE at ``precision`` (16
    midpoint steps in bf16: within ~0.05 nats of a tight solve on the YFCC-size network, below
    the map's default tolerance; sharp models add steps at the stiff end), then zoom patches
    down to <= PEAK_CELL_KM cells around the peaks (:func:`refine_peaks`).

    The refinement always follows the mass: without ``sample_latlon`` (N, 2) degrees,
    MAP_SAMPLES unguided samples are drawn here (a narrow peak between grid nodes is
    otherwise invisible from them). The result holds the map's total ``"mass"`` (1 for a
    density resolved everywhere)."""
    from globeflow.core.likelihood import log_prob_ode

    emb = model.prepare_embeddings(emb)[:1]
    if sample_latlon is None:
        generator = torch.Generator(device=emb.device).manual_seed(0)
        # The default recipe, unguided: the samples follow the density.
        sample_latlon = model.sample(emb, MAP_SAMPLES, guidance=0.0, generator=generator)
        sample_latlon = sample_latlon[0].to("cpu", torch.float64)

    def log_density(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=emb.device, dtype=emb.dtype)[None]
        return log_prob_ode(model, x, emb, steps=steps, precision=precision)[0].cpu()

    grid = adaptive_log_density_grid(
        log_density, resolution_deg, tolerance, coarse_stride, sample_latlon
    )
    return refine_peaks(log_density, grid, resolution_deg, sample_latlon)
