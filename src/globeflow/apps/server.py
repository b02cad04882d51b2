"""Local web app and JSON API: upload photos, get distributions over the globe.

The model is loaded once. Every image goes through one worker thread that batches images from
concurrent requests (up to ``max_batch`` at a time), so memory is bounded and the event loop
never runs model code. Uploads are processed in memory and checked by decoding them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import socket
import threading
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from globeflow.answers.export import results_to_geojson
from globeflow.apps.heap import release_free_heap
from globeflow.apps.pipeline import Locator
from globeflow.apps.request_guards import (
    BodyLimit,
    ClientGone,
    too_many_files,
    unless_disconnected,
)
from globeflow.apps.server_basemap import DEFAULT_TILES, add_basemap_routes
from globeflow.apps.server_fusion import WITHIN_HELP, add_fusion_route, parse_web_region
from globeflow.apps.settings import LOCATE_LIMITS, Range, Rule, SettingError, check_settings
from globeflow.apps.uploads import PhotoJob, RejectedUpload, prepare_job
from globeflow.core.sampler_settings import DEFAULT_GUIDANCE, DEFAULT_SAMPLER

__all__ = [
    "build_server",
    "check_listen_address",
    "SERVE_LIMITS",
    "create_app",
    "serve",
    "MIN_SAMPLES",
    "MAX_SAMPLES",
    "MAX_GUIDANCE",
    "MAX_STEPS",
]

log = logging.getLogger("globeflow.apps.server")

# The limits shared with the command line (globeflow.apps.settings).
MIN_SAMPLES, MAX_SAMPLES = LOCATE_LIMITS["num_samples"].low, LOCATE_LIMITS["num_samples"].high
MIN_GUIDANCE, MAX_GUIDANCE = LOCATE_LIMITS["guidance"].low, LOCATE_LIMITS["guidance"].high
MAX_STEPS = LOCATE_LIMITS["steps"].high


def _static_dir() -> Path:
    return Path(str(resources.files("globeflow.apps") / "static"))


def _coastlines_file() -> Path:
    return Path(str(resources.files("globeflow") / "assets" / "world_coastlines.json"))


# ---------------------------------------------------------------------------------------------
# The single inference worker


class BatchWorker:
    """One thread that runs ``locator.locate_images`` on batches of queued images.

    Images from concurrent requests that share settings go into the same call, at most
    ``max_batch`` at a time; a request awaits its own futures without blocking the event loop.
    """

    def __init__(self, locator: Any, max_batch: int = 8, gather_ms: float = 5.0) -> None:
        self.locator = locator
        self.max_batch = max(1, int(max_batch))
        self.gather_s = gather_ms / 1000.0
        self._queue: queue.Queue[PhotoJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches_run = 0
        self.images_done = 0

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="globeflow-worker", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish the queued work and stop."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)

    @property
    def pending(self) -> int:
        """Images waiting in the queue."""
        return self._queue.qsize()

    def submit(self, jobs: Sequence[PhotoJob]) -> list[concurrent.futures.Future]:
        """Queue jobs; returns their futures (each resolves to one result dict)."""
        self.start()
        for job in jobs:
            self._queue.put(job)
        return [job.future for job in jobs]

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            # A short pause lets images of concurrent requests join this batch.
            deadline = self.gather_s
            while len(jobs) < self.max_batch:
                try:
                    job = (
                        self._queue.get(timeout=deadline) if deadline else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                deadline = 0.0
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[PhotoJob]] = {}
            for job in jobs:
                groups.setdefault(job.params, []).append(job)
            for params, group in groups.items():
                self._run_group(params, group)
            jobs = groups = first = job = None  # drop the batch's images, then trim the heap
            release_free_heap()
            if stop:
                return

    def _run_group(self, params: tuple[int, float, int | None, Any], group: list[PhotoJob]) -> None:
        live = [job for job in group if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        num_samples, guidance, steps, region = params
        try:
            results = self.locator.locate_images(
                [(job.name, job.image) for job in live],
                num_samples=num_samples,
                guidance=guidance,
                steps=steps,
                exif_gps=[job.gps for job in live],
                with_density=True,
                **({"within": region} if region is not None else {}),
            )
            if len(results) != len(live):
                raise RuntimeError(f"locator returned {len(results)} results for {len(live)}")
        except Exception as exc:  # noqa: BLE001 - reported to the waiting requests
            log.exception("inference failed")
            for job in live:
                job.future.set_exception(exc)
            return
        self.batches_run += 1
        self.images_done += len(live)
        for job, result in zip(live, results):
            job.future.set_result(result)


# ---------------------------------------------------------------------------------------------
# The app


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def _all_rejected(rejected: list[RejectedUpload]) -> JSONResponse:
    """The answer when no file of a request could be used: 413 if all were too large, else 422."""
    status = 413 if all(r.status == 413 for r in rejected) else 422
    return JSONResponse(
        {"detail": "; ".join(map(str, rejected)), "results": [r.to_result() for r in rejected]},
        status_code=status,
    )


SERVE_LIMITS: dict[str, Rule] = {
    "max_upload_mb": Range(0.0, math.inf, low_open=True),
    "max_batch": Range(1, math.inf, integer=True),
    "max_files": Range(1, math.inf, integer=True),
    "port": Range(1, 65535, integer=True),
}
"""Settings of the server itself (``globeflow serve``, :func:`create_app`)."""


def create_app(
    locator: Any,
    *,
    max_upload_mb: float = 20,
    max_batch: int = 8,
    max_files: int = 32,
    tiles: str | None = DEFAULT_TILES,
) -> FastAPI:
    """The FastAPI app: the page at ``/``, assets under ``/static``, the API under ``/v1``.

    Args:
        locator: object with ``locate_images(images, num_samples, guidance, steps, exif_gps,
            with_density)`` and ``model_name`` / ``encoder_name``
            (``globeflow.apps.pipeline.Locator``).
        max_upload_mb: largest accepted file (413 above).
        max_batch: most images per model call, across concurrent requests.
        max_files: most files in one request.
        tiles: raster tile URL template the page tries (``{z}/{x}/{y}``); None: the bundled
            offline base map only (``globeflow.apps.server_basemap``).
    """
    check_settings(
        {"max_upload_mb": max_upload_mb, "max_batch": max_batch, "max_files": max_files},
        SERVE_LIMITS,
    )
    limit = int(max_upload_mb * 2**20)
    worker = BatchWorker(locator, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="globeflow",
        summary="Where on Earth was this photo taken? A probability distribution over the globe.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.locator = locator
    app.state.worker = worker
    static = _static_dir()
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")

    @app.exception_handler(StarletteHTTPException)  # also the multipart parser's errors
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = too_many_files(exc.detail, max_files) or exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code)

    # Refuse absurd bodies before the multipart parser spools them to disk.
    app.add_middleware(
        BodyLimit,
        limit=limit * max_files + 2**20,
        message=lambda mb: (
            f"request too large ({mb:.1f} MB or more); at most {max_files} "
            f"files of {max_upload_mb:g} MB each"
        ),
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        text = "; ".join(
            f"{e['loc'][-1] if e.get('loc') else 'request'}: {e.get('msg', 'invalid')}"
            for e in errors
        )
        safe = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in errors]
        return JSONResponse({"detail": text, "errors": safe}, status_code=422)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        page = static / "index.html"
        if not page.is_file():
            raise HTTPException(404, "the web page is not installed (globeflow/static missing)")
        return FileResponse(page, media_type="text/html")

    @app.head("/v1/health", include_in_schema=False)
    @app.get("/v1/health", tags=["meta"])
    async def health() -> dict:
        """Liveness and what is loaded."""
        return {
            "status": "ok",
            "model": str(getattr(locator, "model_name", "unknown")),
            "encoder": str(getattr(locator, "encoder_name", "unknown")),
            "default_guidance": float(getattr(locator, "default_guidance", DEFAULT_GUIDANCE)),
            "max_upload_mb": max_upload_mb,
            "max_batch": max_batch,
            "max_files": max_files,
            "limits": {
                "num_samples": [MIN_SAMPLES, MAX_SAMPLES],
                "guidance": [MIN_GUIDANCE, MAX_GUIDANCE],
                "steps": [1, MAX_STEPS],
            },
            "queued_images": worker.pending,
        }

    @app.get("/v1/coastlines", tags=["meta"])
    async def coastlines() -> FileResponse:
        """Bundled world coastlines and borders (Natural Earth, public domain) for the page."""
        return FileResponse(
            _coastlines_file(),
            media_type="application/json",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    @app.post("/v1/locate", tags=["locate"])
    async def locate(
        request: Request,
        file: list[UploadFile] | None = File(None, description="one or more photos"),
        files: list[UploadFile] | None = File(None, description="alias of `file`"),
        num_samples: int | None = Query(None, ge=MIN_SAMPLES, le=MAX_SAMPLES),
        guidance: float | None = Query(None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False),
        steps: int | None = Query(None, ge=1, le=MAX_STEPS),
        format: str = Query("json", pattern="^(json|geojson)$"),
        form_num_samples: int | None = Form(
            None, alias="num_samples", ge=MIN_SAMPLES, le=MAX_SAMPLES
        ),
        form_guidance: float | None = Form(
            None, alias="guidance", ge=MIN_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False
        ),
        form_steps: int | None = Form(None, alias="steps", ge=1, le=MAX_STEPS),
        within: str | None = Form(None, description=WITHIN_HELP),
    ) -> JSONResponse:
        """Locate photos. Returns ``{"results": [...]}`` in upload order (see
        docs/ARCHITECTURE.md) or, with ``format=geojson``, a FeatureCollection of best guesses,
        regions and EXIF locations.

        A file that cannot be used (not an image, truncated, too large) gets
        ``{"image", "ok": false, "error"}`` in its place and the other files are still located;
        when no file is usable the answer is 422 (413 if all were too large), naming each file.
        Settings come from the query string or form fields (form wins)."""
        uploads = [u for u in (file or []) + (files or []) if u is not None]
        if not uploads:
            raise HTTPException(400, "no file uploaded: send photos as multipart field 'file'")
        if len(uploads) > max_files:
            raise HTTPException(
                400, f"too many files ({len(uploads)}); at most {max_files} per request"
            )
        locator_guidance = getattr(locator, "default_guidance", DEFAULT_GUIDANCE)
        recipe = getattr(locator, "sampler", DEFAULT_SAMPLER)
        params = (
            int(_first(form_num_samples, num_samples, recipe.num_samples)),
            float(_first(form_guidance, guidance, locator_guidance)),
            _first(form_steps, steps),
            parse_web_region(within),
        )
        try:  # the model's recommended guidance is checked here too
            check_settings(dict(zip(("num_samples", "guidance", "steps"), params[:3])))
        except SettingError as exc:
            raise HTTPException(422, str(exc)) from None
        # A bad file is answered in its own result; the good ones of the request still run.
        prepared: list[PhotoJob | RejectedUpload] = []
        for i, upload in enumerate(uploads):
            name = Path(upload.filename or f"upload-{i + 1}").name
            try:
                prepared.append(await prepare_job(upload, name, limit, params))
            except RejectedUpload as rejected:
                prepared.append(rejected)
        jobs = [p for p in prepared if isinstance(p, PhotoJob)]
        if not jobs:
            return _all_rejected(prepared)
        try:  # a request whose client has gone is dropped from the queue, not computed
            answers = iter(await unless_disconnected(request, lambda: worker.submit(jobs)))
        except ClientGone:
            return JSONResponse({"detail": "client closed the request"}, status_code=499)
        except Exception as exc:  # noqa: BLE001 - inference errors become a readable 500
            raise HTTPException(500, f"inference failed: {type(exc).__name__}: {exc}") from None
        results = [next(answers) if isinstance(p, PhotoJob) else p.to_result() for p in prepared]
        if format == "geojson":
            collection = results_to_geojson(results)
            failed = [r for r in results if not r["ok"]]
            if failed:  # a foreign member: the files that have no features, and why
                collection["errors"] = [{"image": r["image"], "error": r["error"]} for r in failed]
            return JSONResponse(collection)
        return JSONResponse({"results": results})

    add_fusion_route(app, locator, limit, max_files)
    add_basemap_routes(app, tiles)
    return app


def _version() -> str:
    try:
        return version("globeflow")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0"


HEAD_TIMEOUT_S = 10.0
"""Seconds a client has to send a request's head (line and headers) once the server waits."""
BODY_TIMEOUT_S = 120.0
"""Seconds a client has to send a request's body after its head (e.g. 32 photos of 20 MB)."""
MAX_CONNECTIONS = 64
"""Open connections (and requests in progress) beyond which requests are answered 503."""


