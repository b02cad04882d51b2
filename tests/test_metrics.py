"""Metrics: distances, GeoScore, accuracies, NLL, PRDC on hand-made sets, HPD calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from globeflow.core.sphere import EARTH_RADIUS_KM, haversine_km
from globeflow.jobs import metrics as M

PARIS = (48.8566, 2.3522)
LONDON = (51.5074, -0.1278)
NEW_YORK = (40.7128, -74.0060)
LOS_ANGELES = (34.0522, -118.2437)
KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180.0


@pytest.mark.parametrize(
    ("a", "b", "km", "tol"),
    [
        (PARIS, LONDON, 343.5, 1.0),
        (NEW_YORK, LOS_ANGELES, 3936.0, 5.0),
        ((10.0, 20.0), (-10.0, -160.0), math.pi * EARTH_RADIUS_KM, 1e-6),
        ((0.0, 0.0), (0.0, 0.0), 0.0, 1e-9),
    ],
)
def test_haversine_known_pairs(a, b, km, tol):
    assert M.haversine_km_np(a, b) == pytest.approx(km, abs=tol)
    torch_km = haversine_km(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    )
    assert float(torch_km) == pytest.approx(km, abs=max(tol, 1e-3))
    assert M.distance_metrics([a], [b])["mean_km"] == pytest.approx(km, abs=tol)


def test_geoscore_values_and_types():
    assert M.geoscore(0.0) == pytest.approx(5000.0)
    assert M.geoscore(1492.7) == pytest.approx(5000.0 / math.e)
    t = M.geoscore(torch.tensor([0.0, 1492.7]))
    assert isinstance(t, torch.Tensor)
    assert torch.allclose(t, torch.tensor([5000.0, 5000.0 / math.e]))
    a = M.geoscore(np.array([0.0, 2 * 1492.7]))
    np.testing.assert_allclose(a, [5000.0, 5000.0 / math.e**2])


def test_distance_metrics_thresholds():
    errors_km = np.array([0.5, 10.0, 100.0, 500.0, 1000.0, 3000.0])
    true = np.zeros((6, 2))
    pred = np.stack([errors_km / KM_PER_DEG, np.zeros(6)], 1)  # along the prime meridian
    out = M.distance_metrics(pred, true)
    assert out["n"] == 6
    assert out["mean_km"] == pytest.approx(errors_km.mean(), rel=1e-9)
    assert out["median_km"] == pytest.approx(300.0, rel=1e-9)
    assert out["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-errors_km / 1492.7)), rel=1e-9)
    expected = {"acc@1km": 1, "acc@25km": 2, "acc@200km": 3, "acc@750km": 4, "acc@2500km": 5}
    for key, hits in expected.items():
        assert out[key] == pytest.approx(100.0 * hits / 6)
    custom = M.distance_metrics(pred, true, thresholds_km=(50.0,))
    assert custom["acc@50km"] == pytest.approx(100.0 * 2 / 6)


def test_nll_bits_per_dim_uniform():
    lp = torch.full((10,), -math.log(4 * math.pi))
    assert M.nll_bits_per_dim(lp) == pytest.approx(math.log2(4 * math.pi) / 3)
    assert M.nll_bits_per_dim([0.0, -math.log(2) * 6]) == pytest.approx(1.0)


def _equator(lons):
    return np.stack([np.zeros(len(lons)), np.asarray(lons, dtype=float)], 1)


def test_prdc_hand_computed_k1():
    # On the equator distances are proportional to longitude gaps.
    # real radii (k=1): 0->1, 1->1, 3->2, 10->7; fake radii: 0.5->5, 5.5->5, 20->1, 21->1.
    real = _equator([0, 1, 3, 10])
    fake = _equator([0.5, 5.5, 20, 21])
    out = M.prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(2 / 4)  # 0.5 (balls of 0 and 1), 5.5 (ball of 10)
    assert out["density"] == pytest.approx(3 / 4)  # (2 + 1 + 0 + 0) / (k * M)
    assert out["recall"] == pytest.approx(1.0)
    assert out["coverage"] == pytest.approx(3 / 4)  # the ball of 3 (radius 2) holds no fake


def test_prdc_identical_sets_and_chunking():
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)], 1)
    same = M.prdc(pts, pts, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    fake = pts + rng.normal(0, 3, pts.shape)
    big = M.prdc(pts, fake, k=3)
    small = M.prdc(pts, fake, k=3, max_elements=1000)  # many chunks
    assert big == small
    with pytest.raises(ValueError):
        M.prdc(pts[:3], fake, k=3)


# ---- calibration on a von Mises-Fisher distribution around the north pole -------------------


def _vmf_w(kappa: float, size, rng) -> np.ndarray:
    """cos(angle to the mean) of vMF samples on S^2 (exact inverse CDF)."""
    u = rng.uniform(size=size)
    return 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa


def _vmf_log_density(kappa: float, w: np.ndarray) -> np.ndarray:
    return math.log(kappa / (4 * math.pi * math.sinh(kappa))) + kappa * w


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_hpd_coverage_calibrated_model(level):
    rng = np.random.default_rng(1)
    n, s, kappa = 2000, 1000, 8.0
    lp_truth = _vmf_log_density(kappa, _vmf_w(kappa, n, rng))
    lp_samples = _vmf_log_density(kappa, _vmf_w(kappa, (n, s), rng))
    observed = M.hpd_coverage(lp_truth, lp_samples, levels=(level,))[0]
    # Each truth's HPD rank among S samples is uniform on {0..S}: P(inside) = (floor(qS)+1)/(S+1).
    p = (math.floor(level * s) + 1) / (s + 1)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(observed - p) <= 3 * sigma


def test_hpd_coverage_overconfident_model_undercovers():
    rng = np.random.default_rng(2)
    n, s, kappa_true, kappa_model = 2000, 500, 5.0, 50.0
    lp_truth = _vmf_log_density(kappa_model, _vmf_w(kappa_true, n, rng))
    lp_samples = _vmf_log_density(kappa_model, _vmf_w(kappa_model, (n, s), rng))
    observed = M.hpd_coverage(lp_truth, lp_samples, levels=(0.5, 0.9))
    for q, obs in zip((0.5, 0.9), observed, strict=True):
        assert obs < q - 5 * math.sqrt(q * (1 - q) / n)


def test_reliability_curve_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    kappa = 3.0
    lp_truth = _vmf_log_density(kappa, _vmf_w(kappa, 400, rng))
    lp_samples = _vmf_log_density(kappa, _vmf_w(kappa, (400, 200), rng))
    curve = M.reliability_curve(lp_truth, lp_samples, num_levels=11)
    assert curve.n == 400
    assert curve.levels[0] == 0.0 and curve.levels[-1] == 1.0
    assert curve.observed[-1] == 1.0
    assert all(a <= b for a, b in zip(curve.observed, curve.observed[1:], strict=False))
    assert curve.calibration_error < 0.1
    path = M.plot_reliability(curve, tmp_path / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_admin_accuracy():
    pred = [
        {"country_code": "FR", "country": "France", "region": "Ile-de-France", "city": "Paris"},
        {"country_code": "FR", "country": "France", "region": "Bretagne", "city": "Rennes"},
        {
            "country_code": "US",
            "country": "United States",
            "region": "Illinois",
            "city": "Springfield",
        },
        {"country_code": "JP", "country": "Japan", "region": "Tokyo", "city": "Tokyo"},
    ]
    true = [
        {"country": "FR", "region": "ile-de-france", "city": "Paris"},  # ISO code, other case
        {"country": "France", "region": "Ile-de-France", "city": ""},  # name, no city label
        {
            "country_code": "GB",
            "country": "United Kingdom",
            "region": "Illinois",
            "city": "Springfield",
        },
        {"country": "Japan", "region": "Tokyo", "city": "Tokyo"},
    ]
    out = M.admin_accuracy(pred, true)
    assert out["country_acc"] == pytest.approx(75.0)
    assert out["region_acc"] == pytest.approx(50.0)  # same region name in another country misses
    assert out["city_acc"] == pytest.approx(100.0 * 2 / 3)
    assert out["city_n"] == 3


def test_sliced_wasserstein_km():
    from globeflow.core.sphere import sample_uniform_sphere, unit_to_latlon

    g = torch.Generator().manual_seed(0)
    a = unit_to_latlon(sample_uniform_sphere((2000,), generator=g, dtype=torch.float64))
    b = unit_to_latlon(sample_uniform_sphere((2000,), generator=g, dtype=torch.float64))
    # Same set in another order: exactly 0. Two uniform draws: small (sampling noise only).
    assert float(M.sliced_wasserstein_km(a, a[torch.randperm(2000, generator=g)])) == 0.0
    noise = float(M.sliced_wasserstein_km(a, b))
    assert 0 < noise < 200
    # A set moved 1 degree north: about 111 km times the mean |d projection / d lat| (< 1).
    shifted = a.clone()
    shifted[:, 0] = (a[:, 0] + 1.0).clamp(max=90)
    moved = float(M.sliced_wasserstein_km(a, shifted))
    assert 20 < moved <= 111.3
    # Bounded by the mean paired distance (a W1 property).
    paired = float(M.haversine_km_np(a.numpy(), shifted.numpy()).mean())
    assert moved <= paired + 1e-6
