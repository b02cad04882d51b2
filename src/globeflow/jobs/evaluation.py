"""The ``evaluate`` job: run a model over a benchmark and report every metric of the paper.

Per image: best guess (from ``num_samples`` guided samples), error, GeoScore, log density of the
truth (guidance 0), NLL in bits per dimension, localizability, probability mass denser than the
truth (HPD calibration), one unguided model sample, and administrative places of prediction and
truth. The summary aggregates them; :func:`summary_from_predictions_csv` recomputes it from the
written CSV alone, which is how the numbers in ``summary.json`` are audited.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from globeflow.answers.decode import best_guess
from globeflow.answers.draw import draw_answers, localizability_estimator, localizability_precision
from globeflow.answers.geocode import country_name, reverse_geocode
from globeflow.core.random_streams import sample_streams
from globeflow.core.sampler_settings import (
    EVALUATE_BATCH_SIZE,
    SamplerSettings,
    resolve,
    solver_for,
)
from globeflow.data.datasets import Dataset, GeoRecord, load_record_image, open_dataset
from globeflow.data.file_names import printable, printable_tree
from globeflow.jobs import metrics as M
from globeflow.jobs.distributed import Placement, join_process_group, leave_process_group
from globeflow.jobs.evaluation_rows import PREDICTION_COLUMNS, evaluate_rows
from globeflow.jobs.locate import model_fingerprint

__all__ = [
    "EvaluationReport",
    "evaluate",
    "summarize",
    "summary_from_predictions_csv",
    "summary_from_table",
    "PREDICTION_COLUMNS",
]

_LN2 = math.log(2.0)


@dataclass
class EvaluationReport:
    """Result of :func:`evaluate`: per-image rows, summary metrics, calibration curve, errors."""

    table: pa.Table
    """One row per image (columns: ``index`` in the dataset, then :data:`PREDICTION_COLUMNS`)."""
    summary: dict[str, Any]
    reliability: M.ReliabilityCurve
    settings: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The per-image rows as dicts (small evaluations; large ones read :attr:`table`)."""
        return self.table.to_pylist()

    def to_dict(self) -> dict[str, Any]:
        """summary.json content: the metrics at top level plus settings, reliability, errors."""
        out = _json_clean(dict(self.summary))
        out["settings"] = _json_clean(self.settings)
        out["reliability"] = _json_clean(self.reliability.to_dict())
        out["errors"] = printable_tree(list(self.errors))
        out["skipped"] = dict(self.skipped)
        out["skipped_rows"] = [
            {"id": row, "reason": why} for row, why in getattr(self.skipped, "rows", [])
        ]
        return out

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write predictions.csv, summary.json, summary.md and reliability.png into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "predictions": out / "predictions.csv",
            "summary_json": out / "summary.json",
            "summary_md": out / "summary.md",
            "reliability": out / "reliability.png",
        }
        with open(paths["predictions"], "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(PREDICTION_COLUMNS))
            w.writeheader()
            for batch in self.table.to_batches(max_chunksize=4096):
                for row in batch.to_pylist():  # file names not UTF-8: \xNN (data.file_names)
                    w.writerow(
                        {k: _csv_value(printable_tree(row.get(k))) for k in PREDICTION_COLUMNS}
                    )
        paths["summary_json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["summary_md"].write_text(self.to_markdown())
        M.plot_reliability(self.reliability, paths["reliability"])
        return paths

    def to_markdown(self) -> str:
        """The summary as a markdown table."""
        lines = ["# Evaluation summary", "", "| metric | value |", "|---|---|"]
        for key, value in self.summary.items():
            lines.append(f"| {_metric_label(key)} | {_fmt(value)} |")
        if self.settings:
            lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in self.settings.items()]
        if self.skipped:
            lines += [
                "",
                f"Left out by the dataset reader: {_skipped_text(self.skipped)} (row by row in "
                "summary.json, skipped_rows).",
            ]
        if self.errors:
            lines += ["", f"{len(self.errors)} image(s) could not be evaluated (see summary.json)."]
        return "\n".join(lines) + "\n"

    def why_empty(self) -> str:
        """Why no record was evaluated, in one line: records skipped by reason, and failures."""
        parts = [_skipped_text(self.skipped)] if self.skipped else []
        if self.errors:
            first = self.errors[0]
            parts.append(
                printable(
                    f"{len(self.errors)} could not be read, first {first['path']}: {first['error']}"
                )
            )
        return "; ".join(parts) or "the dataset holds no records"


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} skipped ({reason})" for reason, n in skipped.items())


