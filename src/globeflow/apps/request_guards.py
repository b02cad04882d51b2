"""Guards of the web server against requests it should not spend work on.

:class:`BodyLimit` refuses a request body larger than the server could ever accept with 413 as
soon as the limit is passed: by its ``Content-Length`` before reading anything, or, for a body
sent without one (chunked), while it streams in, instead of after the multipart parser has
spooled it whole to disk. :func:`unless_disconnected` waits for a request's answers and cancels
those not started yet when the client goes away, so that the batch worker skips them and the
next request does not wait behind work nobody will read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "ClientGone", "too_many_files", "unless_disconnected"]


class ClientGone(Exception):
    """The client closed the connection before its answers were computed."""


class BodyLimit:
    """ASGI middleware: 413 with ``message(size_mb)`` for bodies above ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int, message: Callable[[float], str]) -> None:
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(int(length), scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # handled by the app's HTTPException handler
                    raise HTTPException(413, self.message(received / 2**20))
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": self.message(size / 2**20)}, status_code=413)
        await response(scope, receive, send)


def too_many_files(detail: object, max_files: int) -> str | None:
    """Our message for the multipart parser's own file-count error (raised before the route
    can count the files), None for any other error."""
    if isinstance(detail, str) and "number of files" in detail.lower():
        return f"too many files (more than {max_files}); at most {max_files} per request"
    return None


async def unless_disconnected(
    request: Request,
    submit: Callable[[], Sequence[concurrent.futures.Future]],
    poll_s: float = 0.1,
) -> list:
    """Submit the request's work (unless its client is gone already) and return the results in
    order; :class:`ClientGone` as soon as the client disconnects, after cancelling the work not
    started yet (also cancelled when one piece fails)."""
    if await request.is_disconnected():
        raise ClientGone
    futures = submit()
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    try:
        while not (await asyncio.wait({waiting}, timeout=poll_s))[0]:
            if await request.is_disconnected():
                raise ClientGone
        return await waiting
    except BaseException:
        for future in futures:
            future.cancel()
        waiting.cancel()
        raise
