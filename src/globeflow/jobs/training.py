"""The ``train`` job: optimiser, learning-rate schedule, EMA, validation and exact resume, in one
process or many (``torchrun``, DistributedDataParallel).

One step is: take a batch (:mod:`globeflow.jobs.train_data`: rows in memory or streamed from the
store, optionally topped up with unlabelled prior locations under the null condition), compute
the family's loss (each process its share of the batch; DDP averages the gradients), clip, step
AdamW or LAMB, update the EMA (rank 0).

Every ``checkpoint_every`` steps rank 0 writes the whole training state (weights, EMA, optimiser
moments, step counter, validation bookkeeping, data fingerprint) atomically to
``out_dir/checkpoint/``. Random draws are pure functions of (seed, step), so a run killed at any
point and started again reaches bitwise the same final weights as an uninterrupted run; with a
different number of processes it continues from the same step and state.

One job at a time uses a run directory (:mod:`globeflow.jobs.run_lock`). SIGTERM or SIGINT
during the steps saves a checkpoint at the next step boundary and raises
:class:`TrainingStopped` (:mod:`globeflow.jobs.stop_signals`).

Outputs in ``out_dir`` (rank 0): ``best/`` (EMA model with the best validation GeoScore),
``final/`` (EMA model at the last step), ``metrics.jsonl`` (one line per validation),
``train_log.txt``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from globeflow.answers.decode import best_guess
from globeflow.core.checkpoints import save_model
from globeflow.core.families import DENOISING_FAMILIES, DenoisingModel, GeoModel
from globeflow.core.guidance import check_precision
from globeflow.core.network import Denoiser
from globeflow.core.schedules import schedule_from_config
from globeflow.core.sphere import haversine_km
from globeflow.data import embedding_store
from globeflow.data.coordinates import counts_text, invalid_latlon_counts, valid_latlon_mask
from globeflow.data.embedding_stream import derived_seed, hold_out, list_row_groups
from globeflow.jobs.distributed import (
    Placement,
    Prefetcher,
    autocast,
    to_device,
)
from globeflow.jobs.metrics import geoscore
from globeflow.jobs.run_lock import locked_run_directory
from globeflow.jobs.stop_signals import StopAgreement, StopRequests, TrainingStopped
from globeflow.jobs.train_checkpoint import (
    find_checkpoint,
    load_checkpoint,
    rewrite_metrics,
    save_checkpoint,
)
from globeflow.jobs.train_data import (
    Batch,
    BatchOrder,
    InMemoryRows,
    StreamedRows,
    ValidationRows,
    assemble_batch,
    nonfinite_rows,
    read_group_rows,
    read_prior_locations,
    split_rows,
    tensor_fingerprint,
    to_unit,
)
from globeflow.jobs.train_data import exclude_authors as without_authors

__all__ = [
    "FAMILIES",
    "BatchOrder",
    "Lamb",
    "Runtime",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "assemble_batch",
    "build_model",
    "ema_decay_at",
    "learning_rate",
    "make_optimizer",
    "read_prior_locations",
    "split_rows",
    "train",
    "train_from_embeddings",
    "update_ema",
    "validate",
]

FAMILIES = ("rfm", "flow", "diffusion", "vmf", "vmf-mixture", "uniform")

CHECKPOINT_DIR = "checkpoint"
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "train_log.txt"

# Changing these between a kill and its resume does not change the trajectory of the weights.
_RESUME_MUTABLE = ("max_steps", "val_every", "checkpoint_every", "log_every")


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


@dataclass
class TrainResult:
    """Where a finished run put its models, and its last and best validation metrics."""

    out_dir: Path
    final_dir: Path
    best_dir: Path | None
    steps: int
    final_metrics: dict
    best_metrics: dict | None

    def __str__(self) -> str:
        def fmt(m: dict | None) -> str:
            keys = ("val_loss", "val_geoscore", "val_median_km")
            return ", ".join(f"{k}={m[k]:.4g}" for k in keys if (m or {}).get(k) is not None)

        metrics = fmt(self.final_metrics)
        text = f"{self.steps} steps; final model {self.final_dir}"
        text += f" ({metrics})" if metrics else " (not validated)"
        if self.best_dir is not None and self.best_metrics:
            step = self.best_metrics["step"]
            text += f"; best {self.best_dir} (step {step}: {fmt(self.best_metrics)})"
        return text


# ---- optimisation pieces ------------------------------------------------------------------------
def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``
    at ``max_steps``. ``step`` counts completed optimiser steps (0 for the first update)."""
    base, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * progress))


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020): Adam moments with decoupled weight decay, each parameter's
    update rescaled by the trust ratio ||w|| / ||update||, so that large batches can use large
    learning rates without any layer moving too far relative to its own scale."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                update = (m / (1.0 - beta1**t)) / ((v / (1.0 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(update * (group["lr"] * trust))
        return loss


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
    """AdamW or LAMB; weight decay on matrices only (not biases). None if nothing is trainable."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "lamb":
        return Lamb(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` completed updates: ramps up as (1 + s) / (10 + s) so that the
    average does not stay anchored to the random initialisation in short runs."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class StepLoss(nn.Module):
    """The family's loss on this process's rows of a batch, as the ``forward`` that
    DistributedDataParallel wraps (so that its gradient hooks see every step)."""

    def __init__(self, model: GeoModel):
        super().__init__()
        self.model = model

    def forward(
        self, x0: torch.Tensor, emb: torch.Tensor, generator: torch.Generator, rows: slice | None
    ) -> torch.Tensor:
        if rows is None:
            return self.model.loss(x0, emb, generator=generator)
        if isinstance(self.model, DenoisingModel):
            return self.model.loss(x0, emb, generator=generator, rows=rows)
        return self.model.loss(x0[rows], emb[rows], generator=generator)  # no random draws


def train_step(
    step_loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    lr: float,
    config: TrainConfig,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimiser update at learning rate lr -> (this process's weighted loss, gradient norm
    before clipping), both as tensors on the device (reading them waits for the device)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = batch.x0.device
    generator = torch.Generator(device=device).manual_seed(batch.seed)
    with autocast(device, precision):
        loss = step_loss(batch.x0, batch.emb, generator, batch.rows)
    if batch.weight != 1.0:
        loss = loss * batch.weight
    if device.type == "cpu" and not torch.isfinite(loss):  # on CUDA: checked when logged
        raise FloatingPointError(f"non-finite training loss {float(loss)}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if config.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(step_loss.parameters(), config.grad_clip)
    optimizer.step()
    return loss.detach(), grad_norm


# ---- model --------------------------------------------------------------------------------------
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
        from globeflow.core.families.baselines import BASELINES

        cls = BASELINES[config.family]
        if config.family == "vmf":
            return cls(cond_dim, hidden=config.hidden, depth=config.head_depth)
        if config.family == "vmf-mixture":
            return cls(
                cond_dim,
                num_components=config.num_components,
                hidden=config.hidden,
                depth=config.head_depth,
            )
        return cls(cond_dim)


# ---- validation ---------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    model: GeoModel, val: ValidationRows, config: TrainConfig, precision: str = "fp32"
) -> dict:
    """Mean loss on the first ``val_loss_rows`` validation rows (fixed noise, no condition
    dropout) and the GeoScore / median km of the best guess from a few guided samples on the
    first ``val_geo_rows`` rows."""
    was_training = model.training
    model.eval()
    drop = getattr(model, "cond_drop_prob", None)
    if drop is not None:
        model.cond_drop_prob = 0.0
    device = val.x0.device
    try:
        n = min(config.val_loss_rows, len(val.x0))
        g = torch.Generator(device=device).manual_seed(config.seed + 1)
        total, count = 0.0, 0
        with autocast(device, precision):
            for i in range(0, n, config.batch_size):
                r = slice(i, min(n, i + config.batch_size))
                total += float(model.loss(val.x0[r], val.emb[r], generator=g)) * (r.stop - i)
                count += r.stop - i
        n = min(config.val_geo_rows, len(val.x0))
        g = torch.Generator(device=device).manual_seed(config.seed + 2)
        km = []
        for i in range(0, n, 256):
            r = slice(i, min(n, i + 256))
            samples = model.sample(
                val.emb[r],
                num_samples=config.val_num_samples,
                steps=config.val_sample_steps,
                guidance=config.val_guidance,
                generator=g,
                precision=precision,
            )
            km.append(haversine_km(best_guess(samples).double(), val.latlon[r].double()))
        km = torch.cat(km).cpu()
    finally:
        if drop is not None:
            model.cond_drop_prob = drop
        model.train(was_training)
    return {
        "val_loss": total / max(count, 1),
        "val_geoscore": float(geoscore(km).mean()),
        "val_median_km": float(km.median()),
    }


# ---- the job ------------------------------------------------------------------------------------
def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUME_MUTABLE}


def _append_log(out: Path, message: str) -> None:
    with open(out / LOG_NAME, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


class _LossTally:
    """The training loss since the last validation and since the last log line.

    Each step adds this process's weighted loss to a tensor on the device (no wait for the
    device); :meth:`sync`, called by every process at the same steps, sums it over the
    processes, checks it is finite and moves it into the running means.
    """

    def __init__(self, place: Placement, saved: dict | None = None):
        saved = saved or {}
        self.place = place
        self.loss_sum, self.loss_count = saved.get("loss_sum", 0.0), saved.get("loss_count", 0)
        self._window_sum, self._window_count = 0.0, 0
        self._pending: torch.Tensor | None = None
        self._pending_steps = saved.get("pending_loss_steps", 0)
        if self._pending_steps and place.is_main:  # a stop between two syncs: see unsynced()
            pending = torch.tensor(saved["pending_loss_mean"], dtype=torch.float64)
            self._pending = (pending * place.world_size).to(place.device)
        elif self._pending_steps:
            self._pending = torch.zeros((), dtype=torch.float64, device=place.device)

    def unsynced(self) -> dict:
        """The steps added since the last sync, for a checkpoint between syncs (every process
        calls it): their mean over the processes, restored on rank 0 when resuming, so that a
        one-process run continues with bitwise the same sums."""
        pending = self._pending
        if pending is None:
            pending = torch.zeros((), dtype=torch.float64, device=self.place.device)
        mean = float(self.place.sum(pending)) / self.place.world_size
        return {"pending_loss_mean": mean, "pending_loss_steps": self._pending_steps}

    def add(self, weighted_loss: torch.Tensor) -> None:
        value = weighted_loss.double()
        self._pending = value if self._pending is None else self._pending + value
        self._pending_steps += 1

    def sync(self, step: int) -> None:
        if self._pending is None:
            return
        total = float(self.place.sum(self._pending)) / self.place.world_size
        if not math.isfinite(total):
            raise FloatingPointError(f"non-finite training loss in the steps up to {step}")
        self.loss_sum += total
        self.loss_count += self._pending_steps
        self._window_sum += total
        self._window_count += self._pending_steps
        self._pending, self._pending_steps = None, 0

    def window_mean(self) -> float | None:
        """Mean loss since the previous call (synced steps only)."""
        mean = self._window_sum / self._window_count if self._window_count else None
        self._window_sum, self._window_count = 0.0, 0
        return mean

    def validation_mean(self) -> float | None:
        """Mean loss since the previous call (synced steps only)."""
        mean = self.loss_sum / self.loss_count if self.loss_count else None
        self.loss_sum, self.loss_count = 0.0, 0
        return mean


def _data_fingerprint(
    data: InMemoryRows | StreamedRows, val: ValidationRows | None, config: TrainConfig
) -> str:
    """What the run learns from: training rows, validation rows and prior locations."""
    parts = (
        data.fingerprint(),
        val.fingerprint if val else "-",
        tensor_fingerprint(config.prior_latlon),
    )
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def _in_background(fn: Callable, *args) -> Future:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="globeflow")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def _resume_problem(
    found: Path, config_json: dict, fingerprint: str, out: Path
) -> tuple[dict | None, str | None]:
    """(saved state, None) when the checkpoint can be resumed with this config and data, else
    (None, the reason)."""
    saved_state = json.loads((found / "state.json").read_text())
    saved = saved_state["config"]
    before, now = _comparable(saved), _comparable(config_json)
    if before != now:
        diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        return None, (
            f"{out}: checkpoint was written with a different config ({', '.join(diff)}); "
            "use another output directory or start afresh (--restart, resume=False)"
        )
    old = saved_state.get("data_fingerprint")
    if old is not None and old != fingerprint:
        return None, (
            f"{out}: checkpoint was trained on different data (fingerprint {old}, now "
            f"{fingerprint}): the embedding store, the validation split or the prior locations "
            "changed; use another output directory or start afresh (--restart, resume=False)"
        )
    return saved_state, None


class _Run:
    """One training run as seen by one process: model, optimiser, step and bookkeeping; rank 0
    also holds the EMA and writes every output."""

    def __init__(
        self,
        config: TrainConfig,
        data: InMemoryRows | StreamedRows,
        val: ValidationRows | None,
        out: Path,
        place: Placement,
        runtime: Runtime,
        meta: dict,
    ) -> None:
        self.config, self.data, self.out, self.place, self.runtime = (
            config, data, out, place, runtime,
        )  # fmt: skip
        self.main = place.is_main
        self.model = build_model(config, data.dim).to(place.device)
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if self.main else None
        self.optimizer = make_optimizer(self.model, config)
        self.config_json = json.loads(json.dumps(config.to_dict()))
        # Hashing in-memory rows takes ~2 s per GB: done in a thread (hashlib releases the
        # GIL) while training starts; only a checkpoint or a resume needs the result.
        self._fingerprint = _in_background(_data_fingerprint, data, val, config)
        self.val = val.to(place.device) if self.main and val is not None else None
        self.has_val = val is not None
        self.meta = {**meta, "training": self.config_json}
        if self.main:
            self.meta["data"] = {
                "train": data.stats(),
                "val": val.stats if val is not None else None,
                "prior_points": self.config_json["prior_points"],
            }
        self.step, self.best, self.best_metrics, self.last_metrics = 0, -math.inf, None, None
        self.tally = _LossTally(place)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint.result()

    def say(self, message: str) -> None:
        if self.main:
            _append_log(self.out, message)

    def start(self, resume: bool) -> None:
        """Resume from the checkpoint in the run directory (same config and data, or a clear
        error on every process), or start afresh, removing an earlier run's outputs."""
        out, place = self.out, self.place
        found = place.broadcast(
            find_checkpoint(out / CHECKPOINT_DIR) if self.main and resume else None
        )
        if found is None:
            if self.main:
                (out / METRICS_NAME).unlink(missing_ok=True)
                for name in (CHECKPOINT_DIR, "best", "final"):
                    shutil.rmtree(out / name, ignore_errors=True)
            self.say(f"start {self.config.family}: {json.dumps(self.config_json)}")
            self.say(f"data: {json.dumps(self.meta.get('data'))}")
        else:
            saved, problem = (None, None)
            if self.main:
                saved, problem = _resume_problem(found, self.config_json, self.fingerprint, out)
            problem = place.broadcast(problem)
            if problem:
                raise ValueError(problem)
            state = load_checkpoint(found, self.model, self.ema, self.optimizer)
            self.step, self.best = state["step"], state["best_geoscore"]
            self.best_metrics, self.last_metrics = state["best_metrics"], state["last_metrics"]
            self.tally = _LossTally(place, state)
            if self.main:
                rewrite_metrics(out / METRICS_NAME, self.step)
                self.say(
                    f"resumed from {found} at step {self.step} with {place.world_size} process(es)"
                )
                before = saved["config"]["max_steps"]
                if before != self.config.max_steps:
                    self.say(
                        f"max_steps {before} -> {self.config.max_steps}: the cosine decay changes"
                    )
        if self.optimizer is None:
            self.step = self.config.max_steps  # nothing to learn (uniform baseline)

    def validation(self) -> None:
        """Rank 0: metrics line, log line and, when the GeoScore improves, the ``best`` model."""
        metrics = {
            "step": self.step,
            "train_loss": self.tally.validation_mean(),
            "lr": learning_rate(max(self.step - 1, 0), self.config),
        }
        if self.val is not None:
            metrics.update(validate(self.ema, self.val, self.config, self.runtime.precision))
        self.last_metrics = metrics
        with open(self.out / METRICS_NAME, "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.say("validation " + json.dumps(metrics))
        if self.val is not None and metrics["val_geoscore"] > self.best:
            self.best, self.best_metrics = metrics["val_geoscore"], metrics
            self.save(self.out / "best", metrics)

    def checkpoint(self, **extra) -> None:
        state = {
            **extra,
            "step": self.step,
            "world_size": self.place.world_size,
            "best_geoscore": self.best,
            "best_metrics": self.best_metrics,
            "last_metrics": self.last_metrics,
            "loss_sum": self.tally.loss_sum,
            "loss_count": self.tally.loss_count,
            "config": self.config_json,
            "data_fingerprint": self.fingerprint,
        }
        save_checkpoint(self.out / CHECKPOINT_DIR, self.model, self.ema, self.optimizer, state)

    def save(self, directory: Path, metrics: dict | None) -> Path:
        return save_model(
            self.ema, directory, {**self.meta, "validation": metrics, "step": self.step}
        )

    def train(self, progress: bool) -> TrainResult:
        """Steps up to ``max_steps``, then the final model; every process returns the result."""
        config, place = self.config, self.place
        trainer = _trainer(self.model, place, self.runtime, self.optimizer is not None)
        more = self.step < config.max_steps
        batches = _batch_feed(self.data, self.step, place, self.runtime) if more else iter(())
        bar = _progress_bar(config.max_steps, self.step, progress and self.main)
        rng_devices = [place.device] if place.device.type == "cuda" else []
        # fork_rng: the caller's global RNG state is left as it was.
        with torch.random.fork_rng(devices=rng_devices), StopRequests() as requests:
            stops = StopAgreement(requests, place.distributed)
            try:
                while self.step < config.max_steps:
                    self.one_step(trainer, next(batches), bar)
                    signum = stops.check()
                    if signum and self.step < config.max_steps:
                        stops.close()
                        self.stop(signum)
                stops.close()
                final_dir = self.out / "final"
                if self.main:
                    if self.last_metrics is None or self.last_metrics["step"] != self.step:
                        self.validation()  # nothing to train, or resumed after the last step
                    self.save(final_dir, self.last_metrics)
                    self.say(f"done at step {self.step}; final model in {final_dir}")
            finally:
                if isinstance(batches, Prefetcher):
                    batches.close()
                bar.close()
        place.barrier()  # the other processes return once rank 0 has written the final model
        best = self.out / "best"
        best_dir = best if self.has_val and best.is_dir() else None
        metrics = self.last_metrics or {}
        return TrainResult(self.out, final_dir, best_dir, self.step, metrics, self.best_metrics)

    def stop(self, signum: int) -> None:
        """Every process, on a stop signal at a step boundary: checkpoint, then raise
        :class:`TrainingStopped`."""
        unsynced = self.tally.unsynced()
        if self.main:
            if self.step % self.config.checkpoint_every:
                self.checkpoint(**unsynced)
            self.say(f"stopped by signal {signum} at step {self.step}")
        self.place.barrier()  # no process leaves before the checkpoint is written
        raise TrainingStopped(signum, self.step, self.out / CHECKPOINT_DIR)

    def one_step(self, trainer: nn.Module, batch: Batch, bar) -> None:
        """One optimiser update, the EMA, and the bookkeeping due after it."""
        config = self.config
        lr = learning_rate(self.step, config)
        if config.dropout > 0:  # the global RNG feeds dropout only
            torch.manual_seed(derived_seed(config.seed, "dropout", self.step, self.place.rank))
        weighted, grad_norm = train_step(
            trainer, self.optimizer, batch, lr, config, self.runtime.precision
        )
        if self.ema is not None:
            update_ema(self.ema, self.model, ema_decay_at(self.step, config.ema_decay))
        self.step += 1
        self.tally.add(weighted)
        at_log = self.step % config.log_every == 0
        at_val = self.step % config.val_every == 0 or self.step == config.max_steps
        at_ckpt = self.step % config.checkpoint_every == 0 or self.step == config.max_steps
        if at_log or at_val or at_ckpt:
            self.tally.sync(self.step)  # every process, at the same steps
        if not self.main:
            return
        if at_log:
            norm = None if grad_norm is None else float(grad_norm)
            shown = self.tally.window_mean()
            self.say(f"step {self.step} loss {shown:.5f} lr {lr:.3e} grad_norm {norm}")
            bar.set_postfix({"loss": f"{shown:.4f}", "lr": f"{lr:.2e}"}, refresh=False)
        if at_val:
            self.validation()
        if at_ckpt:
            self.checkpoint()
        bar.update(1)


def _trainer(model: GeoModel, place: Placement, runtime: Runtime, trainable: bool) -> nn.Module:
    """The module each step calls: the loss (compiled network if asked), under DDP when several
    processes train."""
    if runtime.compile and isinstance(model, DenoisingModel):
        model.network.compile()  # in place: parameter names (and checkpoints) are unchanged
    step_loss = StepLoss(model)
    if not (place.distributed and trainable):
        return step_loss
    from torch.nn.parallel import DistributedDataParallel

    ids = [place.device.index] if place.device.type == "cuda" else None
    return DistributedDataParallel(step_loss, device_ids=ids)


def _batch_feed(data, start_step: int, place: Placement, runtime: Runtime):
    """Batches from ``start_step`` on, on the device: prepared in a background thread when
    streaming or on CUDA (unless ``runtime.prefetch`` says otherwise), else inline."""
    batches = data.batches(start_step, place)
    prefetch = runtime.prefetch
    if prefetch is None:
        prefetch = isinstance(data, StreamedRows) or place.device.type == "cuda"
    if prefetch:
        return Prefetcher(batches, place.device)
    if place.device.type == "cpu":
        return batches
    return (to_device(b, place.device) for b in batches)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        dynamic_ncols=True,
        desc="train",
        unit="step",
        file=sys.stderr,
    )


