"""Uploaded photos, read and checked one by one: what the web API's routes
(:mod:`globeflow.apps.server`, :mod:`globeflow.apps.server_fusion`) queue for the model.

Each file is read in chunks up to the size limit, decoded (which checks it is an image) and its
EXIF GPS kept; a file that cannot be used raises :class:`RejectedUpload` naming it, and the
other files of the request go on.
"""

from __future__ import annotations

import concurrent.futures
import io
from dataclasses import dataclass, field
from typing import Any

from fastapi import UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from globeflow.data.images import load_image_bytes, read_exif_gps

_CHUNK_BYTES = 1 << 20
"""Bytes read from an upload at a time."""


def _exif_gps(data: bytes) -> tuple[float, float] | None:
    """EXIF GPS of the original bytes (decoding to RGB may drop the EXIF block)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return read_exif_gps(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block only means "no truth"
        return None


@dataclass
class PhotoJob:
    """One decoded photo waiting for the model: its file name, RGB image, EXIF GPS (lat, lon) or
    None, the request's settings (num_samples, guidance, steps, region) and the future that
    receives its answer."""

    name: str
    image: Any
    gps: tuple[float, float] | None
    params: tuple[int, float, int | None, Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class RejectedUpload(Exception):
    """One uploaded file that cannot be located; the other files of the request go on."""

    def __init__(self, name: str, message: str, status: int) -> None:
        super().__init__(message if name in message else f"{name}: {message}")
        self.name = name
        self.status = status  # 413: too large, 422: not a usable image

    def to_result(self) -> dict:
        """The file's entry in a response's results: not ok, with the reason."""
        return {"image": self.name, "ok": False, "error": str(self)}


async def _read_limited(upload: UploadFile, name: str, limit: int) -> bytes:
    """The upload's bytes; :class:`RejectedUpload` (413) as soon as it exceeds ``limit``."""
    buf = bytearray()
    while True:
        chunk = await upload.read(_CHUNK_BYTES)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise RejectedUpload(
                name,
                f"file too large (more than {limit / 2**20:.3g} MB); the limit is "
                f"{limit / 2**20:.3g} MB per file",
                413,
            )


async def prepare_job(upload: UploadFile, name: str, limit: int, params: tuple) -> PhotoJob:
    """Read, size-check and decode one upload (``params``: the request's settings);
    :class:`RejectedUpload` naming the file otherwise."""
    data = await _read_limited(upload, name, limit)
    try:
        image = await run_in_threadpool(load_image_bytes, data, name)
    except ValueError as exc:
        raise RejectedUpload(name, str(exc), 422) from None
    gps = await run_in_threadpool(_exif_gps, data)
    return PhotoJob(name=name, image=image, gps=gps, params=params)
