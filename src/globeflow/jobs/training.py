"""The ``train`` job: optimiser, learning-rate schedule, EMA, validation and exact resume.

Training runs on precomputed embeddings held in memory. One step is: pick a batch (rows of an
endless stream of per-epoch permutations, optionally topped up with unlabelled prior locations
under the null condition), compute the family's loss, clip, step AdamW or LAMB, update the EMA.

Every ``checkpoint_every`` steps the whole training state (weights, EMA, optimiser moments,
RNG states, step counter and validation bookkeeping) is written atomically to
``out_dir/checkpoint/`` as safetensors + JSON, so a run killed at any point and started again
reaches bitwise the same final weights as an uninterrupted run.

Outputs in ``out_dir``: ``best/`` (EMA model with the best validation GeoScore), ``final/`` (EMA
model at the last step), ``metrics.jsonl`` (one line per validation), ``train_log.txt``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from globeflow.answers.decode import best_guess
from globeflow.core.checkpoints import save_model
from globeflow.core.families import DENOISING_FAMILIES, GeoModel
from globeflow.core.network import Denoiser
from globeflow.core.schedules import schedule_from_config
from globeflow.core.sphere import haversine_km, latlon_to_unit

FAMILIES = ("rfm", "flow", "diffusion", "vmf", "vmf-mixture", "uniform")
GEOSCORE_SCALE_KM = 1492.7

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
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
        if not 0.0 <= self.prior_fraction < 1.0:
            raise ValueError(f"prior_fraction must be in [0, 1), got {self.prior_fraction}")
        if self.batch_size < 1 or self.max_steps < 0:
            raise ValueError("batch_size must be >= 1 and max_steps >= 0")
        for name in ("val_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
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

        text = f"{self.steps} steps; final model {self.final_dir} ({fmt(self.final_metrics)})"
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


def train_step(
    model: GeoModel,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    emb: torch.Tensor,
    generator: torch.Generator,
    lr: float,
    config: TrainConfig,
) -> tuple[float, float | None]:
    """One optimiser update at learning rate lr -> (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model.loss(x0, emb, generator=generator)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {float(loss)}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if config.grad_clip > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    optimizer.step()
    return float(loss.detach()), grad_norm


# ---- data -------------------------------------------------------------------------------------
class BatchOrder:
    """Which training rows make up each batch.

    The rows form an endless stream of per-epoch permutations (epoch e shuffled with a generator
    seeded by (seed, e)); batch s is the slice [s * n, (s + 1) * n) of that stream. The data
    order is therefore a pure function of the step, which is what makes resume exact.
    """

    def __init__(self, num_rows: int, rows_per_batch: int, seed: int):
        if num_rows < 1:
            raise ValueError("no training rows")
        self.num_rows, self.rows_per_batch, self.seed = num_rows, rows_per_batch, seed
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_rows, generator=g))
        return self._cached[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset within the epoch) where batch ``step`` starts."""
        return divmod(step * self.rows_per_batch, self.num_rows)

    def indices(self, step: int) -> torch.Tensor:
        start, stop = step * self.rows_per_batch, (step + 1) * self.rows_per_batch
        pieces = []
        while start < stop:
            epoch, offset = divmod(start, self.num_rows)
            take = min(stop - start, self.num_rows - offset)
            pieces.append(self.permutation(epoch)[offset : offset + take])
            start += take
        return torch.cat(pieces)


def assemble_batch(
    x0: torch.Tensor,
    emb: torch.Tensor,
    rows: torch.Tensor,
    prior_x0: torch.Tensor | None,
    prior_rows: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows ``rows`` plus ``prior_rows`` prior locations drawn with replacement under
    the null (all-zero) embedding: -> (x0 (B, 3), emb (B, D))."""
    bx, be = x0[rows], emb[rows]
    if prior_rows == 0 or prior_x0 is None:
        return bx, be
    pick = torch.randint(len(prior_x0), (prior_rows,), generator=generator)
    null = torch.zeros(prior_rows, emb.shape[1], dtype=emb.dtype)
    return torch.cat([bx, prior_x0[pick]]), torch.cat([be, null])


