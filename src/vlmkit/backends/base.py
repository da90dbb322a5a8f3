"""The backend seam: the contract every engine keeps (:class:`Backend`), and the registry that finds the backend
for a model folder (:data:`BACKENDS`).

A backend runs one kind of model: vlmkit's own (:class:`vlmkit.inference.engine.Engine`) or a transformers VLM
(:class:`vlmkit.interop.hf_engine.HFEngine`). ``VLM``, the server's scheduler, ``describe``, ``eval`` and
``export`` see only this contract, so a new backend is one module: its engine, plus a :class:`BackendLoader`
registered under its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmkit.errors import CheckpointError
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.rows import StreamEvent
from vlmkit.registry import Registry

Conversation = list[dict[str, Any]]

EXPORT = "export"
"""Capability: the model can be written in transformers' LLaVA format (``vlmkit export``)."""
TRAIN = "train"
"""Capability: vlmkit's trainer can fine-tune the model."""


class EncodedPrompt(Protocol):
    """A checked conversation, ready to join a batch."""

    input_ids: list[int]
    image_token_counts: list[int]


class RunningBatch(Protocol):
    """Requests decoded together; they join (:meth:`add`) and leave (finished or :meth:`cancel`) at any step."""

    def __len__(self) -> int: ...

    @property
    def keys(self) -> list[Hashable]: ...

    def add(self, items: Sequence[tuple[Hashable, Any, GenerationOptions]]) -> list[StreamEvent]:
        """Join ``(key, encoded prompt, options)`` items; returns error events of those that failed alone."""
        ...

    def step(self) -> list[StreamEvent]:
        """One decoding step: text pieces, results of finished rows, errors of rows that failed alone."""
        ...

    def cancel(self, keys: AbstractSet[Hashable]) -> None:
        """Drop rows without emitting anything for them."""
        ...


class Backend(Protocol):
    """What runs a model: encoding, batched generation and streaming, and a running batch for the server."""

    processor: Any
    """Holds ``tokenizer``, ``image_access`` and ``max_pixels`` (the same names on every backend)."""
    context_length: int
    stop_ids: set[int]
    capabilities: frozenset[str]
    """What else the model supports: :data:`EXPORT`, :data:`TRAIN`."""

    def encode(self, conversation: Conversation, name: str = "request") -> Any:
        """Check a conversation (images, template, context length); an :class:`EncodedPrompt`.

        Both built-in backends also take ``continue_final_message`` and ``chat_template`` keywords (the API
        passes them only when set), and have ``encode_prompt(text, name)`` for a raw text prompt (the server's
        ``/v1/completions``; a backend without it answers that route with a 400)."""
        ...

    def generate(
        self, conversations: Sequence[Any], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> list[GenerationResult]:
        """``options.n`` answers per conversation (or encoded prompt), all in one batch: conversation 0's
        choices first, then conversation 1's, ... Each result's ``logprobs`` is filled when asked for."""
        ...

    def stream_batch(
        self, conversations: Sequence[Any], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> Iterator[StreamEvent]:
        """Text pieces of a batch as they are decoded (any order across requests), each request's result last."""
        ...

    def new_batch(self) -> RunningBatch:
        """An empty running batch."""
        ...


@dataclass
class LoadedModel:
    """What a backend loads: the model, its processor and the engine that runs them."""

    model: Any
    processor: Any
    engine: Backend


@dataclass(frozen=True)
class BackendLoader:
    """How a backend recognises a model folder and loads it."""

    detect: Callable[[Path, dict[str, Any]], bool]
    """``(folder, its config.json)`` → whether this backend runs it."""
    load: Callable[[Path, Any, Any], LoadedModel]
    """``(folder, torch device, torch dtype)`` → the loaded model, on the device, in the dtype."""
    priority: int = 50
    """Lower is asked first (a narrow format before a broad one)."""


BACKENDS: Registry[BackendLoader] = Registry("backend")


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict (a clear error when it is missing or not JSON)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"model folder {folder} has no config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def detect_backend(folder: Path) -> str:
    """The name of the backend that runs ``folder``; a :class:`CheckpointError` saying what it is otherwise."""
    config = read_config(folder)
    for name, loader in sorted(BACKENDS.items(), key=lambda item: item[1].priority):
        if loader.detect(folder, config):
            return name
    raise CheckpointError(_unrunnable(folder, config))


def load_folder(folder: Path, device: Any, dtype: Any) -> LoadedModel:
    """Load a model folder with the backend that runs it."""
    return BACKENDS.get(detect_backend(folder)).load(folder, device, dtype)


def _unrunnable(folder: Path, config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if config.get("auto_map") or model_type == "phi3_v":
        return (
            f"{folder}: model_type {model_type!r} is a custom-code model (its config.json names its own classes in "
            "'auto_map', to run with trust_remote_code); vlmkit runs only models that transformers implements "
            "itself. Use a transformers-native checkpoint of a similar model (e.g. a '-hf' version), or load it "
            "with transformers directly"
        )
    if model_type:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return (
                f"{folder}: model_type {model_type!r} is a text-only language model; compose it with a vision tower "
                "into a VLM (vlmkit.compose(vision, lm, 'mlp2x_gelu') or a training recipe's model.lm)"
            )
        return (
            f"{folder}: model_type {model_type!r} is neither a vlmkit checkpoint (no format_version) nor a vision-"
            f"language model this transformers version runs; backends tried: {', '.join(BACKENDS.names())}"
        )
    return f"{folder}: config.json has no format_version and no model_type; not a vlmkit or transformers checkpoint"


def model_folder(name: str) -> Path:
    """A model name that is not built in → its folder: a local path, or a hub id (owner/name) downloaded once."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        from vlmkit.models.builtin import BUILTIN_MODELS

        raise CheckpointError(
            f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS.names())}), not an existing "
            "folder, and not a hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except Exception as exc:  # hub errors are many types; all mean "couldn't get it"
        raise CheckpointError(f"model {name!r}: not a local folder and the hub download failed ({exc})") from exc


def load_model(name: str, device: Any, dtype: Any) -> LoadedModel:
    """The one resolution of a model name, for every command: a built-in name, a folder or a hub id."""
    from vlmkit.models.builtin import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        from vlmkit.backends.native import load_native_parts

        return load_native_parts(*BUILTIN_MODELS.get(name).load(), device, dtype)
    return load_folder(model_folder(name), device, dtype)
