"""The sampler settings object, and the default path in the confident regime: a sharp,
multimodal answer (an exact RFM field) located with the Locator's defaults."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import torch

from globeflow.apps.pipeline import Locator
from globeflow.core.precision import fastest_precision, native_bf16
from globeflow.core.sampler_settings import (
    AUTHORS_SAMPLER,
    DEFAULT_SAMPLER,
    EVALUATE_BATCH_SIZE,
    MIXED,
    PRECISIONS,
    SamplerSettings,
    precision_on,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _testbeds import exact_field_testbeds, posterior_metrics  # noqa: E402


def test_overrides_replace_only_what_is_given():
    s = DEFAULT_SAMPLER.with_overrides(steps=32, num_samples=None, solver="euler")
    assert (s.steps, s.solver, s.num_samples) == (32, "euler", DEFAULT_SAMPLER.num_samples)
    assert DEFAULT_SAMPLER.steps != 32 or DEFAULT_SAMPLER.solver != "euler"  # frozen original
    with pytest.raises(AttributeError):
        DEFAULT_SAMPLER.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("bad", "says"),
    [({"grid": "cubic"}, "time grid"), ({"precision": "fp16"}, "precision"),
     ({"steps": 0}, ">= 1"), ({"num_samples": 0}, ">= 1"),
     ({"localizability_precision": "fp16"}, "precision")],
)  # fmt: skip
def test_bad_settings_are_named(bad, says):
    with pytest.raises(ValueError, match=says):
        SamplerSettings(**bad)


def test_auto_precision_follows_the_device():
    assert DEFAULT_SAMPLER.with_overrides(precision="fp32").resolved_precision("cpu") == "fp32"
    auto = SamplerSettings(precision="auto")
    assert auto.resolved_precision("cpu") == fastest_precision("cpu")
    assert fastest_precision("cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert fastest_precision("cuda") == "bf16"


def test_mixed_precision_runs_fp32_where_bf16_is_not_native():
    """ "mixed" is bf16 early on the path only where bf16 is native (else emulated, slower than
    fp32); a float64 model runs fp32 throughout; fp32 and bf16 asked for are run as asked."""
    from globeflow.core.sampler_settings import resolve

    assert precision_on("mixed", "bf16") == "mixed"
    assert precision_on("mixed", "fp32") == "fp32"
    assert [precision_on("auto", f) for f in ("bf16", "fp32")] == ["bf16", "fp32"]
    assert [precision_on(p, "fp32") for p in PRECISIONS] == list(PRECISIONS)
    assert resolve(_tiny_rfm().double()).precision == "fp32"
    assert resolve(_tiny_rfm()).precision == precision_on("mixed", fastest_precision("cpu"))
    assert SamplerSettings(precision="mixed").resolved_precision("cuda") == "mixed"


def test_authors_sampler_is_their_pipeline_default():
    assert (AUTHORS_SAMPLER.solver, AUTHORS_SAMPLER.grid, AUTHORS_SAMPLER.steps) == (
        "euler", "published", 250,
    )  # fmt: skip
    assert AUTHORS_SAMPLER.precision == "fp32"
    assert AUTHORS_SAMPLER.label() == "euler/published/250/fp32/1024"


class _OneHotEncoder:
    name = "one-hot"

    def __init__(self, dim: int):
        self.dim = dim


def _sharp_locator(sampler: SamplerSettings = DEFAULT_SAMPLER):
    bed = exact_field_testbeds(photos_per_target=1)[0]  # 1-km kernels at Paris, Lyon, Marseille
    assert bed.name == "exact-1km-3city"
    bed.model.metadata = {"recommended_guidance": 0.0}
    locator = Locator(bed.model, _OneHotEncoder(bed.emb.shape[1]), sampler=sampler)
    return bed, locator


OLD_DEFAULT = SamplerSettings(solver="lagged-midpoint", grid="quadratic", steps=8, precision="bf16")
"""predict's defaults before issue 15."""


