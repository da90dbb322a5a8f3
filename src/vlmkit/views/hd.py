"""``hd``: Phi-3-vision's HD transform — a grid of view-sized crops plus a global view, 2×2-merged, with learned
row and global separators (``image_processing_phi3_v.py`` / ``image_embedding_phi3_v.py``).

An image is resized, keeping its aspect ratio, to the largest grid of ``rows × cols ≤ max_crops`` crops of the
view side ``S`` that its aspect allows (small images are enlarged, as in Phi-3), padded with white to multiples of
``S`` on its shorter axis, and cut into crops; the global view is the whole padded image resized to ``S × S``.
Each view's ``P × P`` patch features become ``(P/2)²`` tokens of ``4C`` channels (2×2 merge); a learned ``sub_GN``
ends each row of the global grid and of the crop grid, a learned ``glb_GN`` sits between the two parts. With
``m = P/2``, an image of ``rows × cols`` crops takes ``(rows·cols + 1)·m² + 1 + (rows + 1)·m`` tokens (Phi-3's
``(h·w + 1)·144 + 1 + (h + 1)·12`` for its 24×24-patch CLIP tower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.processing.images import checked_rgb
from vlmkit.views.base import VIEWS, Assembler, Geometry, Size, Views, ViewsSpec


@dataclass
class HDOptions:
    """Options of the ``hd`` views strategy."""

    max_crops: int = 16
    """Most crops per image (Phi-3's ``num_crops``/``hd_num``): each image is resized to the largest crop grid
    within this bound that its aspect ratio allows, so it bounds (and, for any image, sets) its token count."""
    separators: bool = True
    """Learned ``sub_GN`` (end of each row) and ``glb_GN`` (between global view and crops), as Phi-3; off: the
    merged tokens only, ``(rows·cols + 1)·m²``."""
    order: Literal["sub_glb", "glb_sub"] = "glb_sub"
    """``glb_sub``: global view, ``glb_GN``, crops (the default of Phi-3's code); ``sub_glb``: crops first (what
    Phi-3-vision's released config sets as ``hd_transform_order``)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_crops, bool) or not isinstance(self.max_crops, int) or self.max_crops < 1:
            raise ConfigError(f"views.options.max_crops must be a whole number ≥ 1, got {self.max_crops!r}")
        if self.order not in ("sub_glb", "glb_sub"):
            raise ConfigError(f"views.options.order must be 'sub_glb' or 'glb_sub', got {self.order!r}")


def hd_layout(size: Size, max_crops: int, side: int) -> tuple[int, int, int, int]:
    """Phi-3's ``calc_hd_transform_size`` for crops of ``side`` pixels: ``(rows, cols, height, width)``, the crop
    grid and the resized image's size before padding (the padded image is ``rows·side × cols·side``)."""
    height, width = size
    transposed = width < height
    if transposed:
        height, width = width, height
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= max_crops:
        scale += 1
    scale -= 1
    new_width = scale * side
    new_height = max(1, int(new_width / ratio))
    rows, cols = math.ceil(new_height / side), scale
    if transposed:
        return cols, rows, new_width, new_height
    return rows, cols, new_height, new_width


def merged_side(geometry: Geometry) -> int:
    """``P/2`` for a tower of ``P × P`` patch tokens per view; refuses token counts that aren't an even square."""
    tokens = geometry.tokens_per_view
    side = math.isqrt(tokens)
    if tokens <= 0 or side * side != tokens or side % 2:
        raise ConfigError(
            f"the 'hd' views strategy merges 2×2 neighbours of a square patch grid, so each view must give an even "
            f"square number of tokens (24×24 = 576 for Phi-3's CLIP-L/336); this model gives {tokens}. Keep patch "
            "tokens only (select_strategy 'default' drops CLIP's CLS token), use a tower with an even number of "
            "patches per side, and a projector that keeps the token count"
        )
    return side // 2


def hd_num_tokens(rows: int, cols: int, merged: int, separators: bool = True) -> int:
    """Tokens of an image of ``rows × cols`` crops with ``merged × merged`` tokens per view."""
    tokens = (rows * cols + 1) * merged * merged
    return tokens + (1 + (rows + 1) * merged if separators else 0)


class HDViews(Views):
    """Views: the global view first, then the crops row by row (Phi-3's order)."""

    options: HDOptions

    def __init__(self, options: HDOptions, geometry: Geometry, transform) -> None:
        super().__init__(options, geometry, transform)
        self.merged = merged_side(geometry)

    def layout(self, size: Size) -> tuple[int, int, int, int]:
        return hd_layout(size, self.options.max_crops, self.geometry.view_size)

    def num_views(self, size: Size) -> int:
        rows, cols, _, _ = self.layout(size)
        return rows * cols + 1

    def num_tokens(self, size: Size) -> int:
        rows, cols, _, _ = self.layout(size)
        return hd_num_tokens(rows, cols, self.merged, self.options.separators)

    def pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        image = checked_rgb(image, name)
        side = self.geometry.view_size
        rows, cols, new_height, new_width = self.layout((image.height, image.width))
        # as Phi-3's HD_transform: landscape orientation, resize, pad top and bottom with white, orient back
        transposed = image.width < image.height
        work = image.transpose(Image.Transpose.TRANSPOSE) if transposed else image
        short, long_ = (new_width, new_height) if transposed else (new_height, new_width)
        work = work.resize((long_, short), Image.Resampling.BILINEAR)
        pad = (cols if transposed else rows) * side - short
        work = ImageOps.expand(work, border=(0, pad // 2, 0, pad - pad // 2), fill=(255, 255, 255))
        if transposed:
            work = work.transpose(Image.Transpose.TRANSPOSE)
        mean, std = (np.asarray(v, dtype=np.float32) for v in (self.transform.config.mean, self.transform.config.std))
        array = (np.asarray(work, dtype=np.float32) / 255.0 - mean) / std  # Phi-3's ToTensor + Normalize
        full = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, rows·S, cols·S)
        whole = F.interpolate(full[None], size=(side, side), mode="bicubic")
        crops = full.reshape(3, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(-1, 3, side, side)
        return torch.cat([whole, crops])


def merge_2x2(features: torch.Tensor, merged: int) -> torch.Tensor:
    """``(V, P², C)`` → ``(V, P/2, P/2, 4C)``, each token the 2×2 block (top-left, top-right, bottom-left,
    bottom-right) of channels, as Phi-3's ``reshape_hd_patches_2x2merge``."""
    views, _, channels = features.shape
    grid = features.reshape(views, merged, 2, merged, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(views, merged, merged, 4 * channels)


class HDAssembler(Assembler):
    """2×2 merge, crop grid and separators before the projector (which maps every token, separators included)."""

    options: HDOptions

    def __init__(self, options: HDOptions, geometry: Geometry) -> None:
        super().__init__(options, geometry)
        self.merged = merged_side(geometry)
        if options.separators:
            dim = 4 * geometry.tower_dim
            self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))  # Phi-3's names and shapes
            self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))

    @classmethod
    def projector_in(cls, options: HDOptions, tower_dim: int) -> int:
        return 4 * tower_dim

    def num_views(self, size: Size) -> int:
        rows, cols, _, _ = hd_layout(size, self.options.max_crops, self.geometry.view_size)
        return rows * cols + 1

    def _rows(self, grid: torch.Tensor) -> torch.Tensor:
        """``(H, W, 4C)`` → tokens row by row, each row ended by ``sub_GN`` (when separators are on)."""
        if self.options.separators:
            newline = self.sub_GN[0].to(grid.dtype).expand(grid.shape[0], 1, -1)
            grid = torch.cat([grid, newline], dim=1)
        return grid.reshape(-1, grid.shape[-1])

    def before_projector(self, features: torch.Tensor, size: Size) -> torch.Tensor:
        rows, cols, _, _ = hd_layout(size, self.options.max_crops, self.geometry.view_size)
        m = self.merged
        if features.shape[1] != 4 * m * m:
            raise ConfigError(
                f"the 'hd' views strategy expected {4 * m * m} tower tokens per view but got {features.shape[1]}: "
                "it merges 2×2 patches before the projector, so it needs a projector that keeps the token count "
                "(not a token-reducing one such as pixel shuffle)"
            )
        merged = merge_2x2(features, m)  # (1 + rows·cols, m, m, 4C)
        whole = self._rows(merged[0])
        crops = merged[1:].reshape(rows, cols, m, m, -1).permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m, -1)
        grid = self._rows(crops)
        if not self.options.separators:
            parts = [whole, grid] if self.options.order == "glb_sub" else [grid, whole]
        else:
            middle = self.glb_GN[0].to(features.dtype)
            parts = [whole, middle, grid] if self.options.order == "glb_sub" else [grid, middle, whole]
        return torch.cat(parts)


VIEWS.add("hd", ViewsSpec(HDOptions, HDViews, HDAssembler))
