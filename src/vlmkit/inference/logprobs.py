"""Token log-probabilities as vLLM reports them: the model's own log-softmax over the vocabulary, before the
repetition penalty, temperature, top-k/top-p and any constraint mask (vLLM's default ``raw_logprobs``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from vlmkit.inference.options import TokenLogprob

_TEXTS: weakref.WeakKeyDictionary[Any, TokenTexts] = weakref.WeakKeyDictionary()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: each printable stand-in character → the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Each token's text and exact UTF-8 bytes. Byte-level BPE tokens map back to their bytes, so a token holding
    half a character has its true bytes (its text shows U+FFFD there, as a lone decode would)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.bytes_of = _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.added = {int(k): v.content for k, v in added.items()}
        self.cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        found = self.cache.get(token_id)
        if found is not None:
            return found
        if token_id in self.added:
            raw = self.added[token_id].encode("utf-8")
        elif self.bytes_of is not None:
            piece = str(self.tokenizer.convert_ids_to_tokens(token_id) or "")
            if all(c in self.bytes_of for c in piece):
                raw = bytes(self.bytes_of[c] for c in piece)
            else:
                raw = piece.encode("utf-8")
        else:
            raw = str(self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)).encode("utf-8")
        found = (raw.decode("utf-8", errors="replace"), tuple(raw))
        self.cache[token_id] = found
        return found


def token_texts(tokenizer: Any) -> TokenTexts:
    """The (cached) :class:`TokenTexts` of ``tokenizer``."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities over the vocabulary for one row's ``(vocab,)`` logits, in float32."""
    return torch.log_softmax(logits.detach().float().cpu(), dim=-1)


def token_logprob(texts: TokenTexts, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry, with the ``top`` likeliest tokens as alternatives."""
    alternatives: tuple[TokenLogprob, ...] = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = tuple(
            TokenLogprob(i, texts(i)[0], v, texts(i)[1]) for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        )
    text, raw = texts(token)
    return TokenLogprob(token, text, float(logprobs[token]), raw, alternatives)
