"""Record schemas: the field layouts a dataset record may have, each read into vlmkit's record.

Formats (files, shards, ``datasets`` folders, parquet) hold records; a record is one of the schemas of
:data:`SCHEMAS`, recognised by its fields after the ``columns`` renaming (first match wins):

- ``llava``: ``conversations`` of ``{from, value}`` (LLaVA, ShareGPT, LLaVA-OneVision, LLaMA-Factory sharegpt);
- ``messages``: ``messages`` of ``{role, content}``, content a string or a list of parts (ms-swift,
  LLaMA-Factory, OpenAI);
- ``pairs``: ``texts`` / ``conversation`` of ``{user, assistant}`` (the_cauldron, ms-swift ShareGPT);
- ``qa``: ``question`` / ``query`` and ``answer`` / ``response`` (ms-swift query-response, VQA-style rows);
- ``caption``: ``caption`` / ``txt`` (img2dataset, caption datasets).

Images are ``image`` / ``images`` (a path, a ``data:`` URL, bytes, a ``{bytes, path}`` struct, or a list of them)
or inline content parts. ``id`` is optional (:func:`parse_record`); fields no schema uses go to ``meta``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmkit.data.formats.records import ParsedRecord, RecordError, llava_preprocess
from vlmkit.data.sample import reply_problem
from vlmkit.errors import DataError
from vlmkit.registry import Registry
from vlmkit.tokens import IMAGE_TOKEN

LlavaCompat = Literal["auto", "on", "off"]
DEFAULT_CAPTION_PROMPT = "Describe the image."

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FIELDS = (
    "id", "conversations", "messages", "texts", "conversation", "question", "answer", "caption", "image", "images",
    "task", "meta", "system", "from", "value", "role", "content", "user", "assistant",
)  # fmt: skip
"""The names a ``columns`` mapping may rename a field to (top-level fields and the fields of each turn)."""
_IMAGE_KEYS = ("image", "images")
_COMMON = ("id", "task", "meta", *_IMAGE_KEYS)


@dataclass(frozen=True)
class ReadOptions:
    """How records are read: field renaming, LLaVA compatibility, absolute image paths, the caption prompt."""

    columns: Mapping[str, str] = field(default_factory=dict)
    """Field renaming, source name → vlmkit name (one of :data:`FIELDS`), applied to records and their turns."""
    llava_compat: LlavaCompat = "auto"
    """LLaVA's preprocessing (:func:`llava_preprocess`): ``auto`` applies it to ``llava``-schema records only."""
    allow_absolute_paths: bool = False
    """Accept absolute image paths outside the data root (ms-swift's docs write ``/xxx/x.jpg``)."""
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    """The user turn of a ``caption`` record (the caption is the answer)."""


def check_llava_compat(value: Any) -> LlavaCompat:
    """``auto``, ``on`` or ``off`` (booleans are ``on``/``off``); DataError otherwise."""
    value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if value not in ("auto", "on", "off"):
        raise DataError(f"llava_compat: expected auto, on or off, got {value!r}")
    return value


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """A ``columns`` mapping from ``"old=new,old2=new2"``, a JSON object or a dict; DataError when invalid."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                mapping = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"columns: malformed JSON ({exc.msg})") from exc
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise DataError(f"columns: expected OLD=NEW[,OLD=NEW...] or a JSON object, got {spec!r}")
            mapping = {old.strip(): new.strip() for old, new in pairs}
    else:
        mapping = dict(spec)
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise DataError("columns: expected a mapping of field names to field names")
    unknown = sorted(set(mapping.values()) - set(FIELDS))
    if unknown:
        raise DataError(f"columns: unknown target field(s) {', '.join(unknown)}; expected one of {', '.join(FIELDS)}")
    return mapping


def derive_id(record: Any) -> str:
    """A stable id for a record without one: the first 16 hex digits of the SHA-256 of its canonical JSON
    (keys sorted; bytes stand for their own SHA-256). The same record always gets the same id, wherever it is."""

    def encode(value: Any) -> str:
        if isinstance(value, bytes | bytearray | memoryview):
            return hashlib.sha256(bytes(value)).hexdigest()
        return str(value)

    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=encode)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the schemas


@dataclass
class Turns:
    """What a schema reads from a record: the turns, images found inline (None: use ``image``/``images``) and
    the fields it used."""

    messages: list[dict[str, str]]
    images: list[Any] | None = None
    used: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Schema:
    """One record layout: the fields that announce it and its parser."""

    name: str
    keys: tuple[str, ...]
    parse: Callable[[str, dict[str, Any], ReadOptions], Turns]
    markers_required: bool = False
    """Images need ``<image>`` markers (LLaVA); otherwise images without markers go before the first user text."""


SCHEMAS: Registry[Schema] = Registry("record schema")
"""Record schemas in detection order."""


def _role(where: str, i: int, role: Any) -> str:
    if role not in ROLES:
        raise RecordError(where, "bad_role", f"turn {i} has unknown role {role!r}; expected {', '.join(ROLES)}")
    return ROLES[role]


def _image_part(part: Mapping[str, Any]) -> Any:
    """The image of a content part, in any of its spellings: OpenAI (``image_url: {url}``), LLaMA-Factory v1
    (``value``), Anthropic (``source: {type: base64, data}``), plain (``image``, ``path``, ``url``)."""
    names = (str(part.get("type")), "image", "image_url", "value", "path", "url", "source")
    value = next((part[name] for name in names if part.get(name) is not None), None)
    if isinstance(value, Mapping):
        if value.get("type") == "base64" and "data" in value:
            return f"data:{value.get('media_type', 'image/png')};base64,{value['data']}"
        if "url" in value:
            return value["url"]
    return value  # a path, a data URL, bytes or a {bytes, path} struct


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` with a value (Arrow structs hold every field, unused ones as None)."""
    return next((mapping[k] for k in keys if mapping.get(k) is not None), None)


