"""Backends: what runs a model. One contract (:class:`Backend`) and one registry (:data:`BACKENDS`).

Built in: ``vlmkit`` (native checkpoints), ``llava-hf`` (transformers LLaVA, imported as native),
``transformers`` (other transformers VLMs) and ``openvino`` (``vlmkit export --to openvino`` folders). See
docs/architecture.md, "How to add a backend".
"""

from vlmkit.backends import hf, native, openvino  # noqa: F401  - they register themselves
from vlmkit.backends.base import (
    BACKENDS,
    EXPORT,
    TRAIN,
    Backend,
    BackendLoader,
    EncodedPrompt,
    LoadedModel,
    RunningBatch,
    detect_backend,
    load_folder,
    load_model,
    model_folder,
)

__all__ = [
    "BACKENDS",
    "EXPORT",
    "TRAIN",
    "Backend",
    "BackendLoader",
    "EncodedPrompt",
    "LoadedModel",
    "RunningBatch",
    "detect_backend",
    "load_folder",
    "load_model",
    "model_folder",
]
