"""Closed-form baselines on S^2: uniform, von Mises-Fisher regression, mixture of vMF.

All three implement :class:`GeoModel` with exact densities (natural log, per steradian) and
exact samplers (the vMF maths is :mod:`globeflow.core.vmf`). Densities are evaluated in float64:
with kappa up to 1e7 a float32 dot product would cost whole nats near the mode.

With ``cond_dim == 0`` (unconditional use) the parameter network is a learned constant vector;
:func:`fit_vmf_mixture_em` fits that vector by expectation-maximisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from globeflow.core.families.base import GeoModel
from globeflow.core.sphere import LOG_UNIFORM_DENSITY, project_to_sphere
from globeflow.core.vmf import (
    KAPPA_MAX,
    KAPPA_MIN,
    sample_vmf,
    vmf_kappa_from_resultant,
    vmf_log_density,
    vmf_log_normalizer,
)


# ---- parameter networks ----------------------------------------------------------------------
class _ConstantHead(nn.Module):
    """The unconditional 'network': a learned vector, broadcast over the batch."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.bias.to(emb.dtype).expand(emb.shape[0], -1)


def _make_head(cond_dim: int, out_dim: int, hidden: int, depth: int) -> nn.Module:
    """MLP (cond_dim -> hidden x depth -> out_dim, SiLU), or a constant when cond_dim == 0."""
    if cond_dim == 0:
        return _ConstantHead(out_dim)
    layers: list[nn.Module] = []
    width = cond_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, out_dim)
    # Small initial outputs: near-uniform mixture weights, kappa ~ softplus(0) at the start.
    nn.init.normal_(last.weight, std=1e-3)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """raw with softplus(raw) = y, for y > 0: y + log(1 - e^-y)."""
    y = y.to(torch.float64)
    return y + torch.log(-torch.expm1(-y))


def _kappa(raw: torch.Tensor, kappa_max: float) -> torch.Tensor:
    return F.softplus(raw.to(torch.float64)).clamp(KAPPA_MIN, kappa_max)


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("family", "format", "metadata")}


# ---- models ----------------------------------------------------------------------------------
class UniformSphere(GeoModel):
    """p(x | c) = 1 / (4 pi) per steradian, whatever the condition."""

    family = "uniform"
    density_space = "sphere"

    def __init__(self, cond_dim: int):
        super().__init__()
        self.cond_dim = cond_dim
        # No parameters; the buffer gives the model a device and a non-empty state dict.
        self.register_buffer("anchor", torch.zeros(1))

    def log_prob_unit(self, x, emb, steps=None, precision=None):
        return torch.full(x.shape[:-1], LOG_UNIFORM_DENSITY, dtype=x.dtype, device=x.device)

    def loss(self, x0, emb, generator=None):
        return torch.tensor(-LOG_UNIFORM_DENSITY, dtype=x0.dtype, device=x0.device)

    def sample_unit(self, emb, recipe, noise=None, generator=None):
        num_samples = recipe.num_samples
        g = torch.randn(
            emb.shape[0], num_samples, 3, generator=generator, dtype=emb.dtype, device=emb.device
        )
        return project_to_sphere(g)

    def config_dict(self) -> dict:
        return {"family": self.family, "cond_dim": self.cond_dim}

    @classmethod
    def from_config(cls, config: dict) -> UniformSphere:
        return cls(**_strip(config))


class _ConcentrationHead(GeoModel):
    """A family whose head maps an embedding to vMF parameters: its config is its family,
    ``cond_dim``, the sizes it takes from training (:attr:`training_options`) and
    ``kappa_max``."""

    kappa_max: float

    def config_dict(self) -> dict:
        sizes = {arg: getattr(self, arg) for arg in self.training_options}
        return {"family": self.family, "cond_dim": self.cond_dim, **sizes,
                "kappa_max": self.kappa_max}  # fmt: skip

    @classmethod
    def from_config(cls, config: dict) -> GeoModel:
        return cls(**_strip(config))


