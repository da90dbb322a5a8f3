"""The record every format holds: :class:`Record` to write, LLaVA-style parsing to read, :class:`RecordError`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vlmkit.data.sample import Sample, reply_problem
from vlmkit.data.shapes import encode_png
from vlmkit.errors import DataError
from vlmkit.processing.images import load_image
from vlmkit.tokens import IMAGE_TOKEN

PROBLEMS = {
    "bad_json": "malformed JSON",
    "bad_record": "a record or field of the wrong type",
    "missing_field": "a required field is missing",
    "bad_role": "a conversation turn has an unknown role",
    "empty_conversation": "the conversation has no turns or no text",
    "no_reply": "no assistant turn, or an empty one: nothing to train on",
    "image_count_mismatch": "the number of <image> markers differs from the number of images",
    "missing_image": "an image file or tar member is missing",
    "unreadable_image": "an image cannot be decoded",
    "path_escape": "an image path escapes the data root",
    "bad_shard": "a tar shard is truncated or corrupt",
}
"""Reason codes of :class:`RecordError`, as counted in ``SampleDataset.problems``."""

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


class RecordError(DataError):
    """One bad record; ``reason`` is a key of :data:`PROBLEMS`, ``where`` names the file and record."""

    def __init__(self, where: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = reason


@dataclass
class Record:
    """A sample ready to write: ``images`` are encoded image files (PNG bytes)."""

    id: str
    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sample(cls, sample: Sample) -> Record:
        """Encode a sample's images as PNG."""
        images = [encode_png(image) for image in sample.images]
        return cls(sample.id, sample.messages, images, sample.task, dict(sample.meta))

    def to_sample(self) -> Sample:
        """Decode the images (through ``load_image``) into a :class:`Sample`."""
        return Sample(self.id, self.messages, [load_image(b) for b in self.images], self.task, dict(self.meta))


def count_markers(messages: list[dict[str, Any]]) -> int:
    """The number of ``<image>`` markers in a conversation."""
    return sum(str(m.get("content", "")).count(IMAGE_TOKEN) for m in messages)


def llava_record(record: Record, image_refs: list[str]) -> dict[str, Any]:
    """The LLaVA JSON object of a record whose images are stored at ``image_refs``."""
    conversations = []
    for turn in record.messages:
        role = turn.get("role")
        if role not in _LLAVA_ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"record {record.id!r}: cannot write a turn with role {role!r} and non-text content")
        conversations.append({"from": _LLAVA_ROLES[role], "value": turn["content"]})
    out: dict[str, Any] = {"id": record.id}
    if image_refs:
        out["image"] = image_refs[0] if len(image_refs) == 1 else image_refs
    out["conversations"] = conversations
    if record.task is not None:
        out["task"] = record.task
    if record.meta:
        out["meta"] = record.meta
    return out


@dataclass
class ParsedRecord:
    """A validated record: its text, and its image references still unresolved (format-specific)."""

    id: str
    messages: list[dict[str, str]]
    image_refs: list[Any]
    task: str | None
    meta: dict[str, Any]


def parse_record(where: str, record: Any) -> ParsedRecord:
    """Validate a LLaVA-style record (``conversations`` with from/value, or ``messages`` with role/content)."""
    if not isinstance(record, dict):
        raise RecordError(where, "bad_record", f"expected a JSON object, got {type(record).__name__}")
    if record.get("id") is None:
        raise RecordError(where, "missing_field", "missing field 'id'")
    if not isinstance(record["id"], str | int):
        raise RecordError(where, "bad_record", f"'id' must be a string or an integer, got {record['id']!r}")
    where = f"{where} (id {record['id']!r})"
    key = "conversations" if "conversations" in record else "messages"
    turns = record.get(key)
    if turns is None:
        raise RecordError(where, "missing_field", "missing field 'conversations' (or 'messages')")
    if not isinstance(turns, list):
        raise RecordError(where, "bad_record", f"'{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError(where, "empty_conversation", "empty conversation")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(where, "bad_record", f"turn {i} must be an object, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role is None or text is None:
            raise RecordError(where, "missing_field", f"turn {i} needs 'from' and 'value' (or 'role' and 'content')")
        if role not in _ROLES:
            raise RecordError(where, "bad_role", f"turn {i} has unknown role {role!r}; expected {', '.join(_ROLES)}")
        if not isinstance(text, str):
            raise RecordError(where, "bad_record", f"turn {i} text must be a string, got {type(text).__name__}")
        messages.append({"role": _ROLES[role], "content": text})
    if not any(m["content"].strip() for m in messages):
        raise RecordError(where, "empty_conversation", "every turn of the conversation is empty")
    problem = reply_problem(messages)
    if problem is not None:
        raise RecordError(where, "no_reply", problem)
    refs = record.get("image", record.get("images"))
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    task = record.get("task")
    meta = record.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise RecordError(where, "bad_json", f"'meta' is malformed JSON ({exc.msg})") from exc
    if not isinstance(meta, dict) or not (task is None or isinstance(task, str)):
        raise RecordError(where, "bad_record", "'meta' must be an object and 'task' a string")
    return ParsedRecord(str(record["id"]), messages, refs, task, meta)
