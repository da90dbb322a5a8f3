"""Which requests reach the app at all: the Host a client asked for, and the web page a browser sent it from.

- **Host** (DNS rebinding): a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 reaches a local
  server with ``Host: evil.example``. Only the hosts the server is known by are served (400 otherwise).
- **Origin** (cross-site requests): a browser names the page that sent a request in ``Origin``. A request from a
  page other than the server's own (or one listed in ``allowed_origins``) is refused with 403 before it runs,
  so a web page can't make a visitor's browser spend the server or read its answers.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vlmkit.serving.errors import APIError

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def host_name(host: str) -> str:
    """``Host`` header → host name: no port, no IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware refusing requests for other hosts (400) and from other web origins (403)."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: tuple[str, ...] | None, allowed_origins: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None or "*" in allowed_hosts else {
            host_name(h) for h in allowed_hosts
        }  # fmt: skip
        self.any_origin = "*" in allowed_origins
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await _answer(send, error)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            return APIError(400, f"this server does not serve host {host!r}", None, "invalid_host")
        origin = headers.get("origin")
        if origin is None or self.any_origin:
            return None
        if origin.rstrip("/").lower() in self.allowed_origins:
            return None
        netloc = urllib.parse.urlsplit(origin).netloc.lower()
        if origin != "null" and netloc == host.lower():
            return None  # the server's own page
        return APIError(403, f"requests from web origin {origin!r} are not allowed", None, "origin_not_allowed")


async def _answer(send: Callable, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
