"""Built-in models: names that need no download, each with its loader and the notice the CLI shows for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.errors import CheckpointError
from vlmkit.registry import Registry

BUILTIN_DIR = Path(__file__).parent.parent / "assets" / "default"


@dataclass(frozen=True)
class BuiltinModel:
    load: Callable[[], tuple[Any, Any]]
    """``() -> (VisionLanguageModel, VLMProcessor)``, on the CPU in float32."""
    notice: str
    """Shown once by the CLI: what the model is (and is not) good for."""


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("built-in model")


def _load_default() -> tuple[Any, Any]:
    from vlmkit.models.compose import load_pretrained

    if not (BUILTIN_DIR / "config.json").is_file():
        raise CheckpointError(
            "the built-in 'default' model is not shipped in this version yet; pass a vlmkit checkpoint folder, "
            "or 'tiny-random' for a tiny untrained model that shows the pipeline"
        )
    return load_pretrained(BUILTIN_DIR)


def _load_tiny_random() -> tuple[Any, Any]:
    from vlmkit.models.tiny import tiny_random_vlm

    return tiny_random_vlm()


BUILTIN_MODELS.add("default", BuiltinModel(
    _load_default,
    "vlmkit's built-in 'default' is a small demo model trained only on synthetic shapes (ShapesWorld); for photos, "
    "pass --model with a real checkpoint.",
))  # fmt: skip
BUILTIN_MODELS.add("tiny-random", BuiltinModel(
    _load_tiny_random, "'tiny-random' is an UNTRAINED model: its text is random; it only shows the pipeline."
))  # fmt: skip
