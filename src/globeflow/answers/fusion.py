"""Answers for several photos of one place, and under a region the user already knows.

The model side of :mod:`globeflow.core.fusion`. A fused answer is a function of the *set* of
photos: duplicates (equal embeddings) count once, the photos are put in the order of their
content ids, and every random draw comes from streams seeded by those ids, so any order of the
same photos gives the same answer bit for bit.

Which product: a model whose own recommended guidance w is negative says its conditional is
over-confident; its usual answer for one photo is the guided density p(y)^(-w) p(y | c)^(1 + w).
For n distinct photos it gets the *pooled* product p(y) prod_i [p(y | c_i) / p(y)]^((1 + w) / n),
the normalised geometric mean of the photos' usual answers (one photo: its usual answer); its
log-density anywhere is at least the photos' mean (minus the log of the geometric mean's
integral, which is <= 0). On 48 groups of real photos by photographers the bundled model never
saw, every rule gained GeoScore on average and none significantly; the pooled one was at least
as close as the median single photo in the most groups (29 of 48) with the narrowest interval,
the exact product gained most on average but was farther in 25 of 48 groups, by 2,500-9,000 km
in 12 (benchmarks/fusion.py, docs/fusion.md). Any other model (no recommendation, or
w >= 0, e.g. the closed-form oracles of the tests) gets the exact product, e = 1: Bayes' rule.

Each photo's own samples, and the null condition's, come from one path pass (samples with
their log-densities); they seed the proposal kernels, probe each density's stiff end, and give
the null-condition check: the unconditional density must be no more localized than the photos'
own answers (a null condition that training never fitted is an arbitrary density).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from globeflow.answers.within import Region
from globeflow.core.fusion import (
    Mass,
    WeightedSample,
    effective_sample_size,
    importance_sample,
    leave_one_out_log_odds,
    log_bayes_factor,
    log_normaliser,
    mass_inside,
    member_log_normalisers,
    normaliser_check,
    systematic_resample,
    weighted_mean,
)
from globeflow.core.likelihood import LOCALIZABILITY_SOLVER, log_prob_ode
from globeflow.core.random_streams import photo_generators, photo_seed
from globeflow.core.sampler_settings import FULL_PRECISION
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import unit_to_latlon
from globeflow.core.stiff_end import STIFF_LOG_STEP, by_width, quantized_width, stiff_width

PROPOSALS_PER_ROUND = 512
"""Proposal points per round at most (shared out among the photos)."""
DENSITY_BUDGET = 4096
"""Density evaluations (points x (photos + 1)) per round by default: the proposals per round are
this over n + 1, between 128 and :data:`PROPOSALS_PER_ROUND` (each point costs n + 1 likelihood
solves; on the bundled model one costs ~2.5 ms on one core, so a round ~10 s)."""
TARGET_ESS = 128
"""Rounds stop once the effective sample size reaches this (or the samples asked for)."""
ROWS_PER_CHUNK = 2048
"""Rows (points x densities) per likelihood solve: larger solves leave the CPU caches."""
MIN_PROPOSALS = 128
MAX_ROUNDS = 4
"""Rounds of fusion proposals at most."""
REJECTION_BUDGET = 32
"""A region's rejection sampling draws at most this many times the samples asked for."""
LIKELIHOOD_STEPS = 24
"""Bulk steps of the likelihood ODE for the fusion densities. On the bundled model, against 128
steps, the error of a two-photo log-weight has a standard deviation of 0.06 nats at 24 steps
(0.05 at 48, 0.21 at 16), at half the cost of 48."""
FUSION_LOG_STEP = STIFF_LOG_STEP
"""Steps in log(1 - gamma) at the stiff end of the fusion densities: the sampler's
(:data:`~globeflow.core.stiff_end.STIFF_LOG_STEP`), not the likelihood's finer one; its error is
shared by every photo's density at a point, so much of it cancels in the weights."""
OWN_SAMPLES = 48
"""Samples of each photo's (and the null's) own posterior: the proposal kernels' centres."""
MIN_ESS = 30.0
"""Below this effective sample size a fused answer is refused as unreliable."""
REFUSAL_LOG_BAYES_FACTOR = math.log(1 / 20)
"""A fused answer is given only above this same-place log Bayes factor. On the synthetic
testbeds (a model that knows places) it refuses every pair that shares no place (log BF -9 to
-30 on syn-small) and no pair that shares one (-1.95 at the lowest); on the bundled model and
real photos it never saw no threshold separates groups of one place from far-apart pairs
(benchmarks/fusion.py, docs/fusion.md: at 0 it refuses 17 of 48 groups and answers 15 of 30 far
pairs; at -1 and below it refuses none and answers all). Below 0 (but above it) the answer is
given and says the photos look like different places."""
DISAGREEMENT_LOG_BAYES_FACTOR = REFUSAL_LOG_BAYES_FACTOR
DECIDED_STDERRS = 2.0
"""Proposal rounds stop once the same-place log Bayes factor is this many of its standard errors
below :data:`REFUSAL_LOG_BAYES_FACTOR`: the answer is refused whatever later rounds add (on
the trained syn-small testbed, pairs of photos sharing no place: log BF -8 to -28 after the
first round; 4 rounds took 45-120 s, one takes a quarter of it)."""
NULL_MARGIN_BITS = 1.0
"""The null condition may be at most this much more localized than the sharpest photo."""
NULL_ID = "globeflow:null-condition"


