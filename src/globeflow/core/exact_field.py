"""Exact RFM fields for sharp, multimodal targets on S^2: a testbed with a known answer.

Riemannian flow matching moves uniform noise (signal level gamma = 0) along geodesics to data
(gamma = 1). Given a data point a, the point at level gamma lies on the geodesic from the noise
point to a, at an angle d = s d0 from a, where s = 1 - gamma and d0 is the noise point's angle
from a (density sin(d0) / 2 on [0, pi]). So its density per steradian is the *kernel*

    k_s(d) = sin(d / s) / (4 pi s sin d)   for d < s pi, else 0,

and its velocity is log_x(a) / s. For a target made of atoms a_j with weights w_j, the marginal
density at level gamma is sum_j w_j k_s(d_j) and the marginal field (what a perfectly trained
network outputs) is the kernel-weighted mean of the atoms' velocities. Both are closed-form.

A testbed stops the path at a level gamma_end < 1: its target is the continuous density
``sum_j w_j k_{s_end}(d_j)`` (each atom smoothed over about 1.71 s_end radians RMS), with a
closed-form log-density and exact samples. :class:`ExactMixtureNetwork` stands in for the
denoising network of a :class:`~globeflow.core.families.RiemannianFlowMatching` model, so the
model's own samplers, likelihood and localizability run on the exact field, in float64. The
embedding is one-hot over the testbed's targets; the model's signal level tau in [0, 1] maps
to gamma = gamma_end tau.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from globeflow.core.network import Conditioning
from globeflow.core.sampler_settings import FULL_PRECISION
from globeflow.core.sphere import (
    EARTH_RADIUS_KM,
    angle_between,
    exp_map,
    latlon_to_unit,
    log_map,
    tangent_basis,
)

KERNEL_RMS_ANGLE = math.sqrt((math.pi**2 - 4.0) / 2.0)
"""RMS of the noise angle d0 (density sin(d0) / 2 on [0, pi]): a kernel of width s has an RMS
angular radius of KERNEL_RMS_ANGLE * s radians (1.71 s)."""

_OUT_OF_SUPPORT = -1.0e6
"""Log-weight of atoms whose kernel is zero at x: far below any in-support weight, and graded by
distance, so that a point outside every kernel (reachable only through solver error) is pulled
to its nearest atom, as the nearest atom's own path would do."""


def kernel_width_for_rms_km(rms_km: float) -> float:
    """Kernel width s whose RMS radius on the Earth is ``rms_km`` kilometres."""
    return rms_km / (KERNEL_RMS_ANGLE * EARTH_RADIUS_KM)


def log_kernel(angle: torch.Tensor, width: torch.Tensor | float) -> torch.Tensor:
    """log k_s(d) for angles d (radians, any shape) and widths s (broadcastable) in (0, 1];
    ``-inf`` outside the support d >= s pi."""
    width = torch.as_tensor(width, dtype=angle.dtype, device=angle.device)
    scaled = angle / width
    inside = scaled < math.pi
    # sin(d / s) / sin(d) -> 1 / s as d -> 0: the ratio in a form that is exact at d = 0.
    safe = angle.clamp_min(1e-300)
    ratio = torch.where(
        angle > 1e-8,
        torch.sin(scaled.clamp(max=math.pi)) / torch.sin(safe),
        1.0 / width * (1.0 - scaled**2 / 6.0) / (1.0 - angle**2 / 6.0),
    )
    log_k = torch.log(ratio.clamp_min(0.0)) - math.log(4.0 * math.pi) - torch.log(width)
    return torch.where(inside, log_k, torch.full_like(log_k, -math.inf))


