"""The PLONK authors' code (``../shared/reference``, MIT), found and driven for side-by-side runs.

Nothing of it is copied here: its package is imported from ``PLONK_REF_SRC`` (the folder that
holds ``plonk/`` and the reference scripts) and its scripts are run as subprocesses of the same
Python. See ``../shared/reference/README.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import SHARED

ENV_VAR = "PLONK_REF_SRC"
DEFAULT_SRC = SHARED / "reference" / "plonk"
SCHEDULE_ARGS = (-7, 3, 1.0)
"""The authors' sigmoid scheduler (start, end, tau) used by their scripts; equals globeflow's
default ``SigmoidSchedule``."""
NEEDS = "einops geoopt torchdiffeq scipy (`.venv/bin/pip install -e .[bench]`)"


def find_source(explicit: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(folder holding ``plonk/``, "") or (None, why it is not usable)."""
    src = Path(explicit or os.environ.get(ENV_VAR) or DEFAULT_SRC).expanduser().resolve()
    if not (src / "plonk" / "models").is_dir():
        return None, (
            f"the authors' code is not at {src} (set {ENV_VAR} to the folder holding plonk/); "
            "comparisons with it are skipped"
        )
    return src, ""


@dataclass
class ReferenceCode:
    """The authors' network, scheduler, sampler and scripts, imported from ``src``."""

    src: Path

    def __post_init__(self):
        if str(self.src) not in sys.path:
            sys.path.insert(0, str(self.src))
        try:
            from plonk.models.networks.mlp import GeoAdaLNMLP
            from plonk.models.samplers.riemannian_flow_sampler import riemannian_flow_sampler
            from plonk.models.schedulers import SigmoidScheduler
        except ImportError as exc:
            raise ImportError(f"the authors' code needs {NEEDS}: {exc}") from exc
        self.network_class = GeoAdaLNMLP
        self.scheduler = SigmoidScheduler(*SCHEDULE_ARGS)
        self._sampler = riemannian_flow_sampler

    def env(self, threads: int) -> dict[str, str]:
        return {**os.environ, ENV_VAR: str(self.src), "THREADS": str(threads)}

    def write_yfcc_size_network(self, out: Path) -> None:
        """Their ``make_yfcc_size.py``: random published-size network + one embedding in ``out``."""
        subprocess.run(
            [sys.executable, str(self.src / "make_yfcc_size.py"), str(out)],
            check=True,
            env=self.env(1),
        )

    def load_network(self, directory: Path) -> torch.nn.Module:
        """Their network class with the weights of a published-format directory, in eval mode."""
        from safetensors.torch import load_file

        config = json.loads((directory / "config.json").read_text())
        net = self.network_class(**config).eval()
        net.load_state_dict(load_file(str(directory / "model.safetensors")))
        return net

    @torch.no_grad()
    def sample(self, net, emb: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float):
        """Their Riemannian flow sampler with guidance ``guidance`` from the unit vectors
        ``noise``: (N, 3) for one embedding emb (1, D) -> (N, 3), or (B, N, 3) for B embeddings
        (B, D) -> (B, N, 3), all in one batch."""
        rows = noise if noise.dim() == 3 else noise[None]
        b, n, _ = rows.shape
        emb_rows = emb.repeat_interleave(n, 0) if emb.shape[0] == b else emb.expand(b * n, -1)
        batch = {"y": rows.reshape(b * n, 3).clone(), "emb": emb_rows.contiguous()}
        with warnings.catch_warnings():  # their torch.cuda.amp.autocast warns on CPU
            warnings.simplefilter("ignore")
            out = self._sampler(
                net,
                batch,
                conditioning_keys="emb",
                scheduler=self.scheduler,
                num_steps=steps,
                cfg_rate=guidance,
            )
        return out.reshape(noise.shape)

    def log_likelihood(self, net_dir: Path, points: int, threads: int) -> dict:
        """Their exact log-likelihood script (``loglik_ref.py``: pipe.py's dopri5 at
        atol = rtol = 1e-6 with a vmap(jacrev) trace) on ``points`` points of one image.

        Returns the seconds the script measured around its solve, the whole subprocess's wall
        time and its log-densities (natural log).
        """
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(self.src / "loglik_ref.py"), str(net_dir), str(points)],
            check=True,
            capture_output=True,
            text=True,
            env=self.env(threads),
        )
        wall = time.perf_counter() - start
        fields = proc.stdout.split()
        return {
            "seconds": float(fields[0]),
            "wall_seconds": wall,
            "log_prob": [float(v) for v in fields[1:]],
        }


def loglik_points(points: int) -> torch.Tensor:
    """The points ``loglik_ref.py`` scores: normalised standard normals from a generator seeded
    with 0, (points, 3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(points, 3, generator=g)
    return x / x.norm(dim=-1, keepdim=True)
