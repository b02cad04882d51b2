"""What a training run is: :class:`TrainConfig` (everything that determines the weights, checked
when set, saved with every checkpoint and model), :class:`Runtime` (how the run executes) and
the untrained model a config describes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from globeflow.core.families import DENOISING_FAMILIES, FAMILY_NAMES, GeoModel, family_class
from globeflow.core.guidance import check_precision
from globeflow.core.network import Denoiser
from globeflow.core.schedules import schedule_from_config

__all__ = ["FAMILIES", "RESUME_MUTABLE", "Runtime", "TrainConfig", "build_model", "resumable_view"]

FAMILIES = FAMILY_NAMES

RESUME_MUTABLE = ("max_steps", "val_every", "checkpoint_every", "log_every")
"""Config fields that may change between a kill and its resume without changing the trajectory
of the weights."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved with every checkpoint and model)."""

    family: str = "rfm"
    # network (denoising families)
    dim: int = 256
    depth: int = 6
    expansion: int = 4
    dropout: float = 0.0
    schedule: str = "sigmoid"
    cond_drop_prob: float = 0.1
    # baselines (vmf, vmf-mixture)
    hidden: int = 512
    head_depth: int = 2
    num_components: int = 16
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05
    batch_size: int = 512
    max_steps: int = 20000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    val_every: int = 1000
    checkpoint_every: int = 500
    log_every: int = 100
    # validation: loss on a fixed subset, GeoScore of the best guess from a few guided samples
    val_loss_rows: int = 16384
    val_geo_rows: int = 512
    val_num_samples: int = 32
    val_sample_steps: int = 16
    val_guidance: float = 2.0
    # unlabelled locations for the null-condition branch of classifier-free guidance
    prior_latlon: torch.Tensor | None = field(default=None, repr=False)
    prior_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose from {FAMILIES}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"optimizer must be 'adamw' or 'lamb', got {self.optimizer!r}")
        _check_range(self, "prior_fraction", 0.0, 1.0, high_open=True)
        _check_range(self, "lr", 0.0, math.inf, low_open=True)
        for name in ("weight_decay", "eps", "grad_clip", "min_lr_ratio"):
            _check_range(self, name, 0.0, math.inf)
        for name in ("dropout", "cond_drop_prob", "ema_decay"):
            _check_range(self, name, 0.0, 1.0, high_open=True)
        for name in ("batch_size", "dim", "depth", "expansion", "hidden", "num_components"):
            _check_range(self, name, 1, math.inf)
        for name in ("val_every", "checkpoint_every", "log_every", "val_geo_rows"):
            _check_range(self, name, 1, math.inf)
        for name in ("max_steps", "warmup_steps", "val_loss_rows"):
            _check_range(self, name, 0, math.inf)
        if self.family in DENOISING_FAMILIES and self.dim % 8:
            raise ValueError(f"dim must be a multiple of 8, got {self.dim}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.prior_latlon is not None:
            self.prior_latlon = torch.as_tensor(self.prior_latlon, dtype=torch.float64)
            if self.prior_latlon.dim() != 2 or self.prior_latlon.shape[1] != 2:
                raise ValueError("prior_latlon must have shape (M, 2) (lat, lon degrees)")

    @property
    def prior_rows(self) -> int:
        """Rows of each batch drawn from the prior locations (null condition)."""
        if self.prior_latlon is None or len(self.prior_latlon) == 0:
            return 0
        if self.family not in DENOISING_FAMILIES:
            return 0  # only guided families have a null-condition branch to teach
        return min(int(round(self.batch_size * self.prior_fraction)), self.batch_size - 1)

    @property
    def val_rows(self) -> int:
        """Validation rows kept: enough for the loss and for the GeoScore."""
        return max(self.val_loss_rows, self.val_geo_rows)

    def to_dict(self) -> dict:
        """JSON-ready view; the prior locations are summarised by their count."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        prior = out.pop("prior_latlon")
        out["prior_points"] = 0 if prior is None else int(len(prior))
        out["betas"] = list(self.betas)
        return out


def _check_range(
    config: object,
    name: str,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A clear error naming the option when ``config.name`` is not a number in the range."""
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        top = "inf" if high == math.inf else f"{high:g}"
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {top}{hi}, got {value!r}")


def resumable_view(config: dict) -> dict:
    """A config's JSON view (:meth:`TrainConfig.to_dict`) without the fields in
    :data:`RESUME_MUTABLE`: two runs with equal views follow the same trajectory."""
    return {k: v for k, v in config.items() if k not in RESUME_MUTABLE}


@dataclass
class Runtime:
    """How a run executes. None of it changes what is learned beyond float rounding, so it may
    change between a kill and its resume.

    ``device``: auto (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU), cpu, cuda or
    cuda:N. ``precision``: fp32, or bf16 autocast for the forward passes (training and
    validation; weights, gradients and optimiser state stay float32). ``compile``: compile the
    denoising network with ``torch.compile``. ``prefetch``: batches prepared ahead in a
    background thread (None: when streaming or on CUDA, where it overlaps reading with compute).
    """

    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    prefetch: bool | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)


def build_model(config: TrainConfig, cond_dim: int) -> GeoModel:
    """An untrained model of ``config.family``, initialised from ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.family in DENOISING_FAMILIES:
            network = Denoiser(
                dim=config.dim,
                depth=config.depth,
                expansion=config.expansion,
                cond_dim=cond_dim,
                dropout=config.dropout,
            )
            return DENOISING_FAMILIES[config.family](
                network,
                schedule=schedule_from_config({"name": config.schedule}),
                cond_drop_prob=config.cond_drop_prob,
            )
        cls = family_class(config.family)
        return cls(cond_dim, **{a: getattr(config, f) for a, f in cls.training_options.items()})
