"""What ``globeflow predict`` shows and writes once the answers are in: the table of answers, the
small outputs (--json, --csv, --geojson), the maps (--map) and the lines on the terminal about
regions, fused answers and unreadable photos.

Used by the in-memory runs (``--within``, ``--same-place``) of :mod:`globeflow.apps.cli.predict`
and by the streaming runs of :mod:`globeflow.apps.cli.predict_run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from globeflow.answers.export import results_to_csv, results_to_geojson, results_to_json
from globeflow.apps.cli._common import piped_columns


def show_answers(
    title: str,
    results: list[dict],
    labels: list[str],
    region_radius_km: float | None,
    small_outputs: dict[str, Path | None],
    map_dir: Path | None,
    progress: bool,
) -> list[dict]:
    """The table (when any photo was located), the small outputs (``small_outputs``: --json,
    --csv, --geojson paths or None) and the maps; returns ``results``, each naming its map file
    when there are maps (same-named photos in different folders get different files)."""
    # Imported here: apps.outputs imports torch (instant --help).
    from globeflow.apps.outputs import map_file_names, with_map_names

    if any(r.get("ok") for r in results):
        print_predict_table(results, labels, title, region_radius_km)
    names = map_file_names(labels)
    if map_dir:
        results = with_map_names(results, names)
    write_predict_outputs(results, *small_outputs.values())
    if map_dir:
        write_maps(results, labels, names, map_dir, progress)
    return results


def _percent(p: float) -> str:
    """A probability in percent, with at least two significant digits (0.0092%, 41.4%)."""
    return f"{p:.1%}" if p >= 0.01 or p == 0 else f"{100 * p:.2g}%"


def report_region_and_fusion(results: list[dict]) -> None:
    """The mass inside --within per answer, and the fused answer's verdict (--same-place)."""
    for r in results:
        mass = r.get("mass_inside")
        if mass:
            typer.echo(
                f"{r['image']}: {_percent(mass['probability'])} ± {_percent(mass['stderr'])} of "
                f"the model's mass inside {mass['region']['description']}"
            )
        if "fusion" in r:
            fusion = r["fusion"]
            bf = fusion["log_bayes_factor_same_place"]
            typer.echo(
                f"{r['image']}: {fusion['product']} product (exponent {fusion['exponent']:g}); "
                f"effective sample size {r['effective_sample_size']:.0f}; log Bayes factor of one "
                f"place against unrelated places "
                + (f"{bf:.2f}" if bf is not None else "- (one distinct photo)")
            )
            if r.get("warning"):
                typer.secho(f"{r['image']}: {r['warning']}", fg=typer.colors.YELLOW, err=True)
        if r.get("error") and "effective_sample_size" in r:
            typer.secho(f"{r['image']}: {r['error']}", fg=typer.colors.YELLOW, err=True)


def print_predict_table(
    results: list[dict], labels: list[str], title: str, region_radius_km: float | None
) -> None:
    """The answers as a table on stdout (a row per photo; ``region_radius_km``: the fixed
    radius of the regions, None: each at its answer's scale), then each best guess's
    OpenStreetMap link."""
    # Imported here: core.families imports torch (instant --help).
    from globeflow.core.families import UNIFORM_LOCALIZABILITY_BITS

    table = Table(
        title=title,
        caption="localizability: bits above a uniform guess over the globe (0: no clue; each "
        "bit halves the area), and the area the answer spreads over; -: not estimated, or a "
        f"density in R³ (see the JSON). Uniform is {UNIFORM_LOCALIZABILITY_BITS:.2f} bits on "
        "the scale of localizability_bits.",
        caption_justify="left",
    )
    table.add_column("photo", overflow="fold")
    table.add_column("best guess\n(lat, lon)", no_wrap=True)
    table.add_column("place")
    if region_radius_km is None:
        table.add_column("top region\n(probability, 90% radius)")
    else:
        table.add_column(f"top region\n(radius {region_radius_km:g} km)")
    table.add_column("localizability\n(bits vs uniform)", no_wrap=True)
    table.add_column("error vs EXIF\n(km)", no_wrap=True)
    for row in _predict_rows(results, labels, region_radius_km is not None):
        table.add_row(*row)
    console = Console(width=piped_columns())
    console.print(table)
    # Full links below the table: a terminal or a log keeps them whole and clickable.
    console.print("OpenStreetMap at the best guess:", soft_wrap=True)
    for r, name in zip(results, labels, strict=True):
        if r.get("ok"):
            console.print(f"  {name}: {r['osm_url']}", soft_wrap=True, markup=False)