@dataclass
class PosteriorDraw:
    """Equally weighted samples of a fused and/or truncated posterior and what was learnt."""

    samples: torch.Tensor
    """(N, 2) degrees on the CPU; empty when nothing could be drawn."""
    localizability_bits: float
    localizability_stderr_bits: float
    effective_sample_size: float
    proposals: int
    rounds: int
    mass: Mass | None = None
    log_bayes_factor: float | None = None
    log_bayes_factor_stderr: float | None = None
    agreement_log_odds: list[float] | None = None
    normaliser_log: list[float] | None = None
    normaliser_stderr: list[float] | None = None
    exponent: float = 1.0


@dataclass(frozen=True)
class Product:
    """Which product a fused answer takes: ``exponent`` e of each likelihood ratio, ``name``
    ("exact" or "pooled") and why, in words."""

    exponent: float
    name: str
    reason: str

    def to_dict(self) -> dict:
        return {"product": self.name, "exponent": self.exponent, "why": self.reason}


def fusion_product(model, photos: int = 1) -> Product:
    """The product for ``model`` and ``photos`` distinct photos (module doc): pooled, e =
    (1 + w) / n, when its metadata recommends a guidance w < 0; exact otherwise."""
    meta = getattr(model, "metadata", None) or {}
    w = meta.get("recommended_guidance")
    n = max(int(photos), 1)
    if w is not None and -1.0 < float(w) < 0.0:
        e = (1.0 + float(w)) / n
        return Product(
            e, "pooled",
            f"the model recommends guidance {float(w):g} (its conditional is over-confident), and "
            f"on real photos it never saw the exact product of its photos was farther than one "
            f"photo in half the groups, by up to 9,000 km: the answer is the geometric mean of "
            f"the {n} photos' usual answers (its log score is never below their average), each "
            f"likelihood ratio p(y|c)/p(y) raised to (1 + w) / n = {e:g}",
        )  # fmt: skip
    return Product(1.0, "exact", "the model states no over-confidence: Bayes' rule, exponent 1")


