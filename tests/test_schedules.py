import json

import pytest
import torch

from globeflow.core.schedules import (
    CosineSchedule,
    LinearSchedule,
    SigmoidSchedule,
    schedule_from_config,
    time_grid,
)

SCHEDULES = [
    SigmoidSchedule(),
    SigmoidSchedule(alpha=-2.0, beta=5.0),
    LinearSchedule(),
    CosineSchedule(),
]


def test_sigmoid_reproduces_published_vectors(plonk_compat):
    vec = json.loads((plonk_compat / "tiny" / "vectors.json").read_text())
    ref = vec["sigmoid_scheduler(start=-7,end=3,tau=1)"]
    s = SigmoidSchedule()
    t = torch.tensor(ref["t"])
    assert torch.allclose(s.signal_level(t), torch.tensor(ref["gamma"]), atol=1e-6)
    assert torch.allclose(s.signal_level_derivative(t), torch.tensor(ref["dgamma_dt"]), atol=1e-5)


def test_sigmoid_is_paper_kappa_with_time_reversed():
    # Paper: kappa(t) = (s(a) - s(a + t (b - a))) / (s(a) - s(b)), a = -3, b = 7.
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    a, b = -3.0, 7.0
    sa, sb = torch.sigmoid(torch.tensor(a)), torch.sigmoid(torch.tensor(b))
    kappa = lambda u: (sa - torch.sigmoid(a + u * (b - a))) / (sa - sb)  # noqa: E731
    gamma = SigmoidSchedule().signal_level(t)
    assert torch.allclose(gamma, kappa(1 - t).clamp(1e-9, 1), atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s))
def test_endpoints_and_monotone(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    g = schedule.signal_level(t)
    assert g[0].item() == pytest.approx(1.0, abs=1e-9)
    assert g[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert (g[1:] <= g[:-1] + 1e-15).all()
    assert torch.allclose(schedule.noise_level(t), 1 - g)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s))
def test_derivative_matches_finite_differences(schedule):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    fd = (schedule.signal_level(t + h) - schedule.signal_level(t - h)) / (2 * h)
    assert torch.allclose(schedule.signal_level_derivative(t), fd, atol=1e-6, rtol=1e-6)


def test_config_round_trip_and_errors():
    s = SigmoidSchedule(alpha=-2.0, beta=6.0)
    assert schedule_from_config(s.to_config()) == s
    assert isinstance(schedule_from_config(None), SigmoidSchedule)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_from_config({"name": "nope"})
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        time_grid(0)
