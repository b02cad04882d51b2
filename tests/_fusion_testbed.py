"""A testbed with a known answer for fusing photos: every density is a mixture of von
Mises-Fisher densities, so products (the exact fused posterior) are mixtures of vMF too.

A "photo" reveals one cue about a true location y*: its likelihood L_i(y) is a vMF mixture
(country scale, a coast, a latitude band, city scale). The prior p(y) (the null condition) is a
vMF mixture as well. Photo i's posterior is p(y | c_i) = p(y) L_i(y) / Z_i and the photos'
joint posterior p(y) prod_i L_i(y) / Z: all closed form (:func:`product`). The model,
:class:`ClosedFormCues`, speaks the :class:`GeoModel` interface: embedding e_i (one-hot) is
photo i, the zeros embedding the null condition. Used by tests/test_fusion.py and
benchmarks/fusion.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from globeflow.core.families.baselines import VonMisesFisherMixture
from globeflow.core.sphere import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon
from globeflow.core.vmf import sample_vmf, vmf_log_normalizer

PRUNE_NATS = 40.0
"""Components this far below the heaviest one in a product are dropped (weight < e^-40)."""


@dataclass
class Mixture:
    """sum_k exp(log_w_k) vMF(x; mu_k, kappa_k): log_w (K,), mu (K, 3), kappa (K,), float64.
    Not necessarily normalised: its integral over the sphere is sum exp(log_w)."""

    log_w: torch.Tensor
    mu: torch.Tensor
    kappa: torch.Tensor

    @property
    def log_mass(self) -> float:
        return float(torch.logsumexp(self.log_w, 0))

    def normalised(self) -> Mixture:
        return Mixture(self.log_w - torch.logsumexp(self.log_w, 0), self.mu, self.kappa)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mixture at unit vectors x (M, 3) -> (M,)."""
        cos = x.double() @ self.mu.T
        comp = vmf_log_normalizer(self.kappa) + self.kappa * (cos - 1.0)
        return torch.logsumexp(self.log_w + comp, -1)

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k exact samples (k, 3) of the normalised mixture."""
        idx = torch.multinomial(self.normalised().log_w.exp(), k, True, generator=generator)
        return sample_vmf(self.mu[idx], self.kappa[idx], generator)


def product(a: Mixture, b: Mixture) -> Mixture:
    """The pointwise product of two vMF mixtures, as a vMF mixture (exact):
    C(k1) e^{k1 (m1.x - 1)} C(k2) e^{k2 (m2.x - 1)} = C(k1) C(k2) / C(|K|) e^{|K| - k1 - k2}
    vMF(x; K / |K|, |K|) with K = k1 m1 + k2 m2."""
    big = a.kappa[:, None, None] * a.mu[:, None] + b.kappa[None, :, None] * b.mu[None]
    kappa = big.norm(dim=-1).clamp_min(1e-9)
    log_w = (
        a.log_w[:, None]
        + b.log_w[None]
        + vmf_log_normalizer(a.kappa)[:, None]
        + vmf_log_normalizer(b.kappa)[None]
        - vmf_log_normalizer(kappa)
        + kappa
        - a.kappa[:, None]
        - b.kappa[None]
    ).reshape(-1)
    keep = log_w > log_w.max() - PRUNE_NATS
    mu = (big / kappa[..., None]).reshape(-1, 3)
    return Mixture(log_w[keep], mu[keep], kappa.reshape(-1)[keep])


def vmf(latlon: tuple[float, float], scale_km: float, log_w: float = 0.0) -> Mixture:
    """One vMF component at latlon whose angular scale 1 / sqrt(kappa) is scale_km on Earth."""
    mu = latlon_to_unit(torch.tensor([latlon], dtype=torch.float64))
    kappa = torch.tensor([(EARTH_RADIUS_KM / scale_km) ** 2], dtype=torch.float64)
    return Mixture(torch.tensor([log_w], dtype=torch.float64), mu, kappa)


def along(points: torch.Tensor, scale_km: float) -> Mixture:
    """Equal-weight kernels of scale_km at points (K, 2) degrees: a line-shaped cue."""
    k = points.shape[0]
    mu = latlon_to_unit(points.double())
    kappa = torch.full((k,), (EARTH_RADIUS_KM / scale_km) ** 2, dtype=torch.float64)
    return Mixture(torch.full((k,), -math.log(k), dtype=torch.float64), mu, kappa)


def concat(*mixtures: Mixture) -> Mixture:
    """The sum of mixtures."""
    parts = zip(*((m.log_w, m.mu, m.kappa) for m in mixtures))
    return Mixture(*(torch.cat(p) for p in parts))


def uniform_prior() -> Mixture:
    """The uniform density as a (flat) vMF."""
    return Mixture(
        torch.zeros(1, dtype=torch.float64),
        torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
        torch.tensor([1e-9], dtype=torch.float64),
    )


def _offset(latlon: torch.Tensor, km: float, bearing: float) -> torch.Tensor:
    """The point km away from latlon (2,) degrees along bearing (radians) on the sphere."""
    x = latlon_to_unit(latlon.double())
    north = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    east = torch.linalg.cross(north, x)
    east = east / east.norm()
    up = torch.linalg.cross(x, east)
    d = km / EARTH_RADIUS_KM
    direction = math.cos(bearing) * up + math.sin(bearing) * east
    return unit_to_latlon(math.cos(d) * x + math.sin(d) * direction)


def scenario(truth: tuple[float, float], generator: torch.Generator) -> tuple[Mixture, dict]:
    """(prior, {cue name: likelihood}) around a true location: country scale (300 km), a coast
    through it (kernels of 40 km over 3,000 km), its latitude band (150 km) and city scale
    (25 km); cue centres are displaced from the truth as real cues would be."""
    y = torch.tensor(truth, dtype=torch.float64)

    def rand() -> float:
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    centres = torch.stack([_offset(y, 2000 + 3000 * rand(), 6.283 * rand()) for _ in range(5)])
    land, flat = along(centres, 1500.0), uniform_prior()
    half = math.log(0.5)
    prior = concat(
        Mixture(land.log_w + half, land.mu, land.kappa),
        Mixture(flat.log_w + half, flat.mu, flat.kappa),
    )
    bearing = 6.283 * rand()
    coast = torch.stack([_offset(y, km, bearing) for km in range(-1500, 1501, 75)])
    lat = float(y[0]) + (rand() - 0.5)
    band = torch.tensor([[lat, lon] for lon in range(-180, 180, 2)], dtype=torch.float64)
    cues = {
        "country": vmf(tuple(_offset(y, 150 * rand(), 6.283 * rand()).tolist()), 300.0),
        "coast": along(coast, 40.0),
        "latitude band": along(band, 150.0),
        "city": vmf(tuple(_offset(y, 15 * rand(), 6.283 * rand()).tolist()), 25.0),
    }
    return prior, cues


class ClosedFormCues(VonMisesFisherMixture):
    """p(y | c) for the testbed: the one-hot embedding e_i gives photo i's posterior
    prior x L_i (normalised), the zeros embedding the prior. Exact densities and samples."""

    family = "closed-form-cues"

    def __init__(self, prior: Mixture, cues: list[Mixture]):
        posteriors = [product(prior, cue).normalised() for cue in cues]
        width = max(p.log_w.numel() for p in [prior, *posteriors])
        super().__init__(cond_dim=len(cues), num_components=width, hidden=1, depth=0)
        padded = [_padded(m.normalised(), width) for m in [prior, *posteriors]]
        self.table = [torch.stack(parts) for parts in zip(*padded)]

    def parameters_for(self, emb: torch.Tensor):
        zero = emb.abs().sum(-1) == 0
        row = torch.where(zero, 0, emb.argmax(-1) + 1).cpu()
        log_w, mu, kappa = (t[row] for t in self.table)
        return log_w, mu, kappa

    def log_prob_unit(self, x, emb, steps=None, precision=None):
        # The parent's (B, M, K) float64 tensor would not fit for thousands of components.
        parent = super().log_prob_unit
        return torch.cat(
            [parent(x[:, i : i + 256], emb, steps) for i in range(0, x.shape[1], 256)], 1
        )


def _padded(m: Mixture, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pad = width - m.log_w.numel()
    log_w = torch.cat([m.log_w, torch.full((pad,), -math.inf, dtype=torch.float64)])
    mu = torch.cat([m.mu, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64).expand(pad, 3)])
    kappa = torch.cat([m.kappa, torch.ones(pad, dtype=torch.float64)])
    return log_w, mu, kappa


def oracle(prior: Mixture, cues: list[Mixture]) -> Mixture:
    """The exact joint posterior prior x prod_i L_i, unnormalised (its mass is Z_all)."""
    out = prior
    for cue in cues:
        out = product(out, cue)
    return out


def log_bayes_factor(prior: Mixture, cues: list[Mixture]) -> float:
    """Exact log Z = log Z_all - sum_i log Z_i (module doc)."""
    return oracle(prior, cues).log_mass - sum(product(prior, c).log_mass for c in cues)
