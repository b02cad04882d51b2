"""The ``train`` job: optimiser, learning-rate schedule, EMA, validation and exact resume, in one
process or many (``torchrun``, DistributedDataParallel).

One step is: take a batch (:mod:`globeflow.jobs.train_data`: rows in memory or streamed from the
store, optionally topped up with unlabelled prior locations under the null condition), compute
the family's loss (each process its share of the batch; DDP averages the gradients), clip, step
AdamW or LAMB, update the EMA (rank 0).

Every ``checkpoint_every`` steps rank 0 writes the whole training state (weights, EMA, optimiser
moments, step counter, validation bookkeeping, data fingerprint) atomically to
``out_dir/checkpoint/``. Random draws are pure functions of (seed, step), so a run killed at any
point and started again reaches bitwise the same final weights as an uninterrupted run; with a
different number of processes it continues from the same step and state.

One job at a time uses a run directory (:mod:`globeflow.jobs.run_lock`). SIGTERM or SIGINT
during the steps saves a checkpoint at the next step boundary and raises
:class:`TrainingStopped` (:mod:`globeflow.jobs.stop_signals`).

Outputs in ``out_dir`` (rank 0): ``best/`` (EMA model with the best validation GeoScore),
``final/`` (EMA model at the last step), ``metrics.jsonl`` (one line per validation),
``train_log.txt``.

This module holds the run loop and the two entry points, :func:`train` (tensors) and
:func:`train_from_embeddings` (an embedding store); the pieces live beside it:
:mod:`~globeflow.jobs.train_config` (config, runtime, model), :mod:`~globeflow.jobs.optim`
(schedule, AdamW/LAMB, EMA), :mod:`~globeflow.jobs.train_step` (one update, the running loss),
:mod:`~globeflow.jobs.validation`, :mod:`~globeflow.jobs.train_data` (batches),
:mod:`~globeflow.jobs.train_inputs` (rows from a store) and
:mod:`~globeflow.jobs.train_checkpoint`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from globeflow.core.checkpoints import save_model
from globeflow.data.coordinates import counts_text
from globeflow.data.embedding_stream import derived_seed
from globeflow.jobs.distributed import Placement, Prefetcher, to_device
from globeflow.jobs.optim import Lamb, ema_decay_at, learning_rate, make_optimizer, update_ema
from globeflow.jobs.run_lock import locked_run_directory
from globeflow.jobs.stop_signals import StopAgreement, StopRequests, TrainingStopped
from globeflow.jobs.train_checkpoint import (
    find_checkpoint,
    load_checkpoint,
    resume_problem,
    rewrite_metrics,
    save_checkpoint,
)
from globeflow.jobs.train_config import FAMILIES, Runtime, TrainConfig, build_model
from globeflow.jobs.train_data import (
    Batch,
    BatchOrder,
    InMemoryRows,
    StreamedRows,
    ValidationRows,
    assemble_batch,
    read_prior_locations,
    run_data_fingerprint,
    split_rows,
    to_unit,
)
from globeflow.jobs.train_data import exclude_authors as without_authors
from globeflow.jobs.train_inputs import (
    TrainInputs,
    ValidationSplit,
    batch_recipe,
    in_memory_inputs,
    streamed_inputs,
    validation_rows,
)
from globeflow.jobs.train_step import LossTally, step_module, train_step
from globeflow.jobs.validation import validate

# The job's public names, most of them defined beside it and importable from here as before.
__all__ = [
    "FAMILIES",
    "BatchOrder",
    "Lamb",
    "Runtime",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "assemble_batch",
    "build_model",
    "ema_decay_at",
    "learning_rate",
    "make_optimizer",
    "read_prior_locations",
    "split_rows",
    "to_unit",
    "train",
    "train_from_embeddings",
    "update_ema",
    "validate",
]

CHECKPOINT_DIR = "checkpoint"
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "train_log.txt"


@dataclass
class TrainResult:
    """Where a finished run put its models, and its last and best validation metrics."""

    out_dir: Path
    final_dir: Path
    best_dir: Path | None
    steps: int
    final_metrics: dict
    best_metrics: dict | None

    def __str__(self) -> str:
        def fmt(m: dict | None) -> str:
            keys = ("val_loss", "val_geoscore", "val_median_km")
            return ", ".join(f"{k}={m[k]:.4g}" for k in keys if (m or {}).get(k) is not None)

        metrics = fmt(self.final_metrics)
        text = f"{self.steps} steps; final model {self.final_dir}"
        text += f" ({metrics})" if metrics else " (not validated)"
        if self.best_dir is not None and self.best_metrics:
            step = self.best_metrics["step"]
            text += f"; best {self.best_dir} (step {step}: {fmt(self.best_metrics)})"
        return text


def _append_log(out: Path, message: str) -> None:
    with open(out / LOG_NAME, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _in_background(fn: Callable, *args) -> Future:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="globeflow")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


class _Run:
    """One training run as seen by one process: model, optimiser, step and bookkeeping; rank 0
    also holds the EMA and writes every output."""

    def __init__(
        self,
        config: TrainConfig,
        data: InMemoryRows | StreamedRows,
        val: ValidationRows | None,
        out: Path,
        place: Placement,
        runtime: Runtime,
        meta: dict,
    ) -> None:
        self.config, self.data, self.out, self.place, self.runtime = (
            config, data, out, place, runtime,
        )  # fmt: skip
        self.main = place.is_main
        self.model = build_model(config, data.dim).to(place.device)
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if self.main else None
        self.optimizer = make_optimizer(self.model, config)
        self.config_json = json.loads(json.dumps(config.to_dict()))
        # Hashing in-memory rows takes ~2 s per GB: done in a thread (hashlib releases the
        # GIL) while training starts; only a checkpoint or a resume needs the result.
        self._fingerprint = _in_background(run_data_fingerprint, data, val, config.prior_latlon)
        self.val = val.to(place.device) if self.main and val is not None else None
        self.has_val = val is not None
        self.meta = {**meta, "training": self.config_json}
        if self.main:
            self.meta["data"] = {
                "train": data.stats(),
                "val": val.stats if val is not None else None,
                "prior_points": self.config_json["prior_points"],
            }
        self.step, self.best, self.best_metrics, self.last_metrics = 0, -math.inf, None, None
        self.tally = LossTally(place)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint.result()

    def say(self, message: str) -> None:
        if self.main:
            _append_log(self.out, message)

    def start(self, resume: bool) -> None:
        """Resume from the checkpoint in the run directory (same config and data, or a clear
        error on every process), or start afresh, removing an earlier run's outputs."""
        found = self.place.broadcast(
            find_checkpoint(self.out / CHECKPOINT_DIR) if self.main and resume else None
        )
        if found is None:
            self._start_afresh()
        else:
            self._resume(found)
        if self.optimizer is None:
            self.step = self.config.max_steps  # nothing to learn (uniform baseline)

    def _start_afresh(self) -> None:
        if self.main:
            (self.out / METRICS_NAME).unlink(missing_ok=True)
            for name in (CHECKPOINT_DIR, "best", "final"):
                shutil.rmtree(self.out / name, ignore_errors=True)
        self.say(f"start {self.config.family}: {json.dumps(self.config_json)}")
        self.say(f"data: {json.dumps(self.meta.get('data'))}")

    def _resume(self, found: Path) -> None:
        out, place = self.out, self.place
        saved, problem = (None, None)
        if self.main:
            saved, problem = resume_problem(found, self.config_json, self.fingerprint, out)
        problem = place.broadcast(problem)
        if problem:
            raise ValueError(problem)
        state = load_checkpoint(found, self.model, self.ema, self.optimizer)
        self.step, self.best = state["step"], state["best_geoscore"]
        self.best_metrics, self.last_metrics = state["best_metrics"], state["last_metrics"]
        self.tally = LossTally(place, state)
        if self.main:
            rewrite_metrics(out / METRICS_NAME, self.step)
            self.say(
                f"resumed from {found} at step {self.step} with {place.world_size} process(es)"
            )
            before = saved["config"]["max_steps"]
            if before != self.config.max_steps:
                self.say(f"max_steps {before} -> {self.config.max_steps}: the cosine decay changes")

    def validation(self) -> None:
        """Rank 0: metrics line, log line and, when the GeoScore improves, the ``best`` model."""
        metrics = {
            "step": self.step,
            "train_loss": self.tally.validation_mean(),
            "lr": learning_rate(max(self.step - 1, 0), self.config),
        }
        if self.val is not None:
            metrics.update(validate(self.ema, self.val, self.config, self.runtime.precision))
        self.last_metrics = metrics
        with open(self.out / METRICS_NAME, "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.say("validation " + json.dumps(metrics))
        if self.val is not None and metrics["val_geoscore"] > self.best:
            self.best, self.best_metrics = metrics["val_geoscore"], metrics
            self.save(self.out / "best", metrics)

    def checkpoint(self, **extra) -> None:
        state = {
            **extra,
            "step": self.step,
            "world_size": self.place.world_size,
            "best_geoscore": self.best,
            "best_metrics": self.best_metrics,
            "last_metrics": self.last_metrics,
            "loss_sum": self.tally.loss_sum,
            "loss_count": self.tally.loss_count,
            "config": self.config_json,
            "data_fingerprint": self.fingerprint,
        }
        save_checkpoint(self.out / CHECKPOINT_DIR, self.model, self.ema, self.optimizer, state)

    def save(self, directory: Path, metrics: dict | None) -> Path:
        return save_model(
            self.ema, directory, {**self.meta, "validation": metrics, "step": self.step}
        )

    def train(self, progress: bool) -> TrainResult:
        """Steps up to ``max_steps``, then the final model; every process returns the result."""
        config, place = self.config, self.place
        trainer = step_module(self.model, place, self.runtime, self.optimizer is not None)
        more = self.step < config.max_steps
        batches = _batch_feed(self.data, self.step, place, self.runtime) if more else iter(())
        bar = _progress_bar(config.max_steps, self.step, progress and self.main)
        rng_devices = [place.device] if place.device.type == "cuda" else []
        # fork_rng: the caller's global RNG state is left as it was.
        with torch.random.fork_rng(devices=rng_devices), StopRequests() as requests:
            stops = StopAgreement(requests, place.distributed)
            try:
                while self.step < config.max_steps:
                    self.one_step(trainer, next(batches), bar)
                    signum = stops.check()
                    if signum and self.step < config.max_steps:
                        stops.close()
                        self.stop(signum)
                stops.close()
                final_dir = self.out / "final"
                if self.main:
                    if self.last_metrics is None or self.last_metrics["step"] != self.step:
                        self.validation()  # nothing to train, or resumed after the last step
                    self.save(final_dir, self.last_metrics)
                    self.say(f"done at step {self.step}; final model in {final_dir}")
            finally:
                if isinstance(batches, Prefetcher):
                    batches.close()
                bar.close()
        place.barrier()  # the other processes return once rank 0 has written the final model
        best = self.out / "best"
        best_dir = best if self.has_val and best.is_dir() else None
        metrics = self.last_metrics or {}
        return TrainResult(self.out, final_dir, best_dir, self.step, metrics, self.best_metrics)

    def stop(self, signum: int) -> None:
        """Every process, on a stop signal at a step boundary: checkpoint, then raise
        :class:`TrainingStopped`."""
        unsynced = self.tally.unsynced()
        if self.main:
            if self.step % self.config.checkpoint_every:
                self.checkpoint(**unsynced)
            self.say(f"stopped by signal {signum} at step {self.step}")
        self.place.barrier()  # no process leaves before the checkpoint is written
        raise TrainingStopped(signum, self.step, self.out / CHECKPOINT_DIR)

    def one_step(self, trainer: nn.Module, batch: Batch, bar) -> None:
        """One optimiser update, the EMA, and the bookkeeping due after it."""
        config = self.config
        lr = learning_rate(self.step, config)
        if config.dropout > 0:  # the global RNG feeds dropout only
            torch.manual_seed(derived_seed(config.seed, "dropout", self.step, self.place.rank))
        weighted, grad_norm = train_step(
            trainer, self.optimizer, batch, lr, config, self.runtime.precision
        )
        if self.ema is not None:
            update_ema(self.ema, self.model, ema_decay_at(self.step, config.ema_decay))
        self.step += 1
        self.tally.add(weighted)
        at_log = self.step % config.log_every == 0
        at_val = self.step % config.val_every == 0 or self.step == config.max_steps
        at_ckpt = self.step % config.checkpoint_every == 0 or self.step == config.max_steps
        if at_log or at_val or at_ckpt:
            self.tally.sync(self.step)  # every process, at the same steps
        if not self.main:
            return
        if at_log:
            norm = None if grad_norm is None else float(grad_norm)
            shown = self.tally.window_mean()
            self.say(f"step {self.step} loss {shown:.5f} lr {lr:.3e} grad_norm {norm}")
            bar.set_postfix({"loss": f"{shown:.4f}", "lr": f"{lr:.2e}"}, refresh=False)
        if at_val:
            self.validation()
        if at_ckpt:
            self.checkpoint()
        bar.update(1)


def _batch_feed(data, start_step: int, place: Placement, runtime: Runtime):
    """Batches from ``start_step`` on, on the device: prepared in a background thread when
    streaming or on CUDA (unless ``runtime.prefetch`` says otherwise), else inline."""
    batches = data.batches(start_step, place)
    prefetch = runtime.prefetch
    if prefetch is None:
        prefetch = isinstance(data, StreamedRows) or place.device.type == "cuda"
    if prefetch:
        return Prefetcher(batches, place.device)
    if place.device.type == "cpu":
        return batches
    return (to_device(b, place.device) for b in batches)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        dynamic_ncols=True,
        desc="train",
        unit="step",
        file=sys.stderr,
    )


