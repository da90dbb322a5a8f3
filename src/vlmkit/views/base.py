"""The image-views seam: how one image becomes the tower's views, and how their features become its tokens.

A strategy has two halves, registered together in :data:`VIEWS`:

- :class:`Views` (processing, no parameters): ``pixels(image)`` → the views' pixel tensors ``(V, 3, S, S)``,
  and ``num_tokens(size)``, the image's placeholder count, which must equal what the assembler returns.
- :class:`Assembler` (an ``nn.Module``, saved with the model): ``before_projector`` (tower features of one
  image's views → what the projector maps), ``after_projector`` (→ the image's ``(tokens, lm_hidden)``), and
  ``projector_in`` (the feature size the projector takes, e.g. 4C after a 2×2 merge).

Everything a strategy needs to lay out an image is its original size ``(height, width)``, which travels with the
batch as ``image_sizes`` (as in LLaVA-NeXT), so the processor and the model agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmkit.config import ViewsConfig, config_from_dict, config_to_dict
from vlmkit.errors import ConfigError
from vlmkit.registry import Registry

Size = tuple[int, int]
"""An image's ``(height, width)`` in pixels, as loaded (EXIF orientation applied)."""


@dataclass(frozen=True)
class Geometry:
    """What the strategies know of the model: the view side, the tower's patch grid, the feature sizes."""

    view_size: int
    """Pixels of one (square) view: the tower's input size."""
    tokens_per_view: int
    """Feature vectors one view yields after the projector (e.g. 576; 64 after a 3× pixel shuffle of 24×24)."""
    tower_dim: int
    lm_dim: int = 0
    """0 on the processing side (only assemblers need it)."""


class Views:
    """The processing half: views and token counts. Subclasses take their options in ``__init__``."""

    def __init__(self, options: Any, geometry: Geometry, transform: Any) -> None:
        self.options = options
        self.geometry = geometry
        self.transform = transform  # the processor's ImageTransform (size, resize mode, normalisation)

    def pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        """``(V, 3, S, S)`` float pixels of an RGB image's views."""
        raise NotImplementedError

    def num_views(self, size: Size) -> int:
        raise NotImplementedError

    def num_tokens(self, size: Size) -> int:
        """Placeholder tokens of an image of ``size``; equals the assembler's output length."""
        raise NotImplementedError


class Assembler(nn.Module):
    """The model half: tower features of one image's views → the image's tokens (default: pass-through)."""

    def __init__(self, options: Any, geometry: Geometry) -> None:
        super().__init__()
        self.options = options
        self.geometry = geometry

    @classmethod
    def projector_in(cls, options: Any, tower_dim: int) -> int:
        """The feature size the projector takes, from the tower's (e.g. 4C after a 2×2 merge)."""
        return tower_dim

    def num_views(self, size: Size) -> int:
        """Views of an image of ``size`` (as the processing half makes them)."""
        return 1

    def before_projector(self, features: torch.Tensor, size: Size) -> torch.Tensor:
        """``(V, T, C)`` tower features of one image → what the projector maps (last dim ``projector_in``)."""
        return features

    def after_projector(self, projected: torch.Tensor, size: Size) -> torch.Tensor:
        """The projector's output for one image → ``(tokens, lm_hidden)``."""
        return projected.reshape(-1, projected.shape[-1])


@dataclass(frozen=True)
class ViewsSpec:
    """One registered strategy: its options type and its two halves."""

    options: type
    views: type[Views]
    assembler: type[Assembler]


VIEWS: Registry[ViewsSpec] = Registry("image views strategy")


def _options(config: ViewsConfig) -> Any:
    spec = VIEWS.get(config.name)
    return config_from_dict(spec.options, dict(config.options), "views.options.")


def build_views(config: ViewsConfig, geometry: Geometry, transform: Any) -> Views:
    """The processing half of ``config``'s strategy."""
    return VIEWS.get(config.name).views(_options(config), geometry, transform)


def build_assembler(config: ViewsConfig, geometry: Geometry) -> Assembler:
    """The model half of ``config``'s strategy."""
    if geometry.lm_dim <= 0:
        raise ConfigError("an assembler needs the LM's hidden size (geometry.lm_dim)")
    return VIEWS.get(config.name).assembler(_options(config), geometry)


def projector_in(config: ViewsConfig, tower_dim: int) -> int:
    """The projector's input size under ``config``'s strategy."""
    return VIEWS.get(config.name).assembler.projector_in(_options(config), tower_dim)


def views_to_dict(config: ViewsConfig) -> dict[str, Any]:
    """The JSON form saved in checkpoints, with every option spelled out (defaults included)."""
    return {"name": config.name, "options": config_to_dict(_options(config))}