@pytest.mark.parametrize("sampler", [DEFAULT_SAMPLER, OLD_DEFAULT], ids=["default", "old"])
def test_default_path_is_right_on_a_sharp_multimodal_answer(sampler):
    """Three 1-km cities (weights 0.5 / 0.3 / 0.2), located with Locator's defaults: the samples
    sit where the true posterior's do (truth: median 0.92 km from a city, 100% within 25 km).
    The old default (8 lagged-midpoint steps on the quadratic grid) put 17% within 25 km,
    60 km median: it must fail, the new one pass."""
    bed, locator = _sharp_locator(sampler)
    results = locator.locate_embeddings(
        bed.emb, num_samples=512, first_samples=0, localizability_samples=0
    )  # every photo 512 samples, as many as the truth's
    samples = torch.tensor([r["samples"] for r in results], dtype=torch.float64)
    truth = bed.truth(512, torch.Generator().manual_seed(0))
    m = posterior_metrics(samples, truth, bed.places, bed.true_location)
    t = posterior_metrics(truth, bed.truth(512, torch.Generator().manual_seed(1)), bed.places,
                          bed.true_location)  # fmt: skip
    # Tolerance: 10% + 0.1 km of the truth's own median miss (sample rounding to 1e-4 degrees
    # is 0.01 km); all but 2% of samples within 25 km.
    ok = abs(m["miss_median_km"] - t["miss_median_km"]) <= 0.1 * t["miss_median_km"] + 0.1
    ok = ok and m["within_25_km"] >= 0.98
    assert ok == (sampler is DEFAULT_SAMPLER), (m, t)


def test_locator_keywords_override_the_recipe():
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=4))
    locator = Locator(model, _OneHotEncoder(4))
    emb = torch.randn(2, 4)
    s = locator.locate_embeddings(
        emb, 32, steps=4, solver="lagged-midpoint", precision="fp32", localizability_samples=0
    )[0]["settings"]
    assert (s["solver"], s["grid"], s["steps"], s["precision"]) == (
        "lagged-midpoint",
        DEFAULT_SAMPLER.grid,
        4,
        "fp32",
    )  # fmt: skip  (a solver named alone keeps the recipe's grid)
    recipe = SamplerSettings(solver="euler", grid="published", steps=3, num_samples=16)
    s = locator.locate_embeddings(emb, sampler=recipe, localizability_samples=0)[0]["settings"]
    assert (s["solver"], s["grid"], s["steps"], s["num_samples"]) == ("euler", "published", 3, 16)
    # The same recipe through model.sample gives the same samples (what the table measures).
    res = locator.locate_embeddings(emb, sampler=recipe, guidance=0.0, localizability_samples=0)
    from globeflow.core.random_streams import embedding_ids, photo_generators, stream_noise

    streams = photo_generators(0, embedding_ids(emb), model.device)  # the locator's, per photo
    noise, padded = stream_noise(model, streams, 16, model.prepare_embeddings(emb), recipe.noise)
    again = model.sample(
        emb, padded, 3, 0.0, noise=noise, solver="euler", grid="published"
    )[:, :16]  # fmt: skip
    assert torch.allclose(torch.tensor(res[1]["samples"]), again[1].float(), atol=1e-4)


# ---- one recipe: no second set of sampling defaults -------------------------------------------

SRC = Path(__file__).parents[1] / "src" / "globeflow"
RECIPE_MODULE = SRC / "core" / "sampler_settings.py"
SAMPLING_NAMES = {
    "steps", "num_steps", "num_samples", "guidance", "cfg", "solver", "precision", "grid",
    "hpd_samples", "likelihood_steps",
}  # fmt: skip
ENCODER = "the encoder's precision, not the sampler's"
TRAINING = "the training's precision, not the sampler's"
ALLOWED = {
    ("core/guidance.py", "__init__", "guidance"): "GuidedField: 0 is the unguided field",
    ("jobs/embed.py", "embed_images", "precision"): ENCODER,
    ("apps/cli/embed.py", "embed", "precision"): ENCODER,
    ("jobs/train_step.py", "train_step", "precision"): TRAINING,
    ("jobs/validation.py", "validate", "precision"): TRAINING,
    ("apps/cli/train.py", "train", "precision"): TRAINING,
}
"""Literal defaults of those names that are not sampling defaults, each with why."""