@dataclass(frozen=True)
class MixtureTarget:
    """Atoms (M, 3) unit vectors with weights (M,) summing to 1, each smoothed by the kernel of
    width ``width`` (the path stopped at gamma_end = 1 - width), or by its own width
    ``atom_widths`` (M,) where given (a multi-scale target: each atom's path stops at its own
    level; ``width`` is then the smallest)."""

    atoms: torch.Tensor
    weights: torch.Tensor
    width: float
    atom_widths: torch.Tensor | None = None

    def widths_per_atom(self) -> torch.Tensor:
        """Kernel width of each atom, (M,) float64."""
        if self.atom_widths is not None:
            return torch.as_tensor(self.atom_widths, dtype=torch.float64)
        return torch.full((self.atoms.shape[0],), self.width, dtype=torch.float64)

    @staticmethod
    def from_latlon(
        atoms_latlon: torch.Tensor, weights: torch.Tensor | None = None, width: float = 1e-4
    ) -> MixtureTarget:
        atoms = latlon_to_unit(torch.as_tensor(atoms_latlon, dtype=torch.float64))
        if weights is None:
            weights = torch.full((atoms.shape[0],), 1.0 / atoms.shape[0], dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        return MixtureTarget(atoms, weights / weights.sum(), float(width))

    @staticmethod
    def combine(parts: list[tuple[MixtureTarget, float]]) -> MixtureTarget:
        """The mixture of targets with these weights (summing to 1): each keeps its atoms'
        widths."""
        atoms = torch.cat([t.atoms for t, _ in parts])
        weights = torch.cat([t.weights * w for t, w in parts])
        widths = torch.cat([t.widths_per_atom() for t, _ in parts])
        return MixtureTarget(atoms, weights / weights.sum(), float(widths.min()), widths)


def _atom_log_weights(
    x: torch.Tensor, atoms: torch.Tensor, log_w: torch.Tensor, width: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom log posterior weights (B, N, M) (unnormalised) and angles (B, N, M) of points x
    (B, N, 3) to atoms (B, M, 3) with log weights (B, M), at kernel widths (B,), (B, N) or per
    atom (B, 1, M)."""
    cos = torch.einsum("bnk,bmk->bnm", x, atoms)
    # acos loses precision near 1; atan2 of |cross| and dot does not.
    cross = torch.linalg.cross(x[:, :, None, :], atoms[:, None, :, :], dim=-1).norm(dim=-1)
    angle = torch.atan2(cross, cos)
    if width.dim() == 1:
        width = width[:, None]
    log_k = log_kernel(angle, width[..., None] if width.dim() == 2 else width)
    fallback = _OUT_OF_SUPPORT - 1e3 * angle
    return log_w[:, None, :] + torch.where(torch.isfinite(log_k), log_k, fallback), angle


def marginal_velocity(
    x: torch.Tensor,
    atoms: torch.Tensor,
    log_w: torch.Tensor,
    gamma: torch.Tensor,
    rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact RFM field d x / d gamma (B, N, 3) at points x (B, N, 3), level gamma (B,) or
    (B, N) < 1, for atoms (B, M, 3) with log weights (B, M) (-inf for padding).

    ``gamma`` (B, 1, M): each atom at its own level; then the field is d x / d tau for atom
    levels gamma_j = rate_j tau, with ``rate`` (B, 1, M) (each atom's velocity log_x(a) / s
    times its rate)."""
    width = 1.0 - gamma
    log_post, _ = _atom_log_weights(x, atoms, log_w, width)
    post = torch.softmax(log_post, dim=-1)
    towards = log_map(x[:, :, None, :], atoms[:, None, :, :])  # (B, N, M, 3)
    if width.dim() == 3:
        post = post * (rate / width)
        return torch.einsum("bnm,bnmk->bnk", post, towards)
    width = width if width.dim() == 2 else width[:, None]
    return torch.einsum("bnm,bnmk->bnk", post, towards) / width[..., None]


def mixture_log_density(
    x: torch.Tensor, atoms: torch.Tensor, log_w: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """log sum_j w_j k_s(d_j): natural log per steradian (B, N) at x (B, N, 3); atoms (B, M, 3),
    log weights (B, M), widths (B,) or per atom (B, M)."""
    cos = torch.einsum("bnk,bmk->bnm", x, atoms)
    cross = torch.linalg.cross(x[:, :, None, :], atoms[:, None, :, :], dim=-1).norm(dim=-1)
    width = width[:, None, None] if width.dim() == 1 else width[:, None, :]
    log_k = log_kernel(torch.atan2(cross, cos), width)
    return torch.logsumexp(log_w[:, None, :] + log_k, dim=-1)


def sample_mixture(
    atoms: torch.Tensor,
    weights: torch.Tensor,
    width: float | torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact samples (N, 3) of one target: an atom by weight, then a kernel draw around it
    (``width`` one for all atoms, or (M,) per atom)."""
    pick = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    centre = atoms[pick]
    width = torch.as_tensor(width, dtype=atoms.dtype)
    width = width[pick] if width.dim() == 1 else width
    u = torch.rand(num_samples, 2, generator=generator, dtype=atoms.dtype)
    d0 = torch.acos(1.0 - 2.0 * u[:, 0])  # density sin(d0) / 2 on [0, pi]
    e1, e2 = tangent_basis(centre)
    phi = 2.0 * math.pi * u[:, 1:]
    direction = torch.cos(phi) * e1 + torch.sin(phi) * e2
    return exp_map(centre, (width * d0)[:, None] * direction)


_FORWARD_AD = threading.Lock()
"""``torch.func.jvp`` enters forward-mode AD's dual level, which is one per process: the worker
threads that split points across the cores (:mod:`globeflow.core.parallel`) take turns."""


class ExactMixtureNetwork(nn.Module):
    """Stand-in for :class:`~globeflow.core.network.Denoiser` whose output is the exact RFM field
    of one of several :class:`MixtureTarget`, chosen by a one-hot embedding (B, K).

    The all-zeros (null) embedding is the unconditional model: the mixture of all targets with
    the prior weights ``condition_weights`` (default: equal), whose exact field is the
    density-weighted mean of the targets' fields (a mixture of flows moves with the mean of its
    components' velocities, each weighted by its share of the density at the point). So
    classifier-free guidance (1 + w) v(x | c) - w v(x | null) is exact too; guidance 0 samples
    the targets.
    """

    def __init__(self, targets: list[MixtureTarget], condition_weights: torch.Tensor | None = None):
        super().__init__()
        m = max(t.atoms.shape[0] for t in targets)
        atoms = torch.zeros(len(targets), m, 3, dtype=torch.float64)
        atoms[..., 2] = 1.0
        log_w = torch.full((len(targets), m), -math.inf, dtype=torch.float64)
        atom_widths = torch.ones(len(targets), m, dtype=torch.float64)
        for i, t in enumerate(targets):
            atoms[i, : t.atoms.shape[0]] = t.atoms
            log_w[i, : t.atoms.shape[0]] = torch.log(t.weights)
            atom_widths[i, : t.atoms.shape[0]] = t.widths_per_atom()
        self.register_buffer("atoms", atoms)
        self.register_buffer("log_weights", log_w)
        self.register_buffer("atom_widths", atom_widths)
        self.multiscale = any(t.atom_widths is not None for t in targets)
        self.register_buffer(
            "widths", torch.tensor([t.width for t in targets], dtype=torch.float64)
        )
        prior = (
            torch.ones(len(targets), dtype=torch.float64)
            if condition_weights is None
            else torch.as_tensor(condition_weights, dtype=torch.float64)
        )
        self.register_buffer("log_condition_weights", torch.log(prior / prior.sum()))
        self.targets = targets
        self.config = {"cond_dim": len(targets), "dim": None}
        # GeoModel.prepare_embeddings takes the dtype of the first parameter: float64 here.
        self.dtype_anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)

    @property
    def cond_dim(self) -> int:
        return len(self.targets)

    def condition_grid(self, emb: torch.Tensor, gammas: torch.Tensor) -> Conditioning:
        """Stores (tau, embedding) per level: final (S, B, 1, 1 + K)."""
        gammas = torch.as_tensor(gammas, dtype=emb.dtype, device=emb.device).reshape(-1)
        tau = gammas[:, None, None, None].expand(len(gammas), emb.shape[0], 1, 1)
        embs = emb[None, :, None, :].expand(len(gammas), *emb.shape[:1], 1, emb.shape[1])
        return Conditioning(blocks=[], final=torch.cat([tau, embs], dim=-1))

    def _target_field(
        self, y: torch.Tensor, tau: torch.Tensor, chosen: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Field d y / d tau (B, N, 3) of targets ``chosen`` (B,) at model level tau (B,), and
        their log-density (B, N) at y (kernel fallback outside every support)."""
        atoms, log_w = self.atoms[chosen], self.log_weights[chosen]
        if self.multiscale:  # each atom's path stops at its own level: gamma_j = rate_j tau
            rate = 1.0 - self.atom_widths[chosen][:, None, :]
            gamma = (rate * tau[:, None, None]).clamp(max=1.0 - 1e-300)
            v = marginal_velocity(y, atoms, log_w, gamma, rate)
            log_post, _ = _atom_log_weights(y, atoms, log_w, 1.0 - gamma)
            return v, torch.logsumexp(log_post, dim=-1)
        gamma_end = 1.0 - self.widths[chosen]
        gamma = (gamma_end * tau).clamp(max=1.0 - 1e-300)
        v = marginal_velocity(y, atoms, log_w, gamma)
        log_post, _ = _atom_log_weights(y, atoms, log_w, 1.0 - gamma)
        return gamma_end[:, None, None] * v, torch.logsumexp(log_post, dim=-1)

    def _unconditional_field(self, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The null condition's field (B, N, 3): the targets' fields weighted by prior x
        density at y."""
        fields, log_mass = [], []
        for k in range(len(self.targets)):
            chosen = torch.full_like(tau, k, dtype=torch.long)
            v, log_p = self._target_field(y, tau, chosen)
            fields.append(v)
            log_mass.append(log_p + self.log_condition_weights[k])
        share = torch.softmax(torch.stack(log_mass), dim=0)  # (K, B, N)
        return (share[..., None] * torch.stack(fields)).sum(0)

    def _field(self, y: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        tau, onehot = cond.final[:, 0, 0], cond.final[:, 0, 1:]
        live = onehot.sum(-1) > 0.5
        v, _ = self._target_field(y, tau, onehot.argmax(-1))
        if bool(live.all()):
            return v
        null = self._unconditional_field(y, tau)
        return torch.where(live[:, None, None], v, null)

    def forward_conditioned(self, y, cond, precision=FULL_PRECISION):
        return self._field(y, cond)

    def forward_with_jvp(self, y, tangents, cond, precision=FULL_PRECISION):
        out = self._field(y, cond)
        with _FORWARD_AD:
            jvps = torch.stack(
                [torch.func.jvp(lambda z: self._field(z, cond), (y,), (t,))[1] for t in tangents]
            )
        return out, jvps

    def target_log_density(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Exact log-density per steradian (B, N) of targets ``index`` (B,) at x (B, N, 3)."""
        widths = self.atom_widths[index] if self.multiscale else self.widths[index]
        return mixture_log_density(x, self.atoms[index], self.log_weights[index], widths)

    def target_samples(
        self, index: int, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact samples (N, 3) of target ``index``."""
        t = self.targets[index]
        return sample_mixture(t.atoms, t.weights, t.widths_per_atom(), num_samples, generator)


def smooth_target(
    centre_latlon: tuple[float, float], rms_km: float, rings: int = 8
) -> MixtureTarget:
    """A smooth, unimodal target of RMS radius ~``rms_km`` around ``centre_latlon`` (degrees):
    a von Mises-Fisher-like (locally Gaussian) density, as a quadrature of it: atoms on
    ``rings`` hexagonal rings out to 4 sigma (sigma = rms / sqrt(2) per axis; 6 i atoms of equal
    area on ring i, weights by the Gaussian there), each smoothed by a kernel of RMS radius one
    ring spacing, so the mixture is smooth at every scale. Its RFM field is that of a smooth
    posterior of width sigma (not of a kernel: kappa grows like s^2, see
    :func:`globeflow.core.stiff_end.stiffness_floor`), with a closed-form density."""
    sigma = rms_km / math.sqrt(2.0) / EARTH_RADIUS_KM  # radians per axis
    spacing = 4.0 * sigma / rings
    radii, angles, weights = [0.0], [0.0], [math.pi / 4.0]  # the centre's cell: radius 1/2
    for i in range(1, rings + 1):
        for k in range(6 * i):
            radii.append(i * spacing)
            angles.append(2.0 * math.pi * (k + 0.5 * (i % 2)) / (6 * i))
            weights.append(math.pi / 3.0)  # each atom of ring i: area pi spacing^2 / 3
    r = torch.tensor(radii, dtype=torch.float64)
    phi = torch.tensor(angles, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64) * torch.exp(-0.5 * (r / sigma) ** 2)
    centre = latlon_to_unit(torch.tensor([centre_latlon], dtype=torch.float64))
    e1, e2 = tangent_basis(centre)
    direction = torch.cos(phi)[:, None] * e1 + torch.sin(phi)[:, None] * e2
    atoms = exp_map(centre.expand(len(r), 3), r[:, None] * direction)
    width = spacing / KERNEL_RMS_ANGLE
    return MixtureTarget(atoms, w / w.sum(), width)


def exact_rfm_model(targets: list[MixtureTarget], condition_weights: torch.Tensor | None = None):
    """A float64 RFM model whose network is the exact field of ``targets`` (one-hot embeddings;
    the null embedding: their mixture with prior ``condition_weights``, default equal)."""
    from globeflow.core.families import RiemannianFlowMatching

    network = ExactMixtureNetwork(targets, condition_weights)
    return RiemannianFlowMatching(network).double().eval()


def angle_km(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km between unit vectors (..., 3)."""
    return angle_between(x, y) * EARTH_RADIUS_KM
