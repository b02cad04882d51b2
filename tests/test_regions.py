"""Top regions at the posterior's own scale: synthetic samples whose modes are known (1 km to
5000 km wide), probabilities within binomial standard errors, radii within the standard error of
a sample quantile."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.answers.decode import REGION_CREDIBILITY, mode_labels, pairwise_km, top_regions
from globeflow.core.sphere import (
    EARTH_RADIUS_KM,
    exp_map,
    latlon_to_unit,
    tangent_basis,
    unit_to_latlon,
)

# The 90% quantile of the distance to the centre of an isotropic Gaussian of per-axis sd sigma
# (a Rayleigh distribution), in units of sigma, and its density there.
RAYLEIGH_Q90 = math.sqrt(-2.0 * math.log(1.0 - REGION_CREDIBILITY))
RAYLEIGH_PDF_Q90 = RAYLEIGH_Q90 * (1.0 - REGION_CREDIBILITY)


def _gaussian(centre: tuple[float, float], sigma_km: float, n: int, g) -> torch.Tensor:
    """n points (n, 2) degrees whose tangent offsets at ``centre`` are N(0, sigma^2) per axis;
    the exponential map keeps their distances to the centre exactly Rayleigh."""
    c = latlon_to_unit(torch.tensor([centre], dtype=torch.float64)).expand(n, 3)
    e1, e2 = tangent_basis(c)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) * sigma_km / EARTH_RADIUS_KM
    return unit_to_latlon(exp_map(c, z[:, :1] * e1 + z[:, 1:] * e2))


def _mixture(modes: list[tuple[tuple[float, float], float, float]], n: int, seed: int):
    """n samples (float32, like a model's) of a mixture of (centre, sigma_km, weight) modes; the
    component of each sample is drawn at random, so counts are multinomial."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([w for _, _, w in modes], dtype=torch.float64)
    component = torch.multinomial(weights, n, replacement=True, generator=g)
    out = torch.empty(n, 2, dtype=torch.float64)
    for i, (centre, sigma, _) in enumerate(modes):
        chosen = component == i
        out[chosen] = _gaussian(centre, sigma, int(chosen.sum()), g)
    return out.float()


def _km(a: tuple[float, float], lat: float, lon: float) -> float:
    return float(pairwise_km(torch.tensor([a]), torch.tensor([[lat, lon]]))[0, 0])


PARIS, TOKYO, SAO_PAULO = (48.85, 2.35), (35.68, 139.69), (-23.55, -46.63)
THREE_SCALES = [(PARIS, 1.0, 0.5), (TOKYO, 25.0, 0.3), (SAO_PAULO, 1000.0, 0.2)]


@pytest.mark.parametrize("n", [1024, 4096])
def test_modes_at_1_25_and_1000_km_are_found_with_their_mass_and_radius(n):
    samples = _mixture(THREE_SCALES, n, seed=0)
    regions = top_regions(samples, k=5)
    assert len(regions) >= 3
    for region, (centre, sigma, weight) in zip(regions, THREE_SCALES, strict=False):
        # mass: the multinomial share of the mode, within 4 binomial standard errors
        assert region.probability == pytest.approx(
            weight, abs=4 * math.sqrt(weight * (1 - weight) / n)
        )
        members = weight * n
        # centre: within 4 standard errors of a mean of the members, plus twice the mean gap to
        # the nearest member at the peak (the centre is a sample)
        off_km = _km(centre, region.lat, region.lon)
        gap = sigma * math.sqrt(2 * math.pi / members) / 2
        assert off_km < 4 * sigma / math.sqrt(members) + 2 * gap, (region, off_km)
        # radius: the 90% quantile of the distances, within 4 standard errors of a sample
        # quantile, plus the centre's offset (which moves every distance by at most that much)
        quantile_se = math.sqrt(0.9 * 0.1 / members) / (RAYLEIGH_PDF_Q90 / sigma)
        assert region.radius_km == pytest.approx(
            RAYLEIGH_Q90 * sigma, abs=4 * quantile_se + off_km
        ), region
        assert region.share_within_radius == REGION_CREDIBILITY
        assert region.spread_km < region.radius_km
    # nothing else of weight: at most 4 binomial standard errors of a 1% region left over
    assert sum(r.probability for r in regions[3:]) <= 4 * math.sqrt(0.01 / n) + 0.01


@pytest.mark.parametrize("sigma_km", [0.1, 5000.0])
def test_one_mode_is_one_region_from_100_m_to_5000_km(sigma_km):
    samples = _mixture([(PARIS, sigma_km, 1.0)], 1024, seed=1)
    (region,) = top_regions(samples)
    assert region.probability == 1.0
    if sigma_km < 1000:  # at 5000 km the sphere folds the Gaussian: no Rayleigh quantile
        se = math.sqrt(0.09 / 1024) / (RAYLEIGH_PDF_Q90 / sigma_km)
        assert region.radius_km == pytest.approx(RAYLEIGH_Q90 * sigma_km, abs=4 * se + 0.01)
        gap = sigma_km * math.sqrt(2 * math.pi / 1024) / 2
        assert _km(PARIS, region.lat, region.lon) < 4 * sigma_km / math.sqrt(1024) + 2 * gap


def test_two_modes_apart_by_six_widths_stay_apart_and_by_two_merge():
    # 5 km wide modes whose centres are 6 and 2 sigma apart along a parallel.
    km_per_deg_lon = math.pi / 180 * EARTH_RADIUS_KM * math.cos(math.radians(PARIS[0]))
    apart = [(PARIS, 5.0, 0.6), ((PARIS[0], PARIS[1] + 30.0 / km_per_deg_lon), 5.0, 0.4)]
    regions = top_regions(_mixture(apart, 1024, seed=2))
    assert [round(r.probability, 1) for r in regions] == [0.6, 0.4]
    close = [(PARIS, 5.0, 0.6), ((PARIS[0], PARIS[1] + 10.0 / km_per_deg_lon), 5.0, 0.4)]
    (one,) = top_regions(_mixture(close, 1024, seed=2))
    assert one.probability == 1.0


def test_labels_name_each_mode_by_a_member_and_do_not_depend_on_sample_order():
    samples = _mixture(THREE_SCALES, 1024, seed=3)
    labels = mode_labels(samples)
    assert labels.unique().numel() == 3
    assert torch.equal(labels[labels], labels)  # each mode's name is one of its own samples
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    relabelled = mode_labels(samples[perm])
    # the same partition, whatever the order
    same = (labels[perm][:, None] == labels[perm][None, :]) == (
        relabelled[:, None] == relabelled[None, :]
    )
    assert same.all()


def test_uniform_samples_are_one_globe_wide_region():
    g = torch.Generator().manual_seed(0)
    samples = unit_to_latlon(
        torch.nn.functional.normalize(torch.randn(1024, 3, generator=g), dim=-1)
    )
    regions = top_regions(samples)
    assert regions[0].probability > 0.9 and regions[0].radius_km > 10_000


def test_a_fixed_radius_keeps_its_meaning_at_street_scale():
    # 1 km discs around two 100 m clusters 3 km apart: float64 chords resolve them.
    near = _mixture([(PARIS, 0.1, 1.0)], 70, 4)
    far = _mixture([((PARIS[0] + 0.027, PARIS[1]), 0.1, 1.0)], 30, 5)
    regions = top_regions(torch.cat([near, far]), radius_km=1.0)
    assert [r.probability for r in regions] == [0.7, 0.3]
    assert all(r.radius_km == 1.0 and r.share_within_radius == 1.0 for r in regions)


def _offset(centre: tuple[float, float], east_km: float, north_km: float) -> tuple[float, float]:
    km_per_deg = math.pi / 180 * EARTH_RADIUS_KM
    return (
        centre[0] + north_km / km_per_deg,
        centre[1] + east_km / (km_per_deg * math.cos(math.radians(centre[0]))),
    )


# What guided sampling does to a sharp place: a few clusters 2 m wide, 10-25 m apart.
CONDENSED_PARIS = [
    (_offset(PARIS, 0.0, 0.0), 0.002, 0.35),
    (_offset(PARIS, 0.015, 0.0), 0.002, 0.25),
    (_offset(PARIS, 0.0, 0.02), 0.002, 0.2),
    (_offset(PARIS, -0.025, -0.01), 0.002, 0.2),
]


@pytest.mark.parametrize("n", [256, 1024])
def test_clusters_metres_apart_are_one_place(n):
    samples = _mixture(CONDENSED_PARIS, n, seed=6)
    # each cluster is a mode of its own at the samples' scale ...
    assert len(top_regions(samples, k=10, min_separation_km=0.0)) == 4
    # ... and the answer reports the place once, centred on one of them
    (region,) = top_regions(samples)
    assert region.probability == 1.0
    assert _km(PARIS, region.lat, region.lon) < 0.03
    assert region.radius_km < 0.05


def test_places_further_apart_than_the_separation_stay_apart():
    # 100 m clusters 1.5 km and 30 km from a third; each stays a region, with its share
    modes = [
        (PARIS, 0.1, 0.5),
        (_offset(PARIS, 1.5, 0.0), 0.1, 0.3),
        (_offset(PARIS, 0.0, 30.0), 0.1, 0.2),
    ]
    n = 1024
    regions = top_regions(_mixture(modes, n, seed=7))
    assert len(regions) == 3
    for region, (_, _, weight) in zip(regions, modes, strict=True):
        assert region.probability == pytest.approx(
            weight, abs=4 * math.sqrt(weight * (1 - weight) / n)
        )


def test_a_merged_mode_is_named_by_its_densest_peak():
    samples = _mixture(CONDENSED_PARIS + [(TOKYO, 0.002, 0.5)], 1024, seed=8)
    labels = mode_labels(samples)
    assert labels.unique().numel() == 2
    assert torch.equal(labels[labels], labels)
    split = mode_labels(samples, min_separation_km=0.0)
    assert split.unique().numel() >= 5  # (float32 degrees resolve 2 m coarsely at lon 140)
    # every merged mode's name is the peak of one of the modes it was made of, and members
    # of one cluster never end up apart
    assert set(labels.unique().tolist()) <= set(split.unique().tolist())
    same_before = split[:, None] == split[None, :]
    same_after = labels[:, None] == labels[None, :]
    assert (same_after | ~same_before).all()


def _split_rate(apart_km: float, n: int, seeds: int) -> float:
    """Share of ``seeds`` draws of n samples of two equal 10 km modes ``apart_km`` apart that
    the finder reports as two regions of at least a fifth each."""
    modes = [(PARIS, 10.0, 0.5), (_offset(PARIS, apart_km, 0.0), 10.0, 0.5)]
    hits = 0
    for seed in range(seeds):
        shares = [r.probability for r in top_regions(_mixture(modes, n, seed=100 + seed))]
        hits += sum(share >= 0.2 for share in shares) >= 2
    return hits / seeds


@pytest.mark.parametrize("apart_km", [30.0, 35.0])
def test_the_decomposition_does_not_follow_the_sample_count(apart_km):
    # Two modes 3-3.5 widths apart, a saddle the old sqrt(N) neighbourhood split in 22-69% of
    # draws of 256 and 66-100% of 1,024: an answer's regions then depended on how many samples
    # it drew. The finder's scale is now a share of the samples, so both counts split alike:
    # within two standard errors of a difference of two binomial shares (and one draw).
    seeds = 32
    small, large = _split_rate(apart_km, 256, seeds), _split_rate(apart_km, 1024, seeds)
    pooled = (small + large) / 2
    assert abs(small - large) <= 2 * math.sqrt(2 * pooled * (1 - pooled) / seeds) + 1 / seeds


def test_modes_five_widths_apart_are_two_regions_at_either_count():
    assert _split_rate(50.0, 256, 16) >= 0.9 and _split_rate(50.0, 1024, 16) >= 0.9


@pytest.mark.parametrize("n", [256, 1024])
def test_a_separate_cluster_smaller_than_the_density_scale_stays_a_region(n):
    # 10% of the samples 400 km away: fewer than the density's neighbourhood at 256 (26 of
    # 32), so their caps reach Paris; the graph links them only to each other, so they stay a
    # region, with their share.
    modes = [(PARIS, 5.0, 0.9), ((45.76, 4.84), 5.0, 0.1)]
    samples = _mixture(modes, n, seed=9)
    regions = top_regions(samples)
    assert len(regions) == 2
    assert _km((45.76, 4.84), regions[1].lat, regions[1].lon) < 10.0
    assert regions[1].probability == pytest.approx(0.1, abs=4 * math.sqrt(0.09 / n))
