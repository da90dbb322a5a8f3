"""uvicorn, configured for untrusted clients: a deadline for request heads and a cap on connections.

uvicorn times out idle keep-alive connections but not a client that sends its request head a byte at a time
(slowloris), so each connection here gets a deadline for its next request head; a body has its own deadline
(:func:`vlmkit.serving.body.read_body`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlmkit.serving.server import ServerSettings


class _HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within the deadline."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._requests_seen = 0
        self._arm()

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_expired, self._requests_seen)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self.cycle is not None:  # a complete head arrived: a new cycle began
            self._requests_seen += 1
            self._head_deadline.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_deadline.cancel()
        self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)

    def _head_expired(self, seen: int) -> None:
        if seen == self._requests_seen and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, settings: ServerSettings, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration :func:`vlmkit.serving.server.create_app`'s app runs under."""
    protocol = type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        app, host=host, port=port, http=protocol, limit_concurrency=settings.max_connections,
        timeout_keep_alive=5, **kwargs,
    )  # fmt: skip
