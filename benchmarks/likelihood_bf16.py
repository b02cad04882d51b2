"""Where the exact log-likelihood may run bf16: the switch's signal level against its error.

On the YFCC-size random network (``vs_reference``'s, one per seed) at 64 points, against a
tight dopri5 solve of the same field: ``log_prob_ode`` with every step fp32, bf16 below each
switch level (the "mixed" likelihood, :data:`~globeflow.core.likelihood.LIKELIHOOD_BF16_BELOW`
patched for the run) and bf16 throughout; max |error| in nats (the bound is 0.02) and seconds
(best of ``repeats``, the variants interleaved).

    python benchmarks/run.py likelihood_bf16 --threads 2
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from _common import gemm_rates, print_table
from _registry import experiment
from vs_reference import QUICK_SIZE, YFCC_SIZE, write_network

from globeflow.core import likelihood
from globeflow.core.checkpoints import load_model
from globeflow.core.sampler_settings import MIXED


def _network(seed: int, size: dict, tmp: Path):
    write_network(tmp, size, None, seed)
    return load_model(tmp, family="rfm"), torch.load(tmp / "emb.pt", weights_only=True)


def _variants(switches: list[float]) -> dict[str, tuple[str, float]]:
    """label -> (precision, switch level)."""
    out = {"fp32": ("fp32", 0.0)}
    out.update({f"bf16 below {s:g}": (MIXED, s) for s in switches})
    out["bf16"] = ("bf16", 1.0)
    return out


@experiment("likelihood_bf16", quick={"points": 4, "seeds": "0", "switches": "0.4", "quick": True})
def likelihood_bf16(
    *,
    points: int = 64,
    seeds: str = "0,1",
    switches: str = "0.25,0.4,0.5,0.9",
    repeats: int = 2,
    tight_tol: float = 1e-7,
    quick: bool = False,
) -> dict:
    """The likelihood's error and time by where it switches to bf16.

    - ``points``: points scored per network (uniform on the sphere, seeded)
    - ``seeds``: comma-separated network seeds
    - ``switches``: comma-separated signal levels below which bf16 runs
    - ``repeats``: interleaved repeats (best of)
    - ``tight_tol``: rtol = atol of the dopri5 reference
    - ``quick``: a small network
    """
    variants = _variants([float(s) for s in switches.split(",")])
    report = {"gemm_gflops": gemm_rates(), "rows": []}
    for seed in (int(s) for s in seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="gf-lik-bf16-") as tmp:
            model, emb = _network(seed, QUICK_SIZE if quick else YFCC_SIZE, Path(tmp))
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(1, points, 3, generator=g), dim=-1)
        tight = likelihood.log_prob_adaptive(model, x, emb, rtol=tight_tol, atol=tight_tol)
        seconds: dict[str, list[float]] = {label: [] for label in variants}
        errors: dict[str, float] = {}
        for _ in range(repeats):
            for label, (precision, switch) in variants.items():
                with mock.patch.object(likelihood, "LIKELIHOOD_BF16_BELOW", switch):
                    start = time.perf_counter()
                    value = likelihood.log_prob_ode(model, x, emb, precision=precision)
                    seconds[label].append(time.perf_counter() - start)
                errors[label] = float((value - tight).abs().max())
        fp32 = min(seconds["fp32"])
        for label in variants:
            report["rows"].append({
                "network seed": seed, "likelihood": label, "max error nats": errors[label],
                "s": min(seconds[label]), "speed-up over fp32": fp32 / min(seconds[label]),
            })  # fmt: skip
    print_table(report["rows"], ["network seed", "likelihood", "max error nats", "s",
                                 "speed-up over fp32"])  # fmt: skip
    return report