def check_fusable(model) -> None:
    """ValueError unless the model's densities are per steradian on S^2 and its null condition
    may have been trained: what p(y | c1..cn) needs. (A config that says no condition dropout is
    refused here; every model's null density is also checked against its photos', see
    :func:`null_check`.)"""
    if getattr(model, "density_space", "sphere") != "sphere":
        raise ValueError(
            f"a {model.family} model's density lives in R^3, not on the sphere; fusing photos "
            "needs a model on S^2 (rfm, or a baseline)"
        )
    if getattr(model, "cond_drop_prob", None) == 0:
        raise ValueError(
            "the model was trained without condition dropout, so it has no unconditional density "
            "p(y) to fuse photos with"
        )


@dataclass
class PhotoSet:
    """The distinct photos of a group: embeddings (n, D) in the order of their ids, the ids,
    and for every input photo the index of its distinct photo."""

    emb: torch.Tensor
    ids: list[str]
    index: list[int] = field(default_factory=list)

    @property
    def seed_key(self) -> str:
        return "fusion:" + "\0".join(self.ids)


def photo_set(emb: torch.Tensor, ids: Sequence[str]) -> PhotoSet:
    """The distinct photos of embeddings (B, D) with content ids ``ids``, sorted by id."""
    distinct = sorted(set(ids))
    where = {i: k for k, i in enumerate(distinct)}
    first = {i: j for j, i in reversed(list(enumerate(ids)))}
    rows = torch.tensor([first[i] for i in distinct], device=emb.device)
    return PhotoSet(emb[rows], distinct, [where[i] for i in ids])


@dataclass
class OwnSamples:
    """Each photo's own samples and the null's: points (n + 1, K, 3), log-densities (n + 1, K)
    (the null last), and whether the densities take stiff-end grids (denoising models on S^2)."""

    points: torch.Tensor
    log_p: torch.Tensor
    stiff_end: bool

    def bits(self) -> torch.Tensor:
        """Localizability (n + 1,) in bits: E log2 p under each density."""
        return self.log_p.double().mean(-1) / math.log(2.0)


def own_samples(
    model, conditions: torch.Tensor, ids: Sequence[str], seed: int, steps: int, k: int = OWN_SAMPLES
) -> OwnSamples:
    """Unguided samples of each condition (C, D), each from its own stream (``seed``, its id),
    with their log-densities from one path pass (:func:`globeflow.core.likelihood.
    sample_with_log_density` on S^2, the generic sample-then-density otherwise)."""
    generators = photo_generators(seed, ids, model.device)
    if model.draws_initial_noise and model.geometry is SPHERE:
        from globeflow.core.random_streams import stream_noise

        noise, padded = stream_noise(model, generators, k, conditions)
        # Each sample's own stiffness floor (probed where its pilot lands), as the localizability;
        # in fp32, the precision fusion's proposals and weights were measured at (docs/fusion.md),
        # and with the exact divergence: each sample's own density weighs it.
        x, log_p = model.sample_with_log_density(
            conditions, padded, steps, None, method="path", solver=LOCALIZABILITY_SOLVER,
            noise=noise, precision=FULL_PRECISION, divergence="exact",
        )  # fmt: skip
        return OwnSamples(x[:, :k], log_p[:, :k], stiff_end=True)
    parts = [
        model.sample_with_log_density(conditions[i : i + 1], k, steps, g, precision=FULL_PRECISION)
        for i, g in enumerate(generators)
    ]
    return OwnSamples(
        torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), stiff_end=False
    )


def null_check(own: OwnSamples) -> dict:
    """Is the null condition a plausible prior? Its localizability against the photos': the
    marginal of the training places is no sharper than the answers for its photos on average
    (H(Y) >= H(Y | C)), so a null more than :data:`NULL_MARGIN_BITS` sharper than every photo
    was not fitted to the prior. ``{"null_bits", "sharpest_photo_bits", "ok"}``."""
    bits = own.bits()
    null_bits, photo_bits = float(bits[-1]), float(bits[:-1].max())
    return {
        "null_bits": null_bits,
        "sharpest_photo_bits": photo_bits,
        "ok": bool(null_bits <= photo_bits + NULL_MARGIN_BITS),
    }


