"""How a photo's answer samples and its localizability are drawn: the one recipe of ``predict``,
``serve`` and ``evaluate``, so that the localizability an evaluation reports is exactly the one a
user gets for the same photo, recipe and seed.

Each photo draws from its own random stream (:mod:`globeflow.core.random_streams`): first the
answer's initial states, then (unless one pass gives both) the localizability's. Without guidance
on S^2, with a solver that carries log-densities on its own grid, the answer's samples follow the
model's density and one pass (:func:`globeflow.core.likelihood.sample_with_log_density`) gives
samples and log-densities; otherwise the localizability takes its own unguided one-pass samples
with the recipe's localizability solver and (bulk) steps. An adaptive recipe then draws more
answer samples, from the same stream, for the photos whose answer needs them
(:mod:`globeflow.answers.monte_carlo`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from globeflow.answers.decode import best_guess, top_regions
from globeflow.answers.monte_carlo import answer_errors, samples_needed
from globeflow.core.families import GeoModel
from globeflow.core.localizability import (
    bits_and_stderr,
    two_level_localizability,
    two_level_sizes,
    uses_two_levels,
)
from globeflow.core.random_streams import (
    SOBOL_REPLICATES,
    STREAM_BLOCK,
    replicate_ids,
    stream_design,
    stream_noise,
)
from globeflow.core.sampler_settings import (
    IID,
    PLAIN,
    SOBOL,
    TWO_LEVEL,
    SamplerSettings,
    solver_for,
)
from globeflow.core.solvers import SOLVERS, SPHERE
from globeflow.core.sphere import unit_to_latlon

__all__ = [
    "draw_answers",
    "localizability_estimator",
    "localizability_precision",
    "more_samples",
]

Draw = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[torch.Tensor | None]]
"""Samples [(N_i, 2) degrees on CPU per photo], localizability bits (B,), its standard error
(B,), and the Sobol net of each sample [(N_i,) long per photo, or None where the photo's
initial states were drawn iid] (:func:`globeflow.core.random_streams.replicate_ids`)."""


def draw_answers(
    model, emb: torch.Tensor, generators: Sequence[torch.Generator], recipe: SamplerSettings
) -> Draw:
    """A :data:`Draw` (the localizability's bits and standard error NaN where
    ``recipe.localizability_samples`` is 0), each photo's drawn from its own generator, with a
    resolved ``recipe`` (:func:`~globeflow.core.sampler_settings.resolve`). The answer's
    initial states follow ``recipe.noise`` (:func:`~globeflow.core.random_streams.stream_noise`);
    the localizability's are iid (its standard error assumes them).

    An adaptive recipe (``recipe.adaptive``) first draws ``first_samples`` per photo, then more,
    up to ``num_samples``, for the photos whose answer is not yet within the recipe's Monte
    Carlo tolerances (:func:`more_samples`), and again until each is within them or at
    ``num_samples`` (every round adds at least ``first_samples``); a photo's count depends on
    its own samples only.
    """
    if isinstance(model, GeoModel):  # else a duck-typed stand-in that takes embeddings as given
        emb = model.prepare_embeddings(emb)
    if not recipe.adaptive:
        return _draw_batch(model, emb, generators, recipe)
    first = dataclasses.replace(recipe, num_samples=recipe.first_samples)
    samples, bits, stderr, nets = _draw_batch(model, emb, generators, first)
    extra = dataclasses.replace(recipe, localizability_samples=0)
    one_pass = _one_pass(model, recipe)
    draws = [1] * len(samples)  # each photo's draws so far (its next nets' ids follow them)
    while any(wanted := [more_samples(s, recipe, n) for s, n in zip(samples, nets, strict=True)]):
        for count in sorted(set(wanted) - {0}):  # one batched solve per extra count
            rows = [i for i, w in enumerate(wanted) if w == count]
            drawn, _, _, more_nets = _draw_batch(
                model, emb[rows], [generators[i] for i in rows],
                dataclasses.replace(extra, num_samples=count), one_pass=one_pass,
            )  # fmt: skip
            for i, more, ids in zip(rows, drawn, more_nets, strict=True):
                samples[i] = torch.cat([samples[i], more])
                if nets[i] is not None and ids is not None:
                    nets[i] = torch.cat([nets[i], ids + draws[i] * SOBOL_REPLICATES])
                draws[i] += 1
    return samples, bits, stderr, nets


def more_samples(
    samples: torch.Tensor, recipe: SamplerSettings, nets: torch.Tensor | None = None
) -> int:
    """How many more samples an answer drawn from ``samples`` (N, 2) degrees needs for its best
    guess's expected GeoScore and its region probabilities to be within ``recipe``'s
    tolerances (0: none; at most ``recipe.num_samples`` in all). ``nets`` (N,) long: the Sobol
    net of each sample (None: iid draws), see :func:`~globeflow.answers.monte_carlo.
    answer_errors`."""
    guess = best_guess(samples)
    tolerances = (recipe.guess_score_tolerance, recipe.region_probability_tolerance)
    sizes = {"block": recipe.first_samples, "cap": recipe.num_samples}
    # The guess's error alone may already ask for every sample: then the regions (the costly
    # part of the check) cannot change the count.
    errors = answer_errors(samples, guess, [], replicates=nets)
    needed = samples_needed(errors, *tolerances, **sizes)
    if needed < recipe.num_samples:
        regions = top_regions(samples)
        errors = answer_errors(
            samples, guess, [r.probability for r in regions], replicates=nets,
            region_members=[r.members for r in regions],
        )  # fmt: skip
        needed = samples_needed(errors, *tolerances, **sizes)
    return needed - samples.shape[0]


def _draw_batch(
    model,
    emb: torch.Tensor,
    generators: Sequence[torch.Generator],
    recipe: SamplerSettings,
    one_pass: bool | None = None,
) -> Draw:
    """:func:`draw_answers` of ``recipe.num_samples`` per photo from prepared embeddings;
    ``one_pass`` (default: whether ``recipe`` takes the one pass, :func:`_one_pass`) draws the
    answer's samples by the one-pass solve even where no localizability is asked."""
    if one_pass is None:
        one_pass = _one_pass(model, recipe)
    if not model.draws_initial_noise:  # baselines draw inside sample(): per photo
        parts = [
            _draw_from(model, emb[i : i + 1], recipe, g, lambda count, _: (None, count), one_pass)
            for i, g in enumerate(generators)
        ]
        samples, bits, stderr = (torch.cat(part) for part in zip(*parts, strict=True))
        return list(samples.unbind(0)), bits, stderr, [None] * len(generators)

    # One pass shares its samples with the localizability, whose error assumes iid draws.
    answer_design = IID if one_pass else stream_design(model, recipe.noise)

    def noise(count: int, answer: bool) -> tuple[torch.Tensor, int]:  # each stream's next draws
        return stream_noise(model, generators, count, emb, answer_design if answer else IID)

    samples, bits, stderr = _draw_from(model, emb, recipe, None, noise, one_pass)
    n = samples.shape[1]
    sobol = answer_design == SOBOL
    nets = replicate_ids(n, -(-n // STREAM_BLOCK) * STREAM_BLOCK, 0) if sobol else None
    return list(samples.unbind(0)), bits, stderr, [nets] * len(generators)


def localizability_precision(model, recipe: SamplerSettings) -> str:
    """The precision the localizability of a resolved ``recipe`` runs at: the answer's own
    (``precision``) where one pass draws the answer's samples and their densities
    (:func:`_one_pass`), else ``localizability_precision``."""
    return recipe.precision if _one_pass(model, recipe) else recipe.localizability_precision


def localizability_estimator(model, recipe: SamplerSettings) -> str:
    """The estimator the localizability of a resolved ``recipe`` takes for ``model``:
    "two-level" where :func:`~globeflow.core.localizability.uses_two_levels` and no one pass
    gives it, else "plain" (:data:`~globeflow.core.sampler_settings.LOCALIZABILITY_ESTIMATORS`).
    """
    two = uses_two_levels(model, recipe) and not _one_pass(model, recipe)
    return TWO_LEVEL if two else PLAIN


def _one_pass(model, recipe: SamplerSettings) -> bool:
    """Whether the answer's samples and the localizability come from one solve: without
    guidance on S^2, for a Lie-group solver that carries log-densities, on its own grid
    (uniform in gamma, then in log(1 - gamma) at a stiff end). Taken only where the asked-for
    recipe runs such a solver on its own grid, so the answer's samples come from the same kind
    of solve as asked, only finer at the end."""
    solver = recipe.solver
    return (
        recipe.guidance == 0.0
        and recipe.localizability_samples > 0
        and getattr(model, "geometry", None) is SPHERE
        and solver in SOLVERS and SOLVERS[solver].carries_log_density
        and solver != getattr(model, "published_solver", None)
        and recipe.grid in (None, "quadratic")
    )  # fmt: skip


def _draw_from(
    model,
    emb: torch.Tensor,
    recipe: SamplerSettings,
    generator: torch.Generator | None,
    noise: Callable[[int, bool], tuple[torch.Tensor | None, int]],
    one_pass: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples (B, N, 2), bits and standard errors (B,) from ``generator`` or, where
    ``noise(count, answer)`` gives initial states (and their padded count), from those: the
    answer's first (``answer`` True: the design the caller chose for it), then the
    localizability's (``answer`` False: iid)."""
    n, n_loc, solver = recipe.num_samples, recipe.localizability_samples, recipe.solver
    nan = torch.full((emb.shape[0],), float("nan"))
    # The recipe goes to models with solvers; the others (baselines, stand-ins) take no options.
    how = {"settings": recipe} if solver_for(model, solver) is not None else {}
    if one_pass:
        steps = max(recipe.steps, recipe.localizability_steps)
        x0, padded = noise(n, True)
        # The answer's own samples: at the answer's precision, not the localizability's.
        x, log_p = model.sample_with_log_density(
            emb, padded, steps, generator, method="path", solver=solver, noise=x0,
            settings=recipe, precision=recipe.precision,
        )  # fmt: skip
        if n_loc <= 0:
            return unit_to_latlon(x[:, :n]).cpu(), nan, nan
        return (unit_to_latlon(x[:, :n]).cpu(), *bits_and_stderr(log_p[:, :n]))
    x0, padded = noise(n, True)
    if x0 is None:  # models that draw inside sample() (baselines, duck-typed stand-ins)
        samples = model.sample(emb, padded, recipe.steps, recipe.guidance, generator=generator,
                               **how)  # fmt: skip
    else:
        samples = model.sample(emb, padded, noise=x0, generator=generator, **how)
    samples = samples[:, :n].cpu()
    if n_loc <= 0:
        return samples, nan, nan
    if not isinstance(model, GeoModel):  # duck-typed stand-ins: their own estimate
        bits = model.localizability(emb, num_samples=n_loc, generator=generator)
        return samples, torch.as_tensor(bits).double().reshape(-1).cpu(), nan
    return (
        samples,
        *_localizability(model, emb, recipe, generator, lambda k: noise(k, False), how),
    )


def _localizability(
    model: GeoModel,
    emb: torch.Tensor,
    recipe: SamplerSettings,
    generator: torch.Generator | None,
    noise: Callable[[int], tuple[torch.Tensor | None, int]],
    how: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The localizability's bits and standard error (B,) of a resolved ``recipe``, in two
    levels where :func:`~globeflow.core.localizability.uses_two_levels`, else plain, from the
    initial states (and their padded count) ``noise(count)`` gives; ``how``: the sampling
    options :func:`_draw_from` passes the model."""
    n = recipe.localizability_samples
    if uses_two_levels(model, recipe):
        x0, _ = noise(two_level_sizes(n)[1])
        return two_level_localizability(model, emb, x0, recipe)[:2]
    x0, padded = noise(n)
    _, log_p = model.sample_with_log_density(emb, padded, generator=generator, noise=x0, **how)
    return bits_and_stderr(log_p[:, :n])