def _literal(node: ast.expr | None) -> bool:
    """A literal value other than None / True / False (those mean "not given" or a switch)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return (
        isinstance(node, ast.Constant) and node.value is not None and type(node.value) is not bool
    )


def _option_default(node: ast.expr | None) -> ast.expr | None:
    """The default of ``typer.Option(default, ...)`` / ``Query(...)`` / ``add_argument(...,
    default=...)``: their first positional argument or ``default=``."""
    if not isinstance(node, ast.Call):
        return node
    for kw in node.keywords:
        if kw.arg == "default":
            return kw.value
    return node.args[0] if node.args else None


def typed_sampling_defaults(root: Path) -> list[str]:
    """Where a function under ``root`` gives a parameter of :data:`SAMPLING_NAMES` (or a
    ``localizability_*`` one) a literal default, directly or through an option's default, or a
    call passes such a keyword a literal default: "path:line name=value" for each."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if path.resolve() == RECIPE_MODULE.resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
                pairs += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
                for arg, default in pairs:
                    name = arg.arg
                    sampling = name in SAMPLING_NAMES or name.startswith("localizability_")
                    if not sampling or (rel, node.name, name) in ALLOWED:
                        continue
                    value = _option_default(default)
                    if _literal(value):
                        found.append(
                            f"{rel}:{node.lineno} {node.name}({name}={ast.unparse(value)})"
                        )
            elif isinstance(node, ast.Call) and any(
                isinstance(a, ast.Constant) and str(a.value).startswith("--") for a in node.args
            ):  # argparse: add_argument("--steps", default=24)
                option = next(str(a.value) for a in node.args if isinstance(a, ast.Constant))
                name = option.lstrip("-").replace("-", "_")
                value = _option_default(ast.Call(func=node.func, args=[], keywords=node.keywords))
                if name in SAMPLING_NAMES and _literal(value):
                    found.append(f"{rel}:{node.lineno} {option} default={ast.unparse(value)}")
    return found


def test_no_sampling_default_is_typed_outside_the_recipe():
    """Every sampling default of the package lives in core/sampler_settings.py: a parameter
    named like a recipe field with a literal default anywhere else is a second recipe."""
    assert typed_sampling_defaults(SRC) == []


def test_the_scan_finds_a_second_recipe(tmp_path):
    """The scan itself: typed defaults of each kind are found, named constants are not."""
    (tmp_path / "m.py").write_text(
        "import typer\nSTEPS = 3\n"
        "def a(emb, num_samples=64, steps=STEPS, *, guidance=-2.0, grid=None): ...\n"
        "def b(hpd_samples: int = typer.Option(128, help='x')): ...\n"
        "def c(p):\n    p.add_argument('--steps', type=int, default=24)\n"
    )
    assert [f.split(" ", 1)[1] for f in typed_sampling_defaults(tmp_path)] == [
        "a(num_samples=64)", "a(guidance=-2.0)", "b(hpd_samples=128)", "--steps default=24",
    ]  # fmt: skip


def _tiny_rfm(metadata: dict | None = None):
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=4)).eval()
    model.metadata = metadata or {}
    return model


def test_the_localizability_runs_at_its_own_precision():
    """The localizability pass runs at ``localizability_precision`` (default "mixed": bf16 in the
    bulk where native, fp32 at the data end; fp32 for a float64 model); the answer's samples
    keep ``precision``, also where one pass draws both (guidance 0)."""
    from globeflow.answers.draw import draw_answers
    from globeflow.core.random_streams import photo_generators
    from globeflow.core.sampler_settings import resolve

    model = _tiny_rfm()
    assert resolve(model).localizability_precision == precision_on(MIXED, fastest_precision("cpu"))
    assert resolve(_tiny_rfm().double()).localizability_precision == "fp32"
    answers = precision_on(DEFAULT_SAMPLER.precision, fastest_precision("cpu"))
    assert resolve(model, localizability_precision="fp32").precision == answers
    emb = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    for guidance in (0.0, 1.0):  # one pass, and samples then their own localizability pass
        runs = {}
        for p in ("fp32", "bf16"):
            recipe = DEFAULT_SAMPLER.with_overrides(
                guidance=guidance, num_samples=64, first_samples=0, localizability_samples=32
            )
            recipe = resolve(model, recipe, localizability_precision=p)
            runs[p] = draw_answers(model, emb, photo_generators(0, ["a", "b"]), recipe)
        for a, b in zip(runs["fp32"][0], runs["bf16"][0], strict=True):
            assert torch.equal(a, b)
        if guidance:  # bf16 matrix products round differently: the pass did run in bf16
            assert not torch.equal(runs["fp32"][1], runs["bf16"][1])


