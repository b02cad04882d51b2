"""The trained-testbed loader and report metrics (benchmarks/_testbeds.py, testbeds.py) on a
tiny stand-in of a built testbed: the truth they serve is the synthetic patterns' truth."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _testbeds import trained_testbeds  # noqa: E402
from testbeds import bed_metrics, mode_mass_tv  # noqa: E402

from globeflow.core.checkpoints import save_model  # noqa: E402
from globeflow.core.families import RiemannianFlowMatching  # noqa: E402
from globeflow.core.network import Denoiser  # noqa: E402
from globeflow.core.sphere import latlon_to_unit  # noqa: E402
from globeflow.data import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A testbed directory laid out as `testbeds.py build` writes it, with a tiny model."""
    root = tmp_path_factory.mktemp("testbeds")
    out = root / "syn-tiny"
    patterns = synthetic.make_patterns(cond_dim=16, seed=0)
    synthetic.save_patterns(patterns, out)
    synthetic.save_heldout(synthetic.make_heldout(patterns, 3, seed=2), out / "heldout.pt")
    torch.manual_seed(0)
    save_model(RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=16)), out / "model")
    return root


def test_one_testbed_per_scale_and_modality(root):
    beds = trained_testbeds("syn-tiny", root, per_pattern=2)
    assert len(beds) == 2 * len(synthetic.SCALES_KM)
    patterns = synthetic.load_patterns(root / "syn-tiny")
    for bed in beds:
        idx = bed.notes["pattern_idx"]
        assert len(bed.emb) == 4 and bed.emb.shape[1] == 16  # 2 patterns x 2 embeddings
        assert torch.all(patterns.scale_km[idx] == bed.scale_km)
        assert torch.all(patterns.num_modes[idx] == bed.notes["modes"])
        found, _ = synthetic.pattern_log_odds(patterns, bed.emb)
        assert torch.equal(found, idx)  # the embeddings are those patterns' photos
        assert all(len(p) == bed.notes["modes"] for p in bed.places)
        truth = bed.truth(50, torch.Generator().manual_seed(0))
        assert truth.shape == (4, 50, 2)
        _, km = synthetic.mode_of(patterns, idx, truth)
        assert float(km.max()) < 12 * bed.scale_km
        log_p = bed.log_density(latlon_to_unit(truth))
        expected = synthetic.posterior_log_density(patterns, idx, truth)
        assert torch.allclose(log_p, expected, atol=1e-6)


def test_metrics_of_exact_samples_and_of_a_misplaced_answer(root):
    bed = next(b for b in trained_testbeds("syn-tiny", root) if b.name.endswith("5km-x3"))
    exact = bed.truth(400, torch.Generator().manual_seed(5))
    good = bed_metrics(bed, exact, 400)
    # Exact samples of an equal- or 0.6/0.3/0.1-weighted mixture: mode shares within sampling
    # noise (TV ~ sqrt(K / N) at most 0.09 here), most samples within 25 km of a city.
    assert good["model"]["mode_mass_tv"] < 0.09
    assert good["model"]["within_25_km"] > 0.95
    assert good["model"]["guess_to_city_km"] < 15
    # All mass on the first city: total variation 1 - w_0 per photo.
    first = torch.stack([cities[0] for cities in bed.places])[:, None].expand_as(exact)
    expected_tv = float((1 - bed.notes["patterns"].weights[bed.notes["pattern_idx"], 0]).mean())
    assert mode_mass_tv(bed, first) == pytest.approx(expected_tv, abs=1e-9)
    bad = bed_metrics(bed, first, 400)
    # The sliced Wasserstein distance sees the missing modes far above its sampling floor.
    assert good["model"]["sw_km"] < 2 * good["sw_floor_km"]
    assert bad["model"]["sw_km"] > 5 * good["sw_floor_km"]


def test_missing_testbed_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.py testbeds_build -p only=syn-small"):
        trained_testbeds("syn-small", tmp_path)
