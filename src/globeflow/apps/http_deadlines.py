"""Deadlines for slow HTTP clients: uvicorn's h11 protocol, cut when a request arrives too slowly.

uvicorn bounds only the idle time between requests (keep-alive). A client that sends its request
head or body a few bytes at a time would hold its connection, and a slot of the connection
limit, for ever. Here the head of a request must be complete ``head_timeout_s`` after the server
starts waiting for it, and its body ``body_timeout_s`` after the head; otherwise the client gets
``408 Request Timeout`` (unless a response has begun) and the connection is closed. Trickling
bytes does not extend a deadline.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["deadline_protocol"]


def _timeout_response(what: str) -> bytes:
    body = f"{what} not received in time; closing the connection\n".encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _DeadlineH11Protocol(H11Protocol):
    """H11Protocol with one timer per phase in which the server waits for the client."""

    head_timeout_s = 10.0
    body_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of what the connection now waits for: a request head, a body, or
        nothing from the client (the app is working or answering)."""
        if self.transport.is_closing():
            self._set_phase(None)
        elif self.conn.their_state is h11.SEND_BODY:
            self._set_phase("request body")
        elif self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        ):
            self._set_phase("request head")
        else:
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # same phase: the deadline set when it began still holds
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            limit = self.head_timeout_s if phase == "request head" else self.body_timeout_s
            self._timer = self.loop.call_later(limit, self._expire, phase)

    def _expire(self, phase: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_timeout_response(phase))
        self.logger.info("closing a connection: %s not received in time", phase)
        self.transport.close()


def deadline_protocol(head_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """An uvicorn ``http`` protocol class with these deadlines (seconds, each > 0)."""
    for name, value in (("head_timeout_s", head_timeout_s), ("body_timeout_s", body_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    return type(
        "DeadlineH11Protocol",
        (_DeadlineH11Protocol,),
        {"head_timeout_s": float(head_timeout_s), "body_timeout_s": float(body_timeout_s)},
    )
