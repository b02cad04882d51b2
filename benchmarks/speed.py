"""Speed of sampling and of exact log-densities against naive implementations, in one run.

Network: the published YFCC size (dim 512, depth 12, cond_dim 1024) with random weights, float32.

Sampling: 1024 samples of one image, 32 Euler steps, guidance 2. Naive: the plain per-row network
call (every row recomputes the condition path) and two calls per step for guidance
(``benchmarks/naive.py``). Ours: ``RiemannianFlowMatching.sample_raw``. "Proposed": the same
library loop with ``benchmarks/proposed_sampling.patch`` applied to the forward pass (emulated
here without touching ``src/``). All start from the same noise and must agree to ~1e-4.

Log-density: the tight reference is the library's adaptive dopri5 solve (``log_prob_adaptive``) at
``--tight-tol`` on ``--acc-embeddings`` random embeddings x ``--acc-points`` uniform points each.
Ours, ``log_prob_ode(steps=K, spacing=S)``, is searched over a ladder of (K, S) for the cheapest
setting with max |delta log p| <= 0.02 nats. Timing is on the points of the first embedding:
the naive dopri5 with the full autograd Jacobian trace at the tight tolerance (the baseline of
the ratio) and, for transparency, at ``--loose-tol``, against ours at the chosen (K, S).

Timings interleave the methods' repetitions and report medians (the machine is shared; its load
average is recorded). The default is one intra-op thread: on an oversubscribed 2-core machine two
threads were slower and far noisier for every method.

Usage: ``python benchmarks/speed.py [--quick] [--device cpu|cuda] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import loadavg, timed  # noqa: E402
from naive import naive_log_prob, naive_sample  # noqa: E402

from globeflow.core.families import RiemannianFlowMatching  # noqa: E402
from globeflow.core.likelihood import log_prob_adaptive, log_prob_ode  # noqa: E402
from globeflow.core.network import LAYER_NORM_EPS, Denoiser  # noqa: E402
from globeflow.core.sphere import sample_uniform_sphere  # noqa: E402

TARGET_SAMPLING = 1.5
TARGET_DENSITY = 50.0
TARGET_ERROR_NATS = 0.02


# ---- the proposed forward pass (mirror of benchmarks/proposed_sampling.patch) ---------------
def _modulated_layer_norm(x, g, m):
    if g.shape[0] == 1 and g.dim() == x.dim():
        # One condition: the modulation is a per-channel affine, fused into LayerNorm's kernel.
        return F.layer_norm(x, x.shape[-1:], (1 + g).reshape(-1), m.reshape(-1), LAYER_NORM_EPS)
    return torch.addcmul(m, F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS), 1 + g)


def proposed_forward_conditioned(net: Denoiser, y, cond):
    """``Denoiser.forward_conditioned`` as the proposed patch writes it."""
    x = net.initial_mapper(y)
    for block, modulation in zip(net.blocks, cond.blocks):
        g, m, s = modulation.chunk(3, dim=-1)
        x = torch.addcmul(x, block.mlp(_modulated_layer_norm(x, g, m)), s)
    g, m = cond.final.chunk(2, dim=-1)
    return net.final_linear(_modulated_layer_norm(x, g, m))


class ProposedRFM(RiemannianFlowMatching):
    """The library's sampling loop with the proposed forward pass."""

    def guided_output(self, x, cond, null, guidance):
        out = proposed_forward_conditioned(self.network, x, cond)
        if null is None or guidance == 0:
            return out
        out_null = proposed_forward_conditioned(self.network, x, null)
        return torch.lerp(out_null, out, 1.0 + guidance)


