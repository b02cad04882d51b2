"""Robust image loading: every photo a user hands us becomes an RGB ``PIL.Image`` or a clear
:class:`ImageLoadError` naming the file and the problem.

Handles EXIF orientation, grayscale / CMYK / 16-bit / palette modes, transparency (composited on
white), truncated and non-image files, decompression bombs (configurable pixel limit) and
HEIC/HEIF when the optional ``pillow_heif`` package is installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from globeflow.data.file_names import printable_path

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

# PIL logs some refusals of damaged files at ERROR level before raising; with no logging set up
# (the command line) Python would print them to stderr, naming no file, beside our one-line
# error. A library's NullHandler leaves them to whoever configures logging.
logging.getLogger("PIL").addHandler(logging.NullHandler())

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
        super().__init__(f"{printable_path(self.path)}: {reason}")

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


@contextlib.contextmanager
def _pil_quiet() -> Iterator[None]:
    """Silence PIL's warnings about damaged metadata ("Corrupt EXIF data", "Truncated File Read")
    while one file is decoded: they name no file, and the decode either succeeds or raises,
    which the caller reports. Only PIL's own UserWarnings and its bomb warning (our limit
    replaces it) are filtered, so a thread race on the global filter list can at worst leave
    these same narrow filters installed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decode_failure(name: str, exc: BaseException, what: str) -> ImageLoadError:
    """The one-line error for a decoder that raised ``exc``; ``what`` says what failed."""
    if isinstance(exc, MemoryError):
        return ImageLoadError(name, "too large to decode (out of memory)")
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own limit, left as the app set it
        return ImageLoadError(name, f"image too large ({exc}; PIL.Image.MAX_IMAGE_PIXELS)")
    msg = " ".join(str(exc).split()) or type(exc).__name__  # libheif's end in a newline
    if "truncated" in msg.lower():
        return ImageLoadError(name, f"truncated or incomplete image data ({msg})")
    return ImageLoadError(name, f"{what} ({msg})")


def _open_unchecked(fp: str | os.PathLike[str] | IO[bytes], name: str) -> Image.Image:
    """``Image.open`` before our pixel limit (the caller applies it). PIL's own limit
    (``Image.MAX_IMAGE_PIXELS``, refused beyond twice it) stays in force: it is process-global
    state shared with other decoding threads, so it is left as the application set it; its
    refusal becomes our "too large" error."""
    try:
        return Image.open(fp)
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
    except Exception as exc:  # noqa: BLE001 - parsers of untrusted bytes raise anything
        raise _decode_failure(name, exc, "cannot open image") from None


def _open_checked(
    fp: str | os.PathLike[str] | IO[bytes], name: str, max_pixels: int | None
) -> Image.Image:
    """Open, bomb-check, fully decode, orient and convert one image."""
    with _pil_quiet():
        img = _open_unchecked(fp, name)
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
            img.load()  # the full decode now, so that damage surfaces here and not later
        except Exception as exc:  # noqa: BLE001 - e.g. libheif's RuntimeError, struct.error
            raise _decode_failure(name, exc, "corrupt image data") from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - malformed EXIF must not make a good photo unusable
            oriented = img
        if oriented is None:  # pragma: no cover - only with in_place=True
            oriented = img
        try:
            return _to_rgb(oriented)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad image
            what = f"cannot convert mode {oriented.mode} to RGB"
            raise _decode_failure(name, exc, what) from None


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load ``path`` as an RGB image with EXIF orientation applied.

    Args:
        path: image file (JPEG, PNG, WebP, TIFF, GIF, BMP, HEIC with ``pillow_heif``, ...).
        max_pixels: refuse images with more than this many pixels (width * height); ``None``
            leaves only PIL's own guard (images over twice ``PIL.Image.MAX_IMAGE_PIXELS``).

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"``, fully decoded (the file is closed).

    Raises:
        ImageLoadError: missing, unreadable, truncated, corrupt, non-image or too-large files.
    """
    p = Path(path)
    if p.suffix.lower() in (".heic", ".heif") and not _HEIF:
        raise ImageLoadError(p, "HEIC/HEIF support needs the optional package pillow-heif")
    not_regular = _not_a_regular_file(p)
    if not_regular:  # opening a named pipe would wait for a writer forever
        raise ImageLoadError(p, not_regular)
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


_FILE_KINDS = (
    (stat.S_ISDIR, "is a directory, not an image file"),
    (stat.S_ISFIFO, "is a named pipe, not an image file"),
    (stat.S_ISSOCK, "is a socket, not an image file"),
    (stat.S_ISCHR, "is a character device, not an image file"),
    (stat.S_ISBLK, "is a block device, not an image file"),
)


def _not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` (links followed) is not a file to read, or None when it is one or when
    ``stat`` fails (opening it then says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((why for test, why in _FILE_KINDS if test(mode)), "is not a regular file")


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
        elif _not_a_regular_file(Path(path_or_image)):
            return None
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