def train(
    config: TrainConfig,
    train_emb: torch.Tensor,
    train_latlon: torch.Tensor,
    val_emb: torch.Tensor | None,
    val_latlon: torch.Tensor | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    resume: bool = True,
    encoder: str | None = None,
    metadata: dict | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train ``config.family`` on embeddings (N, D) with coordinates (N, 2) in degrees.

    With ``resume`` and a checkpoint in ``out_dir``, training continues exactly where it
    stopped (the config and data must match, except max_steps and the bookkeeping intervals).
    Without a validation set (``val_emb`` None or empty) no ``best/`` model is kept. Under
    ``torchrun`` every process calls this with the same arguments.
    """
    runtime = runtime or Runtime()
    with locked_run_directory(out_dir, runtime.device) as (out, place):
        prior_x0 = to_unit(config.prior_latlon) if config.prior_rows else None
        data = InMemoryRows(
            train_emb, train_latlon, config.batch_size, prior_x0, config.prior_rows, config.seed
        )
        val = None
        if val_emb is not None and val_latlon is not None and len(val_emb) > 0:
            val = ValidationRows.select(val_emb, val_latlon, _validation_rows(config), config.seed)
        run = _Run(config, data, val, out, place, runtime, {"encoder": encoder, **(metadata or {})})
        run.start(resume)
        return run.train(progress)


def _validation_rows(config: TrainConfig) -> int:
    return max(config.val_loss_rows, config.val_geo_rows)


# ---- from an embedding store ------------------------------------------------------------------
def _located(table, name: str, say: Callable[[str], None]):
    """Rows with usable coordinates: (embeddings, lat/lon, authors); the others are dropped
    with their reasons said; clear errors for unusable data."""
    keep = torch.from_numpy(valid_latlon_mask(table.latlon.numpy()))
    dropped = int((~keep).sum())
    reasons = counts_text(invalid_latlon_counts(table.latlon.numpy())) if dropped else ""
    if dropped == len(keep):
        raise ValueError(f"{name}: none of its {len(keep)} rows has usable coordinates ({reasons})")
    if dropped:
        say(f"{name}: dropped {dropped} of {len(keep)} rows ({reasons})")
        idx = keep.nonzero().flatten()
        emb, latlon, authors = (
            table.embeddings[idx],
            table.latlon[idx],
            [table.authors[i] for i in idx.tolist()],
        )
    else:  # the table's own rows: no copy of the embeddings
        idx, emb, latlon, authors = None, table.embeddings, table.latlon, table.authors
    bad = nonfinite_rows(emb)
    if len(bad):
        first = table.ids[int(bad[0]) if idx is None else int(idx[bad[0]])]
        raise ValueError(
            f"{name}: {len(bad)} row(s) have non-finite embeddings (first: {first!r}); "
            "re-embed those photos or drop them"
        )
    return emb, latlon, authors


def _parse_val_split(val_split: str | float, val_fraction: float) -> tuple[str, float | None]:
    """('author', fraction), ('fraction', fraction) or ('store', None); a clear error else."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction!r}")
    split = str(val_split)
    if split == "author":
        return "author", float(val_fraction)
    try:
        fraction = float(split)
    except ValueError:
        if not Path(split).exists():
            raise ValueError(
                f"--val-split {split!r}: not 'author', a fraction in (0, 1), or an existing "
                "embedding store"
            ) from None
        return "store", None
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-split must be a fraction in (0, 1), got {split}")
    return "fraction", fraction


