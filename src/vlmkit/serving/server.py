"""An OpenAI-compatible chat completions server (FastAPI) on top of the shared engine and its scheduler."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.errors import ConfigError, ImageError, ProcessingError
from vlmkit.inference.engine import StreamEvent
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.processing.conversation import ConversationError, parse_conversation
from vlmkit.processing.images import ImageAccess
from vlmkit.serving.body import parse_json, read_body
from vlmkit.serving.errors import APIError
from vlmkit.serving.guard import RequestGuard
from vlmkit.serving.page import add_chat_page
from vlmkit.serving.scheduler import QueueFull, Scheduler, ShuttingDown, Ticket
from vlmkit.serving.schemas import ChatCompletionRequest, unsupported_fields

if TYPE_CHECKING:
    from vlmkit.api import VLM

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Limits and policies of one server; each has a ``vlmkit serve`` flag."""

    model_name: str = "default"
    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_body_mb: float = 20.0
    max_images_per_request: int = 8
    max_image_tokens: int | None = None
    """Image tokens per request, checked before any view is built (None: the model's context length)."""
    allow_remote_images: bool = False
    allowed_local_media_path: str | None = None
    default_max_tokens: int = 256
    allowed_hosts: tuple[str, ...] | None = ("127.0.0.1", "localhost", "::1")
    """Host header values served (DNS rebinding); None: any. ``vlmkit serve`` derives it from ``--host``."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins (``scheme://host[:port]``) besides the server's own that may POST; ``*``: any."""
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_connections: int = 512
    remote_image_timeout_s: float = 5.0
    ui: bool = True
    """Serve the chat page at ``/`` (``--no-ui``: off)."""


def _messages(request: ChatCompletionRequest, max_images: int) -> list[dict[str, Any]]:
    """OpenAI messages → vlmkit messages (:func:`parse_conversation`'s OpenAI form), checking the image count."""
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    try:
        conversation = parse_conversation(messages, name="request", openai=True)
    except ConversationError as exc:
        raise APIError(400, exc.reason, exc.path, exc.code) from exc
    if len(conversation.images) > max_images:
        text = f"At most {max_images} image(s) may be provided in one prompt"
        raise APIError(400, text, "messages", "too_many_images")
    return conversation.to_messages()


def _options(request: ChatCompletionRequest, settings: ServerSettings) -> GenerationOptions:
    if request.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    try:
        return GenerationOptions(
            max_new_tokens=request.max_completion_tokens or request.max_tokens or settings.default_max_tokens,
            temperature=request.temperature if request.temperature is not None else 1.0,
            top_p=request.top_p if request.top_p is not None else 1.0,
            top_k=max(request.top_k or 0, 0),
            repetition_penalty=request.repetition_penalty if request.repetition_penalty is not None else 1.0,
            stop=tuple(stop),
            seed=request.seed,
        )
    except ConfigError as exc:
        raise APIError(400, str(exc)) from exc


def _usage(result: GenerationResult, image_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": image_tokens},
    }


def create_app(vlm: VLM, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``vlm`` (a :class:`vlmkit.api.VLM`) under ``settings``."""
    processor = vlm.processor
    root = Path(settings.allowed_local_media_path).resolve() if settings.allowed_local_media_path else None
    processor.image_access = ImageAccess(allow_local=False, local_root=root, allow_remote=settings.allow_remote_images,
                                         remote_timeout=settings.remote_image_timeout_s)  # fmt: skip
    processor.max_image_tokens = settings.max_image_tokens or vlm.engine.context_length
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = Scheduler(vlm.engine, settings.max_batch, settings.max_queue)
        yield
        log.info("draining in-flight requests")
        await run_in_threadpool(state["scheduler"].drain)

    # with an API key, the schema pages would tell anyone what the server takes: they are off
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if settings.api_key else {}
    app = FastAPI(title="vlmkit", lifespan=lifespan, **docs)  # type: ignore[arg-type]
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, allowed_origins=settings.allowed_origins)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), None, code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}},
            status_code=500,
        )

    def _authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(header, f"Bearer {settings.api_key}".encode()):  # constant time
            raise APIError(401, "missing or incorrect API key", None, "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, waiting = state["scheduler"].load
        return {"status": "ok", "model": settings.model_name, "active": active, "waiting": waiting}

    if settings.ui:
        add_chat_page(app, settings.model_name, vlm.notice, api_key_required=settings.api_key is not None)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorise(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlmkit"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorise(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # also what makes a cross-site form POST impossible
            raise APIError(415, f"Content-Type must be application/json, got {kind or 'none'!r}", None,
                           "unsupported_media_type")  # fmt: skip
        limit = int(settings.max_body_mb * 1024 * 1024)
        raw = await read_body(request, limit, settings.max_body_mb, settings.body_timeout_s)
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", None, "invalid_json")
        for param, message in unsupported_fields(data):
            raise APIError(400, message, param, "unsupported_parameter")
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(422, f"{param}: {first['msg']}", param, "invalid_value") from exc
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} not found; this server has {settings.model_name!r}", "model",
                           "model_not_found")  # fmt: skip
        messages = _messages(body, settings.max_images_per_request)
        options = _options(body, settings)
        try:
            encoded = await run_in_threadpool(vlm.engine.encode, messages, "request")
        except ImageError as exc:
            raise APIError(400, str(exc), "messages", "invalid_image") from exc
        except ProcessingError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else "invalid_request"
            raise APIError(400, str(exc), "messages", code) from exc
        image_tokens = sum(encoded.image_token_counts)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()

        def deliver(event: StreamEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        ticket = Ticket(encoded, options, deliver)
        try:
            state["scheduler"].submit(ticket)
        except QueueFull as exc:
            raise APIError(429, f"server busy: {exc}", None, "queue_full") from exc
        except ShuttingDown as exc:
            raise APIError(503, str(exc), None, "shutting_down") from exc
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _sse(state["scheduler"], ticket, events, completion_id, created, settings.model_name,
                          include_usage, image_tokens)  # fmt: skip
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            result = await _final(events, request)
        finally:
            state["scheduler"].cancel(ticket)
        if result is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result, image_tokens),
        }  # fmt: skip

    return app


async def _final(events: asyncio.Queue, request: Request, poll_s: float = 0.25) -> GenerationResult | None:
    """The request's result; None as soon as its client has disconnected (the caller cancels it)."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), poll_s)
        except TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if isinstance(event, BaseException):
            raise event
        if event.result is not None:
            return event.result


async def _sse(
    scheduler: Scheduler,
    ticket: Ticket,
    events: asyncio.Queue,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    image_tokens: int,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model,
                                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                              "logprobs": None}]}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, BaseException):
                error = {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
                return
            if event.text:
                yield chunk({"content": event.text})
            if event.result is not None:
                finished = True
                yield chunk({}, event.result.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(event.result, image_tokens))
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:
            scheduler.cancel(ticket)  # the client went away: free its slot now
