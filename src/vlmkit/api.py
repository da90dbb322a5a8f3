"""The Python API: ``vlmkit.load(...)`` gives a :class:`VLM` that chats, streams and generates in batches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmkit.backends import Backend, load_model
from vlmkit.devices import resolve_device, resolve_dtype
from vlmkit.errors import ConfigError
from vlmkit.inference.caches import CacheConfig
from vlmkit.inference.engine import Conversation, Engine
from vlmkit.inference.options import (
    ENCODING_OPTIONS,
    GenerationOptions,
    GenerationResult,
    asks_for_choices,
    options_per_row,
)
from vlmkit.models.builtin import BUILTIN_MODELS as _BUILTINS
from vlmkit.processing.conversation import Conversation as ParsedConversation
from vlmkit.processing.conversation import prompt_conversation
from vlmkit.processing.images import ImageAccess

log = logging.getLogger(__name__)

BUILTIN_MODELS = _BUILTINS
"""Names of models that need no download (``vlmkit.models.builtin``)."""

Answer = str | list[str]
"""One conversation's answer: a string, or the list of its ``n`` answers when the call names ``n``."""


def _is_conversation(value: Any) -> bool:
    return isinstance(value, ParsedConversation) or (
        isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)
    )


def split_batch(messages: Any, images: Sequence[Any] | None) -> tuple[list[Any], bool]:
    """``chat()``'s first argument → (conversations, whether it was a batch). The rule, by shape:

    - a string: one prompt (with ``images``);
    - a list of message dicts (or a parsed Conversation): one conversation;
    - a list of conversations (lists of message dicts, Conversations): a batch;
    - a list of strings: a batch of prompts; ``images`` is then one list (or None) per prompt.

    Anything else (an empty list, a list mixing messages and conversations) is refused.
    """
    if isinstance(messages, str):
        return [prompt_conversation(messages, images).to_messages()], False
    if _is_conversation(messages):
        if images:
            raise ConfigError("give images inside the messages' content parts, or pass a string prompt with images")
        return [messages], False
    if not isinstance(messages, list | tuple) or not messages:
        raise ConfigError(
            "chat() takes a prompt string, a conversation (a list of {'role', 'content'} messages), or a non-empty "
            f"list of conversations or prompts (a batch); got {type(messages).__name__}"
        )
    if all(isinstance(m, str) for m in messages):
        if images is None:
            per_prompt: list[Any] = [None] * len(messages)
        elif (
            isinstance(images, list | tuple)
            and len(images) == len(messages)
            and all(i is None or isinstance(i, list | tuple) for i in images)
        ):
            per_prompt = list(images)
        else:
            raise ConfigError(
                f"a batch of {len(messages)} prompts takes images as a list of {len(messages)} lists (or None), one "
                "per prompt"
            )
        return [prompt_conversation(m, i).to_messages() for m, i in zip(messages, per_prompt, strict=True)], True
    if all(_is_conversation(m) for m in messages):
        if images:
            raise ConfigError("a batch of conversations takes its images inside the messages' content parts")
        return list(messages), True
    raise ConfigError(
        "a list passed to chat() must hold message dicts (one conversation), or conversations / prompt strings (a "
        "batch), not a mix; batch conversations as [[...messages of 1...], [...messages of 2...]]"
    )


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

    def configure_caches(
        self, image_cache_mb: float | None = None, prefix_cache_mb: float | None = None, block_size: int | None = None
    ) -> None:
        """Resize the engine's image-feature and KV prefix caches (emptied; 0 turns one off; None keeps a size).

        A backend without these caches (transformers, OpenVINO) refuses any size but 0, naming the option."""
        given = {name: value for name, value in (("image_cache_mb", image_cache_mb),
                 ("prefix_cache_mb", prefix_cache_mb), ("block_size", block_size)) if value is not None}  # fmt: skip
        configure = getattr(self.engine, "configure_caches", None)
        if configure is None:
            asked = [name for name, value in given.items() if name == "block_size" or value]
            if asked:
                raise ConfigError(
                    f"{', '.join(asked)}: the {type(self.engine).__name__} backend has no image-feature or prefix "
                    "cache (only vlmkit's own engine has); leave the option unset or 0"
                )
            return
        configure(dataclasses.replace(getattr(self.engine, "cache_config", CacheConfig()), **given))

    def set_decode(self, mode: str) -> None:
        """``"compiled"`` (a static KV cache and a ``torch.compile``'d decode step), ``"eager"`` or ``"auto"``
        (compiled on CUDA): :meth:`Engine.set_decode`. Other backends refuse ``"compiled"``, naming the option."""
        setter = getattr(self.engine, "set_decode", None)
        if setter is not None:
            setter(mode)
        elif mode not in ("auto", "eager"):
            raise ConfigError(
                f"decode={mode!r}: the {type(self.engine).__name__} backend has no compiled decode step (only "
                "vlmkit's own engine has); use 'auto' or 'eager'"
            )

    def cache_stats(self) -> dict[str, Any] | None:
        """The engine's cache figures (hits, lookups, bytes: :meth:`Engine.cache_stats`); None for a backend
        without caches."""
        stats = getattr(self.engine, "cache_stats", None)
        return stats() if callable(stats) else None

    def close(self) -> None:
        """Free the model: the engine releases what it holds (an OpenVINO backend its compiled models and KV
        caches), and this object drops its model, processor and engine; using it afterwards is an error.
        Calling it again does nothing. ``with vlmkit.load(...) as vlm:`` closes on leaving the block."""
        engine = self.__dict__.get("engine")
        if isinstance(engine, _Closed):
            return
        release = getattr(engine, "close", None)
        if callable(release):
            release()
        closed = _Closed(self.name)
        self.model, self.processor, self.engine = closed, closed, closed
        del engine, release  # the last references: freed before the memory is handed back
        _release_memory()

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prompts(self, conversations: list[Any], encoding: dict[str, Any]) -> list[Any]:
        """The conversations, encoded first when an encoding option (continue_final_message, chat_template) is set."""
        for name, value in encoding.items():
            if isinstance(value, list | tuple):
                raise ConfigError(f"{name} applies to the whole call; give one value, not a list")
        if encoding.get("continue_final_message") not in (None, True, False):
            raise ConfigError("continue_final_message must be True or False")
        if not encoding.get("continue_final_message") and encoding.get("chat_template") is None:
            return conversations
        kwargs = {k: v for k, v in encoding.items() if v is not None}
        return [self.engine.encode(c, f"conversation {i}", **kwargs) for i, c in enumerate(conversations)]

    def _run(self, conversations: list[Any], batched: bool, options: dict[str, Any]) -> list[list[GenerationResult]]:
        encoding = {k: options.pop(k) for k in ENCODING_OPTIONS if k in options}
        per_row = options_per_row(len(conversations) if batched else None, **options)
        flat = self.engine.generate(self._prompts(conversations, encoding), per_row)
        grouped, at = [], 0
        for opts in per_row:
            grouped.append(flat[at : at + opts.n])
            at += opts.n
        return grouped

    def generate_batch(self, conversations: Sequence[Any], **options: Any) -> list[Any]:
        """One :class:`GenerationResult` per conversation (or prompt string), generated together in one batch.

        An option given as a list has one value per conversation (see :func:`options_per_row`). When the call
        names ``n`` (or ``num_return_sequences``), each entry is instead the list of that conversation's ``n``
        results. ``continue_final_message`` and ``chat_template`` apply to every conversation.
        """
        if isinstance(conversations, str) or _is_conversation(conversations):
            raise ConfigError("generate_batch takes a list of conversations; for one, use [conversation] or chat()")
        items = [prompt_conversation(c).to_messages() if isinstance(c, str) else c for c in conversations]
        grouped = self._run(items, True, dict(options))
        return grouped if asks_for_choices(options) else [g[0] for g in grouped]

    def chat(self, messages: Any, images: Sequence[Any] | None = None, **options: Any) -> Answer | list[Answer]:
        """The assistant's reply to a conversation, or to a string prompt with optional images.

        A batch (a list of conversations, or of prompt strings) gives a list of replies, in order (the rule:
        :func:`split_batch`). Naming ``n`` / ``num_return_sequences`` makes each reply the list of its ``n``
        answers. Options: :meth:`GenerationOptions.from_kwargs` (transformers' and vLLM's names included),
        per-row lists in a batch, ``continue_final_message`` (continue the final assistant message instead of
        answering after it) and ``chat_template`` (a Jinja template instead of the model's).
        """
        conversations, batched = split_batch(messages, images)
        grouped = self._run(conversations, batched, dict(options))
        texts: list[Answer] = [[r.text for r in g] if asks_for_choices(options) else g[0].text for g in grouped]
        return texts if batched else texts[0]

    def stream(self, messages: Any, images: Sequence[Any] | None = None, **options: Any) -> Iterator[str]:
        """The reply to one conversation as text pieces, yielded as they are decoded; they concatenate to
        :meth:`chat`'s text. (One answer only: ``n`` > 1 and ``logprobs`` are for :meth:`chat` and
        :meth:`generate_batch`.)"""
        conversations, batched = split_batch(messages, images)
        if batched:
            raise ConfigError("stream() takes one conversation; use the engine's stream_batch() for a batch")
        encoding = {k: options.pop(k) for k in ENCODING_OPTIONS if k in options}
        generation = GenerationOptions.from_kwargs(**options)
        if generation.n != 1 or generation.logprobs is not None:
            raise ConfigError("stream() yields the text of one answer; use chat() or generate_batch() for n > 1 or "
                              "logprobs")  # fmt: skip
        prompt = self._prompts(conversations, encoding)[0]
        for event in self.engine.stream_batch([prompt], generation):
            if event.text:
                yield event.text