def fusion_densities(model, conditions: torch.Tensor, steps: int, own: OwnSamples):
    """points (M, 3) -> (log p(y | c_i) (n, M), log p(y) (M,)) for conditions (n + 1, D), the
    null last: one batched likelihood solve per stiff-end width on S^2, each density's width
    probed at its own samples and its stiff steps bounded (:data:`FUSION_LOG_STEP`)."""
    widths = None
    if own.stiff_end:
        widths = [
            quantized_width(stiff_width(model, conditions[i : i + 1], own.points[i : i + 1],
                                        steps, FUSION_LOG_STEP))
            for i in range(conditions.shape[0])
        ]  # fmt: skip

    def densities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.to(conditions.dtype)
        with torch.no_grad():
            # fp32: the weights multiply every photo's density, so their errors add up
            if widths is None:
                points = y[None].expand(conditions.shape[0], -1, -1)
                log_p = model.log_prob_unit(points, conditions, steps, FULL_PRECISION)
            else:
                log_p = by_width(
                    widths,
                    lambda rows, w: log_prob_ode(
                        model, y[None].expand(len(rows), -1, -1), conditions[rows], steps,
                        chunk_size=ROWS_PER_CHUNK, precision=FULL_PRECISION, stiff=w,
                        log_step=FUSION_LOG_STEP,
                    ),
                )  # fmt: skip
        return log_p[:-1], log_p[-1]

    return densities


