"""Row-level operations on a transformers ``DynamicCache``: drop rows, merge batches, trim shared padding.

These let requests join and leave a running batch (iteration-level batching). All knowledge of the cache's
internals (``cache.layers[i].keys/values``, shape ``(batch, heads, seq, head_dim)``) is kept in this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from vlmkit.errors import VlmkitError


def _layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise VlmkitError("this transformers version's KV cache layout is not supported by vlmkit's batch merging")
    return layers


def select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep only the batch rows in ``index`` (in that order)."""
    cache.batch_select_indices(index)


def left_pad(cache: DynamicCache, columns: int) -> None:
    """Prepend ``columns`` zero positions to every layer (they must be masked out by the attention mask)."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
        layer.values = F.pad(layer.values, (0, 0, columns, 0))


def trim_left(cache: DynamicCache, columns: int) -> None:
    """Drop the first ``columns`` positions of every layer (padding no row attends to any more)."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, columns:].contiguous()
        layer.values = layer.values[:, :, columns:].contiguous()


def append_rows(cache: DynamicCache, other: DynamicCache) -> None:
    """Concatenate ``other``'s rows after ``cache``'s (same sequence length: pad first)."""
    for layer, extra in zip(_layers(cache), _layers(other), strict=True):
        layer.keys = torch.cat([layer.keys, extra.keys], dim=0)
        layer.values = torch.cat([layer.values, extra.values], dim=0)


def merge(
    cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Merge two left-padded batches into ``cache`` (rows of ``other`` last); returns it and the merged mask."""
    width = max(mask.shape[1], other_mask.shape[1])
    left_pad(cache, width - mask.shape[1])
    left_pad(other, width - other_mask.shape[1])
    append_rows(cache, other)
    mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(other_mask, (width - other_mask.shape[1], 0))])
    return cache, mask


def trim_padding(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Remove leading columns that are padding in every row; returns the trimmed mask."""
    attended = mask.any(dim=0).nonzero()
    first = int(attended[0]) if len(attended) else mask.shape[1]
    trim_left(cache, first)
    return mask[:, first:]