def test_models_and_evaluate_default_to_the_recipe():
    """``model.sample(emb)`` is DEFAULT_SAMPLER at the model's recommended guidance (or the
    fallback DEFAULT_GUIDANCE), bitwise; its localizability is the recipe's; evaluate draws its
    best guesses with the same recipe and records it."""
    from globeflow.core.families import Diffusion, FlowMatching
    from globeflow.core.network import Denoiser
    from globeflow.core.sampler_settings import DEFAULT_GUIDANCE, resolve
    from globeflow.jobs.evaluation import evaluate

    emb = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    for model, w in (
        (_tiny_rfm(), DEFAULT_GUIDANCE),
        (_tiny_rfm({"recommended_guidance": 0.5}), 0.5),
    ):
        d = DEFAULT_SAMPLER
        spelled = model.sample(
            emb, d.num_samples, d.steps, w, noise=None, generator=seeded(), solver=d.solver,
            precision=d.precision, grid=d.grid,
        )  # fmt: skip
        assert torch.equal(model.sample(emb, generator=seeded()), spelled)
        assert torch.equal(model.sample(emb, generator=seeded(), settings=d), spelled)
        assert resolve(model).guidance == w
    model = _tiny_rfm()
    spelled = model.localizability(
        emb, d.localizability_samples, d.localizability_steps, seeded(),
        solver=d.localizability_solver, precision=d.localizability_precision,
    )  # fmt: skip
    assert torch.equal(model.localizability(emb, generator=seeded()), spelled)
    # The flow family has the recipe's solver and runs it on the recipe's grid; diffusion
    # lacks it and runs its own step (DDIM) at the authors' count (the recipe's 48 DDIM steps
    # are beyond noise of DDIM 250: docs/defaults.md); a count asked for is kept.
    torch.manual_seed(0)
    flow = FlowMatching(Denoiser(dim=16, depth=1, cond_dim=4)).eval()
    assert d.solver in flow.solvers
    spelled = flow.sample(emb, d.num_samples, d.steps, DEFAULT_GUIDANCE, noise=None,
                          generator=seeded(), solver=d.solver, grid=d.grid)  # fmt: skip
    assert torch.equal(flow.sample(emb, generator=seeded()), spelled)
    diffusion = Diffusion(Denoiser(dim=16, depth=1, cond_dim=4)).eval()
    assert d.solver not in diffusion.solvers
    own = diffusion.sample(emb, d.num_samples, AUTHORS_SAMPLER.steps, DEFAULT_GUIDANCE,
                           generator=seeded(), solver="ddim")  # fmt: skip
    assert torch.equal(diffusion.sample(emb, generator=seeded()), own)
    asked = diffusion.sample(emb, 8, 12, generator=seeded(), solver="ddim")
    assert torch.equal(diffusion.sample(emb, 8, 12, generator=seeded()), asked)
    assert resolve(diffusion).steps == AUTHORS_SAMPLER.steps
    assert resolve(diffusion, steps=12).steps == 12

    class Store:
        embeddings = emb
        latlon = torch.tensor([[48.85, 2.35], [40.71, -74.0]])

    report = evaluate(model, Store(), progress=False, hpd_samples=0, localizability_samples=16,
                      num_samples=64)  # fmt: skip
    s = report.settings
    assert (s["solver"], s["grid"], s["steps"], s["precision"], s["guidance"]) == (
        d.solver, d.grid, d.steps, resolve(model).precision, DEFAULT_GUIDANCE,
    )  # fmt: skip
    assert s["batch_size"] == EVALUATE_BATCH_SIZE
    assert evaluate(model, Store(), progress=False, num_samples=64).settings["hpd_samples"] == (
        d.localizability_samples
    )


def test_a_named_solver_runs_on_the_grid_it_was_chosen_on():
    """``--solver X`` alone is X on the recipe's grid: the default solver named is the default
    (the same samples and settings), another solver named changes the solver only."""
    model = _tiny_rfm({"recommended_guidance": 0.0})
    locator = Locator(model, _OneHotEncoder(4))
    emb = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    common = {"num_samples": 32, "localizability_samples": 16}
    default = locator.locate_embeddings(emb, **common)
    named = locator.locate_embeddings(emb, solver=DEFAULT_SAMPLER.solver, **common)
    assert [r["samples"] for r in named] == [r["samples"] for r in default]
    assert named[0]["settings"] == default[0]["settings"]
    other = locator.locate_embeddings(emb, solver="heun", **common)[0]["settings"]
    assert (other["solver"], other["grid"]) == ("heun", DEFAULT_SAMPLER.grid)
    g = torch.Generator().manual_seed(1)
    on_recipe_grid = model.sample(emb, 8, 4, solver="heun", generator=g)
    g = torch.Generator().manual_seed(1)
    spelled = model.sample(emb, 8, 4, solver="heun", grid=DEFAULT_SAMPLER.grid, generator=g)
    assert torch.equal(on_recipe_grid, spelled)


