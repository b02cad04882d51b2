"""Fused answers you can trust (issue 24): the same in any order, a photo given twice counts
once, the product the model's calibration supports, disagreement said out loud, importance
weights whose proposal density is exact, and every tensor on the model's device.

Closed forms come from von Mises-Fisher members (tests/_fusion_testbed.py); a tiny random
Riemannian flow runs the denoising path (own samples, stiff-end widths, likelihood ODE).
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
import _fusion_testbed as tb  # noqa: E402

from globeflow.answers import fusion as answers_fusion  # noqa: E402
from globeflow.answers import within as answers_within  # noqa: E402
from globeflow.answers.fusion import draw_posterior, fused_sample, fusion_product  # noqa: E402
from globeflow.answers.within import parse_region  # noqa: E402
from globeflow.apps.pipeline import Locator  # noqa: E402
from globeflow.core import fusion as core_fusion  # noqa: E402
from globeflow.core.families import RiemannianFlowMatching  # noqa: E402
from globeflow.core.fusion import (  # noqa: E402
    Kernels,
    log_normaliser,
    member_log_normalisers,
    normalised_weights,
    sample_point_kernels,
)
from globeflow.core.network import Denoiser  # noqa: E402
from globeflow.core.sphere import latlon_to_unit  # noqa: E402
from globeflow.core.vmf import vmf_log_normalizer  # noqa: E402


class _Encoder:
    name = "one-hot"

    def __init__(self, dim: int) -> None:
        self.dim = dim


def _tiny_rfm(guidance: float | None = -0.5) -> RiemannianFlowMatching:
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=4))
    model.metadata = {} if guidance is None else {"recommended_guidance": guidance}
    return model.eval()


def _answer(result: dict) -> tuple:
    """What must not move: the samples, and the numbers of the fusion block."""
    fusion = result["fusion"]
    return (
        result.get("samples"),
        result.get("error"),
        fusion["log_bayes_factor_same_place"],
        sorted((k, v) for k, v in fusion["agreement_log_odds"].items()),
        fusion["proposals"],
    )


def test_the_fused_answer_does_not_depend_on_the_order_of_the_photos() -> None:
    """Every permutation of three photos gives the same answer bit for bit (the random streams
    come from the set of photo ids, not from the order)."""
    locator = Locator(_tiny_rfm(), _Encoder(4), model_name="tiny")
    emb = torch.nn.functional.normalize(
        torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    )
    names = ["a.jpg", "b.jpg", "c.jpg"]
    answers = []
    for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        result = locator.locate_together(
            emb[list(order)], names=[names[i] for i in order], num_samples=64,
            proposals_per_round=128,
        )  # fmt: skip
        assert result["fusion"]["distinct_photos"] == 3
        answers.append(_answer(result))
    assert answers[0] == answers[1] == answers[2]


def test_order_free_on_the_closed_form_testbed_too() -> None:
    g = torch.Generator().manual_seed(5)
    prior, cues = tb.scenario((38.72, -9.14), g)
    locator = Locator(tb.ClosedFormCues(prior, list(cues.values())), _Encoder(4))
    runs = [
        _answer(locator.locate_together(torch.eye(4)[list(p)], num_samples=64,
                                         names=[f"p{i}" for i in p]))
        for p in list(itertools.permutations(range(4)))[::7]
    ]  # fmt: skip
    assert all(run == runs[0] for run in runs)


def test_the_same_photo_twice_is_the_photo_alone() -> None:
    """Pooled (tiny flow, recommended guidance -0.5) and exact (closed form): a photo given
    twice gives exactly the answer of the photo given once; on the closed form, where the photo
    alone is its exact posterior, that is where the photo's own answer lands."""
    pooled = Locator(_tiny_rfm(), _Encoder(4))
    emb = torch.eye(4)[:1]
    once = pooled.locate_together(emb, num_samples=64, proposals_per_round=128)
    twice = pooled.locate_together(emb[[0, 0]], num_samples=64, proposals_per_round=128)
    # one distinct photo: exponent 1 + w, the density its usual (guided) answer aims at
    assert once["fusion"]["product"] == "pooled" and once["fusion"]["exponent"] == 0.5
    assert twice["fusion"]["distinct_photos"] == 1
    assert once["samples"] == twice["samples"]

    paris = tb.vmf((48.85, 2.35), 50.0)
    exact = Locator(tb.ClosedFormCues(tb.uniform_prior(), [paris]), _Encoder(1))
    once = exact.locate_together(torch.eye(1), num_samples=512)
    twice = exact.locate_together(torch.eye(1)[[0, 0]], num_samples=512)
    assert once["samples"] == twice["samples"] and twice["fusion"]["product"] == "exact"
    [own] = exact.locate_embeddings(torch.eye(1), num_samples=512)
    # Two best guesses of 512 samples of a 50-km vMF: each within a few km of its mode.
    lat, lon = twice["best_guess"]["lat"], twice["best_guess"]["lon"]
    assert abs(lat - own["best_guess"]["lat"]) < 0.3 and abs(lon - own["best_guess"]["lon"]) < 0.4