def train(
    config: TrainConfig,
    train_emb: torch.Tensor,
    train_latlon: torch.Tensor,
    val_emb: torch.Tensor | None,
    val_latlon: torch.Tensor | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    resume: bool = True,
    encoder: str | None = None,
    metadata: dict | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train ``config.family`` on embeddings (N, D) with coordinates (N, 2) in degrees.

    With ``resume`` and a checkpoint in ``out_dir``, training continues exactly where it
    stopped (the config and data must match, except max_steps and the bookkeeping intervals).
    Without a validation set (``val_emb`` None or empty) no ``best/`` model is kept. Under
    ``torchrun`` every process calls this with the same arguments.
    """
    runtime = runtime or Runtime()
    with locked_run_directory(out_dir, runtime.device) as (out, place):
        data = InMemoryRows(train_emb, train_latlon, batch_recipe(config))
        val = None
        if val_emb is not None and val_latlon is not None:
            val = validation_rows(val_emb, val_latlon, config)
        run = _Run(config, data, val, out, place, runtime, {"encoder": encoder, **(metadata or {})})
        run.start(resume)
        return run.train(progress)


def _on_main(place: Placement, work: Callable[[], object]):
    """Run ``work`` on rank 0 and hand its result (or its error) to every process."""
    outcome = None
    if place.is_main:
        try:
            outcome = ("ok", work())
        except (ValueError, OSError) as exc:
            outcome = ("error", str(exc))
    outcome = place.broadcast(outcome)
    if outcome[0] == "error":
        raise ValueError(outcome[1])
    return outcome[1]


def train_from_embeddings(
    embeddings_path: str | os.PathLike,
    family: str,
    out_dir: str | os.PathLike,
    val_split: str | float = "author",
    val_fraction: float = 0.15,
    prior_locations: str | os.PathLike | None = None,
    prior_fraction: float = 0.25,
    progress: bool = True,
    resume: bool = True,
    exclude_authors: str | os.PathLike | None = None,
    stream: bool = False,
    shuffle_buffer_rows: int = 65536,
    runtime: Runtime | None = None,
    **overrides,
) -> TrainResult:
    """The ``globeflow train`` job: read an embedding store, split it, train (under ``torchrun``
    on every process).

    ``val_split``: "author" (author-grouped split of ``val_fraction`` of the authors, or a random
    split when the store has no authors), a fraction (random split), or the path of a second
    embedding store used as the validation set. ``prior_locations``: CSV of extra unlabelled
    locations mixed into each batch (``prior_fraction``) under the null condition.
    ``exclude_authors``: text file of authors whose rows are left out (a filtered copy of the
    store is kept in the run directory and rebuilt when its inputs change). ``stream``: read the
    store row group by row group through a shuffle buffer of ``shuffle_buffer_rows`` rows instead
    of loading it (stores larger than memory; validation is then a set of held-out row groups
    unless ``val_split`` names a store). ``overrides``: any :class:`TrainConfig` field.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"family", "prior_latlon"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    split = ValidationSplit.parse(val_split, val_fraction)
    if shuffle_buffer_rows < 1:
        raise ValueError(f"--shuffle-buffer-rows must be >= 1, got {shuffle_buffer_rows}")
    runtime = runtime or Runtime()
    with locked_run_directory(out_dir, runtime.device) as (out, place):

        def say(message: str) -> None:
            if place.is_main:
                print(message, file=sys.stderr)
                _append_log(out, message)

        config = _job_config(family, prior_locations, prior_fraction, overrides, say)
        store = Path(embeddings_path)
        if exclude_authors is not None:
            copy_path = out / "train-embeddings.parquet"
            store = _on_main(place, lambda: without_authors(store, exclude_authors, copy_path, say))
        if stream:
            inputs = streamed_inputs(store, split, config, shuffle_buffer_rows, say)
        else:
            inputs = in_memory_inputs(store, split, config, say)
        _describe_inputs(store, inputs, place, say)
        meta = {
            "encoder": inputs.encoder,
            "embeddings": str(embeddings_path),
            "validation_split": inputs.how,
        }
        run = _Run(config, inputs.data, inputs.val, out, place, runtime, meta)
        run.start(resume)
        return run.train(progress)


def _job_config(
    family: str,
    prior_locations: str | os.PathLike | None,
    prior_fraction: float,
    overrides: dict,
    say: Callable[[str], None],
) -> TrainConfig:
    """The run's config, with the prior locations read from their CSV (if any)."""
    prior = None
    if prior_locations is not None:
        prior = read_prior_locations(prior_locations)
        say(f"prior: {len(prior)} locations from {prior_locations}, fraction {prior_fraction}")
    return TrainConfig(
        family=family,
        prior_latlon=prior,
        prior_fraction=prior_fraction if prior is not None else 0.0,
        **overrides,
    )


def _describe_inputs(
    store: Path, inputs: TrainInputs, place: Placement, say: Callable[[str], None]
) -> None:
    """Say what the run learns from; refuse a run with no validation rows."""
    data, val = inputs.data, inputs.val
    if val is None:  # never train without a validation the user did not ask to skip
        raise ValueError(f"{store}: no validation rows with coordinates ({inputs.how})")
    rows = data.stats()["rows"] if place.is_main else 0
    if place.is_main and data.stats().get("dropped"):  # streamed: read past, not dropped
        say(f"{store}: rows left out: {counts_text(data.stats()['dropped'])}")
    say(f"train {rows} rows, validation {len(val.x0) if val else 0} rows used ({inputs.how})")
