"""Writing located results (the dicts of :mod:`globeflow.apps.pipeline`) as CSV and GeoJSON."""

from __future__ import annotations

import csv
from pathlib import Path

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
]


def result_to_row(result: dict) -> dict:
    """One flat CSV row for a result."""
    row = {k: "" for k in CSV_FIELDS}
    row.update(
        image=result.get("image", ""), ok=result.get("ok", False), error=result.get("error") or ""
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
    with path.open("w", newline="") as f:
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
    for r in results:
        if not r.get("ok"):
            continue
        bg = r["best_guess"]
        features.append(
            _point(
                bg["lat"],
                bg["lon"],
                {
                    "image": r["image"],
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