def test_a_pooled_answer_counts_distinct_photos() -> None:
    """Through locate_together: two distinct photos get e = (1 + w) / 2, the same photo twice
    (one distinct photo) e = 1 + w; the answer says which."""
    locator = Locator(_tiny_rfm(), _Encoder(4))
    emb = torch.eye(4)[:2]
    two = locator.locate_together(emb, num_samples=64, proposals_per_round=128)
    same = locator.locate_together(emb[[1, 1]], num_samples=64, proposals_per_round=128)
    assert two["fusion"]["exponent"] == 0.25 and same["fusion"]["exponent"] == 0.5
    assert "geometric mean of the 2 photos" in two["fusion"]["why"]


def test_the_tempered_product_of_vmf_members_is_its_closed_form() -> None:
    """Uniform null, vMF members, exponent e: the target is vMF(K / |K|, |K|), K = e sum k_i m_i,
    and log Z_S = (|S| e - 1) log 4 pi + e sum (log C(k_i) - k_i) + |K_S| - log C(|K_S|)."""
    centres, scales, e = [(45.0, 5.0), (47.0, 9.0), (44.0, 8.0)], [400.0, 250.0, 300.0], 0.5
    cues = [tb.vmf(c, s) for c, s in zip(centres, scales)]
    model = tb.ClosedFormCues(tb.uniform_prior(), cues)
    g = torch.Generator().manual_seed(1)
    sample = fused_sample(model, torch.eye(3), 1, g, per_round=3000, exponent=e)
    kappas = torch.cat([c.kappa for c in cues])
    mus = torch.cat([c.mu for c in cues])

    def log_z(rows: list[int]) -> float:
        k = (e * kappas[rows, None] * mus[rows]).sum(0).norm()
        return float((len(rows) * e - 1) * math.log(4 * math.pi)
                     + e * (vmf_log_normalizer(kappas[rows]) - kappas[rows]).sum()
                     + k - vmf_log_normalizer(k))  # fmt: skip

    big_k = (e * kappas[:, None] * mus).sum(0)
    mu, kappa = big_k / big_k.norm(), float(big_k.norm())
    w = normalised_weights(sample.log_weight)
    ess = 1.0 / float((w * w).sum())
    mean = (w[:, None] * sample.points.double()).sum(0)
    tangent = mean - (mean @ mu) * mu
    assert float(tangent.norm()) < 5.0 * math.sqrt(1.0 / (kappa * ess))
    args = (sample.member_log_p, sample.null_log_p, sample.log_proposal, e)
    z_i, se_i = member_log_normalisers(*args)
    for i in range(3):
        assert float(z_i[i]) == pytest.approx(log_z([i]), abs=5 * float(se_i[i]))
    draw = draw_posterior(sample, 256, g)
    se = math.sqrt(draw.log_bayes_factor_stderr**2 + float((se_i**2).sum()))
    exact = log_z([0, 1, 2]) - sum(log_z([i]) for i in range(3))
    assert draw.log_bayes_factor == pytest.approx(exact, abs=5 * se)
    assert draw.exponent == e


def test_which_product_follows_the_models_own_guidance() -> None:
    assert fusion_product(_tiny_rfm(-0.5)).exponent == 0.5
    # n distinct photos: the geometric mean of their usual answers, e = (1 + w) / n
    assert fusion_product(_tiny_rfm(-0.5), 2).exponent == 0.25
    assert fusion_product(_tiny_rfm(-0.5), 4).name == "pooled"
    assert fusion_product(_tiny_rfm(-0.5), 4).exponent == 0.125
    assert fusion_product(_tiny_rfm(None), 4).exponent == 1.0
    assert fusion_product(_tiny_rfm(None)).name == "exact"
    assert fusion_product(_tiny_rfm(2.0)).exponent == 1.0  # w > 0 says nothing of over-confidence
    assert fusion_product(tb.ClosedFormCues(tb.uniform_prior(), [tb.vmf((0, 0), 100.0)])).name == (
        "exact"
    )


