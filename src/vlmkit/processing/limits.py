"""Cheap bounds checked before expensive work: a prompt's characters against the context, before tokenizing."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from vlmkit.errors import ProcessingError
from vlmkit.processing.conversation import TextPart, parse_conversation


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters any one token of ``tokenizer`` covers (an upper bound: byte-level vocabularies spell
    each byte as one character, and a character is at least one byte)."""
    cached = getattr(tokenizer, "_vlmkit_max_token_chars", None)
    if cached is None:
        cached = max((len(token) for token in tokenizer.get_vocab()), default=1)
        tokenizer._vlmkit_max_token_chars = cached
    return int(cached)


def text_chars(conversation: Any) -> int:
    """Characters of text in a conversation's messages (images not counted); 0 for one that doesn't parse (it is
    refused, with its error, when it is encoded)."""
    try:
        parsed = parse_conversation(conversation)
    except ProcessingError:
        return 0
    return sum(len(p.text) for m in parsed.messages for p in m.parts if isinstance(p, TextPart))


def check_text_fits(conversation: Any, context_length: int, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Refuse, before tokenizing, text that can't fit the context whatever it tokenizes to.

    A prompt of N characters has at least N / :func:`max_token_chars` tokens; a 19 MB body is refused in
    microseconds instead of after seconds of tokenizing.
    """
    chars = text_chars(conversation)
    bound = context_length * max_token_chars(tokenizer)
    if chars > bound:
        raise ProcessingError(
            f"{name}: the prompt has {chars:,} characters of text, more than the model's context of "
            f"{context_length} tokens can hold; shorten the conversation"
        )
