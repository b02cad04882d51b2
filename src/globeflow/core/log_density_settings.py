"""How a model scores its own samples (the localizability estimate): one settings object.

The sampling side of the estimate (samples, bulk steps, solver, precision) is the recipe's
``localizability_*`` fields (:class:`~globeflow.core.sampler_settings.SamplerSettings`); this
module holds the rest: the density method, the likelihood ODE's steps and the stiff end.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass


class StiffEnd(enum.Enum):
    """How the data end of a log-density solve is gridded, where no width is given."""

    PROBED = "probed"
    """Each point's own floor, probed where it lands (:func:`~globeflow.core.likelihood.
    stiffness_floor`): its answer does not depend on its batch."""
    NONE = "none"
    """No stiff end: the bulk steps alone, uniform in gamma."""


StiffEndWidth = StiffEnd | float
"""A :class:`StiffEnd`, or one stiff-end width (in 1 - gamma) for every point."""


def as_stiff_end(value: StiffEnd | float | None) -> StiffEndWidth:
    """``value`` in explicit form; the older spellings None (probed) and ``math.inf`` (no stiff
    end) are accepted."""
    if value is None:
        return StiffEnd.PROBED
    if isinstance(value, StiffEnd):
        return value
    if value == math.inf:
        return StiffEnd.NONE
    if not value > 0:
        raise ValueError(f"a stiff-end width must be > 0, not {value!r}")
    return float(value)


DENSITY_METHODS = ("path", "ode")

DIVERGENCES = ("exact", "hutchinson")
"""How the path method integrates the divergence: exactly (two Jacobian-vector products per
evaluation on S^2), or by Hutchinson's one-JVP estimate (unbiased: for Monte Carlo means over
samples; :mod:`globeflow.core.path_field`)."""

LOCALIZABILITY_DIVERGENCE = "hutchinson"
"""The localizability's divergence (issue 22). It is a mean over samples, so an unbiased
per-sample error with a small spread costs nothing: on 8 photos each of the bundled, syn-small
and syn-published models (128 samples, the same noise), the estimate moved by a mean
+0.003-0.008 bit (at most 0.03) against a Monte Carlo standard error of 0.25-0.30 bit, which
it left unchanged, for 1.05x / 1.16x / 1.23x the speed of the exact divergence
(``benchmarks/run.py localizability_divergence``; docs/benchmarks.md, "The cost of an
answer"). Densities read per sample (fusion's weights) ask for ``"exact"``."""


@dataclass(frozen=True)
class LogDensitySettings:
    """How ``sample_with_log_density`` scores a model's own samples.

    ``method``: ``"path"`` (one pass that carries the log-density along the sampling path, on
    S^2) or ``"ode"`` (sample, then solve the likelihood ODE at every sample); None: path on
    S^2, ode in R^3. ``likelihood_steps``: the ODE method's steps (None: the likelihood's
    default). ``stiff``: the path method's stiff end (:class:`StiffEnd` or one width).
    ``divergence``: the path method's divergence, one of :data:`DIVERGENCES` (default
    :data:`LOCALIZABILITY_DIVERGENCE`).
    """

    method: str | None = None
    likelihood_steps: int | None = None
    stiff: StiffEndWidth = StiffEnd.PROBED
    divergence: str = LOCALIZABILITY_DIVERGENCE

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in DENSITY_METHODS:
            raise ValueError(
                f"unknown density method {self.method!r}; choose from {DENSITY_METHODS}"
            )
        as_stiff_end(self.stiff)
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose from {DIVERGENCES}")

    def with_overrides(self, **overrides: object) -> LogDensitySettings:
        """A copy with the given fields replaced (None leaves a field as it is; ``stiff`` in
        any spelling of :func:`as_stiff_end`)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "stiff" in given:
            given["stiff"] = as_stiff_end(given["stiff"])  # type: ignore[arg-type]
        return dataclasses.replace(self, **given)


DEFAULT_LOG_DENSITY = LogDensitySettings()
