"""Training checkpoints: the whole training state, written atomically, read back exactly.

A checkpoint is a directory with ``state.safetensors`` (weights, EMA weights, optimiser moments)
and ``state.json`` (step, validation bookkeeping, config, data fingerprint, optimiser groups).
Random draws in training are pure functions of (seed, step), so no RNG state is needed. A
checkpoint is resumed only by a run of the same config (but for
:data:`~globeflow.jobs.train_config.RESUME_MUTABLE`) on the same data.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from globeflow.core.checkpoints import save_tensors
from globeflow.jobs.train_config import resumable_view

__all__ = [
    "find_checkpoint",
    "load_checkpoint",
    "resume_problem",
    "rewrite_metrics",
    "save_checkpoint",
]

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
) -> None:
    """Write the full training state to ``directory`` atomically.

    Written to a temporary sibling first; the old checkpoint is moved aside and removed only
    after the new one is in place, so a kill at any moment leaves one complete checkpoint.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_json = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, slots in sd["state"].items():
            for name, value in slots.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        optim_json = {
            "param_groups": sd["param_groups"],
            "slots": {str(i): sorted(s) for i, s in sd["state"].items()},
        }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_synced(tmp / STATE_TENSORS, lambda p: save_tensors(tensors, p))
    payload = json.dumps({**state, "optimizer": optim_json}, indent=1)
    _write_synced(tmp / STATE_JSON, lambda p: p.write_text(payload + "\n"))
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint in ``directory`` (or its ``.old`` sibling after a kill mid-swap)."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE_JSON).is_file() and (candidate / STATE_TENSORS).is_file():
            return candidate
    return None


def resume_problem(
    found: Path, config_json: dict, fingerprint: str, out: Path
) -> tuple[dict | None, str | None]:
    """(saved state, None) when the checkpoint ``found`` can be resumed by a run of this config
    (JSON view) on data of this fingerprint, else (None, the reason, naming the run ``out``)."""
    saved_state = json.loads((found / STATE_JSON).read_text())
    saved = saved_state["config"]
    before, now = resumable_view(saved), resumable_view(config_json)
    if before != now:
        diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        return None, (
            f"{out}: checkpoint was written with a different config ({', '.join(diff)}); "
            "use another output directory or start afresh (--restart, resume=False)"
        )
    old = saved_state.get("data_fingerprint")
    if old is not None and old != fingerprint:
        return None, (
            f"{out}: checkpoint was trained on different data (fingerprint {old}, now "
            f"{fingerprint}): the embedding store, the validation split or the prior locations "
            "changed; use another output directory or start afresh (--restart, resume=False)"
        )
    return saved_state, None


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the given modules (``ema`` None: not
    needed in this process) and return the JSON state. Tensors are loaded onto the device each
    module lives on."""
    state = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))

    def section(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(section("model."))
    if ema is not None:
        ema.load_state_dict(section("ema."))
    optim_json = state.pop("optimizer")
    if optimizer is not None:
        slots = {
            int(i): {name: tensors[f"optim.{i}.{name}"] for name in names}
            for i, names in optim_json["slots"].items()
        }
        groups = optim_json["param_groups"]
        for group in groups:
            group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
    return state


def rewrite_metrics(path: Path, up_to_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= up_to_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by the kill
    path.write_text("".join(k + "\n" for k in keep))
