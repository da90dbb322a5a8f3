"""Pixel shuffle projectors (``pixel_shuffle{s}x``): Idefics3 / SmolVLM / nanoVLM's connector.

Each ``s × s`` block of a view's ``side × side`` token grid becomes one token of ``C·s²`` channels
(``Idefics3Connector.pixel_shuffle``), then one bias-free Linear maps it to the LM (``Idefics3SimpleMLP``): a
view's tokens drop ``s²``-fold. The model asks :meth:`PixelShuffleProjector.output_tokens` how many remain, so
the processor's placeholder counts follow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmkit.errors import ConfigError


def shuffled_tokens(tokens: int, scale: int) -> int:
    """Tokens left of a square grid of ``tokens`` after an ``s × s`` pixel shuffle; refuses other grids."""
    side = math.isqrt(tokens) if tokens > 0 else 0
    if side * side != tokens or side == 0:
        raise ConfigError(
            f"pixel_shuffle{scale}x needs a square grid of tokens per view, but the tower gives {tokens} (a CLS "
            "token kept? select_strategy 'default' drops it)"
        )
    if side % scale:
        raise ConfigError(
            f"pixel_shuffle{scale}x needs a grid side divisible by {scale}, but the tower's grid is {side}×{side} "
            f"({tokens} tokens per view)"
        )
    return tokens // (scale * scale)


def pixel_shuffle(x: torch.Tensor, scale_factor: int = 2) -> torch.Tensor:
    """``(B, side², C)`` → ``(B, side²/s², C·s²)``, exactly ``Idefics3Connector.pixel_shuffle``."""
    bsz, seq, embed_dim = x.size()
    shuffled_tokens(seq, scale_factor)
    height = width = math.isqrt(seq)
    x = x.reshape(bsz, height, width, embed_dim)  # Idefics3 has view(): reshape also takes non-contiguous input
    x = x.reshape(bsz, height, width // scale_factor, embed_dim * scale_factor)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(bsz, width // scale_factor, height // scale_factor, embed_dim * scale_factor**2)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(bsz, seq // scale_factor**2, embed_dim * scale_factor**2)


class PixelShuffleProjector(nn.Module):
    """Pixel shuffle by ``scale``, then ``Linear(C·s² → out_features, bias=False)``."""

    def __init__(self, in_features: int, out_features: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(in_features * scale * scale, out_features, bias=False)

    def output_tokens(self, tokens: int) -> int:
        """Tokens of one view after this projector, from the tower's ``tokens``."""
        return shuffled_tokens(tokens, self.scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(views, side², C)`` tower features → ``(views, side²/s², out_features)``."""
        if features.dim() != 3:
            raise ConfigError(
                f"pixel_shuffle{self.scale}x takes (views, tokens, channels) features of each view's patch grid, "
                f"got shape {tuple(features.shape)}; it goes with views strategies that project each view's grid "
                "('single', 'anyres'), not with 'hd' (which merges 2×2 patches itself)"
            )
        return self.proj(pixel_shuffle(features, self.scale))