def _in_memory_inputs(store: Path, split: tuple, config: TrainConfig, say):
    """(training rows, validation rows, encoder name, description), the store in memory."""
    kind, fraction, val_store = split
    table = embedding_store.read_embeddings(store)
    emb, latlon, authors = _located(table, str(store), say)
    encoder, dim = table.encoder_name, table.dim
    del table  # its embeddings live on in ``emb`` only where no row was dropped
    # The training rows are a function of the store, the split and the seed (in the config):
    # fingerprinting those costs milliseconds, hashing the rows seconds per GB.
    source = f"{embedding_store.store_fingerprint(store)}:{kind}:{fraction}"
    if kind == "store":
        val_table = embedding_store.read_embeddings(val_store)
        if val_table.dim != dim:
            raise ValueError(f"{val_store}: embedding dim {val_table.dim} != {dim}")
        if val_table.encoder_name != encoder:
            say(f"warning: validation encoder {val_table.encoder_name} != {encoder}")
        val_emb, val_latlon, _ = _located(val_table, str(val_store), say)
        how = f"validation store {val_store}"
    else:
        grouped = kind == "author" and len({a for a in authors if a}) >= 2
        tr, va = split_rows(authors if grouped else None, len(emb), fraction, config.seed)
        val_emb, val_latlon = emb[va], latlon[va]
        emb, latlon = emb[tr], latlon[tr]
        how = f"{'author-grouped' if grouped else 'random'} split, fraction {fraction}"
    if len(emb) == 0:
        raise ValueError(f"{store}: no training rows left after the validation split")
    prior_x0 = to_unit(config.prior_latlon) if config.prior_rows else None
    data = InMemoryRows(
        emb, latlon, config.batch_size, prior_x0, config.prior_rows, config.seed, source
    )
    val = None
    if len(val_emb):
        val = ValidationRows.select(val_emb, val_latlon, _validation_rows(config), config.seed)
    return data, val, encoder, how


