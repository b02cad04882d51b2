"""One random stream per photo: answers that do not depend on what else is in the batch.

A photo's samples are drawn from a generator seeded from (seed, photo id) alone, so the same
photo gets the same noise whether it is located alone, in a folder, in a server batch with other
users' photos, or on another rank of a ``torchrun`` job. The seed is a stable hash (SHA-256), not
Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["embedding_ids", "photo_generators", "photo_seed"]


def photo_seed(seed: int, photo_id: str) -> int:
    """A 63-bit seed for one photo's generator, from the run's ``seed`` and the photo's id."""
    digest = hashlib.sha256(f"{int(seed)}\0{photo_id}".encode("utf-8", "surrogateescape"))
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def photo_generators(
    seed: int, photo_ids: Sequence[str], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """A fresh generator on ``device`` per photo, seeded by :func:`photo_seed`."""
    return [torch.Generator(device=device).manual_seed(photo_seed(seed, i)) for i in photo_ids]


def embedding_ids(emb: torch.Tensor) -> list[str]:
    """Content ids for embeddings (B, D): a hash of each row's float32 bytes, for callers that
    name no photo (the same embedding then always gets the same stream)."""
    rows = emb.detach().to("cpu", torch.float32).contiguous().numpy()
    return ["emb:" + hashlib.sha256(row.tobytes()).hexdigest()[:32] for row in rows]
