"""Unconditional density of real photo locations: uniform vs vMF mixtures (EM) vs RFM.

Data: a CSV with columns LAT,LON (default: the 100k MP-16 locations). Protocol: fixed-seed
90/10 split; every model is fitted on the 90 % and scored on the held-out 10 % in bits per
dimension on S^2, ``-log2 p / 3`` with p the density per steradian (uniform: log2(4 pi) / 3 =
1.217). The RFM is scored with the exact likelihood ODE (fixed-step RK4, ``model.log_prob_unit``)
on the held-out points (``--eval-points`` takes a random subset to save time; the baselines are
then also reported on that same subset), and the RK4 values are checked against an adaptive
dopri5 solve (float64) on a few points.

On shared or oversubscribed CPUs pass ``--threads 1``: two intra-op threads competing with other
processes slowed training steps by more than 10x in our runs.

Usage: ``python benchmarks/density_mp16.py [--data CSV] [--budget-s 600] [--out results.json]``.
Exits 0 with a message when the data file is absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

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


def train_rfm(
    train: torch.Tensor, args: argparse.Namespace, log: list
) -> tuple[RiemannianFlowMatching, dict]:
    """Train an unconditional RFM for args.budget_s seconds; returns the EMA model and stats."""
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():  # Linear(0, dim) warns that its empty weight is not initialised
        warnings.simplefilter("ignore")
        net = Denoiser(dim=args.dim, depth=args.depth, expansion=args.expansion, cond_dim=0)
    schedule = schedule_from_config({"name": args.schedule})
    device = torch.device(args.device)
    model = RiemannianFlowMatching(net, schedule=schedule, cond_drop_prob=0.0).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed)
    # The noise of the loss is drawn on the training device.
    g_dev = torch.Generator(device=device).manual_seed(args.seed)
    n = train.shape[0]
    sigma = args.train_noise_km / EARTH_RADIUS_KM
    emb = torch.zeros(args.batch, 0, device=device)
    start = time.perf_counter()
    step, losses = 0, []
    while True:
        frac = (time.perf_counter() - start) / args.budget_s
        if frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        # Warmup then cosine decay in wall-clock fraction, so any budget gets a full schedule.
        warm = min(1.0, (step + 1) / args.warmup_steps)
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(n, (args.batch,), generator=g)
        x0 = jitter(train[idx], sigma, g).to(device)
        loss = model.loss(x0, emb, generator=g_dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA with a warm start: decay min(target, (1 + s) / (10 + s)).
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss))
        step += 1
        if step % 100 == 0:
            msg = (
                f"  rfm step {step}  loss {np.mean(losses[-100:]):.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - start:.0f}/{args.budget_s:.0f}s"
            )
            print(msg, flush=True)
            log.append(msg)
    stats = {
        "steps": step,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
    }
    return ema.cpu(), stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=None, help="also write the JSON results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="1,4,16,64", help="vMF mixture sizes")
    ap.add_argument("--em-iters", type=int, default=200)
    ap.add_argument("--em-tol", type=float, default=1e-6, help="EM stop: mean log-lik gain, nats")
    ap.add_argument("--em-restarts", type=int, default=1, help="k-means++ seeds per K (best kept)")
    ap.add_argument("--skip-rfm", action="store_true")
    ap.add_argument("--budget-s", type=float, default=600.0, help="RFM training wall-clock budget")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on RFM steps (0: none)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--schedule", default="sigmoid", choices=["sigmoid", "linear", "cosine"])
    ap.add_argument("--train-noise-km", type=float, default=0.0, help="jitter of train points")
    ap.add_argument("--eval-points", type=int, default=10000, help="held-out subset for the RFM")
    ap.add_argument("--rk4-steps", type=int, default=32)
    ap.add_argument("--check-points", type=int, default=16, help="points checked against dopri5")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--device", default="cpu", help="device for RFM training (cpu, cuda)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = Path(args.data)
    if not path.is_file():
        print(f"density_mp16: data file {path} not found; skipping.")
        return 0
    t0 = time.perf_counter()
    points = load_points(path)
    n = points.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_test = n // 10
    test, train = points[perm[:n_test]], points[perm[n_test:]]
    sub_idx = torch.randperm(n_test, generator=torch.Generator().manual_seed(args.seed + 1))
    sub_idx = sub_idx[: min(args.eval_points, n_test)]
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
    for k in [int(s) for s in args.ks.split(",") if s]:
        t = time.perf_counter()
        best = None
        for r in range(args.em_restarts if k > 1 else 1):
            m = fit_vmf_mixture_em(
                train, k, iters=args.em_iters, seed=args.seed + r, tol=args.em_tol
            )
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
    if not args.skip_rfm:
        print(
            f"RFM: dim {args.dim} depth {args.depth} batch {args.batch} schedule {args.schedule} "
            f"train noise {args.train_noise_km} km, budget {args.budget_s:.0f}s",
            flush=True,
        )
        model, stats = train_rfm(train, args, log)
        sub = test[sub_idx]
        t = time.perf_counter()
        lp_parts = []
        with torch.no_grad():
            for s in range(0, sub.shape[0], 500):
                lp_parts.append(
                    model.log_prob_unit(sub[None, s : s + 500], emb0, steps=args.rk4_steps)[0]
                )
                print(f"  rfm likelihood {s + lp_parts[-1].numel()}/{sub.shape[0]}", flush=True)
        lp = torch.cat(lp_parts).double()
        eval_s = time.perf_counter() - t
        check = {}
        if args.check_points > 0:
            from globeflow.core.likelihood import log_prob_adaptive

            c = sub[: args.check_points][None].double()
            model64 = copy.deepcopy(model).double()
            t = time.perf_counter()
            ref = log_prob_adaptive(model64, c, emb0.double(), rtol=1e-6, atol=1e-6)[0]
            rk = model64.log_prob_unit(c, emb0.double(), steps=args.rk4_steps)[0]
            check = {
                "points": args.check_points,
                "max_abs_diff_rk4_vs_dopri5_nats": float((rk - ref).abs().max()),
                "max_abs_diff_float32_vs_float64_nats": float(
                    (lp[: args.check_points] - rk).abs().max()
                ),
                "seconds": round(time.perf_counter() - t, 1),
            }
            print(f"  likelihood check: {check}", flush=True)
        add_row(
            "rfm",
            lp if sub_idx.numel() == n_test else None,
            lp,
            config={
                k: getattr(args, k)
                for k in ("dim", "depth", "expansion", "batch", "lr", "ema", "schedule")
            }
            | {"train_noise_km": args.train_noise_km, "rk4_steps": args.rk4_steps},
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
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print("\nheld-out NLL, bits/dim on S^2 (-log2 p / 3, p per steradian); lower is better")
    print(f"{'model':<26}{'test (all)':>18}{'subset':>18}")
    for r in rows:
        full = f"{r['test_bpd']:.4f}+-{r['test_bpd_sem']:.4f}" if r["test_bpd"] is not None else "-"
        subset = f"{r['subset_bpd']:.4f}+-{r['subset_bpd_sem']:.4f}"
        print(f"{r['model']:<26}{full:>18}{subset:>18}")
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
