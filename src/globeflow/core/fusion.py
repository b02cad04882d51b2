"""Several photos of one place, and constraints: posteriors by importance resampling.

Same place, photos c_1..c_n seen independently given the location y:

    p(y | c_1..c_n) = p(y) prod_i [p(y | c_i) / p(y)]^e / Z,

where p(y) is the model's unconditional density (the null condition). With e = 1 this is
Bayes' rule for a calibrated model (the exact product); e < 1 tempers each photo's likelihood
ratio, for a model whose own recommended guidance w < 0 says that its conditional is
over-confident (e = 1 + w: one photo's tempered posterior is then the density that guidance w
aims at, so fusing a photo with itself gives the photo's own answer). Z, over the product of
the photos' own (tempered, normalised) posteriors Z_i, is the Bayes factor of "one place"
against "unrelated places" (each photo at its own location drawn from p(y)): below 1 when the
photos look like different places. A constraint R truncates a posterior: p(y | c, y in R) =
p(y | c) 1[y in R] / P(R | c).

Proposals come from a density known in closed form: a mixture of von Mises-Fisher kernels
around each photo's own samples (and the null's), kernels fitted to the weighted points of
earlier rounds, and the uniform. The weights are then exactly target / proposal for the
densities the model reports; no sampler's discretisation enters them.

Everything here is pure maths on tensors; the model-facing part is
:mod:`globeflow.answers.fusion`. Log-densities are natural logs per steradian; weights are
log-weights log target - log proposal of proposal points (M,). Every tensor is made on the
device of the points it comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from globeflow.core.sphere import LOG_UNIFORM_DENSITY, sample_uniform_sphere
from globeflow.core.vmf import KAPPA_MAX, sample_vmf, vmf_log_normalizer


def fused_log_density(
    member_log_p: torch.Tensor, null_log_p: torch.Tensor, exponent: float = 1.0
) -> torch.Tensor:
    """Unnormalised log p(y | c_1..c_n): member_log_p (n, M), null_log_p (M,) -> (M,).

    log p(y) + e sum_i (log p(y | c_i) - log p(y)); e = 1 is the exact product
    sum_i log p(y | c_i) - (n - 1) log p(y). Its integral over the sphere is Z (module doc).
    """
    if exponent == 1.0:
        return member_log_p.sum(0) - (member_log_p.shape[0] - 1) * null_log_p
    return null_log_p + exponent * (member_log_p - null_log_p).sum(0)


def normalised_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance weights (M,) float64, summing to 1 (all zero if none finite)."""
    log_w = log_w.double()
    if not torch.isfinite(log_w).any():
        return torch.zeros_like(log_w)
    return torch.softmax(log_w.nan_to_num(nan=-math.inf), 0)


