"""An OpenAI-compatible server (FastAPI) on top of the shared engine and its scheduler: chat completions, legacy
completions and the model list (response shapes in :mod:`vlmkit.serving.completions`)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.errors import ImageError, ProcessingError
from vlmkit.inference.options import GenerationOptions
from vlmkit.processing.conversation import ConversationError, parse_conversation
from vlmkit.processing.images import ImageAccess
from vlmkit.serving.body import parse_json, read_body
from vlmkit.serving.completions import (
    Submission,
    chat_logprobs,
    chat_stream,
    completion_logprobs,
    completion_stream,
    generation_options,
    usage,
)
from vlmkit.serving.errors import APIError
from vlmkit.serving.guard import RequestGuard
from vlmkit.serving.metrics import CONTENT_TYPE, metrics_text
from vlmkit.serving.page import add_chat_page
from vlmkit.serving.scheduler import Scheduler
from vlmkit.serving.schemas import ChatCompletionRequest, CompletionRequest, unsupported_fields

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


COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for the legacy completions endpoint."""


def _options(request: ChatCompletionRequest, settings: ServerSettings) -> GenerationOptions:
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    response_format = request.response_format.model_dump() if request.response_format is not None else None
    return generation_options(
        request,
        max_tokens=request.max_completion_tokens or request.max_tokens or settings.default_max_tokens,
        max_n=settings.max_batch,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        response_format=response_format,
    )


def _encode_error(exc: ImageError | ProcessingError, param: str) -> APIError:
    if isinstance(exc, ImageError):
        return APIError(400, str(exc), param, "invalid_image")
    code = "context_length_exceeded" if "context" in str(exc) else "invalid_request"
    return APIError(400, str(exc), param, code)


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
        log.info("cache figures: %s", vlm.cache_stats())

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

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text: requests running and waiting, the caches' lookups, hits and bytes."""
        _authorise(request)
        active, waiting = state["scheduler"].load
        return Response(metrics_text(active, waiting, vlm.cache_stats()), media_type=CONTENT_TYPE)

    if settings.ui:
        add_chat_page(app, settings.model_name, vlm.notice, api_key_required=settings.api_key is not None)

    def _model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "vlmkit"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorise(request)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        _authorise(request)
        if model_id != settings.model_name:
            raise APIError(404, f"model {model_id!r} not found; this server has {settings.model_name!r}", "model",
                           "model_not_found")  # fmt: skip
        return _model_card()

    async def _body(request: Request, schema: type[Any], completions: bool = False) -> Any:
        """The checked request body: key, Content-Type, size and time, JSON, refused fields, schema, model."""
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
        for param, message in unsupported_fields(data, completions=completions):
            raise APIError(400, message, param, "unsupported_parameter")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(422, f"{param}: {first['msg']}", param, "invalid_value") from exc
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} not found; this server has {settings.model_name!r}", "model",
                           "model_not_found")  # fmt: skip
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request, ChatCompletionRequest)
        messages = _messages(body, settings.max_images_per_request)
        options = _options(body, settings)
        try:
            encoded = await run_in_threadpool(vlm.engine.encode, messages, "request")
        except (ImageError, ProcessingError) as exc:
            raise _encode_error(exc, "messages") from exc
        image_tokens = sum(encoded.image_token_counts)
        prompt_tokens = len(encoded.input_ids)
        submission = Submission(state["scheduler"], options)
        submission.submit([encoded])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name}  # fmt: skip
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = chat_stream(submission, {**head, "object": "chat.completion.chunk"}, include_usage,
                                 prompt_tokens, image_tokens)  # fmt: skip
            return StreamingResponse(stream, media_type="text/event-stream")
        results = await submission.results(request)
        if results is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        answers = [results[(0, choice)] for choice in range(options.n)]
        choices = [{"index": r.choice, "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason, "logprobs": chat_logprobs(r.logprobs)}
                   for r in answers]  # fmt: skip
        return {**head, "choices": choices, "usage": usage(answers, prompt_tokens, image_tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, CompletionRequest, completions=True)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        if len(prompts) * (body.n or 1) > settings.max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) × n={body.n or 1} answers is over this server's limit "
                                f"of {settings.max_batch} (--max-batch)", "prompt")  # fmt: skip
        encode_prompt = getattr(vlm.engine, "encode_prompt", None)
        if encode_prompt is None:
            raise APIError(400, "this model's backend takes chat messages only; use /v1/chat/completions", "prompt")
        options = generation_options(body, max_tokens=body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
                                     max_n=settings.max_batch, logprobs=body.logprobs)  # fmt: skip
        encoded = []
        for p, text in enumerate(prompts):
            try:
                encoded.append(await run_in_threadpool(encode_prompt, text, f"prompt {p}"))
            except (ImageError, ProcessingError) as exc:
                raise _encode_error(exc, "prompt") from exc
        prompt_tokens = sum(len(e.input_ids) for e in encoded)
        submission = Submission(state["scheduler"], options)
        submission.submit(encoded)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}  # fmt: skip
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(completion_stream(submission, head, include_usage, prompt_tokens),
                                     media_type="text/event-stream")  # fmt: skip
        results = await submission.results(request)
        if results is None:
            return Response(status_code=499)
        answers = [results[(p, choice)] for p in range(len(prompts)) for choice in range(options.n)]
        choices = [{"text": r.text, "index": i, "logprobs": completion_logprobs(r.logprobs),
                    "finish_reason": r.finish_reason} for i, r in enumerate(answers)]  # fmt: skip
        return {**head, "choices": choices, "usage": usage(answers, prompt_tokens, 0)}

    return app
