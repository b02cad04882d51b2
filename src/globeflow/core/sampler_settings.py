"""How an answer is sampled: one settings object for predict, serve, evaluate, Locator, the
models' own ``sample`` / ``localizability`` and the benchmarks, so that accuracy tables measure
exactly what users run. Every sampling default lives here and nowhere else
(tests/test_sampler_settings.py fails on a second copy).

The defaults were chosen by measurement on every testbed (benchmarks/confident.py,
docs/defaults.md): the cheapest setting within noise of the authors' sampler (Euler on their
grid, 250 steps, fp32) from 1-km multimodal answers to the diffuse bundled model.

This module imports no torch (the command line builds its help from it).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

GRIDS = ("published", "quadratic", "log-width")
"""Time grids of the samplers (:mod:`globeflow.core.time_grids`)."""

PRECISIONS = ("fp32", "bf16")
"""Precisions of the network's matrix products while sampling."""

FULL_PRECISION = "fp32"
"""The network's own precision: what a function computes in when it is given none (a neutral
value, not a choice of the recipe)."""

AUTO = "auto"
"""Precision "auto": bf16 where the device runs it natively, else fp32."""

MIXED = "mixed"
"""Precision "mixed" (the answer's samples): bf16 at signal levels below
:data:`MIXED_BF16_BELOW`, fp32 from there to the data end; fp32 throughout where bf16 is not
native (:func:`resolve`). An error made early on the path is shrunk by the rest of it (in
proportion to the answer's width over the noise's), so bf16 costs little there; at the data end
bf16 moves a 1-km answer by ~1 km (docs/defaults.md, "bf16 in the sharp regime")."""

MIXED_BF16_BELOW = 0.97
"""Signal level up to which "mixed" runs bf16: the noise is still ~190 km (0.03 of a radian)
wide there; 32 of the default's 48 levels. Against fp32 from the same noise, on every trained
testbed up to 25 km at guidance 0 and 2, the default sampler's samples move by a median
0.000-0.16 km and its best guesses by at most 0.13 km (bf16 throughout: 0.25-1.5 km and up to
5.5 km), at 1.31-1.52x the sampling speed of fp32; on 200- to 2,000-km answers by the ~1 km
bf16 moves them throughout (``benchmarks/run.py bf16_sharp``; docs/defaults.md, "bf16 in the
sharp regime")."""

SAMPLE_PRECISIONS = (*PRECISIONS, MIXED)
"""Precisions of a sampler: one for every level, or :data:`MIXED` (a pass whose points sit on
grids of their own, :mod:`globeflow.core.point_grids`, has no one level to switch at and runs
"mixed" in fp32)."""

DEFAULT_GUIDANCE = 0.0
"""The guidance of a model whose metadata recommends none (``recommended_guidance``, see
:func:`recommended_guidance`), e.g. one trained with ``globeflow train``. Chosen on the trained
testbeds (benchmarks/guidance.py, docs/defaults.md): against 2, the best guess's expected error
is the same (3,531 vs 3,568 km over 10 cells from 1 to 2,000 km) while the region probabilities
are calibrated (mean |claimed - true mass| 0.05 vs 0.52: at 2 the top region claims 75% and
holds the truth 10% of the time), and each step costs one network row instead of two."""

PUBLISHED_GUIDANCE = 2.0
"""The published PLONK checkpoints' recommended guidance: the paper's scale for location
prediction (Sec. 4, "omega = 2 for location prediction"), measured by the authors on real
photos; their checkpoints carry no metadata, so loading one records it."""

LOCALIZABILITY_BULK_STEPS = 24
"""Bulk steps (uniform in gamma) of the one-pass localizability sampler, before the stiff end
of :func:`globeflow.core.stiff_end.stiff_end_levels` adds its steps. With
:data:`LOCALIZABILITY_SOLVER` and the stiff-end step of
:data:`globeflow.core.stiff_end.STIFF_LOG_STEP`, the bias on the exact-field testbeds is within
0.1 bit (docs/benchmarks.md, "Localizability accuracy and cost";
``benchmarks/likelihood_accuracy.py``)."""

LOCALIZABILITY_SOLVER = "midpoint"
"""Solver of the one-pass localizability estimate (the lagged midpoint rule, one evaluation per
step, was 0.35-0.38 bit low on the 25-km and 1,000-km exact testbeds at 16 steps)."""

