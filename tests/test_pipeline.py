"""The Locator: settings, defaults and the localizability estimate it reports."""

from __future__ import annotations

import math
import threading

import torch

from globeflow.apps import pipeline
from globeflow.apps.pipeline import Locator
from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Denoiser
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, PRECISIONS


class _Encoder:
    name, dim = "toy", 6


def _locator() -> Locator:
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=6))
    return Locator(model, _Encoder(), model_name="toy")


def test_defaults_are_used_and_recorded():
    loc = _locator()
    res = loc.locate_embeddings(torch.randn(2, 6), localizability_samples=32)
    s = res[0]["settings"]
    assert s["num_samples"] == DEFAULT_SAMPLER.num_samples
    assert s["first_samples"] == DEFAULT_SAMPLER.first_samples
    for r in res:  # adaptive: the first draw, and more (up to num_samples) only where needed
        drawn = len(r["samples"])
        assert r["monte_carlo"]["samples"] == drawn
        assert DEFAULT_SAMPLER.first_samples <= drawn <= DEFAULT_SAMPLER.num_samples
        mc = r["monte_carlo"]
        within = (
            mc["guess_score_stderr"] <= mc["guess_score_tolerance"]
            and max(mc["region_probability_stderr"], default=0.0)
            <= mc["region_probability_tolerance"]
        )
        assert within or drawn == DEFAULT_SAMPLER.num_samples
    assert (s["solver"], s["grid"], s["steps"], s["precision"]) == (
        DEFAULT_SAMPLER.solver,
        DEFAULT_SAMPLER.grid,
        DEFAULT_SAMPLER.steps,
        DEFAULT_SAMPLER.resolved_precision("cpu"),
    )
    assert s["guidance"] == loc.default_guidance
    # 32 localizability samples: two levels (8 fine, 40 coarse) with the default estimator
    assert s["localizability_estimator"] == DEFAULT_SAMPLER.localizability_estimator == "two-level"
    # a sphere model's answers start from Sobol nets, and read their errors off the nets
    assert s["noise"] == DEFAULT_SAMPLER.noise == "sobol"
    assert all(r["monte_carlo"]["noise"] == "sobol" for r in res)


def test_localizability_and_its_standard_error():
    loc = _locator()
    emb = torch.randn(3, 6)
    for guidance in (0.0, 1.0):  # one shared pass without guidance, a separate one with
        res = loc.locate_embeddings(emb, 64, guidance=guidance, localizability_samples=64)
        for r in res:
            bits, se = r["localizability_bits"], r["localizability_stderr_bits"]
            assert math.isfinite(bits) and 0 < se < 1
            assert r["effective_area_km2"] > 0
    # Same seed, same answers; no localizability asked: none reported.
    a = loc.locate_embeddings(emb, 32, seed=5, localizability_samples=0)
    b = loc.locate_embeddings(emb, 32, seed=5, localizability_samples=0)
    assert [r["best_guess"] for r in a] == [r["best_guess"] for r in b]
    assert a[0]["localizability_bits"] is None and a[0]["localizability_stderr_bits"] is None


def test_unguided_answers_carry_their_own_density():
    """Without guidance, with a solver that carries log-densities, the reported localizability
    is the mean log-density of the very samples returned (one pass), which the exact likelihood
    confirms. (data-2m, the default, does not carry them: localizability takes its own pass.)"""
    loc = _locator()
    emb = torch.randn(1, 6)
    res = loc.locate_embeddings(
        emb,
        256,
        guidance=0.0,
        precision="fp32",
        localizability_samples=256,
        solver="lagged-midpoint",
    )[0]
    samples = torch.tensor(res["samples"], dtype=torch.float32)[None]
    exact = loc.model.log_prob(samples, emb, steps=64).mean() / math.log(2)
    assert abs(res["localizability_bits"] - float(exact)) < 0.05


