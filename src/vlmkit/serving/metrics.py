"""The server's ``/metrics``: requests running and waiting, and the engine's caches, in Prometheus' text format."""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CACHE_FIELDS = {
    "image": [
        ("lookups", "counter", "images looked up in the image-feature cache"),
        ("hits", "counter", "images whose features came from the cache"),
        ("evictions", "counter", "entries evicted to stay within the bound"),
        ("entries", "gauge", "images held"),
        ("bytes", "gauge", "bytes held"),
        ("capacity_bytes", "gauge", "the bound in bytes"),
    ],
    "prefix": [
        ("lookups", "counter", "prompts looked up in the KV prefix cache"),
        ("hits", "counter", "prompts that reused at least one cached block"),
        ("query_tokens", "counter", "prompt tokens looked up"),
        ("hit_tokens", "counter", "prompt tokens whose KV came from the cache"),
        ("evictions", "counter", "blocks evicted to stay within the bound"),
        ("blocks", "gauge", "blocks held"),
        ("bytes", "gauge", "bytes held"),
        ("capacity_bytes", "gauge", "the bound in bytes"),
    ],
}


def metrics_text(active: int, waiting: int, caches: dict[str, Any] | None) -> str:
    """The exposition text: ``vlmkit_requests_{running,waiting}`` and, for each cache that is on,
    ``vlmkit_{image,prefix}_cache_*`` (counters end in ``_total``)."""
    lines: list[str] = []

    def add(name: str, kind: str, text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"])

    add("vlmkit_requests_running", "gauge", "rows being decoded", active)
    add("vlmkit_requests_waiting", "gauge", "requests waiting to join the batch", waiting)
    for cache, fields in _CACHE_FIELDS.items():
        stats = (caches or {}).get(cache)
        if stats is None:
            continue
        for field, kind, text in fields:
            suffix = "_total" if kind == "counter" else ""
            add(f"vlmkit_{cache}_cache_{field}{suffix}", kind, text, stats[field])
    return "\n".join(lines) + "\n"