def effective_sample_size(log_w: torch.Tensor) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 of log-weights (M,): M for equal weights,
    1 when one point carries all the weight, 0 when no weight is finite."""
    w = normalised_weights(log_w)
    total = float((w * w).sum())
    return 1.0 / total if total > 0 else 0.0


def log_normaliser(log_w: torch.Tensor) -> tuple[float, float]:
    """(log Z, its standard error) from unnormalised log-weights (M,): Z = mean w.

    Z-hat is unbiased; the standard error of log Z-hat is its relative standard error
    std(w) / (sqrt(M) mean(w)) (delta method).
    """
    log_w = log_w.double()
    m = log_w.numel()
    top = log_w.max()
    if not torch.isfinite(top):
        return -math.inf, math.inf
    w = torch.exp(log_w - top)
    mean = w.mean()
    se = float(w.std() / (math.sqrt(m) * mean)) if m > 1 else math.inf
    return float(top + torch.log(mean)), se


def weighted_mean(log_w: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    """Self-normalised estimate of E[values] (M,) under the target, and its standard error.

    Delta method: se^2 = sum_j w_j^2 (values_j - mean)^2 with normalised weights w; with equal
    weights it is the usual sample variance / M (up to M / (M - 1)).
    """
    w = normalised_weights(log_w)
    v = values.double()
    keep = w > 0
    mean = float((w[keep] * v[keep]).sum())
    se = float(torch.sqrt((w[keep] ** 2 * (v[keep] - mean) ** 2).sum()))
    return mean, se


@dataclass(frozen=True)
class Mass:
    """Probability of a region under a (weighted) sample: estimate, standard error, and a 95%
    upper bound (the rule of three, 3 / ESS, when no point falls inside)."""

    probability: float
    stderr: float
    upper_95: float

    def to_dict(self) -> dict:
        return {"probability": self.probability, "stderr": self.stderr, "upper_95": self.upper_95}


def mass_inside(log_w: torch.Tensor, inside: torch.Tensor) -> Mass:
    """P(R) from log-weights (M,) and membership (M,) bool, with its standard error.

    Equal weights give the binomial sqrt(p (1 - p) / M).
    """
    p, se = weighted_mean(log_w, inside.double())
    ess = effective_sample_size(log_w)
    upper = min(1.0, p + 2.0 * se) if p > 0 else min(1.0, 3.0 / max(ess, 1.0))
    return Mass(probability=p, stderr=se, upper_95=upper)


def systematic_resample(
    log_w: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k indices into log_w (M,) drawn in proportion to the weights (systematic resampling: one
    uniform offset, k evenly spaced points on the weights' CDF; unbiased, lower variance than
    independent draws). Raises ValueError when no weight is positive."""
    w = normalised_weights(log_w)
    if not bool((w > 0).any()):
        raise ValueError("no proposal point has a positive weight")
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    offset = torch.rand((), generator=generator, dtype=torch.float64, device=w.device)
    u = (offset + torch.arange(k, device=w.device, dtype=torch.float64)) / k
    return torch.searchsorted(cdf, u).clamp_max(w.numel() - 1)


def member_log_normalisers(
    member_log_p: torch.Tensor, null_log_p: torch.Tensor, log_proposal: torch.Tensor,
    exponent: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """log Z_i of each photo's own (tempered) posterior p(y) [p(y | c_i) / p(y)]^e and its
    standard error, both (n,), from the shared proposal points: exactly 0 (and 0) for e = 1,
    where each is a normalised density."""
    n = member_log_p.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64, device=member_log_p.device)
    if exponent == 1.0:
        return zeros, zeros
    parts = [
        log_normaliser(fused_log_density(member_log_p[i : i + 1], null_log_p, exponent)
                       - log_proposal)
        for i in range(n)
    ]  # fmt: skip
    return (
        torch.tensor([p[0] for p in parts], dtype=torch.float64, device=zeros.device),
        torch.tensor([p[1] for p in parts], dtype=torch.float64, device=zeros.device),
    )


