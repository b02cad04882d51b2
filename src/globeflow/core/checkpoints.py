"""Loading and saving models: a directory with ``config.json`` + ``model.safetensors``.

Two config flavours are understood:

* globeflow's own: ``{"format": "globeflow", "family": ..., "network": {...}, "schedule": {...},
  ...}`` (written by :func:`save_model`), also used by the baselines;
* the published PLONK checkpoints: the bare network constructor arguments
  (``{"input_dim", "dim", "depth", "expansion", "cond_dim"}``); the family is given by the caller
  or inferred from the name (``*_flow`` -> flow, ``*_diffusion`` -> diffusion, else RFM).

Weights are read with safetensors only; no pickle is ever loaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from globeflow.core.families import (
    FAMILIES,
    GeoModel,
    RiemannianFlowMatching,
    denoising_family_names,
)
from globeflow.core.hub_downloads import known_repo, looks_like_hub_id, snapshot
from globeflow.core.network import Denoiser
from globeflow.core.sampler_settings import (
    PUBLISHED_GUIDANCE,
    RECOMMENDED_SAMPLER_KEY,
    sampler_recommendation,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "globeflow"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def _infer_family(name: str) -> str:
    """The family of a published checkpoint from its name: a denoising family's name as its
    suffix (``*_flow``, ``*-diffusion``), else RFM (the bare ``PLONK_*`` names)."""
    name = name.rstrip("/").lower()
    for family in denoising_family_names():
        if name.endswith((f"_{family}", f"-{family}")):
            return family
    return RiemannianFlowMatching.family


def model_from_config(config: dict, family: str | None = None, name: str = "") -> GeoModel:
    """Build an (untrained) model from a config dict of either flavour."""
    if config.get("format") == FORMAT:
        family = family or config["family"]
        if family not in FAMILIES:
            raise CheckpointError(f"unknown family {family!r} in config of {name or 'model'}")
        return FAMILIES[family].from_config(config)
    required = {"input_dim", "dim", "depth", "expansion", "cond_dim"}
    if not required <= set(config):
        raise CheckpointError(
            f"{name or 'config'}: not a globeflow or PLONK config (missing "
            f"{sorted(required - set(config))})"
        )
    family = family or _infer_family(name)
    if family not in denoising_family_names():
        raise CheckpointError(
            f"family {family!r} cannot hold a PLONK network; "
            f"choose from {sorted(denoising_family_names())}"
        )
    network = Denoiser(**{k: config[k] for k in sorted(required)})
    return FAMILIES[family](network)


def _resolve_directory(path_or_hub_id: str | os.PathLike) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path}: expected a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    text = str(path_or_hub_id)
    if looks_like_hub_id(text):
        return _download_from_hub(text)
    raise CheckpointError(f"{path}: no such model directory (nor a hub id of the form owner/name)")


def _download_from_hub(repo_id: str) -> Path:
    """config.json + model.safetensors of a Hugging Face hub repo: from the local hub cache
    (also with ``HF_HUB_OFFLINE=1``), else downloaded once after telling the user what."""
    try:
        return snapshot(repo_id, (CONFIG_NAME, WEIGHTS_NAME))
    except ImportError as exc:
        raise CheckpointError(
            f"{repo_id!r} looks like a hub id; loading from the hub needs "
            "`pip install 'globeflow[hub]'` (huggingface_hub) and, the first time, internet access"
        ) from exc
    except Exception as exc:  # network and offline errors vary by version; report them plainly
        raise CheckpointError(f"could not get {repo_id!r} from the hub: {_one_line(exc)}") from exc


def load_model(
    path_or_hub_id: str | os.PathLike,
    family: str | None = None,
    device: str | torch.device = "cpu",
) -> GeoModel:
    """Load a globeflow checkpoint or a published PLONK checkpoint (directory or hub id).

    ``family`` ("rfm", "flow", "diffusion", or a baseline name) overrides the config/name.
    The model is returned in eval mode.
    """
    directory = _resolve_directory(path_or_hub_id)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{directory}: missing {p.name}")
    config = _read_config(config_path)
    try:
        model = model_from_config(config, family=family, name=str(path_or_hub_id))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: unusable config ({_one_line(exc)})") from exc
    state = _read_weights(weights_path)
    # Our checkpoints hold the whole model's state; PLONK's hold the bare network's.
    target = model if config.get("format") == FORMAT else model.network
    _check_weights_match(target.state_dict(), state, weights_path)
    target.load_state_dict(state)
    if config.get("format") == FORMAT:
        model.metadata = config.get("metadata", {})
    else:
        model.metadata = _published_metadata(str(path_or_hub_id))
    return model.to(device).eval()


def _published_metadata(name: str) -> dict:
    """PLONK configs do not say which encoder made their embeddings (the known repos do) nor
    which guidance to run (the paper does: PUBLISHED_GUIDANCE)."""
    repo = known_repo(name)
    encoder = {"encoder": repo.encoder} if repo is not None and repo.encoder else {}
    return {**encoder, "recommended_guidance": PUBLISHED_GUIDANCE}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_config(config_path: Path) -> dict:
    """The parsed config.json, checked to be an object with usable metadata."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object ({type(config).__name__})")
    metadata = config.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{config_path}: metadata is not a JSON object")
    guidance = metadata.get("recommended_guidance")
    if guidance is not None and not (
        isinstance(guidance, (int, float)) and math.isfinite(guidance)
    ):
        raise CheckpointError(
            f"{config_path}: metadata recommended_guidance {guidance!r} is not a finite number"
        )
    try:
        sampler_recommendation(metadata.get(RECOMMENDED_SAMPLER_KEY, {}))
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: metadata {exc}") from exc
    return config


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, every one finite; clear errors for files that are not."""
    size = weights_path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{weights_path}: empty file (0 bytes); the weights are missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        with open(weights_path, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive ("PK") or, in old versions, a bare pickle (0x80).
        if head == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{weights_path}: a pickled torch file, not safetensors; globeflow never "
                "unpickles weights (convert a trusted copy with safetensors.torch.save_file)"
            ) from exc
        raise CheckpointError(
            f"{weights_path}: truncated or not a safetensors file ({size} bytes; {exc})"
        ) from exc
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} holds NaN or infinite values; the weights "
                "are corrupt or come from a diverged run"
            )
    return state


def _check_weights_match(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], weights_path: Path
) -> None:
    """One line naming the first difference between the weights and the config's model."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if not (missing or unexpected or resized):
        return
    if resized:
        k = resized[0]
        first = (
            f"{k!r} is {tuple(state[k].shape)} in the file but {tuple(expected[k].shape)} "
            "by the config"
        )
    elif missing:
        first = f"{missing[0]!r} is missing from the file"
    else:
        first = f"the file has {unexpected[0]!r}, which the config's model lacks"
    counts = f"{len(resized)} resized, {len(missing)} missing, {len(unexpected)} unexpected"
    raise CheckpointError(
        f"{weights_path}: weights do not match {CONFIG_NAME}: {first} ({counts} tensors)"
    )


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (changing it, even
    for an instant, would race other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file`` with the file mode every other output gets (0666 less
    the umask, e.g. 0644); safetensors itself leaves its files readable by the owner only."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_umask())


def save_model(model: GeoModel, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (globeflow format) into directory.

    ``metadata`` defaults to the model's own (set by :func:`load_model`), so a loaded model
    saved again keeps its encoder name and recommended guidance."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model.config_dict()}
    # A loaded model carries its metadata (encoder, recommended guidance): keep it by default.
    metadata = getattr(model, "metadata", None) if metadata is None else metadata
    if metadata:
        config["metadata"] = metadata
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_tensors(state, tmp)
    os.replace(tmp, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def save_plonk_network(model: GeoModel, directory: str | os.PathLike) -> Path:
    """Export the denoiser in the published PLONK layout (bare config + network state dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net = model.network
    save_tensors(
        {k: v.contiguous().cpu() for k, v in net.state_dict().items()}, directory / WEIGHTS_NAME
    )
    (directory / CONFIG_NAME).write_text(json.dumps(net.config, indent=1) + "\n")
    return directory