_METRIC_LABELS = {
    "n": "images",
    "mean_km": "mean error (km)",
    "median_km": "median error (km)",
    "geoscore": "GeoScore",
    "country_acc": "country accuracy (%)",
    "region_acc": "region accuracy (%)",
    "city_acc": "city accuracy (%)",
    "nll_bpd": "NLL (bits/dim)",
    "localizability_bits": "localizability (bits)",
    "hpd50_coverage": "truth in 50% HPD region",
    "hpd90_coverage": "truth in 90% HPD region",
}


def _metric_label(key: str) -> str:
    if key.startswith("acc@"):  # accuracy within a distance, in percent
        return f"{key} (%)"
    return _METRIC_LABELS.get(key, key)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e3 else f"{v:.1f}"
    return str(v)


def _csv_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v  # floats are written with repr: they read back bit-identical


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_clean(obj.item())
    return obj


# ---- summary -------------------------------------------------------------------------------


def summarize(
    true_latlon: np.ndarray,
    pred_latlon: np.ndarray,
    log_prob: np.ndarray,
    localizability: np.ndarray,
    mass: np.ndarray,
    sample_latlon: np.ndarray,
    pred_places: Sequence[dict[str, Any]],
    true_places: Sequence[dict[str, Any]],
    thresholds_km: Sequence[float] = M.DEFAULT_THRESHOLDS_KM,
    k: int = 3,
) -> dict[str, Any]:
    """All summary metrics from per-image arrays (N rows; NaN marks a value not computed).

    Args:
        true_latlon, pred_latlon, sample_latlon: (N, 2) degrees.
        log_prob: (N,) natural log density of the truth. localizability: (N,) bits.
        mass: (N,) probability mass denser than the truth (see :func:`metrics.hpd_mass`).
        pred_places, true_places: N dicts with country / country_code / region / city.
    """
    out: dict[str, Any] = M.distance_metrics(pred_latlon, true_latlon, thresholds_km)
    adm = M.admin_accuracy(pred_places, true_places)
    out.update({key: adm[key] for key in ("country_acc", "region_acc", "city_acc")})

    def finite(x: np.ndarray) -> np.ndarray:
        return x[np.isfinite(x)]

    out["nll_bpd"] = M.nll_bits_per_dim(finite(log_prob))
    loc = finite(localizability)
    out["localizability_bits"] = float(loc.mean()) if loc.size else math.nan
    n = true_latlon.shape[0]
    keys = ("precision", "recall", "density", "coverage")
    if n > k:
        out.update(M.prdc(true_latlon, pred_latlon, k=k))
    else:
        out.update({key: math.nan for key in keys})
    ok = np.isfinite(sample_latlon).all(axis=1)
    if ok.sum() > k:
        got = M.prdc(true_latlon[ok], sample_latlon[ok], k=k)
        out.update({f"sample_{key}": v for key, v in got.items()})
    else:
        out.update({f"sample_{key}": math.nan for key in keys})
    m = finite(mass)
    cov = M._coverage_from_mass(m, (0.5, 0.9))
    out["hpd50_coverage"] = float(cov[0])
    out["hpd90_coverage"] = float(cov[1])
    out["calibration_error"] = M.reliability_curve_from_mass(m).calibration_error
    return out


def _read_float(s: str) -> float:
    return float(s) if s not in ("", None) else math.nan


