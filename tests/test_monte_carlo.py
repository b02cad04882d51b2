"""Monte Carlo standard errors of an answer, and the adaptive sample count built on them."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.answers.decode import best_guess, expected_geoscore, top_regions
from globeflow.answers.draw import draw_answers, more_samples
from globeflow.answers.monte_carlo import AnswerErrors, answer_errors, samples_needed
from globeflow.core.exact_field import (
    MixtureTarget,
    exact_rfm_model,
    kernel_width_for_rms_km,
    sample_mixture,
)
from globeflow.core.random_streams import photo_generators
from globeflow.core.sampler_settings import SamplerSettings
from globeflow.core.sphere import latlon_to_unit, unit_to_latlon

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


def test_adaptive_draw_spends_samples_where_the_answer_needs_them(sharp_and_split):
    model, emb = sharp_and_split
    samples, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), RECIPE)
    assert [s.shape[0] for s in samples] == [128, 512]
    for s in samples:
        guess = best_guess(s)
        errors = answer_errors(s, guess, [r.probability for r in top_regions(s)])
        at_cap = s.shape[0] == RECIPE.num_samples
        assert at_cap or errors.within(
            RECIPE.guess_score_tolerance, RECIPE.region_probability_tolerance
        )
    assert more_samples(samples[0], RECIPE) == 0


def test_adaptive_draw_extends_the_photo_stream(sharp_and_split):
    """The first draw is the fixed-size draw of ``first_samples`` from the same stream, and a
    photo's samples do not depend on the other photos of the batch."""
    model, emb = sharp_and_split
    fixed = SamplerSettings(**{**RECIPE.__dict__, "num_samples": 128, "first_samples": 0})
    first, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), fixed)
    both, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), RECIPE)
    alone, _, _ = draw_answers(model, emb[1:], photo_generators(0, ["b"]), RECIPE)
    assert torch.equal(both[1][:128], first[1])
    assert torch.equal(both[0], first[0])
    assert torch.equal(both[1], alone[0])


def test_fixed_recipes_draw_every_sample_at_once(sharp_and_split):
    model, emb = sharp_and_split
    fixed = SamplerSettings(**{**RECIPE.__dict__, "first_samples": 0})
    assert not fixed.adaptive
    samples, _, _ = draw_answers(model, emb, photo_generators(0, ["a", "b"]), fixed)
    assert [s.shape[0] for s in samples] == [512, 512]


def test_settings_refuse_bad_tolerances():
    with pytest.raises(ValueError, match="tolerances"):
        SamplerSettings(region_probability_tolerance=0.0)
    with pytest.raises(ValueError, match="first_samples"):
        SamplerSettings(first_samples=-1)
