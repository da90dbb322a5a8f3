"""``anyres``: LLaVA-NeXT's AnyRes, through transformers' own code so that export matches by construction.

An image is resized (aspect kept) and zero-padded to the best of the ``grid_pinpoints`` resolutions, cut into
tiles of the tower's view size, and preceded by the whole image squashed to one view. Each tile's features form a
``side × side`` grid (``side² = tokens_per_view``); the tiles' grids are stitched into one, the rows and columns
that only covered padding are dropped (``unpad_image``), and a learned ``image_newline`` ends every row. The
image's tokens are the base view's, then that grid, row by row: transformers' ``pack_image_features`` for
``spatial_unpad``. See docs/high-resolution.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from vlmkit.errors import ConfigError
from vlmkit.processing.images import ImageTransformConfig, checked_rgb
from vlmkit.views.base import VIEWS, Assembler, Geometry, Size, Views, ViewsSpec

LLAVA_NEXT_GRID = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
"""LLaVA-NeXT's pinpoints in tiles (rows, columns): 336×672, 672×336, 672×672, 1008×336, 336×1008 at 336 px."""


@dataclass
class AnyresOptions:
    grid_pinpoints: list[list[int]] | None = None
    """Candidate resolutions ``[height, width]`` in pixels, each a multiple of the tower's view size; None:
    LLaVA-NeXT's five (1×2, 2×1, 2×2, 3×1 and 1×3 tiles) at the tower's view size."""
    max_tiles: int | None = None
    """Drop the pinpoints of more tiles than this (None: keep them all); bounds the views, and so the tokens, of
    any image."""


def grid_pinpoints(options: AnyresOptions, view_size: int) -> list[list[int]]:
    """The pinpoints an image may be fitted to: validated, those over ``max_tiles`` dropped."""
    given = options.grid_pinpoints
    if given is None:
        given = [[rows * view_size, cols * view_size] for rows, cols in LLAVA_NEXT_GRID]
    if not isinstance(given, list | tuple) or not given:
        raise ConfigError(f"views.options.grid_pinpoints: expected a list of [height, width], got {given!r}")
    pinpoints = []
    for pair in given:
        ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)
        if not ok or any(v % view_size for v in pair):
            raise ConfigError(
                f"views.options.grid_pinpoints: {pair!r} is not a [height, width] of positive multiples of the "
                f"tower's view size {view_size}"
            )
        pinpoints.append([int(pair[0]), int(pair[1])])
    if options.max_tiles is None:
        return pinpoints
    if not isinstance(options.max_tiles, int) or options.max_tiles < 1:
        raise ConfigError(f"views.options.max_tiles: expected a positive number of tiles, got {options.max_tiles!r}")
    kept = [p for p in pinpoints if (p[0] // view_size) * (p[1] // view_size) <= options.max_tiles]
    if not kept:
        raise ConfigError(
            f"views.options.max_tiles {options.max_tiles}: every grid pinpoint has more tiles ({pinpoints}); "
            "raise it or give smaller pinpoints"
        )
    return kept


def grid_side(tokens_per_view: int) -> int:
    """The side of a view's square feature grid; refuses views whose tokens aren't one."""
    side = math.isqrt(tokens_per_view)
    if side * side != tokens_per_view:
        raise ConfigError(
            f"anyres lays each view's tokens out as a square grid, but a view makes {tokens_per_view} tokens; a "
            "tower that keeps its CLS token (select_strategy 'full') can't be used: use 'default'"
        )
    return side


def image_processor(options: AnyresOptions, config: ImageTransformConfig) -> LlavaNextImageProcessorPil:
    """transformers' LLaVA-NeXT image processor (the torchvision-free one) for these options and normalisation."""
    size = config.size
    return LlavaNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.mean),
        image_std=list(config.std),
        do_convert_rgb=True,
        do_pad=True,
        image_grid_pinpoints=grid_pinpoints(options, size),
    )


def unpadded_grid(size: Size, rows: int, cols: int, side: int) -> tuple[int, int]:
    """Feature rows and columns left of a ``rows × cols`` tile grid once ``unpad_image`` drops the padding."""
    kept = unpad_image(torch.empty(0, rows * side, cols * side), size).shape
    return int(kept[1]), int(kept[2])


class AnyresViews(Views):
    """The base view, then the tiles row by row, as transformers' LLaVA-NeXT image processor makes them."""

    def __init__(self, options: AnyresOptions, geometry: Geometry, transform: Any) -> None:
        super().__init__(options, geometry, transform)
        self.side = grid_side(geometry.tokens_per_view)
        self.processor = image_processor(options, transform.config)
        self.pinpoints = self.processor.image_grid_pinpoints

    def pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        image = checked_rgb(image, name)
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return pixels.to(torch.float32)

    def num_views(self, size: Size) -> int:
        return int(image_size_to_num_patches(tuple(size), self.pinpoints, self.geometry.view_size))

    def num_tokens(self, size: Size) -> int:
        rows, cols = get_anyres_image_grid_shape(tuple(size), self.pinpoints, self.geometry.view_size)
        height, width = unpadded_grid(size, rows, cols, self.side)
        return self.geometry.tokens_per_view + height * (width + 1)


class AnyresAssembler(Assembler):
    """Holds LLaVA-NeXT's ``image_newline``; lays the projected views out as ``pack_image_features`` does."""

    def __init__(self, options: AnyresOptions, geometry: Geometry) -> None:
        super().__init__(options, geometry)
        self.pinpoints = grid_pinpoints(options, geometry.view_size)
        self.side = grid_side(geometry.tokens_per_view)
        self.image_newline = nn.Parameter(torch.randn(geometry.lm_dim) / math.sqrt(geometry.lm_dim))

    def num_views(self, size: Size) -> int:
        return int(image_size_to_num_patches(tuple(size), self.pinpoints, self.geometry.view_size))

    def after_projector(self, projected: torch.Tensor, size: Size) -> torch.Tensor:
        base, tiles = projected[0], projected[1:]
        rows, cols = get_anyres_image_grid_shape(tuple(size), self.pinpoints, self.geometry.view_size)
        side = self.side
        grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), tuple(size))
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
        grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((base, grid), dim=0)


VIEWS.add("anyres", ViewsSpec(AnyresOptions, AnyresViews, AnyresAssembler))