def test_photo_chunks_cover_every_photo_within_the_row_budget():
    budget = pipeline.ROWS_PER_SOLVE
    for photos, samples in [(1, 4 * budget), (5, budget // 2), (7, budget // 3), (3, 1)]:
        chunks = pipeline.photo_chunks(photos, samples)
        covered = [i for c in chunks for i in range(photos)[c]]
        assert covered == list(range(photos))
        sizes = [len(range(photos)[c]) for c in chunks]
        assert all(s * samples <= budget or s == 1 for s in sizes)


def _photos_per_sample_call(monkeypatch, loc) -> list[int]:
    """The number of photos of each call of the locator's model's ``sample``, as they come."""
    calls: list[int] = []
    sample = loc.model.sample
    monkeypatch.setattr(
        loc.model, "sample", lambda emb, *a, **k: (calls.append(len(emb)), sample(emb, *a, **k))[1]
    )
    return calls


def test_photos_are_solved_in_chunks_and_all_answered(monkeypatch):
    loc = _locator()
    calls = _photos_per_sample_call(monkeypatch, loc)
    monkeypatch.setattr(pipeline, "ROWS_PER_SOLVE", 64)
    res = loc.locate_embeddings(torch.randn(5, 6), 32, steps=2, localizability_samples=8)
    assert calls == [2, 2, 1]  # 64 samples per solve: two photos of 32
    assert len(res) == 5 and all(len(r["samples"]) == 32 for r in res)
    assert all(math.isfinite(r["localizability_bits"]) for r in res)


def test_an_adaptive_recipe_groups_photos_by_its_first_draw(monkeypatch):
    """64 rows per solve and a first draw of 16 samples: four photos per solve (one, were
    the photos grouped by all 64 samples), the later draws within those groups."""
    loc = _locator()
    calls = _photos_per_sample_call(monkeypatch, loc)
    monkeypatch.setattr(pipeline, "ROWS_PER_SOLVE", 64)
    res = loc.locate_embeddings(
        torch.randn(5, 6), 64, steps=2, localizability_samples=8, first_samples=16
    )
    assert max(calls) == 4 and len(res) == 5


def test_locate_paths_shows_no_progress_bar_unless_asked(tmp_path, monkeypatch, capsys):
    """A library stays quiet on stderr; the command line passes progress=True."""
    loc = _locator()
    monkeypatch.setattr(loc, "locate_images", lambda images, **kwargs: [])
    missing = [tmp_path / "missing.jpg"]
    assert loc.locate_paths(missing)[0]["ok"] is False
    assert capsys.readouterr().err == ""
    loc.locate_paths(missing, progress=True)
    assert "locating" in capsys.readouterr().err


def test_narrow_networks_answer_photos_side_by_side_with_the_same_answers(monkeypatch):
    """Under the automatic thread policy a narrow network answers chunks of photos on parallel
    workers (one thread each); every answer is the one-worker answer up to float rounding: a
    sample's coordinates (rounded to 1e-4 degree in the answer) at most one rounding step
    apart, the best guess the same point, the localizability the same to float32 rounding in
    fp32 and far inside its Monte Carlo standard error in bf16 (whose matrix products round by
    their row counts, which depend on the chunk)."""
    from globeflow.apps import threads
    from globeflow.core import parallel

    loc = _locator()
    emb = torch.randn(5, 6)
    fp32, bf16 = (DEFAULT_SAMPLER.with_overrides(localizability_precision=p) for p in PRECISIONS)
    kwargs = dict(num_samples=64, steps=4, localizability_samples=16, seed=3)
    monkeypatch.setattr(threads, "_automatic", False)
    assert threads.network_workers(128) == 1
    alone = loc.locate_embeddings(emb, sampler=fp32, **kwargs)
    alone_bf16 = loc.locate_embeddings(emb, sampler=bf16, **kwargs)
    workers = []
    monkeypatch.setattr(threads, "_automatic", True)
    real_threads = torch.get_num_threads()
    # Two threads in the caller (the policy's count on a 2-core machine); a worker's own.
    real_count = torch.get_num_threads
    monkeypatch.setattr(
        torch,
        "get_num_threads",
        lambda: 2 if threading.current_thread() is threading.main_thread() else real_count(),
    )
    run = parallel.map_on_cores
    monkeypatch.setattr(
        pipeline,
        "map_on_cores",
        lambda f, items, n: (workers.append((len(items), n)), run(f, items, n))[1],
    )
    try:
        side_by_side = loc.locate_embeddings(emb, sampler=fp32, **kwargs)
        side_by_side_bf16 = loc.locate_embeddings(emb, sampler=bf16, **kwargs)
    finally:
        torch.set_num_threads(real_threads)  # network_threads restored the patched count
    assert workers == [(2, 2), (2, 2)]  # five photos in two chunks, one per worker
    step = 1e-4 + 1e-9  # one rounding step of the answer's coordinates
    for pair, same_bits in (((alone, side_by_side), 1e-5), ((alone_bf16, side_by_side_bf16), None)):
        for a, b in zip(*pair, strict=True):
            samples = torch.tensor(a["samples"], dtype=torch.float64) - torch.tensor(
                b["samples"], dtype=torch.float64
            )
            assert float(samples.abs().max()) <= step
            guess = [a["best_guess"][k] - b["best_guess"][k] for k in ("lat", "lon")]
            assert max(map(abs, guess)) <= step
            moved = abs(a["localizability_bits"] - b["localizability_bits"])
            assert moved < (same_bits or 0.01 * a["localizability_stderr_bits"])
    assert threads.network_workers(512) == 1  # a wide network keeps its threads per operation
