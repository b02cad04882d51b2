"""The web API's part of fusion and regions: ``POST /v1/locate-together`` and the ``within``
field of ``/v1/locate`` (see :meth:`globeflow.apps.pipeline.Locator.locate_together`).

Fused answers run in the request thread pool, one at a time (a lock), beside the batch worker of
:mod:`globeflow.apps.server`; the model's inference holds no per-call state.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from globeflow.answers.within import RegionError, parse_region
from globeflow.apps.settings import LOCATE_LIMITS
from globeflow.apps.uploads import RejectedUpload, prepare_job

WITHIN_HELP = (
    "a region the photos are in: lat0,lon0,lat1,lon1 (degrees, south-west corner first), an ISO "
    "country code (FR) or a GeoJSON object (text); answers then come from the model's density "
    "inside it, with the mass it puts there (mass_inside)"
)


def parse_web_region(within: str | None) -> Any:
    """The region of a ``within`` form field, or None; 422 naming the problem. Unlike the
    command line, never a file name: a request must not make the server read its files."""
    if within is None or not within.strip():
        return None
    text = within.strip()
    try:
        if text.startswith("{"):
            return parse_region(json.loads(text))
        if not re.fullmatch(r"[A-Za-z]{2}|[-+\d.,\seE]+", text):
            raise RegionError(
                f"{text[:60]}: not a region; give lat0,lon0,lat1,lon1, a country code or GeoJSON"
            )
        return parse_region(text)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"within: not valid GeoJSON ({exc})") from None
    except RegionError as exc:
        raise HTTPException(422, f"within: {exc}") from None


def add_fusion_route(app: FastAPI, locator: Any, limit: int, max_files: int) -> None:
    """Register ``POST /v1/locate-together`` on ``app``."""
    lock = threading.Lock()
    low, high = LOCATE_LIMITS["num_samples"].low, LOCATE_LIMITS["num_samples"].high

    @app.post("/v1/locate-together", tags=["locate"])
    async def locate_together(
        file: list[UploadFile] = File(..., description="two or more photos of one place"),
        num_samples: int | None = Form(None, ge=low, le=high),
        within: str | None = Form(None, description=WITHIN_HELP),
    ) -> JSONResponse:
        """One answer for photos that all show the same place (the exact product of their
        posteriors): ``{"result": {...}}`` with the usual structure plus ``photos``,
        ``effective_sample_size``, ``fusion`` and ``disagreement``; when the photos disagree,
        ``ok`` is false and ``error`` says why. Files that cannot be used are listed in
        ``skipped``."""
        if not hasattr(locator, "locate_together"):
            raise HTTPException(501, "this server's locator cannot fuse photos")
        if len(file) > max_files:
            raise HTTPException(400, f"too many files ({len(file)}); at most {max_files}")
        region = parse_web_region(within)
        jobs, skipped = [], []
        for i, upload in enumerate(file):
            name = Path(upload.filename or f"upload-{i + 1}").name
            try:
                jobs.append(await prepare_job(upload, name, limit, ()))
            except RejectedUpload as rejected:
                skipped.append(rejected.to_result())
        if len(jobs) < 2:
            unusable = "; ".join(r["error"] for r in skipped)  # each names its file
            raise HTTPException(
                422,
                "send at least two usable photos of the same place"
                + (f" ({len(jobs)} usable; not usable: {unusable})" if skipped else ""),
            )

        def run() -> dict:
            with lock:
                return locator.locate_together(
                    [(job.name, job.image) for job in jobs], num_samples=num_samples,
                    within=region,
                )  # fmt: skip

        try:
            result = await run_in_threadpool(run)
        except Exception as exc:  # noqa: BLE001 - inference errors become a readable 500
            raise HTTPException(500, f"fusion failed: {type(exc).__name__}: {exc}") from None
        result["skipped"] = [*result.get("skipped", []), *skipped]
        return JSONResponse({"result": result})
