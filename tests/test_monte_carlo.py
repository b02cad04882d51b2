"""Monte Carlo standard errors of an answer, and the adaptive sample count built on them."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.answers.decode import best_guess, expected_geoscore, top_regions
from globeflow.answers.draw import draw_answers, more_samples
from globeflow.answers.monte_carlo import (
    AnswerErrors,
    answer_errors,
    replicate_stderr,
    samples_needed,
)
from globeflow.core.exact_field import (
    MixtureTarget,
    exact_rfm_model,
    kernel_width_for_rms_km,
    sample_mixture,
)
from globeflow.core.random_streams import photo_generators, replicate_ids, stream_noise
from globeflow.core.sampler_settings import SamplerSettings
from globeflow.core.sphere import haversine_km, latlon_to_unit, unit_to_latlon

PARIS, TOKYO, LIMA = (48.86, 2.35), (35.68, 139.69), (-12.05, -77.04)


def _cities(weights: tuple[float, ...], rms_km: float = 20.0) -> MixtureTarget:
    atoms = torch.tensor([PARIS, TOKYO, LIMA][: len(weights)], dtype=torch.float64)
    return MixtureTarget.from_latlon(
        atoms, torch.tensor(weights, dtype=torch.float64), kernel_width_for_rms_km(rms_km)
    )


def _exact_samples(target: MixtureTarget, n: int, generator: torch.Generator) -> torch.Tensor:
    u = sample_mixture(target.atoms, target.weights, target.width, n, generator)
    return unit_to_latlon(u).float()


def test_region_probability_error_is_the_spread_over_repeated_draws():
    """The binomial standard error of a region's share matches the spread of that share over
    independent sample sets. With R = 300 replicates the sample standard deviation is within
    1/sqrt(2 (R - 1)) = 4.1% of the truth (one sigma); 4 sigma is 16%."""
    target = _cities((0.3, 0.7))
    generator = torch.Generator().manual_seed(0)
    paris = latlon_to_unit(torch.tensor([PARIS], dtype=torch.float64))
    n, shares, predicted = 256, [], []
    for _ in range(300):
        samples = _exact_samples(target, n, generator)
        near = (latlon_to_unit(samples.double()) @ paris.T).squeeze(-1) > 0.99
        p = float(near.double().mean())
        shares.append(p)
        guess = samples[0]
        predicted.append(answer_errors(samples, guess, [p]).region_probability[0])
    spread = torch.tensor(shares).std().item()
    assert abs(spread / (sum(predicted) / len(predicted)) - 1.0) < 0.16


def test_guess_score_error_is_the_spread_over_repeated_draws():
    """The standard error of the expected GeoScore at a fixed point matches its spread over
    independent sample sets (same tolerance: 4 sigma of a 300-replicate standard deviation)."""
    target = _cities((0.5, 0.3, 0.2), rms_km=500.0)
    generator = torch.Generator().manual_seed(1)
    guess = torch.tensor(PARIS)
    scores, predicted = [], []
    for _ in range(300):
        samples = _exact_samples(target, 128, generator)
        scores.append(float(expected_geoscore(guess[None], samples)[0]))
        predicted.append(answer_errors(samples, guess, []).guess_score)
    spread = torch.tensor(scores).std().item()
    assert abs(spread / (sum(predicted) / len(predicted)) - 1.0) < 0.16


def test_replicate_error_is_the_spread_over_repeated_sobol_draws(sharp_and_split):
    """The nets' spread gives the error of a mean over Sobol draws (a first draw of 256 and a
    second of 512, as an adaptive answer pools them): over 300 repeats, the spread of the
    estimates against the root mean square of the errors read off each, within 18% (4 sigma:
    the 300-repeat SD is known to 4.1%, the RMS of 8-net errors to ~1.5%). Both quantities, a
    cap's share and a smooth function, scatter less than half as much as with iid points."""
    model, emb = sharp_and_split
    stream = photo_generators(3, ["photo"])
    estimates, errors = [], []
    for _ in range(300):
        points, nets = [], []
        for draw, count in enumerate((256, 512)):
            noise, padded = stream_noise(model, stream, count, emb[:1], "sobol")
            points.append(noise[0, :count])
            nets.append(replicate_ids(count, padded, draw))
        x = torch.cat(points)
        values = torch.stack([(x[:, 2] > 0.3).double(), torch.exp(-2.0 * x[:, 0])], dim=-1)
        estimates.append(values.mean(0))
        errors.append(replicate_stderr(values, torch.cat(nets)))
    spread = torch.stack(estimates).std(0)
    rms = torch.stack(errors).pow(2).mean(0).sqrt()
    assert ((spread / rms - 1.0).abs() < 0.18).all(), (spread, rms)
    iid = values.std(0) / math.sqrt(values.shape[0])  # the iid error of the last repeat's values
    assert (spread < 0.5 * iid).all(), (spread, iid)


def test_a_draw_of_one_net_has_no_error_to_read():
    values = torch.ones(16, 1)
    assert torch.isinf(replicate_stderr(values, torch.zeros(16, dtype=torch.long))).all()


