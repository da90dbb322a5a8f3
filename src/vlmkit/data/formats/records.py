"""The record every format holds: :class:`Record` to write, :class:`ParsedRecord` read, :class:`RecordError`;
LLaVA's JSON object and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmkit.data.sample import Sample
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
    "bad_shard": "a tar shard or parquet file is truncated or corrupt",
}
"""Reason codes of :class:`RecordError`, as counted in ``SampleDataset.problems``."""

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


def llava_preprocess(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """What LLaVA's training code does to a conversation before tokenizing it (``llava_compat``).

    - Assistant turns before the first user turn are dropped (LLaVA skips a first turn not from the human);
      their ``<image>`` markers move to the start of the first user turn, so no image is lost.
    - A turn holding exactly one ``<image>`` marker anywhere (e.g. trailing: ``"What is it?\\n<image>"``) gets it
      moved to its start as ``"<image>\\n" + text`` (LLaVA's ``preprocess_multimodal``). Turns with several
      markers (interleaved multi-image data) are left as they are, as LLaVA-NeXT does.
    """
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    moved = sum(m["content"].count(IMAGE_TOKEN) for m in messages[:first_user] if m["role"] == "assistant")
    out = []
    for i, message in enumerate(messages):
        if i < first_user and message["role"] == "assistant":
            continue
        text = message["content"]
        if text.count(IMAGE_TOKEN) == 1:
            text = f"{IMAGE_TOKEN}\n{text.replace(IMAGE_TOKEN, '').strip()}"
        if moved and i == first_user:
            text = f"{IMAGE_TOKEN}\n" * moved + text
        out.append({"role": message["role"], "content": text})
    return out


def llava_record(record: Record, image_refs: list[str], schema: str = "llava") -> dict[str, Any]:
    """The JSON object of a record whose images are stored at ``image_refs``: LLaVA's ``conversations`` of
    ``{from, value}`` and ``image`` (``schema="llava"``), or ``messages`` of ``{role, content}`` and ``images``
    (``"messages"``: ms-swift, LLaMA-Factory). A conversation that LLaVA's preprocessing would change
    (:func:`llava_preprocess`) is written as ``messages`` either way, so every reader gets it back as it is."""
    for turn in record.messages:
        role = turn.get("role")
        if role not in _LLAVA_ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"record {record.id!r}: cannot write a turn with role {role!r} and non-text content")
    messages = [{"role": m["role"], "content": m["content"]} for m in record.messages]
    out: dict[str, Any] = {"id": record.id}
    if schema == "llava" and llava_preprocess(messages) == messages:
        if image_refs:
            out["image"] = image_refs[0] if len(image_refs) == 1 else image_refs
        out["conversations"] = [{"from": _LLAVA_ROLES[m["role"]], "value": m["content"]} for m in messages]
    else:
        out["messages"] = messages
        if image_refs:
            out["images"] = list(image_refs)
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
    place_images: bool = False
    """Images without any ``<image>`` marker go before the first user text (else: a marker count mismatch)."""
