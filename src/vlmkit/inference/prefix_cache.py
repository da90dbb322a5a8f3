"""The KV prefix cache: KV-cache blocks of prompts already prefilled, reused by prompts that start the same way.

As in vLLM's automatic prefix caching, a prompt is cut into blocks of ``block_size`` tokens and block ``i``'s key
is a hash of block ``i - 1``'s key, its token ids and, for every image whose placeholders fall in it, that
image's content hash and where in the image the block starts: two different images behind the same placeholder
ids never share a block. Only whole blocks are kept; a prompt reuses its longest run of cached blocks from the
start and always computes at least its last token (whose logits start the answer).
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections.abc import Sequence
from typing import Any

import torch

from vlmkit.inference.caches import ByteLRU
from vlmkit.inference.image_cache import ImageRun

Block = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One block's keys and values, per layer: ``(heads, block_size, head_dim)`` each."""


def block_bytes(block: Block) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in block)


def block_hashes(input_ids: Sequence[int], runs: Sequence[ImageRun], block_size: int) -> list[bytes]:
    """The chained key of every whole block of ``input_ids`` (image hashes folded into the blocks they fall in)."""
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(input_ids) - block_size + 1, block_size):
        stop = start + block_size
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", input_ids[start:stop]).tobytes())
        for run in runs:
            first = run.tokens_before(start)
            if first < len(run.positions) and run.positions[first] < stop:  # a placeholder of it is in the block
                digest.update(run.digest)
                digest.update(first.to_bytes(8, "little"))
        parent = digest.digest()
        hashes.append(parent)
    return hashes


def followers(hashes: Sequence[Sequence[bytes]], cached: Sequence[int], usable: Sequence[int]) -> dict[int, int]:
    """Rows of a batch that would reuse blocks another row of it computes: ``{row: blocks it would gain}``.

    ``hashes[r]``: row ``r``'s block keys; ``cached[r]``: its blocks already cached; ``usable[r]``: its blocks it
    may reuse. Rows whose first uncached block is the same share it (and, the keys being chained, all before
    it); the first of them computes it, the others follow."""
    groups: dict[bytes, list[int]] = {}
    for r, (keys, start, stop) in enumerate(zip(hashes, cached, usable, strict=True)):
        if start < stop:
            groups.setdefault(keys[start], []).append(r)
    out: dict[int, int] = {}
    for rows in groups.values():
        lead = hashes[rows[0]]
        for r in rows[1:]:
            end = cached[r]
            while end < min(usable[r], len(lead)) and hashes[r][end] == lead[end]:
                end += 1
            out[r] = end - cached[r]
    return out


class PrefixCache:
    """Blocks by chained key, bounded in bytes (LRU, a prefix's first blocks kept longest). Thread-safe."""

    def __init__(self, capacity_bytes: int, block_size: int) -> None:
        self.block_size = block_size
        self.store: ByteLRU[Block] = ByteLRU(capacity_bytes)
        self._lock = threading.Lock()
        self.queries = 0
        self.hits = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    def lookup(self, hashes: Sequence[bytes]) -> list[Block]:
        """The cached blocks of the longest cached run of ``hashes`` from the first (now the most recently used;
        not counted: :meth:`record` counts what a prompt reused)."""
        blocks: list[Block] = []
        for key in hashes:
            block = self.store.get(key, count=False)
            if block is None:
                break
            blocks.append(block)
        for key in reversed(hashes[: len(blocks)]):  # the first blocks most recent: evicted last
            self.store.get(key, count=False)
        return blocks

    def record(self, prompt_tokens: int, reused_tokens: int) -> None:
        """Count one prompt of ``prompt_tokens`` tokens that reused ``reused_tokens`` of them."""
        with self._lock:
            self.queries += 1
            self.hits += reused_tokens > 0
            self.query_tokens += prompt_tokens
            self.hit_tokens += reused_tokens

    def insert(self, hashes: Sequence[bytes], blocks: Sequence[Block]) -> None:
        """Keep blocks under their keys (the last first, so that a prefix's first blocks are evicted last)."""
        for key, block in reversed(list(zip(hashes, blocks, strict=True))):
            if key not in self.store:
                self.store.put(key, block, block_bytes(block))

    def __contains__(self, key: bytes) -> bool:
        return key in self.store

    def stats(self) -> dict[str, Any]:
        """Prompts looked up and those that reused blocks, their tokens and those reused, and the store's
        figures (``entries`` are blocks)."""
        store = self.store.stats()
        with self._lock:
            return {
                "lookups": self.queries,
                "hits": self.hits,
                "hit_rate": round(self.hits / self.queries, 4) if self.queries else None,
                "query_tokens": self.query_tokens,
                "hit_tokens": self.hit_tokens,
                "token_hit_rate": round(self.hit_tokens / self.query_tokens, 4) if self.query_tokens else None,
                "blocks": store["entries"],
                "bytes": store["bytes"],
                "capacity_bytes": store["capacity_bytes"],
                "evictions": store["evictions"],
                "block_size": self.block_size,
            }
