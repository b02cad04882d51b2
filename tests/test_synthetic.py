"""Synthetic conditioning with a known posterior: spreads, normalisation, separability, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from globeflow.core.sphere import (
    EARTH_RADIUS_KM,
    exp_map,
    haversine_km,
    latlon_grid,
    latlon_to_unit,
    tangent_basis,
    unit_to_latlon,
)
from globeflow.core.vmf import vmf_mean_resultant
from globeflow.data import synthetic
from globeflow.data.embedding_store import read_embeddings

RAYLEIGH_MEDIAN = math.sqrt(2 * math.log(2))  # median / scale of the Rayleigh law


@pytest.fixture(scope="module")
def patterns() -> synthetic.SyntheticPatterns:
    return synthetic.make_patterns(cond_dim=64, seed=0)


def test_patterns_cover_every_scale_unimodal_and_multimodal(patterns):
    for scale in synthetic.SCALES_KM:
        modes = patterns.num_modes[patterns.scale_km == scale]
        assert sorted(modes.tolist()) == [1, 1, 3, 3]
        w = patterns.weights[(patterns.scale_km == scale) & (patterns.num_modes == 3)]
        assert torch.allclose(w.sum(-1), torch.ones(2, dtype=torch.float64))
        assert not torch.allclose(w[0], w[1])  # equal and unequal weights
    assert torch.allclose(patterns.kappa, (EARTH_RADIUS_KM / patterns.scale_km) ** 2)


@pytest.mark.parametrize("scale_km", synthetic.SCALES_KM)
def test_vmf_scale_gives_the_stated_km_spread(patterns, scale_km):
    p = int(((patterns.scale_km == scale_km) & (patterns.num_modes == 1)).nonzero()[0])
    n = 40_000
    g = torch.Generator().manual_seed(1)
    samples = synthetic.sample_posterior(patterns, torch.tensor([p]), n, g)[0]
    km = haversine_km(samples, patterns.centres[p, 0].expand(n, 2))
    # Exact for every kappa: E[1 - mu.x] = 1 - A(kappa); tolerance 4 standard errors.
    one_minus_cos = 1 - torch.cos(km / EARTH_RADIUS_KM)
    expected = 1 - vmf_mean_resultant(patterns.kappa[p])
    stderr = one_minus_cos.std() / math.sqrt(n)
    assert abs(one_minus_cos.mean() - expected) < 4 * stderr
    if scale_km <= 200:  # the tangent plane is flat there: Rayleigh law of scale s km
        median = km.median()
        # Relative sd of the sample median: 1 / (2 m f(m) sqrt(n)) = 1 / (2 ln2 sqrt(n)) = 0.36%.
        assert abs(median / (RAYLEIGH_MEDIAN * scale_km) - 1) < 0.02


def _polar_mass(patterns, p: int, centre: torch.Tensor, radius_rad: float) -> float:
    """Mass of pattern p's density in a geodesic disc around ``centre`` (polar quadrature)."""
    theta = torch.linspace(0, radius_rad, 4001, dtype=torch.float64)[1:]
    theta = theta - theta[0] / 2  # cell centres
    phi = torch.linspace(0, 2 * math.pi, 65, dtype=torch.float64)[:-1]
    mu = latlon_to_unit(centre)
    e1, e2 = tangent_basis(mu)
    v = torch.cos(phi)[:, None, None] * e1 + torch.sin(phi)[:, None, None] * e2  # (F, 1, 3)
    x = exp_map(mu.expand(len(phi), len(theta), 3), v * theta[None, :, None])
    latlon = unit_to_latlon(x).reshape(1, -1, 2)
    dens = synthetic.posterior_log_density(patterns, torch.tensor([p]), latlon).exp()
    dens = dens.reshape(len(phi), len(theta))
    area = torch.sin(theta) * (theta[1] - theta[0]) * (2 * math.pi / len(phi))
    return float((dens * area).sum())


def test_sharp_densities_are_normalised(patterns):
    """Each cluster holds its weight: polar quadrature out to 12 scales (tail e^-72)."""
    for p in range(len(patterns)):
        scale = float(patterns.scale_km[p])
        if scale > 200:
            continue
        k = int(patterns.num_modes[p])
        for m in range(k):
            mass = _polar_mass(patterns, p, patterns.centres[p, m], 12 * scale / EARTH_RADIUS_KM)
            assert mass == pytest.approx(float(patterns.weights[p, m]), rel=1e-4)


