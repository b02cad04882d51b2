"""Image decoding under damaged input: thousands of mutated and truncated photos, and the cases
the fuzzing found (each a regression test of its fix).

The contract: ``load_image``/``load_image_bytes`` return an RGB image or raise
:class:`ImageLoadError` naming the file, never anything else, and print nothing: PIL's warnings
and log records about damaged metadata name no file and would break the one-line report.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from _photos import gps_exif
from PIL import Image

from globeflow.data.images import ImageLoadError, heif_available, load_image, load_image_bytes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FUZZ_CASES = 6000
"""About 0.5 s of decoding on one core: the seed photos are small."""


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _seed_photos() -> dict[str, bytes]:
    """Small valid files of every decoder we rely on, with the metadata real photos carry."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = gps_exif(48.85, 2.35)
    exif[0x0112] = 6  # orientation: rotate on load
    alpha = Image.fromarray(rng.integers(0, 256, (24, 32, 4), dtype=np.uint8), "RGBA")
    deep = Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16))
    seeds = {
        "jpeg": _encode(rgb, "JPEG", exif=exif, quality=80),
        "progressive.jpeg": _encode(rgb, "JPEG", progressive=True),
        "rgba.png": _encode(alpha, "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG", transparency=3),
        "16bit.png": _encode(deep, "PNG"),
        "lossy.webp": _encode(rgb, "WEBP", quality=60, exif=exif),
        "lossless.webp": _encode(alpha, "WEBP", lossless=True),
        "gif": _encode(rgb, "GIF"),
        "tiff": _encode(rgb, "TIFF", exif=exif),
    }
    if heif_available():
        seeds["heic"] = _encode(rgb, "HEIF", quality=50, exif=exif)
    for photo in sorted(EXAMPLES.glob("*.jpg")):  # real camera JPEGs (EXIF GPS), a few KB each
        seeds[photo.name] = photo.read_bytes()
    return seeds


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    """One damage of the kinds files suffer: cut short, bytes overwritten, inserted or dropped,
    or a header byte set to an extreme (sizes, counts and offsets live there)."""
    out = bytearray(data)
    kind = rnd.randrange(5)
    if kind == 0:
        return bytes(out[: rnd.randrange(len(out))])
    if kind == 1:
        for _ in range(rnd.randint(1, 8)):
            out[rnd.randrange(len(out))] = rnd.randrange(256)
    elif kind == 2:
        at = rnd.randrange(len(out))
        out[at:at] = rnd.randbytes(rnd.randint(1, 16))
    elif kind == 3:
        at = rnd.randrange(len(out))
        del out[at : at + rnd.randint(1, 64)]
    else:
        out[rnd.randrange(min(400, len(out)))] = rnd.choice((0x00, 0x7F, 0x80, 0xFF))
    return bytes(out)


def _load_quietly(data: bytes, name: str) -> Image.Image | None:
    """The image, or None after an ImageLoadError naming ``name``; fails the test on any other
    exception or any warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = load_image_bytes(data, name)
        except ImageLoadError as exc:
            assert str(exc).startswith(f"{name}: ") and "\n" not in str(exc), str(exc)
            img = None
    assert not caught, (name, [str(w.message) for w in caught])
    return img


def test_damaged_photos_load_or_raise_only_image_load_error(capfd) -> None:
    seeds = _seed_photos()
    names = sorted(seeds)
    rnd = random.Random(20240521)
    loaded = failed = 0
    for case in range(FUZZ_CASES):
        kind = names[case % len(names)]
        name = f"case-{case}-{kind}"
        try:
            img = _load_quietly(_mutate(seeds[kind], rnd), name)
        except Exception as exc:  # noqa: BLE001 - report which case escaped, then fail
            pytest.fail(f"{name}: {type(exc).__name__}: {exc}")
        if img is None:
            failed += 1
            continue
        loaded += 1
        assert img.mode == "RGB" and img.width > 0 and img.height > 0
    # Both outcomes are exercised: damage often leaves a decodable image, often not.
    assert loaded > FUZZ_CASES // 10 and failed > FUZZ_CASES // 10, (loaded, failed)
    assert capfd.readouterr().err == ""


# ---- what the fuzzing found -------------------------------------------------------------------


@pytest.mark.skipif(not heif_available(), reason="pillow-heif not installed")
def test_heic_whose_coded_size_breaks_libheif_limits(tmp_path: Path) -> None:
    """libheif refuses with a RuntimeError at decode time, after PIL reported a small size, in
    a message that ends with a newline."""
    data = bytearray(_encode(Image.new("RGB", (32, 24), (9, 90, 200)), "HEIF"))
    ispe = data.find(b"ispe")  # box: type, version+flags, width, height (big-endian)
    data[ispe + 8 : ispe + 16] = struct.pack(">II", 60000, 60000)
    path = tmp_path / "huge.heic"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="huge.heic: corrupt image data") as err:
        load_image(path)
    assert "\n" not in str(err.value)


def test_any_decoder_failure_is_an_image_load_error(monkeypatch) -> None:
    """Decoders raise whatever their parser hits (struct.error, IndexError, MemoryError...)."""
    from PIL import PngImagePlugin

    data = _encode(Image.new("RGB", (8, 8)), "PNG")
    for error, reason in (
        (struct.error("unpack requires a buffer of 4 bytes"), "corrupt image data"),
        (IndexError("list index out of range"), "corrupt image data"),
        (MemoryError(), r"too large to decode \(out of memory\)"),
    ):

        def fail(self, error=error):
            raise error

        monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail)
        with pytest.raises(ImageLoadError, match=f"x.png: {reason}"):
            load_image_bytes(data, "x.png")


def _jpeg_with_oversized_exif_tag() -> bytes:
    """A good JPEG whose EXIF says one tag holds more bytes than the file has."""
    exif = Image.Exif()
    exif[0x010E] = "a description longer than four bytes"
    block = bytearray(exif.tobytes())
    entry = block.find(struct.pack(">HH", 0x010E, 2))  # tag, type ASCII (PIL writes big-endian)
    assert entry > 0
    block[entry + 4 : entry + 8] = struct.pack(">I", 0x7FFFFFFF)
    return _encode(Image.new("RGB", (16, 8), (10, 200, 30)), "JPEG", exif=bytes(block))


def test_damaged_metadata_warns_nothing_and_the_photo_still_loads() -> None:
    img = _load_quietly(_jpeg_with_oversized_exif_tag(), "exif.jpg")
    assert img is not None and img.size == (16, 8)


def test_pil_log_records_about_a_damaged_file_print_nothing(tmp_path: Path) -> None:
    """PIL logs some refusals at ERROR level; with no logging configured (the command line)
    Python prints them to stderr, naming no file. A fresh process, as pytest's logging plugin
    would capture them here."""
    data = bytearray(_encode(Image.new("RGB", (4, 4)), "TIFF"))
    entry = data.find(struct.pack("<HH", 277, 3))  # SamplesPerPixel, SHORT (PIL: little-endian)
    assert entry > 0
    data[entry + 8 : entry + 10] = struct.pack("<H", 190)
    path = tmp_path / "samples.tif"
    path.write_bytes(bytes(data))
    script = (
        "import sys\n"
        "from globeflow.data.images import ImageLoadError, load_image\n"
        "try:\n"
        "    load_image(sys.argv[1])\n"
        "except ImageLoadError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.stdout.startswith(f"{path}: ") and run.stderr == "", (run.stdout, run.stderr)
