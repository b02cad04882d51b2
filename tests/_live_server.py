"""A real uvicorn server (as `globeflow serve` builds it) on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from globeflow.apps.server import build_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_live_server(app: Any, **options: Any) -> tuple[int, Any, threading.Thread]:
    """(port, uvicorn.Server, thread) once the server accepts connections; ``options`` go to
    :func:`globeflow.apps.server.build_server`. Stop with ``server.should_exit = True``."""
    port = free_port()
    server = build_server(app, "127.0.0.1", port, log_level="warning", **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.02)
    return port, server, thread
