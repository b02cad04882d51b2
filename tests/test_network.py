import json

import pytest
import torch
from safetensors.torch import load_file
from torch.func import jvp

from globeflow.core.network import Denoiser


def test_state_dict_layout_matches_published(plonk_compat):
    layouts = json.loads((plonk_compat / "layouts.json").read_text())
    for name, spec in layouts.items():
        net = Denoiser(**spec["config.json"])
        shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert shapes == spec["state_dict"], name
        assert sum(p.numel() for p in net.parameters()) == spec["n_params"], name


def _tiny(plonk_compat):
    cfg = json.loads((plonk_compat / "tiny" / "config.json").read_text())
    net = Denoiser(**cfg)
    net.load_state_dict(load_file(str(plonk_compat / "tiny" / "model.safetensors")))
    return net.eval()


def test_forward_reproduces_published_vector(plonk_compat):
    net = _tiny(plonk_compat)
    ref = json.loads((plonk_compat / "tiny" / "vectors.json").read_text())["network_forward"]
    out = net(torch.tensor(ref["y"]), torch.tensor(ref["gamma"]), torch.tensor(ref["emb"]))
    assert torch.allclose(out, torch.tensor(ref["output"]), atol=1e-5)


def test_cached_condition_equals_per_row_forward():
    torch.manual_seed(0)
    net = Denoiser(dim=64, depth=3, cond_dim=16).double().eval()
    emb = torch.randn(3, 16, dtype=torch.float64)
    y = torch.randn(3, 7, 3, dtype=torch.float64)
    gamma = torch.tensor(0.37, dtype=torch.float64)
    cached = net.forward_conditioned(y, net.condition(emb, gamma))
    rows = net(y.reshape(-1, 3), gamma.expand(21), emb.repeat_interleave(7, dim=0)).reshape(3, 7, 3)
    assert torch.allclose(cached, rows, atol=1e-12)


def test_fused_jvp_equals_autodiff():
    torch.manual_seed(1)
    net = Denoiser(dim=64, depth=3, cond_dim=8).double().eval()
    cond = net.condition(torch.randn(2, 8, dtype=torch.float64), torch.tensor(0.6).double())
    y = torch.randn(2, 5, 3, dtype=torch.float64)
    tangents = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    out, jvps = net.forward_with_jvp(y, tangents, cond)
    for k in range(3):
        ref_out, ref_jvp = jvp(lambda z: net.forward_conditioned(z, cond), (y,), (tangents[k],))
        assert torch.allclose(out, ref_out, atol=1e-12)
        assert torch.allclose(jvps[k], ref_jvp, atol=1e-12)


def test_dim_must_be_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        Denoiser(dim=60)


def test_inference_layers_equal_the_modules():
    """Without autograd the blocks run on prepacked weights (oneDNN where available): same
    maths as the nn.Linear modules, to float32 summation-order rounding; likewise the JVPs."""
    torch.manual_seed(3)
    net = Denoiser(dim=64, depth=3, cond_dim=8).eval()
    emb, gamma = torch.randn(2, 8), torch.tensor(0.7)
    cond = net.condition(emb, gamma)
    y = torch.nn.functional.normalize(torch.randn(2, 40, 3), dim=-1)
    tangents = torch.randn(2, 2, 40, 3)
    with torch.enable_grad():
        modules = net.forward_conditioned(y, cond).detach()
    with torch.no_grad():
        packed = net.forward_conditioned(y, cond)
        out, jvps = net.forward_with_jvp(y, tangents, cond)
    torch.testing.assert_close(packed, modules, rtol=1e-5, atol=1e-6)
    net64 = net.double()
    cond64 = net64.condition(emb.double(), gamma.double())
    for k in range(2):
        ref_out, ref_jvp = jvp(
            lambda z: net64.forward_conditioned(z, cond64), (y.double(),), (tangents[k].double(),)
        )
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(jvps[k].double(), ref_jvp, rtol=1e-4, atol=1e-5)


def test_bf16_path_agrees_with_fp32():
    """bf16 matrix products with float32 accumulation: outputs and JVPs within bf16 rounding
    (8 significant bits, ~0.4% per product) of the float32 pass."""
    torch.manual_seed(2)
    net = Denoiser(dim=64, depth=3, cond_dim=8).eval()
    cond = net.condition(torch.randn(2, 8), torch.tensor(0.3))
    y = torch.nn.functional.normalize(torch.randn(2, 50, 3), dim=-1)
    tangents = torch.randn(2, 2, 50, 3)
    with torch.no_grad():
        ref = net.forward_conditioned(y, cond)
        low = net.forward_conditioned(y, cond, precision="bf16")
        ref_out, ref_jvp = net.forward_with_jvp(y, tangents, cond)
        low_out, low_jvp = net.forward_with_jvp(y, tangents, cond, precision="bf16")
    assert low.dtype == torch.float32
    for a, b in ((low, ref), (low_out, ref_out), (low_jvp, ref_jvp)):
        rel = (a - b).norm() / b.norm()
        assert 1e-5 < rel < 0.02, rel  # differs (really bf16) but only by rounding
    # The prepared weights are cached, and refreshed when the weights change.
    first = net.inference_layers("bf16")
    assert net.inference_layers("bf16") is first
    with torch.no_grad():
        net.blocks[0].mlp[0].weight.mul_(2)
    assert net.inference_layers("bf16") is not first
