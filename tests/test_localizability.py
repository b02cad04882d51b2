import math

import torch

from globeflow.core import localizability
from globeflow.core.localizability import (
    bits_and_stderr,
    two_level_bits,
    two_level_localizability,
    two_level_log_densities,
    two_level_sizes,
    uses_two_levels,
)
from globeflow.core.sampler_settings import (
    DEFAULT_SAMPLER,
    FINE_SHARE,
    MIN_FINE_SAMPLES,
    PLAIN,
    resolve,
)

f64 = torch.float64


def test_two_level_sizes_keep_the_plain_estimate_below_the_smallest_fine_share():
    assert two_level_sizes(128) == (32, 160)
    assert two_level_sizes(FINE_SHARE * MIN_FINE_SAMPLES) == (MIN_FINE_SAMPLES, 40)
    assert two_level_sizes(FINE_SHARE * MIN_FINE_SAMPLES - 1) == (31, 0)


def test_a_coarse_level_equal_to_the_fine_one_gives_the_plain_estimate():
    coarse = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=f64)
    bits, se = two_level_bits(coarse[:, :8].clone(), coarse)
    plain_bits, plain_se = bits_and_stderr(coarse)
    torch.testing.assert_close(bits, plain_bits)
    torch.testing.assert_close(se, plain_se)


def test_two_levels_are_unbiased_for_the_fine_mean_and_report_their_own_spread():
    """4,000 independent estimates (F = 32 fine, C = 160 coarse) of a fine level whose mean is
    0.3 and whose coarse level is biased by -0.3, with a correction correlated with it: the
    estimates' mean is within 4 of its standard errors of 0.3, and the mean reported variance
    matches the estimates' spread within 4 standard deviations of a sample variance over R
    estimates (relative sd sqrt(2 / (R - 1)), Gaussian)."""
    r, f, c = 4000, 32, 160
    g = torch.Generator().manual_seed(1)
    coarse = 2.0 * torch.randn(r, c, generator=g, dtype=f64)
    correction = 0.3 + 0.5 * torch.randn(r, f, generator=g, dtype=f64) + 0.2 * coarse[:, :f]
    fine = coarse[:, :f] + correction
    ln2 = math.log(2.0)
    bits, se = two_level_bits(fine * ln2, coarse * ln2)
    spread = float(bits.var())
    assert abs(float(bits.mean()) - 0.3) < 4 * math.sqrt(spread / r)
    assert abs(float((se**2).mean()) / spread - 1) < 4 * math.sqrt(2 / (r - 1))
    # Not the fine level's own mean: that spreads var(fine) / F, over twice as much here.
    assert float(fine.mean(-1).var()) > 2 * spread


def _sharp_single_atom_model(rms_km: float):
    from globeflow.core.exact_field import MixtureTarget, exact_rfm_model, kernel_width_for_rms_km

    atom = torch.tensor([[35.68, 139.65]], dtype=f64)
    return exact_rfm_model([MixtureTarget.from_latlon(atom, width=kernel_width_for_rms_km(rms_km))])