def summary_from_predictions_csv(
    path: str | Path, thresholds_km: Sequence[float] = M.DEFAULT_THRESHOLDS_KM, k: int = 3
) -> dict[str, Any]:
    """Recompute the summary metrics from ``predictions.csv`` alone (distances from the written
    coordinates, not from the error column). NaN values are returned as None, as in
    summary.json."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def col(name: str) -> np.ndarray:
        return np.array([_read_float(r[name]) for r in rows], dtype=np.float64)

    return _json_clean(
        _summary_of_columns(col, lambda name: [r[name] for r in rows], thresholds_km, k)
    )


def summary_from_table(
    table: pa.Table, thresholds_km: Sequence[float] = M.DEFAULT_THRESHOLDS_KM, k: int = 3
) -> dict[str, Any]:
    """The summary metrics from the per-image rows (:attr:`EvaluationReport.table`)."""

    def col(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    def text(name: str) -> list[str]:
        return [v or "" for v in table.column(name).to_pylist()]

    return _summary_of_columns(col, text, thresholds_km, k)


def _summary_of_columns(col, text, thresholds_km: Sequence[float], k: int) -> dict[str, Any]:
    """:func:`summarize` on the prediction columns given by ``col(name)`` (float64 arrays, NaN
    for missing) and ``text(name)`` (strings)."""

    def latlon(prefix: str) -> np.ndarray:
        return np.stack([col(f"{prefix}_lat"), col(f"{prefix}_lon")], 1).reshape(-1, 2)

    def places(prefix: str) -> list[dict[str, str]]:
        keys = ("country", "country_code", "region", "city")
        columns = [text(f"{prefix}_{key}") for key in keys]
        return [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]

    return summarize(
        latlon("true"),
        latlon("pred"),
        col("log_prob"),
        col("localizability"),
        col("hpd_mass"),
        latlon("sample"),
        places("pred"),
        places("true"),
        thresholds_km,
        k,
    )


# ---- model plumbing ------------------------------------------------------------------------


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _to_tensor(x: Any, device: torch.device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=torch.float32)


def _records(data: Any) -> tuple[Iterable[GeoRecord], Dataset | None]:
    if isinstance(data, (str, Path)):
        ds = open_dataset(data)
        return ds, ds
    if isinstance(data, Dataset):
        return data, data
    if hasattr(data, "embeddings") and hasattr(data, "latlon"):
        embs = np.asarray(data.embeddings)
        ll = np.asarray(data.latlon, dtype=np.float64)
        ids = getattr(data, "ids", None)
        paths = getattr(data, "paths", None)
        recs = [
            GeoRecord(
                id=str(ids[i]) if ids is not None else str(i),
                lat=float(ll[i, 0]),
                lon=float(ll[i, 1]),
                path=str(paths[i]) if paths is not None and paths[i] is not None else None,
                embedding=embs[i],
            )
            for i in range(len(ll))
        ]
        return recs, None
    return data, None


def _embed_records(
    batch: list[GeoRecord], encoder: Any, errors: list[dict[str, str]]
) -> tuple[list[GeoRecord], torch.Tensor] | None:
    """The records of ``batch`` that could be embedded and their embeddings (B, D); records
    whose image cannot be read go to ``errors``; None when no record is left."""
    if all(r.embedding is not None for r in batch):
        return batch, torch.as_tensor(np.stack([np.asarray(r.embedding) for r in batch]))
    if encoder is None:
        raise ValueError(
            f"record {batch[0].id!r} has no precomputed embedding: pass an encoder to embed images"
        )
    kept, images = [], []
    for r in batch:
        try:
            images.append(load_record_image(r))
            kept.append(r)
        except Exception as exc:  # noqa: BLE001 - a bad image is reported, not fatal
            errors.append(
                {"id": r.id, "path": r.path or "", "error": f"{type(exc).__name__}: {exc}"}
            )
    if not kept:
        return None
    emb = encoder.embed(images)
    return kept, emb if isinstance(emb, torch.Tensor) else torch.as_tensor(np.asarray(emb))


def _has_admin_labels(record: GeoRecord) -> bool:
    labels = record.labels()
    return labels is not None and bool(labels["country"] or labels["region"] or labels["city"])


def _true_place(record: GeoRecord) -> dict[str, str]:
    """The dataset's own labels as a place (country may be an ISO code or a name)."""
    labels = record.labels() or {}
    country = labels.get("country", "")
    code = M._country_key(labels).upper()
    if len(code) != 2:
        code = ""
    return {
        "country": country_name(code) if len(country) == 2 else country,
        "country_code": code,
        "region": labels.get("region", ""),
        "city": labels.get("city", ""),
    }


def _place_dict(place: Any) -> dict[str, str]:
    d = place.to_dict()
    return {k: d.get(k, "") for k in ("country", "country_code", "region", "city")}


