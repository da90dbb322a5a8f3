"""The native backend: vlmkit's own models (and transformers LLaVA checkpoints, imported as vlmkit models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.backends.base import BACKENDS, BackendLoader, LoadedModel


def _load_native(model: Any, processor: Any, device: Any, dtype: Any) -> LoadedModel:
    from vlmkit.inference.engine import Engine

    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, processor, Engine(model, processor))


def _is_vlmkit(folder: Path, config: dict[str, Any]) -> bool:
    return isinstance(config.get("format_version"), int)


def _load_vlmkit(folder: Path, device: Any, dtype: Any) -> LoadedModel:
    from vlmkit.models.compose import load_pretrained

    return _load_native(*load_pretrained(folder), device, dtype)


def _is_hf_llava(folder: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") == "llava"


def _load_hf_llava(folder: Path, device: Any, dtype: Any) -> LoadedModel:
    from vlmkit.interop.hf_llava import load_hf_llava

    return _load_native(*load_hf_llava(folder), device, dtype)


BACKENDS.add("vlmkit", BackendLoader(_is_vlmkit, _load_vlmkit, priority=10))
BACKENDS.add("llava-hf", BackendLoader(_is_hf_llava, _load_hf_llava, priority=20))


def load_native_parts(model: Any, processor: Any, device: Any, dtype: Any) -> LoadedModel:
    """A vlmkit model and processor already in memory (a built-in model), on ``device`` in ``dtype``."""
    return _load_native(model, processor, device, dtype)