def test_two_levels_on_a_1km_target_match_its_closed_form():
    """Two levels of the default recipe on a 1-km exact field (~22 bits): within 4 standard
    errors (of it and of the closed form's own Monte Carlo mean) plus the recipe pass's 0.1-bit
    budget (tests/test_likelihood.py) of the closed-form E_p[log2 p], with a standard error well
    below the fine samples' own."""
    model = _sharp_single_atom_model(1.0)
    emb = torch.ones(1, 1, dtype=f64)
    recipe = resolve(model, DEFAULT_SAMPLER)
    assert uses_two_levels(model, recipe)
    assert not uses_two_levels(
        model, resolve(model, DEFAULT_SAMPLER, localizability_estimator=PLAIN)
    )
    fine, coarse = two_level_sizes(256)
    x0 = model.prepare_noise(emb, coarse, None, torch.Generator().manual_seed(3))
    fine_log_p, coarse_log_p = two_level_log_densities(model, emb, x0, recipe, fine)
    assert fine_log_p.shape == (1, fine) and coarse_log_p.shape == (1, coarse)
    bits, se = two_level_bits(fine_log_p, coarse_log_p)
    exact = model.network.target_samples(0, 4000, torch.Generator().manual_seed(5))[None]
    exact_bits = model.network.target_log_density(exact, torch.tensor([0]))[0] / math.log(2)
    band = 4 * math.sqrt(float(se) ** 2 + float(exact_bits.var()) / len(exact_bits)) + 0.1
    assert abs(float(bits) - float(exact_bits.mean())) < band
    recipe = resolve(model, DEFAULT_SAMPLER, localizability_samples=256)
    bits2, se2, plain = two_level_localizability(model, emb, x0, recipe)
    assert not plain.any()  # (the staged estimate: the same numbers where it keeps two levels)
    torch.testing.assert_close(bits2, bits.double(), rtol=0, atol=1e-9)
    torch.testing.assert_close(se2, se.double(), rtol=0, atol=1e-9)
    # What the coarse level buys: the error of the fine samples' own mean would be over twice
    # as large (sqrt(C / F) = 2.2 with a perfect correction).
    fine_only_se = float((fine_log_p / math.log(2)).std()) / math.sqrt(fine)
    assert float(se) < 0.6 * fine_only_se


def test_model_localizability_takes_the_recipes_estimator():
    """``model.localizability`` of an RFM: two levels by default (the same numbers as
    ``estimator="two-level"`` from the same seed), the plain mean with ``estimator="plain"``
    (the same as the per-sample log-densities' mean), and plain where the density settings are
    not the default ones (the exact divergence)."""
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=3)).double()
    emb = torch.randn(2, 3, dtype=f64)

    def bits(**kw):
        return model.localizability(
            emb, num_samples=32, generator=torch.Generator().manual_seed(4), **kw
        )

    default, two, plain = bits(), bits(estimator="two-level"), bits(estimator=PLAIN)
    torch.testing.assert_close(default, two, rtol=0, atol=0)
    assert not torch.equal(default, plain)
    _, log_p = model.sample_with_log_density(emb, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(plain, log_p.mean(-1) / math.log(2))
    exact = bits(divergence="exact")
    exact_plain = bits(divergence="exact", estimator=PLAIN)
    torch.testing.assert_close(exact, exact_plain, rtol=0, atol=0)


def test_a_photo_whose_correction_spreads_too_much_falls_back_to_the_plain_estimate(monkeypatch):
    """Where the coarse level says nothing about the fine one (here: pure noise), the two-level
    error would exceed the plain one's, so that photo takes the plain estimate over N, the
    same numbers as the full pass on its first N initial states; a photo whose coarse level
    is close keeps two levels."""
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=16, depth=1, cond_dim=3)).double()
    emb = model.prepare_embeddings(torch.randn(2, 3, dtype=f64))
    recipe = resolve(model, localizability_samples=64)
    fine, coarse = two_level_sizes(64)
    x0 = model.prepare_noise(emb, coarse, None, torch.Generator().manual_seed(2))
    original = localizability._coarse_pass

    def useless_for_the_first_photo(model, emb, x0, recipe, widths):
        log_p = original(model, emb, x0, recipe, widths)
        if emb.shape[0] == 2:  # the first F samples of both photos
            noise = 50.0 * torch.randn(log_p.shape[1], generator=torch.Generator().manual_seed(3))
            log_p[0] = noise.to(log_p)
        return log_p

    monkeypatch.setattr(localizability, "_coarse_pass", useless_for_the_first_photo)
    bits, se, plain = two_level_localizability(model, emb, x0, recipe)
    assert plain.tolist() == [True, False]
    _, log_p = model.sample_with_log_density(
        emb[:1], 64, noise=x0[:1, :64], settings=resolve(model, localizability_estimator=PLAIN)
    )
    plain_bits, plain_se = bits_and_stderr(log_p)
    torch.testing.assert_close(bits[:1], plain_bits.double(), rtol=0, atol=1e-9)
    torch.testing.assert_close(se[:1], plain_se.double(), rtol=0, atol=1e-9)
