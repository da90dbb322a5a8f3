"""The chat page at ``/``: three static files shipped with the package and a config the page reads at start.

The page is a client of the API like any other: it calls ``/v1/chat/completions`` (streaming) from the same
origin, so the Host, Origin and Content-Type checks and the API key apply to it unchanged.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

FILES = {"index.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css"}

HEADERS = {
    # only this server's own scripts, styles and API; images only as the data URLs the user attached
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",  # no clickjacking by another site framing the page
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_chat_page(app: FastAPI, model_name: str, notice: str | None, api_key_required: bool) -> None:
    """Serve the chat page at ``/``, its files under ``/ui/`` and what it shows in ``/ui/config.json``."""
    folder = resources.files("vlmkit.serving") / "static"
    bodies = {name: (folder / name).read_bytes() for name in FILES}

    def static(name: str) -> Response:
        return Response(bodies[name], media_type=f"{FILES[name]}; charset=utf-8", headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return static("index.html")

    @app.get("/ui/chat.js", include_in_schema=False)
    async def script() -> Response:
        return static("chat.js")

    @app.get("/ui/chat.css", include_in_schema=False)
    async def style() -> Response:
        return static("chat.css")

    @app.get("/ui/config.json", include_in_schema=False)
    async def config() -> dict[str, Any]:
        # nothing /health does not already tell: the model's name, its notice, whether a key is needed
        return {"model": model_name, "notice": notice, "api_key_required": api_key_required}
