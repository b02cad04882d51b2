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


@dataclass(frozen=True)
class LogDensitySettings:
    """How ``sample_with_log_density`` scores a model's own samples.

    ``method``: ``"path"`` (one pass that carries the log-density along the sampling path, on
    S^2) or ``"ode"`` (sample, then solve the likelihood ODE at every sample); None: path on
    S^2, ode in R^3. ``likelihood_steps``: the ODE method's steps (None: the likelihood's
    default). ``stiff``: the path method's stiff end (:class:`StiffEnd` or one width).
    """

    method: str | None = None
    likelihood_steps: int | None = None
    stiff: StiffEndWidth = StiffEnd.PROBED

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in DENSITY_METHODS:
            raise ValueError(
                f"unknown density method {self.method!r}; choose from {DENSITY_METHODS}"
            )
        as_stiff_end(self.stiff)

    def with_overrides(self, **overrides: object) -> LogDensitySettings:
        """A copy with the given fields replaced (None leaves a field as it is; ``stiff`` in
        any spelling of :func:`as_stiff_end`)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "stiff" in given:
            given["stiff"] = as_stiff_end(given["stiff"])  # type: ignore[arg-type]
        return dataclasses.replace(self, **given)


DEFAULT_LOG_DENSITY = LogDensitySettings()
