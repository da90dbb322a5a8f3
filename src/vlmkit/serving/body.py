"""Reading a request body within its limits: size while it streams in, a total deadline, JSON shape and text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request

from vlmkit.serving.errors import APIError

MAX_JSON_DEPTH = 64
"""Deeper JSON is refused before validation (a 100k-deep body would exhaust the interpreter's stack)."""


async def read_body(request: Request, limit_bytes: int, limit_mb: float, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit_bytes`` (declared or chunked), or 408 when it has
    not fully arrived within ``timeout_s`` seconds (a slow client)."""
    too_large = APIError(413, f"request body is over the {limit_mb:g} MB limit", None, "request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit_bytes:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError as exc:
        raise APIError(408, f"request body not received within {timeout_s:g} s", None, "request_timeout") from exc
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """Parse a JSON body: 400 for malformed JSON, nesting deeper than :data:`MAX_JSON_DEPTH`, or strings that
    are not valid Unicode (lone surrogates such as ``"\\ud800"``, which no tokenizer can encode)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}", None, "invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json") from exc
    _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"{path or 'body'}: invalid Unicode ({exc.reason} at character {exc.start}; a lone surrogate?)"
        raise APIError(400, message, path or None, "invalid_unicode") from exc
