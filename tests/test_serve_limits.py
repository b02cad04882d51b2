"""The real server on loopback: slow clients are cut, connections are capped, and `globeflow
serve` refuses settings it cannot work with before loading a model."""

from __future__ import annotations

import select
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _fake_locator import FakeLocator  # noqa: E402
from _live_server import free_port, start_live_server  # noqa: E402

from globeflow.apps.cli import app as cli  # noqa: E402
from globeflow.apps.server import create_app  # noqa: E402

HEAD_S, BODY_S = 1.0, 1.5


@pytest.fixture
def server_at():
    """Start a server on loopback with short deadlines; yields a function of max_connections
    that returns the port."""
    running = []

    def start(max_connections: int = 64) -> int:
        port, server, thread = start_live_server(
            create_app(FakeLocator()),
            head_timeout_s=HEAD_S,
            body_timeout_s=BODY_S,
            max_connections=max_connections,
        )
        running.append((server, thread))
        return port

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)


def _connect(port: int, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(first_bytes)
    return sock


def _trickle_until_closed(socks: list[socket.socket], limit_s: float) -> dict[int, bytes]:
    """Send one byte every 0.2 s on every open socket until the server closes it (or
    ``limit_s`` passes); returns what each closed socket received, by index."""
    received: dict[int, bytes] = {i: b"" for i in range(len(socks))}
    closed: dict[int, bytes] = {}
    deadline = time.monotonic() + limit_s
    while len(closed) < len(socks) and time.monotonic() < deadline:
        open_ = [s for i, s in enumerate(socks) if i not in closed]
        readable, _, _ = select.select(open_, [], [], 0.2)
        for s in readable:
            i = socks.index(s)
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                chunk = b""
            received[i] += chunk
            if not chunk:
                closed[i] = received[i]
        for i, s in enumerate(socks):
            if i not in closed:
                try:
                    s.send(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    closed[i] = received[i]
    for s in socks:
        s.close()
    return closed


def test_slow_headers_and_slow_bodies_are_cut(server_at) -> None:
    port = server_at()
    slow_heads = [
        _connect(port, b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(8)
    ]
    body_head = (
        b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=zz\r\nContent-Length: 100000\r\n\r\n--zz\r\n"
    )
    slow_bodies = [_connect(port, body_head) for _ in range(8)]
    start = time.monotonic()
    # The server keeps answering others meanwhile.
    assert httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).status_code == 200
    closed = _trickle_until_closed(slow_heads + slow_bodies, limit_s=HEAD_S + BODY_S + 5)
    took = time.monotonic() - start
    assert len(closed) == 16, f"{16 - len(closed)} slow connections still open after {took:.1f}s"
    assert took < BODY_S + 3
    for i, answer in closed.items():
        assert answer.startswith(b"HTTP/1.1 408"), (i, answer[:80])
        assert (b"request head" if i < 8 else b"request body") in answer
    assert httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).status_code == 200


def test_connections_beyond_the_limit_get_503_until_idle_ones_are_cut(server_at) -> None:
    port = server_at(max_connections=4)
    idle = [_connect(port, b"") for _ in range(4)]
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
        assert r.status_code == 503
        time.sleep(HEAD_S + 0.5)  # the idle connections sent no request head in time
        r = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
        assert r.status_code == 200
    finally:
        for s in idle:
            s.close()


def test_a_normal_keep_alive_client_is_not_cut(server_at) -> None:
    port = server_at()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        for _ in range(3):  # slower than the head deadline in total, fast per request
            assert client.get("/v1/health").status_code == 200
            time.sleep(HEAD_S * 0.6)


# ----------------------------------------------------------------------------- the command


def _serve(*args: str):
    return CliRunner().invoke(cli, ["serve", *args])


def test_serve_without_config_json_is_a_clear_error(tmp_path) -> None:
    result = _serve("--model", str(tmp_path), "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    assert "config.json" in result.output and str(tmp_path) in result.output
    assert "Traceback" not in result.output


def test_serve_names_an_unknown_encoder_as_predict_does() -> None:
    result = _serve("--encoder", "banana", "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    assert "--encoder banana: unknown encoder 'banana'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port", "99999"], "--port 99999: must be an integer in [1, 65535]"),
        (["--port", "0"], "--port 0: must be an integer in [1, 65535]"),
        (["--max-upload-mb", "-1"], "--max-upload-mb -1.0: must be a finite number > 0"),
        (["--max-upload-mb", "nan"], "--max-upload-mb nan: must be a finite number > 0"),
        (["--host", "no-such-host.invalid"], "no-such-host.invalid: cannot listen"),
        (["--tiles", "ftp://tiles.example/{z}/{x}/{y}.png"], "not an http(s) URL"),
        (["--tiles", "https://tiles.example/{z}/{x}.png"], "the URL template lacks {y}"),
    ],
)
def test_serve_refuses_settings_before_loading_a_model(args, expected) -> None:
    result = _serve("--model", "/nonexistent/model", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output


def test_serve_on_a_busy_port_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve("--model", "/nonexistent/model", "--port", str(port))
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def test_a_chunked_upload_is_refused_as_soon_as_it_passes_the_limit() -> None:
    port, server, thread = start_live_server(
        create_app(FakeLocator(), max_upload_mb=1, max_files=2)
    )
    sock = _connect(port, b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n")
    sock.sendall(b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
    sock.sendall(
        _chunk(b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n')
    )
    sent, block = 0, b"\xff" * 2**20
    try:
        while sent < 2**28 and not select.select([sock], [], [], 0)[0]:  # until it answers
            sock.sendall(_chunk(block))
            sent += len(block)
    except OSError:
        pass  # the server stopped reading and closed
    reply = sock.recv(4096)
    sock.settimeout(5)
    try:  # the body may come in a segment of its own
        while b"request too large" not in reply and (more := sock.recv(4096)):
            reply += more
    except OSError:
        pass
    sock.close()
    server.should_exit = True
    thread.join(10)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request too large" in reply
    assert sent <= 16 * 2**20  # the limit is 3 MB (2 files of 1 MB and 1 MB of form)


def test_a_request_whose_client_has_gone_is_not_computed() -> None:
    class Recording(FakeLocator):
        names: list[str] = []

        def locate_images(self, images, **kw):
            self.names.extend(name for name, _ in images)
            return super().locate_images(images, **kw)

    locator = Recording(delay_s=0.5)
    app = create_app(locator, max_batch=1)
    port, server, thread = start_live_server(app)
    url = f"http://127.0.0.1:{port}/v1/locate"
    photo = (Path(__file__).parent.parent / "examples").glob("*.jpg")
    data = next(photo).read_bytes()
    with httpx.Client(timeout=20) as client:
        first = threading.Thread(
            target=client.post, args=(url,), kwargs={"files": {"file": ("a.jpg", data)}}
        )
        first.start()
        while not locator.names:  # the worker is busy with a.jpg
            time.sleep(0.01)
        body = httpx.Request("POST", url, files={"file": ("gone.jpg", data)})
        head = f"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body.read())}\r\n"
        head += f"Content-Type: {body.headers['content-type']}\r\n\r\n"
        gone = _connect(port, head.encode() + body.content)
        while app.state.worker.pending == 0:  # gone.jpg is queued behind a.jpg
            time.sleep(0.01)
        gone.close()
        first.join()
        assert client.post(url, files={"file": ("c.jpg", data)}).status_code == 200
    server.should_exit = True
    thread.join(10)
    assert locator.names == ["a.jpg", "c.jpg"]