def test_photos_that_look_like_different_places_are_told_so() -> None:
    """Exact log BF -1.45 (between the refusal threshold and 0): the answer is given and says
    the photos look like different places; at -5.1 it is refused."""
    prior = tb.uniform_prior()
    a, b, far = (
        tb.vmf((48.85, 2.35), 300.0), tb.vmf((48.85, 25.0), 300.0), tb.vmf((48.85, 30.0), 300.0)
    )  # fmt: skip
    exact_bf = tb.log_bayes_factor(prior, [a, b])
    assert answers_fusion.REFUSAL_LOG_BAYES_FACTOR + 1 < exact_bf < -0.5  # the case's premise
    locator = Locator(tb.ClosedFormCues(prior, [a, b, far]), _Encoder(3))
    result = locator.locate_together(torch.eye(3)[:2], names=["a", "b"], num_samples=256)
    assert result["ok"] is True
    assert result["fusion"]["different_places"] is True
    assert result["disagreement"]["different_places"] and not result["disagreement"]["refused"]
    assert "look like different places" in result["warning"]
    assert result["fusion"]["log_bayes_factor_same_place"] == pytest.approx(exact_bf, abs=0.3)
    refused = locator.locate_together(torch.eye(3)[[0, 2]], names=["a", "far"], num_samples=256)
    assert refused["ok"] is False and "look like different places" in refused["error"]
    agree = locator.locate_together(torch.eye(3)[[0, 0]], names=["a", "a again"], num_samples=64)
    assert agree["fusion"]["different_places"] is False and "warning" not in agree


def test_proposal_kernels_sample_their_own_density() -> None:
    """The proposal is a density in closed form that its sampler follows: importance weights
    of a known density under it integrate to 1, and the kernels' own log-density integrates
    to 1 against the uniform."""
    g = torch.Generator().manual_seed(3)
    centres = tb.vmf((10.0, 20.0), 500.0).sample(64, g)
    kernels = sample_point_kernels(centres)
    x = kernels.sample(20000, g)
    target = tb.vmf((11.0, 21.0), 700.0).normalised().log_density(x)
    log_z, se = log_normaliser(target - kernels.log_density(x))
    assert abs(log_z) < 5 * se
    u = torch.nn.functional.normalize(torch.randn(200000, 3, generator=g, dtype=torch.float64))
    mass = float(kernels.log_density(u).exp().mean() * 4 * math.pi)
    assert mass == pytest.approx(1.0, abs=0.05)
    assert isinstance(kernels, Kernels) and bool((kernels.kappas > 0).all())


def test_the_first_round_aims_at_the_one_place_two_photos_share() -> None:
    """Two photos that each say "one of three cities", sharing one: the first round's product
    kernels put their centres at the shared city, so its effective sample size is several
    times what the photos' own kernels alone give, and the log Bayes factor agrees with its
    closed form either way (the weights stay exact)."""
    paris, tokyo, lima = (48.85, 2.35), (35.68, 139.7), (-12.05, -77.04)
    cairo, oslo = (30.04, 31.24), (59.91, 10.75)
    a = tb.concat(*(tb.vmf(c, 20.0, -math.log(3)) for c in (paris, tokyo, lima)))
    b = tb.concat(*(tb.vmf(c, 30.0, -math.log(3)) for c in (cairo, oslo, lima)))
    prior = tb.uniform_prior()
    exact = tb.log_bayes_factor(prior, [a, b])
    ess = {}
    for sets in (0, 2):
        g = torch.Generator().manual_seed(5)
        own = [a.sample(48, g), b.sample(48, g), prior.sample(48, g)]
        sample = core_fusion.importance_sample(
            own, lambda x: (torch.stack([a.log_density(x), b.log_density(x)]),
                            prior.log_density(x)),
            512, 1e9, max_rounds=1, generator=g, photo_sets=sets,
        )  # fmt: skip
        ess[sets] = core_fusion.effective_sample_size(sample.log_weight)
        bf, se = core_fusion.log_bayes_factor(
            sample.member_log_p, sample.null_log_p, sample.log_proposal
        )
        assert bf == pytest.approx(exact, abs=5 * se + 0.05)
    kernels = core_fusion.product_kernels(
        [sample_point_kernels(p) for p in own], 2, 1.0, torch.Generator().manual_seed(0)
    )
    lima_u = latlon_to_unit(torch.tensor([lima], dtype=torch.float64))[0]
    assert float((kernels.centres @ lima_u > math.cos(500 / 6371)).float().mean()) > 0.9
    assert ess[2] > 3 * ess[0], ess


