"""Helpers that build test photos."""

from fractions import Fraction

from PIL import Image, TiffImagePlugin


def gps_exif(lat: float, lon: float) -> Image.Exif:
    """An EXIF block whose GPS IFD holds (lat, lon) degrees as degree/minute/second rationals."""

    def dms(v: float) -> tuple:
        v = abs(v)
        d = int(v)
        m = int((v - d) * 60)
        s = (v - d - m / 60) * 3600
        return tuple(
            TiffImagePlugin.IFDRational(Fraction(x).limit_denominator(10000)) for x in (d, m, s)
        )

    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps[1] = "N" if lat >= 0 else "S"
    gps[2] = dms(lat)
    gps[3] = "E" if lon >= 0 else "W"
    gps[4] = dms(lon)
    return exif


def make_unreadable(monkeypatch, folder) -> None:
    """Listing ``folder`` fails as it does for a user without read permission on it. Tests run
    as root, whom permission bits do not stop, so the failure is made where ``os.walk`` lists a
    folder (``os.scandir``), the code path a PermissionError takes for a user."""
    import os

    scandir, locked = os.scandir, os.fspath(folder)

    def refuse(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
