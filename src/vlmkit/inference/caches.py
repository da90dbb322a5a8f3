"""The engine's reuse caches: their options (:class:`CacheConfig`) and the bounded store they share (:class:`ByteLRU`).

Two caches sit on top (vLLM's automatic prefix caching, adapted to a ``DynamicCache`` engine): projected image
features by image content hash (:mod:`vlmkit.inference.image_cache`), and KV blocks of prompt prefixes keyed by
token ids with image hashes folded in (:mod:`vlmkit.inference.prefix_cache`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from vlmkit.errors import ConfigError

V = TypeVar("V")

MB = 1024 * 1024


@dataclass(frozen=True)
class CacheConfig:
    """Sizes of the engine's caches; 0 turns one off."""

    image_cache_mb: float = 64.0
    """Projected image features, keyed by the image's content hash."""
    prefix_cache_mb: float = 256.0
    """KV-cache blocks of prompt prefixes, keyed by token ids with image hashes folded in."""
    block_size: int = 16
    """Tokens per prefix block: only whole blocks are cached and reused."""

    def __post_init__(self) -> None:
        for name in ("image_cache_mb", "prefix_cache_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a number of megabytes ≥ 0 (0: off), got {value!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")

    @classmethod
    def off(cls) -> CacheConfig:
        return cls(image_cache_mb=0, prefix_cache_mb=0)


class ByteLRU(Generic[V]):
    """A map bounded by the bytes of its values; the least recently used entries go first. Thread-safe.

    Counts lookups, hits, insertions and evictions (:meth:`stats`). A value larger than the whole bound is not
    kept."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = int(capacity_bytes)
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.inserts = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, count: bool = True) -> V | None:
        """The value (now the most recently used), or None; ``count=False`` leaves the statistics alone."""
        with self._lock:
            self.lookups += count
            item = self._items.get(key)
            if item is None:
                return None
            self.hits += count
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> bool:
        """Keep ``value`` (``nbytes`` large), evicting the least recently used entries; False if it cannot fit."""
        if nbytes > self.capacity:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            self.inserts += 1
            while self.bytes > self.capacity:
                _, (_, size) = self._items.popitem(last=False)
                self.bytes -= size
                self.evictions += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, Any]:
        """``lookups``, ``hits``, ``hit_rate`` (None before any lookup), ``entries``, ``bytes``,
        ``capacity_bytes``, ``inserts``, ``evictions``."""
        with self._lock:
            return {
                "lookups": self.lookups,
                "hits": self.hits,
                "hit_rate": round(self.hits / self.lookups, 4) if self.lookups else None,
                "entries": len(self._items),
                "bytes": self.bytes,
                "capacity_bytes": self.capacity,
                "inserts": self.inserts,
                "evictions": self.evictions,
            }
