"""Linear layers with prepacked weights for CPU inference (oneDNN), with a plain fallback.

PyTorch runs a float32 ``nn.Linear`` on the CPU through MKL's sgemm, which on some processors
(measured: AMD EPYC, AVX-512) takes a generic code path at 80-110 GFLOP/s per core, while
oneDNN's JIT kernels on weights reordered once into their blocked layout reach about 240 (float32)
and 500 (bfloat16) on the same core (``benchmarks/vs_reference.py`` prints both rates). The
network's weights are fixed at inference, so they are packed once per precision and reused by
every call. Same maths; float32 results differ from ``F.linear`` only by summation order
(~1e-6 relative).

Where oneDNN is unavailable (other devices, builds without it) :func:`pack` keeps the plain
weight and :func:`linear` calls ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_PACK_ROWS = 512
"""Row count the packed layout is tuned for (any row count works)."""


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weight (in its compute dtype, packed or plain) and bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: bool
    out_features: int


def onednn_available(device: torch.device) -> bool:
    """Whether oneDNN's packed linear kernels can run on this device."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(layer: torch.nn.Linear, dtype: torch.dtype) -> PackedLinear:
    """Cast a linear layer's parameters to ``dtype`` and pack the weight where possible."""
    weight = layer.weight.detach().to(dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    if onednn_available(weight.device) and dtype in (torch.float32, torch.bfloat16):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
            return PackedLinear(packed, bias, True, weight.shape[0])
        except RuntimeError:  # a build whose oneDNN lacks this dtype: plain path
            pass
    return PackedLinear(weight, bias, False, weight.shape[0])


def linear(x: torch.Tensor, layer: PackedLinear, gelu: bool = False) -> torch.Tensor:
    """x (..., in) in the layer's dtype -> (..., out); ``gelu`` fuses the exact (erf) GELU."""
    if layer.packed:
        rows = x.reshape(-1, x.shape[-1])
        if gelu:
            out = torch.ops.mkldnn._linear_pointwise(
                rows, layer.weight, layer.bias, "gelu", [], "none"
            )
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, layer.weight, layer.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], layer.out_features)
    out = F.linear(x, layer.weight, layer.bias)
    return F.gelu(out) if gelu else out