def _streamed_inputs(store: Path, split: tuple, config: TrainConfig, buffer_rows: int, say):
    """(training rows streamed from the store, validation rows in memory, encoder name,
    description)."""
    kind, fraction, val_store = split
    groups, encoder, dim = list_row_groups(store)
    needed = _validation_rows(config)
    if kind == "store":
        val_table = embedding_store.read_embeddings(val_store)
        if val_table.dim != dim:
            raise ValueError(f"{val_store}: embedding dim {val_table.dim} != {dim}")
        val_emb, val_latlon, _ = _located(val_table, str(val_store), say)
        how = f"validation store {val_store}"
    else:
        total = sum(g.rows for g in groups)
        groups, held = hold_out(groups, min(needed, math.ceil(fraction * total)), config.seed)
        val_emb, val_latlon = read_group_rows(held, dim)
        if any(g.only is not None for g in held):
            how = (
                f"{len(val_emb)} rows with coordinates held out inside the store's only row "
                "group (too few row groups to hold whole ones out; not split by author)"
            )
        else:
            how = (
                f"{len(held)} held-out row groups ({len(val_emb)} rows with coordinates; a "
                "streamed store is split by row group, not by author)"
            )
    prior_x0 = to_unit(config.prior_latlon) if config.prior_rows else None
    data = StreamedRows(
        groups,
        dim,
        config.batch_size,
        prior_x0,
        config.prior_rows,
        config.seed,
        buffer_rows,
        embedding_store.store_fingerprint(store),
    )
    val = None
    if len(val_emb):
        val = ValidationRows.select(val_emb, val_latlon, needed, config.seed)
    return data, val, encoder, how


