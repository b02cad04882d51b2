"""Exact answers for several photos of one place, and under a region the user already knows.

The model side of :mod:`globeflow.core.fusion`: draws proposals from a :class:`GeoModel`,
evaluates the exact log-densities (every photo's and the null condition's, the all-zeros
embedding of classifier-free guidance, in one batched call per round), and turns the weighted
points into equally weighted samples with their diagnostics. Both features describe the model's
density (guidance 0): Bayes' rule holds for densities, not for guided samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from globeflow.answers.within import Region
from globeflow.core.fusion import (
    Mass,
    WeightedSample,
    effective_sample_size,
    importance_sample,
    leave_one_out_log_odds,
    log_normaliser,
    mass_inside,
    systematic_resample,
    weighted_mean,
)
from globeflow.core.likelihood import LOCALIZABILITY_SOLVER
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import latlon_to_unit, unit_to_latlon

PROPOSALS_PER_ROUND = 1024
"""Proposal points per round (shared out among the photos); each costs n + 1 density
evaluations."""
MAX_ROUNDS = 4
"""Rounds of fusion proposals at most."""
REJECTION_BUDGET = 32
"""A region's rejection sampling draws at most this many times the samples asked for."""
LIKELIHOOD_STEPS = 24
"""Steps of the likelihood ODE for the fusion densities (and the least steps of its proposals).
On the bundled model, against 128 steps, the error of a two-photo log-weight has a standard
deviation of 0.06 nats at 24 steps (0.05 at 48, 0.21 at 16), at half the cost of 48."""
MIN_ESS = 30.0
"""Below this effective sample size a fused answer is refused as unreliable."""
DISAGREEMENT_LOG_BAYES_FACTOR = math.log(1 / 20)
"""Photos whose "same place" Bayes factor falls below 1/20 are reported as disagreeing."""


@dataclass
class PosteriorDraw:
    """Equally weighted samples of a fused and/or truncated posterior and what was learnt."""

    samples: torch.Tensor
    """(N, 2) degrees; empty when nothing could be drawn."""
    localizability_bits: float
    localizability_stderr_bits: float
    effective_sample_size: float
    proposals: int
    rounds: int
    mass: Mass | None = None
    log_bayes_factor: float | None = None
    log_bayes_factor_stderr: float | None = None
    agreement_log_odds: list[float] | None = None


def check_fusable(model) -> None:
    """ValueError unless the model's densities are per steradian on S^2 and its null condition
    was trained (condition dropout above 0): what p(y | c1..cn) needs."""
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


def _unguided_latlon(model, emb, k, steps, generator, solver, precision) -> torch.Tensor:
    return model.sample(emb, k, steps, 0.0, generator=generator, solver=solver, precision=precision)


