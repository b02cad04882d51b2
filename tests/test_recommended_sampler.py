"""A model's own recipe (metadata ``recommended_sampler``): what ``resolve`` runs for it, which
settings win over it, and the bundled model's, all without torch (models are stand-ins with
``metadata``; the answers' settings block is checked in tests/test_sampler_settings.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from globeflow.core.sampler_settings import (
    DEFAULT_SAMPLER,
    LOCALIZABILITY_PRECISION,
    RECOMMENDED_SAMPLER_KEY,
    SAMPLE_PRECISIONS,
    SamplerSettings,
    model_recipe,
    recommended_sampler,
    resolve,
    sampler_recommendation,
)

BUNDLED_CONFIG = Path(__file__).parents[1] / "src" / "globeflow" / "default_model" / "config.json"
RECOMMENDATION = {"grid": "quadratic", "steps": 6, "localizability_steps": 10}


@dataclasses.dataclass
class StandIn:
    """A model as ``resolve`` reads it: its metadata (no solvers: the recipe's own is kept)."""

    metadata: dict


def _as_given(recipe: SamplerSettings) -> SamplerSettings:
    """A resolved recipe with its localizability precision back to the default's (``resolve``
    fills it for the device: tests/test_sampler_settings.py), after checking it was filled."""
    assert recipe.localizability_precision in SAMPLE_PRECISIONS
    return dataclasses.replace(recipe, localizability_precision=LOCALIZABILITY_PRECISION)


def _recommending(fields: dict = RECOMMENDATION) -> StandIn:
    return StandIn({RECOMMENDED_SAMPLER_KEY: {**fields, "measured": "how it was chosen"}})


def test_a_model_runs_its_recommended_recipe_where_the_caller_gives_none():
    model = _recommending()
    assert recommended_sampler(model) == RECOMMENDATION  # the note is not a field
    recipe = resolve(model)
    assert _as_given(recipe) == dataclasses.replace(DEFAULT_SAMPLER, **RECOMMENDATION, guidance=0.0)
    assert model_recipe(model) == dataclasses.replace(DEFAULT_SAMPLER, **RECOMMENDATION)
    assert resolve(model, recipe) == recipe  # resolving twice changes nothing


def test_settings_the_caller_gives_win_over_the_recommendation():
    model = _recommending()
    assert resolve(model, steps=12) == resolve(model).with_overrides(steps=12)
    # an override equal to the default is still an override
    assert resolve(model, steps=DEFAULT_SAMPLER.steps).steps == DEFAULT_SAMPLER.steps
    # a whole recipe is run as given, DEFAULT_SAMPLER itself included
    assert resolve(model, DEFAULT_SAMPLER) == resolve(StandIn({}), DEFAULT_SAMPLER)
    mine = SamplerSettings(solver="euler", steps=3)
    assert _as_given(resolve(model, mine)) == dataclasses.replace(mine, guidance=0.0)


def test_a_model_without_a_recommendation_runs_the_default_recipe():
    for model in (StandIn({}), StandIn({"recommended_guidance": 0.5}), object()):
        assert recommended_sampler(model) == {}
        assert model_recipe(model) == DEFAULT_SAMPLER
        recipe = resolve(model)
        assert dataclasses.replace(_as_given(recipe), guidance=None) == DEFAULT_SAMPLER


@pytest.mark.parametrize(
    ("value", "says"),
    [([8], "not an object"), ({"guidance": 1.0}, "guidance not among"),
     ({"stepz": 8}, "stepz not among"), ({"steps": 0}, ">= 1"),
     ({"steps": "8"}, "recommended_sampler"), ({"precision": "fp16"}, "precision")],
)  # fmt: skip
def test_a_bad_recommendation_is_named(value, says):
    with pytest.raises(ValueError, match=says):
        sampler_recommendation(value)


def test_the_bundled_model_recommends_its_measured_recipe():
    """The bundled model's metadata recommends a recipe, with the note of how it was measured
    (docs/defaults.md, "The bundled model's recommended sampler"); resolved, it is that recipe,
    and an explicit count still wins."""
    metadata = json.loads(BUNDLED_CONFIG.read_text())["metadata"]
    recommendation = metadata[RECOMMENDED_SAMPLER_KEY]
    assert "confident" in recommendation["measured"]
    fields = sampler_recommendation(recommendation)
    assert fields["steps"] < DEFAULT_SAMPLER.steps
    assert fields["localizability_steps"] < DEFAULT_SAMPLER.localizability_steps
    bundled = StandIn(metadata)
    recipe = resolve(bundled)
    assert {k: getattr(recipe, k) for k in fields} == fields
    assert recipe.guidance == metadata["recommended_guidance"]
    assert resolve(bundled, steps=DEFAULT_SAMPLER.steps).steps == DEFAULT_SAMPLER.steps
