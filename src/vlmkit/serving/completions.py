"""What the server's generation routes share: options from a request body, submitting its prompts (one ticket
per prompt, all answers on one queue), and OpenAI's response shapes for chat and legacy completions (bodies and
SSE chunks, ``n`` choices, ``logprobs``)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from vlmkit.errors import ConfigError
from vlmkit.inference.constrained import compile_response_format
from vlmkit.inference.options import GenerationOptions, GenerationResult, TokenLogprob, check_response_format
from vlmkit.inference.rows import StreamEvent
from vlmkit.serving.errors import APIError
from vlmkit.serving.scheduler import QueueFull, Scheduler, ShuttingDown, Ticket

SERVER_ERROR = {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}


def generation_options(
    body: Any,
    *,
    max_tokens: int,
    max_n: int,
    logprobs: int | None = None,
    response_format: dict[str, Any] | None = None,
) -> GenerationOptions:
    """A request body's options (OpenAI's defaults: temperature 1); ``n`` at most ``max_n`` (``--max-batch``)."""
    n = body.n or 1
    if n > max_n:
        raise APIError(400, f"n={n} is over this server's limit of {max_n} answers per request (--max-batch)", "n")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    try:
        check_response_format(response_format)
        compile_response_format(response_format)
        return GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            top_k=max(body.top_k or 0, 0),
            repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
            stop=tuple(stop),
            seed=body.seed,
            n=n,
            logprobs=logprobs,
            response_format=response_format,
        )
    except ConfigError as exc:
        param = "response_format" if "response_format" in str(exc) else None
        raise APIError(400, str(exc), param) from exc


def usage(results: list[GenerationResult], prompt_tokens: int, image_tokens: int) -> dict[str, Any]:
    """OpenAI's usage: the prompts counted once each, the completion tokens of every answer."""
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": image_tokens},
    }


def _finite(value: float) -> float:
    """A logprob JSON can hold: -inf becomes -9999.0 (OpenAI's stand-in)."""
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat completions' ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``."""
    if tokens is None:
        return None
    content = [
        {"token": t.token, "logprob": _finite(t.logprob), "bytes": list(t.bytes),
         "top_logprobs": [{"token": a.token, "logprob": _finite(a.logprob), "bytes": list(a.bytes)} for a in t.top]}
        for t in tokens
    ]  # fmt: skip
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """Legacy completions' ``logprobs``: parallel lists of tokens, their logprobs, the likeliest tokens at each
    step (the chosen one included, so up to ``logprobs + 1`` entries) and each token's character offset."""
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [_finite(t.logprob) for t in tokens],
        "top_logprobs": [{**{a.token: _finite(a.logprob) for a in t.top}, t.token: _finite(t.logprob)} for t in tokens],
        "text_offset": offsets,
    }


