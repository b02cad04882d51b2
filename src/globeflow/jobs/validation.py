"""The ``train`` job's validation pass: loss on a fixed subset of the validation rows, and the
GeoScore and median error of the best guess from a few guided samples."""

from __future__ import annotations

import torch

from globeflow.answers.decode import best_guess
from globeflow.core.families import GeoModel
from globeflow.core.sphere import haversine_km
from globeflow.jobs.distributed import autocast
from globeflow.jobs.metrics import geoscore
from globeflow.jobs.train_config import TrainConfig
from globeflow.jobs.train_data import ValidationRows

__all__ = ["validate"]


@torch.no_grad()
def validate(
    model: GeoModel, val: ValidationRows, config: TrainConfig, precision: str = "fp32"
) -> dict:
    """Mean loss on the first ``val_loss_rows`` validation rows (fixed noise, no condition
    dropout) and the GeoScore / median km of the best guess from a few guided samples on the
    first ``val_geo_rows`` rows."""
    was_training = model.training
    model.eval()
    drop = getattr(model, "cond_drop_prob", None)
    if drop is not None:
        model.cond_drop_prob = 0.0
    try:
        mean_loss = _mean_loss(model, val, config, precision)
        km = _best_guess_km(model, val, config, precision)
    finally:
        if drop is not None:
            model.cond_drop_prob = drop
        model.train(was_training)
    return {
        "val_loss": mean_loss,
        "val_geoscore": float(geoscore(km).mean()),
        "val_median_km": float(km.median()),
    }


def _mean_loss(model: GeoModel, val: ValidationRows, config: TrainConfig, precision: str) -> float:
    """The loss on the first ``val_loss_rows`` rows, in batches, with noise seeded by the run."""
    device = val.x0.device
    n = min(config.val_loss_rows, len(val.x0))
    g = torch.Generator(device=device).manual_seed(config.seed + 1)
    total, count = 0.0, 0
    with autocast(device, precision):
        for i in range(0, n, config.batch_size):
            r = slice(i, min(n, i + config.batch_size))
            total += float(model.loss(val.x0[r], val.emb[r], generator=g)) * (r.stop - i)
            count += r.stop - i
    return total / max(count, 1)


def _best_guess_km(
    model: GeoModel, val: ValidationRows, config: TrainConfig, precision: str
) -> torch.Tensor:
    """(n,) float64 km, on the CPU, from the best guess of guided samples to the true location
    of each of the first ``val_geo_rows`` rows."""
    n = min(config.val_geo_rows, len(val.x0))
    g = torch.Generator(device=val.x0.device).manual_seed(config.seed + 2)
    km = []
    for i in range(0, n, 256):
        r = slice(i, min(n, i + 256))
        samples = model.sample(
            val.emb[r],
            num_samples=config.val_num_samples,
            steps=config.val_sample_steps,
            guidance=config.val_guidance,
            generator=g,
            precision=precision,
        )
        km.append(haversine_km(best_guess(samples).double(), val.latlon[r].double()))
    return torch.cat(km).cpu()