def _to_unit(latlon: torch.Tensor) -> torch.Tensor:
    return latlon_to_unit(torch.as_tensor(latlon, dtype=torch.float64)).to(torch.float32)


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
    model: GeoModel,
    val_x0: torch.Tensor,
    val_emb: torch.Tensor,
    val_latlon: torch.Tensor,
    config: TrainConfig,
) -> dict:
    """Mean loss on a fixed subset of the validation set (fixed noise, no condition dropout) and
    the GeoScore / median km of the best guess from a few guided samples on a fixed subset."""
    was_training = model.training
    model.eval()
    drop = getattr(model, "cond_drop_prob", None)
    if drop is not None:
        model.cond_drop_prob = 0.0
    try:
        fixed = torch.randperm(len(val_x0), generator=torch.Generator().manual_seed(config.seed))
        rows = fixed[: config.val_loss_rows]
        g = torch.Generator().manual_seed(config.seed + 1)
        total, count = 0.0, 0
        for i in range(0, len(rows), config.batch_size):
            r = rows[i : i + config.batch_size]
            total += float(model.loss(val_x0[r], val_emb[r], generator=g)) * len(r)
            count += len(r)
        rows = fixed[: config.val_geo_rows]
        g = torch.Generator().manual_seed(config.seed + 2)
        km = []
        for i in range(0, len(rows), 256):
            r = rows[i : i + 256]
            samples = model.sample(
                val_emb[r],
                num_samples=config.val_num_samples,
                steps=config.val_sample_steps,
                guidance=config.val_guidance,
                generator=g,
            )
            km.append(haversine_km(best_guess(samples).double(), val_latlon[r].double()))
        km = torch.cat(km)
    finally:
        if drop is not None:
            model.cond_drop_prob = drop
        model.train(was_training)
    return {
        "val_loss": total / max(count, 1),
        "val_geoscore": float((5000.0 * torch.exp(-km / GEOSCORE_SCALE_KM)).mean()),
        "val_median_km": float(km.median()),
    }


# ---- checkpoints --------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    state: dict,
) -> None:
    """Write the full training state to ``directory`` atomically.

    Written to a temporary sibling first; the old checkpoint is moved aside and removed only
    after the new one is in place, so a kill at any moment leaves one complete checkpoint.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_json = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, slots in sd["state"].items():
            for name, value in slots.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        optim_json = {
            "param_groups": sd["param_groups"],
            "slots": {str(i): sorted(s) for i, s in sd["state"].items()},
        }
    tensors["rng.batch"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_synced(tmp / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    payload = json.dumps({**state, "optimizer": optim_json}, indent=1)
    _write_synced(tmp / STATE_JSON, lambda p: p.write_text(payload + "\n"))
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint in ``directory`` (or its ``.old`` sibling after a kill mid-swap)."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE_JSON).is_file() and (candidate / STATE_TENSORS).is_file():
            return candidate
    return None


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns the JSON state, plus the global
    torch RNG state under ``"torch_rng"`` (the caller decides where to install it)."""
    state = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))

    def section(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(section("model."))
    ema.load_state_dict(section("ema."))
    optim_json = state.pop("optimizer")
    if optimizer is not None:
        slots = {
            int(i): {name: tensors[f"optim.{i}.{name}"] for name in names}
            for i, names in optim_json["slots"].items()
        }
        groups = optim_json["param_groups"]
        for group in groups:
            group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
    generator.set_state(tensors["rng.batch"])
    state["torch_rng"] = tensors["rng.torch"]
    return state


# ---- the job ------------------------------------------------------------------------------------
def _data_stats(latlon: torch.Tensor, emb: torch.Tensor) -> dict:
    return {
        "rows": int(len(latlon)),
        "embedding_dim": int(emb.shape[1]),
        "embedding_mean_norm": float(emb.norm(dim=1).mean()) if len(emb) else 0.0,
        "lat_range": [float(latlon[:, 0].min()), float(latlon[:, 0].max())] if len(latlon) else [],
        "lon_range": [float(latlon[:, 1].min()), float(latlon[:, 1].max())] if len(latlon) else [],
    }


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUME_MUTABLE}