def _content(where: str, i: int, content: Any, images: list[Any]) -> str:
    """A turn's text; content-part lists become text pieces joined by newlines, each image an ``<image>``. An
    image part without its image (TRL's ``{"type": "image"}``) stands for the next of the record's ``images``
    (a None in ``images``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(where, "bad_record", f"turn {i} content must be a string or a list of parts")
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        text = _first(part, "text", "value") if kind == "text" else None
        if isinstance(text, str):
            pieces.append(text)
        elif kind in ("image", "image_url", "input_image"):
            images.append(_image_part(part))
            pieces.append(IMAGE_TOKEN)
        else:
            raise RecordError(where, "bad_record", f"turn {i} part {j}: unsupported content part {kind!r}")
    return "\n".join(pieces)


def _listed(where: str, name: str, turns: Any) -> list[Any]:
    """A list of turns; a ``datasets`` ``Sequence({...})`` column (a dict of equal-length lists) is zipped."""
    if isinstance(turns, Mapping) and turns and all(isinstance(v, list) for v in turns.values()):
        lengths = {len(v) for v in turns.values()}
        if len(lengths) == 1:
            return [dict(zip(turns, values, strict=True)) for values in zip(*turns.values(), strict=True)]
    if not isinstance(turns, list):
        raise RecordError(where, "bad_record", f"'{name}' must be a list, got {type(turns).__name__}")
    return turns


def _turn_list(where: str, record: dict[str, Any], name: str, options: ReadOptions) -> list[dict[str, Any]]:
    turns = _listed(where, name, record[name])
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise RecordError(where, "bad_record", f"turn {i} must be an object, got {type(turn).__name__}")
        out.append({options.columns.get(k, k): v for k, v in turn.items()})
    return out


def _parse_roles(where: str, record: dict[str, Any], options: ReadOptions, name: str) -> Turns:
    messages: list[dict[str, str]] = []
    images: list[Any] = []
    for i, turn in enumerate(_turn_list(where, record, name, options)):
        role, content = _first(turn, "from", "role"), _first(turn, "value", "content")
        if role is None or content is None:
            raise RecordError(where, "missing_field", f"turn {i} needs 'from' and 'value' (or 'role' and 'content')")
        messages.append({"role": _role(where, i, role), "content": _content(where, i, content, images)})
    inline = [image for image in images if image is not None]
    if inline and len(inline) != len(images):
        raise RecordError(where, "missing_image", "some image parts hold their image and some do not")
    return Turns(messages, inline or None, (name,))


def _llava(where: str, record: dict[str, Any], options: ReadOptions) -> Turns:
    return _parse_roles(where, record, options, "conversations")


def _messages(where: str, record: dict[str, Any], options: ReadOptions) -> Turns:
    return _parse_roles(where, record, options, "messages")


def _system(where: str, record: dict[str, Any]) -> list[dict[str, str]]:
    system = record.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise RecordError(where, "bad_record", "'system' must be a string")
    return [{"role": "system", "content": system}]


def _pairs(where: str, record: dict[str, Any], options: ReadOptions) -> Turns:
    name = "texts" if record.get("texts") is not None else "conversation"
    messages = _system(where, record)
    sources = set()
    for i, turn in enumerate(_turn_list(where, record, name, options)):
        user, reply = _first(turn, "user", "human"), turn.get("assistant")
        if not isinstance(user, str) or not isinstance(reply, str):
            raise RecordError(where, "missing_field", f"turn {i} needs 'user' and 'assistant' strings")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        sources.add(turn.get("source"))
    extra = {"source": sources.pop()} if len(sources) == 1 and None not in sources else {}
    return Turns(messages, None, (name, "system"), extra)  # the_cauldron names its sub-dataset in every turn


def _qa(where: str, record: dict[str, Any], options: ReadOptions) -> Turns:
    question = record.get("question", record.get("query"))
    answer = record.get("answer", record.get("response"))
    if not isinstance(question, str) or not isinstance(answer, str):
        raise RecordError(where, "missing_field", "needs 'question' (or 'query') and 'answer' (or 'response') strings")
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Turns(_system(where, record) + turns, None, ("question", "query", "answer", "response", "system"))


def _caption(where: str, record: dict[str, Any], options: ReadOptions) -> Turns:
    caption = record.get("caption", record.get("txt"))
    if not isinstance(caption, str):
        raise RecordError(where, "bad_record", "'caption' must be a string")
    turns = [{"role": "user", "content": options.caption_prompt}, {"role": "assistant", "content": caption}]
    images = None
    if not any(record.get(k) is not None for k in _IMAGE_KEYS):  # img2dataset parquet: the image under its extension
        found = [record[k] for k in ("jpg", "jpeg", "png", "webp") if record.get(k) is not None]
        images = found[:1] or None
    return Turns(turns, images, ("caption", "txt", "jpg", "jpeg", "png", "webp"))


for _schema in (
    Schema("llava", ("conversations",), _llava, markers_required=True),
    Schema("messages", ("messages",), _messages),
    Schema("pairs", ("texts", "conversation"), _pairs),
    Schema("qa", ("question", "query"), _qa),
    Schema("caption", ("caption", "txt"), _caption),
):
    SCHEMAS.add(_schema.name, _schema)


def find_schema(record: Mapping[str, Any]) -> Schema | None:
    """The first schema of :data:`SCHEMAS` whose fields the record has."""
    for name in SCHEMAS.names():
        schema = SCHEMAS.get(name)
        if any(record.get(key) is not None for key in schema.keys):
            return schema
    return None


# ------------------------------------------------------------------------------------------ image placement


def place_images(messages: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """``count`` images without markers go before the first user turn's text (the first non-system turn when
    there is no user turn), one ``<image>`` line each, as LLaMA-Factory and the_cauldron's models place them."""
    roles = [m["role"] for m in messages]
    target = roles.index("user") if "user" in roles else next((i for i, r in enumerate(roles) if r != "system"), 0)
    out = [dict(m) for m in messages]
    out[target]["content"] = f"{IMAGE_TOKEN}\n" * count + out[target]["content"]
    return out


