"""Tests for globeflow.data.images: modes, orientation, corrupt files, bombs, EXIF GPS."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from _photos import gps_exif
from PIL import Image, TiffImagePlugin

from globeflow.data.images import (
    ImageLoadError,
    heif_available,
    load_image,
    load_image_bytes,
    read_exif_gps,
)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    # 40 wide x 20 tall, left half red, right half blue; orientation 6 = rotate 90 CW to view.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(img, tmp_path / "rot.png", exif=exif.tobytes())
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == (20, 40)
    # after a clockwise quarter turn the left (red) half is on top
    top = np.asarray(out)[5, 10]
    bottom = np.asarray(out)[35, 10]
    assert tuple(top) == (255, 0, 0)
    assert tuple(bottom) == (0, 0, 255)


def test_grayscale_and_cmyk(tmp_path: Path) -> None:
    g = load_image(_save(Image.new("L", (8, 6), 77), tmp_path / "g.png"))
    assert g.mode == "RGB" and g.size == (8, 6)
    assert tuple(np.asarray(g)[0, 0]) == (77, 77, 77)
    c = load_image(_save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert c.mode == "RGB"
    r, gg, b = np.asarray(c)[3, 3].astype(int)
    assert r > 200 and gg < 60 and b < 60  # pure red in CMYK


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:, :2, 3] = 0  # left half fully transparent
    arr[:, 2:, 3] = 255
    out = np.asarray(load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 3]) == (255, 0, 0)
    la = Image.new("LA", (3, 3), (0, 0))
    assert tuple(np.asarray(load_image(_save(la, tmp_path / "la.png")))[1, 1]) == (255, 255, 255)


def test_16_bit_rescaled_not_saturated(tmp_path: Path) -> None:
    arr = np.full((5, 5), 32768, np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = load_image(_save(img, tmp_path / "deep.png"))
    v = np.asarray(out)[2, 2]
    assert out.mode == "RGB"
    assert 120 <= v[0] <= 135 and v[0] == v[1] == v[2]
    img32 = Image.fromarray(np.arange(20, dtype=np.int32).reshape(4, 5) * 1000, mode="I")
    out32 = np.asarray(load_image(_save(img32, tmp_path / "i32.tif")))
    assert out32[0, 0, 0] == 0 and out32[-1, -1, 0] == 255


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 255, 0] + [0, 0, 255] + [0] * (254 * 3))
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    path = _save(img, tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (0, 0, 255)  # opaque palette index 1
    assert tuple(out[2, 2]) == (255, 255, 255)  # transparent index 0 -> white
    gif = Image.new("P", (3, 3), 1)
    gif.putpalette([9, 9, 9, 200, 100, 50] + [0] * (254 * 3))
    assert tuple(np.asarray(load_image(_save(gif, tmp_path / "p.gif")))[1, 1]) == (200, 100, 50)


def test_truncated_jpeg_names_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert "cut.jpg" in str(err.value)
    assert "truncated" in str(err.value).lower()
    assert err.value.path == str(path)
    assert isinstance(err.value, ValueError)


def test_random_bytes_and_missing_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(ImageLoadError, match="noise.jpg.*not a recognised image"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image_bytes(b"", "upload.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="big.png.*too large.*20000"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)
    assert load_image(path, max_pixels=None).size == (200, 100)


def test_pil_pixel_limit_is_left_alone_and_reported(tmp_path: Path, monkeypatch) -> None:
    # PIL's limit is process-global (shared with decoding threads): it stays in force, and its
    # refusal (beyond twice the limit) becomes our one-line "too large" error.
    path = _save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with pytest.raises(ImageLoadError, match="big.png.*too large"):
        load_image(path, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == 5_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # over it, under twice it: loads
    assert load_image(path, max_pixels=None).size == (200, 100)
    assert Image.MAX_IMAGE_PIXELS == 15_000


def test_load_image_bytes_matches_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (7, 5), (1, 2, 3)), tmp_path / "x.webp", lossless=True)
    a = np.asarray(load_image(path))
    b = np.asarray(load_image_bytes(path.read_bytes(), "x.webp"))
    assert np.array_equal(a, b) and tuple(a[0, 0]) == (1, 2, 3)
    with pytest.raises(ImageLoadError, match="upload.bin"):
        load_image_bytes(b"GIF89a garbage", "upload.bin")


def _gps_exif(lat: float, lon: float) -> Image.Exif:
    return gps_exif(lat, lon)


@pytest.mark.parametrize(
    "lat,lon", [(48.8584, 2.2945), (-33.8568, 151.2153), (40.6892, -74.0445), (-22.95, -43.21)]
)
def test_exif_gps_round_trip(tmp_path: Path, lat: float, lon: float) -> None:
    path = tmp_path / "gps.jpg"
    Image.new("RGB", (8, 8)).save(path, exif=_gps_exif(lat, lon).tobytes())
    got = read_exif_gps(path)
    assert got is not None
    assert got[0] == pytest.approx(lat, abs=1e-4) and got[1] == pytest.approx(lon, abs=1e-4)
    with Image.open(path) as im:
        assert read_exif_gps(im) == got


def test_exif_gps_absent_or_malformed(tmp_path: Path) -> None:
    plain = _save(Image.new("RGB", (4, 4)), tmp_path / "plain.jpg")
    assert read_exif_gps(plain) is None
    assert read_exif_gps(tmp_path / "missing.jpg") is None
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (
        TiffImagePlugin.IFDRational(95, 1),
        TiffImagePlugin.IFDRational(0, 1),
        TiffImagePlugin.IFDRational(0, 1),
    )
    gps[3] = "E"
    gps[4] = (
        TiffImagePlugin.IFDRational(10, 1),
        TiffImagePlugin.IFDRational(0, 1),
        TiffImagePlugin.IFDRational(0, 1),
    )
    bad = tmp_path / "bad.jpg"
    Image.new("RGB", (4, 4)).save(bad, exif=exif.tobytes())
    assert read_exif_gps(bad) is None  # latitude 95 is impossible


@pytest.mark.skipif(not heif_available(), reason="pillow-heif not installed")
def test_heic_round_trip(tmp_path: Path) -> None:
    import pillow_heif

    heif = pillow_heif.from_pillow(Image.new("RGB", (16, 12), (10, 200, 30)))
    path = tmp_path / "p.heic"
    heif.save(path, quality=95)
    out = load_image(path)
    assert out.size == (16, 12) and out.mode == "RGB"
    assert abs(int(np.asarray(out)[6, 8, 1]) - 200) < 12


def _without_blocking(call, fifo: Path):
    """``call()`` in a thread; a call still waiting on ``fifo`` after 10 s is released (a
    writer opens and closes the pipe) and fails the test instead of hanging it."""
    import os
    import threading

    out: dict = {}

    def run() -> None:
        try:
            out["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("reading a named pipe blocked")
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_named_pipe_is_refused_without_waiting(tmp_path: Path) -> None:
    import os

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    with pytest.raises(ImageLoadError, match=r"pipe\.jpg: is a named pipe, not an image file"):
        _without_blocking(lambda: load_image(pipe), pipe)
    assert _without_blocking(lambda: read_exif_gps(pipe), pipe) is None


def test_a_file_name_that_is_not_utf8_is_escaped_in_the_message(tmp_path: Path) -> None:
    import os

    bad = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    assert "caf\\xe9.jpg: not a recognised image format" in str(info.value)
    str(info.value).encode("utf-8")
