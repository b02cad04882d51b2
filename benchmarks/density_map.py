"""A 1-degree global map (64,800 points) of the exact log-density of a paper-size network, or
of a trained sharp model.

Network: the published YFCC layout (36M parameters, random weights as in the authors' script);
with ``testbed=DIR`` a trained testbed's model (``DIR/model``, e.g. /work/testbeds/syn-small,
dim 256, depth 4) at the first held-out photo of pattern ``pattern`` (0: a 1-km one), whose
map has a peak a few km wide: the zoom patches (<= 1 km cells) and the map's total mass are
reported, and the baseline also includes the map as it was before them (no samples, no
patches: where its largest value lies, and its mass).
The map is :func:`globeflow.answers.density_map.model_log_density_map` at its defaults (16
midpoint steps of the likelihood ODE, bf16, coarse-to-fine refinement with a tolerance in
nats). Reported:

- seconds for the whole map, and how many of the 64,800 nodes were solved exactly;
- the baseline: the measured cost per exact point (same solver, same batch size) times 64,800,
  i.e. solving every node as the authors' ``compute_likelihood_grid`` does (with our solver);
- accuracy: at ``check`` random nodes, the map against exact values from the same solver
  (interpolation error) and against a tight float32 solve (midpoint, 128 steps; total error).

    python benchmarks/run.py density_map
    python benchmarks/run.py density_map -p testbed=/work/testbeds/syn-small -p pattern=0 \
        --out out/bench/sharp
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import loadavg, print_table, yfcc_size_model
from _registry import experiment

from globeflow.answers.density_map import (
    _mass,
    adaptive_log_density_grid,
    grid_axes,
    model_log_density_map,
)
from globeflow.answers.zoom import KM_PER_DEG
from globeflow.core.checkpoints import load_model
from globeflow.core.likelihood import log_prob_ode
from globeflow.core.sphere import latlon_to_unit

TARGET_SECONDS = 60.0


def _testbed(folder: str, pattern: int):
    """A trained testbed's model and the first held-out embedding of a pattern (1, D)."""
    model = load_model(Path(folder) / "model").eval()
    heldout = torch.load(Path(folder) / "heldout.pt", weights_only=True)
    row = int(torch.nonzero(heldout["pattern"] == pattern)[0, 0])
    return model, model.prepare_embeddings(heldout["embeddings"][row : row + 1])


@experiment(
    "density_map",
    quick={"resolution": 30.0, "check": 4, "steps": 4, "net_dim": 16, "net_depth": 1},
    default=True,
    threads=None,
)
def density_map(
    *,
    resolution: float = 1.0,
    tolerance: float = 0.1,
    steps: int = 16,
    precision: str = "bf16",
    check: int = 256,
    testbed: str | None = None,
    pattern: int = 0,
    net_dim: int = 512,
    net_depth: int = 12,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``check``: random nodes checked exactly
    - ``testbed``: a trained testbed folder (model/, heldout.pt)
    - ``net_dim``, ``net_depth``: the random network's size without a testbed (the published
      512 x 12; smaller only for a smoke run)
    """
    if testbed is None:
        model, emb = yfcc_size_model(dim=net_dim, depth=net_depth)
    else:
        model, emb = _testbed(testbed, pattern)
    report = {}

    start = time.perf_counter()
    result = model_log_density_map(model, emb, resolution, tolerance, steps, precision)
    seconds = time.perf_counter() - start
    values, exact = result["log_density"], result["exact"]

    lat, lon = grid_axes(resolution)
    grid = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1).reshape(-1, 2)
    g = torch.Generator().manual_seed(0)
    nodes = torch.randperm(len(grid), generator=g)[:check]
    x = latlon_to_unit(grid[nodes]).float()[None]
    t0 = time.perf_counter()
    same = log_prob_ode(model, x, emb, steps=steps, precision=precision)[0].double()
    per_point = (time.perf_counter() - t0) / len(nodes)
    tight = log_prob_ode(model, x[:, :32], emb, steps=128)[0].double()
    mapped = values.reshape(-1)[nodes]
    interpolated = ~exact.reshape(-1)[nodes]

    rows = [
        {
            "method": f"adaptive map + zoom patches (tolerance {tolerance} nats)",
            "seconds": seconds,
            "exact nodes": int(result["evaluations"]),
            "mass": result["mass"],
            "finest cell km": result["finest_cell_km"],
            "max log p": max(
                [float(values.max())] + [float(p["log_density"].max()) for p in result["patches"]]
            ),
        },
        {
            "method": "every node solved (measured per point x nodes)",
            "seconds": per_point * len(grid),
            "exact nodes": len(grid),
        },
    ]
    if testbed is not None:  # the map as it was: no samples, no zoom patches
        start = time.perf_counter()
        blind = adaptive_log_density_grid(
            lambda x: log_prob_ode(model, x.to(emb.dtype)[None], emb, steps=steps,
                                   precision=precision)[0],
            resolution, tolerance, 16,
        )  # fmt: skip
        rows.append(
            {
                "method": "before: adaptive map, no samples, no patches",
                "seconds": time.perf_counter() - start,
                "exact nodes": int(blind["evaluations"]),
                "mass": float(_mass(blind["log_density"], blind["lat"], resolution).sum()),
                "finest cell km": resolution * KM_PER_DEG,
                "max log p": float(blind["log_density"].max()),
            }
        )
    report.update(
        {
            "seconds": seconds,
            "target_seconds": TARGET_SECONDS,
            "nodes": len(grid),
            "exact_nodes": int(result["evaluations"]),
            "max_surplus_per_level": result["max_surplus"],
            "every_node_seconds_estimate": per_point * len(grid),
            "speedup_vs_every_node": per_point * len(grid) / seconds,
            "check_nodes": len(nodes),
            "check_interpolated_nodes": int(interpolated.sum()),
            "max_abs_error_vs_same_solver": float((mapped - same).abs().max()),
            "max_abs_error_interpolated_nodes": float((mapped - same)[interpolated].abs().max())
            if interpolated.any()
            else 0.0,
            "max_abs_error_vs_tight_solve_32_nodes": float((mapped[:32] - tight).abs().max()),
            "log_density_range": [float(values.min()), float(values.max())],
        }
    )
    print_table(rows, ["method", "seconds", "exact nodes", "mass", "finest cell km", "max log p"])
    report["rows"] = rows
    report["load_average_after"] = loadavg()
    return report
