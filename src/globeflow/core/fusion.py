"""Several photos of one place, and constraints: exact posteriors by importance resampling.

Same place, photos c_1..c_n seen independently given the location y:

    p(y | c_1..c_n) = prod_i p(y | c_i) / p(y)^(n-1) / Z,
    Z = p(c_1..c_n) / prod_i p(c_i),

where p(y) is the model's unconditional density (the null condition). Z is the Bayes factor of
"one place" against "unrelated places" (each photo at its own location drawn from p(y)): much
below 1 when the photos disagree. A constraint R truncates a posterior: p(y | c, y in R) =
p(y | c) 1[y in R] / P(R | c).

Everything here is pure maths on tensors; the model-facing part is
:mod:`globeflow.answers.fusion`. Log-densities are natural logs per steradian; weights are
log-weights log target - log proposal of proposal points (M,).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from globeflow.core.families.baselines import KAPPA_MAX, sample_vmf, vmf_log_normalizer
from globeflow.core.sphere import LOG_UNIFORM_DENSITY, sample_uniform_sphere


def fused_log_density(member_log_p: torch.Tensor, null_log_p: torch.Tensor) -> torch.Tensor:
    """Unnormalised log p(y | c_1..c_n): member_log_p (n, M), null_log_p (M,) -> (M,).

    sum_i log p(y | c_i) - (n - 1) log p(y); its integral over the sphere is Z (module doc).
    """
    n = member_log_p.shape[0]
    return member_log_p.sum(0) - (n - 1) * null_log_p


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
    u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(k)) / k
    return torch.searchsorted(cdf, u).clamp_max(w.numel() - 1)


def leave_one_out_log_odds(
    member_log_p: torch.Tensor, null_log_p: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """log Z(all) - log Z(all but photo i) for each photo: (n, M), (M,), (M,) -> (n,).

    The log Bayes factor that photo i shows the same place as the others (rather than an
    unrelated one): strongly negative for the photo that disagrees. Uses the shared proposal
    points (valid for every subset: its support covers each subset's product).
    """
    n = member_log_p.shape[0]
    full, _ = log_normaliser(fused_log_density(member_log_p, null_log_p) - log_proposal)
    out = []
    for i in range(n):
        rest = torch.cat([member_log_p[:i], member_log_p[i + 1 :]])
        log_z_rest, _ = log_normaliser(fused_log_density(rest, null_log_p) - log_proposal)
        out.append(full - log_z_rest)
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class WeightedSample:
    """Proposal points and everything needed to reweight them.

    points (M, 3) unit vectors; member_log_p (n, M) log p(y | c_i); null_log_p (M,) log p(y)
    (None for one photo); log_proposal (M,). The target is :func:`fused_log_density` (the member
    itself for one photo).
    """

    points: torch.Tensor
    member_log_p: torch.Tensor
    null_log_p: torch.Tensor | None
    log_proposal: torch.Tensor
    rounds: int = 1

    @property
    def log_target(self) -> torch.Tensor:
        if self.null_log_p is None:
            return self.member_log_p[0]
        return fused_log_density(self.member_log_p, self.null_log_p)

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_target - self.log_proposal


DrawMembers = Callable[[int], torch.Tensor]
"""k -> (n, k, 3): k samples of each photo's posterior p(y | c_i)."""
MemberDensities = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""points (M, 3) -> (log p(y | c_i) (n, M), log p(y) (M,)), from one batched evaluation."""


ADAPTIVE_SHARE = 0.8
"""From the second round on, this share of each round's proposals comes from a kernel density
fitted to the weighted points so far (the rest from the photos' posteriors and the uniform)."""
KDE_CENTRES = 256


def kde_fit(
    points: torch.Tensor, log_w: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """A vMF kernel density fitted to weighted points (M, 3): (centres (K, 3), kappa).

    K = 256 centres resampled by weight; bandwidth by Scott's rule for 2-D data on the points'
    angular spread, h = spread ESS^(-1/6), kappa = 1 / h^2 (capped at 1e7, about 2 km).
    """
    w = normalised_weights(log_w)
    centres = points[systematic_resample(log_w, KDE_CENTRES, generator)].double()
    resultant = float((w[:, None] * points.double()).sum(0).norm())
    spread = math.sqrt(max(-2.0 * math.log(max(resultant, 1e-12)), 1e-12))
    bandwidth = spread * max(effective_sample_size(log_w), 1.0) ** (-1.0 / 6.0)
    return centres, min(1.0 / bandwidth**2, KAPPA_MAX)


def kde_log_density(x: torch.Tensor, centres: torch.Tensor, kappa: float) -> torch.Tensor:
    """log of the mean of vMF(x; centre, kappa) over centres (K, 3), at x (M, 3) -> (M,)."""
    kappa_t = torch.tensor(kappa, dtype=torch.float64)
    log_kernel = vmf_log_normalizer(kappa_t) + kappa_t * (x.double() @ centres.T - 1.0)
    return torch.logsumexp(log_kernel, -1) - math.log(centres.shape[0])


def proposal_log_density(
    member_log_p: torch.Tensor,
    x: torch.Tensor,
    counts: tuple[int, int, int],
    kde: tuple[torch.Tensor, float] | None,
) -> torch.Tensor:
    """log density of one round's proposal at its points x (M, 3): the mixture of the photos'
    posteriors (member_log_p (n, M)), the kernel density and the uniform, weighted by how many
    points each gave (``counts`` = members, kernel, uniform)."""
    total = sum(counts)
    n = member_log_p.shape[0]
    terms = [torch.logsumexp(member_log_p, 0) - math.log(n) + math.log(counts[0] / total)]
    if counts[1]:
        assert kde is not None
        terms.append(kde_log_density(x, *kde) + math.log(counts[1] / total))
    if counts[2]:
        terms.append(torch.full_like(terms[0], LOG_UNIFORM_DENSITY + math.log(counts[2] / total)))
    return torch.logsumexp(torch.stack(terms), 0)


def _all_rounds_log_density(
    member_log_p: torch.Tensor, points: torch.Tensor, rounds: list
) -> torch.Tensor:
    """log of the mixture of every round's proposal, each weighted by its share of the points
    (the deterministic-mixture weights of adaptive multiple importance sampling)."""
    total = sum(sum(counts) for counts, _ in rounds)
    parts = [
        proposal_log_density(member_log_p, points, counts, kde) + math.log(sum(counts) / total)
        for counts, kde in rounds
    ]
    return torch.logsumexp(torch.stack(parts), 0)


def importance_sample(
    draw: DrawMembers,
    densities: MemberDensities,
    num_members: int,
    per_round: int,
    target_ess: float,
    max_rounds: int = 4,
    defensive: float = 0.02,
    generator: torch.Generator | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> WeightedSample:
    """Proposal points for the fused posterior, drawn in rounds until the ESS reaches
    ``target_ess`` or ``max_rounds`` rounds are done. ``keep`` (points (M, 3) -> (M,) bool):
    the ESS counts only the points it keeps (a region's truncation).

    The first round draws per_round / n points from every photo's posterior and a share
    ``defensive`` uniformly on the sphere (deterministic-mixture sampling: counts in proportion
    to the mixture's weights, weighted by the mixture's density, which keeps each round's Z-hat
    unbiased). Later rounds draw 80% of their points from a kernel density fitted to the weighted
    points so far (:func:`kde_fit`). Every point is weighted by the mixture of all rounds'
    proposals (adaptive multiple importance sampling, Cornuet et al. 2012: consistent, and an
    early point that landed where a later round's kernels concentrate no longer dominates).
    Each point's member and null densities are evaluated once, in one batched call, and shared
    by the target, the proposal densities and every leave-one-out normaliser.
    """
    xs, members, nulls, kept, rounds = [], [], [], [], []
    uniform = max(1, round(defensive * per_round)) if defensive > 0 else 0
    sample, kde = None, None
    for round_ in range(1, max_rounds + 1):
        from_kde = round(ADAPTIVE_SHARE * per_round) if kde is not None else 0
        per_member = max(1, math.ceil((per_round - from_kde) / num_members))
        x = draw(per_member).reshape(-1, 3).double()
        if from_kde:
            centres, kappa = kde
            pick = torch.randint(centres.shape[0], (from_kde,), generator=generator)
            x = torch.cat([x, sample_vmf(centres[pick], torch.full((from_kde,), kappa), generator)])
        if uniform:
            u = sample_uniform_sphere((uniform,), generator=generator, dtype=torch.float64)
            x = torch.cat([x, u.to(x.device)])
        member, null = densities(x)
        xs.append(x)
        members.append(member.double())
        nulls.append(null.double())
        kept.append(keep(x) if keep is not None else torch.ones(x.shape[0], dtype=torch.bool))
        rounds.append(((per_member * num_members, from_kde, uniform), kde))
        points, member_log_p = torch.cat(xs), torch.cat(members, 1)
        log_q = _all_rounds_log_density(member_log_p, points, rounds)
        sample = WeightedSample(points, member_log_p, torch.cat(nulls), log_q, round_)
        log_w = sample.log_weight.masked_fill(~torch.cat(kept), -math.inf)
        if effective_sample_size(log_w) >= target_ess or round_ == max_rounds:
            break
        if effective_sample_size(log_w) > 0:
            kde = kde_fit(sample.points, log_w, generator)
    assert sample is not None
    return sample
