"""Every teacher answer is checked before it becomes training data: a bad one is a :class:`Rejection` with a
reason code (:data:`REJECT_REASONS`), written to the rejects file instead of the dataset."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vlmkit.data.teach.presets import TaskPrompt
from vlmkit.tokens import IMAGE_TOKEN

DEFAULT_MAX_CHARS = 4000

REJECT_REASONS = {
    "empty": "the answer has no text",
    "truncated": "the answer was cut off at the token limit (finish_reason 'length')",
    "too_long": "the answer is over the length cap",
    "image_marker": f"the answer contains the {IMAGE_TOKEN} marker, which would break the record's image count",
    "unparseable_conversation": "the conversation cannot be parsed into alternating question and answer turns",
    "teacher_refused": "the teacher answered the request with a client error (4xx)",
    "unreadable_image": "the image cannot be read",
}
"""Reason codes of rejected items."""


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


_LABEL = re.compile(
    r"^[\s>*#_-]*(?:\d+[.)]\s*)?[*_]*\s*(question|q|user|human|answer|a|assistant|gpt)\s*\d*\s*[*_]*\s*[:：]\s*[*_]*\s*(.*)$",
    re.IGNORECASE,
)
_USER_LABELS = {"question", "q", "user", "human"}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```\s*$", re.S)


def _json_turns(text: str) -> list[dict[str, str]] | None:
    """Turns from a JSON list of ``{from, value}`` / ``{role, content}`` objects, or None when it isn't one."""
    fenced = _FENCE.match(text)
    try:
        data = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    if isinstance(data, dict):
        data = data.get("conversations", data.get("messages"))
    if not isinstance(data, list):
        return None
    turns = []
    for turn in data:
        if not isinstance(turn, dict):
            return None
        role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in _ROLES or not isinstance(content, str):
            return None
        turns.append({"role": _ROLES[role], "content": content.strip()})
    return turns


def _labelled_turns(text: str) -> list[dict[str, str]]:
    """Turns from lines that start with a label (``Question:``/``Answer:``, ``User:``/``Assistant:``, ``Q:``/
    ``A:``, ...); a line without one continues the turn above; text before the first label is dropped."""
    turns: list[dict[str, str]] = []
    for line in text.splitlines():
        match = _LABEL.match(line)
        if match:
            role = "user" if match.group(1).lower() in _USER_LABELS else "assistant"
            turns.append({"role": role, "content": match.group(2).strip().rstrip("*_").strip()})
        elif turns and line.strip():
            turns[-1]["content"] = f"{turns[-1]['content']}\n{line.strip()}".strip()
    return turns


def parse_conversation_text(text: str) -> list[dict[str, str]] | Rejection:
    """A teacher's conversation as alternating user/assistant messages, or why it can't be one."""
    turns = _json_turns(text.strip())
    if turns is None:
        turns = _labelled_turns(text)
    if not turns:
        return Rejection("unparseable_conversation", "no 'Question:'/'Answer:' turns found")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return Rejection("unparseable_conversation", f"turn {i + 1} is a {turn['role']} turn; expected {expected}")
        if not turn["content"]:
            return Rejection("unparseable_conversation", f"turn {i + 1} ({turn['role']}) is empty")
    if turns[-1]["role"] != "assistant":
        return Rejection("unparseable_conversation", "the last question has no answer")
    return turns


def validate_answer(
    task: TaskPrompt, text: str, finish_reason: str | None, max_chars: int = DEFAULT_MAX_CHARS
) -> list[dict[str, Any]] | Rejection:
    """The record's messages (the first user turn carries the image marker) for a valid answer, else a
    :class:`Rejection`."""
    answer = text.strip()
    if not answer:
        return Rejection("empty", "the teacher's answer is empty")
    if finish_reason == "length":
        return Rejection("truncated", f"cut off at the task's {task.max_tokens}-token limit")
    if len(answer) > max_chars:
        return Rejection("too_long", f"{len(answer)} characters, over the {max_chars}-character cap")
    if IMAGE_TOKEN in answer:
        return Rejection("image_marker", f"the answer contains {IMAGE_TOKEN}")
    if task.kind == "conversation":
        turns = parse_conversation_text(answer)
        if isinstance(turns, Rejection):
            return turns
    else:
        turns = [{"role": "user", "content": task.human_turn}, {"role": "assistant", "content": answer}]
    first = turns[0]
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{first['content']}"}, *turns[1:]]