def _rewrite_metrics(path: Path, up_to_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= up_to_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by the kill
    path.write_text("".join(k + "\n" for k in keep))


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
) -> TrainResult:
    """Train ``config.family`` on embeddings (N, D) with coordinates (N, 2) in degrees.

    With ``resume`` and a checkpoint in ``out_dir``, training continues exactly where it
    stopped (the config must match, except max_steps and the bookkeeping intervals). Without a
    validation set (``val_emb`` None or empty) no ``best/`` model is kept.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_emb = torch.as_tensor(train_emb, dtype=torch.float32)
    train_latlon = torch.as_tensor(train_latlon, dtype=torch.float64)
    if train_emb.dim() != 2 or train_latlon.shape != (len(train_emb), 2):
        raise ValueError("train_emb must be (N, D) and train_latlon (N, 2)")
    if not torch.isfinite(train_latlon).all():
        raise ValueError("train_latlon holds non-finite coordinates; drop those rows first")
    has_val = val_emb is not None and val_latlon is not None and len(val_emb) > 0
    if has_val:
        val_emb = torch.as_tensor(val_emb, dtype=torch.float32)
        val_latlon = torch.as_tensor(val_latlon, dtype=torch.float64)
        val_x0 = _to_unit(val_latlon)
    train_x0 = _to_unit(train_latlon)
    prior_x0 = _to_unit(config.prior_latlon) if config.prior_rows else None
    cond_dim = train_emb.shape[1]

    model = build_model(config, cond_dim)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    order = BatchOrder(len(train_x0), config.batch_size - config.prior_rows, config.seed)

    log_file = open(out / LOG_NAME, "a", buffering=1)  # noqa: SIM115 - closed in finally

    def log(message: str) -> None:
        log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    config_json = json.loads(json.dumps(config.to_dict()))
    base_meta = {
        "encoder": encoder,
        "training": config_json,
        "data": {
            "train": _data_stats(train_latlon, train_emb),
            "val": _data_stats(val_latlon, val_emb) if has_val else None,
            "prior_points": config_json["prior_points"],
        },
        **(metadata or {}),
    }
    step, best, best_metrics, last_metrics = 0, -math.inf, None, None
    # The global RNG only feeds network dropout; seeded here so that fresh runs are reproducible.
    torch_rng = torch.Generator().manual_seed(config.seed + 3).get_state()
    loss_sum, loss_count = 0.0, 0
    ckpt_dir = out / CHECKPOINT_DIR
    found = find_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        saved = json.loads((found / STATE_JSON).read_text())["config"]
        if _comparable(saved) != _comparable(config_json):
            diff = sorted(
                k
                for k in set(saved) | set(config_json)
                if k not in _RESUME_MUTABLE and saved.get(k) != config_json.get(k)
            )
            raise ValueError(
                f"{out}: checkpoint was written with a different config ({', '.join(diff)}); "
                "use another output directory or resume=False"
            )
        state = load_checkpoint(found, model, ema, optimizer, generator)
        step, best = state["step"], state["best_geoscore"]
        best_metrics, last_metrics = state["best_metrics"], state["last_metrics"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        torch_rng = state["torch_rng"]
        _rewrite_metrics(out / METRICS_NAME, step)
        log(f"resumed from {found} at step {step}")
        if saved["max_steps"] != config.max_steps:
            log(f"max_steps {saved['max_steps']} -> {config.max_steps}: the cosine decay changes")
    else:
        # A fresh start must not mix with the outputs of an earlier (or never checkpointed) run.
        (out / METRICS_NAME).unlink(missing_ok=True)
        for name in (CHECKPOINT_DIR, "best", "final"):
            shutil.rmtree(out / name, ignore_errors=True)
        log(f"start {config.family}: {json.dumps(config_json)}")
        log(f"data: {json.dumps(base_meta['data'])}")
    if optimizer is None:
        step = config.max_steps  # nothing to learn (uniform baseline)

    def run_validation() -> None:
        nonlocal best, best_metrics, last_metrics, loss_sum, loss_count
        metrics = {
            "step": step,
            "train_loss": loss_sum / loss_count if loss_count else None,
            "lr": learning_rate(max(step - 1, 0), config),
        }
        if has_val:
            metrics.update(validate(ema, val_x0, val_emb, val_latlon, config))
        loss_sum, loss_count = 0.0, 0
        last_metrics = metrics
        with open(out / METRICS_NAME, "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        log("validation " + json.dumps(metrics))
        if has_val and metrics["val_geoscore"] > best:
            best, best_metrics = metrics["val_geoscore"], metrics
            save_model(ema, out / "best", {**base_meta, "validation": metrics, "step": step})

    def checkpoint() -> None:
        state = {
            "step": step,
            "epoch_position": list(order.position(step)),
            "batch_seed": config.seed,
            "best_geoscore": best,
            "best_metrics": best_metrics,
            "last_metrics": last_metrics,
            "loss_sum": loss_sum,
            "loss_count": loss_count,
            "config": config_json,
        }
        save_checkpoint(ckpt_dir, model, ema, optimizer, generator, state)

    bar = _progress_bar(config.max_steps, step, progress)
    shown_loss = None
    # fork_rng: the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(torch_rng)
        try:
            while step < config.max_steps:
                lr = learning_rate(step, config)
                x0, emb = assemble_batch(
                    train_x0, train_emb, order.indices(step), prior_x0, config.prior_rows, generator
                )
                value, grad_norm = train_step(model, optimizer, x0, emb, generator, lr, config)
                update_ema(ema, model, ema_decay_at(step, config.ema_decay))
                step += 1
                loss_sum, loss_count = loss_sum + value, loss_count + 1
                shown_loss = value if shown_loss is None else 0.95 * shown_loss + 0.05 * value

                if step % config.log_every == 0:
                    log(f"step {step} loss {value:.5f} lr {lr:.3e} grad_norm {grad_norm}")
                if step % config.val_every == 0 or step == config.max_steps:
                    run_validation()
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    checkpoint()
                bar.update(1)
                if step % 10 == 0 or step == config.max_steps:
                    postfix = {"loss": f"{shown_loss:.4f}", "lr": f"{lr:.2e}"}
                    if last_metrics and last_metrics.get("val_geoscore") is not None:
                        postfix["val_geoscore"] = f"{last_metrics['val_geoscore']:.0f}"
                    bar.set_postfix(postfix, refresh=False)
            if last_metrics is None or last_metrics["step"] != step:
                run_validation()  # a run with nothing to train, or resumed after its last step
            final_dir = save_model(
                ema, out / "final", {**base_meta, "validation": last_metrics, "step": step}
            )
            log(f"done at step {step}; final model in {final_dir}")
        finally:
            bar.close()
            log_file.close()
    best_dir = out / "best" if has_val and (out / "best").is_dir() else None
    return TrainResult(out, final_dir, best_dir, step, last_metrics or {}, best_metrics)


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


# ---- from an embedding store ------------------------------------------------------------------
def split_rows(
    authors: list[str] | None, num_rows: int, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, val rows). Grouped by author when authors are known (no author on both
    sides, so the validation score is not inflated by near-duplicate photos of one
    photographer); rows without an author are their own group. Else a plain random split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    named = authors is not None and len({a for a in authors if a}) >= 2
    if not named:
        perm = torch.randperm(num_rows, generator=g)
        n_val = max(1, int(round(fraction * num_rows))) if num_rows > 1 else 0
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    keys = [a if a else f"\0row{i}" for i, a in enumerate(authors)]
    groups = sorted(set(keys))
    perm = torch.randperm(len(groups), generator=g).tolist()
    n_val = max(1, int(round(fraction * len(groups))))
    val_groups = {groups[i] for i in perm[:n_val]}
    is_val = torch.tensor([k in val_groups for k in keys], dtype=torch.bool)
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def read_prior_locations(path: str | os.PathLike) -> torch.Tensor:
    """(M, 2) degrees from a CSV with LAT/LON (or lat/lon, latitude/longitude) columns;
    rows with missing or out-of-range coordinates are skipped."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = {n.strip().lower(): n for n in reader.fieldnames or []}
        lat_col = next((names[n] for n in ("lat", "latitude") if n in names), None)
        lon_col = next((names[n] for n in ("lon", "lng", "long", "longitude") if n in names), None)
        if lat_col is None or lon_col is None:
            raise ValueError(f"{path}: need LAT and LON columns, found {reader.fieldnames}")
        rows = []
        for row in reader:
            try:
                lat, lon = float(row[lat_col]), float(row[lon_col])
            except (TypeError, ValueError):
                continue
            if math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180:
                rows.append((lat, lon))
    if not rows:
        raise ValueError(f"{path}: no valid coordinates")
    return torch.tensor(rows, dtype=torch.float64)


