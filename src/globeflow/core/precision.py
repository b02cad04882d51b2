"""Which floating-point precision runs fastest without losing accuracy on a device."""

from __future__ import annotations

import torch


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively: every GPU here, and CPUs
    whose oneDNN reports bfloat16 instructions (AVX512-BF16 / AMX). Elsewhere bfloat16 maths is
    emulated and slower than float32."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def fastest_precision(device: str | torch.device) -> str:
    """``"bf16"`` where bfloat16 is native (:func:`native_bf16`), else ``"fp32"``."""
    return "bf16" if native_bf16(device) else "fp32"
