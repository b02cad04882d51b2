"""The encoder interface and the registry of encoder names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

#: Best offline encoder by the im2gps3k validation benchmark (benchmarks/encoders.py).
DEFAULT_ENCODER = "efficientnet-lite0-geo"


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


def _entry(name: str | None) -> tuple[str, _Entry]:
    name = name or DEFAULT_ENCODER
    if name not in _REGISTRY:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        )
    return name, _REGISTRY[name]


def encoder_options(name: str | None = None) -> frozenset[str]:
    """Keyword options the named encoder takes (``None`` -> :data:`DEFAULT_ENCODER`)."""
    _, entry = _entry(name)
    return frozenset(inspect.signature(entry.factory).parameters)


def get_encoder(name: str | None = None, **kwargs: Any) -> Encoder:
    """Build a registered encoder (``None`` -> :data:`DEFAULT_ENCODER`); kwargs override
    the registered defaults (e.g. ``path=`` a local directory for the hub encoders).

    An option the encoder does not take is a ValueError naming it (the offline encoders run on
    the CPU and load their weights from the package: no ``device`` other than the CPU, no
    ``path``)."""
    name, entry = _entry(name)
    if str(kwargs.get("device", "cpu")) == "cpu" and "device" not in encoder_options(name):
        kwargs.pop("device", None)
    unknown = sorted(set(kwargs) - encoder_options(name))
    if unknown:
        where = "runs on the CPU only" if "device" in unknown else "is built in"
        raise ValueError(
            f"encoder {name!r} {where}: it takes no {', '.join(unknown)} option "
            f"(it takes: {', '.join(sorted(encoder_options(name))) or 'none'})"
        )
    enc = entry.factory(**{**entry.defaults, **kwargs})
    enc.name = name
    return enc
