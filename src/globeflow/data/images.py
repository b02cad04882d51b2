"""Robust image loading: every photo a user hands us becomes an RGB ``PIL.Image`` or a clear
:class:`ImageLoadError` naming the file and the problem.

Handles EXIF orientation, grayscale / CMYK / 16-bit / palette modes, transparency (composited on
white), truncated and non-image files, decompression bombs (configurable pixel limit) and
HEIC/HEIF when the optional ``pillow_heif`` package is installed.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "heif_available",
    "load_image",
    "load_image_bytes",
    "read_exif_gps",
]

#: Default decompression-bomb guard, in pixels (width * height).
DEFAULT_MAX_PIXELS = 90_000_000

#: File extensions (lower case, with dot) treated as images when scanning folders.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

_GPS_IFD = 0x8825

try:  # optional: HEIC/HEIF (iPhone photos)
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF = True
except Exception:  # noqa: BLE001 - any import/registration failure just disables HEIC
    _HEIF = False


def heif_available() -> bool:
    """True when HEIC/HEIF files can be decoded (``pillow_heif`` importable)."""
    return _HEIF


class ImageLoadError(ValueError):
    """An image could not be loaded; ``str(err)`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable across worker processes
        return (type(self), (self.path, self.reason))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent areas become white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    elif mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's I->L conversion clips at 255, which turns most 16-bit photos white: rescale
        # the actual dynamic range into 8 bits instead.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        lo = 0.0 if mode.startswith("I;16") else min(float(arr.min()), 0.0)
        arr = np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.nan_to_num((arr - lo) / max(hi - lo, 1e-12) * 255.0)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open_checked(
    fp: str | os.PathLike[str] | IO[bytes], name: str, max_pixels: int | None
) -> Image.Image:
    """Open, bomb-check, fully decode, orient and convert one image."""
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raising) between MAX_IMAGE_PIXELS and 2x that; we apply our
            # own limit below, so silence PIL's and disable its check for this open.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except FileNotFoundError:
        raise ImageLoadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            name, "not a recognised image format (corrupt or not an image)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        if "truncated" in str(exc).lower():
            raise ImageLoadError(name, f"truncated or incomplete image data ({exc})") from None
        raise ImageLoadError(name, f"cannot open image: {exc}") from None

    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(name, f"invalid image size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageLoadError(
            name,
            f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb)",
        )
    try:
        img.load()  # force the full decode now so truncation surfaces here, not later
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise ImageLoadError(name, f"truncated or incomplete image data ({msg})") from None
        raise ImageLoadError(name, f"corrupt image data ({msg})") from None
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a good photo unusable
        oriented = img
    if oriented is None:  # pragma: no cover - only with in_place=True
        oriented = img
    try:
        return _to_rgb(oriented)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(name, f"cannot convert mode {oriented.mode} to RGB ({exc})") from None


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load ``path`` as an RGB image with EXIF orientation applied.

    Args:
        path: image file (JPEG, PNG, WebP, TIFF, GIF, BMP, HEIC with ``pillow_heif``, ...).
        max_pixels: refuse images with more than this many pixels (width * height); ``None``
            disables the guard.

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"``, fully decoded (the file is closed).

    Raises:
        ImageLoadError: missing, unreadable, truncated, corrupt, non-image or too-large files.
    """
    p = Path(path)
    if p.suffix.lower() in (".heic", ".heif") and not _HEIF:
        raise ImageLoadError(p, "HEIC/HEIF support needs the optional package pillow-heif")
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(p, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageLoadError(p, f"cannot read file ({exc.strerror or exc})") from None
    return load_image_bytes(data, str(p), max_pixels=max_pixels)


def load_image_bytes(
    data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load an image from raw bytes (e.g. an upload); same checks and output as :func:`load_image`.

    ``name`` is only used in error messages.
    """
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _open_checked(io.BytesIO(data), name, max_pixels)


def _rational(value: object) -> float:
    """EXIF rational (IFDRational, (num, den) tuple or number) -> float; raises on junk."""
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den)
    return float(value)  # IFDRational supports float()


def _dms_to_degrees(dms: object) -> float:
    if isinstance(dms, (int, float)) or not hasattr(dms, "__len__"):
        return _rational(dms)
    parts = [_rational(v) for v in dms]  # type: ignore[union-attr]
    if not parts or len(parts) > 3:
        raise ValueError("bad DMS")
    deg = parts[0]
    if len(parts) > 1:
        deg += parts[1] / 60.0
    if len(parts) > 2:
        deg += parts[2] / 3600.0
    return deg


def _ref(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    return str(value or "").strip("\x00 ").upper()


def read_exif_gps(
    path_or_image: str | os.PathLike[str] | Image.Image,
) -> tuple[float, float] | None:
    """(lat, lon) in degrees from the EXIF GPS IFD, or ``None`` when absent or malformed.

    South latitudes and west longitudes (refs ``S``/``W``) are negative. Values outside
    [-90, 90] x [-180, 180], NaN, or the (0, 0) placeholder some cameras write are treated as
    absent.
    """
    try:
        if isinstance(path_or_image, Image.Image):
            exif = path_or_image.getexif()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path_or_image) as img:
                    exif = img.getexif()
        gps = exif.get_ifd(_GPS_IFD)
    except Exception:  # noqa: BLE001 - unreadable EXIF means "no GPS", never a crash
        return None
    if not gps or 2 not in gps or 4 not in gps:
        return None
    try:
        lat = _dms_to_degrees(gps[2])
        lon = _dms_to_degrees(gps[4])
        if _ref(gps.get(1, "N")) == "S":
            lat = -abs(lat)
        if _ref(gps.get(3, "E")) == "W":
            lon = -abs(lon)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    if abs(lat) > 90.0 or abs(lon) > 180.0 or (lat == 0.0 and lon == 0.0):
        return None
    return (lat, lon)
