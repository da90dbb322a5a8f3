"""Next-token choice: greedy or sampled with temperature, top-k, top-p and a repetition penalty."""

from __future__ import annotations

import torch

from vlmkit.inference.options import GenerationOptions


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits ÷ penalty, negative × penalty."""
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k tokens and outside the smallest set with mass ≥ top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        remove[..., 0] = False  # and always the most likely one (a top_p that rounds to 0 in float32 keeps it)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def choose_token(
    logits: torch.Tensor, options: GenerationOptions, seen: torch.Tensor | None, generator: torch.Generator | None
) -> int:
    """Pick the next token for one row from its ``(vocab,)`` logits (sampled on the CPU, like its generator)."""
    logits = logits.float().cpu()
    if options.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits.clone(), seen, options.repetition_penalty)
    if options.greedy:
        return int(torch.argmax(logits))
    scaled = logits / options.temperature
    if not torch.isfinite(scaled[scaled != float("-inf")]).all():
        return int(torch.argmax(logits))  # a temperature so small it overflows: its limit, greedy
    probs = torch.softmax(filter_top_k_top_p(scaled, options.top_k, options.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
