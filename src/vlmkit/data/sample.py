"""The record every dataset reader yields and every trainer or evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

IMAGE_TOKEN = "<image>"
"""The marker that stands for one image inside message text (LLaVA convention)."""


@dataclass
class Sample:
    """One conversation with its images.

    ``messages`` use roles ``system``/``user``/``assistant`` and string content; each ``<image>`` marker in the
    text stands for the next image of ``images`` (RGB PIL images loaded through ``vlmkit.processing.images``).
    """

    id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
