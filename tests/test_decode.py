import math

import torch

from globeflow.answers.decode import (
    best_guess,
    expected_geoscore,
    pairwise_km,
    sample_density_grid,
    self_expected_geoscore,
    top_regions,
)
from globeflow.core.sphere import EARTH_RADIUS_KM, latlon_grid


def _cluster(lat, lon, n, spread_deg, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([lat, lon]) + spread_deg * torch.randn(n, 2, generator=g)


def test_best_guess_is_in_the_heavier_mode_not_between_modes():
    # 70% of samples around Paris, 30% around New York: the spherical mean would be in the
    # Atlantic; the expected-GeoScore decision is a sample near Paris.
    samples = torch.cat([_cluster(48.85, 2.35, 70, 0.5, 0), _cluster(40.7, -74.0, 30, 0.5, 1)])
    guess = best_guess(samples)
    assert pairwise_km(guess[None], torch.tensor([[48.85, 2.35]]))[0, 0] < 150
    # It is the argmax of the expected score among the samples.
    scores = expected_geoscore(samples, samples)
    assert torch.allclose(guess.double(), samples[scores.argmax()].double())


def test_best_guess_batched_equals_single():
    a = _cluster(10.0, 20.0, 50, 5.0, 2)
    b = _cluster(-30.0, 140.0, 50, 5.0, 3)
    batched = best_guess(torch.stack([a, b]))
    assert torch.equal(batched[0], best_guess(a)) and torch.equal(batched[1], best_guess(b))


def test_expected_geoscore_values():
    pts = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert expected_geoscore(pts, pts).item() == 5000.0
    # 1492.7 km away (on the equator: 1492.7 / 6371 rad) -> 5000 / e.
    lon = math.degrees(1492.7 / 6371.0)
    far = torch.tensor([[0.0, lon]], dtype=torch.float64)
    assert abs(expected_geoscore(pts, far).item() - 5000 / math.e) < 1e-6


def test_top_regions_shares_and_order():
    samples = torch.cat(
        [
            _cluster(48.85, 2.35, 60, 0.3, 0),
            _cluster(35.7, 139.7, 30, 0.3, 1),
            _cluster(-33.9, 151.2, 10, 0.3, 2),
        ]
    )
    regions = top_regions(samples, k=5, radius_km=300)
    assert [round(r.probability, 2) for r in regions] == [0.6, 0.3, 0.1]
    assert abs(regions[1].lat - 35.7) < 1.5 and abs(regions[1].lon - 139.7) < 1.5
    assert sum(r.probability for r in regions) <= 1.0 + 1e-9
    assert all(r.spread_km < 300 for r in regions)


def test_sample_density_grid_integrates_to_one():
    samples = _cluster(20.0, 30.0, 200, 10.0, 0)
    grid = sample_density_grid(samples, n_lat=90, n_lon=180)
    _, weights = latlon_grid(90, 180)
    density = torch.tensor(grid["log_density"], dtype=torch.float64).exp().reshape(-1)
    assert abs((density * weights).sum().item() - 1.0) < 0.02
    assert len(grid["lat"]) == 90 and len(grid["lon"]) == 180


def test_pairwise_km_in_float32_is_accurate_at_every_distance():
    # 1 m, 1 km, 1000 km apart, and antipodes: the chord formula keeps float32 within metres,
    # where arccos of a float32 dot product is 2 km off near zero distance.
    deg_per_km = 180 / (math.pi * EARTH_RADIUS_KM)
    f64 = torch.float64
    a = torch.tensor([[10.0, 20.0], [10.0, 20.0], [10.0, 20.0], [45.0, 0.0]], dtype=f64)
    b = torch.tensor([[10.0 + 1e-3 * deg_per_km, 20.0], [10.0 + deg_per_km, 20.0],
                      [10.0 + 1000 * deg_per_km, 20.0], [-45.0, 180.0]], dtype=f64)  # fmt: skip
    km64 = pairwise_km(a, b).diagonal()
    km32 = pairwise_km(a, b, torch.float32).diagonal()
    assert km32.dtype == torch.float32
    expected = torch.tensor([1e-3, 1.0, 1000.0, math.pi * EARTH_RADIUS_KM], dtype=f64)
    assert torch.allclose(km64, expected, rtol=1e-9, atol=1e-9)
    assert (km32.double() - km64).abs().max() < 0.01  # 10 m


def test_best_guess_in_float32_picks_a_float64_optimum():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[48.0, 2.0], [35.0, 139.0], [-33.0, 151.0], [40.0, -74.0]])
    samples = centres[:, None] + torch.randn(4, 1024, 2, generator=g) * torch.tensor([2.0, 3.0])
    guess = best_guess(samples)
    scores = expected_geoscore(samples, samples)  # float64, every sample as a candidate
    picked = expected_geoscore(guess[:, None], samples)[:, 0]
    # float32 distances move each expected score by < 1e-3 points: the pick is an optimum
    assert (scores.max(-1).values - picked).max() < 1e-2


def test_self_expected_geoscore_matches_pairwise_scores_from_metres_to_antipodes():
    g = torch.Generator().manual_seed(1)
    deg_per_km = 180 / (math.pi * EARTH_RADIUS_KM)
    # a 1-km cluster, a 1,000-km one and points spread over the globe, with an antipodal pair
    near = torch.tensor([48.85, 2.35]) + torch.randn(100, 2, generator=g) * deg_per_km
    wide = torch.tensor([-1.3, 36.8]) + torch.randn(100, 2, generator=g) * 1000 * deg_per_km
    globe = torch.randn(50, 2, generator=g) * torch.tensor([30.0, 90.0])
    antipodes = torch.tensor([[45.0, 0.0], [-45.0, 180.0]])
    samples = torch.cat([near, wide, globe, antipodes]).double()
    fast = self_expected_geoscore(samples[None])[0]
    assert fast.dtype == torch.float32
    # float32 rounding of values near 5000 is ~5e-4 points; the float64 reference is exact
    assert (fast.double() - expected_geoscore(samples, samples)).abs().max() < 2e-3


def test_best_guess_at_street_scale_picks_the_optimum_of_the_heaviest_cluster():
    # three 0.5-km clusters (Paris 60%, Tokyo 30%, Lima 10%): candidates differ by fractions
    # of a point, so any precision loss near 0 km would pick a worse sample
    g = torch.Generator().manual_seed(2)
    deg_per_km = 180 / (math.pi * EARTH_RADIUS_KM)
    centres = torch.tensor([[48.8566, 2.3522]] * 6 + [[35.6762, 139.6503]] * 3 + [[-12.05, -77.04]])
    picks = centres[torch.randint(0, 10, (1024,), generator=g)]
    samples = (picks + torch.randn(1024, 2, generator=g) * 0.5 * deg_per_km).double()
    guess = best_guess(samples)
    scores = expected_geoscore(samples, samples)  # float64
    picked = expected_geoscore(guess[None], samples)[0]
    assert pairwise_km(guess[None], centres[:1].double())[0, 0] < 2.0
    assert scores.max() - picked < 1e-3
    assert scores.max() - scores.median() > 0.05  # the choice matters at this resolution
