"""Image content hashes and the image-feature cache: an image seen again (a later chat turn, another request,
another question about it) is not run through the vision tower and projector again.

An image's hash is of its processed views (the pixels the tower sees, so the views strategy and the image
transform are in it), their shape and dtype, and the image's size; features are kept per image, projected.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlmkit.errors import ProcessingError
from vlmkit.inference.caches import ByteLRU
from vlmkit.processing.processor import EncodedSample

Encoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | list[torch.Tensor]]
"""``(pixels of every view, (N, 2) image sizes or None)`` → projected features (the model's ``encode_images``)."""


@dataclass(frozen=True)
class ImageRun:
    """One image run of a prompt: its content hash, its views' pixels, its size and its placeholder positions."""

    digest: bytes
    pixels: torch.Tensor
    size: tuple[int, int] | None
    positions: tuple[int, ...]
    """Token indices of its placeholders, ascending."""

    def tokens_before(self, index: int) -> int:
        """How many of its placeholders come before token ``index``."""
        return bisect_left(self.positions, index)


def pixel_digest(pixels: torch.Tensor, size: tuple[int, int] | None) -> bytes:
    """A 16-byte hash of an image's processed views (bytes, shape, dtype) and its original size."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(pixels.shape), str(pixels.dtype), size)).encode())
    digest.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return digest.digest()


def image_runs(
    sample: EncodedSample, image_token_id: int, num_views: Callable[[tuple[int, int]], int]
) -> list[ImageRun]:
    """The image runs of an encoded prompt, in order (an image shown again is a run of its own, same hash)."""
    if not sample.image_token_counts:
        return []
    if sample.pixel_values is None:
        raise ProcessingError("the prompt's images were not loaded (pixel_values is None)")
    slots = [t for t, token in enumerate(sample.input_ids) if token == image_token_id]
    sizes: Sequence[tuple[int, int] | None] = sample.image_sizes or [None] * sample.num_images
    runs, view, slot = [], 0, 0
    for count, size in zip(sample.image_token_counts, sizes, strict=True):
        views = num_views(size) if size is not None else 1
        pixels = sample.pixel_values[view : view + views]
        runs.append(ImageRun(pixel_digest(pixels, size), pixels, size, tuple(slots[slot : slot + count])))
        view, slot = view + views, slot + count
    return runs


class ImageFeatureCache:
    """Projected features of images by content hash, bounded in bytes (LRU). ``capacity_bytes`` 0: nothing is
    kept, but an image given several times in one call is still encoded once."""

    def __init__(self, capacity_bytes: int) -> None:
        self.store: ByteLRU[torch.Tensor] = ByteLRU(capacity_bytes)

    def features(self, runs: Sequence[ImageRun], encode: Encoder) -> list[torch.Tensor]:
        """``(tokens, hidden)`` features of each run: from the cache, else encoded together and kept."""
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, ImageRun] = {}
        for run in runs:
            if run.digest in found or run.digest in missing:
                continue
            cached = self.store.get(run.digest) if self.store.capacity else None
            if cached is not None:
                found[run.digest] = cached
            else:
                missing[run.digest] = run
        if missing:
            todo = list(missing.values())
            pixels = torch.cat([run.pixels for run in todo])
            sizes = [run.size for run in todo]
            size_tensor = None if any(s is None for s in sizes) else torch.tensor(sizes, dtype=torch.long)
            encoded = encode(pixels, size_tensor)
            for run, feats in zip(todo, list(encoded), strict=True):
                feats = feats.clone()  # not a view that would keep the whole batch's features alive
                found[run.digest] = feats
                self.store.put(run.digest, feats, feats.numel() * feats.element_size())
        return [found[run.digest] for run in runs]

    def stats(self) -> dict:
        return self.store.stats()
