"""Work side by side on the cores (core/parallel.py): the same values as one pass, the caller's
thread count and autograd mode kept."""

from __future__ import annotations

import pytest
import torch

from globeflow.core import likelihood
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.families import base as families_base
from globeflow.core.network import Denoiser
from globeflow.core.parallel import cpu_workers, map_on_cores, split_evenly


@pytest.mark.parametrize(("count", "parts"), [(10, 3), (2, 5), (7, 1), (64, 2)])
def test_split_evenly_covers_every_item_once_in_near_equal_parts(count, parts):
    slices = split_evenly(count, parts)
    covered = [i for s in slices for i in range(s.start, s.stop)]
    assert covered == list(range(count))
    sizes = [s.stop - s.start for s in slices]
    assert len(slices) == min(parts, count) and max(sizes) - min(sizes) <= 1 and min(sizes) > 0


def test_workers_run_one_thread_each_and_leave_the_caller_as_it_was():
    before = torch.get_num_threads()
    seen = []

    def work(item: int) -> int:
        seen.append((torch.get_num_threads(), torch.is_grad_enabled()))
        return item * item

    with torch.no_grad():
        assert map_on_cores(work, list(range(6)), 3) == [i * i for i in range(6)]
    assert set(seen) == {(1, False)}  # one thread each, in the caller's (no-grad) mode
    assert torch.get_num_threads() == before
    assert cpu_workers("cpu", 1) == 1 and cpu_workers("meta", 100) == 1


def _tiny_model() -> RiemannianFlowMatching:
    torch.manual_seed(0)
    return RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=6)).eval()


def test_points_and_samples_split_across_cores_give_the_one_pass_values(monkeypatch):
    """Each point's log-likelihood and each sample's path (with its log-density, or guided)
    depend on that point or sample alone: split across 3 workers they are the one-pass values
    up to float32 rounding (a matrix product's kernel, and so its last bit, may depend on its
    row count: float32's epsilon 1.2e-7 over the ~50 accumulated steps and layers bounds the
    change by ~1e-5)."""
    model, emb = _tiny_model(), torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    x = torch.nn.functional.normalize(torch.randn(2, 20, 3), dim=-1)
    x0 = torch.nn.functional.normalize(torch.randn(2, 24, 3), dim=-1)
    runs, before = {}, torch.get_num_threads()

    def workers_of(n: int):  # n workers where the caller has threads (inside a worker: one)
        return lambda device, items: n if torch.get_num_threads() > 1 else 1

    torch.set_num_threads(2)
    try:
        for n in (1, 3):
            for module in (likelihood, families_base):
                monkeypatch.setattr(module, "cpu_workers", workers_of(n))
            runs[n] = (
                # fp32: a bf16 product's rounding follows its row count (the default likelihood
                # runs bf16 below signal level 0.4 where bf16 is native)
                likelihood.log_prob_ode(model, x, emb, steps=8, precision="fp32"),
                *likelihood.sample_with_log_density(model, emb, 24, 8, noise=x0),
                model.sample(emb, 24, 8, 1.5, noise=x0),  # guided: two branches per row
            )
    finally:
        torch.set_num_threads(before)
    for one, split in zip(runs[1], runs[3], strict=True):
        torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)


def test_exact_fields_take_divergences_on_several_workers(monkeypatch):
    """The exact fields' JVPs go through torch.func (one forward-AD level per process); split
    across 2 worker threads, the log-likelihood is the one-worker value (it raised before)."""
    from globeflow.core.exact_field import MixtureTarget, exact_rfm_model

    target = MixtureTarget.from_latlon(torch.tensor([[48.86, 2.35]], dtype=torch.float64))
    model, emb = exact_rfm_model([target]), torch.ones(1, 1, dtype=torch.float64)
    x = target.atoms[None].expand(1, 8, 3).clone()
    runs, before = {}, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (1, 2):
            monkeypatch.setattr(likelihood, "cpu_workers", lambda device, items, n=n: n)
            runs[n] = likelihood.log_prob_ode(model, x, emb, steps=8)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(runs[2], runs[1])
