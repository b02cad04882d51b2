"""One optimiser update of the ``train`` job and the running training loss.

A step computes the family's loss on this process's rows of a batch (DistributedDataParallel
averages the gradients of several processes), clips the gradients and steps the optimiser.
:class:`LossTally` keeps the losses on the device and syncs them only at log, validation and
checkpoint steps, so that a step never waits for the device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from globeflow.core.families import DenoisingModel, GeoModel
from globeflow.jobs.distributed import Placement, autocast
from globeflow.jobs.train_config import Runtime, TrainConfig
from globeflow.jobs.train_data import Batch

__all__ = ["LossTally", "StepLoss", "step_module", "train_step"]


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


def step_module(model: GeoModel, place: Placement, runtime: Runtime, trainable: bool) -> nn.Module:
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


class LossTally:
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
