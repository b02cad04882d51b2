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

from globeflow.core.sampler_settings import IID, NOISE_DESIGNS, SOBOL
from globeflow.core.solvers import SPHERE
from globeflow.core.sphere import sobol_sphere

__all__ = [
    "SOBOL_REPLICATES",
    "STREAM_BLOCK",
    "embedding_ids",
    "photo_generators",
    "photo_seed",
    "replicate_ids",
    "sample_streams",
    "stream_design",
    "stream_noise",
]


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


STREAM_BLOCK = 64
"""Each photo's sample count is rounded up to a multiple of this for a batched solve (the extra
samples are dropped): elementwise kernels round the last, partial vector of a tensor apart, and
that tail must not move with the other photos of the batch."""


SOBOL_REPLICATES = 8
"""Independently scrambled nets per draw: their spread measures the answer's Monte Carlo error
(:func:`globeflow.answers.monte_carlo.replicate_stderr`). More nets read the error more surely
but make each net smaller, and a small net gains less over iid points: at 256 samples, 8 nets
of 32 leave a three-city answer's shares 2.3-3.8x below iid's SD and read it within 30%; one
net of 256 gains 3.6-6.4x but has no error to read (``benchmarks/run.py noise_design``)."""


def stream_design(model, design: str) -> str:
    """The design ``model``'s streams run for ``design``: "sobol" only where the model draws its
    own initial states uniform on S^2 (the sphere families); "iid" elsewhere."""
    if design not in NOISE_DESIGNS:
        raise ValueError(f"unknown noise design {design!r}; choose from {NOISE_DESIGNS}")
    on_sphere = getattr(model, "draws_initial_noise", False) and (
        getattr(model, "geometry", None) is SPHERE
    )
    return design if on_sphere else IID


def stream_noise(
    model,
    generators: Sequence[torch.Generator],
    count: int,
    like: torch.Tensor,
    design: str = IID,
) -> tuple[torch.Tensor, int]:
    """The next initial states of each photo's stream for a denoising ``model``: (B, padded, 3)
    with ``padded`` = ``count`` rounded up to :data:`STREAM_BLOCK`, and ``padded``. ``design``
    "sobol" (on S^2, :func:`stream_design`): :data:`SOBOL_REPLICATES` nets of padded / K points
    each, one after the other (:func:`replicate_ids`), scrambled by seeds from the stream."""
    padded = -(-count // STREAM_BLOCK) * STREAM_BLOCK
    if stream_design(model, design) == SOBOL:
        return torch.cat([_sobol_nets(g, padded, like)[None] for g in generators]), padded
    return torch.cat([model.initial_noise(1, padded, g, like) for g in generators]), padded


def _sobol_nets(generator: torch.Generator, padded: int, like: torch.Tensor) -> torch.Tensor:
    """(padded, 3): :data:`SOBOL_REPLICATES` scrambled Sobol nets, seeds drawn from
    ``generator`` (so the next draw of the stream scrambles afresh)."""
    seeds = torch.randint(0, 2**62, (SOBOL_REPLICATES,), generator=generator,
                          device=generator.device)  # fmt: skip
    per_net = padded // SOBOL_REPLICATES
    nets = [sobol_sphere(per_net, seed, like.device, like.dtype) for seed in seeds.tolist()]
    return torch.cat(nets)


def replicate_ids(count: int, padded: int, draw: int) -> torch.Tensor:
    """(count,) long: the net of each of the first ``count`` of ``padded`` Sobol initial states
    of a photo's ``draw``-th draw (0 first), as :func:`stream_noise` lays them out; ids are
    ``draw * SOBOL_REPLICATES + net``, unique across a photo's draws."""
    per_net = padded // SOBOL_REPLICATES
    return draw * SOBOL_REPLICATES + torch.arange(count) // per_net


def sample_streams(
    model, emb: torch.Tensor, generators: Sequence[torch.Generator], num_samples: int, **options
) -> torch.Tensor:
    """``model.sample(emb, num_samples, **options)`` (B, N, 2) degrees with each photo's samples
    from its own generator: one batched solve from per-photo initial states for the families
    that draw them (``model.draws_initial_noise``), one call per photo for the others (they draw
    inside ``sample``)."""
    if not model.draws_initial_noise:
        return torch.cat(
            [
                model.sample(emb[i : i + 1], num_samples, generator=g, **options)
                for i, g in enumerate(generators)
            ]
        )
    emb = model.prepare_embeddings(emb)
    noise, padded = stream_noise(model, generators, num_samples, emb)
    return model.sample(emb, padded, noise=noise, **options)[:, :num_samples]
