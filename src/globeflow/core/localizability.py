"""The localizability's Monte Carlo estimate, E_p[log2 p], in one level or two.

The localizability is a mean over a photo's unguided samples of log p at each, and each log p
comes from a pass that carries the divergence along the sample's path
(:func:`globeflow.core.likelihood.sample_with_log_density`). On a sharp answer that pass is
mostly its stiff end, run in fp32 (the recipe's ``mixed``), and it costs more than the answer's
own samples.

Two levels (Giles' multilevel Monte Carlo, with two levels; a control variate whose mean is
estimated, not known): a coarse pass (fewer bulk steps, coarser stiff-end steps, the device's
fastest precision, one stiff end per photo) scores C samples; the recipe's pass scores the first
F of the same initial states, and

    estimate = mean_C(coarse) + mean_F(fine - coarse).

Its expectation is the recipe's pass's whatever the coarse pass's bias: both passes see the
same noise, so the correction's mean is the coarse mean's bias. (One caveat: the coarse grid's
floor is the sharpest its photo's fine samples were probed at, a choice those F samples make;
its effect is within the noise of the paired comparison with the plain estimate, docs/defaults.md,
"The localizability in two levels".) Its variance is

    Var(coarse) / C + Var(d) / F + 2 Cov(coarse, d) / C   (d = fine - coarse)

(the F pairs are the first F of the C), that is Var(fine) / C + Var(d) (1 / F - 1 / C). With
C = N + N/4 and F = N/4 it is at most the plain estimate's over N samples, Var(fine) / N, where
sd(d) <= sd(fine) / 4, and it is reported from the samples themselves either way.

Both passes score the first F samples first; a photo whose correction spreads more than that
there takes the plain estimate instead (the full pass scores the other N - F), so no photo's
error grows (:func:`two_level_localizability`).
"""

from __future__ import annotations

import math

import torch

from globeflow.core.likelihood import grid_choosing_precision, sample_with_log_density
from globeflow.core.log_density_settings import DEFAULT_LOG_DENSITY
from globeflow.core.sampler_settings import (
    COARSENING,
    FINE_SHARE,
    MIN_FINE_SAMPLES,
    TWO_LEVEL,
    SamplerSettings,
)
from globeflow.core.solvers import SPHERE
from globeflow.core.stiff_end import STIFF_LOG_STEP, by_width, floor_as_stiff_end

__all__ = [
    "bits_and_stderr",
    "correction_spread_limit",
    "two_level_bits",
    "two_level_localizability",
    "two_level_log_densities",
    "two_level_sizes",
    "uses_two_levels",
]


def two_level_sizes(samples: int) -> tuple[int, int]:
    """(fine, coarse) sample counts of a two-level estimate worth ``samples`` plain ones:
    (samples / :data:`FINE_SHARE`, samples + that); (samples, 0) where the fine share would
    be under :data:`MIN_FINE_SAMPLES` (the plain estimate)."""
    fine = samples // FINE_SHARE
    if fine < MIN_FINE_SAMPLES:
        return samples, 0
    return fine, samples + fine


def uses_two_levels(model, recipe: SamplerSettings) -> bool:
    """Whether ``recipe``'s localizability is taken in two levels for ``model``: asked for,
    on S^2 (where its density is the path method's; models that draw their own initial
    states), and enough samples."""
    return (
        recipe.localizability_estimator == TWO_LEVEL
        and getattr(model, "geometry", None) is SPHERE
        and getattr(model, "draws_initial_noise", False)
        and two_level_sizes(recipe.localizability_samples)[1] > 0
    )


