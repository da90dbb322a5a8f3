"""An OpenAI-compatible chat-completions client for teacher runs: a concurrency limit, retries with exponential
backoff and jitter (``Retry-After`` honoured), a per-run request and token budget, and usage counts.

What goes wrong with a request decides what happens to it:

- 429, 408, 5xx, timeouts, dropped connections, malformed JSON and truncated streams are retried, up to
  ``max_retries`` times; after that :class:`TeacherUnavailable` (the item is left for a later run);
- any other 4xx but 401/403/404 is :class:`TeacherRefused`: this request will never work (the item is rejected);
- 401, 403 and 404 are :class:`TeacherError`: the key, the model or the URL is wrong, and no request can work;
- a request the budget no longer allows is :class:`BudgetExhausted`, raised before it is sent.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from vlmkit.errors import ConfigError, VlmkitError

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class TeacherError(VlmkitError):
    """The teacher cannot be used at all (wrong URL, API key or model name): the run stops."""


class TeacherRefused(VlmkitError):
    """The teacher refused this one request with a client error; retrying would not help."""


class TeacherUnavailable(VlmkitError):
    """A request still failed after every retry (or the teacher asked to wait longer than allowed)."""


class BudgetExhausted(VlmkitError):
    """The run's request or token budget allows no more requests."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class ClientConfig:
    """How to reach the teacher and how hard to try."""

    url: str
    """The server (``http://host:8000``), its ``/v1`` base, or the full ``/v1/chat/completions`` URL."""
    model: str
    concurrency: int = 4
    """Requests in flight at once."""
    timeout: float = 120.0
    """Seconds to connect, and to wait for each piece of the answer (httpx's per-operation timeouts)."""
    max_retries: int = 5
    backoff: float = 1.0
    """The first retry's delay in seconds; each further retry doubles it, with jitter (50-100 % of it)."""
    max_backoff: float = 60.0
    max_wait: float = 300.0
    """The longest ``Retry-After`` honoured; a teacher asking for longer fails the request."""
    stream: bool = False
    temperature: float = 0.2
    seed: int | None = None
    """Sent as the request's ``seed`` (plus a per-item offset) when set."""
    max_requests: int | None = None
    """Budget: requests sent in this run, retries included."""
    max_tokens: int | None = None
    """Budget: prompt + completion tokens the teacher reports for this run."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {self.max_retries}")
        for key in ("max_requests", "max_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be a positive number, got {value}")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"


@dataclass
class Usage:
    """What a run has spent: requests sent (retries included), retries, tokens reported, seconds waited."""

    requests: int = 0
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    waited_s: float = 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail", body)
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text[:300]
    return f"HTTP {response.status_code}: {message}"


def _tokens(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


class TeacherClient:
    """Sends chat completions to the teacher; use as ``async with TeacherClient(...) as client``.

    ``sleep`` (default ``asyncio.sleep``) and ``rng`` are injectable so tests see every delay without waiting.
    The API key is only ever put in the ``Authorization`` header.
    """

    def __init__(
        self,
        config: ClientConfig,
        api_key: str | None = None,
        *,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.usage = Usage()
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(config.concurrency)

    def __repr__(self) -> str:
        return f"TeacherClient({self.config.endpoint!r}, model={self.config.model!r})"

    async def __aenter__(self) -> TeacherClient:
        limits = httpx.Limits(
            max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency
        )
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout), limits=limits, transport=self._transport, trust_env=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()

    def backoff_delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1-based): ``backoff · 2^(retry-1)``, capped, times 0.5-1."""
        base = min(self.config.max_backoff, self.config.backoff * 2 ** (retry - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    def _charge(self) -> None:
        """Count one request, or raise :class:`BudgetExhausted` when the budget allows none."""
        config, usage = self.config, self.usage
        if config.max_requests is not None and usage.requests >= config.max_requests:
            raise BudgetExhausted(f"the request budget ({config.max_requests}) is spent")
        if config.max_tokens is not None and usage.tokens_in + usage.tokens_out >= config.max_tokens:
            raise BudgetExhausted(f"the token budget ({config.max_tokens}) is spent")
        usage.requests += 1

    async def complete(self, messages: list[dict[str, Any]], max_tokens: int, seed: int | None = None) -> Completion:
        """The teacher's answer to ``messages``, retried as the module docstring says."""
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.config.temperature,
        }
        if seed is not None:
            body["seed"] = seed
        if self.config.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        retry = 0
        while True:
            try:
                async with self._slots:  # the budget is checked and spent with a slot held: waiters see the tokens
                    self._charge()
                    completion = await self._attempt(body)
                    self.usage.tokens_in += completion.prompt_tokens
                    self.usage.tokens_out += completion.completion_tokens
                    return completion
            except _Retryable as exc:
                if retry >= self.config.max_retries:
                    raise TeacherUnavailable(f"{exc} (after {retry} retries)") from exc
                retry += 1
                delay = exc.retry_after if exc.retry_after is not None else self.backoff_delay(retry)
                if delay > self.config.max_wait:
                    raise TeacherUnavailable(
                        f"{exc}: asked to wait {delay:g} s, over {self.config.max_wait:g} s"
                    ) from exc
                self.usage.retries += 1
                log.debug("retry %d in %.2f s: %s", retry, delay, exc)
                self.usage.waited_s += delay
                await self._sleep(delay)

    async def _attempt(self, body: dict[str, Any]) -> Completion:
        assert self._http is not None, "use TeacherClient as an async context manager"
        try:
            if body.get("stream"):
                return await self._streamed(body)
            response = await self._http.post(self.config.endpoint, json=body, headers=self._headers)
            self._check_status(response)
            return self._parse(response)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__}: {exc})") from exc

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        message = _error_message(response)
        if status in (429, 408) or status >= 500:
            raise _Retryable(message, parse_retry_after(response.headers.get("retry-after")))
        if status in (401, 403):
            raise TeacherError(f"the teacher at {self.config.endpoint} refused the API key ({message})")
        if status == 404:
            raise TeacherError(f"{self.config.endpoint}: no such endpoint or model {self.config.model!r} ({message})")
        raise TeacherRefused(message)

    def _parse(self, response: httpx.Response) -> Completion:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Retryable(f"malformed response ({type(exc).__name__}: {exc})") from exc
        usage = data.get("usage")
        return Completion(text, choice.get("finish_reason"), _tokens(usage, "prompt_tokens"),
                          _tokens(usage, "completion_tokens"))  # fmt: skip

    async def _streamed(self, body: dict[str, Any]) -> Completion:
        assert self._http is not None
        async with self._http.stream("POST", self.config.endpoint, json=body, headers=self._headers) as response:
            if response.status_code != 200:
                await response.aread()
                self._check_status(response)
            pieces: list[str] = []
            finish: str | None = None
            usage: Any = None
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        pieces.append(choice.get("delta", {}).get("content") or "")
                        finish = choice.get("finish_reason") or finish
                except (ValueError, AttributeError, TypeError) as exc:
                    raise _Retryable(f"malformed stream chunk ({exc})") from exc
            if not done and finish is None:
                raise _Retryable("the stream ended before the answer did (truncated)")
        return Completion("".join(pieces), finish, _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens"))
