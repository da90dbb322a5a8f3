"""The one conversation model: every spelling of chat messages parses to it, every backend renders from it.

:func:`parse_conversation` reads string content, content parts (``text``; ``image`` with ``image``, ``url``,
``path`` or ``base64``; OpenAI's ``image_url``) and an ``images=`` list with ``<image>`` markers in the text;
:func:`prompt_conversation` makes one from a string prompt and images. The renderers give vlmkit's string
messages with ``<image>`` markers (:meth:`Conversation.to_strings`), transformers' content parts with loaded
images (:meth:`Conversation.to_transformers`) and vlmkit's content-parts dicts (:meth:`Conversation.to_messages`).
No other module reads content parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from vlmkit.errors import ImageTokenMismatchError, ProcessingError
from vlmkit.processing.images import DEFAULT_MAX_PIXELS, ImageAccess, ImageSource, load_image
from vlmkit.tokens import IMAGE_TOKEN

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)
ROLE_ALIASES = {"developer": "system"}
"""Other names of roles (OpenAI's ``developer`` is the system turn)."""
PART_TYPES = ("text", "image", "image_url")
OPENAI_PART_TYPES = ("text", "image_url")
"""The part types of an OpenAI request (what the server accepts)."""
IMAGE_KEYS = ("image", "url", "path", "base64")
"""Keys of an ``image`` part holding its image, in order of precedence; ``base64`` may be a bare payload."""


class ConversationError(ProcessingError):
    """A conversation that can't be parsed. ``str()`` says where and what; ``reason`` is the what alone;
    ``path`` locates the value in the request (``messages[0].content[1].image_url``); ``code`` is
    ``invalid_content_part`` for unknown part types, else None."""

    def __init__(self, message: str, *, reason: str | None = None, path: str = "messages", code: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message
        self.path = path
        self.code = code


def _error(
    reason: str, name: str, path: str, message: int | None = None, part: int | None = None, code: str | None = None
) -> ConversationError:
    where = name if message is None else f"{name}, message {message}"
    where += "" if part is None else f", part {part}"
    return ConversationError(f"{where}: {reason}", reason=reason, path=path, code=code)


# -- the model ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextPart:
    """Text, taken as written (``<image>`` in it is only a marker when the conversation came with ``images=``)."""

    text: str


@dataclass(frozen=True)
class ImagePart:
    """One image: a path, an http(s)/``file://``/``data:`` URL, encoded bytes or a PIL image (a bare base64
    payload is already a data URL). Its type is checked when it is loaded (:func:`load_image`)."""

    image: ImageSource


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    """One turn. As one string, parts are joined by newlines (an image is an ``<image>`` marker); ``inline``
    parts are joined by nothing (a string whose markers sit inside the text, only spelled with ``images=``)."""

    role: Role
    parts: tuple[Part, ...]
    inline: bool = False

    @property
    def images(self) -> tuple[ImageSource, ...]:
        return tuple(p.image for p in self.parts if isinstance(p, ImagePart))

    def text(self, image_token: str = IMAGE_TOKEN) -> str:
        """The turn as one string, each image an ``image_token`` marker."""
        pieces = (image_token if isinstance(p, ImagePart) else p.text for p in self.parts)
        return ("" if self.inline else "\n").join(pieces)


@dataclass(frozen=True)
class Conversation:
    """A parsed conversation (:func:`parse_conversation`) and its renderings for the backends."""

    messages: tuple[Message, ...]

    @property
    def images(self) -> tuple[ImageSource, ...]:
        """Every image, in order."""
        return tuple(image for m in self.messages for image in m.images)

    def to_strings(self, image_token: str = IMAGE_TOKEN) -> tuple[list[dict[str, str]], list[ImageSource]]:
        """vlmkit's string messages with ``image_token`` markers, and the images in marker order.

        Raises :class:`ImageTokenMismatchError` when the text holds markers of its own (given without images).
        """
        flat = [{"role": m.role, "content": m.text(image_token)} for m in self.messages]
        images = list(self.images)
        markers = sum(m["content"].count(image_token) for m in flat)
        if markers != len(images):
            raise _mismatch(markers, len(images), image_token)
        return flat, images

    def to_transformers(
        self,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        access: ImageAccess | None = None,
        check_text: Callable[[str, str], str] | None = None,
        name: str = "conversation",
    ) -> list[dict[str, Any]]:
        """transformers' content-parts form, each image loaded by :func:`load_image` (``max_pixels``, ``access``).

        ``check_text(text, where)`` is given each text part and returns the text to use (or raises).
        """
        out = []
        for i, message in enumerate(self.messages):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(message.parts):
                if isinstance(part, TextPart):
                    text = check_text(part.text, f"{name}, message {i}, part {j}") if check_text else part.text
                    parts.append({"type": "text", "text": text})
                else:
                    image = load_image(part.image, max_pixels=max_pixels, access=access)
                    parts.append({"type": "image", "image": image})
            out.append({"role": message.role, "content": parts})
        return out

    def to_messages(self) -> list[dict[str, Any]]:
        """vlmkit's content-parts dicts, which parse back to this conversation (an ``inline`` message's parts
        become separate parts)."""
        return [{"role": m.role, "content": [_part_dict(p) for p in m.parts]} for m in self.messages]


def _part_dict(part: Part) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    return {"type": "image", "image": part.image}


def _mismatch(markers: int, images: int, image_token: str) -> ImageTokenMismatchError:
    return ImageTokenMismatchError(
        f"the conversation has {markers} {image_token} marker(s) but {images} image(s) were given"
    )


# -- the parser -----------------------------------------------------------------------------------------------
def prompt_conversation(text: str, images: Sequence[Any] | None = None) -> Conversation:
    """One user turn: ``images`` (each an :class:`ImagePart`'s image), then ``text``."""
    return Conversation((Message("user", (*(ImagePart(image) for image in images or ()), TextPart(text))),))


def parse_conversation(
    messages: list[Any] | Conversation,
    images: Sequence[Any] | None = None,
    *,
    name: str = "conversation",
    image_token: str = IMAGE_TOKEN,
    openai: bool = False,
) -> Conversation:
    """Parse messages in any spelling vlmkit accepts; raise :class:`ConversationError` saying where.

    ``messages``: a list of ``{"role", "content"}`` dicts (roles system/user/assistant, ``developer`` read as
    system; content a string or a list of parts) or a parsed :class:`Conversation`. ``images`` go to the
    ``image_token`` markers in the text, in order (their counts must match; images can't also be in parts).
    ``openai=True`` reads an OpenAI request: only text and image_url parts, text and urls must be strings, ``None``
    content is empty. A string prompt with images is :func:`prompt_conversation`.
    """
    given = list(images) if images is not None else []
    if isinstance(messages, Conversation):
        if given:
            raise _error("give images either inside the messages or in 'images', not both", name, "images")
        return messages
    if not isinstance(messages, list) or not messages:
        raise _error("a conversation must be a non-empty list of messages", name, "messages")
    parsed = [_message(message, i, name, openai) for i, message in enumerate(messages)]
    if given:
        if any(m.images for m in parsed):
            raise _error("give images either inside the messages or in 'images', not both", name, "images")
        parsed = _place(parsed, given, image_token)
    return Conversation(tuple(parsed))


def _message(message: Any, i: int, name: str, openai: bool) -> Message:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise _error(f"needs 'role' and 'content' keys, got {message!r:.100}", name, f"messages[{i}]", i)
    role, content = message["role"], message["content"]
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        valid = ", ".join(ROLES) + "".join(f" ({k} = {v})" for k, v in ROLE_ALIASES.items())
        raise _error(f"unknown role {role!r}; valid roles: {valid}", name, f"messages[{i}].role", i)
    if content is None and openai:
        content = ""
    if isinstance(content, str):
        parts: tuple[Part, ...] = (TextPart(content),)
    elif isinstance(content, list):
        parts = tuple(_part(part, i, j, name, openai) for j, part in enumerate(content))
    else:
        raise _error("content must be a string or a list of parts", name, f"messages[{i}].content", i)
    return Message(cast(Role, role), parts)


def _part(part: Any, i: int, j: int, name: str, openai: bool) -> Part:
    path = f"messages[{i}].content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    types = OPENAI_PART_TYPES if openai else PART_TYPES
    if kind == "text":
        if openai and not isinstance(part.get("text"), str):
            raise _error("text part without text", name, f"{path}.text", i, j)
        return TextPart(str(part.get("text", "")))
    if kind == "image" and not openai:
        key = next((k for k in IMAGE_KEYS if k in part), None)
        source = part[key] if key is not None else None
        if source is None:
            raise _error("image part without 'image', 'url', 'path' or 'base64'", name, path, i, j)
        if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
            source = f"data:;base64,{source}"  # a bare base64 payload
        return ImagePart(source)
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not url or (openai and not isinstance(url, str)):
            raise _error("image_url part without a url", name, f"{path}.image_url", i, j)
        return ImagePart(url)
    raise _error(f"unknown content part type {kind!r}; supported: {', '.join(types)}", name, f"{path}.type", i, j,
                 code="invalid_content_part")  # fmt: skip


def _place(messages: list[Message], images: list[Any], image_token: str) -> list[Message]:
    """The messages with each ``image_token`` marker in their text replaced by the next of ``images``."""
    markers = sum(m.text(image_token).count(image_token) for m in messages)
    if markers != len(images):
        raise _mismatch(markers, len(images), image_token)
    queue = iter(images)
    out = []
    for message in messages:
        text = message.text(image_token)
        if image_token not in text:
            out.append(message)
            continue
        pieces = text.split(image_token)
        block = _blocks(pieces)
        if block is None:  # markers inside the text: the pieces as written, joined by nothing
            inline: list[Part] = []
            for k, piece in enumerate(pieces):
                if k:
                    inline.append(ImagePart(next(queue)))
                if piece:
                    inline.append(TextPart(piece))
            out.append(Message(message.role, tuple(inline), inline=True))
        else:
            parts = tuple(ImagePart(next(queue)) if p is None else TextPart(p) for p in block)
            out.append(Message(message.role, parts))
    return out


def _blocks(pieces: list[str]) -> list[str | None] | None:
    """The text around markers (``pieces``) as newline-joined parts, None standing for each marker; None when a
    marker touches text with no newline between them."""
    last = len(pieces) - 1
    out: list[str | None] = []
    for k, piece in enumerate(pieces):
        if k:
            out.append(None)
        if (piece == "" and k in (0, last)) or (piece == "\n" and 0 < k < last):
            continue  # a marker at an edge, or two markers on their own lines
        lead = "\n" if k else ""
        tail = "\n" if k < last else ""
        if len(piece) < len(lead + tail) or not (piece.startswith(lead) and piece.endswith(tail)):
            return None
        out.append(piece[len(lead) : len(piece) - len(tail)])
    return out