class VonMisesFisherMixture(_ConcentrationHead):
    """p(x | c) = sum_k pi_k(c) vMF(x; mu_k(c), kappa_k(c)), parameters from an MLP of c.

    ``steps``, ``guidance``, ``solver``, ``precision`` and ``noise`` of the GeoModel API are
    accepted and ignored.
    """

    family = "vmf-mixture"
    training_options = {
        "num_components": "num_components",
        "hidden": "hidden",
        "depth": "head_depth",
    }
    density_space = "sphere"

    def __init__(
        self,
        cond_dim: int,
        num_components: int = 16,
        hidden: int = 512,
        depth: int = 2,
        kappa_max: float = KAPPA_MAX,
    ):
        super().__init__()
        self.cond_dim = cond_dim
        self.num_components = num_components
        self.hidden = hidden
        self.depth = depth
        self.kappa_max = float(kappa_max)
        self.head = _make_head(cond_dim, num_components * 5, hidden, depth)
        if cond_dim == 0:
            with torch.no_grad():
                # Spread the initial means so that SGD does not start from K identical components.
                g = torch.Generator().manual_seed(0)
                means = torch.randn(num_components, 3, generator=g)
                self.head.bias[num_components : 4 * num_components] = means.reshape(-1)

    def parameters_for(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log weights (B, K), means (B, K, 3) unit, kappas (B, K)), all float64."""
        k = self.num_components
        out = self.head(emb).to(torch.float64)
        log_w = torch.log_softmax(out[:, :k], dim=-1)
        raw_mu = out[:, k : 4 * k].reshape(-1, k, 3)
        mu = raw_mu / raw_mu.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kappa = _kappa(out[:, 4 * k :], self.kappa_max)
        return log_w, mu, kappa

    def log_prob_unit(self, x, emb, steps=None, precision=None):
        log_w, mu, kappa = self.parameters_for(emb)
        x64 = project_to_sphere(x.to(torch.float64))
        cos_minus_one = torch.einsum("bmd,bkd->bmk", x64, mu) - 1.0
        comp = vmf_log_normalizer(kappa)[:, None, :] + kappa[:, None, :] * cos_minus_one
        return torch.logsumexp(log_w[:, None, :] + comp, dim=-1).to(x.dtype)

    def loss(self, x0, emb, generator=None):
        return -self.log_prob_unit(x0[:, None, :], emb).mean()

    def sample_unit(self, emb, recipe, noise=None, generator=None):
        num_samples = recipe.num_samples
        with torch.no_grad():
            log_w, mu, kappa = self.parameters_for(emb)
            idx = torch.multinomial(log_w.exp(), num_samples, replacement=True, generator=generator)
            mu_s = torch.gather(mu, 1, idx[..., None].expand(-1, -1, 3))
            kappa_s = torch.gather(kappa, 1, idx)
            return sample_vmf(mu_s, kappa_s, generator).to(emb.dtype)

    @torch.no_grad()
    def set_unconditional_parameters(
        self, weights: torch.Tensor, means: torch.Tensor, kappas: torch.Tensor
    ) -> None:
        """Write fixed mixture parameters (K,), (K, 3), (K,) into the constant head (cond_dim 0)."""
        if self.cond_dim != 0:
            raise ValueError("fixed parameters need an unconditional model (cond_dim == 0)")
        w = weights.to(torch.float64).clamp_min(1e-300)
        vec = torch.cat(
            [
                torch.log(w / w.sum()),
                project_to_sphere(means.to(torch.float64)).reshape(-1),
                _softplus_inverse(kappas.clamp(KAPPA_MIN, self.kappa_max)),
            ]
        )
        self.head.bias.copy_(vec.to(self.head.bias.dtype))


class VonMisesFisher(_ConcentrationHead):
    """vMF regression: p(x | c) = vMF(x; mu(c), kappa(c)), mu and kappa from an MLP of c."""

    family = "vmf"
    training_options = {"hidden": "hidden", "depth": "head_depth"}
    density_space = "sphere"

    def __init__(
        self, cond_dim: int, hidden: int = 512, depth: int = 2, kappa_max: float = KAPPA_MAX
    ):
        super().__init__()
        self.cond_dim = cond_dim
        self.hidden = hidden
        self.depth = depth
        self.kappa_max = float(kappa_max)
        self.head = _make_head(cond_dim, 4, hidden, depth)
        if cond_dim == 0:
            with torch.no_grad():
                self.head.bias[2] = 1.0

    def parameters_for(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means (B, 3) unit, kappas (B,)), float64."""
        out = self.head(emb).to(torch.float64)
        mu = out[:, :3] / out[:, :3].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return mu, _kappa(out[:, 3], self.kappa_max)

    def log_prob_unit(self, x, emb, steps=None, precision=None):
        mu, kappa = self.parameters_for(emb)
        x64 = project_to_sphere(x.to(torch.float64))
        return vmf_log_density(x64, mu[:, None, :], kappa[:, None]).to(x.dtype)

    def loss(self, x0, emb, generator=None):
        return -self.log_prob_unit(x0[:, None, :], emb).mean()

    def sample_unit(self, emb, recipe, noise=None, generator=None):
        num_samples = recipe.num_samples
        with torch.no_grad():
            mu, kappa = self.parameters_for(emb)
            b = emb.shape[0]
            mu_s = mu[:, None, :].expand(b, num_samples, 3)
            kappa_s = kappa[:, None].expand(b, num_samples)
            return sample_vmf(mu_s, kappa_s, generator).to(emb.dtype)

    @torch.no_grad()
    def set_unconditional_parameters(self, mean: torch.Tensor, kappa: float) -> None:
        """Write a fixed mean (3,) and concentration into the constant head (cond_dim 0)."""
        if self.cond_dim != 0:
            raise ValueError("fixed parameters need an unconditional model (cond_dim == 0)")
        k = torch.tensor([min(max(float(kappa), KAPPA_MIN), self.kappa_max)])
        vec = torch.cat([project_to_sphere(mean.to(torch.float64)), _softplus_inverse(k)])
        self.head.bias.copy_(vec.to(self.head.bias.dtype))