def test_broad_densities_are_normalised(patterns):
    latlon, w = latlon_grid(720, 1440)
    broad = (patterns.scale_km >= 200).nonzero()[:, 0]
    dens = synthetic.posterior_log_density(patterns, broad, latlon.expand(len(broad), -1, -1))
    mass = (dens.exp() * w).sum(-1)
    assert torch.allclose(mass, torch.ones_like(mass), atol=2e-3)


def test_sampler_follows_the_weights_and_the_density(patterns):
    p = int(((patterns.num_modes == 3) & (patterns.scale_km == 25)).nonzero()[-1])
    n = 20_000
    samples = synthetic.sample_posterior(
        patterns, torch.tensor([p]), n, torch.Generator().manual_seed(2)
    )
    mode, km = synthetic.mode_of(patterns, torch.tensor([p]), samples)
    share = torch.bincount(mode[0], minlength=3).double() / n
    w = patterns.weights[p]
    assert torch.all((share - w).abs() < 4 * torch.sqrt(w * (1 - w) / n))
    # mode_of's distance is the great-circle distance to that centre.
    centre = patterns.centres[p][mode[0]]
    assert torch.allclose(km[0], haversine_km(samples[0], centre), atol=1e-6)
    # Samples sit where the density is: mean log-density = minus the entropy of a Gaussian
    # mixture with well-separated parts: H = sum w (1 + log(2 pi s^2)) - sum w log w (sr units).
    s = 25 / EARTH_RADIUS_KM
    entropy = 1 + math.log(2 * math.pi * s**2) - float((w * w.log()).sum())
    log_p = synthetic.posterior_log_density(patterns, torch.tensor([p]), samples)
    assert float(log_p.mean()) == pytest.approx(-entropy, abs=0.05)


def test_patterns_are_separable(patterns):
    held = synthetic.make_heldout(patterns, per_pattern=16, seed=5)
    found, log_odds = synthetic.pattern_log_odds(patterns, held["embeddings"])
    assert torch.equal(found, held["pattern"])
    # Code distance ~ sqrt(2 * 64) = 11 against noise 0.8: log odds in the thousands.
    assert float(log_odds.min()) > 1000


def test_deterministic_by_seed(tmp_path):
    a, b = synthetic.make_patterns(32, seed=7), synthetic.make_patterns(32, seed=7)
    assert torch.equal(a.codes, b.codes) and a.names == b.names
    c = synthetic.make_patterns(32, seed=8)
    assert not torch.equal(a.codes, c.codes)
    synthetic.write_store(tmp_path / "one.parquet", a, 50, seed=3)
    synthetic.write_store(tmp_path / "two.parquet", a, 50, seed=3)
    one, two = read_embeddings(tmp_path / "one.parquet"), read_embeddings(tmp_path / "two.parquet")
    assert one.ids == two.ids
    assert torch.equal(one.embeddings, two.embeddings) and torch.equal(one.latlon, two.latlon)
    held = [synthetic.make_heldout(a, 2, seed=4) for _ in range(2)]
    assert all(torch.equal(held[0][k], held[1][k]) for k in held[0])


def test_store_is_what_train_reads(tmp_path, patterns):
    store = synthetic.write_store(tmp_path / "s.parquet", patterns, 60, seed=1, chunk_rows=16)
    table = read_embeddings(store)
    assert table.dim == patterns.cond_dim and table.encoder_name == synthetic.ENCODER_NAME
    pattern = torch.tensor([int(i.rsplit("-p", 1)[1]) for i in table.ids])
    assert torch.equal(torch.bincount(pattern), torch.full((len(patterns),), 3))
    found, _ = synthetic.pattern_log_odds(patterns, table.embeddings)
    assert torch.equal(found, pattern)
    _, km = synthetic.mode_of(patterns, pattern, table.latlon[:, None])
    assert torch.all(km[:, 0] < 12 * patterns.scale_km[pattern])
    with pytest.raises(FileExistsError, match="s.parquet"):
        synthetic.write_store(store, patterns, 10)


def test_patterns_and_heldout_round_trip(tmp_path, patterns):
    synthetic.save_patterns(patterns, tmp_path)
    back = synthetic.load_patterns(tmp_path)
    for name in ("codes", "centres", "weights", "scale_km"):
        assert torch.equal(getattr(back, name), getattr(patterns, name))
    assert back.names == patterns.names and back.cities == patterns.cities
    held = synthetic.make_heldout(patterns, 2)
    synthetic.save_heldout(held, tmp_path / "h.pt")
    again = synthetic.load_heldout(tmp_path / "h.pt")
    assert all(torch.equal(held[k], again[k]) for k in held)
    with pytest.raises(FileNotFoundError, match="patterns.json"):
        synthetic.load_patterns(tmp_path / "missing")
