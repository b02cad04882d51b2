"""The train job's optimisation pieces: learning-rate schedule, LAMB, EMA."""

from __future__ import annotations

import pytest
import torch

from globeflow.jobs.optim import Lamb, ema_decay_at, learning_rate, update_ema
from globeflow.jobs.train_config import TrainConfig


def test_learning_rate_warmup_and_cosine():
    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert [learning_rate(s, c) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert learning_rate(9, c) == pytest.approx(1.0)
    assert learning_rate(10, c) == pytest.approx(1.0)
    assert learning_rate(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert learning_rate(110, c) == pytest.approx(0.1)
    assert learning_rate(500, c) == pytest.approx(0.1)  # floor after max_steps
    lrs = [learning_rate(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_lamb_decreases_a_quadratic_and_uses_the_trust_ratio():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 5, generator=g), torch.randn(20, generator=g)
    w = torch.nn.Parameter(torch.randn(5, generator=g))
    opt = Lamb([w], lr=0.05, weight_decay=0.0)

    def loss_fn() -> torch.Tensor:
        return ((a @ w - b) ** 2).mean()

    start = float(loss_fn().detach())
    w0 = w.detach().clone()
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    # First Adam step is ~sign(grad) per coordinate; the trust ratio scales it to lr * ||w||.
    assert float((w.detach() - w0).norm()) == pytest.approx(0.05 * float(w0.norm()), rel=1e-4)
    for _ in range(200):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    best = float(((a @ torch.linalg.lstsq(a, b[:, None]).solution[:, 0] - b) ** 2).mean())
    assert float(loss_fn().detach()) - best < 0.05 * (start - best)


def test_ema_update_math():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, p, before in zip(ema.parameters(), model.parameters(), e0):
        torch.testing.assert_close(e, 0.9 * before + 0.1 * p.detach())
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(10**7, 0.999) == 0.999