def _located(table, name: str, say: Callable[[str], None]):
    keep = torch.isfinite(table.latlon).all(dim=1)
    dropped = int((~keep).sum())
    if dropped:
        say(f"{name}: dropped {dropped} of {len(keep)} rows without coordinates")
    idx = keep.nonzero().flatten()
    return table.embeddings[idx], table.latlon[idx], [table.authors[i] for i in idx.tolist()]


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
    **overrides,
) -> TrainResult:
    """The ``globeflow train`` job: read an embedding store, split it, train.

    ``val_split``: "author" (author-grouped split of ``val_fraction`` of the authors, or a random
    split when the store has no authors), a fraction (random split), or the path of a second
    embedding store used as the validation set. ``prior_locations``: CSV of extra unlabelled
    locations mixed into each batch (``prior_fraction``) under the null condition.
    ``overrides``: any :class:`TrainConfig` field.
    """
    from globeflow.data.embedding_store import read_embeddings

    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"family", "prior_latlon"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(message, file=sys.stderr)
        with open(out / LOG_NAME, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    table = read_embeddings(embeddings_path)
    emb, latlon, authors = _located(table, str(embeddings_path), say)
    seed = overrides.get("seed", 0)
    split = str(val_split)
    if split != "author" and not _is_float(split):
        val_table = read_embeddings(split)
        if val_table.dim != table.dim:
            raise ValueError(f"{split}: embedding dim {val_table.dim} != {table.dim}")
        if val_table.encoder_name != table.encoder_name:
            say(f"warning: validation encoder {val_table.encoder_name} != {table.encoder_name}")
        val_emb, val_latlon, _ = _located(val_table, split, say)
        train_emb, train_latlon = emb, latlon
        how = f"validation store {split}"
    else:
        fraction = val_fraction if split == "author" else float(split)
        grouped = split == "author" and len({a for a in authors if a}) >= 2
        tr, va = split_rows(authors if grouped else None, len(emb), fraction, seed)
        train_emb, train_latlon = emb[tr], latlon[tr]
        val_emb, val_latlon = emb[va], latlon[va]
        how = f"{'author-grouped' if grouped else 'random'} split, fraction {fraction}"
    say(f"train {len(train_emb)} rows, validation {len(val_emb)} rows ({how})")

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
    return train(
        config,
        train_emb,
        train_latlon,
        val_emb,
        val_latlon,
        out,
        progress=progress,
        resume=resume,
        encoder=table.encoder_name,
        metadata={"embeddings": str(embeddings_path), "validation_split": how},
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
