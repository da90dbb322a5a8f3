"""Request bodies of the OpenAI chat completions and (legacy) completions APIs, validated with pydantic.

Types are strict (``"stream": "yes"`` is refused, not read as true). Every field is either applied, accepted as
metadata that changes nothing (:data:`METADATA_FIELDS`), or refused by :func:`unsupported_fields` with the
field's name: OpenAI fields vlmkit does not implement (:data:`UNSUPPORTED_FIELDS`) when set to anything but
their neutral value, and unknown fields always.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, extra="ignore")  # extra fields: refused first, by unsupported_fields


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class _SamplingRequest(BaseModel):
    """The fields both completion APIs share: the model, the sampling knobs (vLLM's ``top_k`` and
    ``repetition_penalty`` among them, its "extra parameters"), ``n``, stops, seed and streaming."""

    model_config = _STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    """vLLM's convention: -1 or 0 = off."""
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: OpenAI's fields vlmkit applies, plus the shared sampling fields."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions): a raw text prompt, no chat template; OpenAI's
    default ``max_tokens`` is 16 here."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """The legacy meaning: how many likeliest tokens to list besides the chosen one (OpenAI allows 5, vLLM 20)."""


ChatCompletionRequest.model_rebuild()

UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
}
"""OpenAI request fields vlmkit does not apply, with the values that ask for nothing (accepted)."""

METADATA_FIELDS = frozenset({"user", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier"})
"""OpenAI fields that describe the request but don't change the answer: accepted and not used."""

COMPLETION_UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None,),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "store": (None, False),
}
"""Legacy completions fields vlmkit does not apply, with their neutral values."""

COMPLETION_METADATA_FIELDS = frozenset({"user", "metadata"})

_MESSAGE_FIELDS = frozenset(ChatMessage.model_fields)


def _same(value: Any, neutral: Any) -> bool:
    return value is None if neutral is None else type(value) is type(neutral) and value == neutral


def unsupported_fields(data: dict[str, Any], completions: bool = False) -> list[tuple[str, str]]:
    """``(field, reason)`` for every field of a chat request body (a legacy completions body with
    ``completions``) that would be silently ignored."""
    problems: list[tuple[str, str]] = []
    model: type[BaseModel] = CompletionRequest if completions else ChatCompletionRequest
    unsupported = COMPLETION_UNSUPPORTED_FIELDS if completions else UNSUPPORTED_FIELDS
    metadata = COMPLETION_METADATA_FIELDS if completions else METADATA_FIELDS
    for name, value in data.items():
        if name in model.model_fields or name in metadata:
            continue
        if name in unsupported:
            if not any(_same(value, neutral) for neutral in unsupported[name]):
                problems.append((name, f"{name} is not supported by this server; leave it out"))
        else:
            problems.append((name, f"unknown field {name!r}"))
    if completions:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
            problems.append(("prompt", "prompt as token ids is not supported by this server; send text"))
        return problems
    messages = data.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                for name in message:
                    if name not in _MESSAGE_FIELDS and message[name] is not None:
                        problems.append((f"messages[{i}].{name}", f"messages[{i}].{name} is not supported"))
    return problems
