"""Fusing photos of one place and constraining answers to a region, against closed forms.

Members are von Mises-Fisher mixtures (tests/_fusion_testbed.py), so the fused posterior, its
normaliser (the same-place Bayes factor) and region masses are known exactly; tolerances come
from the effective sample size and the estimators' standard errors.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _fusion_testbed as tb  # noqa: E402

from globeflow.answers.fusion import draw_posterior, fused_sample, single_sample
from globeflow.answers.within import RegionError, bbox_region, parse_region
from globeflow.apps.pipeline import Locator
from globeflow.core.fusion import effective_sample_size, mass_inside, normalised_weights
from globeflow.core.sphere import latlon_to_unit, unit_to_latlon
from globeflow.core.vmf import vmf_mean_resultant
from globeflow.jobs.metrics import sliced_wasserstein_km


class _Encoder:
    """Stands in for an image encoder: the tests pass embeddings directly."""

    name = "one-hot"

    def __init__(self, dim: int) -> None:
        self.dim = dim


def _locator(prior: tb.Mixture, cues: list[tb.Mixture]) -> Locator:
    return Locator(tb.ClosedFormCues(prior, cues), _Encoder(len(cues)), model_name="testbed")


def test_product_of_vmf_members_is_the_closed_form_vmf() -> None:
    """Uniform null and vMF members: the fused posterior is vMF(K / |K|, |K|), K = sum k_i m_i,
    and Z = (4 pi)^(n-1) prod C(k_i) / C(|K|) e^(|K| - sum k_i)."""
    centres = [(45.0, 5.0), (47.0, 9.0), (44.0, 8.0)]
    scales = [400.0, 250.0, 300.0]
    cues = [tb.vmf(c, s) for c, s in zip(centres, scales)]
    model = tb.ClosedFormCues(tb.uniform_prior(), cues)
    g = torch.Generator().manual_seed(1)
    sample = fused_sample(model, torch.eye(3), steps=1, generator=g, per_round=3000)
    exact = tb.oracle(tb.uniform_prior(), cues)
    kappa, mu = float(exact.kappa[0]), exact.mu[0]
    w = normalised_weights(sample.log_weight)
    ess = effective_sample_size(sample.log_weight)
    assert ess > 500
    mean = (w[:, None] * sample.points.double()).sum(0)
    # Tangent components of vMF samples have variance ~ 1/kappa each: the weighted mean's
    # tangent error has standard deviation sqrt(1 / (kappa ESS)) per component.
    tangent = mean - (mean @ mu) * mu
    assert float(tangent.norm()) < 5.0 * math.sqrt(1.0 / (kappa * ess))
    # 1 - mu.x is about Exponential(kappa): the mean resultant's gap has sd ~ 1 / (kappa sqrt(ESS)).
    gap, gap_exact = 1.0 - float(mean.norm()), 1.0 - float(vmf_mean_resultant(torch.tensor(kappa)))
    assert abs(gap - gap_exact) * kappa < 5.0 / math.sqrt(ess)
    draw = draw_posterior(sample, 1024, g)
    assert draw.log_bayes_factor == pytest.approx(
        tb.log_bayes_factor(tb.uniform_prior(), cues), abs=5 * draw.log_bayes_factor_stderr
    )


def test_fused_cues_approach_the_oracle_and_beat_every_single_photo() -> None:
    g = torch.Generator().manual_seed(0)
    prior, cues = tb.scenario((38.72, -9.14), g)
    members = list(cues.values())
    model = tb.ClosedFormCues(prior, members)
    # The city cue alone is within the sampling floor of the oracle, so the fused answer must
    # carry comparable information: an ESS of 400 against the singles' 1024 exact draws.
    draw = draw_posterior(fused_sample(model, torch.eye(4), 1, g, target_ess=400), 1024, g)
    assert draw.effective_sample_size >= 400
    exact = tb.oracle(prior, members)
    truth = unit_to_latlon(exact.sample(1024, g)).float()
    fused_km = float(sliced_wasserstein_km(draw.samples.float(), truth))
    singles = model.sample(torch.eye(4), 1024, generator=g)
    single_km = [float(sliced_wasserstein_km(s.float(), truth)) for s in singles]
    assert fused_km < min(single_km), (fused_km, single_km)
    assert draw.log_bayes_factor == pytest.approx(
        tb.log_bayes_factor(prior, members), abs=5 * draw.log_bayes_factor_stderr
    )
    x = exact.sample(4096, g)
    bits = exact.normalised().log_density(x) / math.log(2.0)
    se = math.hypot(draw.localizability_stderr_bits, float(bits.std()) / 64.0)
    assert draw.localizability_bits == pytest.approx(float(bits.mean()), abs=4 * se)


def _bbox_mass(mixture: tb.Mixture, box: tuple[float, float, float, float]) -> float:
    """P(box) of a normalised mixture by the midpoint rule on a 400 x 400 grid (cos lat dA)."""
    lat0, lon0, lat1, lon1 = box
    lat = lat0 + (torch.arange(400, dtype=torch.float64) + 0.5) * (lat1 - lat0) / 400
    lon = lon0 + (torch.arange(400, dtype=torch.float64) + 0.5) * (lon1 - lon0) / 400
    grid = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1).reshape(-1, 2)
    density = mixture.log_density(latlon_to_unit(grid)).exp()
    cell = math.radians((lat1 - lat0) / 400) * math.radians((lon1 - lon0) / 400)
    return float((density * torch.cos(torch.deg2rad(grid[:, 0]))).sum() * cell)


def test_mass_inside_is_calibrated_over_many_boxes() -> None:
    """P(R | c) from 1,024 samples lies within 2 standard errors of the quadrature truth in about
    95% of 40 random cases (at least 33 of 40: 5 binomial sd below 38)."""
    g = torch.Generator().manual_seed(3)
    hits, zs = 0, []
    for _ in range(40):
        centre = (
            float(torch.rand((), generator=g)) * 100 - 50,
            float(torch.rand((), generator=g)) * 300 - 150,
        )
        member = tb.vmf(centre, 300.0 + 500.0 * float(torch.rand((), generator=g)))
        model = tb.ClosedFormCues(tb.uniform_prior(), [member])
        width = 4.0 + 8.0 * float(torch.rand((), generator=g))
        box = (
            centre[0] - width * 0.3,
            centre[1] - width,
            centre[0] + width * 0.7,
            centre[1] + width * 0.2,
        )
        region = bbox_region(*box)
        sample = single_sample(model, torch.eye(1), 1024, 1, g, region, budget=1)
        mass = draw_posterior(sample, 256, g, region).mass
        truth = _bbox_mass(member, box)
        z = (mass.probability - truth) / mass.stderr
        zs.append(z)
        hits += abs(z) <= 2.0
    assert hits >= 33, zs


def test_truncated_fused_mass_matches_the_oracle() -> None:
    g = torch.Generator().manual_seed(4)
    prior = tb.uniform_prior()
    cues = [tb.vmf((10.0, 20.0), 600.0), tb.vmf((12.0, 23.0), 500.0)]
    model = tb.ClosedFormCues(prior, cues)
    box = (8.0, 18.0, 14.0, 24.0)
    region = bbox_region(*box)
    draw = draw_posterior(fused_sample(model, torch.eye(2), 1, g), 512, g, region)
    truth = _bbox_mass(tb.oracle(prior, cues).normalised(), box)
    assert abs(draw.mass.probability - truth) < 4 * draw.mass.stderr
    assert bool(region.contains(draw.samples).all())


def test_disagreeing_photos_are_refused_with_a_message() -> None:
    prior = tb.uniform_prior()
    paris, near_paris, sydney = (
        tb.vmf((48.85, 2.35), 50.0),
        tb.vmf((48.9, 2.4), 80.0),
        tb.vmf((-33.87, 151.2), 50.0),
    )
    locator = _locator(prior, [paris, near_paris, sydney])
    result = locator.locate_together(
        torch.eye(3), names=["a.jpg", "b.jpg", "c.jpg"], num_samples=128
    )
    assert result["ok"] is False
    assert "disagree" in result["error"] and "c.jpg" in result["error"]
    assert result["disagreement"]["least_consistent_photo"] == "c.jpg"
    assert result["disagreement"]["log_bayes_factor"] < math.log(1 / 20)
    # Decided after the first round: more proposal rounds would only sharpen the refusal.
    assert result["fusion"]["rounds"] == 1
    agreeing = locator.locate_together(torch.eye(3)[:2], names=["a.jpg", "b.jpg"], num_samples=128)
    assert agreeing["ok"] is True and agreeing["disagreement"] is None
    assert agreeing["fusion"]["log_bayes_factor_same_place"] > 0
    assert abs(agreeing["best_guess"]["lat"] - 48.87) < 1.0
    for key in ("regions", "samples", "localizability_bits", "effective_sample_size"):
        assert agreeing[key]
    assert agreeing["photos"] == ["a.jpg", "b.jpg"] and agreeing["settings"]["guidance"] == 0.0


def test_within_gives_the_mass_inside_and_answers_inside() -> None:
    prior = tb.uniform_prior()
    two = tb.concat(
        tb.vmf((48.85, 2.35), 200.0, math.log(0.3)), tb.vmf((40.7, -74.0), 200.0, math.log(0.7))
    )
    locator = _locator(prior, [two])
    box = "35,-80,45,-65"
    [result] = locator.locate_embeddings(torch.eye(1), num_samples=256, within=box)
    mass = result["mass_inside"]
    assert mass["probability"] == pytest.approx(0.7, abs=4 * mass["stderr"])
    assert mass["region"]["kind"] == "bbox"
    lat, lon = torch.tensor(result["samples"]).T
    assert bool(((lat > 35) & (lat < 45) & (lon > -80) & (lon < -65)).all())
    [empty] = locator.locate_embeddings(torch.eye(1), num_samples=64, within="-60,100,-50,110")
    assert empty["ok"] is False and "no mass inside" in empty["error"]
    assert empty["mass_inside"]["probability"] == 0.0 and empty["mass_inside"]["upper_95"] < 0.05


def test_regions_parse_and_contain() -> None:
    pts = torch.tensor([[48.85, 2.35], [52.52, 13.40], [-17.8, 178.0], [-17.8, -179.5], [0.0, 0.0]])
    assert parse_region("45,-5,52,8").contains(pts).tolist() == [True, False, False, False, False]
    across = parse_region([-20, 170, -15, -170])  # across the antimeridian
    assert across.contains(pts).tolist() == [False, False, True, True, False]
    assert parse_region("fr").contains(pts[:2]).tolist() == [True, False]
    # across the antimeridian: the ring continues past 180 (RFC 7946 edges are straight in
    # lon/lat, so [170, ..], [-170, ..] would span 340 degrees the other way)
    ring = [[170, -20], [190, -20], [190, -15], [170, -15], [170, -20]]
    hole = [[177, -18], [179, -18], [179, -17], [177, -17], [177, -18]]
    polygon = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring, hole]}}
    assert parse_region(polygon).contains(pts).tolist() == [False, False, False, True, False]
    assert parse_region({"type": "Polygon", "coordinates": [ring]}).contains(pts)[2]
    with pytest.raises(RegionError, match="encloses no area"):  # a circle of latitude
        parse_region(
            {"type": "Polygon", "coordinates": [[[-180, 80], [0, 80], [180, 80], [-180, 80]]]}
        )
    with pytest.raises(RegionError, match="not a region"):
        parse_region("somewhere nice")
    with pytest.raises(RegionError, match="ZZ"):
        parse_region("ZZ")
    with pytest.raises(RegionError, match="latitudes"):
        parse_region("50,0,40,10")


def test_mass_inside_with_equal_weights_is_binomial() -> None:
    inside = torch.tensor([True] * 30 + [False] * 70)
    mass = mass_inside(torch.zeros(100), inside)
    assert mass.probability == pytest.approx(0.3)
    assert mass.stderr == pytest.approx(math.sqrt(0.3 * 0.7 / 100))


def test_locate_together_with_the_bundled_model(tmp_path) -> None:
    """The real pipeline: photos in (one unreadable), one fused answer out, restricted to France
    with the mass the fused posterior puts there."""
    from PIL import Image, ImageOps

    from globeflow.apps.pipeline import default_model_path

    photo = Path(__file__).resolve().parents[1] / "examples" / "paris.jpg"
    if not (default_model_path() / "model.safetensors").is_file() or not photo.is_file():
        pytest.skip("bundled model or examples/paris.jpg missing")
    locator = Locator.from_pretrained()
    image = Image.open(photo).convert("RGB")
    mirrored = tmp_path / "mirrored.jpg"
    ImageOps.mirror(image).save(mirrored)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    result = locator.locate_together(
        [photo, mirrored, broken], num_samples=128, proposals_per_round=256, within="FR"
    )
    assert result["photos"] == [str(photo), str(mirrored)]
    assert [s["image"] for s in result["skipped"]] == [str(broken)]
    assert result["fusion"]["proposals"] >= 256
    assert math.isfinite(result["fusion"]["log_bayes_factor_same_place"])
    mass = result["mass_inside"]
    assert 0.0 <= mass["probability"] <= 1.0 and mass["region"]["description"] == "France (FR)"
    if result["ok"]:
        assert result["best_guess"]["place"]["country_code"] == "FR"
        assert result["effective_sample_size"] >= 1 and len(result["samples"]) == 128
    else:
        assert result["error"]


def test_models_without_a_null_density_on_the_sphere_cannot_fuse() -> None:
    from globeflow.core.families import FlowMatching, RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    g = torch.Generator().manual_seed(0)
    flow = FlowMatching(Denoiser(dim=8, depth=1, cond_dim=4))
    with pytest.raises(ValueError, match="R\\^3"):
        fused_sample(flow, torch.eye(4)[:2], 1, g)
    no_dropout = RiemannianFlowMatching(Denoiser(dim=8, depth=1, cond_dim=4), cond_drop_prob=0.0)
    with pytest.raises(ValueError, match="condition dropout"):
        fused_sample(no_dropout, torch.eye(4)[:2], 1, g)


@pytest.mark.parametrize("stiff_end", [False, True])
def test_fusion_densities_stay_fp32_where_the_likelihood_would_run_bf16(monkeypatch, stiff_end):
    """The fused weights multiply every photo's density, so their errors add up: fusion asks
    for fp32 likelihoods even where the default would run bf16 below signal level 0.4."""
    import globeflow.core.likelihood as likelihood
    from globeflow.answers.fusion import OwnSamples, fusion_densities
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=4)).eval()
    conditions = torch.randn(3, 4)
    points = torch.nn.functional.normalize(torch.randn(3, 8, 3), dim=-1)
    own = OwnSamples(points, torch.zeros(3, 8), stiff_end=stiff_end)
    monkeypatch.setattr(likelihood, "fastest_precision", lambda device: "bf16")
    seen: list[str] = []
    original = model.network.forward_with_jvp

    def recording(x, tangents, cond, precision="fp32"):
        seen.append(precision)
        return original(x, tangents, cond, precision)

    monkeypatch.setattr(model.network, "forward_with_jvp", recording)
    fusion_densities(model, conditions, 8, own)(points[0])
    if not stiff_end:  # each solve probes its floor at the device's fastest precision first
        assert seen.pop(0) == "bf16"
    assert seen and set(seen) == {"fp32"}
    seen.clear()  # the same solve at the likelihood's default does run bf16: the test can fail
    likelihood.log_prob_ode(model, points[:1], conditions[:1], steps=8)
    assert "bf16" in seen
