"""Writing located results (the dicts of :mod:`globeflow.apps.pipeline`) as CSV, GeoJSON and JSON.

File names that are not UTF-8 are written by the one rule of :mod:`globeflow.data.file_names`
(each undecodable byte as ``\\xNN``) in every format, so that a row of the CSV, a feature of the
GeoJSON and an entry of the JSON name a photo the same way.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from globeflow.data.file_names import printable_tree

CSV_FIELDS = [
    "image",
    "ok",
    "error",
    "lat",
    "lon",
    "city",
    "region",
    "country",
    "country_code",
    "top_region_probability",
    "localizability_bits",
    "effective_area_km2",
    "exif_lat",
    "exif_lon",
    "error_km",
    "top_region",
    "localizability_vs_uniform_bits",
    "top_region_radius_km",
    "place_label",
    "osm_url",
    "map",
]


def result_to_row(result: dict) -> dict:
    """One flat CSV row for a result."""
    row = {k: "" for k in CSV_FIELDS}
    result = printable_tree(result)
    row.update(
        image=result.get("image", ""),
        ok=result.get("ok", False),
        error=result.get("error") or "",
        map=result.get("map", ""),
    )
    if not result.get("ok"):
        return row
    bg, place = result["best_guess"], result["best_guess"].get("place", {})
    row.update(
        lat=bg["lat"],
        lon=bg["lon"],
        city=place.get("city", ""),
        region=place.get("region", ""),
        country=place.get("country", ""),
        country_code=place.get("country_code", ""),
        top_region_probability=result["regions"][0]["probability"] if result["regions"] else "",
        localizability_bits=result.get("localizability_bits"),
        effective_area_km2=result.get("effective_area_km2"),
        error_km=result.get("error_km") if result.get("error_km") is not None else "",
        top_region=result["regions"][0].get("label", "") if result["regions"] else "",
        localizability_vs_uniform_bits=result.get("localizability_vs_uniform_bits"),
        top_region_radius_km=result["regions"][0]["radius_km"] if result["regions"] else "",
        place_label=bg.get("label", ""),
        osm_url=result.get("osm_url", ""),
    )
    if result.get("exif_gps"):
        row.update(exif_lat=result["exif_gps"]["lat"], exif_lon=result["exif_gps"]["lon"])
    return row


def results_to_csv(results: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(result_to_row(r))
    return path


def _point(lat: float, lon: float, properties: dict) -> dict:
    # GeoJSON orders coordinates (lon, lat).
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "properties": properties,
    }


def results_to_geojson(results: list[dict]) -> dict:
    """A FeatureCollection: per photo its best guess, its regions and its EXIF location."""
    features = []
    for r in printable_tree(results):
        if not r.get("ok"):
            continue
        bg = r["best_guess"]
        features.append(
            _point(
                bg["lat"],
                bg["lon"],
                {
                    "image": r["image"],
                    **({"map": r["map"]} if "map" in r else {}),
                    "kind": "best_guess",
                    **bg.get("place", {}),
                    "label": bg.get("label", ""),
                    "osm_url": r.get("osm_url", ""),
                    "localizability_bits": r.get("localizability_bits"),
                    "localizability_vs_uniform_bits": r.get("localizability_vs_uniform_bits"),
                    "effective_area_km2": r.get("effective_area_km2"),
                },
            )
        )
        for rank, reg in enumerate(r.get("regions", []), 1):
            features.append(
                _point(
                    reg["lat"],
                    reg["lon"],
                    {
                        "image": r["image"],
                        "kind": "region",
                        "rank": rank,
                        "probability": reg["probability"],
                        "radius_km": reg["radius_km"],
                        "share_within_radius": reg.get("share_within_radius", 1.0),
                        **reg.get("place", {}),
                        "label": reg.get("label", ""),
                    },
                )
            )
        if r.get("exif_gps"):
            features.append(
                _point(
                    r["exif_gps"]["lat"],
                    r["exif_gps"]["lon"],
                    {
                        "image": r["image"],
                        "kind": "exif_gps",
                        "error_km": r.get("error_km"),
                    },
                )
            )
    return {"type": "FeatureCollection", "features": features}


def results_to_json(results: list[dict]) -> str:
    """``{"results": [...]}`` as indented JSON text."""
    return json.dumps({"results": printable_tree(results)}, indent=1)
