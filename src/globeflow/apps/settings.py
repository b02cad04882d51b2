"""Allowed values of the locate settings: one table for the command line and the server.

Each entry maps a setting name to a rule with ``allows(value) -> bool`` and ``describe() -> str``
(the allowed values, in words): a :class:`Range` of numbers or :class:`OneOf` a set of names. A
new setting is one more entry; a rule of another shape is any object with those two methods.

``num_samples`` is bounded rather than chunked, at the server's long-standing cap of 4096 per
photo: sampling memory grows linearly with it (``1e8`` died in the allocator after 21 s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from globeflow.core.families import FAMILIES, denoising_family_names
from globeflow.core.sampler_settings import AUTO, GRIDS, NOISE_DESIGNS, SAMPLE_PRECISIONS
from globeflow.core.sphere import EARTH_RADIUS_KM

MAX_REGION_RADIUS_KM = math.pi * EARTH_RADIUS_KM
"""Half the circumference (km): a region of this radius already covers the whole globe."""


class Rule(Protocol):
    def allows(self, value: Any) -> bool: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Range:
    """Finite numbers in [low, high] (or (low, high] with ``low_open``); integers only with
    ``integer``. ``high`` may be ``math.inf`` for "no upper bound"."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if math.isinf(self.high):
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    names: tuple[str, ...]

    def allows(self, value: Any) -> bool:
        return value in self.names

    def describe(self) -> str:
        return "one of " + ", ".join(self.names)


SOLVERS = tuple(
    sorted({name for family in denoising_family_names() for name in FAMILIES[family].solvers})
)
"""Every family's solvers; whether a model's family has the one asked for is its own check."""

LOCATE_LIMITS: dict[str, Rule] = {
    "num_samples": Range(16, 4096, integer=True),
    # 0: all num_samples at once; else the first draw of an adaptive answer.
    "first_samples": Range(0, 4096, integer=True),
    "noise": OneOf(NOISE_DESIGNS),
    # Guidance in (-1, 0) leans towards the unconditional branch (a flatter answer); 10 is the
    # web page's slider maximum and the server's long-standing cap.
    "guidance": Range(-1.0, 10.0),
    "steps": Range(1, 256, integer=True),
    "solver": OneOf(SOLVERS),
    "grid": OneOf(GRIDS),
    "precision": OneOf((*SAMPLE_PRECISIONS, AUTO)),
    "localizability_samples": Range(0, 4096, integer=True),
    "top_k": Range(1, 100, integer=True),
    # None (the default): regions at the answer's own scale; a number fixes their radius.
    "region_radius_km": Range(0.0, MAX_REGION_RADIUS_KM, low_open=True),
    # Proposal points per round of a fused answer (predict --same-place).
    "fusion_proposals": Range(64, 65536, integer=True),
}
"""Settings of one locate call (``globeflow predict``, ``POST /v1/locate``)."""

EVALUATE_LIMITS: dict[str, Rule] = {
    **{k: LOCATE_LIMITS[k] for k in ("num_samples", "guidance", "steps")},
    "hpd_samples": Range(0, 4096, integer=True),
    "batch_size": Range(1, 4096, integer=True),
    "limit": Range(1, math.inf, integer=True),
}
"""Settings of ``globeflow evaluate`` (``hpd_samples`` 0 turns the calibration samples off)."""


class SettingError(ValueError):
    """A setting outside its allowed values; ``name``, ``value`` and ``expected`` say which."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"{name} = {value!r}: must be {expected}")


def check_settings(values: Mapping[str, Any], limits: Mapping[str, Rule] = LOCATE_LIMITS) -> None:
    """Raise :class:`SettingError` for the first value its rule does not allow.

    ``None`` stands for "the default" and is not checked; a name missing from ``limits`` is a
    programming error (``KeyError``).
    """
    for name, value in values.items():
        rule = limits[name]
        if value is not None and not rule.allows(value):
            raise SettingError(name, value, rule.describe())


DEFAULT_PRIOR_FRACTION = 0.25
"""Share of each training batch drawn from ``--prior-locations`` when none is given."""
DEFAULT_WARMUP_STEPS = 500
"""Steps of learning-rate warmup when none is given, for runs of at least ten times as many."""


def default_warmup_steps(max_steps: int) -> int:
    """The warmup a run of ``max_steps`` gets when none is given: 500 steps, at most a tenth of
    the run (a default never makes a valid command fail)."""
    return min(DEFAULT_WARMUP_STEPS, max(0, max_steps) // 10)


def check_train_options(
    max_steps: int, warmup_steps: int, prior_fraction: float | None, prior_locations: Any
) -> float:
    """Training options that contradict each other, refused in one line (``ValueError``);
    returns the prior fraction to use. ``prior_fraction`` None: the default."""
    if warmup_steps > max_steps:
        raise ValueError(
            f"--warmup-steps {warmup_steps}: must be at most --max-steps ({max_steps}); the "
            "learning rate would never reach --lr"
        )
    if prior_fraction is None:
        return DEFAULT_PRIOR_FRACTION
    if prior_locations is None:
        raise ValueError(
            f"--prior-fraction {prior_fraction:g}: needs --prior-locations (the locations "
            "the fraction of each batch is drawn from)"
        )
    if not (math.isfinite(prior_fraction) and 0.0 <= prior_fraction < 1.0):
        raise ValueError(f"--prior-fraction {prior_fraction:g}: must be a number in [0, 1)")
    return prior_fraction