# ---- the job -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: Any,
    records_or_embeddings: Any,
    *,
    encoder: Any = None,
    num_samples: int | None = None,
    guidance: float | None = None,
    steps: int | None = None,
    sampler: SamplerSettings | None = None,
    density_guidance: float = 0.0,
    hpd_samples: int | None = None,
    localizability_samples: int | None = None,
    batch_size: int = EVALUATE_BATCH_SIZE,
    seed: int = 0,
    limit: int | None = None,
    thresholds_km: Sequence[float] = M.DEFAULT_THRESHOLDS_KM,
    prdc_k: int = 3,
    progress: bool = True,
    model_name: str | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    place: Placement | None = None,
) -> EvaluationReport:
    """Evaluate ``model`` on a dataset and compute every metric of the paper.

    Args:
        model: a GeoModel-like object with ``sample``, ``log_prob`` and ``localizability``.
        records_or_embeddings: a dataset path (see :func:`datasets.open_dataset`), a
            :class:`datasets.Dataset` or iterable of :class:`datasets.GeoRecord`, or an object
            with ``embeddings`` (N, D), ``latlon`` (N, 2) and optional ``ids`` / ``paths``.
        encoder: object with ``embed(list of PIL images) -> (B, D)``; needed for records
            without precomputed embeddings.
        num_samples: samples per image for the best guess, drawn with ``guidance`` (default:
            the sampler's).
        guidance: classifier-free guidance scale for location prediction (default: the
            model's recommended one, :func:`~globeflow.core.sampler_settings.
            recommended_guidance`).
        steps: sampler steps (default: the sampler's).
        sampler: the sampling recipe (solver, grid, precision; default: ``predict``'s, the
            model's own :func:`~globeflow.core.sampler_settings.model_recipe`, so the accuracy
            measured is that of the answers users get).
        density_guidance: guidance of the distribution used for calibration and the unguided
            sample columns (paper: 0). Non-zero needs a model whose ``log_prob`` takes
            ``guidance``. NLL is always the guidance-0 density of the truth.
        hpd_samples: samples per image whose densities estimate HPD coverage (default: the
            sampler's ``localizability_samples``; 0 disables it).
        localizability_samples: samples of the localizability estimate (default: the
            sampler's; 0: none). It is drawn exactly as ``predict`` draws it
            (:func:`globeflow.answers.draw.draw_answers`: same recipe, same per-photo stream),
            so a photo's localizability here is the one ``predict`` reports for it.
        batch_size: images per model call.
        seed: seed of the sampling generators: each image draws from its own, seeded by (seed,
            its id), so its row does not depend on the other images of its batch.
        limit: evaluate at most this many records.
        thresholds_km: accuracy thresholds in km.
        prdc_k: neighbourhood size of precision / recall / density / coverage.
        progress: show a progress bar on stderr.
        model_name: how the report names the model (its path or hub id; default: its class).
        output: the report folder: per-image rows are written to ``output/rows`` as they come
            (memory bounded; a rerun resumes, other settings are refused unless ``overwrite``)
            and the summary is computed from the stored rows. None: rows kept in memory.
        overwrite: replace rows made with other settings in ``output``.
        place: this process's place in a ``torchrun`` job (default: from the environment when
            ``output`` is given; each process evaluates its share of the batches).

    Returns:
        An :class:`EvaluationReport`; call ``.write(out_dir)`` for the files.
    """
    started = time.time()
    recipe = resolve(model, sampler, num_samples=num_samples, steps=steps, guidance=guidance)
    num_samples, steps, guidance = recipe.num_samples, recipe.steps, recipe.guidance
    if hpd_samples is None:
        hpd_samples = recipe.localizability_samples
    # The recipe goes to models with solvers; the others (baselines, stand-ins) take no options.
    how = {"settings": recipe} if solver_for(model, recipe.solver) is not None else {}
    shown = {k: getattr(recipe, k) if how else None for k in ("solver", "grid", "precision")}
    device = _model_device(model)
    records, dataset = _records(records_or_embeddings)
    listed = records
    if limit is not None:
        records = _take(records, limit)
    if density_guidance != 0.0 and not _accepts(model.log_prob, "guidance"):
        raise ValueError(
            "density_guidance != 0 needs model.log_prob(..., guidance=w); this model's log_prob "
            "scores only the unguided density"
        )
    settings = {
        "model": model_name or type(model).__name__,
        "encoder": None if encoder is None else getattr(encoder, "name", type(encoder).__name__),
        "dataset": str(dataset.path) if dataset is not None else None,
        "dataset_kind": dataset.kind if dataset is not None else None,
        "num_samples": num_samples,
        "guidance": guidance,
        "steps": steps,
        **shown,
        "density_guidance": density_guidance,
        "hpd_samples": hpd_samples,
        "localizability_samples": localizability_samples,
        "localizability_steps": recipe.localizability_steps,
        "localizability_solver": recipe.localizability_solver,
        "localizability_precision": localizability_precision(model, recipe),
        "localizability_estimator": localizability_estimator(model, recipe),
        "batch_size": batch_size,
        "seed": seed,
        "prdc_k": prdc_k,
    }
    errors: list[dict[str, str]] = []
    # The answer's samples and the localizability are drawn as predict draws them (one recipe,
    # answers.draw), from the same per-photo streams: a photo's localizability is predict's.
    if localizability_samples is not None:
        recipe = dataclasses.replace(recipe, localizability_samples=localizability_samples)
    options = dict(recipe=recipe, steps=steps, density_guidance=density_guidance,
                   hpd_samples=hpd_samples, how=how)  # fmt: skip
    own = place is None and output is not None
    if own:
        place = join_process_group("cpu")  # gloo: only barriers and small objects
    try:
        # The batch is how the work is cut, not what the rows are: a resumed evaluation may
        # take another --batch-size (each image's rows come from its own random stream).
        fingerprint = {k: v for k, v in settings.items() if k != "batch_size"}
        fingerprint["limit"] = limit
        if output is not None:
            fingerprint["model_weights"] = model_fingerprint(model)
        legacy = {**fingerprint, "batch_size": batch_size}  # as earlier versions recorded it
        shown = progress and (place is None or place.is_main)
        bar = _PhotoProgress(shown, listed, dataset, limit)
        table = evaluate_rows(
            records, lambda batch: _embed_records(batch, encoder, errors),
            lambda indexed, emb, gens: _batch_rows(model, indexed, emb, gens, device, **options),
            batch_size=batch_size, seed=seed, device=device, settings=fingerprint,
            output=output, overwrite=overwrite, place=place, progress=bar, legacy=[legacy],
        )  # fmt: skip
        if place is not None and place.distributed:
            errors = [e for rank_errors in place.gather(errors) for e in rank_errors]
    finally:
        if own:
            leave_process_group(place)
    summary = summary_from_table(table, thresholds_km, prdc_k)
    summary["n_errors"] = len(errors)
    settings["seconds"] = round(time.time() - started, 3)
    mass = table.column("hpd_mass").to_numpy(zero_copy_only=False).astype(np.float64)
    return EvaluationReport(
        table=table,
        summary=summary,
        reliability=M.reliability_curve_from_mass(mass[np.isfinite(mass)]),
        settings=settings,
        errors=errors,
        skipped=dataset.skipped if dataset is not None else {},
    )


