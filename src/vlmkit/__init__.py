"""vlmkit: build, train, run, serve, evaluate and export vision-language models.

Heavy modules (torch, transformers) load on first use of a name below, so ``import vlmkit.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from vlmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageError,
    ImageTokenMismatchError,
    ProcessingError,
    RegistryError,
    VlmkitError,
)

__version__ = "0.1.0"

_LAZY = {
    "VLM": "vlmkit.api",
    "load": "vlmkit.api",
    "pipeline": "vlmkit.pipelines",
    "compose": "vlmkit.models.compose",
    "load_pretrained": "vlmkit.models.compose",
    "save_pretrained": "vlmkit.models.compose",
    "build_projector": "vlmkit.models.projector",
    "projector_names": "vlmkit.models.projector",
    "VisionLanguageModel": "vlmkit.models.vlm",
    "load_image": "vlmkit.processing.images",
    "VLMProcessor": "vlmkit.processing.processor",
    "GenerationOptions": "vlmkit.inference.options",
    "Embedder": "vlmkit.embeddings.api",
    "embed": "vlmkit.embeddings.api",
    "search": "vlmkit.embeddings.api",
    "classify": "vlmkit.embeddings.api",
    "find_duplicates": "vlmkit.embeddings.api",
    "open_index": "vlmkit.embeddings.api",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageError",
    "ImageTokenMismatchError",
    "ProcessingError",
    "RegistryError",
    "VlmkitError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
