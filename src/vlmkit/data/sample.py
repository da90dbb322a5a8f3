"""The record every dataset reader yields and every trainer or evaluator consumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


def reply_problem(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a conversation (roles ``system``/``user``/``assistant``) has nothing to train on, or None when it has.

    It needs an assistant turn, and every assistant turn needs text: the one check behind both ``vlmkit data
    check`` and ``vlmkit train`` (every dataset reader refuses such a record, reason ``no_reply``).
    """
    replies = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    if not replies:
        return "the conversation has no assistant turn; there is nothing to learn from it"
    for i in replies:
        content = messages[i].get("content")
        if isinstance(content, str) and not content.strip():
            return f"assistant turn {i} is empty; there is nothing to learn from it"
    return None


@dataclass
class Sample:
    """One conversation with its images.

    ``messages`` use roles ``system``/``user``/``assistant`` and string content; each ``<image>`` marker in the
    text stands for the next image of ``images`` (RGB PIL images loaded through ``vlmkit.processing.images``).
    """

    id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