class _PhotoProgress:
    """A progress bar in photos on stderr: photos taken from the dataset (evaluated or failed,
    and without ``limit`` also those its reader left out), out of the dataset's size when
    known (``limit`` caps it). ``update(n)`` / ``close()`` as tqdm's."""

    def __init__(
        self, enabled: bool, records: Any, dataset: Dataset | None, limit: int | None
    ) -> None:
        self.bar, self.dataset, self.limit, self.taken = None, dataset, limit, 0
        if not enabled:
            return
        size = dataset.size if dataset is not None else getattr(records, "__len__", None)
        size = size() if callable(size) else size
        total = min(size, limit) if size is not None and limit is not None else size or limit
        self.bar = tqdm(total=total, desc="evaluate", unit="photo")

    def update(self, count: int) -> None:
        """``count`` more photos taken (plus those the reader skipped so far)."""
        self.taken += count
        if self.bar is None:
            return
        shown = self.taken
        if self.dataset is not None and self.limit is None:
            shown += sum(self.dataset.skipped.values())
        self.bar.update(shown - self.bar.n)

    def close(self) -> None:
        self.update(0)
        if self.bar is not None:
            self.bar.close()


def _batch_rows(
    model: Any,
    indexed: list[tuple[int, GeoRecord]],
    emb: torch.Tensor,
    generators: list[torch.Generator],
    device: torch.device,
    *,
    recipe: Any,
    steps: int,
    density_guidance: float,
    hpd_samples: int,
    how: dict,
) -> list[dict[str, Any]]:
    """The rows of one batch of (dataset index, record) with embeddings (B, D), each image's
    samples drawn from its generator: the answer's and the localizability's as predict draws
    them (:func:`globeflow.answers.draw.draw_answers`), then the HPD samples."""
    emb = _to_tensor(emb, device)
    batch = [r for _, r in indexed]
    b = emb.shape[0]
    truth = torch.tensor([[r.lat, r.lon] for r in batch], dtype=torch.float32, device=device)
    samples, loc, _, _ = draw_answers(model, emb, generators, recipe)
    pred = torch.stack([best_guess(x) for x in samples]).reshape(b, 2)  # alone: batch-free
    lp = model.log_prob(truth[:, None, :], emb).reshape(b)
    mass = torch.full((b,), math.nan, dtype=torch.float64)
    sample0 = torch.full((b, 2), math.nan, dtype=torch.float64)
    if hpd_samples > 0:
        s = sample_streams(model, emb, generators, hpd_samples, steps=steps,
                           guidance=density_guidance, **how)  # fmt: skip
        kw = {"guidance": density_guidance} if density_guidance != 0.0 else {}
        lp_s = model.log_prob(s, emb, **kw).reshape(b, hpd_samples).double()
        lp_t = model.log_prob(truth[:, None, :], emb, **kw).reshape(b) if kw else lp
        mass = torch.from_numpy(M.hpd_mass(lp_t.double(), lp_s))
        sample0 = s[:, 0, :].double().cpu()
    true_ll, pred_ll = truth.double().cpu().numpy(), pred.double().cpu().numpy()
    sample_ll, lp = sample0.numpy(), lp.double().cpu().numpy()
    loc, mass = torch.as_tensor(loc).double().reshape(b).cpu().numpy(), mass.numpy()
    pred_places = [_place_dict(p) for p in reverse_geocode(pred_ll)]
    labelled = [_has_admin_labels(r) for r in batch]
    need = [i for i, has in enumerate(labelled) if not has]
    geocoded = dict(zip(need, reverse_geocode(true_ll[need]), strict=True)) if need else {}
    err = M.haversine_km_np(pred_ll, true_ll)
    rows: list[dict[str, Any]] = []
    for i, (index, r) in enumerate(indexed):
        true_place = _true_place(r) if labelled[i] else _place_dict(geocoded[i])
        row: dict[str, Any] = {
            "index": index,
            "id": printable(r.id),  # file names that are not UTF-8: \xNN (data.file_names)
            "path": printable(r.path or ""),
            "true_lat": float(true_ll[i, 0]),
            "true_lon": float(true_ll[i, 1]),
            "pred_lat": float(pred_ll[i, 0]),
            "pred_lon": float(pred_ll[i, 1]),
            "error_km": float(err[i]),
            "geoscore": float(M.geoscore(err[i])),
            "log_prob": float(lp[i]),
            "nll_bpd": float(-lp[i] / _LN2 / 3.0),
            "localizability": float(loc[i]),
            "hpd_mass": float(mass[i]),
            "in_hpd50": bool(mass[i] <= 0.5) if np.isfinite(mass[i]) else None,
            "in_hpd90": bool(mass[i] <= 0.9) if np.isfinite(mass[i]) else None,
            "sample_lat": float(sample_ll[i, 0]),
            "sample_lon": float(sample_ll[i, 1]),
        }
        row.update({f"pred_{k}": v for k, v in pred_places[i].items()})
        row.update({f"true_{k}": v for k, v in true_place.items()})
        rows.append(row)
    return rows


def _take(records: Iterable[GeoRecord], limit: int) -> Iterator[GeoRecord]:
    for i, r in enumerate(records):
        if i >= limit:
            return
        yield r
