"""The transformers backend: pretrained VLMs vlmkit can't express natively (Qwen2-VL, InternVL, SmolVLM, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.backends.base import BACKENDS, BackendLoader, LoadedModel


def _is_transformers_vlm(folder: Path, config: dict[str, Any]) -> bool:
    from vlmkit.interop.hf_backend import is_transformers_vlm

    return is_transformers_vlm(folder)


def _load(folder: Path, device: Any, dtype: Any) -> LoadedModel:
    from vlmkit.interop.hf_backend import load_transformers_vlm

    return LoadedModel(*load_transformers_vlm(folder, device, dtype))


BACKENDS.add("transformers", BackendLoader(_is_transformers_vlm, _load, priority=30))