@torch.no_grad()
def two_level_localizability(
    model, emb: torch.Tensor, x0: torch.Tensor, recipe: SamplerSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The localizability (B,) in bits on CPU, its Monte Carlo standard error (B,), and which
    photos took the plain estimate (B,) bool, for the resolved ``recipe`` from the initial
    states x0 (B, >= C, 3) of prepared embeddings emb (B, D) (C, F: :func:`two_level_sizes` of
    ``recipe.localizability_samples`` = N).

    Both passes score the first F initial states first. Where the correction spreads at most
    :func:`correction_spread_limit` as much as the log-density there, the coarse pass scores
    the other C - F and the photo takes two levels (:func:`two_level_bits`: at most the plain
    estimate's error over N); elsewhere the full pass scores the other N - F and the photo
    takes the plain estimate over N (on the exact fields, where a perfect network's
    log-densities spread by about a bit, the correction spreads 0.7-0.8 of it). The choice
    reads the first F samples, which both estimates share."""
    n = recipe.localizability_samples
    fine, coarse = two_level_sizes(n)
    fine_log_p, floors = _full_pass(model, emb, x0[:, :fine], recipe)
    widths = floors.min(1).values.tolist()
    first = _coarse_pass(model, emb, x0[:, :fine], recipe, widths)
    spread = (fine_log_p - first).double().std(-1) / fine_log_p.double().std(-1)
    plain = ~(spread <= correction_spread_limit(n)).cpu()  # NaN (no spread at all): plain
    bits = torch.empty(emb.shape[0], dtype=torch.float64)
    stderr = torch.empty_like(bits)
    if (~plain).any():
        rows = (~plain).nonzero().flatten().tolist()
        rest = _coarse_pass(model, emb[rows], x0[rows, fine:coarse], recipe,
                            [widths[i] for i in rows])  # fmt: skip
        bits[rows], stderr[rows] = two_level_bits(
            fine_log_p[rows], torch.cat([first[rows], rest], 1)
        )
    if plain.any():
        rows = plain.nonzero().flatten().tolist()
        rest = _full_pass(model, emb[rows], x0[rows, fine:n], recipe)[0]
        plain_bits, plain_stderr = bits_and_stderr(torch.cat([fine_log_p[rows], rest], 1))
        bits[rows], stderr[rows] = plain_bits.double(), plain_stderr.double()
    return bits, stderr, plain


def correction_spread_limit(samples: int) -> float:
    """The largest sd(full - coarse) / sd(full) at which two levels of ``samples`` plain ones
    are at least as precise as the plain estimate: Var(full) / C + Var(d) (1 / F - 1 / C) <=
    Var(full) / N (1/4 for the default sizes)."""
    fine, coarse = two_level_sizes(samples)
    return math.sqrt((1 / samples - 1 / coarse) / (1 / fine - 1 / coarse))


def _full_pass(
    model, emb: torch.Tensor, x0: torch.Tensor, recipe: SamplerSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's localizability pass from x0 (B, M, 3): natural log p (B, M) and each
    sample's probed stiff-end width (B, M)."""
    _, log_p, floors = sample_with_log_density(
        model, emb, x0.shape[1], recipe.localizability_steps, recipe.localizability_solver,
        None, x0, recipe.localizability_precision, stiff=DEFAULT_LOG_DENSITY.stiff,
        divergence=DEFAULT_LOG_DENSITY.divergence, return_floors=True,
    )  # fmt: skip
    return log_p, floors


def _coarse_pass(
    model, emb: torch.Tensor, x0: torch.Tensor, recipe: SamplerSettings, widths: list[float]
) -> torch.Tensor:
    """The coarse pass from x0 (B, M, 3), each photo's stiff end of its ``widths``: natural
    log p (B, M)."""
    precision = grid_choosing_precision(x0)
    steps = max(1, recipe.localizability_steps // COARSENING)

    def coarse(rows: list[int], width: float) -> torch.Tensor:
        return sample_with_log_density(
            model, emb[rows], x0.shape[1], steps, recipe.localizability_solver, None, x0[rows],
            precision, stiff=floor_as_stiff_end(width), log_step=STIFF_LOG_STEP * COARSENING,
            divergence="hutchinson",
        )[1]  # fmt: skip

    return by_width(widths, coarse)


@torch.no_grad()
def two_level_log_densities(
    model, emb: torch.Tensor, x0: torch.Tensor, recipe: SamplerSettings, fine: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural log-densities of the two levels from the initial states x0 (B, C, 3) of
    prepared embeddings emb (B, D): the resolved ``recipe``'s localizability pass on the first
    ``fine`` of them, (B, fine), and the coarse pass on all, (B, C). The coarse pass's stiff end
    reaches the sharpest floor its photo's fine samples were probed at, one grid per photo."""
    fine_log_p, floors = _full_pass(model, emb, x0[:, :fine], recipe)
    return fine_log_p, _coarse_pass(model, emb, x0, recipe, floors.min(1).values.tolist())


def two_level_bits(
    fine_log_p: torch.Tensor, coarse_log_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-level localizability (B,) in bits on CPU and its Monte Carlo standard error
    (B,), from the fine pass's natural log-densities (B, F) and the coarse pass's (B, C) at the
    same initial states (the fine ones first, F >= 2, C >= F)."""
    fine = fine_log_p.double().cpu() / math.log(2.0)
    coarse = coarse_log_p.double().cpu() / math.log(2.0)
    f, c = fine.shape[-1], coarse.shape[-1]
    if f < 2 or c < f:
        raise ValueError(f"two levels need >= 2 fine samples and >= as many coarse, not {f}, {c}")
    # Photo by photo: a reduction over a (B, N) tensor may round differently with B, and a
    # photo's answer must not depend on its batch.
    rows = [
        _two_level_row(fine_row, coarse_row)
        for fine_row, coarse_row in zip(fine, coarse, strict=True)
    ]
    bits, var = (torch.stack(column) for column in zip(*rows, strict=True))
    return bits, var.clamp_min(0.0).sqrt()


def _two_level_row(fine: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One photo's two-level estimate and its variance from fine (F,) and coarse (C,) bits."""
    f, c = fine.shape[0], coarse.shape[0]
    d = fine - coarse[:f]
    paired = coarse[:f]
    cov = ((d - d.mean()) * (paired - paired.mean())).sum() / (f - 1)
    return coarse.mean() + d.mean(), coarse.var() / c + d.var() / f + 2.0 * cov / c


def bits_and_stderr(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Localizability E[log2 p] (B,) on CPU from log-densities (B, N) of the model's own
    samples, and its Monte Carlo standard error (NaN for one sample): the plain estimate."""
    bits = log_p / math.log(2.0)
    n = bits.shape[-1]
    stderr = bits.std(-1) / math.sqrt(n) if n > 1 else torch.full_like(bits[:, 0], math.nan)
    return bits.mean(-1).cpu(), stderr.cpu()