def normaliser_check(
    member_log_p: torch.Tensor, null_log_p: torch.Tensor, log_proposal: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the estimated integral of each photo's density and of the null's, with standard
    errors: ((n + 1,), (n + 1,)). Every one is a normalised density, so each is 0 up to its
    standard error unless the proposal misses mass or the densities are wrong (for two photos
    under the exact product these are the leave-one-out normalisers, known to be 1)."""
    rows = torch.cat([member_log_p, null_log_p[None]])
    parts = [log_normaliser(row - log_proposal) for row in rows]
    device = rows.device
    return (
        torch.tensor([p[0] for p in parts], dtype=torch.float64, device=device),
        torch.tensor([p[1] for p in parts], dtype=torch.float64, device=device),
    )


def log_bayes_factor(
    member_log_p: torch.Tensor, null_log_p: torch.Tensor, log_proposal: torch.Tensor,
    exponent: float = 1.0, member_log_z: torch.Tensor | None = None,
) -> tuple[float, float]:  # fmt: skip
    """log Z - sum_i log Z_i: the Bayes factor of "one place" against "unrelated places" (module
    doc), with the standard error of log Z-hat. ``member_log_z`` (n,): the photos' own log Z_i
    (default :func:`member_log_normalisers`)."""
    if member_log_z is None:
        member_log_z, _ = member_log_normalisers(member_log_p, null_log_p, log_proposal, exponent)
    log_z, se = log_normaliser(fused_log_density(member_log_p, null_log_p, exponent) - log_proposal)
    return log_z - float(member_log_z.sum()), se


def leave_one_out_log_odds(
    member_log_p: torch.Tensor, null_log_p: torch.Tensor, log_proposal: torch.Tensor,
    exponent: float = 1.0, member_log_z: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """log BF(all) - log BF(all but photo i) for each photo: (n, M), (M,), (M,) -> (n,).

    The log Bayes factor that photo i shows the same place as the others (rather than an
    unrelated one): strongly negative for the photo that disagrees. Uses the shared proposal
    points (valid for every subset: its support covers each subset's product).
    """
    n = member_log_p.shape[0]
    if member_log_z is None:
        member_log_z, _ = member_log_normalisers(member_log_p, null_log_p, log_proposal, exponent)
    full, _ = log_bayes_factor(member_log_p, null_log_p, log_proposal, exponent, member_log_z)
    out = []
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        rest, _ = log_bayes_factor(
            member_log_p[keep], null_log_p, log_proposal, exponent, member_log_z[keep]
        )
        out.append(full - rest)
    return torch.tensor(out, dtype=torch.float64, device=member_log_p.device)


@dataclass
class WeightedSample:
    """Proposal points and everything needed to reweight them.

    points (M, 3) unit vectors; member_log_p (n, M) log p(y | c_i); null_log_p (M,) log p(y)
    (None for one photo's untempered posterior); log_proposal (M,); exponent e of the product.
    The target is :func:`fused_log_density` (the member itself when ``null_log_p`` is None).
    """

    points: torch.Tensor
    member_log_p: torch.Tensor
    null_log_p: torch.Tensor | None
    log_proposal: torch.Tensor
    rounds: int = 1
    exponent: float = 1.0

    @property
    def log_target(self) -> torch.Tensor:
        if self.null_log_p is None:
            return self.member_log_p[0]
        return fused_log_density(self.member_log_p, self.null_log_p, self.exponent)

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_target - self.log_proposal


MemberDensities = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""points (M, 3) -> (log p(y | c_i) (n, M), log p(y) (M,)), from one batched evaluation."""


ADAPTIVE_SHARE = 0.8
"""From the second round on, this share of each round's proposals comes from a kernel density
fitted to the weighted points so far (the rest from the photos' kernels and the uniform)."""
KDE_CENTRES = 256
NEIGHBOURS = 3
"""A kernel around one of a photo's samples is as wide as the distance to its 3rd nearest
neighbour among them (sample-point kernels adapt to multimodal answers, where one bandwidth
from the overall spread would cover a continent)."""
MIN_KERNEL_RAD = 1.0 / math.sqrt(KAPPA_MAX)
"""Narrowest kernel, about 2 km."""
DEFENSIVE = 0.05
"""Share of every round's proposals drawn uniformly on the sphere (bounds the weights)."""


@dataclass(frozen=True)
class Kernels:
    """A mixture of vMF kernels, equal weights: centres (K, 3) float64, kappas (K,) float64."""

    centres: torch.Tensor
    kappas: torch.Tensor

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log density at x (M, 3) -> (M,)."""
        log_k = vmf_log_normalizer(self.kappas) + self.kappas * (x.double() @ self.centres.T - 1)
        return torch.logsumexp(log_k, -1) - math.log(self.centres.shape[0])

    def sample(self, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """k exact draws (k, 3) float64."""
        device = self.centres.device
        pick = torch.randint(self.centres.shape[0], (k,), generator=generator, device=device)
        return sample_vmf(self.centres[pick], self.kappas[pick], generator)


def sample_point_kernels(points: torch.Tensor) -> Kernels:
    """Kernels around each of a photo's samples (K, 3): bandwidth h the distance to the
    :data:`NEIGHBOURS`-th nearest other sample (kappa = 1 / h^2), h >= :data:`MIN_KERNEL_RAD`."""
    x = points.double()
    k = min(NEIGHBOURS, x.shape[0] - 1)
    if k < 1:
        return Kernels(x, torch.ones(x.shape[0], dtype=torch.float64, device=x.device))
    angle = torch.arccos((x @ x.T).clamp(-1.0, 1.0))
    angle.fill_diagonal_(math.inf)
    h = angle.topk(k, dim=1, largest=False).values[:, -1].clamp_min(MIN_KERNEL_RAD)
    return Kernels(x, (1.0 / h**2).clamp_max(KAPPA_MAX))


PRODUCT_SHARE = 0.5
"""Share of the first round drawn from :func:`product_kernels` (the rest from the photos' own
kernels and the uniform). Measured (benchmarks/fusion.py, 2 threads, idle): at 0.8, two
three-city syn-small photos sharing Sydney took 13 s but 20 photos of the bundled model (pooled
product, whose kernel product is a poor guide) needed a second round, 9.4 s; at 0.5, 19 s and
one round, 5.5 s; at 0.3, 18 s and 6.1 s with a lower ESS on the closed-form cues."""
PRODUCT_KERNEL_WIDENING = 2.0
"""The product kernels are this many times wider than the own samples' kernels. Measured on the
closed-form cue testbed (benchmarks/fusion.py, 12 cases): at the own bandwidth the first round
stops with a proposal too narrow for parts of the product (log Bayes factor outside 2 standard
errors of its exact value in 3 of 12 cases, median ESS 285); at twice it, 1 of 12 and ESS 317;
at four times, 0 of 12 and ESS 227."""


def product_kernels(
    own: list[Kernels], members: int, exponent: float, generator: torch.Generator | None = None
) -> Kernels | None:
    """Kernels at the own samples of every set (:data:`PRODUCT_KERNEL_WIDENING` times wider),
    :data:`KDE_CENTRES` of them resampled in proportion to the share of the fused density each
    carries, read from the kernels alone: :func:`fused_log_density` of the first ``members``
    sets' kernel densities and the next set's (the null's, half uniform; none: uniform), over
    the equal mixture of all sets' kernels, from which the samples came. Costs no density
    solve; None when no sample has a finite weight.

    Why: for photos that share one place among several each could show, only the samples at the
    shared one matter, and the photos' own kernels spend most proposals elsewhere (on syn-small,
    two three-city photos sharing one: an ESS of 14 of 512 points from the photos' kernels)."""
    centres = torch.cat([k.centres for k in own])
    kappas = torch.cat([k.kappas for k in own])
    log_k = torch.stack([k.log_density(centres) for k in own])
    if len(own) > members:  # the next set is the null's: the kernels' own fused density
        # Half uniform: 48 samples of a prior leave gaps where its kernels would divide by ~0.
        null = torch.logaddexp(log_k[members], torch.full_like(log_k[members], LOG_UNIFORM_DENSITY))
        guide = fused_log_density(log_k[:members], null - math.log(2.0), exponent)
    else:
        guide = exponent * log_k[:members].sum(0)
    log_w = guide - (torch.logsumexp(log_k, 0) - math.log(len(own)))
    if not bool(torch.isfinite(log_w).any()):
        return None
    pick = systematic_resample(log_w, KDE_CENTRES, generator)
    return Kernels(centres[pick], kappas[pick] / PRODUCT_KERNEL_WIDENING**2)


def kde_fit(
    points: torch.Tensor, log_w: torch.Tensor, generator: torch.Generator | None = None
) -> Kernels:
    """A vMF kernel density fitted to weighted points (M, 3).

    K = 256 centres resampled by weight; bandwidth by Scott's rule for 2-D data on the points'
    angular spread, h = spread ESS^(-1/6), kappa = 1 / h^2 (capped at 1e7, about 2 km).
    """
    w = normalised_weights(log_w)
    centres = points[systematic_resample(log_w, KDE_CENTRES, generator)].double()
    resultant = float((w[:, None] * points.double()).sum(0).norm())
    spread = math.sqrt(max(-2.0 * math.log(max(resultant, 1e-12)), 1e-12))
    bandwidth = spread * max(effective_sample_size(log_w), 1.0) ** (-1.0 / 6.0)
    kappa = min(1.0 / bandwidth**2, KAPPA_MAX)
    return Kernels(centres, torch.full((KDE_CENTRES,), kappa, dtype=torch.float64,
                                       device=centres.device))  # fmt: skip


@dataclass(frozen=True)
class _Round:
    """One round's proposal: how many points each component gave (photo kernels, fitted
    kernels, uniform) and the fitted kernels."""

    counts: tuple[int, int, int]
    fitted: Kernels | None

    def log_density(self, x: torch.Tensor, own: list[Kernels]) -> torch.Tensor:
        total = sum(self.counts)
        per_own = self.counts[0] / len(own)
        terms = [k.log_density(x) + math.log(per_own / total) for k in own]
        if self.counts[1]:
            assert self.fitted is not None
            terms.append(self.fitted.log_density(x) + math.log(self.counts[1] / total))
        if self.counts[2]:
            log_u = LOG_UNIFORM_DENSITY + math.log(self.counts[2] / total)
            terms.append(torch.full_like(terms[0], log_u))
        return torch.logsumexp(torch.stack(terms), 0)


def _all_rounds_log_density(x: torch.Tensor, rounds: list[_Round], own: list[Kernels]):
    """log of the mixture of every round's proposal, each weighted by its share of the points
    (the deterministic-mixture weights of adaptive multiple importance sampling)."""
    total = sum(sum(r.counts) for r in rounds)
    parts = [r.log_density(x, own) + math.log(sum(r.counts) / total) for r in rounds]
    return torch.logsumexp(torch.stack(parts), 0)


def importance_sample(
    own_samples: list[torch.Tensor],
    densities: MemberDensities,
    per_round: int,
    target_ess: float,
    max_rounds: int = 4,
    defensive: float = DEFENSIVE,
    generator: torch.Generator | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exponent: float = 1.0,
    decided: Callable[[WeightedSample], bool] | None = None,
    photo_sets: int = 0,
) -> WeightedSample:
    """Proposal points for the fused posterior, drawn in rounds until the ESS reaches
    ``target_ess`` or ``max_rounds`` rounds are done. ``keep`` (points (M, 3) -> (M,) bool):
    the ESS counts only the points it keeps (a region's truncation). ``decided`` (the sample so
    far -> bool): stop early when it says more rounds cannot change the outcome (photos already
    known to show different places: more points would only sharpen a refusal). ``photo_sets``:
    the first sets of ``own_samples`` are the photos' (the next one the null's); the first round
    then draws :data:`PRODUCT_SHARE` of its points from :func:`product_kernels` (0: none).

    ``own_samples``: each photo's samples (and the null's, or any others) (K_j, 3): the first
    round draws equally from kernels around each set (:func:`sample_point_kernels`) and a share
    ``defensive`` uniformly on the sphere; later rounds draw 80% of their points from kernels
    fitted to the weighted points so far (:func:`kde_fit`). Every point is weighted by the
    mixture of all rounds' proposals (adaptive multiple importance sampling, Cornuet et al.
    2012), a density in closed form: the weights hold for the model's densities exactly, with no
    sampler's discretisation in them. Each point's member and null densities are evaluated
    once, in one batched call, and shared by the target and every diagnostic.
    """
    own = [sample_point_kernels(s) for s in own_samples]
    device = own[0].centres.device
    xs, members, nulls, kept, rounds = [], [], [], [], []
    uniform = max(1, round(defensive * per_round)) if defensive > 0 else 0
    sample = None
    fitted = product_kernels(own, photo_sets, exponent, generator) if photo_sets else None
    for round_ in range(1, max_rounds + 1):
        share = ADAPTIVE_SHARE if round_ > 1 else PRODUCT_SHARE
        from_fit = round(share * per_round) if fitted is not None else 0
        per_own = max(1, math.ceil((per_round - from_fit - uniform) / len(own)))
        parts = [k.sample(per_own, generator) for k in own]
        if from_fit:
            parts.append(fitted.sample(from_fit, generator))
        if uniform:
            parts.append(sample_uniform_sphere((uniform,), generator, device, torch.float64))
        x = torch.cat(parts)
        member, null = densities(x)
        xs.append(x)
        members.append(member.double())
        nulls.append(null.double())
        inside = (
            keep(x) if keep is not None else torch.ones(x.shape[0], dtype=torch.bool, device=device)
        )
        kept.append(inside.to(device))
        rounds.append(_Round((per_own * len(own), from_fit, uniform), fitted))
        points = torch.cat(xs)
        log_q = _all_rounds_log_density(points, rounds, own)
        sample = WeightedSample(
            points, torch.cat(members, 1), torch.cat(nulls), log_q, round_, exponent
        )
        log_w = sample.log_weight.masked_fill(~torch.cat(kept), -math.inf)
        if effective_sample_size(log_w) >= target_ess or round_ == max_rounds:
            break
        if decided is not None and decided(sample):
            break
        if effective_sample_size(log_w) > 0:
            fitted = kde_fit(sample.points, log_w, generator)
    assert sample is not None
    return sample