# ---- sampling -----------------------------------------------------------------------------------
def bench_sampling(model, cfg, device, reps, gen) -> dict:
    net = model.network
    emb = torch.randn(1, net.cond_dim, generator=gen).to(device)
    noise = sample_uniform_sphere((1, cfg["samples"]), generator=gen).to(device)
    n, steps, w = cfg["samples"], cfg["steps"], cfg["guidance"]
    proposed = ProposedRFM(net, model.schedule).eval()
    runs = {
        "naive": lambda: naive_sample(net, model.schedule, emb, noise, steps, w),
        "ours": lambda: model.sample_raw(emb, n, steps, guidance=w, noise=noise),
        "proposed": lambda: proposed.sample_raw(emb, n, steps, guidance=w, noise=noise),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    results = {}
    for _ in range(reps):  # interleaved, so that load changes hit every method alike
        for name, fn in runs.items():
            results[name], dt = timed(fn, device)
            times[name].append(dt)
            print(f"  sampling {name:9s} {dt:8.2f} s  load {loadavg()}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [a / b for a, b in zip(times["naive"], times["ours"])]
    paired_prop = [a / b for a, b in zip(times["naive"], times["proposed"])]
    ratio = med["naive"] / med["ours"]
    return {
        "samples": n,
        "steps": steps,
        "guidance": w,
        "repetitions": reps,
        "seconds": times,
        "median_seconds": med,
        "samples_per_s": {k: n / v for k, v in med.items()},
        "ratio_ours": ratio,
        "ratio_ours_paired_median": statistics.median(paired),
        "ratio_proposed": med["naive"] / med["proposed"],
        "ratio_proposed_paired_median": statistics.median(paired_prop),
        "max_abs_diff_naive_vs_ours": float((results["naive"] - results["ours"]).abs().max()),
        "max_abs_diff_proposed_vs_ours": float((results["proposed"] - results["ours"]).abs().max()),
        "target": TARGET_SAMPLING,
        "target_met": ratio >= TARGET_SAMPLING,
    }


# ---- log-density --------------------------------------------------------------------------------
class _CountJVP:
    """Counts field evaluations of the library solvers (calls of ``forward_with_jvp``)."""

    def __init__(self, net):
        self.net, self.count, self._orig = net, 0, net.forward_with_jvp

        def counted(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        net.forward_with_jvp = counted


def _err_stats(lp, ref) -> dict:
    err = (lp - ref).abs()
    return {"max": float(err.max()), "mean": float(err.mean())}


def bench_density(model, cfg, device, gen, args) -> dict:
    net = model.network
    counter = _CountJVP(net)
    e, p = args.acc_embeddings, args.acc_points
    emb = torch.randn(e, net.cond_dim, generator=gen).to(device)
    x = sample_uniform_sphere((e, p), generator=gen).to(device)

    print(f"  reference: library dopri5 rtol=atol={args.tight_tol} on {e}x{p} points", flush=True)
    counter.count = 0
    ref, t_ref = timed(
        lambda: log_prob_adaptive(model, x, emb, rtol=args.tight_tol, atol=args.tight_tol), device
    )
    ref_info = {"rtol_atol": args.tight_tol, "nfe": counter.count, "seconds": t_ref}
    print(f"    {t_ref:.1f} s, NFE {counter.count}, load {loadavg()}", flush=True)

    # Cheapest (K, spacing): the cost depends on K only, so each further spacing is tried only
    # below the best K found so far.
    search = []
    best = None
    for spacing in args.spacings:
        for k in args.ladder:
            if best is not None and k >= best[0]:
                break
            lp, dt = timed(lambda k=k, s=spacing: log_prob_ode(model, x, emb, k, spacing=s), device)
            stats = _err_stats(lp, ref)
            ok = stats["max"] <= TARGET_ERROR_NATS
            search.append({"steps": k, "spacing": spacing, **stats, "ok": ok, "seconds": dt})
            print(
                f"    K={k:3d} {spacing:6s} max {stats['max']:.4f} mean {stats['mean']:.4f}"
                f" {'ok' if ok else '--'}",
                flush=True,
            )
            if ok:
                best = (k, spacing)
                break
    if best is None:
        best = (args.ladder[-1], args.spacings[0])
    k_best, s_best = best

    # Timing on the first embedding's points.
    xt, et, ref_t = x[:1], emb[:1], ref[:1]

    def ours():
        return log_prob_ode(model, xt, et, k_best, spacing=s_best)

    ours_times = []
    lp_ours, dt = timed(ours, device)
    ours_times.append(dt)
    print(f"  timing on {xt.shape[1]} points: naive dopri5 {args.tight_tol} ...", flush=True)
    (lp_tight, nfe_tight), t_tight = timed(
        lambda: naive_log_prob(net, model.schedule, xt, et, args.tight_tol, args.tight_tol), device
    )
    print(f"    {t_tight:.1f} s, NFE {nfe_tight}, load {loadavg()}", flush=True)
    ours_times.append(timed(ours, device)[1])
    (lp_loose, nfe_loose), t_loose = timed(
        lambda: naive_log_prob(net, model.schedule, xt, et, args.loose_tol, args.loose_tol), device
    )
    print(f"    naive dopri5 {args.loose_tol}: {t_loose:.1f} s, NFE {nfe_loose}", flush=True)
    ours_times.append(timed(ours, device)[1])
    t_ours = statistics.median(ours_times)
    m = xt.shape[1]
    ratio = t_tight / t_ours
    return {
        "accuracy_points": e * p,
        "accuracy_embeddings": e,
        "reference": ref_info,
        "search": search,
        "chosen": {
            "steps": k_best,
            "spacing": s_best,
            "nfe": 4 * k_best,
            **_err_stats(log_prob_ode(model, x, emb, k_best, spacing=s_best), ref),
        },
        "timing_points": m,
        "naive_tight": {
            "rtol_atol": args.tight_tol,
            "nfe": nfe_tight,
            "seconds": t_tight,
            "points_per_s": m / t_tight,
            "vs_reference": _err_stats(lp_tight, ref_t),
        },
        "naive_loose": {
            "rtol_atol": args.loose_tol,
            "nfe": nfe_loose,
            "seconds": t_loose,
            "points_per_s": m / t_loose,
            "vs_reference": _err_stats(lp_loose, ref_t),
        },
        "ours": {
            "steps": k_best,
            "spacing": s_best,
            "nfe": 4 * k_best,
            "seconds": ours_times,
            "median_seconds": t_ours,
            "points_per_s": m / t_ours,
            "vs_reference": _err_stats(lp_ours, ref_t),
            "vs_naive_tight": _err_stats(lp_ours, lp_tight),
        },
        "ratio_vs_naive_tight": ratio,
        "ratio_vs_naive_loose": t_loose / t_ours,
        "target": TARGET_DENSITY,
        "target_error_nats": TARGET_ERROR_NATS,
        "target_met": ratio >= TARGET_DENSITY,
    }


def print_table(report: dict) -> None:
    s, d = report["sampling"], report.get("density")
    print("\n| measurement | naive | ours | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    sps = s["samples_per_s"]
    print(
        f"| sampling {s['samples']}x{s['steps']} steps, w={s['guidance']} (samples/s) "
        f"| {sps['naive']:.1f} | {sps['ours']:.1f} | {s['ratio_ours']:.2f}x "
        f"| >= {s['target']}x | {'yes' if s['target_met'] else 'no'} |"
    )
    print(
        f"| sampling with proposed patch (samples/s) | {sps['naive']:.1f} "
        f"| {sps['proposed']:.1f} | {s['ratio_proposed']:.2f}x | >= {s['target']}x "
        f"| {'yes' if s['ratio_proposed'] >= s['target'] else 'no'} |"
    )
    if d:
        o, nt, nl = d["ours"], d["naive_tight"], d["naive_loose"]
        print(
            f"| log p, {d['timing_points']} pts: naive dopri5 {nt['rtol_atol']} "
            f"(NFE {nt['nfe']}) vs RK4 K={o['steps']} {o['spacing']} (points/s) "
            f"| {nt['points_per_s']:.4f} | {o['points_per_s']:.3f} "
            f"| {d['ratio_vs_naive_tight']:.1f}x | >= {d['target']}x "
            f"| {'yes' if d['target_met'] else 'no'} |"
        )
        print(
            f"| log p vs naive dopri5 {nl['rtol_atol']} (NFE {nl['nfe']}) "
            f"| {nl['points_per_s']:.4f} | {o['points_per_s']:.3f} "
            f"| {d['ratio_vs_naive_loose']:.1f}x | (info) | |"
        )
        c = d["chosen"]
        print(
            f"| log p error vs tight solve over {d['accuracy_points']} pts (nats) | | "
            f"max {c['max']:.4f} / mean {c['mean']:.4f} | | <= {d['target_error_nats']} "
            f"| {'yes' if c['max'] <= d['target_error_nats'] else 'no'} |"
        )
    print(f"\nload average before/after: {report['loadavg_start']} / {report['loadavg_end']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small network and sizes (smoke run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch default)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved sampling repetitions")
    ap.add_argument("--acc-embeddings", type=int, default=None)
    ap.add_argument("--acc-points", type=int, default=None, help="points per embedding")
    ap.add_argument("--tight-tol", type=float, default=1e-7)
    ap.add_argument("--loose-tol", type=float, default=1e-5)
    ap.add_argument("--ladder", type=int, nargs="+", default=[8, 12, 16, 24, 32, 48, 64])
    ap.add_argument("--spacings", nargs="+", default=["gamma", "mixed", "t"])
    ap.add_argument("--skip-density", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        cfg = dict(dim=128, depth=4, cond_dim=256, samples=256, steps=32, guidance=2.0)
        args.acc_embeddings = args.acc_embeddings or 2
        args.acc_points = args.acc_points or 8
    else:
        cfg = dict(dim=512, depth=12, cond_dim=1024, samples=1024, steps=32, guidance=2.0)
        args.acc_embeddings = args.acc_embeddings or 4
        args.acc_points = args.acc_points or 8

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    net = Denoiser(dim=cfg["dim"], depth=cfg["depth"], cond_dim=cfg["cond_dim"])
    model = RiemannianFlowMatching(net).to(device).eval()

    report = {
        "config": {
            **cfg,
            "expansion": 4,
            "dtype": "float32",
            "weights": "random",
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "quick": args.quick,
            "seed": args.seed,
        },
        "loadavg_start": loadavg(),
    }
    print(json.dumps(report["config"]), flush=True)
    print("sampling", flush=True)
    report["sampling"] = bench_sampling(model, cfg, device, args.reps, gen)
    if not args.skip_density:
        print("log-density", flush=True)
        report["density"] = bench_density(model, cfg, device, gen, args)
    report["loadavg_end"] = loadavg()
    print_table(report)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
