"""Token budgets for generated text: the tokenizer that counts, and trimming to the last complete clause.

A text-to-image model reads at most N tokens of its text encoder's tokenizer (CLIP: 77, start and end tokens
included); a description written for it must fit without ending mid-phrase. ``describe --token-budget`` stops
generating once the text can no longer fit (:meth:`BudgetCounter.exhausted`), then keeps the longest prefix that
ends at a clause boundary and fits (:func:`trim_to_clause`).

**Clause boundaries** (:func:`clause_ends`), where a prefix may end:

- after ``.``, ``!``, ``?``, ``;``, ``:`` or ``,`` followed by whitespace or the end of the text (so ``3.5`` and
  ``1,000`` are not boundaries), closing quotes and brackets right after the mark staying with it;
- before ``and`` when the word after it starts a new phrase: a determiner, possessive, number or pronoun (``and a
  blue square``, ``and the sky``, ``and it shines``), not a second modifier (``red and white car``).

The kept text ends at the mark (``.!?`` kept; ``,;:`` dropped) or just before ``and``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError
from vlmkit.registry import Registry

PHRASE_STARTS = frozenset((
    "a", "an", "the", "this", "that", "these", "those", "its", "his", "her", "their", "our", "my", "your", "some",
    "many", "several", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "it", "they",
    "he", "she", "there", "each", "every", "both",
))  # fmt: skip
"""Words that start a new phrase after ``and`` (see the module docstring)."""

_MARK = re.compile(r"""[.!?;:,]["'”’)\]]*(?=\s|$)""")
_AND = re.compile(r"\s+and\s+(\w+)", re.IGNORECASE)

BUDGET_TOKENIZERS: Registry[Callable[[], Any]] = Registry("budget tokenizer")
"""Named tokenizers that count a budget offline; ``clip`` is CLIP's (Stable Diffusion 1.x/2.x's text encoder)."""


def _clip() -> Any:
    from vlmkit.processing.clip_tokenizer import clip_tokenizer

    return clip_tokenizer()


BUDGET_TOKENIZERS.add("clip", _clip)


def resolve_budget_tokenizer(name: str) -> Any:
    """A tokenizer by built-in name (:data:`BUDGET_TOKENIZERS`), local folder or hub id; one that cannot be loaded
    (offline, not cached, not a tokenizer) is a :class:`ConfigError` saying what to pass instead."""
    if name in BUDGET_TOKENIZERS:
        return BUDGET_TOKENIZERS.get(name)()
    from transformers import AutoTokenizer

    where = "folder" if Path(name).expanduser().is_dir() else "hub id"
    try:
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if where == "folder" else name)
    except Exception as exc:  # hub and tokenizer errors are many types; all mean "couldn't load it"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "; for CLIP's tokenizer (what Stable Diffusion 1.x/2.x's text encoder counts) use --budget-tokenizer clip, "
            "shipped with vlmkit"
            if "clip" in name.lower()
            else f"; built-in names that work offline: {', '.join(BUDGET_TOKENIZERS.names())}"
        )
        raise ConfigError(f"budget tokenizer {name!r} ({where}) could not be loaded: {reason}{hint}") from None


class BudgetCounter:
    """Counts a text's tokens as the budget tokenizer does: special tokens (CLIP's start and end) included."""

    def __init__(self, tokenizer: Any, budget: int) -> None:
        if budget <= 2:
            raise ConfigError(f"token budget must be more than 2 tokens, got {budget}")
        self.tokenizer = tokenizer
        self.budget = budget

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, verbose=False)["input_ids"])

    def fits(self, text: str) -> bool:
        return self.count(text) <= self.budget

    def exhausted(self, text: str) -> bool:
        """Whether generating more is pointless: the complete words so far (up to the last whitespace) already
        pass the budget, so no clause that ends later can fit."""
        cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
        return cut > 0 and self.count(text[:cut]) > self.budget


def clause_ends(text: str) -> list[int]:
    """Offsets where a prefix of ``text`` may end (see the module docstring), ascending; the kept prefix is
    ``text[:offset]`` stripped of trailing whitespace and of a trailing ``,;:``."""
    ends = {m.end() for m in _MARK.finditer(text)}
    ends |= {m.start() for m in _AND.finditer(text) if m.group(1).lower() in PHRASE_STARTS and m.start() > 0}
    return sorted(ends)


def _clean(prefix: str) -> str:
    prefix = prefix.rstrip()
    while prefix and prefix[-1] in ",;:":
        prefix = prefix[:-1].rstrip()
    return prefix


def trim_to_clause(text: str, counter: BudgetCounter, complete: bool = True) -> tuple[str, str | None]:
    """``(text, None)`` when it is ``complete`` (the model ended it) and fits; else the longest prefix ending at a
    clause boundary that fits, with ``"clause"``; when there is none, the longest word-boundary prefix that fits,
    with ``"word"``. An incomplete text (stopped at the budget or at ``max_new_tokens``) ends mid-phrase, so it is
    trimmed even when it fits; its own end counts only if it ends a clause (``... square.``).
    """
    if complete and counter.fits(text):
        return text, None
    for end in reversed(clause_ends(text)):
        prefix = _clean(text[:end])
        if prefix and counter.fits(prefix):
            return prefix, "clause"
    return fit_words(text, counter), "word"


def fit_words(text: str, counter: BudgetCounter) -> str:
    """The longest word-boundary prefix of ``text`` that fits (the fallback of :func:`trim_to_clause`)."""
    words = text.split()
    low, high = 0, len(words)  # words[:low] fits; words[:high+1] doesn't
    while low < high:
        mid = (low + high + 1) // 2
        if counter.fits(" ".join(words[:mid])):
            low = mid
        else:
            high = mid - 1
    return _clean(" ".join(words[:low])).rstrip("-")