def load(
    model: str = "default",
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    allow_remote_images: bool = False,
    *,
    image_cache_mb: float | None = None,
    prefix_cache_mb: float | None = None,
    decode: str | None = None,
) -> VLM:
    """Load ``"default"``, ``"tiny-random"``, a local model folder (vlmkit, LLaVA or another transformers VLM) or
    a hub id, with the backend that runs it (:mod:`vlmkit.backends`).

    Images in conversations may be paths, bytes, PIL images or data URLs; http(s) URLs only with
    ``allow_remote_images=True``. ``image_cache_mb`` / ``prefix_cache_mb``: sizes of the native engine's
    image-feature and KV prefix caches (None: the defaults of :class:`~vlmkit.inference.caches.CacheConfig`;
    0: off); see :meth:`VLM.configure_caches`. ``decode``: how decoding steps run (:meth:`VLM.set_decode`).
    """
    target = resolve_device(device)
    loaded = load_model(str(model), target, resolve_dtype(dtype, target))
    loaded.processor.image_access = ImageAccess(allow_remote=allow_remote_images)
    vlm = VLM(loaded.model, loaded.processor, name=str(model), engine=loaded.engine)
    if image_cache_mb is not None or prefix_cache_mb is not None:
        vlm.configure_caches(image_cache_mb=image_cache_mb, prefix_cache_mb=prefix_cache_mb)
    if decode is not None:
        vlm.set_decode(decode)
    return vlm


def _release_memory() -> None:
    """Collect garbage, and hand freed memory back to the system: CUDA's cache, and glibc's heap (whose freed
    chunks below its mmap threshold otherwise stay in the process, so its RSS would not go down)."""
    import contextlib
    import ctypes
    import gc
    import sys

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Closed:
    """What a closed :class:`VLM` holds instead of its model, processor and engine: every use is an error."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        raise ConfigError(f"model {self._name!r} was closed (VLM.close()); load it again to use it")


__all__ = ["VLM", "Conversation", "load", "split_batch"]