def test_the_normaliser_check_is_zero_when_the_weights_are_right() -> None:
    g = torch.Generator().manual_seed(4)
    prior, cues = tb.scenario((-33.9, 151.2), g)
    model = tb.ClosedFormCues(prior, list(cues.values()))
    draw = draw_posterior(fused_sample(model, torch.eye(4), 1, g), 256, g)
    for value, se in zip(draw.normaliser_log, draw.normaliser_stderr, strict=True):
        assert abs(value) < 5 * se + 1e-9


def test_a_null_condition_sharper_than_every_photo_is_refused() -> None:
    """A null that is no prior over places (a sharp spot) is caught from the densities, not
    from a config key."""
    cues = [tb.vmf((48.85, 2.35), 800.0), tb.vmf((48.0, 3.0), 800.0)]
    model = tb.ClosedFormCues(tb.uniform_prior(), cues)
    spot = tb.vmf((-20.0, 60.0), 20.0)
    log_w, mu, kappa = model.table  # row 0 is the null condition's mixture
    log_w[0] = -math.inf
    log_w[0, 0], mu[0, 0], kappa[0, 0] = 0.0, spot.mu[0], spot.kappa[0]
    assert getattr(model, "cond_drop_prob", None) != 0
    result = Locator(model, _Encoder(2)).locate_together(torch.eye(2), num_samples=64)
    assert result["ok"] is False and "null condition" in result["error"]
    assert result["fusion"]["null_condition"]["ok"] is False
    fine = Locator(tb.ClosedFormCues(tb.uniform_prior(), cues), _Encoder(2))
    assert fine.locate_together(torch.eye(2), num_samples=64)["fusion"]["null_condition"]["ok"]


_FACTORIES = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.full,
    torch.empty, torch.arange, torch.tensor, torch.linspace, torch.eye, torch.as_tensor,
}  # fmt: skip
_WATCHED = {inspect.getsourcefile(m) for m in (core_fusion, answers_fusion, answers_within)}


class _DeviceRecorder(TorchFunctionMode):
    """Records every tensor factory that the fusion modules call without naming a device: on a
    GPU such a tensor lands on the CPU, beside the model's tensors on the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.unplaced: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            caller = inspect.currentframe().f_back
            if caller is not None and caller.f_code.co_filename in _WATCHED:
                self.unplaced.append(f"{func.__name__} at {caller.f_code.co_filename}:"
                                     f"{caller.f_lineno}")  # fmt: skip
        return func(*args, **kwargs)


def test_fusion_and_regions_make_every_tensor_on_the_models_device() -> None:
    """No tensor factory in the fusion and region modules runs without the model's device (the
    recorder fails on the old code: rand, randint and the CPU masks of issue 24)."""
    region = parse_region("FR")
    box = parse_region("40,-5,52,10")
    locator = Locator(_tiny_rfm(), _Encoder(4))
    g = torch.Generator().manual_seed(6)
    prior, cues = tb.scenario((48.85, 2.35), g)
    exact = Locator(tb.ClosedFormCues(prior, list(cues.values())), _Encoder(4))
    recorder = _DeviceRecorder()
    with recorder:
        locator.locate_together(torch.eye(4)[:2], num_samples=64, proposals_per_round=128,
                                within=box)  # fmt: skip
        exact.locate_together(torch.eye(4)[:3], num_samples=64, within=region)
        exact.locate_embeddings(torch.eye(4)[:1], num_samples=64, within=region)
        region.contains(torch.tensor([[48.85, 2.35]], device="cpu"))
    assert not recorder.unplaced, recorder.unplaced


def test_a_country_is_its_polygons_without_the_reverse_geocoder(monkeypatch) -> None:
    region = parse_region("IT")

    def no_geocoder(*args, **kwargs):
        raise AssertionError("the reverse geocoder ran per point")

    monkeypatch.setattr(answers_within, "reverse_geocode", no_geocoder)
    points = torch.tensor(
        [[45.44, 12.33], [41.9, 12.5], [48.85, 2.35], [37.5, 15.1], [40.0, 9.0], [46.95, 7.45]],
        dtype=torch.float64,
    )  # Venice, Rome, Paris, Catania, inland Sardinia, Bern
    assert region.contains(points).tolist() == [True, True, False, True, True, False]
    assert bool(latlon_to_unit(points).isfinite().all())