def fused_sample(
    model,
    emb: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    solver: str | None = None,
    precision: str | None = None,
    per_round: int = PROPOSALS_PER_ROUND,
    target_ess: float = 256.0,
    max_rounds: int = MAX_ROUNDS,
    likelihood_steps: int = LIKELIHOOD_STEPS,
    region: Region | None = None,
) -> WeightedSample:
    """Weighted proposals for the fused posterior of photos emb (n, D), n >= 2, in rounds until
    ``target_ess`` (counted inside ``region``) or ``max_rounds``.

    Proposals come from the photos' unguided samplers (``solver``, ``precision``, None: the
    default recipe's, :data:`~globeflow.core.sampler_settings.DEFAULT_SAMPLER`; at least
    ``likelihood_steps`` steps: the weights take the sampler's distribution for the model's
    density, which holds up to the discretisation of both); every point gets log p(y | c_i) for
    each photo and log p(y) under the null condition from one ``model.log_prob`` call over
    n + 1 rows.
    """
    check_fusable(model)
    emb = model.prepare_embeddings(emb)
    n = emb.shape[0]
    conditions = torch.cat([emb, torch.zeros_like(emb[:1])])

    steps = max(steps, likelihood_steps)

    def draw(k: int) -> torch.Tensor:
        return latlon_to_unit(_unguided_latlon(model, emb, k, steps, generator, solver, precision))

    def keep(x: torch.Tensor) -> torch.Tensor:
        return region.contains(unit_to_latlon(x.double()))

    def densities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latlon = unit_to_latlon(x.to(emb.dtype))[None].expand(n + 1, -1, -1)
        with torch.no_grad():
            log_p = model.log_prob(latlon, conditions, steps=likelihood_steps)
        return log_p[:n], log_p[n]

    return importance_sample(
        draw, densities, n, per_round, target_ess, max_rounds, generator=generator,
        keep=keep if region is not None else None,
    )  # fmt: skip


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
                emb, batch, path_steps, generator, method="path",
                solver=solver if carries else LOCALIZABILITY_SOLVER, precision=precision,
            )  # fmt: skip
        else:
            x, log_p = model.sample_with_log_density(emb, batch, steps, generator)
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
    has several photos), truncated to ``region``; with its localizability, the mass inside the
    region and, for several photos, the same-place Bayes factor and each photo's agreement."""
    log_w = sample.log_weight
    latlon = unit_to_latlon(sample.points)
    mass = None
    if region is not None:
        inside = region.contains(latlon)
        mass = mass_inside(log_w, inside)
        log_w = log_w.masked_fill(~inside, -math.inf)
    fused = sample.null_log_p is not None
    log_z, log_z_se = log_normaliser(sample.log_weight) if fused else (0.0, 0.0)
    draw = PosteriorDraw(
        samples=torch.empty(0, 2, dtype=torch.float64),
        localizability_bits=math.nan,
        localizability_stderr_bits=math.nan,
        effective_sample_size=effective_sample_size(log_w),
        proposals=sample.points.shape[0],
        rounds=sample.rounds,
        mass=mass,
    )
    if fused:
        draw.log_bayes_factor, draw.log_bayes_factor_stderr = log_z, log_z_se
        odds = leave_one_out_log_odds(sample.member_log_p, sample.null_log_p, sample.log_proposal)
        draw.agreement_log_odds = odds.tolist()
    if draw.effective_sample_size == 0.0:
        return draw
    idx = systematic_resample(log_w, num_samples, generator)
    draw.samples = latlon[idx]
    # log p_answer = log target - log Z - log P(R) on R.
    mean, se = weighted_mean(log_w, sample.log_target)
    log_mass, rel_mass_se = 0.0, 0.0
    if mass is not None:
        log_mass, rel_mass_se = math.log(mass.probability), mass.stderr / mass.probability
    draw.localizability_bits = (mean - log_z - log_mass) / math.log(2.0)
    draw.localizability_stderr_bits = math.hypot(se, log_z_se, rel_mass_se) / math.log(2.0)
    return draw


def disagreement(draw: PosteriorDraw, names: list[str]) -> dict | None:
    """Why a fused answer would mislead, or None: the photos disagree (same-place Bayes factor
    below 1/20), or their posteriors overlap too little for a reliable estimate (ESS < 30)."""
    if draw.log_bayes_factor is None:
        return None
    odds = draw.agreement_log_odds or []
    worst = min(range(len(odds)), key=odds.__getitem__) if odds else None
    bf, bf_se = draw.log_bayes_factor, draw.log_bayes_factor_stderr or 0.0
    info = {
        "log_bayes_factor": bf if math.isfinite(bf) else None,
        "log_bayes_factor_stderr": bf_se if math.isfinite(bf_se) else None,
        "effective_sample_size": draw.effective_sample_size,
        "least_consistent_photo": names[worst] if worst is not None else None,
    }
    if draw.log_bayes_factor < DISAGREEMENT_LOG_BAYES_FACTOR:
        odds_against = -draw.log_bayes_factor
        factor = (
            f"{math.exp(odds_against):.3g}"
            if odds_against < 50
            else f"10^{odds_against / math.log(10):.0f}"
            if math.isfinite(odds_against)
            else "infinitely many"
        )
        info["message"] = (
            f"the photos disagree: the model finds one place {factor} times less likely than "
            f"unrelated places (least consistent: {info['least_consistent_photo']}); locate them "
            "separately"
        )
        return info
    if draw.effective_sample_size < MIN_ESS:
        info["message"] = (
            f"the photos' answers barely overlap (effective sample size "
            f"{draw.effective_sample_size:.1f} of {draw.proposals} proposals); no reliable "
            "fused answer"
        )
        return info
    return None
