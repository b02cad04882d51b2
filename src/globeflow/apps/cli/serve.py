"""``globeflow serve``: the local web app and JSON API."""

from __future__ import annotations

import typer

from globeflow.apps.cli._common import (
    DEVICE_DEFAULT,
    DeviceOption,
    EncoderPathOption,
    FamilyOption,
    ModelOption,
    check_options,
    fail,
    load_locator,
)


def serve(
    model: ModelOption = None,
    family: FamilyOption = None,
    encoder: str = typer.Option(None, help="Override the encoder named by the model."),
    encoder_path: EncoderPathOption = None,
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."
    ),
    port: int = typer.Option(8000, help="TCP port to listen on (1-65535)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload, in MB (> 0)."),
    device: DeviceOption = DEVICE_DEFAULT,
    tiles: str = typer.Option(
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png",
        help="Map tiles the page shows when the browser reaches them ({z}/{x}/{y} URL "
        "template, OpenStreetMap attribution); 'none': only the bundled offline map.",
    ),
) -> None:
    """Start the local web app and JSON API (http://HOST:PORT)."""
    # Imported here: the server (fastapi, the model, torch) loads only when the command runs.
    from globeflow.apps.server import SERVE_LIMITS, check_listen_address
    from globeflow.apps.server import serve as run_server
    from globeflow.apps.server_basemap import parse_tiles

    check_options(SERVE_LIMITS, port=port, max_upload_mb=max_upload_mb)
    try:
        tile_url = parse_tiles(tiles)
    except ValueError as exc:
        fail(str(exc))
    try:  # the address before the model: a busy port should not wait for the model to load
        check_listen_address(host, port)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    locator = load_locator(model, encoder, family, encoder_path, device)
    run_server(locator, host=host, port=port, max_upload_mb=max_upload_mb, tiles=tile_url)