def _on_main(place: Placement, work: Callable[[], object]):
    """Run ``work`` on rank 0 and hand its result (or its error) to every process."""
    outcome = None
    if place.is_main:
        try:
            outcome = ("ok", work())
        except (ValueError, OSError) as exc:
            outcome = ("error", str(exc))
    outcome = place.broadcast(outcome)
    if outcome[0] == "error":
        raise ValueError(outcome[1])
    return outcome[1]


def train_from_embeddings(
    embeddings_path: str | os.PathLike,
    family: str,
    out_dir: str | os.PathLike,
    val_split: str | float = "author",
    val_fraction: float = 0.15,
    prior_locations: str | os.PathLike | None = None,
    prior_fraction: float = 0.25,
    progress: bool = True,
    resume: bool = True,
    exclude_authors: str | os.PathLike | None = None,
    stream: bool = False,
    shuffle_buffer_rows: int = 65536,
    runtime: Runtime | None = None,
    **overrides,
) -> TrainResult:
    """The ``globeflow train`` job: read an embedding store, split it, train (under ``torchrun``
    on every process).

    ``val_split``: "author" (author-grouped split of ``val_fraction`` of the authors, or a random
    split when the store has no authors), a fraction (random split), or the path of a second
    embedding store used as the validation set. ``prior_locations``: CSV of extra unlabelled
    locations mixed into each batch (``prior_fraction``) under the null condition.
    ``exclude_authors``: text file of authors whose rows are left out (a filtered copy of the
    store is kept in the run directory and rebuilt when its inputs change). ``stream``: read the
    store row group by row group through a shuffle buffer of ``shuffle_buffer_rows`` rows instead
    of loading it (stores larger than memory; validation is then a set of held-out row groups
    unless ``val_split`` names a store). ``overrides``: any :class:`TrainConfig` field.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"family", "prior_latlon"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    split = (*_parse_val_split(val_split, val_fraction), Path(str(val_split)))
    if shuffle_buffer_rows < 1:
        raise ValueError(f"--shuffle-buffer-rows must be >= 1, got {shuffle_buffer_rows}")
    runtime = runtime or Runtime()
    with locked_run_directory(out_dir, runtime.device) as (out, place):

        def say(message: str) -> None:
            if place.is_main:
                print(message, file=sys.stderr)
                _append_log(out, message)

        prior = None
        if prior_locations is not None:
            prior = read_prior_locations(prior_locations)
            say(f"prior: {len(prior)} locations from {prior_locations}, fraction {prior_fraction}")
        config = TrainConfig(
            family=family,
            prior_latlon=prior,
            prior_fraction=prior_fraction if prior is not None else 0.0,
            **overrides,
        )
        store = Path(embeddings_path)
        if exclude_authors is not None:
            copy_path = out / "train-embeddings.parquet"
            store = _on_main(place, lambda: without_authors(store, exclude_authors, copy_path, say))
        if stream:
            data, val, encoder, how = _streamed_inputs(
                store, split, config, shuffle_buffer_rows, say
            )
        else:
            data, val, encoder, how = _in_memory_inputs(store, split, config, say)
        if val is None:  # never train without a validation the user did not ask to skip
            raise ValueError(f"{store}: no validation rows with coordinates ({how})")
        rows = data.stats()["rows"] if place.is_main else 0
        if place.is_main and data.stats().get("dropped"):  # streamed: read past, not dropped
            say(f"{store}: rows left out: {counts_text(data.stats()['dropped'])}")
        say(f"train {rows} rows, validation {len(val.x0) if val else 0} rows used ({how})")
        meta = {"encoder": encoder, "embeddings": str(embeddings_path), "validation_split": how}
        run = _Run(config, data, val, out, place, runtime, meta)
        run.start(resume)
        return run.train(progress)
