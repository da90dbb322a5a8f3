"""The attention the compiled decode step runs: transformers' SDPA attention, with grouped-query decoding that
does not expand the KV cache.

Eagerly, transformers' ``sdpa`` attention decodes a grouped-query (GQA) layer by folding the query heads onto
the key/value heads (``pack_gqa``), but under ``torch.compile`` it expands the keys and values to every query
head (``repeat_kv``) instead: a copy of the whole preallocated cache, every layer, every step, which made the
compiled step slower than eager from batch 8 up (docs/performance.md). :data:`DECODE_ATTENTION` is registered in
transformers' ``AttentionInterface`` (and its mask in ``AttentionMaskInterface``, as SDPA's); it folds the query
heads for one-token GQA steps under compile too, and is transformers' ``sdpa_attention_forward`` otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DECODE_ATTENTION = "vlmkit_decode_sdpa"
"""The attention implementation's registered name (set on a language model by :func:`use_decode_attention`)."""


def decode_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; a one-token step of a GQA layer attends with the query heads folded onto the
    key/value heads (``(batch, kv_heads, groups, head_dim)``), the cache read as it is."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap")
    if plain or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_sdpa_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def use_decode_attention(language_model: Any) -> bool:
    """Switch a language model that uses transformers' ``sdpa`` attention to :data:`DECODE_ATTENTION` (the same
    results; not saved with the model). True if it was switched or already uses it."""
    current = getattr(language_model.config, "_attn_implementation", None)
    if current == DECODE_ATTENTION:
        return True
    if current != "sdpa":
        return False
    language_model.set_attn_implementation(DECODE_ATTENTION)
    return True