LOCALIZABILITY_SAMPLES = 128
"""Unguided samples per photo of the localizability estimate (and of evaluate's calibration)."""

LOCALIZABILITY_PRECISION = MIXED
"""Precision of the localizability pass (its pilot, stiffness probe and solve): :data:`MIXED`,
bf16 below signal level :data:`MIXED_BF16_BELOW` and fp32 from there to the data end (fp32
throughout where bf16 is not native). bf16 throughout ("auto", the default before) biased the
estimate of sharp trained answers: against the exact log-likelihood (``log_prob_ode`` in fp32)
at the pass's own samples, syn-small's 5-km one-city cell +0.25 bit (its Monte Carlo SE 0.17;
fp32 +0.00, mixed +0.002) and 1-km +0.07 (mixed -0.01), 2 photos each; the stiff end's ~45
steps each add a divergence of ~2 / (1 - gamma) with bf16's rounding. The earlier check
(-0.019 +- 0.008 bit, one photo per pattern) averaged that cell away
(``benchmarks/run.py localizability_answer_path``; docs/benchmarks.md, "Issue 22's last
round"). The answer's own samples keep ``precision``."""

PLAIN = "plain"
TWO_LEVEL = "two-level"
LOCALIZABILITY_ESTIMATORS = (PLAIN, TWO_LEVEL)
"""How the localizability's Monte Carlo mean is taken (:mod:`globeflow.core.localizability`):
"plain", the mean of ``localizability_samples`` passes of the recipe above; "two-level", a
coarse pass (:data:`COARSENING` times coarser steps, the device's fastest precision, one
stiff end per photo) on ``localizability_samples`` x 5/4 samples, corrected by the
recipe's pass on the first quarter of them: the same expectation as "plain", and at most its
standard error where the per-sample correction spreads at most a quarter as much as the
log-density itself; a photo where it spreads more (read off the first quarter) takes "plain"."""

LOCALIZABILITY_ESTIMATOR = TWO_LEVEL
"""The default estimator (issue 22): on 8 photos of syn-small and of syn-published (sharp), the
pass 1.38-1.70x faster than plain in three runs, its standard error lower on average (0.238 /
0.269 bit against 0.252 / 0.284), the paired difference within its noise, the correction's
spread at most 0.23 of the log-density's (``benchmarks/run.py localizability_two_level``;
docs/defaults.md, "The localizability in two levels"). The bundled model recommends
:data:`PLAIN` (two levels there: 0.70-1.04x)."""

COARSENING = 2
"""The two-level localizability's coarse pass takes the recipe's bulk steps / COARSENING (at
least 1) and the stiff end's log step x COARSENING (the recipe's 24 and 0.2: 12 and 0.4)."""

FINE_SHARE = 4
"""The two-level estimate runs the recipe's pass on ``localizability_samples`` / FINE_SHARE of
its samples, and the coarse pass on ``localizability_samples`` + that many."""

MIN_FINE_SAMPLES = 8
"""Below this many fine samples the two-level estimate is plain (a correction's spread is not
read off fewer pairs)."""

FIRST_SAMPLES = 256
"""Samples per photo of an answer's first draw. Every accuracy table of docs/defaults.md holds at
this count (``benchmarks/confident.py`` compares 256 samples of each sampler); more are drawn,
up to ``num_samples``, only where the first draw's Monte Carlo errors exceed the tolerances
below (:mod:`globeflow.answers.monte_carlo`)."""

IID = "iid"
SOBOL = "sobol"
NOISE_DESIGNS = (IID, SOBOL)
"""How a photo's initial states are drawn (``SamplerSettings.noise``): "sobol" (randomized
quasi-Monte Carlo: independently scrambled Sobol nets on S^2, :mod:`globeflow.core.
random_streams`; the default where a model draws its noise there) or "iid" (independent points
of the model's noise). Each sobol point is uniform on the sphere, so the answer's distribution
is the same; the nets cover the sphere evenly, so the means an answer reads off its samples
(region probabilities, expected GeoScore) scatter less: at 256 samples, a three-city answer's
shares 2.3-3.8x less than with iid points in the 8 nets an answer draws, 3.6-6.4x in one net
(``benchmarks/run.py noise_design``). An adaptive answer so stops at fewer samples: 400-544
instead of 1,024 on the three-city cells, within noise of fixed 1,024 iid on every trained cell
once the regions stopped following the sample count (issue 22; docs/defaults.md, "Sobol nets
as the default")."""

