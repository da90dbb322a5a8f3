"""The Python API: ``vlmkit.load(...)`` gives a :class:`VLM` that chats, streams and generates in batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmkit.backends import Backend, load_model
from vlmkit.devices import resolve_device, resolve_dtype
from vlmkit.errors import ConfigError
from vlmkit.inference.engine import Conversation, Engine
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.models.builtin import BUILTIN_MODELS as _BUILTINS
from vlmkit.processing.conversation import prompt_conversation
from vlmkit.processing.images import ImageAccess

log = logging.getLogger(__name__)

BUILTIN_MODELS = _BUILTINS
"""Names of models that need no download (``vlmkit.models.builtin``)."""


class VLM:
    """A loaded model with its processor and engine: the object the API, CLI and server all use."""

    def __init__(self, model: Any, processor: Any, name: str = "", engine: Backend | None = None) -> None:
        """``model`` and ``processor`` are vlmkit's own unless ``engine`` (another backend) runs them."""
        self.model = model
        self.processor = processor
        self.name = name
        self.engine: Backend = engine if engine is not None else Engine(model, processor)

    @property
    def notice(self) -> str | None:
        """A one-time message the CLI shows for demo models (None for real checkpoints)."""
        return BUILTIN_MODELS.get(self.name).notice if self.name in BUILTIN_MODELS else None

    @staticmethod
    def _conversation(messages: str | Conversation, images: Sequence[Any] | None) -> Conversation:
        if isinstance(messages, str):
            return prompt_conversation(messages, images).to_messages()
        if images:
            raise ConfigError("give images inside the messages' content parts, or pass a string prompt with images")
        return messages

    def generate_batch(self, conversations: Sequence[Conversation], **options: Any) -> list[GenerationResult]:
        """One :class:`GenerationResult` per conversation, generated together in one batch."""
        return self.engine.generate(list(conversations), GenerationOptions.from_kwargs(**options))

    def chat(self, messages: str | Conversation, images: Sequence[Any] | None = None, **options: Any) -> str:
        """The assistant's reply to a conversation (or to a string prompt with optional images)."""
        return self.generate_batch([self._conversation(messages, images)], **options)[0].text

    def stream(
        self, messages: str | Conversation, images: Sequence[Any] | None = None, **options: Any
    ) -> Iterator[str]:
        """The reply as text pieces, yielded as they are decoded; they concatenate to :meth:`chat`'s text."""
        conversation = self._conversation(messages, images)
        for event in self.engine.stream_batch([conversation], GenerationOptions.from_kwargs(**options)):
            if event.text:
                yield event.text


def load(
    model: str = "default",
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    allow_remote_images: bool = False,
) -> VLM:
    """Load ``"default"``, ``"tiny-random"``, a local model folder (vlmkit, LLaVA or another transformers VLM) or
    a hub id, with the backend that runs it (:mod:`vlmkit.backends`).

    Images in conversations may be paths, bytes, PIL images or data URLs; http(s) URLs only with
    ``allow_remote_images=True``.
    """
    target = resolve_device(device)
    loaded = load_model(str(model), target, resolve_dtype(dtype, target))
    loaded.processor.image_access = ImageAccess(allow_remote=allow_remote_images)
    return VLM(loaded.model, loaded.processor, name=str(model), engine=loaded.engine)
