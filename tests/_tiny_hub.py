"""Tiny random models of the paper's architectures, and a Hugging Face hub cache laid out by hand.

The cache layout is the one ``huggingface_hub`` writes::

    <cache>/models--<org>--<name>/blobs/<sha256 of the file>
    <cache>/models--<org>--<name>/refs/main                      (the commit hash)
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>  ->  ../../blobs/<sha256>
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

TINY_DIM = 32  # hidden size of the tiny encoders = cond_dim of the tiny PLONK network


def tiny_dinov2(directory: Path, image_size: int = 56) -> Path:
    """A 1-layer DINOv2-with-registers (hidden 32) saved in transformers' layout."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Dinov2WithRegistersConfig(
        hidden_size=TINY_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=image_size,
        num_register_tokens=4,
    )
    tf.Dinov2WithRegistersModel(cfg).save_pretrained(directory)
    return directory


def tiny_clip(directory: Path, image_size: int = 42) -> Path:
    """A full tiny CLIP checkpoint (vision hidden 32), like geolocal/StreetCLIP's layout."""
    import transformers as tf

    torch.manual_seed(1)
    vision = dict(
        hidden_size=TINY_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=16,
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
        projection_dim=16,
    )
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    tf.CLIPModel(cfg).save_pretrained(directory)
    return directory


def tiny_plonk(directory: Path, cond_dim: int = TINY_DIM) -> Path:
    """A tiny denoiser in the published PLONK layout (bare config + network state dict)."""
    from globeflow.core.checkpoints import save_plonk_network
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    torch.manual_seed(2)
    return save_plonk_network(
        RiemannianFlowMatching(Denoiser(dim=32, depth=2, cond_dim=cond_dim)), directory
    )


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, commit: str | None = None) -> Path:
    """Place every file of ``source`` in ``cache`` as revision ``main`` of ``repo_id``; returns
    the snapshot directory."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(p for p in source.iterdir() if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(f, blob)
        link = snapshot / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    return snapshot
