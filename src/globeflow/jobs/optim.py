"""Optimisation pieces of the ``train`` job: the learning-rate schedule (warmup, cosine decay),
AdamW or LAMB with weight decay on matrices only, and the EMA of the weights that is saved."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from globeflow.jobs.train_config import TrainConfig

__all__ = ["Lamb", "ema_decay_at", "learning_rate", "make_optimizer", "update_ema"]


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
