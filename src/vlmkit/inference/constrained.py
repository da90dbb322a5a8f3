"""JSON mode by constrained decoding: a response format compiles to an llguidance grammar, and each row's
:class:`GrammarConstraint` masks, before every token is chosen, every token that would leave the grammar.

llguidance (``pip install 'vlmkit[json]'``) reads the model's own tokenizer (any fast tokenizer, byte-level BPE
included) and computes the allowed tokens of each step; when the JSON is complete only the stop tokens remain.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from vlmkit.errors import ConfigError, ProcessingError

_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise ConfigError(
            "response_format json_object / json_schema needs the llguidance package: pip install 'vlmkit[json]'"
        ) from exc
    return llguidance


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How the JSON is laid out: ``{"a": 1, "b": [2, 3]}``, no other whitespace (so a model can't spend its budget
on spaces). A schema's own ``"x-guidance"`` options override it."""


def json_schema_of(response_format: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a response format asks for (None for ``text``): ``json_object`` is any object."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        return dict(response_format["json_schema"]["schema"])
    return None


@functools.lru_cache(maxsize=64)
def _compile(schema_json: str) -> str:
    llguidance = _llguidance()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise ConfigError(f"response_format: the JSON schema can't be compiled ({exc})") from exc
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ConfigError(f"response_format: the JSON schema can't be enforced: {problem}")
    return str(grammar)


def compile_response_format(response_format: Mapping[str, Any] | None) -> str | None:
    """The llguidance grammar of a response format (None for none or ``text``); a ConfigError names what is
    wrong with the schema (checked before a request is queued)."""
    if response_format is None:
        return None
    schema = json_schema_of(response_format)
    return None if schema is None else _compile(json.dumps(schema, sort_keys=True))


def _ll_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> Any:
    """llguidance's view of the tokenizer, the stop ids as its end of sequence (about a second to build: cached)."""
    stops = tuple(sorted(t for t in stop_ids if 0 <= t < vocab_size))
    cached = _TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, stops)
    if key not in cached:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("response_format needs a fast (Rust) tokenizer; this model's tokenizer is not one")
        _llguidance()
        import llguidance.hf

        cached[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stops) or None)
    return cached[key]


class GrammarConstraint:
    """One row's grammar state: :meth:`allowed` before a token is chosen, :meth:`advance` after."""

    def __init__(self, grammar: str, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> None:
        llguidance = _llguidance()
        self.vocab_size = vocab_size
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size, stop_ids), grammar, log_level=0)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ProcessingError(f"response_format: the constraint failed ({self.matcher.get_error()})")

    def allowed(self) -> torch.Tensor:
        """A ``(vocab,)`` boolean mask of the tokens the grammar allows next."""
        bias = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        self._check()
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[: min(len(bias), self.vocab_size)] = bias[: self.vocab_size] > 0
        return mask

    def advance(self, token: int) -> None:
        """Take the chosen token (it was allowed, so this only fails on a bug)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
            self._check()