def test_samples_needed_follows_the_square_root_law():
    """A 1/3 share measured on 256 samples has error 0.0295: 0.02 needs 0.222 / 0.02^2 = 556
    samples, 768 in blocks of 256; the count then meets the tolerance, and never passes the
    cap."""
    p = 1.0 / 3.0
    errors = AnswerErrors(256, 0.0, (math.sqrt(p * (1 - p) / 256),))
    needed = samples_needed(errors, 50.0, 0.02, block=256, cap=4096)
    assert needed == 768
    assert math.sqrt(p * (1 - p) / needed) <= 0.02
    assert samples_needed(errors, 50.0, 0.02, block=256, cap=512) == 512
    sharp = AnswerErrors(256, 0.5, (0.0,))
    assert samples_needed(sharp, 50.0, 0.02, block=256, cap=4096) == 256
    assert samples_needed(AnswerErrors(1, math.inf, ()), 50.0, 0.02, 256, 1024) == 1024


RECIPE = SamplerSettings(
    steps=12, num_samples=512, first_samples=128, localizability_samples=0, guidance=0.0
)


@pytest.fixture(scope="module")
def sharp_and_split():
    """An exact-field model: a 5-km Paris (one region, every score alike) and Paris / Tokyo /
    Lima at 1/3 each (region errors 0.042 at 128 samples)."""
    model = exact_rfm_model([_cities((1.0,), rms_km=5.0), _cities((1, 1, 1), rms_km=5.0)])
    return model, torch.eye(2, dtype=torch.float64)


@pytest.mark.parametrize("noise", ["iid", "sobol"])
def test_adaptive_draw_spends_samples_where_the_answer_needs_them(sharp_and_split, noise):
    model, emb = sharp_and_split
    recipe = RECIPE.with_overrides(noise=noise)
    samples, _, _, nets = draw_answers(model, emb, photo_generators(0, ["a", "b"]), recipe)
    assert samples[0].shape[0] == 128 and samples[1].shape[0] > 128
    if noise == "iid":  # region errors 0.042 at 128 samples, 0.021 at 512: the cap
        assert samples[1].shape[0] == 512
    for s, n in zip(samples, nets, strict=True):
        guess = best_guess(s)
        regions = top_regions(s)
        errors = answer_errors(
            s, guess, [r.probability for r in regions], replicates=n,
            region_members=[r.members for r in regions],
        )  # fmt: skip
        at_cap = s.shape[0] == recipe.num_samples
        assert at_cap or errors.within(
            recipe.guess_score_tolerance, recipe.region_probability_tolerance
        )
    assert more_samples(samples[0], recipe, nets[0]) == 0
    assert (nets[0] is None) == (noise == "iid")


def test_sobol_draws_give_the_same_answer_as_iid_ones(sharp_and_split):
    """Paris / Tokyo / Lima at 1/3 each, 512 samples from each design: every region's share
    agrees with the iid draw's within 4 of their joint standard errors (binomial for iid, the
    nets' spread for Sobol), and the nets read a smaller error than the binomial one."""
    model, emb = sharp_and_split
    fixed = RECIPE.with_overrides(first_samples=0)
    iid, _, _, _ = draw_answers(model, emb[1:], photo_generators(0, ["b"]), fixed)
    sobol, _, _, nets = draw_answers(model, emb[1:], photo_generators(0, ["b"]),
                                     fixed.with_overrides(noise="sobol"))  # fmt: skip
    regions = top_regions(sobol[0])
    assert len(regions) == 3
    for region in regions:
        near = haversine_km(iid[0].double(), torch.tensor([region.lat, region.lon])) < 200.0
        p_iid = float(near.double().mean())
        se_iid = math.sqrt(p_iid * (1 - p_iid) / iid[0].shape[0])
        se_sobol = float(replicate_stderr(region.members.double()[:, None], nets[0])[0])
        assert abs(region.probability - p_iid) < 4 * math.hypot(se_iid, se_sobol)
        assert se_sobol < se_iid


def test_adaptive_draw_extends_the_photo_stream(sharp_and_split):
    """The first draw is the fixed-size draw of ``first_samples`` from the same stream, and a
    photo's samples do not depend on the other photos of the batch."""
    model, emb = sharp_and_split
    fixed = SamplerSettings(**{**RECIPE.__dict__, "num_samples": 128, "first_samples": 0})
    first, _, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), fixed)
    both, _, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), RECIPE)
    alone, _, _, _ = draw_answers(model, emb[1:], photo_generators(0, ["b"]), RECIPE)
    assert torch.equal(both[1][:128], first[1])
    assert torch.equal(both[0], first[0])
    assert torch.equal(both[1], alone[0])


def test_fixed_recipes_draw_every_sample_at_once(sharp_and_split):
    model, emb = sharp_and_split
    fixed = SamplerSettings(**{**RECIPE.__dict__, "first_samples": 0})
    assert not fixed.adaptive
    samples, _, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), fixed)
    assert [s.shape[0] for s in samples] == [512, 512]


def test_settings_refuse_bad_tolerances():
    with pytest.raises(ValueError, match="tolerances"):
        SamplerSettings(region_probability_tolerance=0.0)
    with pytest.raises(ValueError, match="first_samples"):
        SamplerSettings(first_samples=-1)