BASELINES: dict[str, type[GeoModel]] = {
    "uniform": UniformSphere,
    "vmf": VonMisesFisher,
    "vmf-mixture": VonMisesFisherMixture,
}


# ---- expectation-maximisation ---------------------------------------------------------------
def _kmeans_pp(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the sphere with squared chord distance 2 (1 - cos): (k, 3)."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [points[first]]
    dist = (2.0 - 2.0 * points @ points[first]).clamp_min(0.0)
    for _ in range(1, k):
        total = dist.sum()
        if total <= 0:  # fewer distinct points than components
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(dist / total, 1, generator=generator))
        centers.append(points[idx])
        dist = torch.minimum(dist, (2.0 - 2.0 * points @ points[idx]).clamp_min(0.0))
    return torch.stack(centers)


def _m_step(
    points: torch.Tensor, resp: torch.Tensor, kappa_max: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = resp.sum(0)
    sums = resp.T @ points
    norms = sums.norm(dim=-1)
    means = sums / norms.clamp_min(1e-300)[:, None]
    rbar = (norms / counts.clamp_min(1e-300)).clamp(0.0, 1.0)
    kappas = vmf_kappa_from_resultant(rbar, kappa_max)
    return counts / counts.sum(), means, kappas


def fit_vmf_mixture_em(
    points: torch.Tensor,
    K: int,
    iters: int = 200,
    init: str = "kmeans++",
    seed: int = 0,
    tol: float = 1e-7,
    kappa_max: float = KAPPA_MAX,
    verbose: bool = False,
) -> VonMisesFisherMixture:
    """Unconditional maximum-likelihood vMF mixture on S^2 by EM.

    points: (N, 3) unit vectors. E step: exact responsibilities (float64). M step: weights and
    means in closed form, kappa by an exact Newton solve of coth(k) - 1/k = rbar, clipped to
    ``kappa_max`` (duplicated points would otherwise drive kappa to infinity). ``init`` is
    "kmeans++" (k-means++ seeds, then one hard-assignment M step) or "random" (random data points).
    Components that lose all their mass are re-seeded at the worst-explained point.
    Stops after ``iters`` iterations or when the mean log-likelihood gains less than ``tol`` nats.

    Returns a ``VonMisesFisherMixture(cond_dim=0, num_components=K)`` whose constant head holds
    the fit; ``model.em_log_likelihood`` is the final mean training log-likelihood (nats/point).
    """
    x = project_to_sphere(torch.as_tensor(points).to(torch.float64))
    n = x.shape[0]
    if n == 0:
        raise ValueError("no points to fit")
    g = torch.Generator().manual_seed(seed)
    if init == "kmeans++":
        centers = _kmeans_pp(x, K, g)
    elif init == "random":
        centers = x[torch.randperm(n, generator=g)[:K]]
        if centers.shape[0] < K:
            centers = x[torch.randint(n, (K,), generator=g)]
    else:
        raise ValueError(f"unknown init {init!r}; choose 'kmeans++' or 'random'")
    hard = (x @ centers.T).argmax(-1)
    resp = F.one_hot(hard, K).to(torch.float64)
    # Empty clusters (duplicate seeds) get their seed point so every component starts defined.
    empty = resp.sum(0) == 0
    weights, m2, k2 = _m_step(x, resp + 1e-12, kappa_max)
    means = torch.where(empty[:, None], centers, m2)
    kappas = torch.where(empty, torch.full_like(k2, 10.0), k2)
    prev = -math.inf
    ll = -math.inf
    for it in range(iters):
        log_w = torch.log(weights.clamp_min(1e-300))
        comp = vmf_log_normalizer(kappas)[None, :] + kappas[None, :] * (x @ means.T - 1.0)
        joint = log_w[None, :] + comp
        log_px = torch.logsumexp(joint, dim=-1)
        ll = float(log_px.mean())
        resp = torch.exp(joint - log_px[:, None])
        if verbose and (it % 20 == 0 or it == iters - 1):
            print(f"  EM K={K} iter {it}: mean log-lik {ll:.5f} nats")
        weights, means, kappas = _m_step(x, resp, kappa_max)
        dead = weights * n < 1e-3
        if bool(dead.any()):
            worst = torch.argsort(log_px)[: int(dead.sum())]
            means[dead] = x[worst]
            kappas[dead] = kappas[~dead].median() if bool((~dead).any()) else 10.0
            weights[dead] = 1.0 / n
            weights = weights / weights.sum()
        elif ll - prev < tol:
            break
        prev = ll
    model = VonMisesFisherMixture(cond_dim=0, num_components=K, kappa_max=kappa_max)
    model.set_unconditional_parameters(weights, means, kappas)
    model.em_log_likelihood = ll
    return model
