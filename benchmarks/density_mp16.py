"""Unconditional density of real photo locations: uniform vs vMF mixtures (EM) vs RFM.

Data: a CSV with columns LAT,LON (default: the 100k MP-16 locations). Protocol: fixed-seed
90/10 split; every model is fitted on the 90 % and scored on the held-out 10 % in bits per
dimension on S^2, ``-log2 p / 3`` with p the density per steradian (uniform: log2(4 pi) / 3 =
1.217). The RFM is scored with the exact likelihood ODE (fixed-step RK4, ``model.log_prob_unit``)
on the held-out points (``eval_points`` takes a random subset to save time; the baselines are
then also reported on that same subset), and the RK4 values are checked against an adaptive
dopri5 solve (float64) on a few points.

On shared or oversubscribed CPUs pass the runner ``--threads 1``: two intra-op threads competing
with other processes slowed training steps by more than 10x in our runs.

Usage: ``python benchmarks/run.py density_mp16 [-p data=CSV] [-p budget_s=600]``.
Exits 0 with a message when the data file is absent.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _registry import experiment

from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.families.baselines import fit_vmf_mixture_em
from globeflow.core.network import Denoiser
from globeflow.core.schedules import schedule_from_config
from globeflow.core.sphere import (
    EARTH_RADIUS_KM,
    LOG_UNIFORM_DENSITY,
    latlon_to_unit,
    project_to_sphere,
    project_to_tangent,
)

DEFAULT_DATA = "/work/shared/data/mp16-locations-100k/locations.csv"
LN2 = math.log(2.0)


def bits_per_dim(log_p: torch.Tensor) -> float:
    """Mean -log2 p / 3 for natural-log densities per steradian."""
    return float(-log_p.double().mean() / LN2 / 3.0)


def sem_bits_per_dim(log_p: torch.Tensor) -> float:
    """Standard error of :func:`bits_per_dim` over the points."""
    v = -log_p.double() / LN2 / 3.0
    return float(v.std() / math.sqrt(v.numel()))


def load_points(path: Path) -> torch.Tensor:
    """(N, 3) float32 unit vectors from a LAT,LON CSV."""
    arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return latlon_to_unit(torch.from_numpy(arr)).float()


def jitter(x: torch.Tensor, sigma_rad: float, generator: torch.Generator) -> torch.Tensor:
    """Isotropic tangent Gaussian noise of std sigma_rad per axis, mapped back to the sphere."""
    if sigma_rad <= 0:
        return x
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype) * sigma_rad
    return project_to_sphere(x + project_to_tangent(x, v))


@dataclass(frozen=True)
class RfmRecipe:
    """How :func:`train_rfm` trains: seed, network (dim, depth, expansion), noise schedule,
    device, AdamW (lr, weight_decay), batch, wall-clock budget (seconds; ``max_steps`` > 0 stops
    earlier), warm-up steps, EMA decay and the training jitter (km)."""

    seed: int = 0
    dim: int = 128
    depth: int = 4
    expansion: int = 4
    schedule: str = "sigmoid"
    device: str = "cpu"
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch: int = 1024
    budget_s: float = 600.0
    max_steps: int = 0
    warmup_steps: int = 100
    ema: float = 0.995
    train_noise_km: float = 0.0


def train_rfm(
    train: torch.Tensor, recipe: RfmRecipe, log: list
) -> tuple[RiemannianFlowMatching, dict]:
    """Train an unconditional RFM for recipe.budget_s seconds; returns the EMA model and stats."""
    torch.manual_seed(recipe.seed)
    with warnings.catch_warnings():  # Linear(0, dim) warns that its empty weight is not initialised
        warnings.simplefilter("ignore")
        net = Denoiser(dim=recipe.dim, depth=recipe.depth, expansion=recipe.expansion, cond_dim=0)
    schedule = schedule_from_config({"name": recipe.schedule})
    device = torch.device(recipe.device)
    model = RiemannianFlowMatching(net, schedule=schedule, cond_drop_prob=0.0).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(recipe.seed)
    # The noise of the loss is drawn on the training device.
    g_dev = torch.Generator(device=device).manual_seed(recipe.seed)
    n = train.shape[0]
    sigma = recipe.train_noise_km / EARTH_RADIUS_KM
    emb = torch.zeros(recipe.batch, 0, device=device)
    start = time.perf_counter()
    step, losses = 0, []
    while True:
        frac = (time.perf_counter() - start) / recipe.budget_s
        if frac >= 1.0 or (recipe.max_steps and step >= recipe.max_steps):
            break
        # Warmup then cosine decay in wall-clock fraction, so any budget gets a full schedule.
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        lr = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(n, (recipe.batch,), generator=g)
        x0 = jitter(train[idx], sigma, g).to(device)
        loss = model.loss(x0, emb, generator=g_dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA with a warm start: decay min(target, (1 + s) / (10 + s)).
        decay = min(recipe.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss))
        step += 1
        if step % 100 == 0:
            msg = (
                f"  rfm step {step}  loss {np.mean(losses[-100:]):.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - start:.0f}/{recipe.budget_s:.0f}s"
            )
            print(msg, flush=True)
            log.append(msg)
    stats = {
        "steps": step,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
    }
    return ema.cpu(), stats


@experiment(
    "density_mp16",
    quick={
        "ks": "1",
        "em_iters": 5,
        "budget_s": 2.0,
        "max_steps": 3,
        "dim": 16,
        "depth": 1,
        "batch": 64,
        "eval_points": 32,
        "rk4_steps": 2,
        "check_points": 2,
    },
    default=True,
    threads=None,
)
def density_mp16(
    *,
    data: str = DEFAULT_DATA,
    seed: int = 0,
    ks: str = "1,4,16,64",
    em_iters: int = 200,
    em_tol: float = 1e-6,
    em_restarts: int = 1,
    skip_rfm: bool = False,
    budget_s: float = 600.0,
    max_steps: int = 0,
    dim: int = 128,
    depth: int = 4,
    expansion: int = 4,
    batch: int = 1024,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    ema: float = 0.995,
    schedule: str = "sigmoid",
    train_noise_km: float = 0.0,
    eval_points: int = 10000,
    rk4_steps: int = 32,
    check_points: int = 16,
    device: str = "cpu",
) -> dict:
    """Held-out NLL of uniform, vMF mixtures (EM) and an RFM (training fields:
    :class:`RfmRecipe`).

    - ``ks``: vMF mixture sizes
    - ``em_tol``: EM stop: mean log-lik gain, nats
    - ``em_restarts``: k-means++ seeds per K (best kept)
    - ``budget_s``: RFM training wall-clock budget
    - ``max_steps``: cap on RFM steps (0: none)
    - ``train_noise_km``: jitter of train points
    - ``eval_points``: held-out subset for the RFM
    - ``check_points``: points checked against dopri5
    - ``device``: device for RFM training (cpu, cuda)
    """

    path = Path(data)
    if not path.is_file():
        print(f"density_mp16: data file {path} not found; skipping.")
        return {"skipped": f"{path} not found"}
    t0 = time.perf_counter()
    points = load_points(path)
    n = points.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = n // 10
    test, train = points[perm[:n_test]], points[perm[n_test:]]
    sub_idx = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed + 1))
    sub_idx = sub_idx[: min(eval_points, n_test)]
    train_set = {tuple(r) for r in train.numpy().round(6).tolist()}
    dup = float(np.mean([tuple(r) in train_set for r in test.numpy().round(6).tolist()]))
    print(
        f"{path}: {n} points, train {train.shape[0]}, test {n_test}; "
        f"{100 * dup:.1f}% of test points coincide with a training point (to 1e-6)",
        flush=True,
    )
    rows: list[dict] = []

    def add_row(name: str, log_p_full: torch.Tensor | None, log_p_sub: torch.Tensor, **extra):
        row = {
            "model": name,
            "test_bpd": bits_per_dim(log_p_full) if log_p_full is not None else None,
            "test_bpd_sem": sem_bits_per_dim(log_p_full) if log_p_full is not None else None,
            "subset_bpd": bits_per_dim(log_p_sub),
            "subset_bpd_sem": sem_bits_per_dim(log_p_sub),
            **extra,
        }
        rows.append(row)
        full = f"{row['test_bpd']:.4f}" if row["test_bpd"] is not None else "   -  "
        print(f"  -> {name}: test {full} bpd, subset {row['subset_bpd']:.4f} bpd", flush=True)

    lp_uniform = torch.full((n_test,), LOG_UNIFORM_DENSITY, dtype=torch.float64)
    add_row("uniform", lp_uniform, lp_uniform[sub_idx])

    emb0 = torch.zeros(1, 0)
    for k in [int(s) for s in ks.split(",") if s]:
        t = time.perf_counter()
        best = None
        for r in range(em_restarts if k > 1 else 1):
            m = fit_vmf_mixture_em(train, k, iters=em_iters, seed=seed + r, tol=em_tol)
            if best is None or m.em_log_likelihood > best.em_log_likelihood:
                best = m
        with torch.no_grad():
            lp = best.log_prob_unit(test[None].double(), emb0.double())[0]
        print(f"vMF mixture K={k}: EM {time.perf_counter() - t:.1f}s", flush=True)
        add_row(
            f"vmf-mixture K={k} (EM)",
            lp,
            lp[sub_idx],
            train_bpd=-best.em_log_likelihood / LN2 / 3.0,
        )

    log: list[str] = []
    if not skip_rfm:
        print(
            f"RFM: dim {dim} depth {depth} batch {batch} schedule {schedule} "
            f"train noise {train_noise_km} km, budget {budget_s:.0f}s",
            flush=True,
        )
        fields = {k: v for k, v in locals().items() if k in RfmRecipe.__dataclass_fields__}
        recipe = RfmRecipe(**fields)
        model, stats = train_rfm(train, recipe, log)
        # A float64 copy for the check, taken before inference packs the weights (a packed
        # oneDNN weight cannot be deep-copied).
        model64 = copy.deepcopy(model).double() if check_points > 0 else None
        sub = test[sub_idx]
        t = time.perf_counter()
        lp_parts = []
        with torch.no_grad():
            for s in range(0, sub.shape[0], 500):
                lp_parts.append(
                    model.log_prob_unit(sub[None, s : s + 500], emb0, steps=rk4_steps)[0]
                )
                print(f"  rfm likelihood {s + lp_parts[-1].numel()}/{sub.shape[0]}", flush=True)
        lp = torch.cat(lp_parts).double()
        eval_s = time.perf_counter() - t
        check = {}
        if check_points > 0:
            from globeflow.core.likelihood import log_prob_adaptive

            c = sub[:check_points][None].double()
            t = time.perf_counter()
            ref = log_prob_adaptive(model64, c, emb0.double(), rtol=1e-6, atol=1e-6)[0]
            rk = model64.log_prob_unit(c, emb0.double(), steps=rk4_steps)[0]
            check = {
                "points": check_points,
                "max_abs_diff_rk4_vs_dopri5_nats": float((rk - ref).abs().max()),
                "max_abs_diff_float32_vs_float64_nats": float((lp[:check_points] - rk).abs().max()),
                "seconds": round(time.perf_counter() - t, 1),
            }
            print(f"  likelihood check: {check}", flush=True)
        add_row(
            "rfm",
            lp if sub_idx.numel() == n_test else None,
            lp,
            config={
                k: v
                for k, v in asdict(recipe).items()
                if k in ("dim", "depth", "expansion", "batch", "lr", "ema", "schedule")
            }
            | {"train_noise_km": train_noise_km, "rk4_steps": rk4_steps},
            training=stats,
            eval_seconds=round(eval_s, 1),
            likelihood_check=check,
        )

    result = {
        "data": str(path),
        "n_train": int(train.shape[0]),
        "n_test": int(n_test),
        "n_subset": int(sub_idx.numel()),
        "test_duplicate_fraction": dup,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print("\nheld-out NLL, bits/dim on S^2 (-log2 p / 3, p per steradian); lower is better")
    print(f"{'model':<26}{'test (all)':>18}{'subset':>18}")
    for r in rows:
        full = f"{r['test_bpd']:.4f}+-{r['test_bpd_sem']:.4f}" if r["test_bpd"] is not None else "-"
        subset = f"{r['subset_bpd']:.4f}+-{r['subset_bpd_sem']:.4f}"
        print(f"{r['model']:<26}{full:>18}{subset:>18}")
    return result