def test_answers_show_the_recommended_recipe_they_ran():
    """A model recommending its own recipe (metadata ``recommended_sampler``): the Locator's
    answers run it and their settings block says so; the same samples as that recipe given
    whole; a count given still wins."""
    recommended = {"grid": "quadratic", "steps": 6, "localizability_steps": 10}
    model = _tiny_rfm({"recommended_sampler": {**recommended, "measured": "a test"}})
    locator = Locator(model, _OneHotEncoder(4))
    emb = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    common = {"num_samples": 32, "localizability_samples": 16}
    answers = locator.locate_embeddings(emb, **common)
    assert {k: answers[0]["settings"][k] for k in recommended} == recommended
    whole = DEFAULT_SAMPLER.with_overrides(**recommended)
    spelled = Locator(model, _OneHotEncoder(4), sampler=whole).locate_embeddings(emb, **common)
    assert [r["samples"] for r in answers] == [r["samples"] for r in spelled]
    assert [r["localizability_bits"] for r in answers] == [
        r["localizability_bits"] for r in spelled
    ]
    asked = locator.locate_embeddings(emb, steps=DEFAULT_SAMPLER.steps, **common)[0]["settings"]
    assert (asked["steps"], asked["grid"]) == (DEFAULT_SAMPLER.steps, "quadratic")


def test_the_command_lines_help_states_the_recipe(monkeypatch):
    """predict's and evaluate's help print the recipe's values (built from DEFAULT_SAMPLER, not
    typed in): with another recipe in place, the help says so."""
    import importlib

    from typer.testing import CliRunner

    import globeflow.apps.cli as cli
    import globeflow.core.sampler_settings as recipe_module
    from globeflow.apps.cli import evaluate, predict

    # the help is built when the command modules are imported, then registered by the root
    modules = [predict, evaluate, cli]

    other = SamplerSettings(steps=7, num_samples=333, localizability_samples=55)
    monkeypatch.setattr(recipe_module, "DEFAULT_SAMPLER", other)
    monkeypatch.setattr(recipe_module, "DEFAULT_GUIDANCE", 4.5)
    try:
        fresh = [importlib.reload(module) for module in modules][-1]
        env = {"COLUMNS": "400"}
        predict = CliRunner().invoke(fresh.app, ["predict", "--help"], env=env).output
        evaluate = CliRunner().invoke(fresh.app, ["evaluate", "--help"], env=env).output
    finally:
        monkeypatch.undo()
        for module in modules:
            importlib.reload(module)
    for text in ("default: 333", f"default: 7 {other.solver}", "default 55", "else 4.5"):
        assert text in predict, text
    for text in ("predict's, 333", "default 55", "else 4.5"):
        assert text in evaluate, text


def test_the_recipe_module_imports_no_torch():
    """The command line builds its help from the recipe: importing it stays torch-free."""
    import subprocess

    code = (
        "import sys; import globeflow.core.sampler_settings, globeflow.apps.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_log_density_settings_object_and_shorthands_agree():
    """``sample_with_log_density(settings=, density=)`` is what its keyword shorthands spell,
    and the stiff end's older spellings (None: probed, inf: none) mean the explicit ones."""
    import math

    from globeflow.core.log_density_settings import LogDensitySettings, StiffEnd, as_stiff_end

    assert as_stiff_end(None) is StiffEnd.PROBED and as_stiff_end(math.inf) is StiffEnd.NONE
    assert as_stiff_end(1e-3) == 1e-3
    with pytest.raises(ValueError, match="> 0"):
        as_stiff_end(0.0)
    model = _tiny_rfm()
    emb = torch.randn(2, 4)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    for stiff, explicit in ((math.inf, StiffEnd.NONE), (None, StiffEnd.PROBED), (2e-3, 2e-3)):
        spelled = model.sample_with_log_density(
            emb, 8, 4, seeded(), solver="lagged-midpoint", stiff=stiff
        )
        recipe = DEFAULT_SAMPLER.with_overrides(localizability_solver="lagged-midpoint")
        density = LogDensitySettings(stiff=explicit)
        got = model.sample_with_log_density(emb, 8, 4, seeded(), settings=recipe, density=density)
        assert all(torch.equal(a, b) for a, b in zip(spelled, got, strict=True))
    with pytest.raises(TypeError):
        model.sample_with_log_density(emb, 8, 4, seeded(), stiffness=1e-3)
    with pytest.raises(ValueError, match="density method"):
        LogDensitySettings(method="rk4")