@dataclass
class Submission:
    """The tickets of one request (one per prompt), their events on one queue as ``(prompt, event)``."""

    scheduler: Scheduler
    options: GenerationOptions
    tickets: list[Ticket] = field(default_factory=list)
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException]] = field(default_factory=asyncio.Queue)

    @property
    def answers(self) -> int:
        return len(self.tickets) * self.options.n

    def submit(self, encoded: list[Any]) -> None:
        """Queue every prompt (429 when the queue is full, 503 when shutting down; earlier prompts are cancelled)."""
        loop = asyncio.get_running_loop()

        def deliver_to(prompt: int) -> Callable[[StreamEvent | BaseException], None]:
            def deliver(event: StreamEvent | BaseException) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (prompt, event))

            return deliver

        try:
            for p, prompt in enumerate(encoded):
                self.tickets.append(self.scheduler.submit(Ticket(prompt, self.options, deliver_to(p))))
        except (QueueFull, ShuttingDown) as exc:
            self.cancel()
            if isinstance(exc, QueueFull):
                raise APIError(429, f"server busy: {exc}", None, "queue_full") from exc
            raise APIError(503, str(exc), None, "shutting_down") from exc

    def cancel(self) -> None:
        for ticket in self.tickets:
            self.scheduler.cancel(ticket)

    async def results(self, request: Request, poll_s: float = 0.25) -> dict[tuple[int, int], GenerationResult] | None:
        """Every answer's result by ``(prompt, choice)``; None as soon as the client has disconnected."""
        found: dict[tuple[int, int], GenerationResult] = {}
        checked = time.monotonic()
        try:
            while len(found) < self.answers:
                try:
                    item = await asyncio.wait_for(self.queue.get(), poll_s)
                except TimeoutError:
                    item = None
                # every poll_s, also while pieces keep arriving (they would never let the wait time out)
                if time.monotonic() - checked >= poll_s:
                    if await request.is_disconnected():
                        return None
                    checked = time.monotonic()
                if item is None:
                    continue
                prompt, event = item
                if isinstance(event, BaseException):
                    raise event
                if event.result is not None:
                    found[(prompt, event.choice)] = event.result
            return found
        finally:
            self.cancel()

    async def events(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Each event until every answer has finished; an error ends the stream with OpenAI's error chunk
        (raised as :class:`StreamFailed`). Leaving early cancels the request."""
        finished = 0
        try:
            while finished < self.answers:
                prompt, event = await self.queue.get()
                if isinstance(event, BaseException):
                    raise StreamFailed(event)
                if event.result is not None:
                    finished += 1
                yield prompt, event
        finally:
            if finished < self.answers:
                self.cancel()  # the client went away (or a row failed): free the slots now


class StreamFailed(Exception):
    """A streamed request failed after its response started."""


def sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


async def chat_stream(
    submission: Submission, head: dict[str, Any], include_usage: bool, prompt_tokens: int, image_tokens: int
) -> AsyncIterator[str]:
    """Chat completion chunks: a role chunk per choice, content deltas (with their logprobs), a chunk with each
    choice's ``finish_reason``, the usage chunk (``choices: []``) when asked, then ``[DONE]``."""

    def chunk(choice: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return sse({**head, "choices": [{"index": choice, "delta": delta, "finish_reason": finish,
                                         "logprobs": logprobs}]})  # fmt: skip

    results: list[GenerationResult] = []
    wants = submission.options.logprobs is not None
    for choice in range(submission.options.n):
        yield chunk(choice, {"role": "assistant", "content": ""})
    try:
        async for _, event in submission.events():
            if event.text or (wants and event.logprobs):
                yield chunk(event.choice, {"content": event.text}, logprobs=chat_logprobs(event.logprobs))
            if event.result is not None:
                results.append(event.result)
                yield chunk(event.choice, {}, event.result.finish_reason)
    except StreamFailed:
        yield sse(SERVER_ERROR)
        return
    finally:
        submission.cancel()  # a client that left: its rows leave the batch now (finished ones: nothing to do)
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(results, prompt_tokens, image_tokens)})
    yield sse("[DONE]")


async def completion_stream(
    submission: Submission, head: dict[str, Any], include_usage: bool, prompt_tokens: int
) -> AsyncIterator[str]:
    """Legacy completion chunks: ``{"choices": [{"text", "index", "logprobs", "finish_reason"}]}``, choice index
    ``prompt * n + choice``; the usage chunk when asked, then ``[DONE]``."""
    n = submission.options.n
    offsets: dict[int, int] = {}
    results: list[GenerationResult] = []
    try:
        async for prompt, event in submission.events():
            index = prompt * n + event.choice
            logprobs = completion_logprobs(event.logprobs, offsets.get(index, 0))
            if event.logprobs:
                offsets[index] = offsets.get(index, 0) + sum(len(t.token) for t in event.logprobs)
            finish = event.result.finish_reason if event.result is not None else None
            if event.text or finish or event.logprobs:
                yield sse({**head, "choices": [{"text": event.text, "index": index, "logprobs": logprobs,
                                                "finish_reason": finish}]})  # fmt: skip
            if event.result is not None:
                results.append(event.result)
    except StreamFailed:
        yield sse(SERVER_ERROR)
        return
    finally:
        submission.cancel()
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(results, prompt_tokens, 0)})
    yield sse("[DONE]")
