"""The ``evaluate`` job: run a model over a benchmark and report every metric of the paper.

Per image: best guess (from ``num_samples`` guided samples), error, GeoScore, log density of the
truth (guidance 0), NLL in bits per dimension, localizability, probability mass denser than the
truth (HPD calibration), one unguided model sample, and administrative places of prediction and
truth. The summary aggregates them; :func:`summary_from_predictions_csv` recomputes it from the
written CSV alone, which is how the numbers in ``summary.json`` are audited.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from globeflow.answers.decode import best_guess
from globeflow.core.sampler_settings import DEFAULT_SAMPLER, SamplerSettings, sampling_arguments
from globeflow.data.datasets import Dataset, GeoRecord, load_record_image, open_dataset
from globeflow.jobs import metrics as M

__all__ = [
    "EvaluationReport",
    "evaluate",
    "summarize",
    "summary_from_predictions_csv",
    "PREDICTION_COLUMNS",
]

PREDICTION_COLUMNS = (
    "id",
    "path",
    "true_lat",
    "true_lon",
    "pred_lat",
    "pred_lon",
    "error_km",
    "geoscore",
    "log_prob",
    "nll_bpd",
    "localizability",
    "hpd_mass",
    "in_hpd50",
    "in_hpd90",
    "sample_lat",
    "sample_lon",
    "pred_country",
    "pred_country_code",
    "pred_region",
    "pred_city",
    "true_country",
    "true_country_code",
    "true_region",
    "true_city",
)

_LN2 = math.log(2.0)


@dataclass
class EvaluationReport:
    """Result of :func:`evaluate`: per-image rows, summary metrics, calibration curve, errors."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    reliability: M.ReliabilityCurve
    settings: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """summary.json content: the metrics at top level plus settings, reliability, errors."""
        out = _json_clean(dict(self.summary))
        out["settings"] = _json_clean(self.settings)
        out["reliability"] = _json_clean(self.reliability.to_dict())
        out["errors"] = list(self.errors)
        out["skipped"] = dict(self.skipped)
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
            for row in self.rows:
                w.writerow({k: _csv_value(row.get(k)) for k in PREDICTION_COLUMNS})
        paths["summary_json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["summary_md"].write_text(self.to_markdown())
        M.plot_reliability(self.reliability, paths["reliability"])
        return paths

    def to_markdown(self) -> str:
        """The summary as a markdown table."""
        lines = ["# Evaluation summary", "", "| metric | value |", "|---|---|"]
        for key, value in self.summary.items():
            lines.append(f"| {_METRIC_LABELS.get(key, key)} | {_fmt(value)} |")
        if self.settings:
            lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in self.settings.items()]
        if self.skipped:
            lines += ["", f"Left out by the dataset reader: {_skipped_text(self.skipped)}."]
        if self.errors:
            lines += ["", f"{len(self.errors)} image(s) could not be evaluated (see summary.json)."]
        return "\n".join(lines) + "\n"

    def why_empty(self) -> str:
        """Why no record was evaluated, in one line: records skipped by reason, and failures."""
        parts = [_skipped_text(self.skipped)] if self.skipped else []
        if self.errors:
            first = self.errors[0]
            parts.append(
                f"{len(self.errors)} could not be read, first {first['path']}: {first['error']}"
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

    def latlon(prefix: str) -> np.ndarray:
        return np.stack([col(f"{prefix}_lat"), col(f"{prefix}_lon")], 1).reshape(-1, 2)

    def places(prefix: str) -> list[dict[str, str]]:
        return [
            {
                "country": r[f"{prefix}_country"],
                "country_code": r[f"{prefix}_country_code"],
                "region": r[f"{prefix}_region"],
                "city": r[f"{prefix}_city"],
            }
            for r in rows
        ]

    out = summarize(
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
    return _json_clean(out)


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


def _batches(
    records: Iterable[GeoRecord], batch_size: int, encoder: Any, errors: list[dict[str, str]]
) -> Iterator[tuple[list[GeoRecord], torch.Tensor]]:
    """Embedded batches; records whose image cannot be read or embedded go to ``errors``."""
    pending: list[GeoRecord] = []

    def embed(batch: list[GeoRecord]) -> tuple[list[GeoRecord], torch.Tensor] | None:
        with_emb = [r for r in batch if r.embedding is not None]
        if len(with_emb) == len(batch):
            return batch, torch.as_tensor(np.stack([np.asarray(r.embedding) for r in batch]))
        if encoder is None:
            raise ValueError(
                f"record {batch[0].id!r} has no precomputed embedding: pass an encoder to embed "
                "images"
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

    for r in records:
        pending.append(r)
        if len(pending) == batch_size:
            got = embed(pending)
            pending = []
            if got is not None:
                yield got
    if pending:
        got = embed(pending)
        if got is not None:
            yield got


def _has_admin_labels(record: GeoRecord) -> bool:
    labels = record.labels()
    return labels is not None and bool(labels["country"] or labels["region"] or labels["city"])


def _true_place(record: GeoRecord) -> dict[str, str]:
    """The dataset's own labels as a place (country may be an ISO code or a name)."""
    from globeflow.answers.geocode import country_name

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
    guidance: float = 2.0,
    steps: int | None = None,
    sampler: SamplerSettings = DEFAULT_SAMPLER,
    density_guidance: float = 0.0,
    hpd_samples: int = 128,
    localizability_samples: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    thresholds_km: Sequence[float] = M.DEFAULT_THRESHOLDS_KM,
    prdc_k: int = 3,
    progress: bool = True,
    model_name: str | None = None,
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
        guidance: classifier-free guidance scale for location prediction (paper: 2).
        steps: sampler steps (default: the sampler's).
        sampler: the sampling recipe (solver, grid, precision; default: ``predict``'s, so the
            accuracy measured is that of the answers users get).
        density_guidance: guidance of the distribution used for calibration and the unguided
            sample columns (paper: 0). Non-zero needs a model whose ``log_prob`` takes
            ``guidance``. NLL is always the guidance-0 density of the truth.
        hpd_samples: samples per image whose densities estimate HPD coverage and, at density
            guidance 0, localizability (0 disables both; then ``model.localizability`` is used).
        localizability_samples: when set, call ``model.localizability`` with this many samples
            instead of reusing the calibration samples.
        batch_size: images per model call.
        seed: seed of the sampling generator (results are reproducible).
        limit: evaluate at most this many records.
        thresholds_km: accuracy thresholds in km.
        prdc_k: neighbourhood size of precision / recall / density / coverage.
        progress: show a progress bar on stderr.
        model_name: how the report names the model (its path or hub id; default: its class).

    Returns:
        An :class:`EvaluationReport`; call ``.write(out_dir)`` for the files.
    """
    from globeflow.answers.geocode import reverse_geocode

    started = time.time()
    sampler = sampler.with_overrides(num_samples=num_samples, steps=steps)
    num_samples, steps = sampler.num_samples, sampler.steps
    how = sampling_arguments(model, sampler)
    device = _model_device(model)
    records, dataset = _records(records_or_embeddings)
    if limit is not None:
        records = _take(records, limit)
    errors: list[dict[str, str]] = []
    gen = torch.Generator(device=device).manual_seed(seed)
    guided_log_prob = density_guidance != 0.0
    if guided_log_prob and not _accepts(model.log_prob, "guidance"):
        raise ValueError(
            "density_guidance != 0 needs model.log_prob(..., guidance=w); this model's log_prob "
            "scores only the unguided density"
        )
    reuse_loc = hpd_samples > 0 and not guided_log_prob and localizability_samples is None

    recs: list[GeoRecord] = []
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("true", "pred", "lp", "loc", "mass", "sample")
    }
    batches: Iterable[tuple[list[GeoRecord], torch.Tensor]] = _batches(
        records, batch_size, encoder, errors
    )
    if progress:
        try:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="evaluate", unit="batch")
        except ImportError:
            pass
    for batch, emb in batches:
        emb = _to_tensor(emb, device)
        b = emb.shape[0]
        truth = torch.tensor([[r.lat, r.lon] for r in batch], dtype=torch.float32, device=device)
        samples = model.sample(
            emb, num_samples=num_samples, steps=steps, guidance=guidance, generator=gen, **how
        )
        pred = best_guess(samples).reshape(b, 2)
        lp = model.log_prob(truth[:, None, :], emb).reshape(b)
        mass = torch.full((b,), math.nan, dtype=torch.float64)
        sample0 = torch.full((b, 2), math.nan, dtype=torch.float64)
        loc = None
        if hpd_samples > 0:
            s = model.sample(
                emb,
                num_samples=hpd_samples,
                steps=steps,
                guidance=density_guidance,
                generator=gen,
                **how,
            )
            kw = {"guidance": density_guidance} if guided_log_prob else {}
            lp_s = model.log_prob(s, emb, **kw).reshape(b, hpd_samples).double()
            lp_t = model.log_prob(truth[:, None, :], emb, **kw).reshape(b) if kw else lp
            mass = torch.from_numpy(M.hpd_mass(lp_t.double(), lp_s))
            sample0 = s[:, 0, :].double().cpu()
            if reuse_loc:
                loc = lp_s.mean(1) / _LN2
        if loc is None:
            n_loc = localizability_samples or max(hpd_samples, 64)
            loc = model.localizability(emb, num_samples=n_loc)
        recs.extend(batch)
        cols["true"].append(truth.double().cpu().numpy())
        cols["pred"].append(pred.double().cpu().numpy())
        cols["lp"].append(lp.double().cpu().numpy())
        cols["loc"].append(torch.as_tensor(loc).double().reshape(b).cpu().numpy())
        cols["mass"].append(mass.numpy())
        cols["sample"].append(sample0.numpy())

    def cat(key: str, width: int | None = None) -> np.ndarray:
        if cols[key]:
            return np.concatenate(cols[key])
        return np.zeros((0, width) if width else (0,), dtype=np.float64)

    true_ll, pred_ll, sample_ll = cat("true", 2), cat("pred", 2), cat("sample", 2)
    lp_all, loc_all, mass_all = cat("lp"), cat("loc"), cat("mass")
    pred_places = [_place_dict(p) for p in reverse_geocode(pred_ll)]
    labelled = [_has_admin_labels(r) for r in recs]
    need_geocode = [i for i, has in enumerate(labelled) if not has]
    geocoded = dict(zip(need_geocode, reverse_geocode(true_ll[need_geocode]), strict=True))
    true_places = [
        _true_place(r) if labelled[i] else _place_dict(geocoded[i]) for i, r in enumerate(recs)
    ]

    err = M.haversine_km_np(pred_ll, true_ll)
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(recs):
        row: dict[str, Any] = {
            "id": r.id,
            "path": r.path or "",
            "true_lat": float(true_ll[i, 0]),
            "true_lon": float(true_ll[i, 1]),
            "pred_lat": float(pred_ll[i, 0]),
            "pred_lon": float(pred_ll[i, 1]),
            "error_km": float(err[i]),
            "geoscore": float(M.geoscore(err[i])),
            "log_prob": float(lp_all[i]),
            "nll_bpd": float(-lp_all[i] / _LN2 / 3.0),
            "localizability": float(loc_all[i]),
            "hpd_mass": float(mass_all[i]),
            "in_hpd50": bool(mass_all[i] <= 0.5) if np.isfinite(mass_all[i]) else None,
            "in_hpd90": bool(mass_all[i] <= 0.9) if np.isfinite(mass_all[i]) else None,
            "sample_lat": float(sample_ll[i, 0]),
            "sample_lon": float(sample_ll[i, 1]),
        }
        row.update({f"pred_{k}": v for k, v in pred_places[i].items()})
        row.update({f"true_{k}": v for k, v in true_places[i].items()})
        rows.append(row)

    summary = summarize(
        true_ll,
        pred_ll,
        lp_all,
        loc_all,
        mass_all,
        sample_ll,
        pred_places,
        true_places,
        thresholds_km,
        prdc_k,
    )
    summary["n_errors"] = len(errors)
    settings = {
        "model": model_name or type(model).__name__,
        "encoder": None if encoder is None else getattr(encoder, "name", type(encoder).__name__),
        "dataset": str(dataset.path) if dataset is not None else None,
        "dataset_kind": dataset.kind if dataset is not None else None,
        "num_samples": num_samples,
        "guidance": guidance,
        "steps": steps,
        **{k: how.get(k) for k in ("solver", "grid", "precision")},
        "density_guidance": density_guidance,
        "hpd_samples": hpd_samples,
        "localizability_samples": localizability_samples,
        "batch_size": batch_size,
        "seed": seed,
        "prdc_k": prdc_k,
        "seconds": round(time.time() - started, 3),
    }
    return EvaluationReport(
        rows=rows,
        summary=summary,
        reliability=M.reliability_curve_from_mass(mass_all),
        settings=settings,
        errors=errors,
        skipped=dict(dataset.skipped) if dataset is not None else {},
    )


def _take(records: Iterable[GeoRecord], limit: int) -> Iterator[GeoRecord]:
    for i, r in enumerate(records):
        if i >= limit:
            return
        yield r
