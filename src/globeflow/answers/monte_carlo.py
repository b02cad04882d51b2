"""How sure an answer is of its own numbers: Monte Carlo standard errors of what an answer reads
off its samples, and how many samples bring them within tolerance.

Each number an answer reads off its samples is a mean over them: a region's probability (the
share of samples it holds), the best guess's expected GeoScore (the mean GeoScore of the samples
against it). Its Monte Carlo error depends on how the initial states were drawn:

- independent draws: sqrt(p (1 - p) / N) for a share, std / sqrt(N) for a mean;
- randomized quasi-Monte Carlo (``noise="sobol"`` on S^2,
  :func:`globeflow.core.random_streams.stream_noise`): each draw is a few independently
  scrambled Sobol nets, whose means are independent estimates of the same number; the spread
  between them gives the error (:func:`replicate_stderr`), usually several times smaller than
  the independent draws' at the same N.

A sharp posterior puts every sample in one region with the same score (errors ~0 at any N); a
multimodal or diffuse one needs more. :func:`samples_needed` turns the errors of a first batch
into the sample count that brings both within the recipe's tolerances, so the cost of an answer
follows what the photo needs (:func:`globeflow.answers.draw.draw_answers`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from globeflow.answers.decode import geoscores
from globeflow.core.random_streams import SOBOL_REPLICATES

__all__ = ["AnswerErrors", "answer_errors", "replicate_stderr", "samples_needed"]


@dataclass(frozen=True)
class AnswerErrors:
    """Monte Carlo standard errors of one answer drawn from ``samples`` samples:
    ``guess_score`` (GeoScore points, of the best guess's expected GeoScore, 0-5000 scale) and
    ``region_probability`` (each reported region's, most probable first)."""

    samples: int
    guess_score: float
    region_probability: tuple[float, ...]

    @property
    def worst_region_probability(self) -> float:
        """The largest of the regions' standard errors (0 with no region)."""
        return max(self.region_probability, default=0.0)

    def within(self, guess_score_tolerance: float, region_probability_tolerance: float) -> bool:
        """Whether both errors are within the tolerances."""
        return (
            self.guess_score <= guess_score_tolerance
            and self.worst_region_probability <= region_probability_tolerance
        )

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "guess_score_stderr": self.guess_score,
            "region_probability_stderr": list(self.region_probability),
        }


def answer_errors(
    samples: torch.Tensor,
    guess: torch.Tensor,
    region_probabilities: Sequence[float],
    effective_samples: float | None = None,
    replicates: torch.Tensor | None = None,
    region_members: Sequence[torch.Tensor] = (),
) -> AnswerErrors:
    """Standard errors of an answer read off samples (N, 2) degrees: the best guess (2,)
    degrees and its regions' probabilities (shares of the N samples). ``effective_samples``:
    the independent draws the N stand for, where fewer than N (samples resampled from weighted
    proposals, :mod:`globeflow.answers.fusion`). ``replicates`` (N,) long: the Sobol net each
    sample comes from (:func:`globeflow.core.random_streams.replicate_ids`), whose spread then
    gives the errors (:func:`replicate_stderr`); ``region_members`` the samples each region
    holds, (N,) bool each, in the order of ``region_probabilities``."""
    n = samples.shape[0]
    if replicates is not None:
        scores = geoscores(guess[None], samples)[0].double()
        columns = [scores, *(m.to(torch.float64) for m in region_members)]
        stderr = replicate_stderr(torch.stack(columns, dim=-1), replicates).tolist()
        return AnswerErrors(samples=n, guess_score=stderr[0], region_probability=tuple(stderr[1:]))
    n_eff = min(float(effective_samples), n) if effective_samples is not None else float(n)
    if n < 2 or n_eff <= 0:
        return AnswerErrors(n, math.inf, tuple(math.inf for _ in region_probabilities))
    scores = geoscores(guess[None], samples)[0]
    score_se = float(scores.std()) / math.sqrt(n_eff)
    regions = tuple(math.sqrt(max(p * (1.0 - p), 0.0) / n_eff) for p in region_probabilities)
    return AnswerErrors(samples=n, guess_score=score_se, region_probability=regions)


def samples_needed(
    errors: AnswerErrors,
    guess_score_tolerance: float,
    region_probability_tolerance: float,
    block: int,
    cap: int,
) -> int:
    """Samples that bring ``errors`` (measured on ``errors.samples`` samples) within both
    tolerances, by the 1/sqrt(N) law: a multiple of ``block``, at least the samples already
    drawn, at most ``cap``."""
    n = errors.samples
    ratio = max(
        errors.guess_score / guess_score_tolerance,
        errors.worst_region_probability / region_probability_tolerance,
    )
    if not math.isfinite(ratio):
        return max(n, cap)
    wanted = math.ceil(n * ratio * ratio / block) * block
    return min(max(wanted, n), max(cap, n))


def replicate_stderr(values: torch.Tensor, replicates: torch.Tensor) -> torch.Tensor:
    """Standard errors (M,) of the means over N samples of ``values`` (N, M), each sample from
    the net ``replicates`` (N,) long names.

    The nets of one draw (ids ``draw * SOBOL_REPLICATES + k``) are independent and
    identically scrambled, so their means scatter around the draw's mean as its error
    does; the draws of an answer are independent of each other. With n_r samples in draw r,
    n_k in its net k (K nets) and N in all: Var = sum_r (n_r / N)^2 K / (K - 1)
    sum_k (n_k / n_r)^2 (mean_k - mean_r)^2 (the cluster estimate, exact in expectation for
    equal nets). Inf where a draw has one net (no spread to read).
    """
    values = values.to(torch.float64)
    ids, inverse, sizes = torch.unique(replicates, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(ids), values.shape[1], dtype=torch.float64)
    sums.index_add_(0, inverse.cpu(), values.cpu())
    sizes = sizes.to(torch.float64).cpu()
    means = sums / sizes[:, None]
    draw_of = ids.cpu() // SOBOL_REPLICATES
    variance = torch.zeros(values.shape[1], dtype=torch.float64)
    for draw in draw_of.unique().tolist():
        nets = draw_of == draw
        k = int(nets.sum())
        if k < 2:
            return torch.full((values.shape[1],), math.inf, dtype=torch.float64)
        n_r = sizes[nets].sum()
        mean_r = sums[nets].sum(0) / n_r
        weights = (sizes[nets] / n_r)[:, None]
        between = (weights * (means[nets] - mean_r)).pow(2).sum(0) * k / (k - 1)
        variance += (n_r / len(values)) ** 2 * between
    return variance.sqrt()