# ------------------------------------------------------------------------------------------------ the record


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def parse_record(
    where: str, record: Any, options: ReadOptions | None = None, *, default_id: str | None = None
) -> ParsedRecord:
    """Validate a record of any schema of :data:`SCHEMAS` into a :class:`ParsedRecord`.

    ``id`` when absent is a string ``key`` field (img2dataset), else ``default_id`` (a reader's own key, e.g. a
    webdataset sample key), else :func:`derive_id`. Top-level fields no schema uses, with JSON values, are kept
    in ``meta`` (``meta``'s own keys win).
    """
    options = options or ReadOptions()
    if not isinstance(record, dict):
        raise RecordError(where, "bad_record", f"expected a JSON object, got {type(record).__name__}")
    raw = record
    record = {options.columns.get(k, k): v for k, v in record.items()}
    record_id = record.get("id")
    if record_id is None or record_id == "":
        record_id = record.get("key") if isinstance(record.get("key"), str) else default_id  # img2dataset's key
    if record_id is None or record_id == "":
        record_id = derive_id(raw)
    if not isinstance(record_id, str | int):
        raise RecordError(where, "bad_record", f"'id' must be a string or an integer, got {record_id!r}")
    where = f"{where} (id {str(record_id)!r})"
    schema = find_schema(record)
    if schema is None:
        raise RecordError(
            where, "missing_field", "no conversation: expected 'conversations' or 'messages' (or the_cauldron's "
            "'texts', 'question'/'answer', a 'caption'); rename other fields with columns"
        )  # fmt: skip
    turns = schema.parse(where, record, options)
    messages = turns.messages
    if not messages:
        raise RecordError(where, "empty_conversation", "empty conversation")
    compat = options.llava_compat == "on" or (options.llava_compat == "auto" and schema.name == "llava")
    if compat:
        messages = llava_preprocess(messages)
    if not any(m["content"].strip() for m in messages):
        raise RecordError(where, "empty_conversation", "every turn of the conversation is empty")
    problem = reply_problem(messages)
    if problem is not None:
        raise RecordError(where, "no_reply", problem)
    refs: Any = turns.images
    if refs is None:
        refs = _first(record, "image", "images")
        refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    refs = [ref for ref in refs if ref is not None]
    task = record.get("task")
    meta = record.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise RecordError(where, "bad_json", f"'meta' is malformed JSON ({exc.msg})") from exc
    if not isinstance(meta, dict) or not (task is None or isinstance(task, str)):
        raise RecordError(where, "bad_record", "'meta' must be an object and 'task' a string")
    used = {*_COMMON, *schema.keys, *turns.used}
    extras = {k: v for k, v in record.items() if k not in used and v is not None and _jsonable(v)}
    meta = {**extras, **turns.extra, **meta}
    return ParsedRecord(str(record_id), messages, refs, task, meta, place_images=not schema.markers_required)