def proposals_per_round(n: int, asked: int | None) -> int:
    """Proposal points per round for n photos: ``asked``, or :data:`DENSITY_BUDGET` / (n + 1)
    within [:data:`MIN_PROPOSALS`, :data:`PROPOSALS_PER_ROUND`]."""
    if asked is not None:
        return asked
    return int(min(PROPOSALS_PER_ROUND, max(MIN_PROPOSALS, DENSITY_BUDGET // (n + 1))))


def fused_sample(
    model,
    emb: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    per_round: int | None = None,
    target_ess: float = TARGET_ESS,
    max_rounds: int = MAX_ROUNDS,
    likelihood_steps: int = LIKELIHOOD_STEPS,
    region: Region | None = None,
    exponent: float = 1.0,
    own: OwnSamples | None = None,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> WeightedSample:
    """Weighted proposals for the fused posterior of photos emb (n, D), in rounds until
    ``target_ess`` (counted inside ``region``) or ``max_rounds``.

    ``own``: the photos' and the null's own samples (:func:`own_samples`; drawn here from
    streams seeded by (``seed``, ``ids``) when not given). Proposals are drawn from kernels
    around them (:func:`globeflow.core.fusion.importance_sample`), a density in closed form;
    every point gets log p(y | c_i) for each photo and log p(y) under the null condition from
    one batched likelihood solve over n + 1 rows.
    """
    check_fusable(model)
    emb = model.prepare_embeddings(emb)
    conditions = torch.cat([emb, torch.zeros_like(emb[:1])])
    if own is None:
        ids = list(ids) if ids is not None else [f"photo {i}" for i in range(emb.shape[0])]
        own = own_samples(model, conditions, [*ids, NULL_ID], seed, max(steps, likelihood_steps))
    densities = fusion_densities(model, conditions, likelihood_steps, own)

    def keep(x: torch.Tensor) -> torch.Tensor:
        return region.contains(unit_to_latlon(x.double())).to(x.device)

    per_round = proposals_per_round(emb.shape[0], per_round)
    return importance_sample(
        list(own.points.double()), densities, per_round, target_ess, max_rounds,
        generator=generator, keep=keep if region is not None else None, exponent=exponent,
        decided=refusal_decided if emb.shape[0] > 1 else None,
        photo_sets=emb.shape[0] if emb.shape[0] > 1 else 0,
    )  # fmt: skip


def refusal_decided(sample: WeightedSample) -> bool:
    """Whether a fused sample's same-place log Bayes factor is already
    :data:`DECIDED_STDERRS` standard errors below the refusal threshold."""
    assert sample.null_log_p is not None
    bf, se = log_bayes_factor(
        sample.member_log_p, sample.null_log_p, sample.log_proposal, sample.exponent
    )
    return math.isfinite(se) and bf + DECIDED_STDERRS * se < REFUSAL_LOG_BAYES_FACTOR


def single_sample(
    model,
    emb: torch.Tensor,
    num_samples: int,
    steps: int,
    generator: torch.Generator,
    region: Region | None,
    solver: str | None = None,
    precision: str | None = None,
    budget: int = REJECTION_BUDGET,
) -> WeightedSample:
    """Unguided samples of one photo (1, D) with their log-densities (the path pass on S^2), in
    rounds until ``num_samples`` fall inside ``region`` or ``budget`` x ``num_samples`` were
    drawn: exact rejection sampling of the truncated posterior. Each round asks for what the
    acceptance rate so far predicts is missing."""
    emb = model.prepare_embeddings(emb)
    precision = precision or FULL_PRECISION  # the answer's samples: not the localizability's
    xs, log_ps = [], []
    inside = drawn = round_ = 0
    batch = num_samples
    on_sphere = getattr(model, "geometry", None) is SPHERE
    path_steps = max(steps, LIKELIHOOD_STEPS)
    while batch > 0:
        round_ += 1
        if on_sphere:
            # Samples and their log-densities from one pass: a solver that carries them (the
            # data-prediction solvers do not; the localizability solver then draws both).
            carries = solver in SOLVERS and SOLVERS[solver].carries_log_density
            x, log_p = model.sample_with_log_density(
                emb, batch, path_steps, generator, method="path", divergence="exact",
                solver=solver if carries else LOCALIZABILITY_SOLVER, precision=precision,
            )  # fmt: skip
        else:
            x, log_p = model.sample_with_log_density(
                emb, batch, steps, generator, precision=precision
            )
        xs.append(x[0].double())
        log_ps.append(log_p[0].double())
        drawn += batch
        if region is None:
            break
        inside += int(region.contains(unit_to_latlon(x[0].double())).sum())
        wanted = (num_samples - inside) * drawn / max(inside, 1)
        batch = min(max(0, math.ceil(1.2 * wanted)) if inside < num_samples else 0,
                    budget * num_samples - drawn)  # fmt: skip
    log_p = torch.cat(log_ps)
    return WeightedSample(torch.cat(xs), log_p[None], None, log_p, rounds=round_)


def draw_posterior(
    sample: WeightedSample,
    num_samples: int,
    generator: torch.Generator,
    region: Region | None = None,
) -> PosteriorDraw:
    """Resample ``num_samples`` equally weighted points of the target of ``sample`` (fused if it
    has a null density), truncated to ``region``; with its localizability, the mass inside the
    region and, for a fused target, the same-place Bayes factor, each photo's agreement and the
    normaliser check."""
    log_w = sample.log_weight
    latlon = unit_to_latlon(sample.points)
    mass = None
    if region is not None:
        inside = region.contains(latlon).to(log_w.device)
        mass = mass_inside(log_w, inside)
        log_w = log_w.masked_fill(~inside, -math.inf)
    fused = sample.null_log_p is not None
    draw = PosteriorDraw(
        samples=torch.empty(0, 2, dtype=torch.float64, device="cpu"),  # answers decode on the CPU
        localizability_bits=math.nan,
        localizability_stderr_bits=math.nan,
        effective_sample_size=effective_sample_size(log_w),
        proposals=sample.points.shape[0],
        rounds=sample.rounds,
        mass=mass,
        exponent=sample.exponent,
    )
    log_z, log_z_se = log_normaliser(sample.log_weight) if fused else (0.0, 0.0)
    if fused:
        args = (sample.member_log_p, sample.null_log_p, sample.log_proposal, sample.exponent)
        member_z, _ = member_log_normalisers(*args)
        draw.log_bayes_factor, draw.log_bayes_factor_stderr = log_bayes_factor(*args, member_z)
        if sample.member_log_p.shape[0] > 1:
            draw.agreement_log_odds = leave_one_out_log_odds(*args, member_z).tolist()
        check, check_se = normaliser_check(*args[:3])
        draw.normaliser_log, draw.normaliser_stderr = check.tolist(), check_se.tolist()
    if draw.effective_sample_size == 0.0:
        return draw
    idx = systematic_resample(log_w, num_samples, generator)
    draw.samples = latlon[idx].cpu()
    # log p_answer = log target - log Z - log P(R) on R.
    mean, se = weighted_mean(log_w, sample.log_target)
    log_mass, rel_mass_se = 0.0, 0.0
    if mass is not None:
        log_mass, rel_mass_se = math.log(mass.probability), mass.stderr / mass.probability
    draw.localizability_bits = (mean - log_z - log_mass) / math.log(2.0)
    draw.localizability_stderr_bits = math.hypot(se, log_z_se, rel_mass_se) / math.log(2.0)
    return draw


DIFFERENT_PLACES = "the photos look like different places"


def _times(log_odds: float) -> str:
    if not math.isfinite(log_odds):
        return "infinitely many"
    return f"{math.exp(log_odds):.3g}" if log_odds < 50 else f"10^{log_odds / math.log(10):.0f}"


def disagreement(draw: PosteriorDraw, names: list[str]) -> dict | None:
    """What a fused answer must say about its photos, or None when they agree: ``message`` and
    ``refused``. Below a same-place Bayes factor of 1 the photos look like different places
    (said, the answer still given); below :data:`REFUSAL_LOG_BAYES_FACTOR`, or with an effective
    sample size under :data:`MIN_ESS`, no fused answer is given."""
    if draw.log_bayes_factor is None or draw.agreement_log_odds is None:
        return None
    odds = draw.agreement_log_odds
    worst = min(range(len(odds)), key=odds.__getitem__) if odds else None
    bf, bf_se = draw.log_bayes_factor, draw.log_bayes_factor_stderr or 0.0
    info = {
        "different_places": bool(bf < 0),
        "refused": False,
        "log_bayes_factor": bf if math.isfinite(bf) else None,
        "log_bayes_factor_stderr": bf_se if math.isfinite(bf_se) else None,
        "refusal_log_bayes_factor": REFUSAL_LOG_BAYES_FACTOR,
        "effective_sample_size": draw.effective_sample_size,
        "least_consistent_photo": names[worst] if worst is not None else None,
    }
    if bf < REFUSAL_LOG_BAYES_FACTOR:
        info["refused"] = True
        info["message"] = (
            f"{DIFFERENT_PLACES}: the photos disagree: the model finds one place "
            f"{_times(-bf)} times less likely than unrelated places (least consistent: "
            f"{info['least_consistent_photo']}); locate them separately"
        )
        return info
    if draw.effective_sample_size < MIN_ESS:
        info["refused"] = True
        info["message"] = (
            f"the photos' answers barely overlap (effective sample size "
            f"{draw.effective_sample_size:.1f} of {draw.proposals} proposals); no reliable "
            "fused answer"
        )
        return info
    if bf < 0:
        info["message"] = (
            f"{DIFFERENT_PLACES} (one place {_times(-bf)} times less likely than unrelated "
            f"places; least consistent: {info['least_consistent_photo']}); the fused answer "
            "assumes they show one place"
        )
        return info
    return None


def set_generator(photos: PhotoSet, seed: int, device) -> torch.Generator:
    """The fused answer's own stream: seeded by (``seed``, the sorted ids of its photos)."""
    return torch.Generator(device=device).manual_seed(photo_seed(seed, photos.seed_key))
