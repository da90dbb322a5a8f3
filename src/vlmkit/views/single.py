"""``single``: one square view of the tower's size per image (pad-to-square or resize), LLaVA-1.5's way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vlmkit.views.base import VIEWS, Assembler, Size, Views, ViewsSpec


@dataclass
class SingleOptions:
    """No options: the processor's image transform (size, resize mode) is the whole strategy."""


class SingleViews(Views):
    def pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        return self.transform(image, name)[None]

    def num_views(self, size: Size) -> int:
        return 1

    def num_tokens(self, size: Size) -> int:
        return self.geometry.tokens_per_view


VIEWS.add("single", ViewsSpec(SingleOptions, SingleViews, Assembler))
