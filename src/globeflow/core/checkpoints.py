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
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from globeflow.core.families import DENOISING_FAMILIES, GeoModel
from globeflow.core.hub_downloads import known_repo, snapshot
from globeflow.core.network import Denoiser
from globeflow.core.schedules import schedule_from_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "globeflow"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def _infer_family(name: str) -> str:
    name = name.rstrip("/").lower()
    if name.endswith("_flow") or name.endswith("-flow"):
        return "flow"
    if name.endswith("_diffusion") or name.endswith("-diffusion"):
        return "diffusion"
    return "rfm"


def _baseline_classes() -> dict[str, type[GeoModel]]:
    try:
        from globeflow.core.families.baselines import BASELINES
    except ImportError:  # pragma: no cover - baselines are part of the package
        return {}
    return BASELINES


def model_from_config(config: dict, family: str | None = None, name: str = "") -> GeoModel:
    """Build an (untrained) model from a config dict of either flavour."""
    if config.get("format") == FORMAT:
        family = family or config["family"]
        if family in DENOISING_FAMILIES:
            network = Denoiser(**config["network"])
            return DENOISING_FAMILIES[family](
                network,
                schedule=schedule_from_config(config.get("schedule")),
                cond_drop_prob=config.get("cond_drop_prob", 0.1),
            )
        baselines = _baseline_classes()
        if family in baselines:
            return baselines[family].from_config(config)
        raise CheckpointError(f"unknown family {family!r} in config of {name or 'model'}")
    required = {"input_dim", "dim", "depth", "expansion", "cond_dim"}
    if not required <= set(config):
        raise CheckpointError(
            f"{name or 'config'}: not a globeflow or PLONK config (missing "
            f"{sorted(required - set(config))})"
        )
    family = family or _infer_family(name)
    if family not in DENOISING_FAMILIES:
        raise CheckpointError(
            f"family {family!r} cannot hold a PLONK network; "
            f"choose from {sorted(DENOISING_FAMILIES)}"
        )
    network = Denoiser(**{k: config[k] for k in sorted(required)})
    return DENOISING_FAMILIES[family](network)


def _resolve_directory(path_or_hub_id: str | os.PathLike) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path}: expected a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    text = str(path_or_hub_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not get {repo_id!r} from the hub: {first_line}") from exc


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
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
    model = model_from_config(config, family=family, name=str(path_or_hub_id))
    state = load_file(str(weights_path))
    # Our checkpoints hold the whole model's state; PLONK's hold the bare network's.
    target = model if config.get("format") == FORMAT else model.network
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    if config.get("format") == FORMAT:
        model.metadata = config.get("metadata", {})
    else:
        model.metadata = _published_metadata(str(path_or_hub_id))
    return model.to(device).eval()


def _published_metadata(name: str) -> dict:
    """PLONK configs do not say which encoder made their embeddings; the known repos do."""
    repo = known_repo(name)
    return {"encoder": repo.encoder} if repo is not None and repo.encoder else {}


def save_model(model: GeoModel, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (globeflow format) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model.config_dict()}
    if metadata:
        config["metadata"] = metadata
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def save_plonk_network(model: GeoModel, directory: str | os.PathLike) -> Path:
    """Export the denoiser in the published PLONK layout (bare config + network state dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net = model.network
    save_file(
        {k: v.contiguous().cpu() for k, v in net.state_dict().items()},
        str(directory / WEIGHTS_NAME),
    )
    (directory / CONFIG_NAME).write_text(json.dumps(net.config, indent=1) + "\n")
    return directory
