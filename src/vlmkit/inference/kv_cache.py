"""Row-level operations on a transformers ``DynamicCache``: drop rows, merge batches, trim shared padding, copy
blocks of a row out and build a cache from such blocks.

These let requests join and leave a running batch (iteration-level batching) and the prefix cache keep and
reuse prompt blocks (:mod:`vlmkit.inference.prefix_cache`). All knowledge of the cache's
internals (``cache.layers[i].keys/values``, shape ``(batch, heads, seq, head_dim)``) is kept in this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

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


def row_blocks(cache: DynamicCache, row: int, start: int, count: int, block_size: int) -> list[tuple]:
    """Copies of ``count`` blocks of ``block_size`` positions of one row, from column ``start``: per block, per
    layer, ``(keys, values)`` of shape ``(heads, block_size, head_dim)`` (the prefix cache's blocks)."""
    layers = _layers(cache)
    blocks = []
    for b in range(count):
        cols = slice(start + b * block_size, start + (b + 1) * block_size)
        blocks.append(tuple((layer.keys[row, :, cols].clone(), layer.values[row, :, cols].clone()) for layer in layers))
    return blocks


def from_blocks(rows: list[list[tuple]], width: int) -> DynamicCache:
    """A left-padded cache of ``width`` positions whose row ``r`` ends with the blocks ``rows[r]`` (zeros, to be
    masked out, before them); the inverse of :func:`row_blocks`."""
    template = next(blocks[0] for blocks in rows if blocks)
    cache = DynamicCache()
    for index, (keys, values) in enumerate(template):
        shape = (len(rows), keys.shape[0], width, keys.shape[-1])
        layer_keys, layer_values = keys.new_zeros(shape), values.new_zeros(shape[:3] + values.shape[-1:])
        for r, blocks in enumerate(rows):
            if blocks:
                length = sum(block[index][0].shape[1] for block in blocks)
                layer_keys[r, :, width - length :] = torch.cat([block[index][0] for block in blocks], dim=1)
                layer_values[r, :, width - length :] = torch.cat([block[index][1] for block in blocks], dim=1)
        cache.update(layer_keys, layer_values, index)
    return cache


class StaticKV:
    """A preallocated KV cache (transformers' ``StaticCache``) of ``slots`` rows × ``length`` columns, its
    attention mask and the decode step's input buffers, for a compiled decode step with static shapes.

    The first ``rows`` slots hold the running rows, left-padded so that every row's next token goes in column
    ``column`` (the layers' write position); the other slots are free (their mask attends only to the current
    column, so they compute finite junk). Rows join (:meth:`append`), leave (:meth:`keep`) and padding columns
    are dropped (:meth:`trim`) by copies inside the same tensors: nothing is reallocated per step.
    """

    def __init__(self, config: Any, slots: int, length: int, template: DynamicCache | StaticKV) -> None:
        """``template``: a prefill's cache (or another static one), giving the layers' heads, head sizes, dtype
        and device."""
        cache = StaticCache(config=config, max_cache_len=length)
        sources = template.layers if isinstance(template, StaticKV) else _layers(template)
        if len(cache.layers) != len(sources) or any(type(layer) is not StaticLayer for layer in cache.layers):
            raise VlmkitError("this language model's cache has sliding-window or other non-full-attention layers")
        static = [layer for layer in cache.layers if isinstance(layer, StaticLayer)]
        for layer, source in zip(static, sources, strict=True):
            heads = source.keys.shape[1]
            layer.lazy_initialization(
                source.keys.new_zeros((slots, heads, 1, source.keys.shape[-1])),
                source.values.new_zeros((slots, heads, 1, source.values.shape[-1])),
            )
        device = sources[0].keys.device
        self.cache, self.slots, self.length = cache, slots, length
        self.mask = torch.zeros((slots, length), dtype=torch.long, device=device)
        self.tokens = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.rows = 0
        self.column = 0
        self._set_column(0)

    @property
    def layers(self) -> list:
        return self.cache.layers

    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def _set_column(self, column: int) -> None:
        self.column = column
        for layer in self.layers:
            layer.cumulative_length.fill_(column)

    def reset(self) -> None:
        """Empty (the tensors stay allocated)."""
        self.mask.zero_()
        self.rows = 0
        self._set_column(0)

    def fits(self, rows: int, columns: int) -> bool:
        return rows <= self.slots and columns <= self.length

    def append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copy a left-padded prefill (its cache and ``(rows, width)`` mask) into the next free slots, its last
        column just before ``column`` (the running rows move right first when the prefill is wider)."""
        count, width = mask.shape
        if not self.fits(self.rows + count, max(width, self.column)):
            raise VlmkitError(f"{count} rows of {width} columns do not fit a {self.slots} × {self.length} KV cache")
        if width > self.column:
            self._shift(width - self.column)
        start, rows = self.column - width, slice(self.rows, self.rows + count)
        for layer, source in zip(self.layers, _layers(cache), strict=True):
            layer.keys[rows, :, start : self.column] = source.keys
            layer.values[rows, :, start : self.column] = source.values
        self.mask[rows] = 0
        self.mask[rows, start : self.column] = mask
        self.rows += count

    def load(self, other: StaticKV) -> None:
        """Take over ``other``'s rows and columns (moving to a larger or smaller cache)."""
        if not self.fits(other.rows, other.column):
            raise VlmkitError(f"{other.rows} rows of {other.column} columns do not fit a {self.slots} × "
                              f"{self.length} KV cache")  # fmt: skip
        self.reset()
        rows, columns = slice(0, other.rows), slice(0, other.column)
        for layer, source in zip(self.layers, other.layers, strict=True):
            layer.keys[rows, :, columns] = source.keys[rows, :, columns]
            layer.values[rows, :, columns] = source.values[rows, :, columns]
        self.mask[rows, columns] = other.mask[rows, columns]
        self.rows = other.rows
        self._set_column(other.column)

    def keep(self, index: list[int]) -> None:
        """Keep only the rows ``index`` (in that order) in the first slots."""
        select = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        count, columns = len(index), slice(0, self.column)
        for layer in self.layers:
            layer.keys[:count, :, columns] = layer.keys[select, :, columns]
            layer.values[:count, :, columns] = layer.values[select, :, columns]
        self.mask[:count] = self.mask[select]
        self.mask[count:] = 0
        self.rows = count

    def trim(self) -> None:
        """Drop the leading columns no running row attends to."""
        attended = self.mask[: self.rows, : self.column].any(dim=0).nonzero()
        first = int(attended[0]) if len(attended) else self.column
        if first:
            self._shift(-first)

    def _shift(self, delta: int) -> None:
        """Move the running rows' columns ``delta`` to the right (left when negative); uncovered columns are
        masked out."""
        old, new = self.column, self.column + delta
        rows = slice(0, self.rows)
        source, target = slice(max(-delta, 0), old), slice(max(delta, 0), new)
        for layer in self.layers:
            layer.keys[rows, :, target] = layer.keys[rows, :, source].clone()
            layer.values[rows, :, target] = layer.values[rows, :, source].clone()
        self.mask[rows, target] = self.mask[rows, source].clone()
        self.mask[rows, : max(delta, 0)] = 0
        self.mask[rows, new:] = 0
        self._set_column(new)

    def prepare(self, tokens: list[int], positions: torch.Tensor) -> None:
        """Inputs of one decoding step: each running row's token and position, every slot attending to the
        current column (the step writes its keys and values there)."""
        if self.column >= self.length:
            raise VlmkitError(f"the {self.length}-column KV cache is full")
        count = len(tokens)
        self.tokens[:count, 0] = torch.tensor(tokens, dtype=torch.long)
        self.positions[:count, 0] = positions
        self.mask[:, self.column] = 1

    def advanced(self) -> None:
        """After a decoding step: the layers wrote column ``column`` and moved on."""
        self.column += 1
