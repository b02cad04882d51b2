"""How sure an answer is of its own numbers: Monte Carlo standard errors of what an answer reads
off its samples, and how many samples bring them within tolerance.

An answer's samples are independent draws of the model's distribution (each from its own
initial state), so the numbers read off them carry Monte Carlo error that falls as 1/sqrt(N):

- a region's probability is a share of the samples: standard error sqrt(p (1 - p) / N);
- the best guess's expected GeoScore is a mean over the samples: standard error std / sqrt(N)
  of the GeoScores of the samples against the guess.

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

__all__ = ["AnswerErrors", "answer_errors", "samples_needed"]


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
) -> AnswerErrors:
    """Standard errors of an answer read off samples (N, 2) degrees: the best guess (2,)
    degrees and its regions' probabilities (shares of the N samples). ``effective_samples``:
    the independent draws the N stand for, where fewer than N (samples resampled from weighted
    proposals, :mod:`globeflow.answers.fusion`)."""
    n = samples.shape[0]
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
