"""Built-in embedding models: names that need no download (the dual-encoder counterpart of ``BUILTIN_MODELS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import CheckpointError
from vlmkit.registry import Registry

CLIP_SHAPES_DIR = Path(__file__).parent.parent / "assets" / "clip"


@dataclass(frozen=True)
class BuiltinEncoder:
    folder: Callable[[], Path]
    """``() -> the model folder`` (transformers layout); raises :class:`CheckpointError` when it isn't shipped."""
    notice: str
    """Shown once by the CLI: what the model is (and is not) good for."""
    templates: str = "imagenet"
    """The prompt-template set zero-shot labels use with it by default."""


EMBEDDING_MODELS: Registry[BuiltinEncoder] = Registry("built-in embedding model")


def _clip_shapes() -> Path:
    if not (CLIP_SHAPES_DIR / "config.json").is_file():
        raise CheckpointError(
            "the built-in 'clip-shapes' embedding model is not shipped in this version; pass --model with a CLIP or "
            "SigLIP folder or hub id"
        )
    return CLIP_SHAPES_DIR


EMBEDDING_MODELS.add("clip-shapes", BuiltinEncoder(
    _clip_shapes,
    "vlmkit's built-in 'clip-shapes' is a tiny dual encoder trained only on synthetic shapes (ShapesWorld); for "
    "photos, pass --model with a real CLIP or SigLIP checkpoint.",
    templates="shapes",
))  # fmt: skip