def check_listen_address(host: str, port: int) -> None:
    """``ValueError`` naming ``host:port`` when the server could not listen there.

    Checked before the model is loaded so that a busy port fails in a second, not after it.
    """
    check_settings({"port": port}, SERVE_LIMITS)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    try:
        _, kind, proto, _, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ValueError(f"{host}: cannot listen on this host ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def build_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    head_timeout_s: float = HEAD_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
):
    """An ``uvicorn.Server`` for ``app`` that cuts slow clients and caps open connections.

    Request heads must arrive within ``head_timeout_s`` and bodies within ``body_timeout_s``
    (408 and close otherwise, see :mod:`globeflow.apps.http_deadlines`); beyond
    ``max_connections`` open connections, requests get 503. Idle keep-alive connections close
    after 5 s.
    """
    # Imported here: uvicorn loads only to serve, not for create_app (tests, embedding the app).
    import uvicorn

    from globeflow.apps.http_deadlines import deadline_protocol

    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=deadline_protocol(head_timeout_s, body_timeout_s),
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


def serve(
    model: Any = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    encoder: str | None = None,
    family: str | None = None,
    encoder_path: str | None = None,
    device: str = "cpu",
    max_upload_mb: float = 20,
    max_batch: int = 8,
    log_level: str = "info",
    tiles: str | None = DEFAULT_TILES,
) -> None:
    """Run the web app with uvicorn (blocking).

    ``model`` is a ready locator (anything with ``locate_images``) or a model directory / hub id
    for ``Locator.from_pretrained`` (``None``: the bundled model). Bad settings, an address the
    server cannot listen on and unloadable models raise ``ValueError`` before serving starts.
    """
    check_settings({"max_upload_mb": max_upload_mb, "max_batch": max_batch}, SERVE_LIMITS)
    check_listen_address(host, port)
    if model is not None and not isinstance(model, (str, Path)):  # a ready locator
        locator = model
    else:
        locator = Locator.from_pretrained(
            model, encoder=encoder, family=family, encoder_path=encoder_path, device=device
        )
    app = create_app(locator, max_upload_mb=max_upload_mb, max_batch=max_batch, tiles=tiles)
    print(f"globeflow: open http://{host}:{port}/  (API docs: http://{host}:{port}/docs)")
    build_server(app, host, port, log_level=log_level).run()