def report_unreadable(results: list[dict]) -> int:
    """List the photos that could not be read on stderr, one line each; returns their count."""
    failed = [r for r in results if not r.get("ok") and "effective_sample_size" not in r]
    if failed:
        typer.echo(f"{len(failed)} of {len(results)} photos could not be read:", err=True)
    for r in failed:
        typer.echo(f"  {r['error']}", err=True)
    return len(failed)


def write_predict_outputs(
    results: list[dict], json_out: Path | None, csv_out: Path | None, geojson_out: Path | None
) -> None:
    """--json, --csv and --geojson: every result in each file asked for (None: not asked)."""
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(results_to_json(results), encoding="utf-8")
    if csv_out:
        results_to_csv(results, csv_out)
    if geojson_out:
        geojson_out.parent.mkdir(parents=True, exist_ok=True)
        geojson_out.write_text(json.dumps(results_to_geojson(results), indent=1), encoding="utf-8")


def write_maps(
    results: list[dict], labels: list[str], names: list[str], map_dir: Path, progress: bool
) -> None:
    """A PNG per located photo, named after its label (``a/photo.jpg`` -> a__photo.jpg.png)."""
    # Imported here: torch, tqdm and matplotlib load only when maps are drawn (instant --help).
    import torch
    from tqdm.auto import tqdm

    from globeflow.answers.decode import sample_density_grid
    from globeflow.answers.maps import render_map

    map_dir.mkdir(parents=True, exist_ok=True)
    rows = zip(results, labels, names, strict=True)
    located = [(r, label, name) for r, label, name in rows if r.get("ok")]
    for r, label, name in tqdm(located, desc="drawing maps", unit="map", disable=not progress):
        samples = torch.tensor(r["samples"])
        extent = r.get("map_extent")
        render_map(
            map_dir / name,
            samples,
            density=sample_density_grid(samples, extent=extent),
            extent=extent,
            best_guess=(r["best_guess"]["lat"], r["best_guess"]["lon"]),
            truth=(r["exif_gps"]["lat"], r["exif_gps"]["lon"]) if r.get("exif_gps") else None,
            regions=r["regions"],
            title=label,
        )


def _area_km2(km2: float) -> str:
    """An area to two significant figures: 510M km², 4.1M km², 38k km², 120 km², 1.5 km²,
    below 1 km² in m²: 470,000 m², 50 m²."""
    if km2 < 1.0:
        return f"{float(f'{km2 * 1e6:.2g}'):,.0f} m²"
    scale, unit = next(((s, u) for s, u in ((1e6, "M"), (1e3, "k")) if km2 >= s), (1.0, ""))
    return f"{float(f'{km2 / scale:.2g}'):g}{unit} km²"


def _region_cell(region: dict | None, fixed_radius: bool) -> str:
    """ "Name (probability)" for a fixed radius (the header says it), else "Name (probability,
    radius)"."""
    # Imported here: answers.decode imports torch, answers.geocode numpy (instant --help).
    from globeflow.answers.decode import MIN_REGION_PROBABILITY
    from globeflow.answers.geocode import format_km

    if region is None:  # with a fixed radius: the samples are too spread for any disc of it
        return f"none holds {MIN_REGION_PROBABILITY:.0%}" if fixed_radius else "-"
    if fixed_radius:
        return f"{region['label']} ({region['probability']:.0%})"
    return f"{region['label']} ({region['probability']:.0%}, {format_km(region['radius_km'])})"


def _predict_rows(
    results: list[dict], labels: list[str], fixed_radius: bool = False
) -> list[list[str]]:
    """A table row per located photo (the photos that could not be read are listed apart)."""
    rows = []
    for r, name in zip(results, labels, strict=True):
        fusion = r.get("fusion") or {}
        if not r.get("ok"):
            if fusion:  # a refused fused answer says why in the table too
                rows.append([name, "-", f"no answer: {r.get('error')}", "-", "-", "-"])
            continue
        bg = r["best_guess"]
        place = bg["label"]
        if fusion.get("different_places"):
            place += "\n(the photos look like different places)"
        top = r["regions"][0] if r["regions"] else None
        bits, area = r.get("localizability_vs_uniform_bits"), r.get("effective_area_km2")
        rows.append(
            [
                name,
                f"{bg['lat']:.5f}, {bg['lon']:.5f}",
                place,
                _region_cell(top, fixed_radius),
                f"{bits:.1f} ({_area_km2(area)})" if bits is not None else "-",
                f"{r['error_km']:.0f}" if r.get("error_km") is not None else "-",
            ]
        )
    return rows
