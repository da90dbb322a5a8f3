"""The compiled decode step of the native engine: the language model's one-token forward over a preallocated
:class:`~vlmkit.inference.kv_cache.StaticKV`, compiled with ``torch.compile`` (static shapes; CUDA graphs on
CUDA), and run eagerly when compiling is not possible.

Shapes are bucketed (rows and cache columns rounded up to powers of two) so that a running batch rows join and
leave triggers a bounded number of compilations; idle caches are kept per shape for the next batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from vlmkit.errors import ConfigError
from vlmkit.inference.attention import use_decode_attention
from vlmkit.inference.kv_cache import StaticKV

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "compiled", "eager")
"""``compiled``: static KV cache + compiled decode step; ``eager``: transformers' ``DynamicCache``, no compile;
``auto``: ``compiled`` on CUDA, ``eager`` elsewhere (see docs/performance.md for the figures behind it)."""
MIN_COLUMNS = 128
"""The smallest cache length bucket."""
RECOMPILE_LIMIT = 64
"""Compiled shapes (row × column buckets) one decoder may hold."""
IDLE_CACHES = 4
"""Idle static caches kept for reuse (most recently released first)."""
BACKEND = "inductor"
"""``torch.compile``'s backend (tests use a cheaper one)."""
CPU_OPTIONS: dict[str, Any] = {
    "freezing": True,
    "cpp.enable_concat_linear": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
}
"""Inductor's options on CPU: weights frozen into the graph, so its concat-linear pass fuses the q/k/v and the
gate/up projections, and its C++ GEMM templates compete with oneMKL for every matmul (a longer compile, the
fastest step measured: docs/performance.md)."""
CUDA_OPTIONS: dict[str, Any] = {"triton.cudagraphs": True}
"""Inductor's options on CUDA: ``mode="reduce-overhead"`` (CUDA graphs)."""


def check_decode_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`DECODE_MODES`, else a :class:`ConfigError` naming the option."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"decode: unknown mode {mode!r}; valid: {', '.join(DECODE_MODES)}")
    return mode


def bucket(count: int, minimum: int = 1) -> int:
    """The smallest power of two ≥ ``count`` and ≥ ``minimum``."""
    size = max(minimum, 1)
    while size < count:
        size *= 2
    return size


def static_cache_supported(config: Any) -> bool:
    """Whether every layer of this LM's static cache is a plain full-attention layer (what :class:`StaticKV`
    moves rows and columns of)."""
    try:
        cache = StaticCache(config=config, max_cache_len=1)
    except Exception:  # a config transformers' static cache cannot describe
        return False
    return bool(cache.layers) and all(type(layer) is StaticLayer for layer in cache.layers)


def decode_step(language_model: Any) -> Any:
    """The LM's one-token forward over a static cache: the last position's logits. The model is a closure
    variable, not an argument, so that the compiler sees its weights as the module's (freezing folds them)."""

    def forward(kv_cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        out = language_model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, cache=kv_cache, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1]

    return forward


class CompiledDecoder:
    """One LM's decode step over static caches: compiled on first use of each shape, eager after a failure."""

    def __init__(self, language_model: Any) -> None:
        self.language_model = language_model
        use_decode_attention(language_model)  # grouped-query steps read the static cache without expanding it
        self.device = next(language_model.parameters()).device
        # inductor's config while compiling (given as torch.compile's options, freezing was not applied)
        self._options = dict(CUDA_OPTIONS if self.device.type == "cuda" else CPU_OPTIONS)
        # the overloads of torch.compile do not list recompile_limit and isolate_recompiles yet
        self._eager = decode_step(language_model)
        self._compiled = torch.compile(  # type: ignore[call-overload]
            self._eager, fullgraph=True, dynamic=False, backend=BACKEND,
            recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True,
        )  # fmt: skip
        self.error: Exception | None = None
        """Why compiling failed (then every step runs eagerly); None while it works."""
        self.compile_seconds = 0.0
        """Time spent in steps that compiled a new shape (compile included)."""
        self._shapes: set[tuple[int, int]] = set()
        self._idle: list[StaticKV] = []

    def allocate(self, rows: int, columns: int, template: DynamicCache | StaticKV) -> StaticKV:
        """An empty cache of at least ``rows`` × ``columns`` (bucketed), reused when one is idle."""
        slots, length = bucket(rows), bucket(columns, MIN_COLUMNS)
        for i, kv in enumerate(self._idle):
            if (kv.slots, kv.length) == (slots, length):
                del self._idle[i]
                kv.reset()
                return kv
        return StaticKV(self.language_model.config, slots, length, template)

    def release(self, kv: StaticKV) -> None:
        """Keep ``kv`` for a later batch (the oldest idle one beyond :data:`IDLE_CACHES` is dropped)."""
        self._idle.insert(0, kv)
        del self._idle[IDLE_CACHES:]

    def step(self, kv: StaticKV) -> torch.Tensor:
        """One decoding forward of every slot (inputs set by :meth:`StaticKV.prepare`): the logits, a row per slot."""
        args = (kv.cache, kv.tokens, kv.positions, kv.mask)
        if self.error is None:
            shape = (kv.slots, kv.length)
            new = shape not in self._shapes
            try:
                if new:
                    began = time.perf_counter()
                    from torch._inductor import config as inductor_config

                    with inductor_config.patch(self._options):
                        logits = self._compiled(*args)
                    self.compile_seconds += time.perf_counter() - began
                    self._shapes.add(shape)
                else:
                    logits = self._compiled(*args)
            except Exception as exc:  # compile unavailable (no C++ compiler, unsupported op, ...): run eagerly
                self.error = exc
                log.warning("compiling the decode step failed (%s: %s); decoding eagerly from now on",
                            type(exc).__name__, exc)  # fmt: skip
                for layer in kv.layers:  # a failed attempt may have moved some layers' write position
                    layer.cumulative_length.fill_(kv.column)
            else:
                kv.advanced()
                return logits.clone() if self.device.type == "cuda" else logits
        logits = self._eager(*args)
        kv.advanced()
        return logits