GUESS_SCORE_TOLERANCE = 50.0
"""Largest Monte Carlo standard error of the best guess's expected GeoScore (points of 5,000:
1%, about 15 km of distance near the guess) that an answer accepts without drawing more."""

REGION_PROBABILITY_TOLERANCE = 0.02
"""Largest Monte Carlo standard error of a region's probability that an answer accepts without
drawing more (a 1/3 region needs ~560 samples; a single sharp region has none at any count)."""

EVALUATE_BATCH_SIZE = 64
"""Images per model call of ``evaluate`` (how the work is cut, not what the rows are)."""


@dataclass(frozen=True)
class SamplerSettings:
    """A complete sampling recipe.

    ``solver``: a solver name (:mod:`globeflow.core.solvers`, or the family's published step);
    ``grid``: a time grid of :data:`GRIDS` (None: the solver's own); ``steps``: solver steps;
    ``precision``: "fp32", "bf16", "mixed" (:data:`MIXED`) or "auto"; ``num_samples``: samples
    per photo; ``guidance``: classifier-free guidance scale (None: the model's recommended one);
    ``localizability_*``: the unguided samples, (bulk) steps, solver and precision of the
    localizability estimate; a sharp posterior adds steps at the data end
    (:mod:`globeflow.core.likelihood`); ``localizability_estimator``: one of
    :data:`LOCALIZABILITY_ESTIMATORS`.

    Adaptive sample count: an answer first draws ``first_samples`` per photo, then, up to
    ``num_samples``, as many more as bring the Monte Carlo standard errors of its best guess's
    expected GeoScore and of its region probabilities within ``guess_score_tolerance`` and
    ``region_probability_tolerance`` (:mod:`globeflow.answers.monte_carlo`). ``first_samples``
    0 (or >= ``num_samples``) draws ``num_samples`` at once.

    ``noise``: how an answer's initial states are drawn from each photo's stream
    (:data:`NOISE_DESIGNS`): "sobol" (randomized quasi-Monte Carlo on S^2, where the model
    draws its own noise there, else iid; the errors read off the spread of independently
    scrambled nets) or "iid". It changes the answer's Monte Carlo error, not its distribution;
    ``model.sample`` with a generator draws iid.
    """

    solver: str = "lagged-midpoint"
    grid: str | None = "published"
    steps: int = 48
    precision: str = MIXED
    num_samples: int = 1024
    guidance: float | None = None
    localizability_samples: int = LOCALIZABILITY_SAMPLES
    localizability_steps: int = LOCALIZABILITY_BULK_STEPS
    localizability_solver: str = LOCALIZABILITY_SOLVER
    localizability_precision: str = LOCALIZABILITY_PRECISION
    localizability_estimator: str = LOCALIZABILITY_ESTIMATOR
    first_samples: int = FIRST_SAMPLES
    guess_score_tolerance: float = GUESS_SCORE_TOLERANCE
    region_probability_tolerance: float = REGION_PROBABILITY_TOLERANCE
    noise: str = SOBOL

    def __post_init__(self) -> None:
        if self.grid is not None and self.grid not in GRIDS:
            raise ValueError(f"unknown time grid {self.grid!r}; choose from {GRIDS}")
        for precision in (self.precision, self.localizability_precision):
            if precision != AUTO and precision not in SAMPLE_PRECISIONS:
                raise ValueError(
                    f"unknown precision {precision!r}; choose from {(*SAMPLE_PRECISIONS, AUTO)}"
                )
        if self.steps < 1 or self.num_samples < 1 or self.localizability_steps < 1:
            raise ValueError("steps, num_samples and localizability_steps must be >= 1")
        if self.first_samples < 0:
            raise ValueError("first_samples must be >= 0 (0: draw num_samples at once)")
        if self.guess_score_tolerance <= 0 or self.region_probability_tolerance <= 0:
            raise ValueError("the Monte Carlo tolerances must be > 0")
        if self.localizability_estimator not in LOCALIZABILITY_ESTIMATORS:
            raise ValueError(
                f"unknown localizability estimator {self.localizability_estimator!r}; "
                f"choose from {LOCALIZABILITY_ESTIMATORS}"
            )
        if self.noise not in NOISE_DESIGNS:
            raise ValueError(f"unknown noise design {self.noise!r}; choose from {NOISE_DESIGNS}")

    @property
    def adaptive(self) -> bool:
        """Whether answers draw ``first_samples`` first and more only where needed."""
        return 0 < self.first_samples < self.num_samples

    def with_overrides(self, **overrides: object) -> SamplerSettings:
        """A copy with the given fields replaced; None values leave a field as it is. A solver
        given without a grid keeps this recipe's grid (see :func:`resolve`)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def resolved_precision(self, device: Any) -> str:
        """The precision the answer's samples run at on ``device`` (a torch device or its
        name): :func:`precision_on` its fastest."""
        from globeflow.core.precision import fastest_precision

        return precision_on(self.precision, fastest_precision(device))

    def describe(self) -> dict:
        """The settings as a JSON-ready dict, plus a short ``label``."""
        return {**dataclasses.asdict(self), "label": self.label()}

    def label(self) -> str:
        """solver/grid/steps/precision/num_samples, e.g. :data:`AUTHORS_SAMPLER`'s
        "euler/published/250/fp32/1024"."""
        grid = self.grid or "own"
        return f"{self.solver}/{grid}/{self.steps}/{self.precision}/{self.num_samples}"


DEFAULT_SAMPLER = SamplerSettings()
"""What ``predict``, ``serve``, ``evaluate``, ``Locator`` and ``GeoModel.sample`` use unless
told otherwise, less the fields a model's metadata recommends for itself
(:func:`recommended_sampler`, e.g. the bundled model's)."""

AUTHORS_SAMPLER = SamplerSettings(
    solver="euler",
    grid="published",
    steps=250,
    precision="fp32",
    guidance=0.0,
    first_samples=0,
    noise=IID,
)
"""The authors' pipeline default: their Euler step on their grid, 250 steps, float32, no
guidance (``cfg=0`` in their ``PlonkPipeline.__call__``), all samples at once from independent
noise: the reference of benchmarks/confident.py and the sampler of ``PlonkPipeline``."""


def recommended_guidance(model: object) -> float:
    """The guidance ``model``'s metadata recommends (``recommended_guidance``), else
    :data:`DEFAULT_GUIDANCE`."""
    meta = getattr(model, "metadata", None) or {}
    return float(meta.get("recommended_guidance", DEFAULT_GUIDANCE))


RECOMMENDED_SAMPLER_KEY = "recommended_sampler"
"""The metadata key of a model's recommended recipe: a dict of :class:`SamplerSettings` fields
(all but ``guidance``, which has ``recommended_guidance``) and an optional ``measured`` note
saying how it was chosen; read by :func:`recommended_sampler`."""


def sampler_recommendation(value: object) -> dict[str, Any]:
    """The :class:`SamplerSettings` fields of a ``recommended_sampler`` metadata value (its
    ``measured`` note left out); ``ValueError`` naming what is wrong with it (not a dict, a field
    that is not a recipe field, or a value the recipe refuses)."""
    if not isinstance(value, dict):
        raise ValueError(f"{RECOMMENDED_SAMPLER_KEY} is not an object: {value!r}")
    fields = {k: v for k, v in value.items() if k != "measured"}
    allowed = {f.name for f in dataclasses.fields(SamplerSettings)} - {"guidance"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        close = {m for name in unknown for m in difflib.get_close_matches(name, allowed, 2)}
        hint = f"did you mean {', '.join(sorted(close))}? " if close else ""
        raise ValueError(
            f"{RECOMMENDED_SAMPLER_KEY}: {', '.join(unknown)} not among the recipe's fields "
            f"({hint}the fields are SamplerSettings'; the guidance is recommended_guidance)"
        )
    try:
        dataclasses.replace(DEFAULT_SAMPLER, **fields)
    except (TypeError, ValueError) as exc:  # a value the recipe refuses (or of the wrong type)
        raise ValueError(f"{RECOMMENDED_SAMPLER_KEY}: {exc}") from exc
    return fields


def recommended_sampler(model: object) -> dict[str, Any]:
    """The recipe fields ``model``'s metadata recommends (``recommended_sampler``, see
    :func:`sampler_recommendation`), else none (an empty dict)."""
    meta = getattr(model, "metadata", None) or {}
    return sampler_recommendation(meta.get(RECOMMENDED_SAMPLER_KEY, {}))


def model_recipe(model: object) -> SamplerSettings:
    """The recipe ``model`` runs when the caller gives none: :data:`DEFAULT_SAMPLER` with the
    fields of :func:`recommended_sampler` (the guidance left None: :func:`resolve` fills it)."""
    return dataclasses.replace(DEFAULT_SAMPLER, **recommended_sampler(model))


def solver_for(model: object, solver: str) -> str | None:
    """``solver`` where ``model``'s family has it, else the family's own default (the published
    step; the R^3 families have no data-2m); None for models without solvers (baselines)."""
    solvers = getattr(model, "solvers", ())
    if solver in solvers:
        return solver
    return getattr(model, "default_solver", None) if solvers else None


def resolve(
    model: object, settings: SamplerSettings | None = None, **overrides: object
) -> SamplerSettings:
    """The recipe ``model`` runs: ``settings`` (default: the model's own, :func:`model_recipe`)
    with the ``overrides`` that are not None, completed for the model.

    - ``settings`` None: :data:`DEFAULT_SAMPLER` with the fields the model's metadata
      recommends (:func:`recommended_sampler`). A recipe given is run as given, the model's
      recommendation aside (so a benchmark's reference and candidates are what they say,
      :data:`DEFAULT_SAMPLER` itself included); an override given is run as given, also where it
      equals the default (``steps=48`` on a model recommending 8 runs 48).
    - ``guidance`` None: the model's :func:`recommended_guidance`.
    - ``solver`` given without ``grid``: that solver on the recipe's grid. A recipe's grid was
      chosen with its solver and steps by measurement; naming only the solver changes only the
      solver, so ``solver=DEFAULT_SAMPLER.solver`` alone is the default, and every solver's
      default grid is the recipe's ("published"). A solver's own grid (its ``grid`` attribute)
      is run only by a recipe whose ``grid`` is None.
    - The recipe's solver where the family lacks it (diffusion runs no ODE solver): the
      family's own step, on its own grid, at :data:`AUTHORS_SAMPLER`'s step count when the
      recipe's is the default one (another count is kept). A solver given in ``overrides`` is
      kept as given (the model names what it lacks).
    - ``precision`` and ``localizability_precision`` "auto" or "mixed":
      resolved for the model's device by :func:`precision_on` (a float64 model asks for its own
      precision: fp32).
    """
    recipe = (settings or model_recipe(model)).with_overrides(**overrides)
    if recipe.guidance is None:
        recipe = dataclasses.replace(recipe, guidance=recommended_guidance(model))
    if overrides.get("solver") is None:
        solver = solver_for(model, recipe.solver)
        if solver is not None and solver != recipe.solver:
            # The family's own step stands in for the recipe's solver: at the recipe's default
            # count it runs at the count it was published with (DDIM at 48 steps is beyond
            # noise of DDIM 250 on sharp answers, 10x the miss at guidance 2: docs/defaults.md).
            steps = AUTHORS_SAMPLER.steps if recipe.steps == DEFAULT_SAMPLER.steps else None
            recipe = dataclasses.replace(recipe, solver=solver, grid=None)
            recipe = recipe.with_overrides(steps=overrides.get("steps") or steps)
    if {recipe.precision, recipe.localizability_precision}.isdisjoint((AUTO, MIXED)):
        return recipe
    fastest = _auto_precision(model)
    return dataclasses.replace(
        recipe,
        precision=precision_on(recipe.precision, fastest),
        localizability_precision=precision_on(recipe.localizability_precision, fastest),
    )


def precision_on(precision: str, fastest: str) -> str:
    """``precision`` as it runs where ``fastest`` is the fastest precision ("bf16" where bf16
    is native): "auto" becomes ``fastest``; "mixed" becomes fp32 where bf16 is not native (it
    would be emulated, slower than fp32); any other is kept."""
    if precision == AUTO:
        return fastest
    if precision == MIXED and fastest == FULL_PRECISION:
        return FULL_PRECISION
    return precision


def _auto_precision(model: object) -> str:
    """What "auto" runs for ``model``: fp32 for a float64 model (it asks for precision), else
    the fastest precision of its device."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    if first is not None and str(first.dtype) == "torch.float64":
        return FULL_PRECISION
    from globeflow.core.precision import fastest_precision

    return fastest_precision(getattr(model, "device", "cpu"))
